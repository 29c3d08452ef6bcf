"""Precision variants of a build exported from a user's module (``export --module``).

Such a build has no checkpoint, no MovieLens schema and no labels: its manifest carries the
split spec (``protocol``). Here:

- which graph tensors are the per-layer K/V (the spec's state roles, not a name prefix);
- the data a quality report or a calibration uses: exactly the user's ``--inputs`` requests,
  or random inputs drawn from the spec when ``--synthetic`` asks for them; never a silent
  choice, and every report says which (``data``);
- calibration feeds: the user encoder on each user's inputs, the scorer on the candidates
  plus the state the float32 ONNX Runtime user encoder produced for that user (what the
  scorer sees when serving);
- the quality report of a variant: its ONNX Runtime split path against the module's own
  unified forward (PyTorch, float32), per task: max abs / relative logit error and ranking
  agreement (top-10 overlap, Kendall tau). There are no labels, so no AUC.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np

from onetrans_trt.errors import InputError
from onetrans_trt.variants import SUBDIR  # noqa: F401 - variant -> its directory in a build
SYNTHETIC_CANDIDATES = 16  # per calibration request, as for our own builds


def is_module_build(manifest: dict) -> bool:
    return "protocol" in manifest


def kv_graph_names(spec) -> set[str]:
    """Graph names of the state tensors the spec declares as per-layer keys/values."""
    return {spec.graph_name(s.name) for s in spec.state if s.kind in ("key", "value")}


def to_numpy(t) -> np.ndarray:
    """A torch tensor as the numpy array a graph input takes (bfloat16 travels as float32)."""
    import torch

    if t.dtype == torch.bfloat16:
        t = t.float()
    return np.ascontiguousarray(t.numpy())


def read_requests(path: str | Path, spec) -> tuple[list[tuple[dict, dict]], str]:
    """The user's ``--inputs`` file as requests ``(user inputs, candidate inputs)`` (torch
    tensors) and a label naming it (``protocol.checks.inputs_from_file``: npz with ``<i>/<name>``
    or bare keys, or Polygraphy JSON)."""
    from onetrans_trt.protocol.checks import inputs_from_file

    requests, source = inputs_from_file(path, spec)
    if not requests:
        raise InputError(f"--inputs {path}: holds no request")
    return requests, source if str(path) in str(source) else f"--inputs {path} ({source})"


def _users(user: dict) -> int:
    return int(next(iter(user.values())).shape[0])


def describe(requests: list[tuple[dict, dict]]) -> str:
    users = sum(_users(u) for u, _ in requests)
    cands = sorted({int(next(iter(c.values())).shape[0]) for _, c in requests})
    span = f"{cands[0]}" if len(cands) == 1 else f"{cands[0]}..{cands[-1]}"
    return f"{len(requests)} request{'s' if len(requests) != 1 else ''}, {users} user{'s' if users != 1 else ''}, " \
           f"{span} candidates"


def quality_requests(spec, *, inputs: str | Path | None, synthetic: bool, count: int,
                     seed: int = 11) -> tuple[list[tuple[dict, dict]], str]:
    """The requests a quality report runs on, and its ``data`` label: exactly ``inputs``, or
    ``count`` random single-user cases from the spec (histories 0, 1, full, over-long in turn,
    1..300 candidates) when ``synthetic``; neither is an :class:`InputError`."""
    if inputs is not None and synthetic:
        raise InputError("--inputs and --synthetic exclude each other: choose one source of data")
    if inputs is not None:
        reqs, label = read_requests(inputs, spec)
        return reqs, f"{label}: {describe(reqs)}"
    if synthetic:
        from onetrans_trt.validate.module import cases

        todo = cases(spec, count, seed=seed)
        return [(u, c) for _, u, c in todo], (f"synthetic (asked for): {count} random cases from the spec (histories "
                                              "0, 1, full and over-long; 1..300 candidates)")
    raise InputError("a module build has no dataset of its own: give --inputs FILE.npz (your requests), --synthetic "
                     "(random inputs from the spec) or --quality-requests 0 (no quality report)")


def synthetic_calibration(spec, n: int, *, seed: int = 7) -> list[tuple[dict, dict]]:
    """``n`` single-user requests from the spec: histories empty, 1, a quarter, half, full and
    over-long in turn, then random lengths; ``SYNTHETIC_CANDIDATES`` candidates each."""
    from onetrans_trt.protocol import random_inputs

    rng = np.random.default_rng(seed)
    hmax = spec.history.max
    cycle = [0, 1, max(1, hmax // 4), max(1, hmax // 2), hmax, hmax + 3]
    out = []
    for i in range(n):
        length = cycle[i] if i < len(cycle) else int(rng.integers(0, hmax + 1))
        out.append(random_inputs(spec, users=1, candidates=SYNTHETIC_CANDIDATES, lengths=[length], rng=rng))
    return out


def calibration_set(build: str | Path, spec, requests: list[tuple[dict, dict]], source: str,
                    progress: Callable[[int, int], None] | None = None) -> dict[str, np.ndarray]:
    """``{"user/<i>/<name>", "scorer/<i>/<name>": array}`` (one entry ``i`` per user), ``source``
    and ``count``: the layout of :func:`onetrans_trt.calibrate.data.build_calibration_set`."""
    from onetrans_trt.runtime.ort_backend import ort_session

    build = Path(build)
    user = ort_session(build / "user_encoder.onnx")
    user_inputs = [i.name for i in user.get_inputs()]
    state_names = [o.name for o in user.get_outputs()]
    scorer_inputs = {i.name for i in ort_session(build / "candidate_scorer.onnx").get_inputs()}
    arrays: dict[str, np.ndarray] = {"source": np.array(source)}
    i = 0
    for k, (u_in, c_in) in enumerate(requests):
        cand = {n: to_numpy(t) for n, t in c_in.items()}
        for u in range(_users(u_in)):
            feed = {n: to_numpy(u_in[n][u:u + 1]) for n in user_inputs}
            state = dict(zip(state_names, user.run(state_names, feed)))
            for n, v in feed.items():
                arrays[f"user/{i}/{n}"] = v
            for n, v in {**cand, **state}.items():
                if n in scorer_inputs:
                    arrays[f"scorer/{i}/{n}"] = v
            i += 1
        if progress:
            progress(k + 1, len(requests))
    arrays["count"] = np.array(i)
    return arrays


def load_module_for(build: str | Path, module_ref: str | None, weights: str | Path | None):
    """The module a build was exported from (the manifest's, unless ``module_ref``), with its
    weights (``weights``, else the manifest's when the module is the manifest's). Runs the
    module's own code."""
    from onetrans_trt.export.api import read_manifest
    from onetrans_trt.export.module import load_user_module

    m = read_manifest(build)
    ref = module_ref or m["checkpoint"].get("module")
    if not ref or ":" not in str(ref):
        raise InputError(f"{build}: give --module FILE.py:FACTORY (the manifest names none)")
    recorded = (m["checkpoint"].get("weights") or {}).get("path")
    module, _, _ = load_user_module(ref, weights or (recorded if module_ref is None else None))
    return module.float().eval()


def evaluate_module_variant(build: str | Path, variant: str, module, requests: list[tuple[dict, dict]], data: str,
                            *, progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """ONNX Runtime split path of ``variant`` (fp32/fp16/int8) against ``module``'s unified
    forward (PyTorch, float32) on ``requests``; per task: max abs logit error, max relative
    logit error (the abs error over the largest |logit| of that request, so logits near zero
    do not blow it up), mean/min top-10 overlap and Kendall tau over each user's candidates."""
    import torch

    from onetrans_trt.calibrate.quality import VARIANT_BACKENDS, ranking_agreement
    from onetrans_trt.kv import from_state, state_arrays
    from onetrans_trt.protocol import unified_inputs
    from onetrans_trt.runtime.ort_backend import OrtSplitBackend
    from onetrans_trt.validate.module import read_spec
    from onetrans_trt.variants import graph_file

    build = Path(build)
    spec = read_spec(build)
    be = OrtSplitBackend(build, name=VARIANT_BACKENDS[variant],
                         user_graph=graph_file(variant, "user_encoder"),
                         scorer_graph=graph_file(variant, "candidate_scorer"), device=None)
    tasks = list(spec.tasks)
    per = {t: {"abs": 0.0, "rel": 0.0, "overlap": [], "tau": []} for t in tasks}
    users = 0
    for k, (user, cand) in enumerate(requests):
        full = state_arrays(be.encode_user({n: to_numpy(v) for n, v in user.items()}))
        cand_np = {n: to_numpy(v) for n, v in cand.items()}
        for u in range(_users(user)):
            one = from_state({n: np.asarray(v)[u:u + 1] for n, v in full.items()}, None)
            got = np.asarray(be.score(one, cand_np), np.float64)
            with torch.no_grad():
                want = module(unified_inputs(user, cand, u)).double().numpy()
            users += 1
            if not want.size:
                continue
            for j, t in enumerate(tasks):
                d = float(np.abs(got[:, j] - want[:, j]).max())
                per[t]["abs"] = max(per[t]["abs"], d)
                per[t]["rel"] = max(per[t]["rel"], d / max(float(np.abs(want[:, j]).max()), 1e-12))
                o, tau = ranking_agreement(got[:, j], want[:, j])
                per[t]["overlap"].append(o)
                per[t]["tau"].append(tau)
        if progress:
            progress(k + 1, len(requests))
    metrics = {t: {"max_abs_logit_error": v["abs"], "max_rel_logit_error": v["rel"],
                   "top10_overlap_mean": float(np.mean(v["overlap"])) if v["overlap"] else None,
                   "top10_overlap_min": float(np.min(v["overlap"])) if v["overlap"] else None,
                   "kendall_tau_mean": float(np.mean(v["tau"])) if v["tau"] else None,
                   "kendall_tau_min": float(np.min(v["tau"])) if v["tau"] else None} for t, v in per.items()}
    return {"variant": variant, "backend": VARIANT_BACKENDS[variant], "data": data,
            "reference": "the module's own unified forward (PyTorch, float32)", "requests": len(requests),
            "users": users, "labelled": 0, "tasks": metrics,
            "max_abs_logit_error": max((v["abs"] for v in per.values()), default=0.0),
            "note": getattr(be, "note", "")}


def write_module_quality(build: str | Path, variant: str, module, requests, data: str, **kw: Any) -> dict[str, Any]:
    from onetrans_trt.io import atomic_write_json

    report = evaluate_module_variant(build, variant, module, requests, data, **kw)
    sub = Path(build) / (SUBDIR[variant] or ".")
    atomic_write_json(sub / "quality.json", report)
    return report


def quality_lines(rep: dict) -> list[str]:
    """The module quality report in a few lines (what `convert`/`calibrate` print)."""
    lines = [f"  quality vs the module's unified forward (PyTorch fp32), data: {rep['data']}"]
    for t, m in rep["tasks"].items():
        if m["top10_overlap_mean"] is None:
            lines.append(f"  {t}: no candidates scored")
            continue
        lines.append(f"  {t}: max |logit error| {m['max_abs_logit_error']:.2e} (relative {m['max_rel_logit_error']:.2e}), "
                     f"top-10 overlap {m['top10_overlap_mean']:.3f} (min {m['top10_overlap_min']:.2f}), "
                     f"Kendall tau {m['kendall_tau_mean']:.3f} (min {m['kendall_tau_min']:.3f})")
    if rep.get("note"):
        lines.append(f"  note: {rep['note']}")
    return lines
