"""The verdict's checks (validate/checks.py) and the text validate prints (validate/summary.py):
each failed check named with its value and limit, delta AUC judged only on enough labels (both
sides of the threshold), no report named that was not written, skipped backends with their
reason. Pure functions on hand-made summaries: milliseconds."""

from __future__ import annotations

import math

import pytest

from onetrans_trt.validate import checks as ck
from onetrans_trt.validate.policy import DEFAULT_POLICY, within
from onetrans_trt.validate.summary import MAX_REASONS, failure_message, summary_lines

FP32, FP16, INT8 = DEFAULT_POLICY["fp32"], DEFAULT_POLICY["fp16"], DEFAULT_POLICY["int8"]


def _stat(max_abs=0.0, ref=1.0, cosine=1.0, nan=0, inf=0, shape=None):
    return {"max_abs": max_abs, "ref_max_abs": ref, "cosine": cosine, "nan": nan, "inf": inf,
            "shape_mismatch": shape, "mean_abs": max_abs / 2, "p99_abs": max_abs, "max_rel": 0.0, "count": 4}


def _by_name(checks):
    return {c["name"]: c for c in checks}


# ------------------------------------------------------------------ graph checks

def test_graph_checks_pass_and_name_the_output_closest_to_its_limit():
    tol = {"atol": 1e-3, "rtol": 1e-3, "min_cosine": 0.99}
    outs = {"user_encoder.user_k_0": _stat(5e-4, ref=1.0),        # limit 2e-3: ratio 0.25
            "candidate_scorer.logits": _stat(3e-3, ref=9.0, cosine=0.995)}  # limit 1e-2: ratio 0.3
    c = _by_name(ck.graph_checks(outs, tol))
    assert list(c) == ["nan_inf", "max_error", "cosine"]
    assert all(x["passed"] is True for x in c.values()) and ck.verdict_of(list(c.values())) == "pass"
    m = c["max_error"]
    assert m["output"] == "candidate_scorer.logits" and m["value"] == 3e-3 and m["limit"] == pytest.approx(1e-2)
    assert m["reason"] == ("max |error| 0.003 <= 0.01 at candidate_scorer.logits (atol 0.001 + rtol 0.001 x "
                           "max |ref| 9)")
    assert c["cosine"] == {"name": "cosine", "value": 0.995, "limit": 0.99, "passed": True, "output":
                           "candidate_scorer.logits", "reason": "cosine 0.995000 >= 0.99 at candidate_scorer.logits"}
    assert c["nan_inf"] == {"name": "nan_inf", "value": 0, "limit": 0, "passed": True,
                            "reason": "no NaN or Inf in any output"}


def test_a_failed_max_error_names_value_limit_and_output():
    tol = {"atol": 1e-3, "rtol": 0.0, "min_cosine": 0.0}
    outs = {"a.x": _stat(2e-3), "b.y": _stat(1e-3), "c.z": _stat(0.5e-3)}  # only a.x is past 1e-3 (inclusive bar)
    c = _by_name(ck.graph_checks(outs, tol))
    m = c["max_error"]
    assert (m["passed"], m["value"], m["limit"], m["output"]) == (False, 2e-3, 1e-3, "a.x")
    assert m["reason"] == "max |error| 0.002 > 0.001 at a.x (atol 0.001 + rtol 0 x max |ref| 1)"
    assert ck.failed(list(c.values())) == [m] and ck.verdict_of(list(c.values())) == "fail"
    assert ck.graph_checks({"b.y": _stat(1e-3)}, tol)[1]["passed"] is True  # exactly at the bar passes


def test_a_zero_limit_with_an_error_is_the_worst():
    tol = {"atol": 0.0, "rtol": 0.0, "min_cosine": 0.0}
    c = _by_name(ck.graph_checks({"a.x": _stat(0.0, ref=0.0), "b.y": _stat(1e-9, ref=0.0)}, tol))
    assert c["max_error"]["output"] == "b.y" and c["max_error"]["passed"] is False
    c = _by_name(ck.graph_checks({"a.x": _stat(0.0, ref=0.0)}, tol))
    assert c["max_error"]["passed"] is True and c["max_error"]["value"] == 0.0


def test_cosine_nan_inf_and_shape_fail_with_their_reason():
    tol = {"atol": 1.0, "rtol": 0.0, "min_cosine": 0.999}
    outs = {"a.x": _stat(cosine=0.9989), "b.y": _stat(nan=2, inf=1), "c.z": _stat(shape="[2] vs reference [3]")}
    c = _by_name(ck.graph_checks(outs, tol))
    assert list(c) == ["shape", "nan_inf", "max_error", "cosine"]
    assert c["shape"] == {"name": "shape", "value": None, "limit": None, "passed": False,
                          "reason": "c.z: shape [2] vs reference [3]"}
    assert (c["nan_inf"]["value"], c["nan_inf"]["passed"], c["nan_inf"]["reason"]) == (3, False, "b.y: 2 NaN, 1 Inf")
    assert c["cosine"]["passed"] is False and c["cosine"]["reason"] == "cosine 0.998900 < 0.999 at a.x"
    assert c["max_error"]["passed"] is True


