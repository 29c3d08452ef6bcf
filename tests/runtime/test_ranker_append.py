"""The Ranker with ``store=`` and ``append=True`` (runtime/append.py): a user whose history
grew since the stored one gets only the new events encoded against the stored state, and
every answer equals a Ranker that encodes every history in full (<= 1e-5). Torch backends
(OneTrans, HyFormer), the ONNX Runtime build with its append graph, a Redis store shared by
two Rankers, the fallbacks (changed history, full stream, store down) and the refusals.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from onetrans_trt.data.synthetic import synthetic_schema
from onetrans_trt.errors import InputError
from onetrans_trt.models.config import ModelConfig
from onetrans_trt.models.hyformer import HyFormer
from onetrans_trt.models.onetrans import OneTrans
from onetrans_trt.runtime.ranker import Ranker
from tests.models.test_append import _history_request, _upto
from tests.models.test_split_exactness import _randomize

TOL = 1e-5


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny tensors: one thread is ~50x faster


def _onetrans(max_history=20, **kw):
    cfg = ModelConfig.from_preset("tiny", synthetic_schema(max_history=max_history), pyramid="off", **kw)
    model = OneTrans(cfg).eval()
    _randomize(model, torch.Generator().manual_seed(0))
    return model


def _hyformer(encoder="transformer", max_history=20):
    schema = synthetic_schema(max_history=max_history, n_sequences=2)
    cfg = ModelConfig(schema=schema, family="hyformer", d_model=12, n_heads=2, n_layers=2, ns_tokens=4,
                      seq_encoder=encoder, longer_window=6, seq_attention="causal")
    model = HyFormer(cfg).eval()
    _randomize(model, torch.Generator().manual_seed(1))
    return model


def grow(ranker: Ranker, plain: Ranker, req, counts) -> list[dict]:
    """Rank ``req`` cut to each of ``counts`` events in turn; every answer equals ``plain``'s."""
    said = []
    for n in counts:
        r = _upto(req, n)
        a, b = ranker.rank(r), plain.rank(r)
        assert np.abs(a.logits - b.logits).max() <= TOL, (n, a.user_state)
        assert a.to_json()["user_state"] == a.user_state
        said.append(a.user_state)
    return said


@pytest.mark.parametrize("family", ["onetrans", "hyformer-transformer", "hyformer-longer", "hyformer-swiglu"])
def test_torch_ranker_appends_each_new_event(family):
    model = _onetrans() if family == "onetrans" else _hyformer(family.split("-")[1])
    ranker = Ranker.from_model(model, store="memory://", append=True)
    plain = Ranker.from_model(model)
    req = _history_request(model.cfg.schema, np.random.default_rng(3), 20)
    req.user_key = "u1"
    said = grow(ranker, plain, req, range(0, 21))
    assert said[0]["source"] == "encoded" and "no earlier history" in said[0]["reason"]
    sources = [s["source"] for s in said[1:]]
    if family == "hyformer-longer":  # LONGER's window (6, 2 layers) slides once a sequence passes it
        assert "appended" in sources and "encoded" in sources
        assert all("slides" in s["reason"] for s in said[1:] if s["source"] == "encoded")
    else:
        assert sources == ["appended"] * 20, said
        assert all(s["new_events"] == 1 for s in said[1:])
        assert ranker.encoder_runs == 1 and ranker.append_runs == 20
    assert ranker.encoder_runs + ranker.append_runs == 21
    # the same history again: the stored state
    again = ranker.rank(_upto(req, 20))
    assert again.user_state["source"] == "stored"


def test_fallbacks_say_why():
    model = _onetrans(max_history=12)
    ranker = Ranker.from_model(model, store="memory://", append=True)
    plain = Ranker.from_model(model)
    req = _history_request(model.cfg.schema, np.random.default_rng(5), 16)
    req.user_key = "u"
    said = grow(ranker, plain, req, [4, 12, 13])
    assert [s["source"] for s in said] == ["encoded", "appended", "encoded"]
    assert "slides" in said[2]["reason"]  # the stream is full (12): one more event slides it
    changed = _upto(req, 14)
    changed.history = [dict(ev) for ev in changed.history]
    changed.history[-3]["item_id"] = changed.history[-3]["item_id"] % 40 + 1
    b = ranker.rank(changed)
    assert b.user_state["source"] == "encoded"
    assert np.abs(b.logits - plain.rank(changed).logits).max() <= TOL
    anon = _upto(req, 3)
    anon.user_key = None
    assert "no user_key" in ranker.rank(anon).user_state["reason"]


def test_ort_build_appends_through_its_graph(movielens, tiny_build, tmp_path):
    from onetrans_trt.export.append import export_append
    from onetrans_trt.export.api import read_manifest

    build = tmp_path / "b"
    shutil.copytree(tiny_build, build)
    export_append(read_manifest(build)["checkpoint"]["path"], build)
    ranker = Ranker.load(build, backend="ort", store="memory://", append=True, threads=1)
    plain = Ranker.load(build, backend="ort", threads=1)
    appended = 0
    for i, (req, _) in enumerate(movielens.requests(3, n_candidates=20, seed=11)):
        req.user_key = f"user{i}"
        n = len(req.history)
        said = grow(ranker, plain, req, [max(0, n - 6), n - 4, n - 3, n])
        appended += sum(s["source"] == "appended" for s in said)
    assert appended >= 6, appended  # real histories (ties in time may reorder a few: then encoded)
    assert ranker.append_runs == appended


