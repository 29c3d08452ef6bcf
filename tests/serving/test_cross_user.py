"""Batches across users (issue 17, item 4): ``candidate_scorer_users``, the packed scorer, takes
one user per request and Triton's dynamic batcher merges concurrent requests of different users
(their histories and candidate counts differ: ragged inputs) into one call, counted with Triton's
own batch statistics; every answer equals the serial one (1e-5). ``rank_cached`` calls it, so
concurrent raw requests share one scorer run, and so does the ``rank_users`` ensemble. A scorer that cannot be packed is refused when
asked for and left out, with the reason, when not.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from click.testing import CliRunner

from onetrans_trt.errors import BuildError
from onetrans_trt.serving import client
from onetrans_trt.serving.repository import write_python_repository
from onetrans_trt.serving.server import TritonServer

TOL = 1e-5


def _batches(url: str, model: str) -> tuple[dict[int, int], int, int]:
    """``({batch size: executions}, inference count, execution count)`` (settled: Triton reports
    after the responses)."""
    client.successes_http(url, model)
    st = client.model_statistics_http(url, model)["model_stats"][0]
    sizes = {int(b["batch_size"]): int(b["compute_infer"]["count"]) for b in st.get("batch_stats", [])}
    return sizes, int(st.get("inference_count", 0)), int(st.get("execution_count", 0))


def _user_tensors(ranker, req):
    """One user's scorer inputs as ``candidate_scorer_users`` takes them (batch axis 1)."""
    from onetrans_trt.data.requests import encode_request
    from onetrans_trt.kv import state_arrays

    hist, ns = encode_request(ranker.schema, req)
    state = state_arrays(ranker.backend.encode_user(hist))
    t = {n: np.asarray(v) for n, v in state.items()}
    t["s_length"] = np.asarray(hist["s_length"], np.int64).reshape(1, 1)
    t.update({n: np.asarray(v)[None] for n, v in ns.items()})
    return t


@pytest.fixture(scope="module")
def batching_repo(tiny_build, tmp_path_factory):
    out = tmp_path_factory.mktemp("xuser") / "repo"
    res = write_python_repository(tiny_build, out, instances=2, batch_delay_us=1_000_000)
    assert res["cross_user_batching"]["users_per_call"] == 8 and res["cross_user_batching"]["checked_worst"] <= TOL
    return out


def test_concurrent_users_are_scored_in_one_call(triton, tiny_build, batching_repo, movielens):
    from onetrans_trt.runtime.ranker import Ranker

    ranker = Ranker.load(tiny_build, backend="ort")
    reqs = [r for r, _ in movielens.requests(4, n_candidates=9, seed=71)]
    reqs[1] = type(reqs[1]).from_json({**reqs[1].to_json(), "history": reqs[1].to_json()["history"][:3]})
    reqs[2] = type(reqs[2]).from_json({**reqs[2].to_json(), "candidates": reqs[2].to_json()["candidates"][:2]})
    reqs[3] = type(reqs[3]).from_json({**reqs[3].to_json(), "history": []})
    with TritonServer(batching_repo, install_dir=triton) as server:
        url = server.http_url
        # tensor level: four users at once (histories 3 events, empty and full; 2 and 9 candidates)
        tensors = [_user_tensors(ranker, r) for r in reqs]
        with ThreadPoolExecutor(4) as ex:
            outs = list(ex.map(lambda t: client.infer_http(url, "candidate_scorer_users", t), tensors))
        for r, o in zip(reqs, outs):
            want = ranker.rank(r)
            assert o["logits"].shape == (1, *want.logits.shape)
            assert float(np.abs(o["logits"][0] - want.logits).max()) <= TOL
            assert float(np.abs(o["probs"][0] - want.probabilities).max()) <= TOL
        sizes, inferences, executions = _batches(url, "candidate_scorer_users")
        assert inferences >= 4 and executions < inferences and max(sizes) >= 2, (sizes, inferences, executions)
        # raw requests through rank_cached (two instances): two users at once share a scorer call
        before = _batches(url, "candidate_scorer_users")
        with ThreadPoolExecutor(2) as ex:
            outs = list(ex.map(lambda r: client.rank_http(url, r.to_json(), model="rank_cached"), reqs[:2]))
        for r, o in zip(reqs, outs):
            assert float(np.abs(o["logits"] - ranker.rank(r).logits).max()) <= TOL
        sizes, inferences, executions = _batches(url, "candidate_scorer_users")
        assert inferences - before[1] == 2 and executions - before[2] == 1, (sizes, before)
        # raw requests through the rank_users ensemble: four users at once, one scorer call
        before = _batches(url, "candidate_scorer_users")
        with ThreadPoolExecutor(4) as ex:
            outs = list(ex.map(lambda r: client.rank_http(url, r.to_json(), model="rank_users"), reqs))
        for r, o in zip(reqs, outs):
            assert o["logits"].shape == (1, len(r.candidates), 2)
            assert float(np.abs(o["logits"][0] - ranker.rank(r).logits).max()) <= TOL
        sizes, inferences, executions = _batches(url, "candidate_scorer_users")
        assert inferences - before[1] == 4 and executions - before[2] == 1, (sizes, before)
        # a malformed request (two users in one request) is its own error; the others are answered
        bad = {k: np.concatenate([v, v]) for k, v in tensors[0].items()}
        with ThreadPoolExecutor(2) as ex:
            futs = [ex.submit(client.infer_http, url, "candidate_scorer_users", bad),
                    ex.submit(client.infer_http, url, "candidate_scorer_users", tensors[2])]
            with pytest.raises(client.ServingError, match="one user per request"):
                futs[0].result()
            assert float(np.abs(futs[1].result()["logits"][0] - ranker.rank(reqs[2]).logits).max()) <= TOL
        # no candidates: empty rows, no error
        empty = {**tensors[0], **{k: v[:, :0] for k, v in tensors[0].items() if k.startswith("ns_")}}
        assert client.infer_http(url, "candidate_scorer_users", empty)["logits"].shape == (1, 0, 2)


