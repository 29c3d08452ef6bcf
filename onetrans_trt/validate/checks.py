"""The checks behind a validation verdict, each with its value, its limit and the reason.

A check is ``{"name", "value", "limit", "passed", "reason"}`` (some add ``output`` or
``task``); ``passed`` is ``True``, ``False`` or ``None`` (not judged: the reason says why).
A backend passes when none of its checks has ``passed: False``. The names:

- ``error``: the backend raised while running a request;
- ``shape``: an output of another shape than the reference's;
- ``nan_inf``: NaN/Inf values in the outputs (limit 0);
- ``max_error``: ``max|a - ref| <= atol + rtol * max|ref|`` for every output; value and
  limit are the output closest to (or furthest past) its limit, named in ``output``;
- ``cosine``: the lowest cosine similarity of any output, limit ``min_cosine``;
- ``delta_auc`` (one per task, ``task``): ``|AUC(backend) - AUC(PyTorch)|`` on the labels,
  limit ``max_delta_auc``, judged only on a large enough sample (below);
- ``top10_overlap``: the mean top-10 overlap with PyTorch per request, limit
  ``min_top10_overlap``;
- ``kendall_tau``: the mean Kendall tau per request; judged only when the policy sets
  ``min_kendall_tau`` (reported otherwise).

The sample size of ``delta_auc``: with P positive and N negative labels the AUC is the
fraction of the P x N positive-negative pairs ordered correctly, so it moves in steps of
``1 / (P x N)``: one reordered pair of near-tied candidates. A limit finer than a few such
steps judges noise (which of a handful of ties a rounding flips), not the backend. The
check is judged only when the limit spans at least ``AUC_MIN_REORDERED_PAIRS`` (10)
reordered pairs, i.e. ``P x N >= 10 / max_delta_auc`` (20,000 pairs for the default 0.0005,
3,334 for INT8's 0.003); otherwise it is ``not judged`` and says how many pairs it has and
needs. A limit of 0 asks for the same AUC exactly and is judged on any sample with both
classes. The graph checks judge every output value and have no such floor.
"""

from __future__ import annotations

import math
from typing import Any

AUC_MIN_REORDERED_PAIRS = 10


def check(name: str, value: float | None, limit: float | None, passed: bool | None, reason: str,
          **extra: Any) -> dict[str, Any]:
    return {"name": name, "value": value, "limit": limit, "passed": passed, "reason": reason, **extra}


def verdict_of(checks: list[dict[str, Any]]) -> str:
    return "fail" if any(c["passed"] is False for c in checks) else "pass"


