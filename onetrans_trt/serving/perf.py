"""Triton's own load generator, ``perf_analyzer``, against a served repository.

No ``perf-analyzer`` wheel on PyPI carries the tool (the package of that name is empty); the
``tritonclient==2.40.0`` wheel (manylinux, x86-64) still ships the binary. It is fetched once
with ``pip download --no-deps`` into the server cache (``~/.cache/onetrans-trt/tritonserver``)
and runs with two libraries it links against that the nvidia-pytriton wheel carries under
hashed names (``libb64.so.0d``, ``libcudart.so.12``: the client is built with CUDA shared-memory
support; no GPU is used), linked into a private ``lib/`` directory.

    run_perf_analyzer(server.http_url, "rank_cached", requests, concurrency=(1, 4))
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

from onetrans_trt.errors import MissingCapabilityError

TRITONCLIENT_VERSION = "2.40.0"
_BINARY = f"tritonclient-{TRITONCLIENT_VERSION}.data/data/bin/perf_analyzer"
_LIBS = {"libb64.so.0d": "libb64-*.so.0d", "libcudart.so.12": "libcudart-*.so.12*"}


def perf_analyzer(timeout: float = 600.0) -> tuple[Path, Path]:
    """``(binary, lib_dir)``, installed into the cache on first use."""
    from onetrans_trt import interrupts
    from onetrans_trt.io import atomic_directory
    from onetrans_trt.serving.server import _cache_lock, cache_root, install

    root = cache_root() / f"perf-analyzer-{TRITONCLIENT_VERSION}"
    if (root / "ready").is_file():
        return root / "perf_analyzer", root / "lib"
    libs = install().libs
    with _cache_lock():
        if (root / "ready").is_file():
            return root / "perf_analyzer", root / "lib"
        with interrupts.temporary_directory(prefix="onetrans-tritonclient-") as scratch:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q",
                   "--disable-pip-version-check", "--platform", "manylinux1_x86_64",
                   f"tritonclient=={TRITONCLIENT_VERSION}", "-d", str(scratch)]
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
            wheels = sorted(Path(scratch).glob("tritonclient-*.whl"))
            if p.returncode != 0 or not wheels:
                raise MissingCapabilityError(f"cannot download tritonclient=={TRITONCLIENT_VERSION} (it ships "
                                             f"perf_analyzer): {(p.stderr or p.stdout).strip()[-300:]}")
            with atomic_directory(root) as tmp:
                with zipfile.ZipFile(wheels[0]) as zf, zf.open(_BINARY) as src:
                    (tmp / "perf_analyzer").write_bytes(src.read())
                (tmp / "perf_analyzer").chmod(0o755)
                (tmp / "lib").mkdir()
                for name, pattern in _LIBS.items():
                    found = sorted(libs.glob(pattern))
                    if not found:
                        raise MissingCapabilityError(f"{libs}: no {pattern} for perf_analyzer's {name}")
                    (tmp / "lib" / name).symlink_to(found[0])
                (tmp / "ready").write_text(json.dumps({"tritonclient": TRITONCLIENT_VERSION}) + "\n")
    return root / "perf_analyzer", root / "lib"


def run_perf_analyzer(url: str, model: str, requests: list[Any], *, concurrency: tuple[int, ...] = (1, 4),
                      interval_ms: int = 2000, workdir: str | os.PathLike, timeout: float = 600.0,
                      stability_percent: int = 10) -> list[dict]:
    """Run ``perf_analyzer`` over HTTP on ``model`` (input ``request``: each of ``requests`` as
    its JSON, in turn) at each concurrency; returns its CSV rows (``Concurrency``,
    ``Inferences/Second``, latencies in microseconds). A failed run (an error response
    included) raises ServerError with perf_analyzer's last lines. ``stability_percent``:
    perf_analyzer's ``--stability-percentage`` (how far three measurement windows may differ
    before it calls the measurement stable; it fails a run it cannot call stable)."""
    from onetrans_trt.serving.server import ServerError

    binary, lib = perf_analyzer()
    workdir = Path(workdir)
    data = {"data": [{"request": {"content": [json.dumps(r.to_json() if hasattr(r, "to_json") else r)],
                                  "shape": [1]}} for r in requests]}
    (workdir / "perf_input.json").write_text(json.dumps(data))
    rows: list[dict] = []
    for c in concurrency:
        out = workdir / f"perf_{model}_{c}.csv"
        cmd = [str(binary), "-m", model, "-u", url, "-i", "http", "--input-data", str(workdir / "perf_input.json"),
               "--concurrency-range", f"{c}:{c}", "--measurement-interval", str(interval_ms),
               "--stability-percentage", str(int(stability_percent)), "-f", str(out)]
        env = {**os.environ, "LD_LIBRARY_PATH": os.pathsep.join([str(lib), os.environ.get("LD_LIBRARY_PATH", "")])}
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        if p.returncode != 0:
            raise ServerError(f"perf_analyzer on {model} at concurrency {c} failed (exit {p.returncode}): "
                                         f"{(p.stderr or p.stdout).strip()[-600:]}")
        with out.open() as fh:
            rows += list(csv.DictReader(fh))
    return rows
