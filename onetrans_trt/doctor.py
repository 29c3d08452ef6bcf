"""``onetrans-trt doctor``: what this machine can do, and what to install for what it cannot.

Every probe is cheap and never raises: a missing or broken package is a fact to report.
``build`` and ``gpu-check`` print the same facts first.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import platform
import shutil
import sys
from typing import Any


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:160]}" if text else type(e).__name__


def facts() -> dict[str, Any]:
    """Versions and capabilities, each ``{"ok": bool, "detail": str, "fix": str}`` or plain values."""
    out: dict[str, Any] = {"python": sys.version.split()[0], "platform": platform.platform(),
                           "onetrans_trt": _version("onetrans-trt")}
    out["numpy"] = _version("numpy")

    # GPU and driver (NVML needs no CUDA toolkit)
    from onetrans_trt.plugins._triton import DEFAULT_PTX_VERSION, driver_cuda_version, max_ptx_for_cuda

    cuda = driver_cuda_version()
    gpu: dict[str, Any] = {"ok": cuda is not None, "driver_cuda": cuda, "fix": ""}
    if cuda is not None:
        try:
            import pynvml

            pynvml.nvmlInit()
            try:
                h = pynvml.nvmlDeviceGetHandleByIndex(0)
                name = pynvml.nvmlDeviceGetName(h)
                gpu["name"] = name.decode() if isinstance(name, bytes) else name
                drv = pynvml.nvmlSystemGetDriverVersion()
                gpu["driver"] = drv.decode() if isinstance(drv, bytes) else drv
                major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(h)
                gpu["sm"] = major * 10 + minor
            finally:
                pynvml.nvmlShutdown()
        except Exception as e:  # noqa: BLE001
            gpu["detail"] = _first_line(e)
        isa = max_ptx_for_cuda(cuda)
        gpu["max_ptx_isa"] = f"{isa // 10}.{isa % 10}"
        gpu["detail"] = f"{gpu.get('name', 'GPU')}, driver {gpu.get('driver', '?')} (CUDA {cuda}, PTX ISA <= {gpu['max_ptx_isa']})"
    else:
        gpu["max_ptx_isa"] = None
        gpu["detail"] = (f"no NVIDIA driver visible; kernels are written for PTX ISA "
                         f"{DEFAULT_PTX_VERSION // 10}.{DEFAULT_PTX_VERSION % 10} (any CUDA 12.4+ driver)")
        gpu["fix"] = "run on a machine with an NVIDIA GPU and driver (CUDA 12.4 or newer)"
    out["gpu"] = gpu

    # torch
    try:
        import torch

        out["torch"] = {"ok": True, "version": torch.__version__, "cuda": torch.version.cuda,
                        "cuda_available": bool(torch.cuda.is_available()),
                        "detail": f"{torch.__version__} (CUDA build {torch.version.cuda or 'none: CPU only'})",
                        "fix": "" if torch.cuda.is_available() else "a CUDA build of torch moves tensors to the GPU "
                                                                   "(the TensorRT backend and gpu-check need it)"}
    except Exception as e:  # noqa: BLE001
        out["torch"] = {"ok": False, "detail": _first_line(e), "fix": "pip install torch"}

    # Triton (kernels: CPU interpreter and AOT PTX)
    tv = _version("triton")
    if tv is None:
        out["triton"] = {"ok": False, "version": None, "detail": "not installed",
                         "fix": "pip install 'onetrans-trt[kernels]' (triton >= 3.5)"}
    else:
        from onetrans_trt.plugins._triton import MIN_TRITON, _version_tuple

        ok = _version_tuple(tv)[:2] >= MIN_TRITON
        out["triton"] = {"ok": ok, "version": tv, "detail": f"{tv}: CPU interpreter and ahead-of-time PTX" if ok
                         else f"{tv} is older than 3.5", "fix": "" if ok else "pip install -U 'triton>=3.5'"}

    # TensorRT
    try:
        trt = importlib.import_module("tensorrt")
        from onetrans_trt.engines.build import MIN_TENSORRT, trt_version

        ok = trt_version(trt)[:2] >= MIN_TENSORRT
        out["tensorrt"] = {"ok": ok, "version": trt.__version__,
                           "detail": f"{trt.__version__}" + ("" if ok else ": too old for ahead-of-time plugins"),
                           "fix": "" if ok else "pip install 'tensorrt>=11' (AOT plugins need >= 10.9)"}
    except Exception as e:  # noqa: BLE001 - placeholder wheels raise all sorts at import
        out["tensorrt"] = {"ok": False, "version": _version("tensorrt"), "detail": f"not importable ({_first_line(e)})",
                           "fix": "pip install 'onetrans-trt[trt]' on a GPU host (tensorrt >= 11 from NVIDIA's index)"}

    # ONNX Runtime
    try:
        import onnxruntime as ort

        prov = ort.get_available_providers()
        out["onnxruntime"] = {"ok": True, "version": ort.__version__, "providers": prov,
                              "detail": f"{ort.__version__}, providers {', '.join(prov)}",
                              "fix": "" if "CUDAExecutionProvider" in prov else
                              "pip uninstall -y onnxruntime && pip install 'onetrans-trt[gpu]' (onnxruntime-gpu "
                              "replaces onnxruntime: both ship the onnxruntime module) for the CUDA execution "
                              "provider"}
    except Exception as e:  # noqa: BLE001
        out["onnxruntime"] = {"ok": False, "detail": _first_line(e),
                              "fix": "pip install 'onetrans-trt[cpu]' (or 'onetrans-trt[gpu]' on a CUDA host)"}

    # ModelOpt (INT8 calibration), Polygraphy, kernel launchers for gpu-check
    for key, dist, fix in (("modelopt", "nvidia-modelopt", "pip install nvidia-modelopt lief cppimport"),
                           ("polygraphy", "polygraphy", "pip install polygraphy"),
                           ("cuda_python", "cuda-python", "pip install cuda-python (gpu-check launches PTX with it)"),
                           ("cupy", None, "pip install cupy-cuda12x (an alternative PTX launcher for gpu-check)")):
        v = _version(dist) if dist else next((_version(d) for d in ("cupy-cuda12x", "cupy-cuda13x", "cupy")
                                             if _version(d)), None)
        out[key] = {"ok": v is not None, "version": v, "detail": v or "not installed", "fix": "" if v else fix}
    ptxas = shutil.which("ptxas")
    out["ptxas"] = {"ok": ptxas is not None, "detail": ptxas or "not on PATH (Triton uses its bundled ptxas)",
                    "fix": ""}
    return out


CAPABILITIES = [  # (label, needs) in the order a user meets them
    ("export, graph passes, ORT on CPU", ["onnxruntime"]),
    ("INT8 calibration (ModelOpt)", ["modelopt"]),
    ("Triton kernels: CPU interpreter and AOT PTX", ["triton"]),
    ("ORT on the GPU (CUDA execution provider)", ["gpu", "onnxruntime:CUDAExecutionProvider"]),
    ("TensorRT engines with our AOT plugins", ["gpu", "tensorrt", "torch:cuda"]),
    ("gpu-check kernel launches", ["gpu", "torch:cuda", "cuda_python|cupy"]),
]


def _has(f: dict, need: str) -> bool:
    if "|" in need:
        return any(_has(f, n) for n in need.split("|"))
    if need == "onnxruntime:CUDAExecutionProvider":
        return "CUDAExecutionProvider" in f["onnxruntime"].get("providers", [])
    if need == "torch:cuda":
        return bool(f["torch"].get("cuda_available"))
    return bool(f[need]["ok"])


def capabilities(f: dict) -> list[dict[str, Any]]:
    out = []
    for label, needs in CAPABILITIES:
        missing = [n for n in needs if not _has(f, n)]
        fixes = []
        for n in missing:
            key = n.split(":")[0].split("|")[0]
            fix = f[key].get("fix") if isinstance(f.get(key), dict) else ""
            if fix and fix not in fixes:
                fixes.append(fix)
        out.append({"capability": label, "ok": not missing, "missing": missing, "fix": fixes})
    return out


def report(f: dict | None = None) -> dict[str, Any]:
    f = f or facts()
    return {"facts": f, "capabilities": capabilities(f)}


def lines(rep: dict | None = None) -> list[str]:
    """The human form: versions, then each capability with what to install."""
    rep = rep or report()
    f = rep["facts"]
    out = [f"python {f['python']} on {f['platform']}; onetrans-trt {f['onetrans_trt']}; numpy {f['numpy']}"]
    for key in ("gpu", "torch", "triton", "tensorrt", "onnxruntime", "modelopt", "polygraphy", "cuda_python", "cupy",
                "ptxas"):
        v = f[key]
        out.append(f"  {key:12s} {'ok ' if v['ok'] else '-- '} {v['detail']}")
    out.append("can do:")
    for c in rep["capabilities"]:
        mark = "yes" if c["ok"] else "no "
        out.append(f"  {mark} {c['capability']}" + ("" if c["ok"] else f"  (install: {'; '.join(c['fix']) or 'see above'})"))
    return out
