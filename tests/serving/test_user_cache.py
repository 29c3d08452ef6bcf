"""Users cached in the server (issue 17, item 3): the ``rank_cached`` model of ``serve-repo
--backend python`` keeps each user's K/V, keyed by the repository's graphs (sha256), the
request's ``user_key`` and the encoded history's fingerprint. Counted with Triton's own
statistics of ``user_encoder``: a hit never reaches it. A new build written into the repository
(or a graph file replaced by hand) encodes the user again: never stale K/V.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from onetrans_trt.serving import client
from onetrans_trt.serving.server import TritonServer

TOL = 1e-5


def _encodes(server: TritonServer) -> int:
    return client.successes_http(server.http_url, "user_encoder")


def _scores(server, ranker, req, *, grpc: bool = False) -> float:
    got = (client.rank_grpc(server.grpc_url, json.dumps(req.to_json()), model="rank_cached") if grpc else
           client.rank_http(server.http_url, req.to_json(), model="rank_cached"))
    want = ranker.rank(req)
    assert got["logits"].shape == want.logits.shape
    return max(float(np.abs(got["logits"] - want.logits).max(initial=0.0)),
               float(np.abs(got["probs"] - want.probabilities).max(initial=0.0)))


def _with_history(req, history):
    from onetrans_trt.data.requests import Request

    return Request.from_json({**req.to_json(), "history": history})


def test_a_repeated_user_never_reaches_the_encoder(triton, tiny_build, tiny_repo, movielens):
    from onetrans_trt.runtime.ranker import Ranker

    ranker = Ranker.load(tiny_build, backend="ort")
    a, b = [r for r, _ in movielens.requests(2, n_candidates=6, seed=44)]
    a_other_items = [r for r, _ in movielens.requests(3, n_candidates=9, seed=45)][2]
    a_other_items = type(a).from_json({**a.to_json(), "candidates": a_other_items.to_json()["candidates"]})
    a_changed = _with_history(a, a.to_json()["history"][:-1])  # one event fewer: another fingerprint
    a_keyed = type(a).from_json({**a.to_json(), "user_key": "someone-else"})
    with TritonServer(tiny_repo, install_dir=triton) as server:
        steps = [(a, 1), (a, 0), (a, 0), (a_other_items, 0), (b, 1), (a, 0), (a_changed, 1), (a_keyed, 1),
                 (a_keyed, 0)]
        for i, (req, encoded) in enumerate(steps):
            before = _encodes(server)
            assert _scores(server, ranker, req, grpc=i % 2 == 1) <= TOL
            assert _encodes(server) - before == encoded, (i, _encodes(server) - before)
        # a bad request is its own error, named by field, and the model goes on serving
        with pytest.raises(client.ServingError, match="history"):
            client.rank_http(server.http_url, {"user": {}, "history": "x", "candidates": []}, model="rank_cached")
        before = _encodes(server)
        assert _scores(server, ranker, b) <= TOL and _encodes(server) == before
        # no candidates: empty scores, the user still cached
        empty = type(a).from_json({**a.to_json(), "candidates": []})
        got = client.rank_http(server.http_url, empty.to_json(), model="rank_cached")
        assert got["logits"].shape[0] == 0 and _encodes(server) == before


@pytest.mark.serve_full
def test_zero_cache_encodes_every_request(triton, tiny_build, movielens, tmp_path):
    from onetrans_trt.runtime.ranker import Ranker
    from onetrans_trt.serving.repository import write_python_repository

    repo = tmp_path / "repo"
    write_python_repository(tiny_build, repo, user_cache_mb=0)
    ranker = Ranker.load(tiny_build, backend="ort")
    [a] = [r for r, _ in movielens.requests(1, n_candidates=5, seed=46)]
    with TritonServer(repo, install_dir=triton) as server:
        for _ in range(3):
            before = _encodes(server)
            assert _scores(server, ranker, a) <= TOL and _encodes(server) == before + 1


def _other_build(tiny_ckpt: Path, root: Path) -> Path:
    """The tiny checkpoint with every weight scaled by 1.05, exported: a model update."""
    from safetensors.numpy import load_file, save_file

    from onetrans_trt.export.api import export_build

    ckpt = root / "ckpt2"
    shutil.copytree(tiny_ckpt, ckpt)
    w = load_file(str(ckpt / "model.safetensors"))
    save_file({k: (v * 1.05).astype(v.dtype) if v.dtype.kind == "f" else v for k, v in w.items()},
              str(ckpt / "model.safetensors"))
    export_build(ckpt, root / "build2")
    return root / "build2"


@pytest.mark.serve_full
def test_a_new_build_or_a_replaced_graph_encodes_the_user_again(triton, tiny_ckpt, tiny_build, movielens, tmp_path):
    from onetrans_trt.errors import BuildError
    from onetrans_trt.runtime.ranker import Ranker
    from onetrans_trt.serving.repository import write_python_repository

    build2 = _other_build(tiny_ckpt, tmp_path)
    old, new = Ranker.load(tiny_build, backend="ort"), Ranker.load(build2, backend="ort")
    [a] = [r for r, _ in movielens.requests(1, n_candidates=6, seed=47)]
    assert float(np.abs(old.rank(a).logits - new.rank(a).logits).max()) > 100 * TOL  # the update shows
    repo = tmp_path / "repo"
    write_python_repository(tiny_build, repo)
    models = ("user_encoder", "candidate_scorer", "rank_cached")
    with TritonServer(repo, install_dir=triton, args=["--model-control-mode=explicit",
                                                      *[f"--load-model={m}" for m in models]]) as server:
        for encoded in (1, 0):
            before = _encodes(server)
            assert _scores(server, old, a) <= TOL and _encodes(server) - before == encoded
        # the user re-exports and regenerates the repository; Triton reloads the models
        write_python_repository(build2, repo, force=True)
        for m in models:
            client.load_model_http(server.http_url, m)
        for encoded in (1, 0):
            before = _encodes(server)
            assert _scores(server, new, a) <= TOL and _encodes(server) - before == encoded
        # a graph file replaced by hand (only user_encoder and candidate_scorer reloaded): the
        # cache is dropped and stays off; every request is encoded, with the new graphs' scores
        for role in ("user_encoder", "candidate_scorer"):
            shutil.copyfile(tiny_build / f"{role}.onnx", repo / role / "1" / "model.onnx")
            client.load_model_http(server.http_url, role)
        for _ in range(2):
            before = _encodes(server)
            assert _scores(server, old, a) <= TOL and _encodes(server) - before == 1
        # ... and rank_cached itself refuses to load on graphs it was not written for
        with pytest.raises(client.ServingError, match="regenerate it"):
            client.load_model_http(server.http_url, "rank_cached")
    with pytest.raises(BuildError, match="user cache"):
        write_python_repository(tiny_build, tmp_path / "r3", user_cache_mb=-1)


def test_a_shared_store_serves_users_across_instances_and_survives_its_loss(triton, tiny_build, movielens, tmp_path,
                                                                            redis_server):
    """``serve-repo --store redis://``: two rank_cached instances share one Redis, so a user
    encoded by either is a hit for both (Triton's statistics of user_encoder); with Redis killed
    every request is still answered, correctly, by encoding locally."""
    from concurrent.futures import ThreadPoolExecutor

    from onetrans_trt.runtime.ranker import Ranker
    from onetrans_trt.serving.repository import write_python_repository

    repo = tmp_path / "repo"
    write_python_repository(tiny_build, repo, instances=2, store=redis_server.url + "?ttl_s=600", batch_users=0)
    assert f'"{redis_server.url}?ttl_s=600"' in (repo / "rank_cached" / "config.pbtxt").read_text()
    ranker = Ranker.load(tiny_build, backend="ort")
    reqs = [r for r, _ in movielens.requests(3, n_candidates=5, seed=91)]
    with TritonServer(repo, install_dir=triton) as server:
        for r in reqs:
            assert _scores(server, ranker, r) <= TOL
        before = _encodes(server)
        with ThreadPoolExecutor(2) as ex:  # both instances busy: each serves users the other encoded too
            worst = max(ex.map(lambda r: _scores(server, ranker, r), reqs * 4))
        assert worst <= TOL and _encodes(server) == before
        assert len(redis_server.client().keys("onetrans:*")) == 3
        redis_server.stop()  # the store is gone: answered anyway, by encoding
        with ThreadPoolExecutor(2) as ex:
            worst = max(ex.map(lambda r: _scores(server, ranker, r), reqs * 2))
        assert worst <= TOL and _encodes(server) - before == 6
