"""The pure parts of ``onetrans_trt.validate`` tested directly and fast: error statistics,
the tolerance policy, where a failing node is, and the report's plots. (tests/validate/ runs
whole builds; at minutes per run it is too slow to repeat per mutant.)"""

from __future__ import annotations

import json
import math
import re
import xml.etree.ElementTree as ET

import numpy as np
import onnx
import pytest
from onnx import helper

from onetrans_trt.errors import InputError
from onetrans_trt.validate import compare
from onetrans_trt.validate.compare import ErrorStats
from onetrans_trt.validate.diverge import failing_node, layer_of
from onetrans_trt.validate.policy import DEFAULT_POLICY, KEYS, load_policy, precision_of, within
from onetrans_trt.validate.report import _svg_histogram, _svg_scatter


# ---- compare ---------------------------------------------------------------------------------

def test_error_stats_summary_by_hand():
    s = ErrorStats("logits")
    s.add(np.array([1.0, 2.0, 4.0]), np.array([1.0, 2.5, 2.0]))
    s.add(np.array([[0.0]]), np.array([[-1.0]]))
    got = s.summary()
    err = np.array([0.0, 0.5, 2.0, 1.0])
    a = np.array([1.0, 2.0, 4.0, 0.0])
    r = np.array([1.0, 2.5, 2.0, -1.0])
    assert got["name"] == "logits" and got["count"] == 4
    assert got["max_abs"] == 2.0 and got["mean_abs"] == pytest.approx(err.mean(), abs=0)
    assert got["max_rel"] == 1.0  # 2.0 / |2.0| and 1.0 / |-1.0|
    assert got["ref_max_abs"] == 2.5
    assert got["p99_abs"] == pytest.approx(float(np.percentile(err, 99)), abs=0)
    assert got["cosine"] == pytest.approx(float(a @ r / np.sqrt((a @ a) * (r @ r))), rel=1e-15)
    assert (got["nan"], got["inf"], got["shape_mismatch"]) == (0, 0, None)


def test_error_stats_nan_inf_are_counted_and_zeroed():
    s = ErrorStats("x")
    s.add(np.array([np.nan, np.inf, -np.inf, 1.0]), np.array([1.0, 1.0, 1.0, 1.0]))
    got = s.summary()
    assert (got["nan"], got["inf"]) == (1, 2)
    assert got["max_abs"] == 1.0 and got["mean_abs"] == 0.75  # non-finite values count as 0
    assert got["max_rel"] == 1.0


def test_relative_error_floor_and_shape_mismatch():
    s = ErrorStats("x")
    s.add(np.array([1e-3]), np.array([0.0]))
    assert s.summary()["max_rel"] == pytest.approx(1e-3 / 1e-6)
    s.add(np.zeros((2, 3)), np.zeros((3, 2)))
    assert s.summary()["shape_mismatch"] == "[2, 3] vs reference [3, 2]"
    assert s.count == 1  # the mismatching pair was not accumulated


def test_cosine_edge_cases():
    z = ErrorStats("z")
    z.add(np.zeros(3), np.zeros(3))
    assert z.summary()["cosine"] == 1.0  # both zero: identical
    one = ErrorStats("o")
    one.add(np.zeros(3), np.ones(3))
    assert one.summary()["cosine"] == 0.0
    other = ErrorStats("o2")
    other.add(np.ones(3), np.zeros(3))
    assert other.summary()["cosine"] == 0.0
    neg = ErrorStats("n")
    neg.add(-np.ones(3), np.ones(3))
    assert neg.summary()["cosine"] == -1.0


def test_empty_stats():
    s = ErrorStats("e")
    got = s.summary()
    assert got["count"] == 0 and got["mean_abs"] == 0.0 and got["p99_abs"] == 0.0 and got["cosine"] == 1.0
    s.add(np.zeros(0), np.zeros(0))
    assert s.max_abs == 0.0 and s.count == 0
    # (summary() after only empty pairs raises IndexError in np.percentile: reported, not pinned)


