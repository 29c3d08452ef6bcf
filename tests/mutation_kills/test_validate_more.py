"""More pins on validate/report.py and validate/module.py found by the mutation run: the page's
style block as written, reports without optional parts, numpy values in a divergence, the scatter
plot's elements back to back, the spec's location in read_spec's errors, the default seed."""

from __future__ import annotations

import json
import shutil
import xml.etree.ElementTree as ET

import numpy as np
import pytest

from onetrans_trt.validate.report import _svg_scatter, render_html
from tests.mutation_kills.test_validate import _report


def test_the_style_block_as_written():
    lines = render_html(_report()).split("\n")
    assert lines[1] == ("<style>body{font-family:sans-serif;margin:24px} table{border-collapse:collapse;margin:8px 0}"
                        "td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px} .pass{color:#1a7f37} "
                        ".fail{color:#cf222e}.banner{font-size:28px;font-weight:bold;padding:12px;border-radius:6px}"
                        "</style></head><body>")


def test_a_report_without_its_optional_parts_renders():
    r = _report()
    del r["created"], r["plots"], r["backends"]["ort"]["end_to_end"]
    r["backends"]["trt-fp16"]["divergence"] = {"layer": np.int64(0), "max_abs": np.float32(0.5)}
    lines = render_html(r).split("\n")
    assert "<p>Build <code>b&lt;1&gt;</code>; 7 requests from ml-100k &amp; more; created </p>" in lines
    assert ("<p class='fail' id='divergence-trt-fp16'>First divergence: "
            "{&quot;layer&quot;: &quot;0&quot;, &quot;max_abs&quot;: &quot;0.5&quot;}</p>") in lines
    assert not any("<svg" in ln for ln in lines)


def test_scatter_draws_one_mark_per_point_and_the_tolerance_band():
    svg = ET.fromstring(_svg_scatter([0.0, 1.0, 2.0], [1.0, 2.0, 0.5], limit=0.1))
    groups = {g.get("id"): g for g in svg.iter("{http://www.w3.org/2000/svg}g") if g.get("id")}
    assert len(list(groups["points"].iter("{http://www.w3.org/2000/svg}use"))) == 3
    assert {"zero", "tolerance-upper", "tolerance-lower"} <= set(groups)
    without = ET.fromstring(_svg_scatter([0.0, 1.0], [0.0, 1.0]))
    assert not any(g.get("id", "").startswith("tolerance") for g in without.iter("{http://www.w3.org/2000/svg}g"))


@pytest.fixture(scope="module")
def module_fx():
    from tests.mutation_kills.validate_fixture import example_module, module_build

    return module_build(), example_module()


def test_read_spec_names_where_a_bad_spec_is(module_fx, tmp_path):
    from onetrans_trt.validate.module import read_spec

    build, _ = module_fx
    b = tmp_path / "b"
    shutil.copytree(build, b)
    m = json.loads((b / "manifest.json").read_text())
    m["protocol"]["spec"]["history"] = "long"
    (b / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(Exception) as e:
        read_spec(b)
    assert f"{b}/manifest.json protocol.spec" in str(e.value)


def test_the_default_seed_is_zero(module_fx):
    from onetrans_trt.protocol import SplitSpec
    from onetrans_trt.validate.module import cases, validate_module_build

    build, ex = module_fx
    rep = validate_module_build(build, ex.factory(), count=9)
    want = [n for n, _, _ in cases(SplitSpec.parse(ex.SPEC), 9, seed=0)]
    assert [r["case"] for r in rep["rows"]] == want
    assert want != [n for n, _, _ in cases(SplitSpec.parse(ex.SPEC), 9, seed=1)]
