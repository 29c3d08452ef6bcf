"""Why ``validate`` judges its outputs itself rather than through Polygraphy's comparator
(``Comparator.compare_accuracy`` with ``SimpleCompareFunc(atol={...}, rtol={...})``).

Our policy bounds an output's largest error by its own scale:
``max|a - ref| <= atol + rtol * max|ref|``, over every request at once. Polygraphy's
``simple`` comparison takes the same per-output ``atol``/``rtol`` with other semantics: per
element ``|a - ref| <= atol or |a - ref| / |ref| <= rtol`` (``elemwise``, its default), or
``max|a - ref| <= atol or max(|a - ref| / |ref|) <= rtol`` (``max``), request by request.
Either is never looser than ours and is stricter where an output's error sits at its small
values: the same atol/rtol would turn passing verdicts into failures. Fed our own limit
(``atol = atol + rtol * max|ref|``, ``rtol = 0``, ``max``) it gives our verdict, but then it
only compares two numbers we computed, and every figure of the report (max/mean/p99 abs,
max rel with its 1e-6 floor, cosine, NaN/Inf counts, histogram) still comes from
:class:`~onetrans_trt.validate.compare.ErrorStats`. Polygraphy also logs each comparison to
stdout, where ``validate --json`` prints its report.
"""

from __future__ import annotations

import numpy as np
import pytest

from onetrans_trt.validate.compare import ErrorStats
from onetrans_trt.validate.policy import DEFAULT_POLICY, within

polygraphy = pytest.importorskip("polygraphy")


def _polygraphy(refs, outs, **kw) -> bool:
    from polygraphy.comparator import Comparator, IterationResult, RunResults, SimpleCompareFunc
    from polygraphy.logger import G_LOGGER

    rr = RunResults()  # the reference second: Polygraphy's relative error is relative to the second runner
    rr.append(("ort", [IterationResult({"out": o}, runner_name="ort") for o in outs]))
    rr.append(("torch", [IterationResult({"out": r}, runner_name="torch") for r in refs]))
    with G_LOGGER.verbosity(G_LOGGER.CRITICAL):
        return bool(Comparator.compare_accuracy(rr, compare_func=SimpleCompareFunc(**kw)))


def _ours(refs, outs, tol) -> tuple[bool, dict]:
    s = ErrorStats("out")
    for r, o in zip(refs, outs):
        s.add(o, r)
    return within(s.summary(), tol), s.summary()


def test_the_same_tolerances_mean_a_stricter_check_in_polygraphy():
    tol = DEFAULT_POLICY["fp32"]  # atol 1e-4, rtol 1e-4
    ref = [np.array([100.0, 0.001], np.float32)]
    out = [np.array([100.0, 0.0015], np.float32)]  # 5e-4 off where the output is small
    ok, stats = _ours(ref, out, tol)
    assert ok and stats["max_abs"] == pytest.approx(5e-4) and 1e-4 + 1e-4 * 100 == pytest.approx(0.0101)
    for stat in ("elemwise", "max"):
        assert not _polygraphy(ref, out, atol={"out": tol["atol"]}, rtol={"out": tol["rtol"]},
                               check_error_stat=stat)


def test_our_verdict_through_polygraphy_needs_our_limit():
    """Random outputs near their reference: Polygraphy agrees with our verdict only when it
    is given our computed limit as its absolute tolerance."""
    rng = np.random.default_rng(0)
    tol = {**DEFAULT_POLICY["fp16"], "min_cosine": -1.0}  # the error bound alone
    agree_plain = agree_limit = 0
    for _ in range(20):
        refs = [rng.normal(scale=rng.choice([0.01, 1, 30]), size=(3, 8)).astype(np.float32) for _ in range(2)]
        outs = [r + rng.normal(scale=rng.choice([1e-3, 1e-2, 0.1]), size=r.shape).astype(np.float32) for r in refs]
        ok, stats = _ours(refs, outs, tol)
        limit = tol["atol"] + tol["rtol"] * stats["ref_max_abs"]
        agree_limit += ok == _polygraphy(refs, outs, atol={"out": limit}, rtol={"out": 0.0}, check_error_stat="max")
        agree_plain += ok == _polygraphy(refs, outs, atol={"out": tol["atol"]}, rtol={"out": tol["rtol"]})
    assert agree_limit == 20 and agree_plain < 15