def test_error_sample_is_bounded_and_pairs_are_kept_on_request(monkeypatch):
    monkeypatch.setattr(compare, "SAMPLE", 5)
    s = ErrorStats("x")
    s.add(np.arange(4.0), np.zeros(4))
    s.add(np.arange(8.0), np.zeros(8), keep_pairs=True)
    s.add(np.arange(3.0), np.zeros(3))
    assert [e.size for e in s.errors] == [4, 5]  # the second capped at SAMPLE; then full: no more
    assert len(s.pairs) == 1 and s.pairs[0][0].tolist() == list(range(8)) and s.pairs[0][1].shape == (8,)
    assert s.count == 15 and s.max_abs == 7.0


def test_histogram_of_log10_errors():
    s = ErrorStats("x")
    s.add(np.array([1e-3, 1e-3, 1.0, 0.0]), np.zeros(4))
    h = s.histogram(bins=14)
    assert h["log10_edges"] == np.linspace(-12, 2, 15).tolist()
    counts = h["counts"]
    assert sum(counts) == 4 and counts[0] == 1  # the zero error is floored at 1e-12
    assert counts[9] == 2 and counts[12] == 1  # 1e-3 in [-3, -2), 1 in [0, 1)
    assert ErrorStats("e").histogram(bins=14)["counts"][0] == 1  # empty: one zero


# ---- policy ----------------------------------------------------------------------------------

def test_precision_of():
    assert [precision_of(b) for b in ("ort", "ort-fp16", "trt-int8", "trt", "fp16-ort", "ort-int8-cpu",
                                      "ort-int8-qdq", "ort-unified", "torch-split")] == \
        ["fp32", "fp16", "int8", "fp32", "fp32", "int8", "int8", "fp32", "fp32"]


def test_default_policy_is_a_copy():
    p = load_policy(None)
    assert p == DEFAULT_POLICY and p is not DEFAULT_POLICY
    p["fp32"]["atol"] = 1.0
    assert DEFAULT_POLICY["fp32"]["atol"] == 1e-4
    assert KEYS == {"atol", "rtol", "min_cosine", "max_delta_auc", "min_top10_overlap", "min_kendall_tau"}
    assert all("min_kendall_tau" not in p for p in DEFAULT_POLICY.values())  # optional: reported unless set


def test_policy_overrides(tmp_path):
    p = tmp_path / "p.json"
    p.write_text(json.dumps({"fp16": {"atol": 1, "min_cosine": 0}}))
    got = load_policy(p)
    assert got["fp16"]["atol"] == 1.0 and isinstance(got["fp16"]["atol"], float) and got["fp16"]["min_cosine"] == 0.0
    assert got["fp16"]["rtol"] == DEFAULT_POLICY["fp16"]["rtol"] and got["fp32"] == DEFAULT_POLICY["fp32"]
    assert DEFAULT_POLICY["fp16"]["atol"] == 2e-2


@pytest.mark.parametrize("content,msg", [
    ("[]", "expected an object of precisions"),
    ('{"bf16": {}}', "unknown precision 'bf16'; known: ['fp16', 'fp32', 'int8']"),
    ('{"fp32": 1}', "fp32 must be an object"),
    ('{"int8": {"atol": 1, "zz": 2, "aa": 3}}',
     "unknown keys ['aa', 'zz'] in int8; known: ['atol', 'max_delta_auc', 'min_cosine', 'min_kendall_tau', 'min_top10_overlap', 'rtol']"),
    ('{"fp32": {"atol": -1}}', "fp32.atol must be a finite non-negative number"),
    ('{"fp32": {"atol": true}}', "fp32.atol must be a finite non-negative number"),
    ('{"fp32": {"rtol": "1"}}', "fp32.rtol must be a finite non-negative number"),
    ('{"fp32": {"rtol": 1e999}}', "fp32.rtol must be a finite non-negative number"),
])
def test_policy_errors(tmp_path, content, msg):
    p = tmp_path / "p.json"
    p.write_text(content)
    with pytest.raises(InputError) as e:
        load_policy(p)
    assert str(e.value) == f"{p}: {msg}"


