"""The HTML report read without a browser (always runs; the Chromium screenshot in
test_validate.py is the extra check where Chromium exists): `validate --json-out --html` on a
passing and on a failing build, then the page is parsed with html.parser (every element
closed in order) and each SVG with xml.etree (well-formed XML), and what it shows is checked
against the JSON report: the verdict banner, one section per backend with its verdict, one
table row per graph output and per task with the report's numbers, and plots whose bars
and points are the report's histogram counts and logits."""

from __future__ import annotations

import json
import re
import shutil
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from onetrans_trt.cli import cli

VOID = {"meta", "br", "img", "input", "link", "hr", "col", "area", "base", "source", "wbr"}
SVG = "{http://www.w3.org/2000/svg}"


class Page(HTMLParser):
    """The report's structure: the verdict banner, and per backend section (an <h2>) its
    verdict and tables (rows of cell texts). Raises on an element closed out of order."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.verdict: dict | None = None
        self.sections: list[dict] = []
        self._text: list[str] | None = None  # text being collected for the open h2 / td / th / banner
        self._what = ""
        self._span = ""

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag not in VOID:
            self.stack.append(tag)
        if tag == "div" and a.get("id") == "verdict":
            self.verdict, self._text, self._what = {"class": a.get("class", "")}, [], "verdict"
        elif tag == "h2":
            self.sections.append({"name": "", "verdict": None, "tables": [], "divergence": False})
            self._text, self._what = [], "h2"
        elif tag == "span" and self._what == "h2":
            self._span = a.get("class", "")
        elif tag == "table":
            self.sections[-1]["tables"].append([])
        elif tag == "tr":
            self.sections[-1]["tables"][-1].append([])
        elif tag in ("td", "th"):
            self._text, self._what = [], "cell"
        elif tag == "p" and (a.get("id") or "").startswith("divergence-"):
            self.sections[-1]["divergence"] = True

    def handle_endtag(self, tag):
        if tag in VOID:
            return
        assert self.stack and self.stack[-1] == tag, f"</{tag}> closes <{self.stack[-1] if self.stack else None}>"
        self.stack.pop()
        text = "".join(self._text or []).strip()
        if tag == "div" and self._what == "verdict":
            self.verdict["text"], self._text, self._what = text, None, ""
        elif tag == "h2" and self._what == "h2":
            name, _, rest = text.partition(" ")
            self.sections[-1].update(name=name, verdict=rest.split()[0], verdict_class=self._span)
            self._text, self._what, self._span = None, "", ""
        elif tag in ("td", "th") and self._what == "cell":
            self.sections[-1]["tables"][-1][-1].append(text)
            self._text, self._what = None, ""

    def handle_data(self, data):
        if self._text is not None:
            self._text.append(data)


def read_page(text: str) -> tuple[Page, list[ET.Element]]:
    page = Page()
    page.feed(text)
    page.close()
    assert page.stack == [], f"unclosed elements: {page.stack}"
    svgs = [ET.fromstring(s) for s in re.findall(r"<svg\b.*?</svg>", text, flags=re.S)]  # raises if malformed
    return page, svgs


def _close(cell: str, value: float, digits: int) -> bool:
    """A cell printed with ``digits`` significant digits (``%.{digits}g``) shows ``value``."""
    return float(cell) == pytest.approx(value, rel=10 ** (1 - digits), abs=1e-300)


def check_page_against_report(text: str, rep: dict) -> None:
    page, svgs = read_page(text)
    want = rep["verdict"].upper()
    assert page.verdict and page.verdict["text"] == f"Verdict: {want}", page.verdict
    assert rep["verdict"] in page.verdict["class"].split()
    assert [s["name"] for s in page.sections] == list(rep["backends"])
    plotted = []
    for sec, (name, b) in zip(page.sections, rep["backends"].items()):
        assert sec["verdict"] == b["verdict"].upper() and sec["verdict_class"] == b["verdict"], (name, sec)
        header, *rows = sec["tables"][0]
        assert header[:3] == ["graph", "output", "max abs"], header
        outs = [(g, o, s) for g, outputs in b["graphs"].items() for o, s in outputs.items()]
        assert [(r[0], r[1]) for r in rows] == [(g, o) for g, o, _ in outs], name
        for r, (g, o, s) in zip(rows, outs):
            where = f"{name} {g}/{o}"
            for cell, key in zip(r[2:6], ("max_abs", "mean_abs", "p99_abs", "max_rel")):
                assert _close(cell, s[key], 3), (where, key, cell, s[key])
            assert float(r[6]) == pytest.approx(s["cosine"], abs=5e-7), where
            assert r[7] == f"{s['nan']}/{s['inf']}", where
            assert r[8].startswith("yes" if s["pass"] else "NO"), where
        metrics = b.get("end_to_end", {}).get("metrics")
        if metrics:
            header, *rows = sec["tables"][1]
            assert header[0] == "task" and [r[0] for r in rows] == list(metrics), name
            for r, m in zip(rows, metrics.values()):
                assert [float(x) for x in r[1:3]] == pytest.approx([m["auc"], m["torch_auc"]], abs=5e-6), name
                assert float(r[3]) == pytest.approx(m["delta_auc"], abs=5e-7), name
        assert sec["divergence"] == bool(b.get("divergence")), name
        if name in rep.get("plots", {}):
            plotted.append(name)
    assert len(svgs) == 2 * len(plotted), (len(svgs), plotted)
    # versions and hashes on top; a "what to do" line under every failed check, none elsewhere
    for k, sha in rep["provenance"]["graphs"].items():
        assert f"<code>{k}</code> sha256 <code>{sha}</code>" in text, k
    assert f"onnxscript {rep['provenance']['versions']['onnxscript']}" in text
    failed = sum(c["passed"] is False for b in rep["backends"].values() for c in b.get("checks", []))
    assert text.count("<div class='todo'>What to do: ") == failed, failed
    for i, name in enumerate(plotted):
        plot, b = rep["plots"][name], rep["backends"][name]
        limit = b["tolerance"]["atol"] + b["tolerance"]["rtol"] * b["graphs"]["candidate_scorer"]["logits"]["ref_max_abs"]
        check_histogram(svgs[2 * i], plot["histogram"]["counts"], name, limit, plot["histogram"]["log10_edges"])
        check_scatter(svgs[2 * i + 1], *plot["scatter"], name, limit)


def _path_points(el: ET.Element) -> np.ndarray:
    """The (x, y) vertices of the first <path> under ``el`` (matplotlib writes ``M x y L x y ... z``)."""
    path = el if el.tag == f"{SVG}path" else el.find(f".//{SVG}path")
    nums = [float(t) for t in re.findall(r"-?[0-9.]+(?:e-?[0-9]+)?", path.get("d"))]
    return np.array(nums).reshape(-1, 2)


def _by_id(svg: ET.Element, gid: str) -> ET.Element | None:
    return next((g for g in svg.iter(f"{SVG}g") if g.get("id") == gid), None)


def _texts(svg: ET.Element) -> list[str]:
    return ["".join(t.itertext()).strip() for t in svg.iter(f"{SVG}text")]


def check_axes(svg: ET.Element, xlabel: str, ylabel: str, name: str) -> None:
    """Both axes drawn, each with at least 3 labelled ticks and its label (units included)."""
    ids = [g.get("id") or "" for g in svg.iter(f"{SVG}g")]
    assert "matplotlib.axis_1" in ids and "matplotlib.axis_2" in ids, name
    for axis in ("xtick_", "ytick_"):
        assert sum(i.startswith(axis) for i in ids) >= 3, (name, axis)
    texts = _texts(svg)
    assert any(xlabel in t for t in texts) and any(ylabel in t for t in texts), (name, texts)
    for t in texts:  # no negative zero printed ("-0.000000", "\u22120.0")
        t = t.replace("\u2212", "-")
        if t.startswith("-") and re.fullmatch(r"-[0-9.]+", t):
            assert float(t) != 0, (name, t)


def check_histogram(svg: ET.Element, counts: list[float], name: str, limit: float | None = None,
                    edges: list[float] | None = None) -> None:
    """One bar per bin, each as tall as its count relative to the largest, left to right; the
    dashed tolerance line where log10(limit) falls on the bins' axis."""
    check_axes(svg, "logit - PyTorch logit|", "scorer logits", name)
    bars = [_by_id(svg, f"bar-{i}") for i in range(len(counts))]
    assert all(b is not None for b in bars) and _by_id(svg, f"bar-{len(counts)}") is None, name
    assert sum(counts) > 0
    pts = [_path_points(b) for b in bars]
    heights = np.array([p[:, 1].max() - p[:, 1].min() for p in pts])
    top = heights.max()
    assert top > 0
    np.testing.assert_allclose(heights / top, np.asarray(counts, float) / max(counts), atol=0.01 / top + 1e-6,
                               err_msg=name)
    xs = np.array([p[:, 0].min() for p in pts])
    assert (np.diff(xs) > 0).all(), name  # bins left to right
    if limit is not None and edges is not None:
        line = _by_id(svg, "tolerance")
        assert line is not None, name
        slope, icpt = np.polyfit(np.asarray(edges[:-1]), xs, 1)
        x_line = _path_points(line)[:, 0]
        assert np.ptp(x_line) < 1e-6 and x_line[0] == pytest.approx(slope * np.log10(limit) + icpt, abs=0.05), name