@pytest.mark.parametrize("stat", [_stat(), _stat(2e-4), _stat(1e-4), _stat(cosine=0.9), _stat(nan=1), _stat(inf=1),
                                  _stat(shape="[1] vs reference [2]"), _stat(5e-5, ref=0.5)])
def test_graph_checks_agree_with_within(stat):
    """The checks hold exactly when `within` does (the verdict did not change, only its words)."""
    tol = {"atol": 1e-4, "rtol": 1e-4, "min_cosine": 0.99}
    assert (ck.verdict_of(ck.graph_checks({"g.o": stat}, tol)) == "pass") == within(stat, tol)


def test_no_outputs_only_counts_nan():
    assert ck.graph_checks({}, FP32) == [ck.check("nan_inf", 0, 0, True, "no NaN or Inf in any output")]


# ------------------------------------------------------------------ delta AUC and the sample size

def test_min_auc_pairs():
    assert ck.AUC_MIN_REORDERED_PAIRS == 10
    assert ck.min_auc_pairs(FP32["max_delta_auc"]) == 20_000 and ck.min_auc_pairs(FP16["max_delta_auc"]) == 20_000
    assert ck.min_auc_pairs(INT8["max_delta_auc"]) == 3_334  # 10 / 0.003 = 3333.3
    assert ck.min_auc_pairs(0.1) == 100 and ck.min_auc_pairs(0.0) == 1 and ck.min_auc_pairs(-1.0) == 1


def test_the_issue_sample_is_not_judged():
    """`validate --count 5`: love dAUC 0.00057 on 125 labels (12 positives) against 0.0005 was a
    FAIL; one reordered pair there moves the AUC by 1/1356 = 0.00074, more than the limit."""
    c = ck.auc_check("love", 0.00057, 12, 113, 0.0005)
    assert c["passed"] is None and c["value"] == 0.00057 and c["limit"] == 0.0005
    assert (c["task"], c["pairs"], c["min_pairs"]) == ("love", 1356, 20_000)
    assert c["reason"] == ("delta AUC love not judged: 125 labels (12 positives x 113 negatives = 1,356 pairs) are "
                           "too few for max_delta_auc 0.0005; it needs >= 20,000 pairs (one reordered pair moves the "
                           "AUC by 0.00074; the limit must span 10)")
    assert ck.verdict_of([c]) == "pass" and ck.failed([c]) == []


@pytest.mark.parametrize("pos,neg,judged", [(100, 199, False), (100, 200, True), (1, 19_999, False),
                                            (1, 20_000, True), (200, 100, True)])
def test_both_sides_of_the_threshold(pos, neg, judged):
    c = ck.auc_check("like", 0.0006, pos, neg, 0.0005)
    assert c["pairs"] == pos * neg
    if judged:
        assert c["passed"] is False
        assert c["reason"] == (f"delta AUC like +0.00060: |0.00060| > 0.0005 ({pos + neg} labels, {pos * neg:,} "
                               "pairs)")
        assert ck.auc_check("like", -0.0005, pos, neg, 0.0005)["passed"] is True  # inclusive, either sign
        assert ck.auc_check("like", -0.00051, pos, neg, 0.0005)["passed"] is False
    else:
        assert c["passed"] is None and "not judged" in c["reason"] and "needs >= 20,000 pairs" in c["reason"]


def test_int8_needs_fewer_pairs():
    assert ck.auc_check("like", 0.004, 30, 111, 0.003)["passed"] is None     # 3,330 pairs
    assert ck.auc_check("like", 0.004, 30, 112, 0.003)["passed"] is False    # 3,360 pairs


def test_one_class_only_is_not_judged():
    c = ck.auc_check("love", math.nan, 0, 250, 0.0005)
    assert c["passed"] is None and c["value"] is None and c["pairs"] == 0
    assert c["reason"] == ("delta AUC love not judged: 250 labels with 0 positives have no positive-negative pair "
                           "(AUC needs both classes)")


def test_a_zero_or_negative_limit_is_judged_on_any_pair():
    assert ck.auc_check("like", 0.0, 1, 1, 0.0)["passed"] is True
    assert ck.auc_check("like", 1e-9, 1, 1, 0.0)["passed"] is False
    assert ck.auc_check("like", 0.0, 3, 4, -1.0)["passed"] is False


