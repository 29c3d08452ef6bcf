"""Two candidate-scorer graphs of one model side by side: same feeds, max |logit diff|, and p50
latency from interleaved rounds (ONNX Runtime CPU). For a graph change (a pass, a layout): export
the same checkpoint before and after it and compare.

    PYTHONPATH=. .venv/bin/python tools/compare_scorers.py BEFORE.onnx AFTER.onnx --build BUILD \
        --candidates 1024 --rounds 21

Feeds: the placeholders ``graphs.flops`` uses (every history position real), float inputs drawn
from N(0, 0.25) with a fixed seed, at ``--candidates`` and ``--history``. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("before", type=Path)
    ap.add_argument("after", type=Path)
    ap.add_argument("--build", type=Path, required=True, help="the build whose manifest gives the dimensions")
    ap.add_argument("--candidates", type=int, default=1024)
    ap.add_argument("--history", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=21)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()

    import numpy as np
    import onnx
    import onnxruntime as ort

    from onetrans_trt.export.api import read_manifest
    from onetrans_trt.export.inspect import request_dims
    from onetrans_trt.graphs.flops import placeholder_feeds

    model = onnx.load(str(a.before), load_external_data=False)
    feeds = placeholder_feeds(model, request_dims(read_manifest(a.build), a.candidates, a.history))
    rng = np.random.default_rng(0)
    feeds = {k: (rng.standard_normal(v.shape).astype(v.dtype) * 0.5 if v.dtype == np.float32 else v)
             for k, v in feeds.items()}
    so = ort.SessionOptions()
    so.intra_op_num_threads = a.threads
    sess = {k: ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"])
            for k, p in (("before", a.before), ("after", a.after))}
    own = {k: {i.name: feeds[i.name] for i in s.get_inputs()} for k, s in sess.items()}
    x, y = (sess[k].run(None, own[k])[0] for k in ("before", "after"))
    times: dict[str, list[float]] = {"before": [], "after": []}
    for r in range(a.rounds):  # alternate which goes first
        for k in (("before", "after") if r % 2 == 0 else ("after", "before")):
            t0 = time.perf_counter()
            sess[k].run(None, own[k])
            times[k].append(time.perf_counter() - t0)
    p50 = {k: 1e3 * float(np.median(v)) for k, v in times.items()}
    print(json.dumps({"candidates": a.candidates, "history": a.history, "rounds": a.rounds,
                      "max_abs_diff": float(np.abs(x - y).max()), "max_abs_logit": float(np.abs(x).max()),
                      "p50_ms": p50, "before_over_after": p50["before"] / p50["after"]}))


if __name__ == "__main__":
    main()