def check_scatter(svg: ET.Element, ref: list[float], got: list[float], name: str,
                  limit: float | None = None) -> None:
    """One point per logit: x an increasing affine function of the PyTorch logit, y a
    decreasing one of the error (backend - PyTorch); the tolerance band at +-limit, on the
    points' scale."""
    check_axes(svg, "PyTorch logit", "- PyTorch (logit)", name)
    group = _by_id(svg, "points")
    assert group is not None, name
    pts = list(group.iter(f"{SVG}use"))
    assert len(pts) == len(ref) == len(got) > 2, (name, len(pts), len(ref))
    cx = np.array([float(p.get("x")) for p in pts])
    cy = np.array([float(p.get("y")) for p in pts])
    ref_a = np.asarray(ref)
    err = np.asarray(got) - ref_a
    sx, ix = np.polyfit(ref_a, cx, 1)
    assert sx > 0 and np.abs(cx - (sx * ref_a + ix)).max() <= 0.02, name
    zero = _by_id(svg, "zero")
    assert zero is not None, name
    y0 = _path_points(zero)[0, 1]
    if limit is not None:
        up, down = _by_id(svg, "tolerance-upper"), _by_id(svg, "tolerance-lower")
        assert up is not None and down is not None, name
        u, d = _path_points(up), _path_points(down)
        assert np.ptp(u[:, 1]) < 1e-6 and np.ptp(d[:, 1]) < 1e-6, name  # horizontal
        assert d[0, 1] - y0 == pytest.approx(y0 - u[0, 1], abs=0.02) and y0 - u[0, 1] > 0, name  # symmetric
        scale = (y0 - u[0, 1]) / limit  # px per logit of error
        np.testing.assert_allclose(cy, y0 - err * scale, atol=0.02, err_msg=name)  # points on that scale


