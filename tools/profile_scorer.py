"""Where the candidate scorer's time goes on ONNX Runtime CPU: op types and the heaviest nodes.

A random-weight build (synthetic schema) of ``--preset`` at ``--history``; ORT's own profiler
on ``--candidates`` C; prints each op type's share of the node time (and, with ``--nodes``,
the heaviest nodes). For issue 20 (the scorer layout): run it before and after a graph pass.

    PYTHONPATH=. .venv/bin/python tools/profile_scorer.py --preset onetrans-s --history 512 \
        --candidates 1024 --work /tmp/prof
"""

from __future__ import annotations

import argparse
import collections
import json
import os
from pathlib import Path


def profile(graph: Path, feeds: dict, threads: int, runs: int, out_dir: Path) -> dict[str, float]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.enable_profiling = True
    so.profile_file_prefix = str(out_dir / "ort_profile")
    sess = ort.InferenceSession(str(graph), so, providers=["CPUExecutionProvider"])
    for _ in range(runs + 1):
        sess.run(None, feeds)
    path = sess.end_profiling()
    events = json.loads(Path(path).read_text())
    os.unlink(path)
    runs_seen = [e for e in events if e.get("name") == "model_run"]
    first_end = runs_seen[0]["ts"] + runs_seen[0]["dur"] if runs_seen else 0  # drop the warm-up run
    by_node: dict[str, float] = collections.defaultdict(float)
    op_of: dict[str, str] = {}
    flops_of: dict[str, float] = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= first_end:
            node = e["name"][: -len("_kernel_time")]
            by_node[node] += e["dur"] / 1e3 / runs
            op_of[node] = e["args"].get("op_name", "?")
            if op_of[node] in ("MatMul", "FusedMatMul", "Gemm"):
                flops_of[node] = matmul_flops(e["args"])
    model_ms = sum(e["dur"] for e in runs_seen[1:]) / 1e3 / max(1, len(runs_seen) - 1)
    return {"model_ms": model_ms, "nodes": dict(by_node), "ops": op_of, "flops": flops_of}


def matmul_flops(args: dict) -> float:
    """2*K*(elements of the output) of a MatMul/FusedMatMul/Gemm from the profiler's shapes: K is
    the axis of the second input [..., K, N] (or [..., N, K] when transposed) that is not N (a
    Gemm's: A's last axis)."""
    import math

    out = [int(x) for x in next(iter(args["output_type_shape"][0].values()))]
    a = [int(x) for x in next(iter(args["input_type_shape"][0].values()))]
    b = [int(x) for x in next(iter(args["input_type_shape"][1].values()))]
    if args.get("op_name") == "Gemm":  # our exports: transA=0, so A is [M, K]
        k = a[-1]
    else:
        k = b[0] if len(b) == 1 else (b[-2] if b[-1] == out[-1] else b[-1])
    return 2.0 * math.prod(out) * k


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="onetrans-s")
    ap.add_argument("--history", type=int, default=512)
    ap.add_argument("--candidates", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--build", type=Path, help="an existing build (else a random one in --work)")
    ap.add_argument("--graph", type=Path, help="profile this scorer graph instead of BUILD's")
    ap.add_argument("--nodes", type=int, default=0, help="also list the N heaviest nodes")
    a = ap.parse_args()

    from onetrans_trt.bench.fused import random_build
    from onetrans_trt.export.api import read_manifest
    from onetrans_trt.export.inspect import request_dims
    from onetrans_trt.graphs.flops import graph_flops, placeholder_feeds
    from onetrans_trt.onnx_files import load_model

    a.work.mkdir(parents=True, exist_ok=True)
    build = a.build or a.work / "build"
    if not (build / "manifest.json").is_file():
        random_build(build, preset=a.preset, history=a.history)
    graph = a.graph or build / "candidate_scorer.onnx"
    dims = request_dims(read_manifest(build), a.candidates, a.history)
    feeds = placeholder_feeds(load_model(graph, external=False), dims)
    flops = graph_flops(graph, dims)["flops"]
    res = profile(graph, feeds, a.threads, a.runs, a.work)
    total = sum(res["nodes"].values())
    by_op: dict[str, float] = collections.defaultdict(float)
    for n, ms in res["nodes"].items():
        by_op[res["ops"][n]] += ms
    print(f"{graph}: C={a.candidates} L={a.history}, run {res['model_ms']:.1f} ms, node time {total:.1f} ms, "
          f"{flops / (res['model_ms'] / 1e3) / 1e9:.1f} GFLOP/s")
    for op, ms in sorted(by_op.items(), key=lambda kv: -kv[1]):
        print(f"  {op:<28}{ms:>9.1f} ms {100 * ms / total:>5.1f}%")
    from onetrans_trt.bench.peers import matmul_gflops

    machine = matmul_gflops(a.threads)
    mm_ms = sum(res["nodes"][n] for n in res["flops"])
    mm_gflop = sum(res["flops"].values()) / 1e9
    print(f"machine MatMul {machine:.1f} GFLOP/s (same threads, measured after); the scorer's matmul nodes: "
          f"{mm_gflop:.1f} GFLOP in {mm_ms:.1f} ms = {mm_gflop / (mm_ms / 1e3):.1f} GFLOP/s "
          f"({100 * mm_gflop / (mm_ms / 1e3) / machine:.0f}% of machine), {100 * mm_ms / total:.0f}% of node time")
    for n, ms in sorted(res["nodes"].items(), key=lambda kv: -kv[1])[: a.nodes]:
        rate = f"{res['flops'][n] / 1e9 / (ms / 1e3):7.1f} GFLOP/s" if n in res["flops"] else ""
        print(f"    {res['ops'][n]:<20}{ms:>8.2f} ms {rate:>16}  {n}")


if __name__ == "__main__":
    main()
