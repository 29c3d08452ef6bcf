"""``bench BUILD`` on a build from ``export --module``: the module's own paths against ours.

One request (one user with L real history events, C candidates, random inputs from the spec),
every contender once per round in turn (:func:`onetrans_trt.bench.timing.interleaved`):

- ``torch-unified``: the module's own ``forward`` (the user's inputs repeated per candidate);
- ``torch-split``: its ``encode_user`` then ``score_candidates``;
- ``ort-unified``: ``unified.onnx`` (``export --unified``);
- ``ort``: the build's split graphs in ONNX Runtime; ``ort-fp16`` / ``ort-int8`` when the build
  has those variants.

Latency p50/p99, candidates/s, each one's speed-up over ``torch-unified`` and its largest
logit difference from it (the same request: a fast wrong path shows here). A peer that cannot
run is listed as skipped, with the reason.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np

from onetrans_trt.errors import InputError

PEERS = ["torch-unified", "torch-split", "ort-unified", "ort", "ort-fp16", "ort-int8", "ort-int8-qdq", "ort-int8-cpu"]
QUICK = dict(rounds=12, budget_s=6.0)
FULL = dict(rounds=8, budget_s=60.0)


def bench_module(build: str | Path, module=None, *, module_error: str | None = None, candidates: int | None = None,
                 history: int | None = None, rounds: int | None = None, threads: int | None = None,
                 backends: list[str] | None = None, quick: bool = False,
                 say: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Every peer of the module docstring on one request; returns a JSON-able dict.
    ``module``: the loaded module for the torch peers (None: they are skipped with
    ``module_error`` as the reason)."""
    import torch

    from onetrans_trt.bench.timing import interleaved
    from onetrans_trt.calibrate.module import to_numpy
    from onetrans_trt.export.api import read_manifest
    from onetrans_trt.kv import from_state, state_arrays
    from onetrans_trt.protocol import random_inputs, unified_inputs
    from onetrans_trt.protocol.checks import user_slice
    from onetrans_trt.runtime.ort_backend import OrtSplitBackend, OrtUnifiedBackend
    from onetrans_trt.validate.module import read_spec

    build = Path(build)
    m = read_manifest(build)
    spec = read_spec(build)
    p = dict(QUICK if quick else FULL)
    if rounds is not None:
        p["rounds"] = rounds
    hmax = spec.history.max
    L = hmax if history is None else history
    if L > hmax:
        say(f"history {L} > the spec's {hmax} events: using {hmax}")
        L = hmax
    C = candidates or spec.dim_range("candidates")[1]
    if threads:
        torch.set_num_threads(threads)
    from onetrans_trt.variants import int8_backends

    wanted = backends or [*PEERS[:5], *int8_backends(build)]
    unknown = [b for b in wanted if b not in PEERS]
    if unknown:
        raise InputError(f"--backends: unknown {unknown}; choose from {','.join(PEERS)}")
    user, cand = random_inputs(spec, users=1, candidates=C, lengths=[L], rng=np.random.default_rng(0))
    user_np, cand_np = {k: to_numpy(v) for k, v in user.items()}, {k: to_numpy(v) for k, v in cand.items()}
    precisions = m.get("precisions") or {}
    fns: dict[str, Callable[[], np.ndarray]] = {}
    skipped: dict[str, str] = {}
    for name in wanted:
        if name.startswith("torch"):
            if module is None:
                skipped[name] = module_error or "no module to run"
                continue
            if name == "torch-unified":
                def run(module=module):
                    with torch.no_grad():
                        return module(unified_inputs(user, cand, 0)).numpy()
            else:
                def run(module=module):
                    with torch.no_grad():
                        return module.score_candidates(user_slice(module.encode_user(user), 0), cand).numpy()
            fns[name] = run
        elif name == "ort-unified":
            if not (build / "unified.onnx").is_file():
                skipped[name] = "the build has no unified.onnx (export --module ... --unified)"
                continue
            be = OrtUnifiedBackend(build, threads=threads)
            fns[name] = lambda be=be: be.score_unified(user_np, cand_np)
        else:
            from onetrans_trt.variants import graph_file, make_command, variant_of

            sub = variant_of(build, name)
            if sub != "fp32" and sub not in precisions:
                skipped[name] = f"no {sub} variant ({make_command(sub).replace(' BUILD', f' {build}')})"
                continue
            if sub != "fp32":
                from onetrans_trt import lineage

                state, why = lineage.variant_state(build, m, sub)
                if state == "stale":  # made from graphs since rewritten: not measured as this build's
                    skipped[name] = why
                    continue
            be = OrtSplitBackend(build, name=name, user_graph=graph_file(sub, "user_encoder"),
                                 scorer_graph=graph_file(sub, "candidate_scorer"), threads=threads,
                                 device=None)

            def run(be=be):
                state = state_arrays(be.encode_user(user_np))
                return be.score(from_state(state, None), cand_np)
            fns[name] = run
    if not fns:
        raise InputError(f"no peer can run on {build}: " + "; ".join(f"{k}: {v}" for k, v in skipped.items()))
    say(f"peers at L={L}, C={C}: {', '.join(fns)}")
    outputs = {k: np.asarray(fn(), np.float64) for k, fn in fns.items()}
    ref = outputs.get("torch-unified")
    lat = interleaved(fns, rounds=p["rounds"], warmup=1, budget_s=p["budget_s"])
    peers: dict[str, Any] = {}
    for name, st in lat.items():
        peers[name] = {**st, "candidates_per_s": C / (st["p50_ms"] / 1e3),
                       "path": "unified" if name.endswith("unified") else "split"}
        if ref is not None:
            peers[name]["speedup_vs_torch_unified"] = lat["torch-unified"]["p50_ms"] / st["p50_ms"]
            peers[name]["max_abs_vs_torch_unified"] = float(np.abs(outputs[name] - ref).max()) if ref.size else 0.0
    res: dict[str, Any] = {"source": f"module build {build}", "build": str(build), "module": m["checkpoint"].get("module"),
                           "spec": spec.name, "settings": {"history": L, "candidates": C, "rounds": p["rounds"],
                                                           "threads": threads or torch.get_num_threads()},
                           "peers": {"history": L, "candidates": C, "backends": peers, "skipped": skipped}}
    if "ort" in peers and "torch-split" in peers:
        res["peers"]["ort_over_torch_split"] = peers["torch-split"]["p50_ms"] / peers["ort"]["p50_ms"]
    return res


def table(res: dict[str, Any]) -> str:
    """The result as a plain-text table (what `bench` prints without --json)."""
    pe = res["peers"]
    out = [f"onetrans-trt bench: {res['source']} ({res['spec']}); {res['settings']['threads']} threads",
           f"\nper request, one user, L={pe['history']} history events, C={pe['candidates']} candidates",
           f"  {'backend':<14}{'p50 ms':>10}{'p99 ms':>10}{'cand/s':>11}{'vs torch-unified':>18}{'max |diff|':>12}"]
    for name, st in pe["backends"].items():
        sp = st.get("speedup_vs_torch_unified")
        diff = st.get("max_abs_vs_torch_unified")
        out.append(f"  {name:<14}{st['p50_ms']:>10.2f}{st['p99_ms']:>10.2f}{st['candidates_per_s']:>11.0f}"
                   f"{(f'{sp:.2f}x' if sp else '-'):>18}{(f'{diff:.1e}' if diff is not None else '-'):>12}")
    for name, why in pe["skipped"].items():
        out.append(f"  {name:<14}skipped: {why}")
    if pe.get("ort_over_torch_split") is not None:
        out.append(f"  ort split {pe['ort_over_torch_split']:.2f}x faster than torch-split")
    return "\n".join(out)
