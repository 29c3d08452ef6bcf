"""Provenance: what made an artifact, on what, from what, with which command.

Every JSON artifact we write (build manifest, quality reports, validation and bench JSON)
carries :func:`provenance`: the versions of every tool that can touch a graph (read from the
installed distributions' metadata: nothing heavy is imported), the command line, the host
(CPU model, cores, GPUs when the NVIDIA driver shows any) and, where the artifact is about
graphs, their sha256.
"""

from __future__ import annotations

import os
import platform
import shlex
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

#: distribution name -> key in ``versions``: the toolkit and every library that reads,
#: rewrites, quantizes, builds or runs our graphs
TOOLS = {
    "onetrans-trt": "onetrans_trt", "torch": "torch", "numpy": "numpy", "onnx": "onnx",
    "onnxruntime": "onnxruntime", "onnxruntime-gpu": "onnxruntime_gpu", "onnxscript": "onnxscript",
    "onnx-ir": "onnx_ir", "onnxslim": "onnxslim", "onnx-graphsurgeon": "onnx_graphsurgeon",
    "nvidia-modelopt": "modelopt", "onnxconverter-common": "onnxconverter_common", "polygraphy": "polygraphy",
    "tensorrt": "tensorrt", "triton": "triton", "tritonclient": "tritonclient",
}

_command: list[str] = []


def set_command(argv: list[str]) -> None:
    """Record the command line this process runs (the CLI calls it with its arguments)."""
    _command[:] = [str(a) for a in argv]


def command_line() -> str:
    argv = _command or [Path(sys.argv[0]).name, *sys.argv[1:]]
    return shlex.join(argv)


def versions() -> dict[str, str]:
    """``{tool: version}`` for every installed tool of :data:`TOOLS`, plus Python."""
    out = {"python": platform.python_version()}
    for dist, key in TOOLS.items():
        try:
            out[key] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    if "torch" in sys.modules:  # the local build tag (+cpu / +cu128) the metadata may not carry
        out["torch"] = str(getattr(sys.modules["torch"], "__version__", out.get("torch", "")))
    return out


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _gpus() -> list[str]:
    """GPU names the NVIDIA driver lists under /proc (no CUDA, no subprocess); empty without one."""
    root = Path("/proc/driver/nvidia/gpus")
    names = []
    try:
        for d in sorted(root.iterdir()):
            try:
                for line in (d / "information").read_text(errors="replace").splitlines():
                    if line.startswith("Model:"):
                        names.append(line.split(":", 1)[1].strip())
            except OSError:
                continue
    except OSError:
        return []
    return names


def host() -> dict[str, Any]:
    return {"hostname": platform.node(), "platform": platform.platform(), "machine": platform.machine(),
            "cpu": _cpu_model(), "cores": os.cpu_count() or 0,
            "threads": {k: os.environ[k] for k in ("OMP_NUM_THREADS",) if k in os.environ},
            "gpus": _gpus()}


def provenance(graphs: dict[str, str] | None = None) -> dict[str, Any]:
    """``{"versions", "command", "host"}`` and, given, ``"graphs"`` ({name: sha256})."""
    out: dict[str, Any] = {"versions": versions(), "command": command_line(), "host": host()}
    if graphs is not None:
        out["graphs"] = dict(graphs)
    return out


def graph_hashes(manifest: dict[str, Any]) -> dict[str, str]:
    """``{graph: sha256}`` of a build manifest's graphs (and their external data files)."""
    out = {}
    for key, entry in (manifest.get("graphs") or {}).items():
        if isinstance(entry, dict) and isinstance(entry.get("sha256"), str):
            out[key] = entry["sha256"]
            data = entry.get("data")
            if isinstance(data, dict) and isinstance(data.get("sha256"), str):
                out[f"{key}.data"] = data["sha256"]
    return out
