"""The exported HyFormer append graph (export/append_hyformer.py) run in ONNX Runtime: a
user's first appendable state (every event appended to the empty state) and every later
append equal a full PyTorch ``encode_user`` of the same history (each slot's real K/V,
lengths and pools <= 1e-5, and the scores), for the three sequence encoders, with
sequences that get no new event (zero-size inputs), k = 1..32 and cached histories 0..max.
Each export takes 10-40 s here: LONGER (the encoder with windows to keep) runs in make test,
transformer and SwiGLU in make test-heavy.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from onetrans_trt.data.requests import encode_request
from onetrans_trt.data.synthetic import synthetic_schema
from onetrans_trt.export.append_hyformer import (HyAppendGraph, append_feeds, append_input_names,
                                                 append_output_names, appended_state, empty_state,
                                                 export_hyformer_append)
from onetrans_trt.kv import UserKV
from onetrans_trt.models.append_hyformer import (append_user, encode_appendable, plan_append, seq_caps,
                                                 sequence_tokens)
from onetrans_trt.models.config import ModelConfig
from onetrans_trt.models.hyformer import HyFormer
from tests.models.test_append import _history_request, _upto
from tests.models.test_append_hyformer import _max_err, assert_same_user
from tests.models.test_split_exactness import _randomize, _t

TOL = 1e-5
ENCODERS = ("transformer", "longer", "swiglu", "mixed")
# "mixed": each sequence its own encoder, window, query count and cap (the paper's per-sequence settings)
MIXED = dict(seq_encoders=["transformer", "longer"], seq_windows=[3, 5], seq_queries=[1, 2], seq_max_len=[40, 9],
             ns_tokens=3)


def _model(enc: str):
    """A random HyFormer with this sequence encoder (2 sequences, 2 layers, up to 60 events)."""
    schema = synthetic_schema(max_history=60, n_sequences=2)
    kw = dict(MIXED) if enc == "mixed" else dict(seq_encoder=enc, ns_tokens=4)
    cfg = ModelConfig(schema=schema, family="hyformer", d_model=12, n_heads=2, n_layers=2, longer_window=5,
                      seq_attention="causal", **kw)
    model = HyFormer(cfg).eval()
    _randomize(model, torch.Generator().manual_seed(20 + ENCODERS.index(enc)))
    return model


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    """Each encoder's model and exported graph, exported on first use (an export takes 5-20 s)."""
    from onetrans_trt.runtime.ort_backend import ort_session

    class Lazy(dict):
        def __missing__(self, enc):
            model = _model(enc)
            path = tmp_path_factory.mktemp(f"hy-{enc}") / "user_encoder_append.onnx"
            export_hyformer_append(model, path, 18)
            self[enc] = (model, ort_session(path, threads=1), path)
            return self[enc]

    return Lazy()


def _run(sess, kv, tokens, hist, cfg) -> UserKV:
    names = [o.name for o in sess.get_outputs()]
    return appended_state(dict(zip(names, sess.run(names, append_feeds(kv, tokens, cfg)))), hist["s_length"], cfg)


def _torch(kv: UserKV) -> UserKV:
    t = torch.from_numpy
    return UserKV([t(np.asarray(a)) for a in kv.keys], [t(np.asarray(a)) for a in kv.values],
                  t(np.asarray(kv.lengths)), {k: t(np.asarray(v)) for k, v in kv.extras.items()})


def _all_tokens(cfg, hist):
    return {str(j): {key: v[None, :] for key, v in s.items()}
            for j, s in enumerate(sequence_tokens(cfg.schema, hist, caps=seq_caps(cfg))) if len(s["s_type"])}


def _check(model, kv, hist, ns) -> float:
    with torch.no_grad():
        full = model.encode_user(_t(hist))
        mine = _torch(kv)
        assert_same_user(mine, full)
        err = _max_err(model.score_candidates(mine, _t(ns)), model.score_candidates(full, _t(ns)))
    assert err <= TOL, err
    return err


def test_io_names(graphs):
    model, sess, _ = graphs["longer"]
    cfg = model.cfg
    assert [i.name for i in sess.get_inputs()] == append_input_names(cfg) == HyAppendGraph(model).input_names
    assert [o.name for o in sess.get_outputs()] == append_output_names(cfg)
    assert "new1_s_type" in append_input_names(cfg) and "user_enc_k_3" in append_input_names(cfg)
    assert append_output_names(cfg)[-1] == "user_enc_v_3_new"
    swiglu = _model("swiglu").cfg
    assert not any("enc" in n for n in append_input_names(swiglu))  # no self-attention, no extra state


@pytest.mark.parametrize("enc", [pytest.param("transformer", marks=pytest.mark.heavy), "longer",
                                 pytest.param("swiglu", marks=pytest.mark.heavy),
                                 pytest.param("mixed", marks=pytest.mark.heavy)])
