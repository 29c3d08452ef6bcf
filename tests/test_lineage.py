"""Lineage: derived artifacts (fp16/, int8/, engines, goldens, serve-repo) record the sha256 of
the graphs they were made from; a stale one is refused in one line (exit 2) naming the command
that remakes it; one without a record (an older build) is used with one warning."""

from __future__ import annotations

import json
import logging
import shutil
import warnings

import pytest
from click.testing import CliRunner

from onetrans_trt.cli import cli
from onetrans_trt.errors import BuildError, StaleArtifact


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def one_line_exit_2(*args) -> str:
    r = run(*args)
    assert r.exit_code == 2, (r.exit_code, r.output[-2000:])
    assert "Traceback" not in r.output
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr[-2000:]
    return lines[0]


def manifest(build) -> dict:
    return json.loads((build / "manifest.json").read_text())


@pytest.fixture(scope="module")
def variants_build(tiny_build, tmp_path_factory):
    """The tiny build with its FP16 and INT8 variants (made once; tests work on copies)."""
    from onetrans_trt.calibrate.fp16 import convert_build
    from onetrans_trt.calibrate.int8 import calibrate_build

    b = tmp_path_factory.mktemp("lineage") / "b"
    shutil.copytree(tiny_build, b)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        convert_build(b)
        calibrate_build(b, n_samples=4)
    return b


@pytest.fixture
def build(variants_build, tmp_path):
    b = tmp_path / "b"
    shutil.copytree(variants_build, b)
    return b


@pytest.fixture
def requests_file(movielens, tmp_path):
    req, _ = movielens.requests(1, n_candidates=4, seed=8)[0]
    p = tmp_path / "req.json"
    p.write_text(json.dumps(req.to_json()))
    return p


def test_variants_record_the_graphs_they_were_made_from(variants_build):
    m = manifest(variants_build)
    shas = {k: g["sha256"] for k, g in m["graphs"].items()}
    fp16 = m["precisions"]["fp16"]["lineage"]
    assert fp16["graphs"] == {k: shas[k] for k in ("user_encoder", "candidate_scorer")}
    assert fp16["command"] == ["convert", "BUILD"]
    int8 = m["precisions"]["int8"]["lineage"]  # re-cut from serving.onnx, K/V from the user encoder
    assert int8["graphs"] == {k: shas[k] for k in ("serving", "user_encoder", "candidate_scorer")}
    assert int8["command"] == ["calibrate", "BUILD", "--samples", "4"]
    from onetrans_trt.lineage import survey

    assert survey(variants_build, m) == {"stale": {}, "unknown": {}}


