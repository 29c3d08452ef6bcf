"""Run the candidate scorer once at C candidates and print peak RSS growth (bytes).

Run as a script in a fresh process: ``python _scorer_memory.py BUILD C``.
"""

import json
import os
import sys
import threading

import numpy as np
import onnx
import onnxruntime as ort

from onetrans_trt.graphs.flops import placeholder_feeds


PAGE = os.sysconf("SC_PAGE_SIZE")


def rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * PAGE


def main() -> None:
    build, c = sys.argv[1], int(sys.argv[2])
    manifest = json.load(open(f"{build}/manifest.json"))
    lmax = manifest["model"]["s_max_len"]
    dims = {"candidates": c, "history": lmax, **{f"kv_len_{l}": lmax for l in range(manifest["model"]["n_layers"])}}
    model = onnx.load(f"{build}/candidate_scorer.onnx")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.enable_mem_pattern = False
    opts.enable_cpu_mem_arena = False  # memory goes back after each run: RSS shows the peak
    sess = ort.InferenceSession(f"{build}/candidate_scorer.onnx", sess_options=opts, providers=["CPUExecutionProvider"])
    small = placeholder_feeds(model, {**dims, "candidates": 1})
    sess.run(["logits"], small)
    feeds = placeholder_feeds(model, dims)
    rng = np.random.default_rng(0)
    for k, v in feeds.items():
        if v.dtype == np.float32:
            feeds[k] = rng.normal(size=v.shape).astype(np.float32)
    base = rss()
    peak = [base]
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            done.wait(0.0005)

    t = threading.Thread(target=watch)
    t.start()
    out = sess.run(["logits"], feeds)[0]
    done.set()
    t.join()
    assert np.isfinite(out).all()
    print(peak[0] - base)


if __name__ == "__main__":
    main()