def test_first_state_and_appends_equal_full_encodes(graphs, enc):
    # make test runs LONGER (windows, both kinds of keep); make test-heavy the other two
    """25 cases per encoder: a random cached length and k = 1..32 new events; the first state
    comes from the empty state through the graph, the append from it; refusals re-encode."""
    model, sess, _ = graphs[enc]
    cfg = model.cfg
    rng = np.random.default_rng(ENCODERS.index(enc))
    seen = {"append": 0, "refused": 0, "zero_size": 0}
    for case in range(25):
        req = _history_request(cfg.schema, rng, 100)
        n_old = int(rng.choice([0, 1, int(rng.integers(0, 61)), int(rng.integers(0, 30)), 60]))
        k = 1 if case < 3 else int(rng.integers(1, 33))  # one event: the other sequence gets none (zero-size)
        h_old, _ = encode_request(cfg.schema, _upto(req, n_old))
        h_new, ns = encode_request(cfg.schema, _upto(req, n_old + k))
        kv_old = _run(sess, empty_state(cfg), _all_tokens(cfg, h_old), h_old, cfg)
        _check(model, kv_old, h_old, encode_request(cfg.schema, _upto(req, n_old))[1])
        d = plan_append(cfg, h_old, h_new)
        if d.ok:
            seen["append"] += 1
            seen["zero_size"] += len(d.tokens or {}) < cfg.schema.num_sequences
            kv = _run(sess, kv_old, d.tokens, h_new, cfg)
        else:
            seen["refused"] += 1
            assert "slides" in d.reason
            kv = _run(sess, empty_state(cfg), _all_tokens(cfg, h_new), h_new, cfg)
        _check(model, kv, h_new, ns)
        # the graph's state appends again, like the torch one (a chain of two)
        h_more, ns_more = encode_request(cfg.schema, _upto(req, n_old + k + 2))
        d2 = plan_append(cfg, h_new, h_more)
        if d2.ok:
            _check(model, _run(sess, kv, d2.tokens, h_more, cfg), h_more, ns_more)
    assert seen["append"] >= 8 and seen["refused"] >= 1 and seen["zero_size"] >= 1, seen


def test_a_torch_appendable_state_feeds_the_graph(graphs):
    """A padded state from encode_appendable (torch) is trimmed by append_feeds and appended."""
    model, sess, _ = graphs["longer"]
    cfg = model.cfg
    req = _history_request(cfg.schema, np.random.default_rng(4), 12)
    h_old, _ = encode_request(cfg.schema, _upto(req, 3))  # LONGER window 5: 3 cached + 1 new stays inside
    h_new, ns = encode_request(cfg.schema, _upto(req, 4))
    with torch.no_grad():
        kv_old = encode_appendable(model, _t(h_old))
    d = plan_append(cfg, h_old, h_new)
    assert d.ok
    _check(model, _run(sess, kv_old, d.tokens, h_new, cfg), h_new, ns)
    with pytest.raises(Exception, match="self-attention"):
        append_feeds(UserKV(kv_old.keys, kv_old.values, kv_old.lengths,
                            {k: v for k, v in kv_old.extras.items() if not k.startswith("enc_")}), d.tokens, cfg)


def test_an_appended_state_is_laid_out_as_the_user_encoder_lays_it_out():
    """Each slot padded to the width the plain encoder gives it (per sequence: its cap, a LONGER
    window), never to one common width: a LONGER slot wider than its window would count the
    padding as real keys (its seq_length >= the width means "all real"). Torch only: the
    append's real-token outputs, named as the graph names them."""
    model = _model("mixed")
    cfg = model.cfg
    rng = np.random.default_rng(5)
    for n in (0, 1, 4, 12, 30, 60):
        req = _history_request(cfg.schema, rng, 60)
        hist, ns = encode_request(cfg.schema, _upto(req, n))
        with torch.no_grad():
            kv = append_user(model, _torch(empty_state(cfg)), _all_tokens(cfg, hist),
                             s_length=torch.from_numpy(hist["s_length"]))
            full = model.encode_user(_t(hist))
        outs = {f"user_{kv_}_{i}_new": getattr(kv, {"k": "keys", "v": "values"}[kv_])[i].numpy()
                for i in range(len(kv.keys)) for kv_ in "kv"}
        outs.update({f"user_{k}_new": v.numpy() for k, v in kv.extras.items()})
        laid = appended_state(outs, hist["s_length"], cfg)
        assert [k.shape[2] for k in laid.keys] == [max(1, k.shape[2]) for k in full.keys], n
        with torch.no_grad():
            err = _max_err(model.score_candidates(_torch(laid), _t(ns)), model.score_candidates(full, _t(ns)))
        assert err <= TOL, (n, err)
