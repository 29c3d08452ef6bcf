"""Peak memory of a piece of work (one ORT run of a graph), measured exactly in a fresh process.

No sampling: the kernel keeps each process's resident-set high-water mark (``VmHWM`` in
``/proc/self/status``), which counts every page the process had resident at its peak, however
briefly. In a fresh process the measurement does its setup (imports, session, inputs), then
resets the high-water mark to the current RSS (writing ``5`` to ``/proc/self/clear_refs``,
Linux >= 4.0), reads that baseline, runs the measured work and reads ``VmHWM`` again:
peak growth = high-water mark - baseline, in bytes.

Where ``clear_refs`` cannot be written (another kernel, a sandbox) it falls back to
``resource.getrusage`` ``ru_maxrss``, which cannot be reset: if setup had already gone
higher than the work does, the result is only an upper bound, and it says so
(``exact: false``). An upper bound never makes a "stays below" test pass more easily.

``python -m onetrans_trt.bench.memory GRAPH DIMS_JSON`` prints the peak growth in bytes of
one run of the graph at the given dynamic sizes (placeholder inputs, random floats). ORT's
arena is off so memory is allocated and freed per run. ``--call MODULE:FUNCTION ARGS_JSON``
measures ``FUNCTION(*ARGS)``'s returned callable instead (the function does the setup) and
prints the whole result as JSON.
"""

from __future__ import annotations

import importlib
import json
import resource
import subprocess
import sys
from typing import Any, Callable

_RESET = "/proc/self/clear_refs"


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_hwm() -> bool:
    """Reset VmHWM to the current RSS; True if the kernel did (checked, not assumed)."""
    try:
        with open(_RESET, "w") as fh:
            fh.write("5")
    except OSError:
        return False
    hwm, rss = _status_kib("VmHWM"), _status_kib("VmRSS")
    return hwm is not None and rss is not None and hwm <= rss + 64  # KiB: pages touched since the read


def _maxrss_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


def measure_work(work: Callable[[], Any]) -> dict[str, Any]:
    """Peak growth of resident memory while ``work()`` runs, in this process (call it in a
    fresh one: :func:`peak_of`). Returns bytes and how they were measured."""
    if _reset_hwm():
        base = _status_kib("VmHWM")
        work()
        hwm = _status_kib("VmHWM")
        method, exact = "VmHWM after clear_refs", True
    else:
        before = _maxrss_kib()
        base = _status_kib("VmRSS") or before
        work()
        hwm = _maxrss_kib()
        method = "ru_maxrss"
        exact = before <= base or hwm > before  # the work set the high-water mark, or setup never went above base
    rss_after = _status_kib("VmRSS")
    return {"bytes": max(0, hwm - base) * 1024, "baseline_bytes": base * 1024, "hwm_bytes": hwm * 1024,
            "rss_after_bytes": None if rss_after is None else rss_after * 1024, "method": method, "exact": exact}


def _ort_work(graph: str, dims: dict[str, int]) -> Callable[[], Any]:
    """Setup for one ORT run of ``graph`` at ``dims``: session, a warm-up run at one candidate,
    the inputs; returns the run to measure."""
    import numpy as np
    import onnxruntime as ort
    from onetrans_trt.ort_options import session_options

    from onetrans_trt.graphs.flops import placeholder_feeds
    from onetrans_trt.onnx_files import load_model

    model = load_model(graph, external=False)  # the inputs only: ORT reads the weights (and any <file>.data)
    opts = session_options(threads=1)
    opts.enable_mem_pattern = False
    opts.enable_cpu_mem_arena = False
    sess = ort.InferenceSession(graph, sess_options=opts, providers=["CPUExecutionProvider"])
    out_name = sess.get_outputs()[0].name
    small = placeholder_feeds(model, {k: (1 if k == "candidates" else v) for k, v in dims.items()})
    sess.run([out_name], small)
    feeds = placeholder_feeds(model, dims)
    rng = np.random.default_rng(0)
    for k, v in feeds.items():
        if v.dtype.kind == "f":
            feeds[k] = rng.normal(size=v.shape).astype(v.dtype)
    del model
    return lambda: sess.run([out_name], feeds)


def measure(graph: str, dims: dict[str, int]) -> int:
    """Peak growth in bytes of one ORT run of ``graph`` at ``dims``, in this process."""
    return measure_work(_ort_work(graph, dims))["bytes"]


def peak_of(target: str, *args: Any) -> dict[str, Any]:
    """Run ``MODULE:FUNCTION(*args)`` (setup; it returns the work) in a fresh Python process
    and measure the work's peak growth there (:func:`measure_work`)."""
    p = subprocess.run([sys.executable, "-m", "onetrans_trt.bench.memory", "--call", target, json.dumps(list(args))],
                       capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"memory probe failed: {p.stderr.strip().splitlines()[-1:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def peak_growth(graph: str, dims: dict[str, int]) -> int:
    """Peak growth in bytes of one ORT run of ``graph`` at ``dims``, measured in a fresh process."""
    return peak_of("onetrans_trt.bench.memory:_ort_work", str(graph), dims)["bytes"]


def _main(argv: list[str]) -> None:
    if argv[:1] == ["--call"]:
        mod, fn = argv[1].split(":")
        work = getattr(importlib.import_module(mod), fn)(*json.loads(argv[2]))
        print(json.dumps(measure_work(work)))
    else:
        print(measure(argv[0], json.loads(argv[1])))


if __name__ == "__main__":
    _main(sys.argv[1:])