def failed(checks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [c for c in checks if c["passed"] is False]


def error_limit(stats: dict[str, Any], tol: dict[str, float]) -> float:
    return tol["atol"] + tol["rtol"] * stats["ref_max_abs"]


def _ratio(stats: dict[str, Any], tol: dict[str, float]) -> float:
    limit = error_limit(stats, tol)
    if limit > 0:
        return stats["max_abs"] / limit
    return math.inf if stats["max_abs"] > 0 else 0.0


def graph_checks(outputs: dict[str, dict[str, Any]], tol: dict[str, float]) -> list[dict[str, Any]]:
    """``outputs``: ``"<graph>.<output>"`` -> an :class:`ErrorStats` summary. Together the checks
    hold exactly when every output is within :func:`~onetrans_trt.validate.policy.within`."""
    out = []
    shapes = {k: s["shape_mismatch"] for k, s in outputs.items() if s.get("shape_mismatch")}
    if shapes:
        out.append(check("shape", None, None, False, "; ".join(f"{k}: shape {v}" for k, v in shapes.items())))
    bad = {k: (s["nan"], s["inf"]) for k, s in outputs.items() if s["nan"] or s["inf"]}
    n_bad = sum(a + b for a, b in bad.values())
    out.append(check("nan_inf", n_bad, 0, not bad,
                     "; ".join(f"{k}: {a} NaN, {b} Inf" for k, (a, b) in bad.items()) if bad
                     else "no NaN or Inf in any output"))
    if not outputs:
        return out
    worst = max(outputs, key=lambda k: _ratio(outputs[k], tol))
    s = outputs[worst]
    limit = error_limit(s, tol)
    ok = all(o["max_abs"] <= error_limit(o, tol) for o in outputs.values())
    out.append(check("max_error", s["max_abs"], limit, ok,
                     f"max |error| {s['max_abs']:.3g} {'<=' if ok else '>'} {limit:.3g} at {worst} "
                     f"(atol {tol['atol']:g} + rtol {tol['rtol']:g} x max |ref| {s['ref_max_abs']:.3g})",
                     output=worst))
    low = min(outputs, key=lambda k: outputs[k]["cosine"])
    cos = outputs[low]["cosine"]
    ok = cos >= tol["min_cosine"]
    out.append(check("cosine", cos, tol["min_cosine"], ok,
                     f"cosine {cos:.6f} {'>=' if ok else '<'} {tol['min_cosine']:g} at {low}", output=low))
    return out


def min_auc_pairs(limit: float) -> int:
    """Positive-negative pairs a ``max_delta_auc`` of ``limit`` needs to be judged."""
    if limit <= 0:
        return 1
    return math.ceil(round(AUC_MIN_REORDERED_PAIRS / limit, 6))


def auc_check(task: str, delta: float, positives: int, negatives: int, limit: float) -> dict[str, Any]:
    pairs = positives * negatives
    n = positives + negatives
    need = min_auc_pairs(limit)
    if pairs == 0:
        return check("delta_auc", None, limit, None,
                     f"delta AUC {task} not judged: {n} labels with {positives} positives have no positive-negative "
                     "pair (AUC needs both classes)", task=task, pairs=0, min_pairs=need)
    if pairs < need:
        return check("delta_auc", abs(delta), limit, None,
                     f"delta AUC {task} not judged: {n} labels ({positives} positives x {negatives} negatives = "
                     f"{pairs:,} pairs) are too few for max_delta_auc {limit:g}; it needs >= {need:,} pairs "
                     f"(one reordered pair moves the AUC by {1 / pairs:.2g}; the limit must span "
                     f"{AUC_MIN_REORDERED_PAIRS})", task=task, pairs=pairs, min_pairs=need)
    ok = abs(delta) <= limit
    return check("delta_auc", abs(delta), limit, ok,
                 f"delta AUC {task} {delta:+.5f}: |{abs(delta):.5f}| {'<=' if ok else '>'} {limit:g} "
                 f"({n} labels, {pairs:,} pairs)", task=task, pairs=pairs, min_pairs=need)


def no_labels_check(limit: float) -> dict[str, Any]:
    return check("delta_auc", None, limit, None, "delta AUC not judged: the requests carry no labels")


def ranking_checks(overlap: float | None, tau: float | None, n: int, tol: dict[str, float]) -> list[dict[str, Any]]:
    """``overlap``/``tau``: means over the ``n`` requests with candidates (``None``: none had any)."""
    lim = tol["min_top10_overlap"]
    if overlap is None:
        out = [check("top10_overlap", None, lim, None, "top-10 overlap not judged: no request has candidates")]
    else:
        ok = overlap >= lim
        out = [check("top10_overlap", overlap, lim, ok,
                     f"top-10 overlap {overlap:.3f} {'>=' if ok else '<'} {lim:g} (mean over {n} requests)")]
    if tau is None:
        return out
    lim = tol.get("min_kendall_tau")
    if lim is None:
        out.append(check("kendall_tau", tau, None, None,
                         f"Kendall tau {tau:.3f} (mean over {n} requests; reported, not judged: the policy sets no "
                         "min_kendall_tau)"))
    else:
        ok = tau >= lim
        out.append(check("kendall_tau", tau, lim, ok,
                         f"Kendall tau {tau:.3f} {'>=' if ok else '<'} {lim:g} (mean over {n} requests)"))
    return out


def error_check(error: str) -> dict[str, Any]:
    return check("error", None, None, False, f"the backend raised {error}")
