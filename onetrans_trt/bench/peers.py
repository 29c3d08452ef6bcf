"""The serving path against the naive peers, next to the hardware limit.

One run measures, each group interleaved (every contender once per round, in turn):

- **peers**: per-request latency (p50/p99) and candidates/s of ``torch-unified``,
  ``torch-split``, ``torch-compile``/``torch-compile-static`` (the same split through
  ``torch.compile``, dynamic shapes or static; not in ``--quick``), ``ort-unified``, ``ort``,
  ``ort-kv-copy`` (the split as a straightforward ``torch.onnx`` export runs it: the user's K/V
  copied to every candidate, :mod:`onetrans_trt.bench.kv_copy`; OneTrans only) and
  ``ort-fp16``/``ort-int8`` (``ort-int8-qdq`` and ``ort-int8-cpu`` on a build with ``int8-cpu/``)
  when the build has them, on one request of L history events and C
  candidates, as ratios against ``ort-unified``; each with its theoretical FLOPs, achieved
  GFLOP/s and largest logit difference from the eager PyTorch split on that request
  (``ort-kv-copy`` is dropped, with the reason, when that is over the fp32 tolerance: a fast
  wrong path is no contender);
- **machine**: ONNX Runtime's own MatMul GFLOP/s on this machine, same threads, same run;
- **scorer**: the candidate scorer alone at a large C, its GFLOP/s against the machine's, and
  its CPU INT8 form beside it (interleaved) when the build has ``int8-cpu/``;
- **cache**: a request whose user K/V is cached (the encoder skipped, counted) against one
  that misses and against the scorer graph alone on the same K/V (a hit's floor), with the
  FLOP bound of the speed-up;
- **pyramid**: the ORT split path of the build against its pyramid-off twin (same
  weights, every S-token kept as a query until the top layer).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from onetrans_trt.errors import InputError

KV_COPY = "ort-kv-copy"  # onetrans_trt.bench.kv_copy.NAME (that module imports torch: loaded when run)
# the peers an "ort split Nx faster than <peer>" line is printed for, when both ran
RATIO_PEERS = ("torch-split", "torch-compile", "torch-compile-static", KV_COPY)
QUICK = dict(history=256, candidates=64, scorer_candidates=512, cache_history=512, cache_candidates=64,
             rounds=12, budget_s=6.0)
FULL = dict(history=512, candidates=128, scorer_candidates=1024, cache_history=1024, cache_candidates=64,
            rounds=8, budget_s=60.0)


def matmul_gflops(threads: int | None = None, *, n: int = 1024, rows: int = 2048, repeats: int = 8) -> float:
    """ONNX Runtime MatMul ``[rows, n] x [n, n]`` GFLOP/s, fp32, best of ``repeats`` (the
    machine's attainable dense-matmul rate with the sessions' thread count)."""
    from onnx import TensorProto, helper

    from onetrans_trt.runtime.ort_backend import ort_session

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["c"])], "matmul",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [rows, n]),
         helper.make_tensor_value_info("b", TensorProto.FLOAT, [n, n])],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, [rows, n])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    sess = ort_session(model, threads=threads)
    rng = np.random.default_rng(0)
    feeds = {"a": rng.random((rows, n), np.float32), "b": rng.random((n, n), np.float32)}
    for _ in range(2):
        sess.run(None, feeds)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        sess.run(None, feeds)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * rows * n * n / best / 1e9


def _request(schema, history: int, candidates: int, seed: int = 0, user_key: str = "bench-user"):
    from onetrans_trt.data.synthetic import synthetic_request

    return synthetic_request(schema, np.random.default_rng(seed), n_history=history, n_candidates=candidates,
                             user_key=user_key)


def pyramid_off_twin(build: Path, out: Path, *, say: Callable[[str], None] = lambda s: None) -> Path:
    """Export the build's checkpoint again with the pyramid off (same weights)."""
    from onetrans_trt.export.api import export_build, read_manifest

    m = read_manifest(build)
    ck = Path(m["checkpoint"]["path"])
    if not (ck / "model.safetensors").is_file():
        raise InputError(f"{build}: its checkpoint {ck} is gone; the pyramid comparison re-exports it")
    twin_ck = out.parent / f"{out.name}-ckpt"
    shutil.rmtree(twin_ck, ignore_errors=True)
    twin_ck.mkdir(parents=True)
    shutil.copy2(ck / "model.safetensors", twin_ck / "model.safetensors")
    cfg = json.loads((ck / "config.json").read_text())
    cfg["pyramid"] = "off"
    (twin_ck / "config.json").write_text(json.dumps(cfg))
    say("export the pyramid-off twin")
    export_build(twin_ck, out, n_samples=1, force=True)
    return out