@pytest.mark.serve_full  # exports an example module (~50 s): make serve-test
def test_batching_off_and_what_cannot_be_packed(tiny_build, tmp_path):
    from onetrans_trt.cli import cli
    from tests.examples.test_example_stages import _export

    res = write_python_repository(tiny_build, tmp_path / "off", batch_users=0)
    assert not {"candidate_scorer_users", "rank_users", "preprocess_users"} & set(res["models"])
    assert res["cross_user_batching"]["users_per_call"] == 1
    assert 'string_value: "candidate_scorer"' in (tmp_path / "off" / "rank_cached" / "config.pbtxt").read_text()
    on = (tmp_path / "on")
    write_python_repository(tiny_build, on, batch_users=3, batch_delay_us=50, instances=2)
    text = (on / "candidate_scorer_users" / "config.pbtxt").read_text()
    assert "max_batch_size: 3" in text and "max_queue_delay_microseconds: 50" in text
    assert text.count("allow_ragged_batch: true") == text.count("input {")
    assert 'string_value: "candidate_scorer_users"' in (on / "rank_cached" / "config.pbtxt").read_text()
    # one rank_cached instance never has two users at once: it keeps the one-user scorer
    write_python_repository(tiny_build, tmp_path / "one", batch_users=3)
    assert 'string_value: "candidate_scorer"' in (tmp_path / "one" / "rank_cached" / "config.pbtxt").read_text()
    # a module build with fused attention, a SEP-counted length (n_hist + 1) and a user token
    # read per candidate: packed, proved on its users from the build's samples
    sep = _export("sep_pyramid", tmp_path / "sep")
    res = write_python_repository(sep, tmp_path / "seprepo")
    assert res["cross_user_batching"]["users_per_call"] == 8 and res["cross_user_batching"]["checked_worst"] <= TOL
    # a module build whose attention is not fused: left out with the reason, refused when asked
    mod = _export("fused_qkv_cls", tmp_path / "mod")
    res = write_python_repository(mod, tmp_path / "mrepo")
    assert res["cross_user_batching"]["users_per_call"] == 1
    assert "no SharedPrefixAttention" in res["cross_user_batching"]["why"]
    with pytest.raises(BuildError, match="--batch-users: .*no SharedPrefixAttention"):
        write_python_repository(mod, tmp_path / "mrepo2", batch_users=4)
    assert not (tmp_path / "mrepo2").exists()
    # the options configure the python backend's models only
    r = CliRunner().invoke(cli, ["serve-repo", str(tiny_build), "--out", str(tmp_path / "x"), "--batch-users", "4"])
    assert r.exit_code == 2 and "--batch-users does not apply to --backend onnxruntime" in r.stderr
    assert not (tmp_path / "x").exists()
    r = CliRunner().invoke(cli, ["serve-repo", str(tiny_build), "--out", str(tmp_path / "y"), "--backend", "python"])
    assert r.exit_code == 0 and "cross-user batching: up to 8 users per scorer call" in r.stdout
