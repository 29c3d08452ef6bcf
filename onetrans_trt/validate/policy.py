"""Tolerance policy per precision, with defaults; a JSON file may override any value.

An output passes when it has no NaN/Inf, ``max|a - ref| <= atol + rtol * max|ref|`` and its
cosine similarity to the reference is at least ``min_cosine``. End to end, ``|delta AUC|``
per task must be at most ``max_delta_auc`` and the mean top-10 overlap with PyTorch at
least ``min_top10_overlap``.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from onetrans_trt.errors import InputError

DEFAULT_POLICY: dict[str, dict[str, float]] = {
    "fp32": {"atol": 1e-4, "rtol": 1e-4, "min_cosine": 0.99999, "max_delta_auc": 0.0005, "min_top10_overlap": 0.95},
    "fp16": {"atol": 2e-2, "rtol": 2e-2, "min_cosine": 0.9995, "max_delta_auc": 0.0005, "min_top10_overlap": 0.9},
    "int8": {"atol": 0.25, "rtol": 0.1, "min_cosine": 0.99, "max_delta_auc": 0.003, "min_top10_overlap": 0.8},
}
KEYS = set(DEFAULT_POLICY["fp32"])


def precision_of(backend: str) -> str:
    for p in ("fp16", "int8"):
        if backend.endswith(p):
            return p
    return "fp32"


def load_policy(path: str | Path | None) -> dict[str, dict[str, float]]:
    policy = copy.deepcopy(DEFAULT_POLICY)
    if path is None:
        return policy
    try:
        raw = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise InputError(f"{path}: no such policy file") from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise InputError(f"{path}: not valid JSON ({str(e)[:120]})") from None
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror or e})") from None
    if not isinstance(raw, dict):
        raise InputError(f"{path}: expected an object of precisions")
    for prec, vals in raw.items():
        if prec not in policy:
            raise InputError(f"{path}: unknown precision {prec!r}; known: {sorted(policy)}")
        if not isinstance(vals, dict):
            raise InputError(f"{path}: {prec} must be an object")
        unknown = set(vals) - KEYS
        if unknown:
            raise InputError(f"{path}: unknown keys {sorted(unknown)} in {prec}; known: {sorted(KEYS)}")
        for k, v in vals.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < float("inf"):
                raise InputError(f"{path}: {prec}.{k} must be a finite non-negative number")
            policy[prec][k] = float(v)
    return policy


def within(stats: dict[str, Any], tol: dict[str, float]) -> bool:
    if stats.get("shape_mismatch") or stats["nan"] or stats["inf"]:
        return False
    return stats["max_abs"] <= tol["atol"] + tol["rtol"] * stats["ref_max_abs"] and stats["cosine"] >= tol["min_cosine"]
