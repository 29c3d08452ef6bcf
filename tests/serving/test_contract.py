"""The repositories' tensor contract, without a server (part of `make test`):

- every repository (onnxruntime and python backends) feeds ``s_length`` as ``[1, 1]`` to both
  the batching user encoder (``[N, 1]`` reshaped to ``[N]``) and the non-batching scorer
  (``[1, 1]`` reshaped to ``[1]``): the old ``[-1]`` ensemble input passed Triton's load-time
  check and failed the first request;
- the ORT repository, executed with Triton's shape rules, scores like the Ranker;
- ``preprocess`` encodes a raw request exactly as a self-encoding client does;
- lower stages never import ``onetrans_trt.serving``.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from onetrans_trt.serving import client


def _cfg(path: Path):
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def _client_shape(model, name):
    t = next(t for t in model.input if t.name == name)
    return ([-1] if model.max_batch_size > 0 else []) + list(t.dims)


def test_s_length_has_one_client_shape_everywhere(tiny_build, tiny_repo, tmp_path):
    from onetrans_trt.runtime.triton_repo import write_repository

    ort_repo = tmp_path / "ort"
    write_repository(tiny_build, ort_repo)
    for repo, backend in ((ort_repo, "platform"), (tiny_repo, "backend")):
        ens, ue, cs = (_cfg(repo / m / "config.pbtxt") for m in ("onetrans", "user_encoder", "candidate_scorer"))
        assert list(next(t for t in ens.input if t.name == "s_length").dims) == [1, 1]
        assert _client_shape(ue, "s_length") == [-1, 1] and list(ue.input[-1].reshape.shape) == []
        assert _client_shape(cs, "s_length") == [1, 1]
        assert list(next(t for t in cs.input if t.name == "s_length").reshape.shape) == [1]
        assert [t for t in ens.input if t.name.startswith("s_")] and \
            all(list(t.dims)[0] == 1 for t in ens.input if t.name.startswith("s_"))
        steps = {s.model_name: s for s in ens.ensemble_scheduling.step}
        assert steps["candidate_scorer"].input_map["s_length"] == "s_length"
        assert (backend == "backend") == (ue.backend == "python")


def test_ort_repository_under_tritons_shape_rules_scores_like_the_ranker(tiny_build, tmp_path, movielens):
    from onetrans_trt.runtime.ranker import Ranker
    from onetrans_trt.runtime.triton_repo import write_repository
    from onetrans_trt.serving.client import ensemble_tensors
    from tests.examples.test_example_stages import run_ensemble

    repo = tmp_path / "ort"
    write_repository(tiny_build, repo)
    ranker = Ranker.load(tiny_build, backend="ort")
    for req, _ in movielens.requests(2, n_candidates=5, seed=4):
        got = run_ensemble(repo, ensemble_tensors(ranker.schema, req))
        np.testing.assert_allclose(got["logits"], ranker.rank(req).logits, atol=1e-5)


def test_preprocess_encodes_like_a_self_encoding_client(tiny_build, tiny_repo, movielens):
    from onetrans_trt.serving.client import ensemble_tensors
    from onetrans_trt.serving.python_models import Preprocess
    from onetrans_trt.models.config import read_config

    cfg = _cfg(tiny_repo / "preprocess" / "config.pbtxt")
    pre = Preprocess()
    from google.protobuf import json_format

    pre.initialize({"model_config": json.dumps(json_format.MessageToDict(cfg, preserving_proto_field_name=True)),
                    "model_repository": str(tiny_repo / "preprocess"), "model_version": "1"})
    schema = read_config(tiny_build).schema
    ens = _cfg(tiny_repo / "onetrans" / "config.pbtxt")
    for req, _ in movielens.requests(2, n_candidates=4, seed=6):
        got = pre.encode(json.dumps(req.to_json()).encode())
        want = ensemble_tensors(schema, req)
        assert set(got) == set(want) == {t.name for t in ens.input}
        for k in want:
            assert got[k].shape == want[k].shape and got[k].dtype == want[k].dtype, k
            np.testing.assert_array_equal(got[k], want[k])
            dims = list(next(t for t in ens.input if t.name == k).dims)
            assert len(dims) == got[k].ndim and all(d in (-1, s) for d, s in zip(dims, got[k].shape)), k
    from onetrans_trt.errors import RequestError

    with pytest.raises(RequestError, match="history"):
        pre.encode(b'{"user": {}, "history": "x", "candidates": []}')
    with pytest.raises(RequestError, match="not JSON"):
        pre.encode(b"{")


def test_serve_repo_python_cli_and_refused_options(tiny_build, tmp_path):
    from click.testing import CliRunner

    from onetrans_trt.cli import cli

    (tmp_path / "limits.json").write_text(json.dumps({"max_candidates": 3}))
    r = CliRunner().invoke(cli, ["serve-repo", str(tiny_build), "--out", str(tmp_path / "r"), "--backend", "python",
                                 "--limits", str(tmp_path / "limits.json"), "--threads", "1", "--user-cache-mb",
                                 "1.5", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["models"] == ["candidate_scorer", "candidate_scorer_users", "onetrans", "preprocess",
                                              "preprocess_users", "rank", "rank_cached", "rank_users", "user_encoder"]
    pre = _cfg(tmp_path / "r" / "preprocess" / "config.pbtxt")
    assert json.loads(pre.parameters["limits"].string_value)["max_candidates"] == 3
    cached = _cfg(tmp_path / "r" / "rank_cached" / "config.pbtxt")
    assert [g.count for g in cached.instance_group] == [1]
    assert json.loads(cached.parameters["limits"].string_value)["max_candidates"] == 3
    assert cached.parameters["user_cache_bytes"].string_value == str(int(1.5 * (1 << 20)))
    from onetrans_trt.serving.python_models import graphs_sha256

    assert cached.parameters["graphs_sha256"].string_value == graphs_sha256(tmp_path / "r")
    wiring = json.loads(cached.parameters["wiring"].string_value)
    assert wiring["state"] == ["user_k_0", "user_v_0", "user_k_1", "user_v_1"] and "s_length" in wiring["user_inputs"]
    assert _cfg(tmp_path / "r" / "user_encoder" / "config.pbtxt").parameters["intra_op_threads"].string_value == "1"
    assert (tmp_path / "r" / "candidate_scorer" / "1" / "model.onnx").read_bytes() == \
        (tiny_build / "candidate_scorer.onnx").read_bytes()
    r = CliRunner().invoke(cli, ["serve-repo", str(tiny_build), "--out", str(tmp_path / "r2"),
                                 "--limits", str(tmp_path / "limits.json")])
    assert r.exit_code == 2 and "--limits" in r.output and not (tmp_path / "r2").exists()
    r = CliRunner().invoke(cli, ["serve-repo", str(tiny_build), "--out", str(tmp_path / "r4"), "--backend", "python",
                                 "--instances", "2"])
    assert r.exit_code == 0, r.output  # every Python model runs 2 instances, rank_cached too (a cache each)
    for m in ("user_encoder", "candidate_scorer", "rank_cached"):
        assert [g.count for g in _cfg(tmp_path / "r4" / m / "config.pbtxt").instance_group] == [2], m
    for bad, what in ((["--user-cache-mb", "8"], "--user-cache-mb does not apply to --backend onnxruntime"),
                      (["--backend", "python", "--user-cache-mb", "-1"], "-1")):
        r = CliRunner().invoke(cli, ["serve-repo", str(tiny_build), "--out", str(tmp_path / "r3"), *bad])
        assert r.exit_code == 2 and what in r.output and not (tmp_path / "r3").exists(), r.output


def test_lower_stages_never_import_serving():
    root = Path(__file__).resolve().parents[2] / "onetrans_trt"
    bad = []
    for f in root.rglob("*.py"):
        rel = f.relative_to(root)
        if rel.parts[0] == "serving" or rel.name == "cli.py":
            continue
        for node in ast.walk(ast.parse(f.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            bad += [f"{rel}: {n}" for n in names if n.startswith("onetrans_trt.serving")]
    assert bad == []


def test_success_counts_are_read_once_they_settle(monkeypatch):
    """Triton reports a request's statistics after sending its response: a count read at once
    may be one short. successes_http reads until two reads agree (a bounded wait)."""
    reads = iter([5, 6, 6, 6])
    monkeypatch.setattr(client, "model_statistics_http", lambda url, model, timeout=10.0: {
        "model_stats": [{"inference_stats": {"success": {"count": next(reads)}}}]})
    assert client.successes_http("u", "m", settle=0.0) == 6
    growing = iter(range(1000))
    monkeypatch.setattr(client, "model_statistics_http", lambda url, model, timeout=10.0: {
        "model_stats": [{"inference_stats": {"success": {"count": next(growing)}}}]})
    assert client.successes_http("u", "m", settle=0.01, max_wait=0.05) < 1000  # never settles: bounded