def test_two_rankers_share_a_redis_store_and_survive_it_going_away(redis_server):
    model = _onetrans()
    first = Ranker.from_model(model, store=redis_server.url, append=True)
    second = Ranker.from_model(model, store=redis_server.url, append=True)
    plain = Ranker.from_model(model)
    req = _history_request(model.cfg.schema, np.random.default_rng(9), 16)
    req.user_key = "shared"
    assert grow(first, plain, req, [8])[0]["source"] == "encoded"
    said = grow(second, plain, req, [11, 12])
    assert [s["source"] for s in said] == ["appended", "appended"] and said[0]["new_events"] == 3
    assert second.encoder_runs == 0 and second.append_runs == 2
    redis_server.stop()
    said = grow(second, plain, req, [14])  # the store is gone: encoded in full, still correct
    assert said[0]["source"] == "encoded"
    assert second.encoder_runs == 1


def test_refusals(tiny_build, tiny_ckpt):
    model = _onetrans()
    with pytest.raises(InputError, match="needs a store"):
        Ranker.from_model(model, append=True)
    with pytest.raises(InputError, match="export CKPT --out .* --append"):
        Ranker.load(tiny_build, backend="ort", store="memory://", append=True)
    with pytest.raises(InputError, match="encodes no user state"):
        Ranker.load(tiny_ckpt, backend="torch-unified", store="memory://", append=True)
    agnostic = ModelConfig.from_preset("tiny", synthetic_schema(max_history=8, merge_mode="timestamp_agnostic"))
    with pytest.raises(InputError, match="SEP"):
        Ranker.from_model(OneTrans(agnostic).eval(), store="memory://", append=True)
    bidi = _hyformer()
    bidi = HyFormer(ModelConfig(**{**{f: getattr(bidi.cfg, f) for f in ("schema", "family", "d_model", "n_heads",
                                                                       "n_layers", "ns_tokens", "seq_encoder")},
                                   "seq_attention": "bidirectional"})).eval()
    with pytest.raises(InputError, match="bidirectionally"):
        Ranker.from_model(bidi, store="memory://", append=True)


def test_cli_rank_append(tiny_ckpt, movielens, tmp_path):
    import json

    from click.testing import CliRunner

    from onetrans_trt.cli import cli

    req, _ = movielens.requests(1, n_candidates=5, seed=21)[0]
    req.user_key = "cli-user"
    assert len(req.history) > 60  # its newest 50 events fill the stream
    lines = [json.dumps(_upto(req, m).to_json()) for m in (10, 11, 14, 60, 61)]
    path = tmp_path / "reqs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    r = CliRunner().invoke(cli, ["rank", str(tiny_ckpt), "--request", str(path), "--store", "memory://", "--append"])
    assert r.exit_code == 0, r.output[-2000:]
    out = json.loads(r.stdout)
    # 14 -> 60: 46 new events fill every window past layer 0 (tiny: [50, 4]), exact though 10 cached
    # ones fall out of the stream; 60 -> 61: one new event slides the full stream: encoded
    assert [o["user_state"]["source"] for o in out] == ["encoded", "appended", "appended", "appended", "encoded"], out
    assert "slides" in out[4]["user_state"]["reason"]
    plain = json.loads(CliRunner().invoke(cli, ["rank", str(tiny_ckpt), "--request", str(path)]).stdout)
    for a, b in zip(out, plain):
        assert "user_state" not in b
        assert np.abs(np.array(a["logits"]["like"]) - np.array(b["logits"]["like"])).max() <= TOL
    bad = CliRunner().invoke(cli, ["rank", str(tiny_ckpt), "--request", str(path), "--append"])
    assert bad.exit_code == 2 and "--append needs --store" in bad.output


@pytest.mark.heavy  # trains and exports a HyFormer through the CLI (about a minute); make test-heavy
def test_ort_hyformer_build_appends(movielens, tmp_path):
    """A HyFormer trained on MovieLens, exported with ``--append`` (the CLI): the ORT Ranker's
    first state of each user comes from the append graph (every event appended to the empty
    state), later ones are appended, and every answer equals the plain ORT Ranker's."""
    import json

    from click.testing import CliRunner

    from onetrans_trt.cli import cli

    for args in (["train", "--model", "hyformer", "--preset", "tiny", "--out", tmp_path / "ck", "--epochs", "1",
                  "--limit", "3000", "--seq-attention", "causal"],
                 ["export", tmp_path / "ck", "--out", tmp_path / "build", "--samples", "1", "--append", "--json"]):
        r = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
        assert r.exit_code == 0, r.output[-2000:]
    entry = json.loads(r.stdout)["manifest"]["graphs"]["user_encoder_append"]
    assert entry["seq_encoder"] == "transformer"
    build = tmp_path / "build"
    ranker = Ranker.load(build, backend="ort", store="memory://", append=True, threads=1)
    plain = Ranker.load(build, backend="ort", threads=1)
    sources: list[str] = []
    for i, (req, _) in enumerate(movielens.requests(3, n_candidates=12, seed=5)):
        req.user_key = f"hy{i}"
        said = grow(ranker, plain, req, [5, 6, 9, 30, 49, 50, 60])
        assert said[0]["source"] == "encoded"
        sources += [s["source"] for s in said]
    appended = sources.count("appended")
    assert appended >= 9 and ranker.append_runs == appended
    assert ranker.encoder_runs == sources.count("encoded")  # a short history cut longer is "stored"
