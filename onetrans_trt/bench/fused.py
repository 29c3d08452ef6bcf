"""Fused vs unfused candidate scorer on ORT CPU: peak memory and latency at C and L."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import onnx


def random_build(out: Path, *, preset: str, history: int, n_layers: int | None = None, fuse: bool = True) -> Path:
    """A build of a randomly initialized model on the synthetic schema (benchmarks)."""
    from onetrans_trt.data.synthetic import synthetic_schema
    from onetrans_trt.export.api import export_build
    from onetrans_trt.models.checkpoint import save_checkpoint
    from onetrans_trt.models.config import ModelConfig
    from onetrans_trt.models.onetrans import OneTrans

    over = {"n_layers": n_layers} if n_layers else {}
    cfg = ModelConfig.from_preset(preset, synthetic_schema(max_history=history), **over)
    ck = out.parent / f"{out.name}-ckpt"
    save_checkpoint(OneTrans(cfg), ck, force=True)
    export_build(ck, out, fuse_attention=fuse, n_samples=1, force=True)
    return out


def bench_fused(*, preset: str = "small", candidates: int = 1024, history: int = 1024, rounds: int = 10,
                work: Path | None = None) -> dict[str, Any]:
    from onetrans_trt.bench.memory import peak_growth
    from onetrans_trt.bench.timing import interleaved
    from onetrans_trt.export.api import default_passes, read_manifest, rerun_passes
    from onetrans_trt.export.inspect import request_dims
    from onetrans_trt.graphs.flops import placeholder_feeds
    from onetrans_trt.runtime.ort_backend import ort_session

    tmp = Path(work or tempfile.mkdtemp(prefix="onetrans-bench-"))
    fused = random_build(tmp / "fused", preset=preset, history=history)
    plain = tmp / "plain"
    shutil.rmtree(plain, ignore_errors=True)
    shutil.copytree(fused, plain)
    rerun_passes(plain, *default_passes(fuse_attention=False))
    m = read_manifest(fused)
    dims = request_dims(m, candidates, history)
    result: dict[str, Any] = {"preset": preset, "candidates": candidates, "history": history}
    sessions, feeds = {}, None
    for name, build in (("fused", fused), ("unfused", plain)):
        path = build / "candidate_scorer.onnx"
        result[f"{name}_peak_mb"] = peak_growth(str(path), dims) / 1e6
        sessions[name] = ort_session(path)
        if feeds is None:
            feeds = placeholder_feeds(onnx.load(str(path)), dims)
    lat = interleaved({k: (lambda s=s: s.run(["logits"], feeds)) for k, s in sessions.items()}, rounds=rounds)
    result["latency"] = lat
    result["fused_over_unfused_latency"] = lat["fused"]["p50_ms"] / lat["unfused"]["p50_ms"]
    result["fused_over_unfused_memory"] = result["fused_peak_mb"] / max(result["unfused_peak_mb"], 1e-9)
    return result
