"""Tolerance policy per precision, with defaults; a JSON file may override any value.

An output passes when it has no NaN/Inf, ``max|a - ref| <= atol + rtol * max|ref|`` and its
cosine similarity to the reference is at least ``min_cosine``. End to end, ``|delta AUC|``
per task must be at most ``max_delta_auc`` and the mean top-10 overlap with PyTorch at
least ``min_top10_overlap``; ``|delta AUC|`` is judged only on enough labels (see
:mod:`onetrans_trt.validate.checks`). ``min_kendall_tau`` (no default) also bounds the mean
Kendall tau per request when a policy file sets it.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Annotated, Any

from pydantic import ConfigDict, Field, TypeAdapter, with_config
from typing_extensions import TypedDict

from onetrans_trt.contracts import refused
from onetrans_trt.errors import InputError

DEFAULT_POLICY: dict[str, dict[str, float]] = {
    "fp32": {"atol": 1e-4, "rtol": 1e-4, "min_cosine": 0.99999, "max_delta_auc": 0.0005, "min_top10_overlap": 0.95},
    "fp16": {"atol": 2e-2, "rtol": 2e-2, "min_cosine": 0.9995, "max_delta_auc": 0.0005, "min_top10_overlap": 0.9},
    "int8": {"atol": 0.25, "rtol": 0.1, "min_cosine": 0.99, "max_delta_auc": 0.003, "min_top10_overlap": 0.8},
}
OPTIONAL_KEYS = {"min_kendall_tau"}
KEYS = set(DEFAULT_POLICY["fp32"]) | OPTIONAL_KEYS

_STRICT = ConfigDict(strict=True, extra="forbid")
_Tol = Annotated[float, Field(ge=0, allow_inf_nan=False)]
# a precision's tolerances; what a file leaves out keeps its default
Tolerances = with_config(_STRICT)(TypedDict("Tolerances", dict.fromkeys(sorted(KEYS), _Tol), total=False))
Policy = with_config(_STRICT)(TypedDict("Policy", dict.fromkeys(DEFAULT_POLICY, Tolerances), total=False))
_SAY = {":dict_type": "expected an object of precisions", "dict_type": "{where} must be an object",
        ":extra_forbidden": f"unknown precision {{key!r}}; known: {sorted(DEFAULT_POLICY)}",
        "extra_forbidden": f"unknown keys {{keys}} in {{where}}; known: {sorted(KEYS)}",
        "*": "{where} must be a finite non-negative number"}


def precision_of(backend: str) -> str:
    """The policy a backend is judged by: ``ort-fp16``/``trt-fp16`` fp16; ``ort-int8``,
    ``ort-int8-qdq``, ``ort-int8-cpu``, ``trt-int8`` int8; the others fp32."""
    parts = backend.split("-")
    return parts[1] if len(parts) > 1 and parts[1] in ("fp16", "int8") else "fp32"


def load_policy(path: str | Path | None) -> dict[str, dict[str, float]]:
    policy = copy.deepcopy(DEFAULT_POLICY)
    if path is None:
        return policy
    try:
        raw = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise InputError(f"{path}: no such policy file") from None
    except (ValueError, RecursionError) as e:  # bad JSON or UTF-8, an integer of thousands of digits
        raise InputError(f"{path}: not valid JSON ({str(e)[:120]})") from None
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror or e})") from None
    with refused(InputError, raw, "", _SAY, prefix=f"{path}: "):
        TypeAdapter(Policy).validate_python(raw)
    for prec, vals in raw.items():
        policy[prec].update({k: float(v) for k, v in vals.items()})
    return policy


def within(stats: dict[str, Any], tol: dict[str, float]) -> bool:
    if stats.get("shape_mismatch") or stats["nan"] or stats["inf"]:
        return False
    return stats["max_abs"] <= tol["atol"] + tol["rtol"] * stats["ref_max_abs"] and stats["cosine"] >= tol["min_cosine"]