def test_policy_file_errors(tmp_path):
    for path, msg in [(tmp_path / "none.json", "no such policy file")]:
        with pytest.raises(InputError, match=re.escape(f"{path}: {msg}")):
            load_policy(path)
    bad = tmp_path / "bad.json"
    bad.write_text("{" + " " * 300)
    with pytest.raises(InputError) as e:
        load_policy(bad)
    assert str(e.value).startswith(f"{bad}: not valid JSON (Expecting property name")
    d = tmp_path / "dir"
    d.mkdir()
    with pytest.raises(InputError) as e:
        load_policy(d)
    assert str(e.value) == f"{d}: cannot read (Is a directory)"
    giant = tmp_path / "giant.json"  # the int/str digit limit: a ValueError inside json.loads, was a traceback
    giant.write_text('{"fp32": {"atol": ' + "9" * 5000 + "}}")
    with pytest.raises(InputError) as e:
        load_policy(giant)
    assert str(e.value).startswith(f"{giant}: not valid JSON (Exceeds the limit")
    zero = tmp_path / "zero.json"
    zero.write_text('{"fp32": {"atol": 0}}')
    assert load_policy(zero)["fp32"]["atol"] == 0.0  # zero is allowed


def test_within():
    tol = {"atol": 0.1, "rtol": 0.5, "min_cosine": 0.9}
    base = {"shape_mismatch": None, "nan": 0, "inf": 0, "max_abs": 1.1, "ref_max_abs": 2.0, "cosine": 0.9}
    assert within(base, tol)  # 1.1 <= 0.1 + 0.5 * 2 and cosine at its minimum: both inclusive
    assert not within({**base, "max_abs": 1.1000001}, tol)
    assert not within({**base, "cosine": 0.8999}, tol)
    assert not within({**base, "nan": 1}, tol)
    assert not within({**base, "inf": 1}, tol)
    assert not within({**base, "shape_mismatch": "[1] vs reference [2]"}, tol)
    assert within({k: v for k, v in base.items() if k != "shape_mismatch"}, tol)


# ---- diverge ---------------------------------------------------------------------------------

def test_layer_of():
    assert layer_of("layers.3.ns_o") == 3
    assert layer_of("model.layers.12.attn") == 12
    assert layer_of("layers.4") == 4
    assert layer_of("xlayers.3.a") is None
    assert layer_of("user_k_2") == 2 and layer_of("user_v_10") == 10
    assert layer_of("user_k_2x") is None and layer_of("user_q_1") is None and layer_of("embed") is None


def _chain_model():
    nodes = [helper.make_node("Relu", ["x"], ["a"], name="lin"),
             helper.make_node("Neg", ["a"], ["b"], name="glue1"),
             helper.make_node("Abs", ["b"], ["c"], name="glue2"),
             helper.make_node("Relu", ["c"], ["y"], name="bad")]
    vi = helper.make_tensor_value_info
    g = helper.make_graph(nodes, "g", [vi("x", onnx.TensorProto.FLOAT, [1])], [vi("y", onnx.TensorProto.FLOAT, [1])])
    return helper.make_model(g)