def test_no_labels():
    c = ck.no_labels_check(0.0005)
    assert c == {"name": "delta_auc", "value": None, "limit": 0.0005, "passed": None,
                 "reason": "delta AUC not judged: the requests carry no labels"}


# ------------------------------------------------------------------ ranking checks

def test_ranking_checks():
    tol = {"min_top10_overlap": 0.9}
    top, tau = ck.ranking_checks(0.9, 0.5, 7, tol)
    assert top == {"name": "top10_overlap", "value": 0.9, "limit": 0.9, "passed": True,
                   "reason": "top-10 overlap 0.900 >= 0.9 (mean over 7 requests)"}
    assert tau == {"name": "kendall_tau", "value": 0.5, "limit": None, "passed": None,
                   "reason": "Kendall tau 0.500 (mean over 7 requests; reported, not judged: the policy sets no "
                             "min_kendall_tau)"}
    top, tau = ck.ranking_checks(0.85, 0.7, 3, {**tol, "min_kendall_tau": 0.8})
    assert top["passed"] is False and top["reason"] == "top-10 overlap 0.850 < 0.9 (mean over 3 requests)"
    assert tau["passed"] is False and tau["limit"] == 0.8
    assert tau["reason"] == "Kendall tau 0.700 < 0.8 (mean over 3 requests)"
    assert ck.ranking_checks(1.0, 0.8, 3, {**tol, "min_kendall_tau": 0.8})[1]["passed"] is True
    assert ck.ranking_checks(None, None, 0, tol) == [ck.check(
        "top10_overlap", None, 0.9, None, "top-10 overlap not judged: no request has candidates")]


def test_error_check():
    assert ck.error_check("RuntimeError: boom") == {"name": "error", "value": None, "limit": None, "passed": False,
                                                    "reason": "the backend raised RuntimeError: boom"}


# ------------------------------------------------------------------ the summary

def _backend(verdict, checks, divergence=None, metrics=None, **kw):
    return {"verdict": verdict, "checks": checks, "divergence": divergence,
            "graphs": {"user_encoder": {"user_k_0": {**_stat(0.00136), "pass": True}}},
            "end_to_end": {"metrics": metrics} if metrics else {}, **kw}


def _report(backends, skipped=None, **kw):
    r = {"verdict": "fail" if any(b["verdict"] == "fail" for b in backends.values()) else "pass",
         "requests": {"count": 5, "source": "ml-100k test requests (5 requests)"}, "backends": backends, **kw}
    if skipped is not None:
        r["skipped"] = skipped
    return r


def test_the_count_5_summary_says_the_sample_is_too_small():
    small = ck.auc_check("love", 0.00057, 12, 113, 0.0005)
    ok = ck.auc_check("like", 0.0, 200, 300, 0.0005)
    rep = _report({"torch-split": _backend("pass", [ok, small]), "ort-fp16": _backend("pass", [ok, small])},
                  skipped={"trt": "TensorRT is not usable here (X)", "trt-fp16": "TensorRT is not usable here (X)",
                           "ort-int8": "no int8/candidate_scorer.onnx; run `onetrans-trt calibrate B`"})
    lines = summary_lines(rep)
    assert lines == [
        "verdict: PASS (5 requests; data: ml-100k test requests (5 requests))",
        "  torch-split  PASS  max |error| 0.00136",
        "  ort-fp16     PASS  max |error| 0.00136",
        f"  torch-split, ort-fp16: {small['reason']}",
        "  skipped trt, trt-fp16: TensorRT is not usable here (X)",
        "  skipped ort-int8: no int8/candidate_scorer.onnx; run `onetrans-trt calibrate B`",
    ]
    assert not any("report" in x for x in lines)


def test_a_failed_check_is_named_with_value_and_limit():
    bad = ck.auc_check("love", 0.00057, 200, 300, 0.0005)
    top = ck.ranking_checks(0.5, 0.9, 5, {"min_top10_overlap": 0.9})
    rep = _report({"ort-fp16": _backend("fail", [bad, *top], metrics={"love": {"delta_auc": 0.00057}})})
    lines = summary_lines(rep)
    assert lines[1] == "  ort-fp16     FAIL  max |error| 0.00136  delta AUC love +0.00057"
    assert lines[2] == "    failed: delta AUC love +0.00057: |0.00057| > 0.0005 (500 labels, 60,000 pairs)"
    assert lines[3] == "    failed: top-10 overlap 0.500 < 0.9 (mean over 5 requests)"
    assert lines[4] == "    first divergence: none found (no graph tensor out of tolerance in the request searched)"
    assert len(lines) == 5  # the unjudged Kendall tau (no limit) is not a "not judged" line
    msg = failure_message(rep)
    assert msg == ("validation failed: ort-fp16: delta AUC love +0.00057: |0.00057| > 0.0005 (500 labels, 60,000 "
                   "pairs); top-10 overlap 0.500 < 0.9 (mean over 5 requests)")
    assert "report" not in msg and "see" not in msg


