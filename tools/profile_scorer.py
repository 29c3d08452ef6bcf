"""Where the candidate scorer's time goes on CPU: ONNX Runtime, or PyTorch (eager or compiled).

A random-weight build (synthetic schema) of ``--preset`` at ``--history``; ORT's own profiler
on ``--candidates`` C; prints each op type's share of the node time (and, with ``--nodes``,
the heaviest nodes). For issue 20 (the scorer layout): run it before and after a graph pass.

    PYTHONPATH=. .venv/bin/python tools/profile_scorer.py --preset onetrans-s --history 512 \
        --candidates 1024 --work /tmp/prof

``--peer torch-compile`` (or ``torch-split``): the same checkpoint's ``score_candidates`` through
``torch.compile`` (inductor, static shapes, kernels profiled) or eagerly, under torch.profiler,
sorted into the same kinds: matrix products (their FLOPs and rate), inductor's fused loops
(``cpp_fused_*``: elementwise chains and reductions in one pass) and the rest; so the two
runtimes' time can be compared kind by kind.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import time
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


MATMUL_OPS = ("aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm", "mkldnn::_linear_pointwise",
              "mkl::_mkl_linear", "aten::_scaled_dot_product_flash_attention_for_cpu")


def kind_of(name: str) -> str:
    """The profile's kinds: 'matmul' (a matrix product kernel), 'fused' (an inductor-generated
    loop), 'other' (copies, layout, elementwise ops run one by one)."""
    if name in MATMUL_OPS:
        return "matmul"
    if "cpp_fused" in name or "CppKernelProxy" in name:  # graph_<i>_cpp_fused_<ops>
        return "fused"
    return "other"


def profile_torch(build: Path, peer: str, candidates: int, history: int, threads: int, runs: int) -> dict:
    """Self time per profiler event (leaf kernels: a parent's self time excludes its children),
    per run, of the checkpoint's scorer at C=``candidates`` with a full history of ``history``."""
    import numpy as np
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from onetrans_trt.data.requests import encode_request
    from onetrans_trt.data.synthetic import synthetic_request
    from onetrans_trt.export.api import read_manifest
    from onetrans_trt.models.checkpoint import load_checkpoint

    torch.set_num_threads(threads)
    manifest = read_manifest(build)
    model = load_checkpoint(manifest_checkpoint(build, manifest)).eval()
    req = synthetic_request(model.cfg.schema, np.random.default_rng(0), n_history=history, n_candidates=candidates)
    hist, ns = encode_request(model.cfg.schema, req)
    t = lambda d: {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in d.items()}  # noqa: E731
    with torch.no_grad():
        kv = model.encode_user(t(hist))
    feeds = t(ns)
    score = model.score_candidates
    if peer == "torch-compile":
        import torch._inductor.config as inductor_config

        inductor_config.cpp.enable_kernel_profile = True  # each generated loop is a profiler event
        score = torch.compile(model.score_candidates, dynamic=False)
    with torch.no_grad():
        for _ in range(2):  # the compile happens here, untimed
            score(kv, feeds)
        times = []
        for _ in range(runs):  # without the profiler's overhead
            t0 = time.perf_counter()
            score(kv, feeds)
            times.append(time.perf_counter() - t0)
        with torch_profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
            for _ in range(runs):
                score(kv, feeds)
    events = prof.key_averages()
    nodes = {e.key: e.self_cpu_time_total / 1e3 / runs for e in events if e.self_cpu_time_total > 0}
    flops = {e.key: e.flops / runs for e in events if e.key in MATMUL_OPS and e.flops}
    return {"nodes": nodes, "flops": flops, "wall_ms": 1e3 * statistics.median(times)}


def manifest_checkpoint(build: Path, manifest: dict) -> Path:
    """The checkpoint a build was exported from (its manifest records the path)."""
    return Path(manifest["checkpoint"]["path"])


def report_torch(res: dict, machine: float) -> None:
    total = sum(res["nodes"].values())
    kinds: dict[str, float] = collections.defaultdict(float)
    for n, ms in res["nodes"].items():
        kinds[kind_of(n)] += ms
    mm_ms = sum(res["nodes"][n] for n in res["flops"])
    mm_gflop = sum(res["flops"].values()) / 1e9
    print(f"  self time of all events {total:.1f} ms per run")
    for k in ("matmul", "fused", "other"):
        print(f"  {k:<8}{kinds[k]:>9.1f} ms {100 * kinds[k] / max(total, 1e-9):>5.1f}%")
    if mm_ms:
        print(f"  matrix products (profiler's FLOPs, {', '.join(sorted(res['flops']))}): {mm_gflop:.1f} GFLOP "
              f"in {mm_ms:.1f} ms = {mm_gflop / (mm_ms / 1e3):.1f} GFLOP/s "
              f"({100 * mm_gflop / (mm_ms / 1e3) / machine:.0f}% of machine)")
    for n, ms in sorted(res["nodes"].items(), key=lambda kv: -kv[1])[:12]:
        print(f"    {kind_of(n):<7}{ms:>8.2f} ms  {n[:90]}")


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
    ap.add_argument("--peer", choices=("ort", "torch-split", "torch-compile"), default="ort",
                    help="profile ONNX Runtime's scorer graph, or the checkpoint's scorer in PyTorch")
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
    if a.peer != "ort":
        from onetrans_trt.bench.peers import matmul_gflops

        res = profile_torch(build, a.peer, a.candidates, a.history, a.threads, a.runs)
        print(f"{a.peer} scorer: C={a.candidates} L={a.history}, {a.threads} threads, "
              f"{res['wall_ms']:.1f} ms per run (median of {a.runs}, without the profiler)")
        report_torch(res, matmul_gflops(a.threads))
        return
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