def _validate(build: Path, tmp: Path, *args) -> tuple[int, dict, str]:
    rj, rh = tmp / "r.json", tmp / "r.html"
    r = CliRunner().invoke(cli, ["validate", str(build), *map(str, args), "--json-out", str(rj), "--html", str(rh)])
    assert rj.is_file() and rh.is_file(), r.output[-2000:]
    return r.exit_code, json.loads(rj.read_text()), rh.read_text()


def test_html_report_of_a_passing_build_shows_the_json_report(tiny_build, tmp_path):
    code, rep, text = _validate(tiny_build, tmp_path, "--data", "ml-100k", "--count", "10",
                                "--backends", "torch-split,ort")
    assert code == 0 and rep["verdict"] == "pass", rep["verdict"]
    assert all("metrics" in b["end_to_end"] for b in rep["backends"].values())  # the AUC tables are checked
    check_page_against_report(text, rep)


def test_html_report_of_a_failing_build_shows_the_json_report(tiny_build, tmp_path):
    b = tmp_path / "b"
    shutil.copytree(tiny_build, b)
    m = onnx.load(str(b / "candidate_scorer.onnx"))  # K and V of layer 1 swapped: a wrong scorer
    for n in m.graph.node:
        n.input[:] = [{"user_k_1": "user_v_1", "user_v_1": "user_k_1"}.get(i, i) for i in n.input]
    onnx.save(m, str(b / "candidate_scorer.onnx"))
    code, rep, text = _validate(b, tmp_path, "--data", "ml-100k", "--count", "6", "--backends", "torch-split,ort")
    assert code != 0 and rep["verdict"] == "fail"
    assert rep["backends"]["ort"]["verdict"] == "fail" and rep["backends"]["torch-split"]["verdict"] == "pass"
    check_page_against_report(text, rep)


def test_the_reader_catches_a_page_that_disagrees_with_its_report(tiny_build, tmp_path):
    """The checks above can fail: a verdict flipped, a row dropped, a point moved, a tag left
    open, each planted in a correct page, is caught."""
    code, rep, text = _validate(tiny_build, tmp_path, "--data", "ml-100k", "--count", "4", "--backends", "ort")
    check_page_against_report(text, rep)
    plants = {
        "verdict": text.replace("Verdict: PASS", "Verdict: FAIL", 1),
        "row": re.sub(r"<tr><td>user_encoder</td>.*?</tr>", "", text, count=1),
        "point": re.sub(r'(id="points">.*?<use [^>]*?) x="([0-9.]+)"',
                        lambda m: f'{m.group(1)} x="{float(m.group(2)) + 3:.3f}"', text, count=1, flags=re.S),
        "tolerance": text.replace('id="tolerance"', 'id="tolerance-gone"', 1),
        "bar": text.replace('id="bar-29"', 'id="bar-30"', 1),
        "svg": text.replace("/>", ">", 1),
    }
    for what, bad in plants.items():
        assert bad != text, what
        try:
            check_page_against_report(bad, rep)
        except (AssertionError, ET.ParseError):
            continue
        pytest.fail(f"the planted defect {what!r} was not caught")