def test_no_report_is_named_unless_written():
    rep = _report({"ort": _backend("fail", [ck.error_check("ValueError: x")], error="ValueError: x",
                                   divergence={"layer": 1, "module": "layers.1.k", "node": "n", "role": "user_encoder",
                                               "max_abs": 0.5})})
    lines = summary_lines(rep, [None, None])
    assert not any("report" in x for x in lines)
    assert lines[2:] == ["    failed: the backend raised ValueError: x",
                         "    first divergence: layer 1, layers.1.k (node n, user_encoder), max |error| 0.5"]
    assert summary_lines(rep, ["r.json", None])[-1] == "report: r.json"
    assert summary_lines(rep, [None, "r.html"])[-1] == "report: r.html"
    assert summary_lines(rep, ["r.json", "r.html"])[-2:] == ["report: r.json", "report: r.html"]
    assert "report" not in failure_message(rep)


def test_divergence_notes_and_goldens():
    note = {"note": "divergence search needs ONNX graphs; torch-split has none"}
    fail = [ck.check("max_error", 1.0, 0.1, False, "max |error| 1 > 0.1 at a.x")]
    rep = _report({"torch-split": _backend("fail", fail, divergence=note)})
    assert summary_lines(rep)[-1] == ("    first divergence: not searched (divergence search needs ONNX graphs; "
                                      "torch-split has none)")
    gold = _report({"ort": _backend("fail", fail)}, goldens="g/")
    assert summary_lines(gold)[-1] == "    failed: max |error| 1 > 0.1 at a.x"  # goldens search no divergence
    shape = {"layer": 0, "module": "m", "node": "n", "role": "r", "max_abs": 1.0, "shape_mismatch": "[1] vs [2]"}
    assert summary_lines(_report({"ort": _backend("fail", fail, divergence=shape)}))[-1].endswith(", shape [1] vs [2]")


def test_the_failure_message_is_capped_per_backend():
    many = [ck.check("x", 1, 0, False, f"r{i}") for i in range(MAX_REASONS + 2)]
    rep = _report({"a": _backend("fail", many), "b": _backend("pass", []), "c": _backend("fail", many[:1])})
    assert MAX_REASONS == 3
    assert failure_message(rep) == "validation failed: a: r0; r1; r2 (and 2 more) | c: r0"
    assert failure_message(_report({"a": _backend("fail", [])})) == "validation failed: a: failed"


def test_a_report_without_checks_or_skipped_still_summarizes():
    """Reports from before the checks (or hand-made ones) have no checks/skipped keys."""
    b = {"verdict": "pass", "graphs": {}, "end_to_end": {}}
    assert summary_lines(_report({"ort": b})) == ["verdict: PASS (5 requests; data: ml-100k test requests (5 requests))",
                                                  "  ort          PASS  max |error| 0"]


def test_the_html_report_lists_the_checks_and_the_skipped():
    from onetrans_trt.validate.report import render_html

    checks = [ck.check("max_error", 1.0, 0.1, False, "max |error| 1 > 0.1 at a.<x>"),
              ck.check("top10_overlap", 1.0, 0.9, True, "top-10 overlap 1.000 >= 0.9 (mean over 2 requests)"),
              ck.no_labels_check(0.0005)]
    rep = _report({"ort": {**_backend("fail", checks), "precision": "fp32", "tolerance": {"atol": 1, "rtol": 1}}},
                  skipped={"trt": "TensorRT is not usable <here>"}, build="b", created="now")
    lines = render_html(rep).split("\n")
    from onetrans_trt.validate.report import WHAT_TO_DO

    todo = WHAT_TO_DO["max_error"].replace("<", "&lt;").replace(">", "&gt;")
    assert ("<ul class='checks'><li class='fail'>FAILED: max |error| 1 &gt; 0.1 at a.&lt;x&gt;"
            f"<div class='todo'>What to do: {todo}</div></li>"
            "<li class='pass'>ok: top-10 overlap 1.000 &gt;= 0.9 (mean over 2 requests)</li>"
            "<li class=''>not judged: delta AUC not judged: the requests carry no labels</li></ul>") in lines
    assert lines[-2:] == ["<p class='skipped'>Skipped trt: TensorRT is not usable &lt;here&gt;</p>", "</body></html>"]
    without = render_html(_report({"ort": {**_backend("pass", []), "precision": "fp32",
                                           "tolerance": {"atol": 1, "rtol": 1}}}, build="b"))
    assert "class='checks'" not in without and "skipped" not in without
