"""Peak memory of one ORT run of a graph, measured in a fresh process.

``python -m onetrans_trt.bench.memory GRAPH DIMS_JSON`` runs the graph once at the given
dynamic sizes (placeholder inputs, random floats) and prints the peak RSS growth during
the run in bytes, sampled from /proc/self/statm by a watcher thread. ORT's arena is off so
memory is allocated and freed per run and RSS shows the peak.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * PAGE


def measure(graph: str, dims: dict[str, int]) -> int:
    import numpy as np
    import onnx
    import onnxruntime as ort

    from onetrans_trt.graphs.flops import placeholder_feeds

    model = onnx.load(graph)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.enable_mem_pattern = False
    opts.enable_cpu_mem_arena = False
    opts.log_severity_level = 3
    sess = ort.InferenceSession(graph, sess_options=opts, providers=["CPUExecutionProvider"])
    out_name = sess.get_outputs()[0].name
    small = placeholder_feeds(model, {k: (1 if k == "candidates" else v) for k, v in dims.items()})
    sess.run([out_name], small)
    feeds = placeholder_feeds(model, dims)
    rng = np.random.default_rng(0)
    for k, v in feeds.items():
        if v.dtype.kind == "f":
            feeds[k] = rng.normal(size=v.shape).astype(v.dtype)
    base = _rss()
    peak = [base]
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            done.wait(0.0005)

    t = threading.Thread(target=watch)
    t.start()
    sess.run([out_name], feeds)
    done.set()
    t.join()
    return peak[0] - base


def peak_growth(graph: str, dims: dict[str, int]) -> int:
    """Run :func:`measure` in a fresh Python process; bytes."""
    p = subprocess.run([sys.executable, "-m", "onetrans_trt.bench.memory", str(graph), json.dumps(dims)],
                       capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"memory probe failed: {p.stderr.strip().splitlines()[-1:]}")
    return int(p.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    print(measure(sys.argv[1], json.loads(sys.argv[2])))