def _stats(lat: dict[str, float], candidates: int, flops: float | None) -> dict[str, Any]:
    out = dict(lat)
    out["candidates_per_s"] = candidates / (lat["p50_ms"] / 1e3)
    if flops is not None:
        out["flops"] = flops
        out["gflops_per_s"] = flops / (lat["p50_ms"] / 1e3) / 1e9
    return out


def _diffs_vs_split(rankers: dict[str, Any], req, ck: Path) -> tuple[dict[str, float], float | None]:
    """``(diffs, ref_max_abs)``: each peer's largest |logit - eager PyTorch split's| on ``req``
    (the request the peers are timed on; one untimed call each, before the warm-up) and the
    reference's own largest |logit|. The reference is the ``torch-split`` peer when it runs,
    else the checkpoint's model; without either: ``({}, None)``."""
    from onetrans_trt.runtime.backends import TorchSplitBackend
    from onetrans_trt.runtime.ranker import Ranker

    ref_ranker = rankers.get("torch-split")
    if ref_ranker is None:
        if not (ck / "model.safetensors").is_file():
            return {}, None
        from onetrans_trt.export.api import load_splittable

        model = load_splittable(ck)
        ref_ranker = Ranker(model.cfg.schema, list(model.cfg.tasks), TorchSplitBackend(model), chunk_size=1 << 30)
    ref = np.asarray(ref_ranker.rank(req).logits, np.float64)
    diffs = {}
    for name, r in rankers.items():
        got = np.asarray(r.rank(req).logits, np.float64)
        diffs[name] = float(np.abs(got - ref).max()) if ref.size else 0.0
    return diffs, (float(np.abs(ref).max()) if ref.size else 0.0)


def _fp32_tolerance(ref_max_abs: float | None) -> float:
    """``validate`` 's fp32 bar on a logit: ``atol + rtol * max|ref|``."""
    from onetrans_trt.validate.policy import DEFAULT_POLICY

    tol = DEFAULT_POLICY["fp32"]
    return tol["atol"] + tol["rtol"] * (ref_max_abs or 0.0)