def test_graphs_marks_variants_stale_and_every_command_refuses_them(build, requests_file, tmp_path):
    from onetrans_trt.runtime.ranker import Ranker

    r = run("graphs", build, "--passes", "pyramid,cleanup", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert sorted(out["stale"]) == ["fp16/", "int8/"] and out["unknown"] == {}
    assert "re-run `onetrans-trt convert " in out["stale"]["fp16/"]
    assert "re-run `onetrans-trt calibrate " in out["stale"]["int8/"] and "--samples 4" in out["stale"]["int8/"]
    human = run("graphs", build, "--passes", "pyramid,cleanup").output
    assert f"stale: {build}/fp16/ was made from graphs that have since been rewritten (" in human

    for precision, how in (("fp16", "convert"), ("int8", "calibrate")):
        line = one_line_exit_2("validate", build, "--requests", requests_file, "--backends", f"ort-{precision}")
        assert f"{build}/{precision}/ was made from graphs" in line and f"`onetrans-trt {how} {build}" in line
        assert "candidate_scorer.onnx sha256" in line
        repo = tmp_path / f"repo-{precision}"
        line = one_line_exit_2("serve-repo", build, "--out", repo, "--precision", precision)
        assert f"onetrans-trt {how} {build}" in line
        assert not repo.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".repo")]
        line = one_line_exit_2("build", build, "--precision", precision)
        assert f"onetrans-trt {how} {build}" in line
        assert not (build / "engines" / precision).exists()  # refused before any profile is written
        with pytest.raises(StaleArtifact, match=f"re-run `onetrans-trt {how} "):
            Ranker.load(build, backend=f"ort-{precision}")
        line = one_line_exit_2("rank", build, "--request", requests_file, "--backend", f"ort-{precision}")
        assert f"onetrans-trt {how} {build}" in line
    # validate's default (every available backend) refuses too, before any work
    line = one_line_exit_2("validate", build, "--requests", requests_file)
    assert "fp16/ was made from graphs" in line
    assert Ranker.load(build, backend="ort").backend_name == "ort"  # the graphs themselves are fine

    # re-running the named command clears it
    from onetrans_trt.calibrate.fp16 import convert_build

    convert_build(build)
    assert Ranker.load(build, backend="ort-fp16").backend_name == "ort-fp16"
    r = run("serve-repo", build, "--out", tmp_path / "repo", "--precision", "fp16", "--json")
    assert r.exit_code == 0, r.output
    rec = json.loads((tmp_path / "repo" / "lineage.json").read_text())
    m = manifest(build)
    assert rec["graphs"] == {k: m["precisions"]["fp16"]["graphs"][k]["sha256"] for k in ("user_encoder",
                                                                                       "candidate_scorer")}
    assert rec["build_graphs"] == {k: g["sha256"] for k, g in m["graphs"].items()} and rec["precision"] == "fp16"
    from onetrans_trt.lineage import survey

    assert list(survey(build, m)["stale"]) == ["int8/"]


def test_convert_options_are_in_the_command_to_rerun(build):
    from onetrans_trt.calibrate.fp16 import convert_build
    from onetrans_trt.export.api import rerun_passes
    from onetrans_trt.lineage import variant_state

    convert_build(build, kv_fp16=True, keep_fp32=["MatMul"])
    rerun_passes(build, [], [])
    state, msg = variant_state(build, manifest(build), "fp16")
    assert state == "stale" and msg.endswith(f"re-run `onetrans-trt convert {build} --kv-fp16 --keep-fp32 MatMul`")


def test_goldens_stay_valid_after_graphs_and_goldens_of_another_build_are_refused(build, requests_file, tmp_path):
    from onetrans_trt.validate.api import validate_build, validate_goldens
    from tests.mutation_kills.validate_fixture import tiny_random_build

    g = tmp_path / "goldens"
    validate_build(build, backends=["ort"], data=None, requests_file=requests_file, save_goldens=g)
    assert run("graphs", build, "--passes", "pyramid,cleanup").exit_code == 0
    # the reference outputs are the checkpoint's: they check the rewritten graphs
    assert validate_goldens(build, g, backends=["ort"])["verdict"] == "pass"

    other = tiny_random_build() / "build"  # another checkpoint's build (same architecture)
    line = one_line_exit_2("validate", other, "--goldens", g)
    theirs, ours = manifest(build)["checkpoint"]["sha256"], manifest(other)["checkpoint"]["sha256"]
    assert f"{g} were saved from another build (checkpoint sha256 {theirs[:12]}.. there, {ours[:12]}.. here" in line
    assert "--save-goldens DIR`" in line
    meta = json.loads((g / "meta.json").read_text())
    meta.pop("checkpoint")
    (g / "meta.json").write_text(json.dumps(meta))
    line = one_line_exit_2("validate", build, "--goldens", g)
    assert "records no checkpoint sha256" in line


