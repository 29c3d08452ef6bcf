"""`onetrans-trt validate` explains itself: on the tiny random-weight build (cached, see
tests/mutation_kills/validate_fixture.py), `--count 5` says the sample is too small for the
delta AUC checks instead of failing on one reordered pair, a failed check is named with its
value and limit, no report is named unless one was written, skipped backends are listed with
their reason, and `--backends trt` without TensorRT exits 3 in one line, like `rank --backend
trt`. TensorRT is blocked in-process so the outcome is the same on every machine."""

from __future__ import annotations

import json
import sys

import pytest
from click.testing import CliRunner

from onetrans_trt.cli import cli
from tests.mutation_kills.validate_fixture import tiny_random_build


@pytest.fixture(scope="module")
def fx():
    return tiny_random_build()


@pytest.fixture
def no_tensorrt(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` fails, as on a host without it


def _run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_validate_backends_trt_exits_3_like_rank(fx, no_tensorrt):
    b = fx / "build"
    rank = _run("rank", b, "--request", fx / "requests.json", "--backend", "trt")
    val = _run("validate", b, "--requests", fx / "requests.json", "--ckpt", fx / "ckpt", "--backends", "ort,trt")
    assert rank.exit_code == 3 and val.exit_code == 3, (rank.output, val.output)
    assert rank.stdout == val.stdout == ""
    assert len(rank.stderr.splitlines()) == len(val.stderr.splitlines()) == 1
    why = rank.stderr.strip().removeprefix("error: ")
    assert why.startswith("TensorRT is not usable here (")
    assert val.stderr.strip() == f"error: backend 'trt' cannot run here: {why}"
    # a backend the build lacks is bad input (exit 2) in both, naming what to run
    rank = _run("rank", b, "--request", fx / "requests.json", "--backend", "ort-int8")
    val = _run("validate", b, "--requests", fx / "requests.json", "--ckpt", fx / "ckpt", "--backends", "ort-int8")
    assert rank.exit_code == val.exit_code == 2 and len(val.stderr.splitlines()) == 1
    assert "onetrans-trt calibrate" in rank.stderr and f"run `onetrans-trt calibrate {b}`" in val.stderr


def test_validate_count_5_says_the_sample_is_too_small(fx, no_tensorrt):
    r = _run("validate", fx / "build", "--data", "ml-100k", "--count", "5", "--ckpt", fx / "ckpt")
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert lines[0].startswith("verdict: PASS (5 requests; data: ml-100k test requests (5 requests, 50 labelled")
    assert [x.split()[0] for x in lines[1:4]] == ["torch-split", "ort", "ort-fp16"]
    nj = [x for x in lines if x.startswith("  torch-split, ort, ort-fp16: delta AUC ")]
    assert {x.split("delta AUC ")[1].split()[0] for x in nj} == {"like", "love"}
    for x in nj:
        assert " not judged: 125 labels (" in x and "are too few for max_delta_auc 0.0005; it needs >= 20,000 pairs" in x
    assert "  skipped ort-int8: no int8/candidate_scorer.onnx; run `onetrans-trt calibrate" in r.stdout
    assert [x for x in lines if x.startswith("  skipped trt, trt-fp16, trt-int8: TensorRT is not usable here (")]
    assert "report" not in r.output and "divergence" not in r.output


def test_a_failed_check_is_named_and_no_report_invented(fx, tmp_path):
    policy = tmp_path / "p.json"
    policy.write_text(json.dumps({"fp32": {"min_top10_overlap": 1.5}}))
    args = ("validate", fx / "build", "--requests", fx / "requests.json", "--ckpt", fx / "ckpt", "--backends",
            "torch-split", "--policy", policy)
    r = _run(*args)
    assert r.exit_code == 1
    assert r.stderr.strip() == ("error: validation failed: torch-split: top-10 overlap 1.000 < 1.5 (mean over 4 "
                                "requests)")
    assert "    failed: top-10 overlap 1.000 < 1.5 (mean over 4 requests)" in r.stdout.splitlines()
    assert "  torch-split: delta AUC not judged: the requests carry no labels" in r.stdout.splitlines()
    assert "report" not in r.output
    out = tmp_path / "r.json"
    r = _run(*args, "--json-out", out)
    assert r.exit_code == 1 and r.stdout.splitlines()[-1] == f"report: {out}"
    rep = json.loads(out.read_text())
    assert rep["skipped"] == {} and rep["backends"]["torch-split"]["divergence"] == {
        "note": "divergence search needs ONNX graphs; torch-split has none"}
    bad = [c for c in rep["backends"]["torch-split"]["checks"] if c["passed"] is False]
    assert bad == [{"name": "top10_overlap", "value": 1.0, "limit": 1.5, "passed": False,
                    "reason": "top-10 overlap 1.000 < 1.5 (mean over 4 requests)"}]


def test_json_is_a_flag_printing_the_report_and_json_out_writes_it(fx, tmp_path):
    """`--json` means the same in every command: JSON on stdout (nothing else there);
    `--json-out PATH` writes the same report to a file."""
    args = ("validate", fx / "build", "--requests", fx / "requests.json", "--ckpt", fx / "ckpt", "--backends", "ort")
    out = tmp_path / "r.json"
    r = _run(*args, "--json", "--json-out", out)
    assert r.exit_code == 0, r.output
    printed, written = json.loads(r.stdout), json.loads(out.read_text())
    assert printed["verdict"] == "pass" and printed["backends"].keys() == {"ort"}
    for rep in (printed, written):
        rep.pop("created", None)
        rep["provenance"].pop("command", None)
    assert printed == written
    old = _run(*args, "--json", tmp_path / "old.json")  # the old form: a path after --json
    assert old.exit_code == 2 and len(old.stderr.strip().splitlines()) == 1 and not (tmp_path / "old.json").exists()
