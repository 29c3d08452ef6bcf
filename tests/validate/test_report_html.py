"""The HTML report read without a browser (always runs; the Chromium screenshot in
test_validate.py is the extra check where Chromium exists): `validate --json --html` on a
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
    for i, name in enumerate(plotted):
        plot = rep["plots"][name]
        check_histogram(svgs[2 * i], plot["histogram"]["counts"], name)
        check_scatter(svgs[2 * i + 1], *plot["scatter"], name)


def check_histogram(svg: ET.Element, counts: list[float], name: str) -> None:
    """One bar per bin, each as tall as its count relative to the largest (heights are
    printed to 0.1 px: the tolerance)."""
    bars = svg.findall(f"{SVG}rect")
    assert len(bars) == len(counts) and sum(counts) > 0, (name, len(bars), len(counts))
    heights = np.array([float(r.get("height")) for r in bars])
    top = heights.max()
    assert top > 0
    np.testing.assert_allclose(heights / top, np.asarray(counts, float) / max(counts), atol=0.1 / top + 1e-9,
                               err_msg=name)
    xs = [float(r.get("x")) for r in bars]
    assert xs == sorted(xs), name  # bins left to right


def check_scatter(svg: ET.Element, ref: list[float], got: list[float], name: str) -> None:
    """One point per logit; x is an increasing affine function of the PyTorch logit, y a
    decreasing one of the backend's, on one scale (coordinates printed to 0.1 px)."""
    pts = svg.findall(f"{SVG}circle")
    assert len(pts) == len(ref) == len(got) > 2, (name, len(pts), len(ref))
    cx = np.array([float(p.get("cx")) for p in pts])
    cy = np.array([float(p.get("cy")) for p in pts])
    ref_a, got_a = np.asarray(ref), np.asarray(got)
    span = max(ref_a.max(), got_a.max()) - min(ref_a.min(), got_a.min())
    assert span > 0, name
    for coord, vals, sign in ((cx, ref_a, 1), (cy, got_a, -1)):
        slope, icpt = np.polyfit(vals, coord, 1)
        assert sign * slope > 0, (name, slope)
        assert np.abs(coord - (slope * vals + icpt)).max() <= 0.06, name  # rounding to 0.1 px only
    sx = np.polyfit(ref_a, cx, 1)[0]
    sy = np.polyfit(got_a, cy, 1)[0]
    assert sx == pytest.approx(-sy, rel=1e-3), name  # one scale for both axes (the diagonal is y = x)


def _validate(build: Path, tmp: Path, *args) -> tuple[int, dict, str]:
    rj, rh = tmp / "r.json", tmp / "r.html"
    r = CliRunner().invoke(cli, ["validate", str(build), *map(str, args), "--json", str(rj), "--html", str(rh)])
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
        "point": re.sub(r'cx="([0-9.]+)"', lambda m: f'cx="{float(m.group(1)) + 3:.1f}"', text, count=1),
        "svg": text.replace("/>", ">", 1),
    }
    for what, bad in plants.items():
        assert bad != text, what
        with pytest.raises((AssertionError, ET.ParseError)):
            check_page_against_report(bad, rep)