def test_goldens_are_refused_by_the_checkpoint_hash_before_any_graph_runs(build, requests_file, tmp_path):
    """Goldens of another build used to run the graphs (a KeyError traceback where the other
    model had more layers, a failed verdict where it had as many); here the goldens are this
    build's own, numerically right, with another checkpoint's sha256 in meta.json: refused by
    the hash alone, in a fresh process, one line, exit 2 (the unfixed code passes them)."""
    import subprocess
    import sys

    from onetrans_trt.validate.api import validate_build

    g = tmp_path / "goldens"
    validate_build(build, backends=["ort"], data=None, requests_file=requests_file, save_goldens=g)
    meta = json.loads((g / "meta.json").read_text())
    meta["checkpoint"]["sha256"] = "0" * 64  # as written by another checkpoint's build
    (g / "meta.json").write_text(json.dumps(meta))
    p = subprocess.run([sys.executable, "-m", "onetrans_trt.cli", "validate", str(build), "--goldens", str(g)],
                       capture_output=True, text=True)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
    lines = [x for x in p.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "were saved from another build (checkpoint sha256 000000000000.. there" in lines[0]


def test_engines_record_and_check_their_sources(build, tmp_path):
    """Engines are only built with TensorRT; here their files are stand-ins and the record is
    the one `build` writes next to them."""
    from onetrans_trt.io import atomic_write_json
    from onetrans_trt.lineage import ENGINE_LINEAGE, check_engines, engine_record

    for precision in ("fp32", "fp16"):
        d = build / "engines" / precision
        d.mkdir(parents=True)
        for role in ("user_encoder", "candidate_scorer"):
            (d / f"{role}.engine").write_bytes(b"engine")
        atomic_write_json(d / ENGINE_LINEAGE, engine_record(manifest(build), precision,
                                                            ["build", "BUILD", "--precision", precision],
                                                            "9.0" if precision == "fp32" else None))
        check_engines(build, manifest(build), precision)  # current
    r = run("serve-repo", build, "--out", tmp_path / "repo", "--backend", "tensorrt", "--json")
    assert r.exit_code == 0, r.output
    from onetrans_trt.runtime.triton_repo import parse_config

    for role in ("user_encoder", "candidate_scorer"):  # the plan is for the GPU it was built on
        cfg = parse_config((tmp_path / "repo" / role / "config.pbtxt").read_text())
        assert dict(cfg.cc_model_filenames) == {"9.0": "model.plan"} and cfg.platform == "tensorrt_plan"
    r = run("serve-repo", build, "--out", tmp_path / "repo16", "--backend", "tensorrt", "--precision", "fp16")
    assert r.exit_code == 0, r.output  # a record without a compute capability: no map
    assert not parse_config((tmp_path / "repo16" / "user_encoder" / "config.pbtxt").read_text()).cc_model_filenames
    rec = json.loads((tmp_path / "repo" / "lineage.json").read_text())
    assert rec["engines"] == json.loads((build / "engines" / "fp32" / ENGINE_LINEAGE).read_text())
    assert rec["engines"]["graphs"] == {k: manifest(build)["graphs"][k]["sha256"] for k in ("user_encoder",
                                                                                          "candidate_scorer")}

    r = run("graphs", build, "--passes", "pyramid,cleanup", "--json")
    stale = json.loads(r.stdout)["stale"]
    assert sorted(stale) == ["engines/fp16/", "engines/fp32/", "fp16/", "int8/"]
    assert stale["engines/fp32/"].endswith(f"re-run `onetrans-trt build {build} --precision fp32`")
    assert "user_encoder.onnx sha256" in stale["engines/fp32/"]
    assert f"re-run `onetrans-trt convert {build}`" in stale["engines/fp16/"]  # its variant first
    line = one_line_exit_2("serve-repo", build, "--out", tmp_path / "repo2", "--backend", "tensorrt")
    assert f"onetrans-trt build {build} --precision fp32" in line and not (tmp_path / "repo2").exists()


def test_a_build_without_records_is_used_with_one_warning(build, tmp_path, caplog):
    """Builds made before lineage was recorded: their variants and engines are unknown, not
    stale: used, with one warning naming how to record them."""
    from onetrans_trt.io import atomic_write_json
    from onetrans_trt.runtime.ranker import Ranker

    m = manifest(build)
    for v in ("fp16", "int8"):
        del m["precisions"][v]["lineage"]
    atomic_write_json(build / "manifest.json", m)
    (build / "engines" / "fp32").mkdir(parents=True)
    (build / "engines" / "fp32" / "user_encoder.engine").write_bytes(b"engine")
    with caplog.at_level(logging.WARNING, logger="onetrans_trt.lineage"):
        Ranker.load(build, backend="ort-fp16")
        Ranker.load(build, backend="ort-fp16")
    warned = [r.getMessage() for r in caplog.records]
    assert warned == [f"{build}/fp16/ records no lineage (made before lineage was recorded): it cannot be "
                      f"checked against the current graphs; re-run `onetrans-trt convert {build}` to record it"]
    r = run("graphs", build, "--passes", "pyramid,cleanup", "--json")
    out = json.loads(r.stdout)
    assert out["stale"] == {} and sorted(out["unknown"]) == ["engines/fp32/", "fp16/", "int8/"]
    r = run("serve-repo", build, "--out", tmp_path / "repo", "--precision", "int8")
    assert r.exit_code == 0, r.output
    assert [x for x in r.stderr.splitlines() if x.startswith("warning:")] == [
        f"warning: {build}/int8/ records no lineage (made before lineage was recorded): it cannot be checked "
        f"against the current graphs; re-run `onetrans-trt calibrate {build}` to record it"]


def test_manifest_lineage_records_are_checked(build):
    from onetrans_trt.export.api import read_manifest
    from onetrans_trt.io import atomic_write_json

    m = manifest(build)
    read_manifest(build)
    for bad, what in (({"graphs": {"user_encoder": "abc"}}, ".graphs.user_encoder: expected a sha256 (64 lowercase "
                                                              "hex digits), got 'abc'"),
                      ({"graphs": {}}, ".graphs: expected at least 1 item(s), got {}"),
                      ({"graphs": {"user_encoder": "a" * 64}, "command": "convert"}, ".command: expected a list"),
                      ("x", ": expected an object")):
        m["precisions"]["fp16"]["lineage"] = bad
        atomic_write_json(build / "manifest.json", m)
        with pytest.raises(BuildError) as e:
            read_manifest(build)
        assert str(e.value) == (f"{build / 'manifest.json'}: precisions.fp16.lineage{what}; "
                                f"re-run `onetrans-trt convert`"), str(e.value)


def test_a_module_build_s_variants_record_its_two_graphs(tmp_path):
    """`export --module` builds have no serving.onnx: both variants are made from the two graphs."""
    from onetrans_trt.calibrate.fp16 import convert_build
    from onetrans_trt.calibrate.int8 import calibrate_build
    from tests.mutation_kills.validate_fixture import module_build

    b = tmp_path / "m"
    shutil.copytree(module_build(), b)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        convert_build(b, kv_fp16=True)
        calibrate_build(b, n_samples=3, synthetic=True)
    m = manifest(b)
    shas = {k: m["graphs"][k]["sha256"] for k in ("user_encoder", "candidate_scorer")}
    assert m["precisions"]["fp16"]["lineage"] == {"graphs": shas, "command": ["convert", "BUILD", "--kv-fp16"]}
    assert m["precisions"]["int8"]["lineage"] == {"graphs": shas,
                                                  "command": ["calibrate", "BUILD", "--samples", "3", "--synthetic"]}


def test_a_variant_the_manifest_does_not_list_is_unknown(build, caplog):
    """fp16/ on disk without its manifest entry (a convert killed between the two writes):
    used, with one warning, like a variant without a record."""
    from onetrans_trt.io import atomic_write_json
    from onetrans_trt.runtime.ranker import Ranker

    m = manifest(build)
    del m["precisions"]["fp16"]
    atomic_write_json(build / "manifest.json", m)
    with caplog.at_level(logging.WARNING, logger="onetrans_trt.lineage"):
        Ranker.load(build, backend="ort-fp16")
    assert [r.getMessage() for r in caplog.records] == [
        f"{build}/fp16/ is not listed in the manifest (its command did not finish): it cannot be checked against "
        f"the current graphs; re-run `onetrans-trt convert {build}`"]