def bench_peers(build: str | Path | None = None, *, preset: str | None = None, quick: bool = False,
                history: int | None = None, candidates: int | None = None, scorer_candidates: int | None = None,
                cache_history: int | None = None, cache_candidates: int | None = None, rounds: int | None = None,
                threads: int | None = None, backends: list[str] | None = None, pyramid: bool = True,
                work: Path | None = None, say: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Every section of the module docstring; returns a JSON-able dict. Scratch files (the
    random build, the pyramid-off twin) go to ``work``, else to a temporary directory removed
    when this returns, fails or is interrupted."""
    from onetrans_trt.bench.scratch import scratch_dir

    with scratch_dir(work) as tmp:
        return _bench_peers(build, tmp, preset=preset, quick=quick, history=history, candidates=candidates,
                            scorer_candidates=scorer_candidates, cache_history=cache_history,
                            cache_candidates=cache_candidates, rounds=rounds, threads=threads, backends=backends,
                            pyramid=pyramid, say=say)


def _bench_peers(build: str | Path | None, tmp: Path, *, preset: str | None, quick: bool, history: int | None,
                 candidates: int | None, scorer_candidates: int | None, cache_history: int | None,
                 cache_candidates: int | None, rounds: int | None, threads: int | None,
                 backends: list[str] | None, pyramid: bool, say: Callable[[str], None]) -> dict[str, Any]:
    import torch

    from onetrans_trt.bench.fused import random_build
    from onetrans_trt.bench.kv_copy import kv_copy_backend
    from onetrans_trt.bench.timing import interleaved
    from onetrans_trt.data.requests import encode_request
    from onetrans_trt.export.api import read_manifest
    from onetrans_trt.export.inspect import inspect_build
    from onetrans_trt.models.config import read_config
    from onetrans_trt.runtime.cache import UserKVCache
    from onetrans_trt.runtime.ranker import Ranker
    from onetrans_trt.variants import has_variant, int8_backends

    p = dict(QUICK if quick else FULL)
    for k, v in dict(history=history, candidates=candidates, scorer_candidates=scorer_candidates,
                     cache_history=cache_history, cache_candidates=cache_candidates, rounds=rounds).items():
        if v is not None:
            p[k] = v
    if build is None:
        preset = preset or ("small" if quick else "onetrans-s")
        say(f"export a random {preset} model (synthetic schema, history up to {max(p['history'], p['cache_history'])})")
        build = random_build(tmp / "build", preset=preset, history=max(p["history"], p["cache_history"]),
                             unified=True)
        source = f"random {preset} weights, synthetic requests"
    else:
        build = Path(build)
        source = f"build {build}"
    m = read_manifest(build)
    cfg = read_config(build)
    s_max = m["model"]["s_max_len"]
    for key in ("history", "cache_history"):
        if p[key] > s_max:
            say(f"{key} {p[key]} > the model's {s_max} S-tokens: using {s_max}")
            p[key] = s_max
    if threads:
        torch.set_num_threads(threads)
    result: dict[str, Any] = {"source": source, "build": str(build), "preset": m["model"].get("preset"),
                              "settings": {**p, "threads": threads or torch.get_num_threads()}}

    say("measure this machine's MatMul GFLOP/s")
    machine = matmul_gflops(threads)
    result["machine"] = {"matmul_gflops_per_s": machine, "threads": threads or torch.get_num_threads()}

    # -- peers -------------------------------------------------------------------------
    L, C = p["history"], p["candidates"]
    info = inspect_build(build, candidates=C, history=L)
    f = info["flops"]
    ck = Path(m["checkpoint"]["path"])
    compiled = [] if quick else ["torch-compile", "torch-compile-static"]  # compiles take minutes: not in --quick
    wanted = backends or ["torch-unified", "torch-split", *compiled, "ort-unified", "ort", KV_COPY, "ort-fp16",
                          *int8_backends(build)]
    rankers: dict[str, Ranker] = {}
    skipped: dict[str, str] = {}
    for name in wanted:
        try:
            if name == KV_COPY:  # exported here from the checkpoint; the build's own encoder gives the K/V
                say("export the K/V-copy scorer (torch.onnx, the user's K/V copied to every candidate)")
                rankers[name] = Ranker(cfg.schema, list(cfg.tasks), kv_copy_backend(build, tmp / KV_COPY,
                                                                                    threads=threads),
                                       chunk_size=1 << 30)
            elif name.startswith("torch"):
                if not (ck / "model.safetensors").is_file():
                    raise InputError(f"checkpoint {ck} not found")
                rankers[name] = Ranker.load(ck, backend=name, chunk_size=1 << 30)
            else:
                rankers[name] = Ranker.load(build, backend=name, threads=threads, chunk_size=1 << 30)
        except InputError as e:
            skipped[name] = str(e)
    req = _request(cfg.schema, L, C)
    diffs, ref_max = _diffs_vs_split(rankers, req, ck)
    tol = _fp32_tolerance(ref_max)
    if KV_COPY in rankers and diffs.get(KV_COPY) is None:
        skipped[KV_COPY] = "no eager PyTorch split to check its logits against (the checkpoint is gone)"
        del rankers[KV_COPY]
    elif KV_COPY in rankers and not diffs[KV_COPY] <= tol:
        skipped[KV_COPY] = (f"its logits differ from the eager PyTorch split by {diffs[KV_COPY]:.2e} "
                            f"(fp32 tolerance {tol:.1e}): not measured")
        del rankers[KV_COPY]
    say(f"peers at L={L}, C={C}: {', '.join(rankers)}")
    lat = interleaved({k: (lambda r=r: r.rank(req)) for k, r in rankers.items()}, rounds=p["rounds"],
                      warmup=1, budget_s=p["budget_s"])
    peers = {}
    for name, st in lat.items():
        split = rankers[name].backend.split
        peers[name] = _stats(st, C, f["split_total"] if split else f["unified"])
        peers[name]["path"] = "split" if split else "unified"
        if diffs.get(name) is not None:
            peers[name]["max_abs_vs_torch_split"] = diffs[name]
    base = "ort-unified" if "ort-unified" in peers else None
    if base:
        for st in peers.values():
            st["speedup_vs_ort_unified"] = peers[base]["p50_ms"] / st["p50_ms"]
    theory = f["ratio"]
    result["peers"] = {"history": L, "candidates": C, "backends": peers, "skipped": skipped,
                       "flops": {k: f[k] for k in ("user_encoder_once", "candidate_scorer", "split_total",
                                                   "unified")},
                       "theoretical_flop_ratio": theory}
    if base and "ort" in peers:
        sp = peers["ort"]["speedup_vs_ort_unified"]
        result["peers"]["ort_split_speedup"] = sp
        result["peers"]["fraction_of_theoretical"] = sp / theory if theory else None
    for peer in RATIO_PEERS:
        if "ort" in peers and peer in peers:
            result["peers"][f"ort_over_{peer.replace('-', '_')}"] = peers[peer]["p50_ms"] / peers["ort"]["p50_ms"]
    rankers.clear()

    # -- scorer alone at a large C --------------------------------------------------------
    from onetrans_trt.export.inspect import request_dims
    from onetrans_trt.graphs.flops import graph_flops, placeholder_feeds
    from onetrans_trt.onnx_files import load_model
    from onetrans_trt.runtime.ort_backend import OrtSplitBackend

    if "ort" in peers and "ort-int8-cpu" in peers:
        result["peers"]["ort_int8_cpu_speedup"] = peers["ort"]["p50_ms"] / peers["ort-int8-cpu"]["p50_ms"]
    SC = p["scorer_candidates"]
    say(f"candidate scorer alone at C={SC}")
    ort_split = OrtSplitBackend(build, threads=threads)
    dims = request_dims(m, SC, L)
    sflops = graph_flops(build / "candidate_scorer.onnx", dims)["flops"]  # reads any external data beside it
    feeds = placeholder_feeds(load_model(build / "candidate_scorer.onnx", external=False), dims)
    scorers = {"scorer": lambda: ort_split.scorer.run(["logits"], feeds)}
    if has_variant(build, "int8-cpu") and "ort-int8-cpu" not in skipped:  # side by side with the FP32 scorer
        cpu8 = Ranker.load(build, backend="ort-int8-cpu", threads=threads).backend
        scorers["int8-cpu"] = lambda: cpu8.scorer.run(["logits"], feeds)
    slats = interleaved(scorers, rounds=p["rounds"], warmup=1, budget_s=p["budget_s"])
    sres = _stats(slats["scorer"], SC, sflops)
    sres["fraction_of_machine_matmul"] = sres["gflops_per_s"] / machine
    result["scorer"] = {"candidates": SC, "history": L, **sres}
    if "int8-cpu" in slats:
        i8 = _stats(slats["int8-cpu"], SC, sflops)
        result["scorer"]["int8_cpu"] = {"p50_ms": i8["p50_ms"], "p99_ms": i8["p99_ms"],
                                        "fp32_over_int8_cpu": sres["p50_ms"] / i8["p50_ms"]}

    # -- cache hit vs miss ------------------------------------------------------------------
    CL, CC = p["cache_history"], p["cache_candidates"]
    say(f"K/V cache hit vs miss at L={CL}, C={CC}")
    calls = {"encoder": 0}
    encode = ort_split.encode_user

    def counted(hist):
        calls["encoder"] += 1
        return encode(hist)

    ort_split.encode_user = counted  # type: ignore[method-assign]
    hit_cache, miss_cache = UserKVCache(), UserKVCache(max_bytes=0)  # 0 bytes: nothing is kept
    hit = Ranker(cfg.schema, list(cfg.tasks), ort_split, cache=hit_cache, chunk_size=1 << 30)
    miss = Ranker(cfg.schema, list(cfg.tasks), ort_split, cache=miss_cache, chunk_size=1 << 30)
    creq = _request(cfg.schema, CL, CC, seed=1)
    same = np.array_equal(hit.rank(creq).logits, miss.rank(creq).logits)
    # the floor of any hit: the scorer graph alone on the same K/V and candidates
    chist, cns = encode_request(cfg.schema, creq)
    ckv = encode(chist)
    before = calls["encoder"]
    clat = interleaved({"hit": lambda: hit.rank(creq), "miss": lambda: miss.rank(creq),
                        "scorer_alone": lambda: ort_split.score(ckv, cns)}, rounds=p["rounds"] * 2,
                       warmup=1, budget_s=p["budget_s"])
    runs = clat["hit"]["runs"] + clat["miss"]["runs"] + 2  # + the warm-up round
    cdims = request_dims(m, CC, CL)
    f_user = graph_flops(build / "user_encoder.onnx", cdims)["flops"]
    f_scorer = graph_flops(build / "candidate_scorer.onnx", cdims)["flops"]
    result["cache"] = {"history": CL, "candidates": CC, "hit": clat["hit"], "miss": clat["miss"],
                       "hit_speedup": clat["miss"]["p50_ms"] / clat["hit"]["p50_ms"],
                       # a hit still scores every candidate: the speed-up is bounded by this ratio
                       "flops": {"user_encoder": f_user, "candidate_scorer": f_scorer},
                       "theoretical_hit_speedup": (f_user + f_scorer) / f_scorer,
                       # measured: what the cache itself costs on a hit (request encoding,
                       # fingerprint, lookup) and the speed-up a free cache would give
                       "scorer_alone": clat["scorer_alone"],
                       "hit_over_scorer_alone": clat["hit"]["p50_ms"] / clat["scorer_alone"]["p50_ms"],
                       "measured_hit_bound": clat["miss"]["p50_ms"] / clat["scorer_alone"]["p50_ms"],
                       "encoder_calls": calls["encoder"] - before, "requests": runs,
                       "hit_counters": hit_cache.stats(), "identical_scores": bool(same)}

    # -- pyramid on vs off ------------------------------------------------------------------
    if pyramid and m["pyramid"]["mode"] != "off":
        twin = pyramid_off_twin(build, tmp / "pyramid-off", say=say)
        on = OrtSplitBackend(build, threads=threads)
        off = OrtSplitBackend(twin, threads=threads)
        r_on = Ranker(cfg.schema, list(cfg.tasks), on, chunk_size=1 << 30)
        r_off = Ranker(cfg.schema, list(cfg.tasks), off, chunk_size=1 << 30)
        say(f"pyramid on vs off at L={L}, C={C}")
        plat = interleaved({"on": lambda: r_on.rank(req), "off": lambda: r_off.rank(req)}, rounds=p["rounds"],
                           warmup=1, budget_s=p["budget_s"])
        f_off = inspect_build(twin, candidates=C, history=L)["flops"]["split_total"]
        result["pyramid"] = {"history": L, "candidates": C, "schedule": m["pyramid"]["schedule"],
                             "on": _stats(plat["on"], C, f["split_total"]), "off": _stats(plat["off"], C, f_off),
                             "speedup": plat["off"]["p50_ms"] / plat["on"]["p50_ms"],
                             "flop_ratio": f_off / f["split_total"]}
    else:
        result["pyramid"] = None
    return result


def table(res: dict[str, Any]) -> str:
    """The result as plain-text tables (what `bench` prints without --json)."""
    out = [f"onetrans-trt bench: {res['source']}; {res['settings']['threads']} threads; "
           f"machine MatMul {res['machine']['matmul_gflops_per_s']:.0f} GFLOP/s (ORT, fp32, this run)"]
    pe = res["peers"]
    out.append(f"\nper request, L={pe['history']} history events, C={pe['candidates']} candidates "
               f"(theoretical unified/split FLOPs {pe['theoretical_flop_ratio']:.1f}x)")
    out.append(f"  {'backend':<21}{'p50 ms':>10}{'p99 ms':>10}{'cand/s':>11}{'GFLOP/s':>9}{'vs ort-unified':>16}"
               f"{'max |diff|':>12}")
    for name, st in pe["backends"].items():
        sp = st.get("speedup_vs_ort_unified")
        diff = st.get("max_abs_vs_torch_split")
        out.append(f"  {name:<21}{st['p50_ms']:>10.1f}{st['p99_ms']:>10.1f}{st['candidates_per_s']:>11.0f}"
                   f"{st.get('gflops_per_s', float('nan')):>9.1f}{(f'{sp:.2f}x' if sp else '-'):>16}"
                   f"{(f'{diff:.1e}' if diff is not None else '-'):>12}")
    for name, why in pe["skipped"].items():
        out.append(f"  {name:<21}skipped: {why}")
    if pe.get("fraction_of_theoretical") is not None:
        out.append(f"  ort split {pe['ort_split_speedup']:.1f}x faster than ort-unified = "
                   f"{100 * pe['fraction_of_theoretical']:.0f}% of the FLOP ratio")
    for peer in RATIO_PEERS:
        ratio = pe.get("ort_over_" + peer.replace("-", "_"))
        if ratio is not None:
            note = {"torch-split": "", KV_COPY: " (the straightforward export: user K/V copied per candidate)"}.get(
                peer, " (compiled in the warm-up call, not timed)")
            out.append(f"  ort split {ratio:.2f}x faster than {peer}{note}")
    if pe.get("ort_int8_cpu_speedup") is not None:
        out.append(f"  ort-int8-cpu {pe['ort_int8_cpu_speedup']:.2f}x faster than ort (CPU INT8 scorer, float32 "
                   "encoder)")
    sc = res["scorer"]
    out.append(f"\ncandidate scorer alone, C={sc['candidates']}: {sc['p50_ms']:.1f} ms p50, "
               f"{sc['gflops_per_s']:.1f} GFLOP/s = {100 * sc['fraction_of_machine_matmul']:.0f}% of machine MatMul")
    if sc.get("int8_cpu"):
        out.append(f"  its CPU INT8 form (int8-cpu/): {sc['int8_cpu']['p50_ms']:.1f} ms p50 -> "
                   f"{sc['int8_cpu']['fp32_over_int8_cpu']:.2f}x faster than FP32, side by side")
    ca = res["cache"]
    out.append(f"\nuser K/V cache, L={ca['history']}, C={ca['candidates']}: hit {ca['hit']['p50_ms']:.1f} ms, "
               f"miss {ca['miss']['p50_ms']:.1f} ms p50 -> hits {ca['hit_speedup']:.1f}x faster "
               f"(bound: FLOPs {ca['theoretical_hit_speedup']:.2f}x, measured miss / scorer alone "
               f"{ca['measured_hit_bound']:.2f}x; a hit still scores every candidate and costs "
               f"{ca['hit_over_scorer_alone']:.2f}x the scorer alone); "
               f"encoder ran {ca['encoder_calls']} times for {ca['requests']} requests "
               f"({ca['hit_counters']['hits']} hits); scores identical: {ca['identical_scores']}")
    py = res.get("pyramid")
    if py:
        out.append(f"\npyramid on vs off, L={py['history']}, C={py['candidates']}: on {py['on']['p50_ms']:.1f} ms, "
                   f"off {py['off']['p50_ms']:.1f} ms -> {py['speedup']:.2f}x (FLOP ratio {py['flop_ratio']:.2f}x)")
    return "\n".join(out)
