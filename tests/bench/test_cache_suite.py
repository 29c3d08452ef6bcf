"""`bench --suite cache`: appending 1 event to a cached user vs a full encode, ORT CPU.

One small run (random ``small`` weights, 3 layers, L = 32): with the preset's linear pyramid
(windows [32, 24, 16]) a window slides at 31 cached + 1 new S-tokens, so the host falls back
to a full encode and says why; with the pyramid off the append is exact. Both are checked
equal to the full encode (real K/V columns, <= 1e-5).
"""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from onetrans_trt.cli import cli

# exports a random `small` model twice (~3 min): make test-heavy; the append itself is proven in
# make test by tests/export/test_append_graph.py and tests/runtime/test_ranker_append.py
pytestmark = pytest.mark.heavy


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("cache") / "res.json"
    r = CliRunner().invoke(cli, ["bench", "--suite", "cache", "--preset", "small", "--history", "32",
                                 "--rounds", "2", "--out", str(out)])
    assert r.exit_code == 0, r.output[-3000:]
    return json.loads(out.read_text()), r.stdout


def test_report_structure_and_equality(result):
    res, _ = result
    assert res["history"] == 32 and res["new_events"] == 1 and res["rounds"] == 2
    assert res["backend"] == "onnxruntime CPU" and res["tolerance"] == 1e-5 and res["target"] == 0.1
    assert [p["pyramid"] for p in res["pyramids"]] == ["linear", "off"]
    for p in res["pyramids"]:
        for side in ("append", "full"):
            assert p[side]["runs"] == 2 and p[side]["p50_ms"] > 0
        assert p["append_over_full"] == pytest.approx(p["append"]["p50_ms"] / p["full"]["p50_ms"])
        assert p["equal"] is True and 0 <= p["max_abs_diff"] <= 1e-5
        assert p["cached_s_tokens"] == 31 and p["reason"]
    assert res["all_equal"] is True


def test_linear_pyramid_slides_and_falls_back(result):
    res, _ = result
    lin = res["pyramids"][0]
    assert lin["windows"] == [32, 24, 16]
    assert lin["exact"] is False and lin["path"] == "fallback: full encode"
    assert "slides" in lin["reason"] and "re-encode" in lin["reason"]
    assert lin["max_abs_diff"] == 0.0 and lin["meets_target"] is False


def test_pyramid_off_appends_exactly(result):
    res, _ = result
    off = res["pyramids"][1]
    assert off["windows"] == [32, 32, 32] and off["schedule"] == [None, None, 0]
    assert off["exact"] is True and off["path"] == "append" and off["new_s_tokens"] == 1


def test_table_says_fallback_ratio_and_equality(result):
    _, text = result
    assert "fallback: full encode" in text and "not exact, fell back to a full encode" in text
    assert "every append equals the full encode (real K/V columns, <= 1e-05): True" in text