def test_failing_node_finds_the_node_and_its_scope():
    msg = "[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Non-zero status code returned while running Relu node. " \
          "Name:'bad' Status Message: boom here"
    got = failing_node(msg, {"bad": "layers.2.ns_o"}, "scorer")
    assert got == {"layer": 2, "module": "layers.2.ns_o", "node": "bad", "tensor": None, "role": "scorer",
                   "max_abs": math.inf, "cosine": 0.0, "shape_mismatch": None, "nan": 0, "inf": 0,
                   "error": "boom here"}
    # a node outside any module takes the nearest module upstream
    got = failing_node(msg, {"lin": "layers.1.q"}, "encoder", _chain_model())
    assert (got["module"], got["layer"], got["node"]) == ("layers.1.q", 1, "bad")
    got = failing_node(msg, {"lin": "layers.1.q", "glue2": "norm"}, "encoder", _chain_model())
    assert (got["module"], got["layer"]) == ("norm", None)  # the nearest one wins
    got = failing_node(msg, {}, "encoder", _chain_model())
    assert (got["module"], got["layer"], got["node"]) == (None, None, "bad")
    got = failing_node("no node named " + "x" * 400, {}, "scorer")
    assert got["node"] is None and got["error"] == ("no node named " + "x" * 400)[:300]


# ---- report plots ----------------------------------------------------------------------------

_NS = "{http://www.w3.org/2000/svg}"


def _boxes(svg: str, prefix: str) -> dict[str, tuple[float, float, float, float]]:
    """x0, x1, y0, y1 of each path in the groups whose id starts with prefix."""
    out = {}
    for g in ET.fromstring(svg).iter(f"{_NS}g"):
        if (g.get("id") or "").startswith(prefix):
            nums = [float(t) for t in re.findall(r"-?[0-9.]+", g.find(f"{_NS}path").get("d"))]
            xs, ys = nums[0::2], nums[1::2]
            out[g.get("id")] = (min(xs), max(xs), min(ys), max(ys))
    return out


def test_histogram_svg():
    svg = _svg_histogram({"counts": [0, 2, 1, 0, 0, 4], "log10_edges": [-12, -10, -8, -6, -4, -2, 0]}, limit=1e-3)
    bars = _boxes(svg, "bar-")
    assert list(bars) == [f"bar-{i}" for i in range(6)]
    heights = [y1 - y0 for _, _, y0, y1 in bars.values()]
    assert heights[0] == heights[3] == heights[4] == 0.0
    assert heights[1] == pytest.approx(2 * heights[2], rel=1e-4) and heights[5] == pytest.approx(4 * heights[2], rel=1e-4)
    lefts = [x0 for x0, _, _, _ in bars.values()]
    assert lefts == sorted(lefts) and all(bars[f"bar-{i}"][1] == pytest.approx(bars[f"bar-{i + 1}"][0]) for i in range(5))
    (x0, x1, _, _), = _boxes(svg, "tolerance").values()
    # log10(1e-3) = -3 sits halfway through the bar for [-4, -2)
    assert x0 == x1 == pytest.approx((bars["bar-4"][0] + bars["bar-4"][1]) / 2, rel=1e-4)
    texts = "".join(ET.fromstring(svg).itertext())
    assert "1e-12" in texts and "1e-2" in texts and "tolerance 0.001" in texts and "scorer logits" in texts
    assert not _boxes(_svg_histogram({"counts": [1, 2], "log10_edges": [0, 1, 2]}), "tolerance")
    empty = _boxes(_svg_histogram({"counts": [0, 0], "log10_edges": [0, 1, 2]}), "bar-")
    assert all(y0 == y1 for _, _, y0, y1 in empty.values())


def test_scatter_svg():
    assert _svg_scatter([], []) == "<p>(no points)</p>"
    svg = _svg_scatter([0.0, 1.0], [1.0, 2.0], limit=0.5, name="trt-fp16")
    groups = {g.get("id"): g for g in ET.fromstring(svg).iter(f"{_NS}g") if g.get("id")}
    assert len(list(groups["points"].iter(f"{_NS}use"))) == 2
    up, down, zero = (_boxes(svg, k)[k] for k in ("tolerance-upper", "tolerance-lower", "zero"))
    assert up[2] == up[3] and down[2] == down[3] and zero[2] == zero[3]  # horizontal lines
    assert up[2] < zero[2] < down[2] and zero[2] - up[2] == pytest.approx(down[2] - zero[2], rel=1e-4)
    texts = "".join(ET.fromstring(svg).itertext())
    assert "trt-fp16 - PyTorch (logit)" in texts and "PyTorch logit (fp32 reference)" in texts


