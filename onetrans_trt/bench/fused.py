"""Fused vs unfused candidate scorer on ORT CPU: peak memory and latency at C and L."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from onetrans_trt.onnx_files import load_model


def random_build(out: Path, *, preset: str, history: int, n_layers: int | None = None, fuse: bool = True,
                 unified: bool = False) -> Path:
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
    export_build(ck, out, fuse_attention=fuse, n_samples=1, force=True, unified=unified)
    return out


def bench_fused(*, preset: str = "small", candidates: int = 1024, history: int = 1024, rounds: int = 10,
                work: Path | None = None) -> dict[str, Any]:
    """Fused vs unfused scorer; scratch builds in ``work``, else in a temporary directory removed
    when this returns, fails or is interrupted."""
    from onetrans_trt.bench.scratch import scratch_dir

    with scratch_dir(work) as tmp:
        return _bench_fused(tmp, preset=preset, candidates=candidates, history=history, rounds=rounds)


def _bench_fused(tmp: Path, *, preset: str, candidates: int, history: int, rounds: int) -> dict[str, Any]:
    from onetrans_trt.bench.memory import peak_growth
    from onetrans_trt.bench.timing import interleaved
    from onetrans_trt.export.api import default_passes, read_manifest, rerun_passes
    from onetrans_trt.export.inspect import request_dims
    from onetrans_trt.graphs.flops import placeholder_feeds
    from onetrans_trt.runtime.ort_backend import ort_session

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
            feeds = placeholder_feeds(load_model(path, external=False), dims)
    lat = interleaved({k: (lambda s=s: s.run(["logits"], feeds)) for k, s in sessions.items()}, rounds=rounds)
    result["latency"] = lat
    result["fused_over_unfused_latency"] = lat["fused"]["p50_ms"] / lat["unfused"]["p50_ms"]
    result["fused_over_unfused_memory"] = result["fused_peak_mb"] / max(result["unfused_peak_mb"], 1e-9)
    return result


def bench_int8(*, preset: str = "small", candidates: int = 256, history: int = 512, rounds: int = 10,
               calibration: int = 16, work: Path | None = None) -> dict[str, Any]:
    """ORT CPU latency of the INT8 vs the FP32 candidate scorer (random weights, synthetic
    calibration requests), measured interleaved; scratch build in ``work``, else in a temporary
    directory removed when this returns, fails or is interrupted."""
    from onetrans_trt.bench.scratch import scratch_dir

    with scratch_dir(work) as tmp:
        return _bench_int8(tmp, preset=preset, candidates=candidates, history=history, rounds=rounds,
                           calibration=calibration)


def _bench_int8(tmp: Path, *, preset: str, candidates: int, history: int, rounds: int,
                calibration: int) -> dict[str, Any]:
    import warnings

    from onetrans_trt.bench.timing import interleaved
    from onetrans_trt.calibrate.int8 import calibrate_build
    from onetrans_trt.export.api import read_manifest
    from onetrans_trt.export.inspect import request_dims
    from onetrans_trt.graphs.flops import placeholder_feeds
    from onetrans_trt.runtime.ort_backend import OrtSplitBackend

    build = random_build(tmp / "b", preset=preset, history=history)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        calibrate_build(build, n_samples=calibration, synthetic=True)
    dims = request_dims(read_manifest(build), candidates, history)
    fp32 = OrtSplitBackend(build)
    int8 = OrtSplitBackend(build, name="ort-int8", user_graph="int8/user_encoder.onnx",
                           scorer_graph="int8/candidate_scorer.onnx")
    feeds = placeholder_feeds(load_model(build / "candidate_scorer.onnx", external=False), dims)
    lat = interleaved({"fp32": lambda: fp32.scorer.run(["logits"], feeds),
                       "int8": lambda: int8.scorer.run(["logits"], feeds)}, rounds=rounds)
    return {"preset": preset, "candidates": candidates, "history": history, "latency": lat,
            "int8_over_fp32_latency": lat["int8"]["p50_ms"] / lat["fp32"]["p50_ms"], "int8_note": int8.note}
