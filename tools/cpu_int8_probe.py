"""Which of ONNX Runtime's CPU integer paths speeds up our candidate scorer on this CPU: the FP32
scorer of a build against ORT's dynamic quantization of it, timed side by side (interleaved
rounds, one process, two intra-op threads) at each C, every contender's logits compared with
FP32's on the same inputs. The measurement behind issue "CPU performance" (item 1); the variant
the toolkit ships from it is ``calibrate --target cpu`` (static scales, so that a candidate's
score does not depend on its batch; same 7-bit weights), timed by ``bench``.

    .venv/bin/python tools/cpu_int8_probe.py BUILD [--candidates 256,16] [--rounds 7] [--history 512]

BUILD: any export (``bench --keep`` or ``export``); a random ``onetrans-s`` one:
``python -c "from onetrans_trt.bench.fused import random_build; from pathlib import Path;
random_build(Path('runs/s512'), preset='onetrans-s', history=512)"`` (minutes).

Contenders (ORT ``quantize_dynamic``, MatMuls with a constant weight only; activations
quantized per tensor at run time):
- ``dyn-s7``: INT8 weights in 7 bits (``reduce_range``), one scale per weight tensor: the u8s8
  AVX2 kernel cannot saturate, so the result is exact on every x86-64 CPU;
- ``dyn-s8``: 8-bit weights with our sessions' exact-arithmetic option
  (``session.x64quantprecision``, see ``onetrans_trt/ort_options.py``);
- ``dyn-s8-fast``: 8-bit weights without it: on a CPU without VNNI the u8s8 kernel saturates
  (wrong logits, shown by the max |diff| column), printed as a warning, never a choice.
Per-channel scales are not a contender: ORT's MatMulInteger refuses a per-channel zero point on
a batched (3-D) weight, which is what the NS-tokens' per-token projections are.

Prints, per C, each contender's p50 and FP32's p50 over it, and the max |logit diff|; ``--json``
writes the same as JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _cpu_flags() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    flags = next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), [])
    return " ".join(f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if f in flags) or "none"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("build", type=Path)
    ap.add_argument("--candidates", default="256,16")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--history", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quality", type=int, default=0, metavar="N",
                    help="also rank N real MovieLens requests (50 candidates each) with dyn-s7 and dyn-s8 through "
                         "the Ranker, against the build's PyTorch checkpoint: |dAUC|, top-10 overlap, Kendall tau "
                         "(a trained checkpoint's build; what `calibrate`'s quality report measures)")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)

    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from onetrans_trt.export.api import read_manifest
    from onetrans_trt.export.inspect import request_dims
    from onetrans_trt.graphs.flops import placeholder_feeds
    from onetrans_trt.onnx_files import load_model
    from onetrans_trt.ort_options import session_options

    src = a.build / "candidate_scorer.onnx"
    manifest = read_manifest(a.build)
    out: dict = {"build": str(a.build), "cpu_flags": _cpu_flags(), "onnxruntime": ort.__version__,
                 "threads": a.threads, "history": a.history, "rounds": a.rounds, "results": []}
    print(f"CPU flags: {out['cpu_flags']}; onnxruntime {ort.__version__}; {a.threads} threads", flush=True)
    with tempfile.TemporaryDirectory(prefix="int8-probe-") as tmp:
        paths = {}
        for name, reduce in (("s7", True), ("s8", False)):
            paths[name] = Path(tmp) / f"{name}.onnx"
            quantize_dynamic(str(src), str(paths[name]), weight_type=QuantType.QInt8, per_channel=False,
                             reduce_range=reduce, op_types_to_quantize=["MatMul"],
                             extra_options={"MatMulConstBOnly": True})

        def session(path: Path, exact: bool):
            if exact:
                opts = session_options(threads=a.threads)
            else:  # ORT's defaults: the fast u8s8 kernel, saturating without VNNI
                opts = ort.SessionOptions()
                opts.log_severity_level, opts.intra_op_num_threads = 3, a.threads
            opts.inter_op_num_threads = 1
            return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

        sessions = {"fp32": session(src, True), "dyn-s7": session(paths["s7"], False),
                    "dyn-s8": session(paths["s8"], True), "dyn-s8-fast": session(paths["s8"], False)}
        graph = load_model(src, external=False)
        for c in [int(x) for x in a.candidates.split(",")]:
            feeds = placeholder_feeds(graph, request_dims(manifest, c, a.history))
            rng = np.random.default_rng(0)
            for k, v in feeds.items():
                if v.dtype == np.float32:
                    feeds[k] = (rng.standard_normal(v.shape) * 0.5).astype(np.float32)
            ref = sessions["fp32"].run(["logits"], feeds)[0]
            diffs = {k: float(np.abs(s.run(["logits"], feeds)[0] - ref).max()) for k, s in sessions.items()}
            times: dict[str, list[float]] = {k: [] for k in sessions}
            for _ in range(a.rounds):
                for k, s in sessions.items():
                    t = time.perf_counter()
                    s.run(["logits"], feeds)
                    times[k].append(time.perf_counter() - t)
            p50 = {k: statistics.median(v[1:] if len(v) > 1 else v) * 1e3 for k, v in times.items()}
            row = {"candidates": c, "logit_scale": float(np.abs(ref).max()),
                   "contenders": {k: {"p50_ms": p50[k], "fp32_over_this": p50["fp32"] / p50[k],
                                      "max_abs_diff": diffs[k]} for k in sessions}}
            out["results"].append(row)
            print(f"C={c} (|logit| up to {row['logit_scale']:.3f})", flush=True)
            for k, r in row["contenders"].items():
                print(f"  {k:12s} p50 {r['p50_ms']:9.1f} ms  fp32/this {r['fp32_over_this']:5.2f}x  "
                      f"max |diff| {r['max_abs_diff']:.4g}", flush=True)
        if a.quality:
            out["quality"] = {}
            for name, path, exact in (("dyn-s7", paths["s7"], False), ("dyn-s8", paths["s8"], True)):
                out["quality"][name] = _quality(a.build, session(path, exact), a.quality)
                print(f"quality of {name} against PyTorch:", json.dumps(out["quality"][name]), flush=True)
    if a.json:
        a.json.write_text(json.dumps(out, indent=1))
    return 0


def _quality(build: Path, scorer, n: int) -> dict:
    """``calibrate``'s quality report for an ORT scorer session swapped into the ``ort`` Ranker."""
    from onetrans_trt.calibrate.quality import compare_rankers
    from onetrans_trt.data.movielens import MovieLens
    from onetrans_trt.export.api import read_manifest
    from onetrans_trt.runtime.ranker import Ranker

    variant = Ranker.load(build, backend="ort")
    variant.backend.scorer = scorer  # same inputs and outputs as the FP32 scorer
    ref = Ranker.load(read_manifest(build)["checkpoint"]["path"], backend="torch-split")
    ml = MovieLens(max_history=ref.schema.max_history, merge_mode=ref.schema.merge_mode)
    q = compare_rankers(variant, ref, ml.requests(n, n_candidates=50, seed=2024))
    return {"requests": n, "delta_auc": {t: m["delta_auc"] for t, m in q["metrics"].items()},
            "torch_auc": {t: m["torch_auc"] for t, m in q["metrics"].items()}, **q["ranking"],
            "max_abs_logit_error": q["max_abs_logit_error"]}


if __name__ == "__main__":
    sys.exit(main())