# ---- report HTML -----------------------------------------------------------------------------

def _report():
    stat = {"max_abs": 1.23456e-5, "mean_abs": 2e-6, "p99_abs": 1e-5, "max_rel": 0.5, "cosine": 0.9999996,
            "nan": 0, "inf": 1, "pass": True, "shape_mismatch": None}
    return {
        "verdict": "fail", "build": "b<1>", "created": "2026-01-01",
        "requests": {"count": 7, "source": "ml-100k & more"},
        "backends": {
            "ort": {"verdict": "pass", "precision": "fp32", "tolerance": {"atol": 0.0001, "rtol": 0.0002},
                    "graphs": {"scorer": {"logits": stat}},
                    "end_to_end": {"metrics": {"click": {"auc": 0.75, "torch_auc": 0.7512345, "delta_auc": -0.0012345,
                                                         "delta_logloss": 0.00001}},
                                   "ranking": {"top10_overlap_mean": 0.95, "kendall_tau_mean": 0.875}}},
            "trt-fp16": {"verdict": "fail", "precision": "fp16", "tolerance": {"atol": 0.02, "rtol": 0.02},
                         "graphs": {"encoder": {"user_k_0": {**stat, "pass": False, "shape_mismatch": "[1] vs reference [2]"},
                                                "user_v_0": {**stat, "pass": False}}},
                         "end_to_end": {"ranking": {}},
                         "divergence": {"layer": 0, "module": "layers.0.k"}, "note": "a <note>"},
        },
        "plots": {"ort": {"histogram": {"counts": [1, 2], "log10_edges": [-12, -5, 2]}, "scatter": ([0.0, 1.0], [0.0, 1.0])}},
    }


def test_render_html_shows_every_part_of_the_report():
    from onetrans_trt.validate.report import render_html

    html = render_html(_report())
    lines = html.split("\n")
    assert lines[0] == "<!doctype html><html><head><meta charset='utf-8'><title>onetrans-trt validation</title>"
    assert lines[-1] == "</body></html>"
    expected = [
        "<div id='verdict' class='banner fail'>Verdict: FAIL</div>",
        "<p>Build <code>b&lt;1&gt;</code>; 7 requests from ml-100k &amp; more; created 2026-01-01</p>",
        "<h2>ort <span class='pass'>PASS</span> <small>(fp32; atol 0.0001, rtol 0.0002)</small></h2>",
        "<table><tr><th>graph</th><th>output</th><th>max abs</th><th>mean abs</th><th>p99 abs</th>"
        "<th>max rel</th><th>cosine</th><th>NaN/Inf</th><th>ok</th></tr>",
        "<tr><td>scorer</td><td>logits</td><td>1.23e-05</td><td>2e-06</td><td>1e-05</td><td>0.5</td>"
        "<td>1.000000</td><td>0/1</td><td class='pass'>yes</td></tr>",
        "<table><tr><th>task</th><th>AUC</th><th>PyTorch AUC</th><th>delta</th><th>delta logloss</th></tr>",
        "<tr><td>click</td><td>0.75000</td><td>0.75123</td><td>-0.001234</td><td>+0.000010</td></tr>",
        "<p>Ranking vs PyTorch: top-10 overlap 0.950, Kendall tau 0.875</p>",
        "<h2>trt-fp16 <span class='fail'>FAIL</span> <small>(fp16; atol 0.02, rtol 0.02)</small></h2>",
        "<tr><td>encoder</td><td>user_k_0</td><td>1.23e-05</td><td>2e-06</td><td>1e-05</td><td>0.5</td>"
        "<td>1.000000</td><td>0/1</td><td class='fail'>NO ([1] vs reference [2])</td></tr>",
        "<tr><td>encoder</td><td>user_v_0</td><td>1.23e-05</td><td>2e-06</td><td>1e-05</td><td>0.5</td>"
        "<td>1.000000</td><td>0/1</td><td class='fail'>NO</td></tr>",
        "<p>Ranking vs PyTorch: top-10 overlap 0.000, Kendall tau nan</p>",
        "<p class='fail' id='divergence-trt-fp16'>First divergence: "
        "{&quot;layer&quot;: 0, &quot;module&quot;: &quot;layers.0.k&quot;}</p>",
        "<p><i>a &lt;note&gt;</i></p>",
    ]
    plots = ("<div style='display:flex;gap:24px;flex-wrap:wrap'><div><b>|error| of the scorer logits</b><br>"
             + _svg_histogram({"counts": [1, 2], "log10_edges": [-12, -5, 2]}, 0.0001, "ort")
             + "</div><div><b>ort error vs the PyTorch logit</b><br>" + _svg_scatter([0.0, 1.0], [0.0, 1.0], 0.0001, "ort")
             + "</div></div>")
    # the plots (multi-line SVG; the limit: atol + rtol x 0, no candidate_scorer stats) between ort's ranking line and the trt-fp16 heading
    assert html.index(expected[7]) < html.index(plots) < html.index(expected[8])
    for frag in expected:
        assert frag in lines, frag
    # in this order, and the tables closed
    idx = [lines.index(f) for f in expected]
    assert idx == sorted(idx)
    assert lines.count("</table>") == 3
    assert "style>body{font-family:sans-serif;margin:24px}" in lines[1]
    ok = {**_report(), "verdict": "pass"}
    assert "<div id='verdict' class='banner pass'>Verdict: PASS</div>" in render_html(ok).split("\n")


