"""Both families through every CLI command: train -> info -> export -> inspect -> graphs
-> rank -> convert -> calibrate -> build -> validate -> serve-repo -> bench.

The HyFormer chain also checks its ORT graphs against PyTorch on 200 real MovieLens
requests (issue: HyFormer through the whole pipeline).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from onetrans_trt.cli import cli


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def check_build_by_capability(r, build) -> None:
    """`build` exits 3 naming what is missing where TensorRT or a GPU is absent (profiles and
    command lines written, no engine); where both exist it builds both engines."""
    from tests.helpers import trt_gpu_missing

    d = build / "engines" / "fp32"
    plan = json.loads((d / "profiles.json").read_text())  # written either way
    assert set(plan["graphs"]) == {"user_encoder", "candidate_scorer"}
    engines = sorted(p.name for p in d.glob("*.engine"))
    missing = trt_gpu_missing()
    if missing:
        expected = "TensorRT is not usable here" if missing.startswith("tensorrt:") else "no CUDA GPU is visible"
        assert r.exit_code == 3 and expected in r.output, (missing, r.output[-2000:])
        assert engines == [] and "built" not in plan and "not built" in (d / "build_log.txt").read_text()
    else:
        assert r.exit_code == 0, r.output[-2000:]
        assert engines == ["candidate_scorer.engine", "user_encoder.engine"] and plan["built"] is True
        assert all((d / e).stat().st_size > 0 for e in engines)


# every command in a row (~2.5 min each): make test-heavy; make test runs the README Quickstart's chain
@pytest.mark.heavy
@pytest.mark.parametrize("family", ["onetrans", "hyformer"])
def test_cli_chain(family, tmp_path, movielens):
    ck, build = tmp_path / "ck", tmp_path / "build"
    r = run("train", "--model", family, "--preset", "tiny", "--out", ck, "--epochs", "1", "--limit", "3000", "--json")
    assert r.exit_code == 0, r.output
    assert set(json.loads(r.stdout)["test_mean"]) == {"like", "love"}
    info = json.loads(run("info", ck, "--json").output)
    assert info["family"] == family and ("hyformer" in info) == (family == "hyformer")
    r = run("export", ck, "--out", build, "--unified", "--samples", "2", "--json")
    assert r.exit_code == 0, r.output
    manifest = json.loads((build / "manifest.json").read_text())
    assert manifest["model"]["family"] == family
    r = run("inspect", build, "--candidates", "16", "--json")
    assert r.exit_code == 0, r.output
    flops = json.loads(r.stdout)["flops"]
    assert flops["unified"] > flops["split_total"] > 0
    r = run("graphs", build, "--json")
    assert r.exit_code == 0, r.output
    assert "no-broadcast" in [p["pass"] for p in json.loads(r.stdout)["passes"]]
    req, _ = movielens.requests(1, n_candidates=5, seed=3)[0]
    (tmp_path / "req.json").write_text(json.dumps(req.to_json()))
    logits = {}
    for where, backend in ((ck, "torch-split"), (ck, "torch-unified"), (build, "ort"), (build, "ort-unified")):
        r = run("rank", where, "--request", tmp_path / "req.json", "--backend", backend)
        assert r.exit_code == 0, r.output
        logits[backend] = np.array(json.loads(r.stdout)["logits"]["like"])
    for backend, got in logits.items():
        assert np.abs(got - logits["torch-unified"]).max() <= 1e-4, backend
    r = run("convert", build, "--quality-requests", "20", "--json")
    assert r.exit_code == 0, r.output
    r = run("calibrate", build, "--samples", "8", "--quality-requests", "20", "--json")
    assert r.exit_code == 0, r.output
    check_build_by_capability(run("build", build, "--json"), build)
    # 100 requests: on 15 (26,578 like-pairs, the limit spanning 13 pairs) the tiny HyFormer's FP16 delta
    # like-AUC was -0.00079 while the same build gave -0.00003 on 100 (max |error| 0.00075 both): near-tied
    # scores of a model trained on 3,000 samples, not FP16 error; the 0.0005 limit is kept
    r = run("validate", build, "--data", "ml-100k", "--count", "100", "--backends", "torch-split,ort,ort-fp16",
            "--json-out", tmp_path / "report.json")
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["verdict"] == "pass" and set(report["backends"]) == {"torch-split", "ort", "ort-fp16"}
    # INT8 of a model trained for seconds: its scores are nearly tied, so the ranking criteria
    # may fail on 15 requests; what must hold is that it validates to a verdict with the
    # per-graph numbers inside the INT8 tolerances
    r = run("validate", build, "--data", "ml-100k", "--count", "15", "--backends", "ort-int8",
            "--json-out", tmp_path / "int8.json")
    assert r.exit_code in (0, 1), r.output
    int8 = json.loads((tmp_path / "int8.json").read_text())["backends"]["ort-int8"]
    assert all(v["pass"] for g in int8["graphs"].values() for v in g.values())
    r = run("serve-repo", build, "--out", tmp_path / "repo", "--json")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "repo" / "candidate_scorer" / "config.pbtxt").is_file()
    r = run("bench", build, "--quick", "--history", "20", "--candidates", "8", "--scorer-candidates", "16",
            "--cache-history", "20", "--rounds", "1", "--no-pyramid", "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)  # progress lines go to stderr
    assert res["cache"]["identical_scores"] and set(res["peers"]["backends"]) >= {"ort", "ort-unified"}
    if family == "hyformer":
        from onetrans_trt.runtime.ranker import Ranker

        ort_ranker, ref = Ranker.load(build), Ranker.load(ck, backend="torch-unified")
        worst = 0.0
        for rq, _ in movielens.requests(200, n_candidates=8, seed=11):
            worst = max(worst, float(np.abs(ort_ranker.rank(rq).logits - ref.rank(rq).logits).max()))
        assert worst <= 1e-4, worst
