"""Ranking quality of a precision variant against the float32 PyTorch model.

On real MovieLens test requests through the Ranker (ONNX Runtime on CPU): AUC and
logloss per task on the labelled candidates for the variant and for PyTorch, their
deltas, and per-request ranking agreement with PyTorch over all candidates (top-10
overlap, Kendall tau).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np

from onetrans_trt.errors import BuildError
from onetrans_trt.variants import BACKEND_OF as VARIANT_BACKENDS  # variant -> the ORT backend that runs it


def ranking_agreement(a: np.ndarray, b: np.ndarray, k: int = 10) -> tuple[float, float]:
    """(top-k overlap, Kendall tau) of scores ``a`` (a backend's) against ``b`` (the
    reference's) over the same candidates. A candidate of ``a``'s top k agrees when it is in
    ``b``'s top k, or ties exactly with ``b``'s k-th score: which of several candidates the
    reference scores the same (one item given twice) makes its top k is arbitrary, and a
    backend's last-bit differences between such rows must not count as disagreement."""
    from scipy.stats import kendalltau

    k = min(k, len(a))
    top_a = np.argsort(-a, kind="stable")[:k]
    order_b = np.argsort(-b, kind="stable")
    top_b, kth = set(order_b[:k].tolist()), b[order_b[k - 1]]
    agree = sum(1 for j in top_a.tolist() if j in top_b or b[j] == kth)
    tau = kendalltau(a, b).statistic if len(a) > 1 else 1.0
    return agree / k, float(1.0 if np.isnan(tau) else tau)


def evaluate_variant(build: str | Path, variant: str, *, n_requests: int = 200, n_candidates: int = 50,
                     data_dir=None, torch_ckpt: str | Path | None = None,
                     progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    from onetrans_trt.data.movielens import MovieLens
    from onetrans_trt.export.api import read_manifest
    from onetrans_trt.runtime.ranker import Ranker

    build = Path(build)
    manifest = read_manifest(build)
    ckpt = Path(torch_ckpt or manifest["checkpoint"]["path"])
    if not ckpt.is_dir():
        raise BuildError(f"the quality report needs the source checkpoint ({ckpt}); pass its path")
    variant_ranker = Ranker.load(build, backend=VARIANT_BACKENDS[variant])
    ref_ranker = Ranker.load(ckpt, backend="torch-split")
    schema = ref_ranker.schema
    ml = MovieLens(data_dir, max_history=schema.max_history, merge_mode=schema.merge_mode)
    reqs = ml.requests(n_requests, n_candidates=n_candidates, seed=2024)
    q = compare_rankers(variant_ranker, ref_ranker, reqs, progress=progress)
    return {
        "variant": variant, "backend": VARIANT_BACKENDS[variant],
        "data": f"MovieLens-100K test requests ({len(reqs)}, {n_candidates} candidates each, seed 2024)",
        "requests": len(reqs),
        "candidates_per_request": n_candidates, **q,
        "note": getattr(variant_ranker.backend, "note", ""),
    }


def compare_rankers(variant_ranker, ref_ranker, reqs, *, progress: Callable[[int, int], None] | None = None
                    ) -> dict[str, Any]:
    """Two Rankers on the same labelled requests (``(request, labels)`` pairs): per task AUC and
    logloss of each and their deltas, top-10 overlap and Kendall tau of the first task's order,
    the largest logit difference."""
    from onetrans_trt.models.training import binary_metrics

    tasks = ref_ranker.tasks
    ys, pv, pr, overlaps, taus, worst = [], [], [], [], [], 0.0
    for i, (req, labels) in enumerate(reqs):
        lv, lr = variant_ranker.rank(req).logits, ref_ranker.rank(req).logits
        worst = max(worst, float(np.abs(lv - lr).max()))
        o, t = ranking_agreement(lv[:, 0], lr[:, 0])
        overlaps.append(o)
        taus.append(t)
        for j, lab in enumerate(labels):
            if lab is not None:
                ys.append(lab)
                pv.append(lv[j])
                pr.append(lr[j])
        if progress:
            progress(i + 1, len(reqs))
    y, pv, pr = np.asarray(ys, np.float32), np.asarray(pv), np.asarray(pr)
    mv, mr = binary_metrics(y, pv, tasks), binary_metrics(y, pr, tasks)
    return {
        "labelled": int(len(y)),
        "metrics": {t: {"auc": mv[t]["auc"], "logloss": mv[t]["logloss"], "torch_auc": mr[t]["auc"],
                        "torch_logloss": mr[t]["logloss"], "delta_auc": mv[t]["auc"] - mr[t]["auc"],
                        "delta_logloss": mv[t]["logloss"] - mr[t]["logloss"]} for t in tasks},
        "ranking": {"top10_overlap_mean": float(np.mean(overlaps)), "top10_overlap_min": float(np.min(overlaps)),
                    "kendall_tau_mean": float(np.mean(taus)), "kendall_tau_min": float(np.min(taus))},
        "max_abs_logit_error": worst,
    }


def write_quality(build: str | Path, variant: str, **kw: Any) -> dict[str, Any]:
    from onetrans_trt.io import atomic_write_json
    from onetrans_trt.variants import SUBDIR

    report = evaluate_variant(build, variant, **kw)
    sub = Path(build) / (SUBDIR[variant] or ".")
    atomic_write_json(sub / "quality.json", report)
    return report