def test_write_html_and_json(tmp_path):
    from onetrans_trt.validate.report import render_html, write_html, write_json

    write_html(_report(), tmp_path / "r.html")
    assert (tmp_path / "r.html").read_text() == render_html(_report())
    r = {"a": np.float32(0.5), "b": [1, 2]}
    write_json(r, tmp_path / "r.json")
    assert (tmp_path / "r.json").read_text() == json.dumps({"a": 0.5, "b": [1, 2]}, indent=2) + "\n"


def test_counts_accumulate_and_pairs_are_flat():
    s = ErrorStats("x")
    s.add(np.array([[np.nan, np.inf]]), np.ones((1, 2)), keep_pairs=True)
    s.add(np.array([np.nan, -np.inf, np.inf]), np.ones(3))
    assert (s.nan, s.inf) == (2, 3)
    assert s.pairs[0][0].shape == (2,) and s.pairs[0][1].shape == (2,)
    assert s.errors[0].shape == (2,)
    # non-finite values are zeroed for the cosine too
    c = ErrorStats("c")
    c.add(np.array([np.nan, 1.0]), np.array([1.0, 1.0]))
    assert c.summary()["cosine"] == pytest.approx(1 / np.sqrt(2), rel=1e-12)
    # integer inputs are compared as float64 (no wrap-around in the difference)
    i = ErrorStats("i")
    i.add(np.array([0], np.uint8), np.array([1], np.uint8))
    assert i.summary()["max_abs"] == 1.0


def test_sample_cap_is_exclusive(monkeypatch):
    monkeypatch.setattr(compare, "SAMPLE", 4)
    s = ErrorStats("x")
    s.add(np.zeros(4), np.zeros(4))
    s.add(np.zeros(2), np.zeros(2))  # 4 kept already: full
    assert [e.size for e in s.errors] == [4]


def test_small_norms_and_counts():
    s = ErrorStats("x")
    s.add(np.array([0.5]), np.array([0.5]))  # squared norms 0.25: below 1
    assert s.summary()["cosine"] == 1.0
    one = ErrorStats("one")
    one.add(np.array([3.0]), np.array([1.0]))
    assert one.summary()["mean_abs"] == 2.0  # divided by the count, 1
    assert ErrorStats("e").summary()["p99_abs"] == 0.0 and len(ErrorStats("e").histogram()["counts"]) == 30
