"""Append instead of re-encode, HyFormer (models/append_hyformer.py): extending a cached user
state by each sequence's new events equals a full ``encode_user`` of the longer history
(scores and every slot's real K/V, pools, lengths), exactly when ``plan_append`` says so.

A seeded sweep over random HyFormer configurations (the three sequence encoders, 1-3
sequences, 1-3 layers, LONGER windows 1-8, both merge modes, both NS tokenizers) with three
appends each: within the window, random (k = 1..32 from any cached length 0..max), and past
the stream's end (the window slides: refused, saying so). LONGER's own limit is tight: a
forced append one token over it differs. Then chains of appends, several sequences growing
at once, and the refusals.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from onetrans_trt.data.requests import encode_request
from onetrans_trt.data.synthetic import synthetic_schema
from onetrans_trt.models.append import AppendRefused
from onetrans_trt.models.append_hyformer import (append_or_encode, append_user, can_append, enc_names,
                                                 encode_appendable, plan_append, seq_caps, sequence_tokens)
from onetrans_trt.models.config import ModelConfig
from onetrans_trt.models.hyformer import SEQ_LENGTH, SEQ_POOL, HyFormer
from tests.models.test_append import _history_request, _max_err, _upto
from tests.models.test_split_exactness import _randomize, _t

N_CONFIGS = 90  # x 3 appends each
TOL = 1e-5


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny tensors: one thread is ~50x faster


def random_config(seed: int) -> ModelConfig:
    rng = np.random.default_rng(50_000 + seed)
    n_seq = int(rng.integers(1, 4))
    schema = synthetic_schema(max_history=int(rng.integers(1, 40)), n_sequences=n_seq,
                              merge_mode=str(rng.choice(["timestamp_aware", "timestamp_agnostic"])),
                              emb_dim=int(rng.choice([2, 4, 8])), dense=bool(rng.integers(2)))
    heads = int(rng.choice([1, 2]))
    n_q = int(rng.integers(1, 3))
    tok = str(rng.choice(["auto_split", "group"]))
    if tok == "group":
        m = len(ModelConfig(schema=schema, d_model=8, n_heads=1, ns_tokenizer="group").resolved_ns_groups())
    else:
        m = int(rng.integers(1, 4))
    per = np.random.default_rng(70_000 + seed)  # per-sequence settings, their own draws
    seq = {}
    if seed % 4 == 3:  # every fourth: each sequence its own encoder, window, query count and cap
        seq = {"seq_encoders": [str(x) for x in per.choice(["transformer", "longer", "swiglu"], size=n_seq)],
               "seq_windows": [int(x) for x in per.integers(1, 9, size=n_seq)],
               "seq_queries": [int(x) for x in per.integers(1, 3, size=n_seq)],
               "seq_max_len": [int(x) for x in per.integers(1, schema.s_max_len + 3, size=n_seq)]}
    d = (sum(seq.get("seq_queries", [n_q] * n_seq)) + m) * heads * int(rng.choice([1, 2]))
    return ModelConfig(schema=schema, family="hyformer", d_model=d, n_heads=heads, n_layers=int(rng.integers(1, 4)),
                       ffn_mult=int(rng.integers(1, 3)), ns_tokenizer=tok, ns_tokens=m, hy_queries=n_q,
                       seq_encoder=["transformer", "longer", "swiglu"][seed % 3],
                       longer_window=int(rng.integers(1, 9)), tasks=["a", "b"][: int(rng.integers(1, 3))],
                       seq_attention="causal", hy_sink=bool(rng.integers(2)), hy_kv_norm=bool(rng.integers(2)),
                       hy_query_gen=str(rng.choice(["all_pools", "own_pool"])),
                       hy_head_input=str(rng.choice(["queries_ns", "queries"])), **seq)


def _model(cfg, seed):
    model = HyFormer(cfg).eval()
    _randomize(model, torch.Generator().manual_seed(seed))
    return model


def assert_same_user(kv_a, kv_b, tol=TOL) -> None:
    """Same per-sequence lengths and pools, and every slot's real K/V (any padding). K/V within
    ``tol`` of their own scale (at least 1): without the K/V norm (the paper's form) a deep
    layer's K/V reach |x| ~ 15, where float32 rounds at ~1e-6 per operation."""
    la, lb = torch.as_tensor(kv_a.extras[SEQ_LENGTH]), torch.as_tensor(kv_b.extras[SEQ_LENGTH])
    assert torch.equal(la.long(), lb.long()), (la, lb)
    assert _max_err(kv_a.extras[SEQ_POOL], kv_b.extras[SEQ_POOL]) <= tol
    n_seq = la.shape[1]
    for slot, (ka, kb, va, vb) in enumerate(zip(kv_a.keys, kv_b.keys, kv_a.values, kv_b.values)):
        n = int(lb[0, slot % n_seq])
        wa, wb = min(n, ka.shape[2]), min(n, kb.shape[2])
        assert wa == wb, (slot, ka.shape, kb.shape, n)  # the same real tokens are kept
        for a, b in ((ka, kb), (va, vb)):
            ref = torch.as_tensor(b)[:, :, b.shape[2] - wb:]
            scale = max(1.0, float(ref.abs().max())) if ref.numel() else 1.0
            assert _max_err(torch.as_tensor(a)[:, :, a.shape[2] - wa:], ref) <= tol * scale, slot


def real_err(kv_a, kv_b) -> float:
    lb = torch.as_tensor(kv_b.extras[SEQ_LENGTH])
    n_seq, worst = lb.shape[1], 0.0
    for slot, (ka, kb) in enumerate(zip([*kv_a.keys, *kv_a.values], [*kv_b.keys, *kv_b.values])):
        n = int(lb[0, (slot % len(kv_a.keys)) % n_seq])
        w = min(n, ka.shape[2], kb.shape[2])
        worst = max(worst, _max_err(ka[:, :, ka.shape[2] - w:], kb[:, :, kb.shape[2] - w:]))
    return worst


def check_append(model, cfg, req, n_old: int, k: int) -> dict:
    h_old, _ = encode_request(cfg.schema, _upto(req, n_old))
    h_new, ns = encode_request(cfg.schema, _upto(req, n_old + k))
    with torch.no_grad():
        kv_old = encode_appendable(model, _t(h_old))
        kv_full = model.encode_user(_t(h_new))
        want = model.score_candidates(kv_full, _t(ns))
        d = plan_append(cfg, h_old, h_new)
        kv_app, d2 = append_or_encode(model, kv_old, h_old, h_new)
        assert (d2.ok, d2.reason) == (d.ok, d.reason)
        # appended or re-encoded, the state is the full encode's, and stays appendable
        assert_same_user(kv_app, kv_full)
        assert _max_err(model.score_candidates(kv_app, _t(ns)), want) <= TOL
        assert all(n in kv_app.extras for n in enc_names(cfg))
        old_seq = [len(s["s_type"]) for s in sequence_tokens(cfg.schema, h_old, caps=seq_caps(cfg))]
        new_seq = [len(s["s_type"]) for s in sequence_tokens(cfg.schema, h_new, caps=seq_caps(cfg))]
        longer_limit = False
        if d.ok:
            assert d.k == sum(new_seq) - sum(old_seq)
            assert_same_user(append_user(model, kv_old, d.tokens or {}), kv_full)
        else:
            assert "slides" in d.reason, d.reason
            longer_limit = "LONGER" in d.reason
            if longer_limit:  # the tokens do extend: a forced append runs, and is wrong
                tokens = {str(j): {key: v[n:][None, :] for key, v in s.items()}
                          for j, (s, n) in enumerate(zip(sequence_tokens(cfg.schema, h_new, caps=seq_caps(cfg)), old_seq))}
                with pytest.raises(AppendRefused, match="slides"):
                    append_user(model, kv_old, tokens)
                forced = append_user(model, kv_old, tokens, force=True)
                assert real_err(forced, kv_full) > 1e-4
                assert _max_err(model.score_candidates(forced, _t(ns)), want) > 1e-6
    return {"ok": d.ok, "empty": sum(old_seq) == 0, "longer_limit": longer_limit,
            "slide": not d.ok and not longer_limit}


def sweep_cases(seed: int):
    cfg = random_config(seed)
    rng = np.random.default_rng(60_000 + seed)
    big = cfg.schema.max_history
    pairs = []
    k = int(rng.integers(1, min(33, big + 1)))  # within the stream
    pairs.append((int(rng.integers(0, big - k + 1)), k))
    k2 = int(rng.integers(1, 33))
    pairs.append((int(rng.choice([0, 1, int(rng.integers(0, big + 1)), big])), k2))
    if cfg.seq_encoder == "longer" and cfg.n_layers > 1 and cfg.longer_window > 1:
        w = cfg.longer_window
        pairs.append((int(rng.integers(1, w)) + 2, int(rng.integers(1, w))))  # around LONGER's limit
    else:
        pairs.append((big, int(rng.integers(1, 33))))  # a full stream: the oldest events leave it
    req = _history_request(cfg.schema, rng, max(n + kk for n, kk in pairs))
    return cfg, req, pairs


@pytest.mark.parametrize("seed", range(N_CONFIGS))
def test_append_equals_full_encode(seed):
    cfg, req, pairs = sweep_cases(seed)
    model = _model(cfg, seed)
    for n_old, k in pairs:
        check_append(model, cfg, req, n_old, k)


def test_sweep_covers_the_cases():
    """>= 100 exact appends over all three sequence encoders, and both kinds of refusal."""
    seen: dict = {}
    exact = 0
    for seed in range(N_CONFIGS):
        cfg, req, pairs = sweep_cases(seed)
        for n_old, k in pairs:
            h_old, _ = encode_request(cfg.schema, _upto(req, n_old))
            h_new, _ = encode_request(cfg.schema, _upto(req, n_old + k))
            d = plan_append(cfg, h_old, h_new)
            exact += d.ok
            why = "ok" if d.ok else ("longer" if "LONGER" in d.reason else "stream")
            for key in [(why, cfg.seq_encoder), (why, cfg.schema.merge_mode), ("seqs", cfg.schema.num_sequences),
                        ("layers", cfg.n_layers), ("empty", n_old == 0, d.ok), ("k", k == 1 or k >= 32 or "mid"),
                        ("per sequence", why if cfg.seq_max_len else None),
                        ("cap slides", "max_len" in d.reason)]:
                seen[key] = seen.get(key, 0) + 1
    assert exact >= 100, exact
    for want in [("per sequence", "ok"), ("per sequence", "stream"), ("cap slides", True),
                 ("ok", "transformer"), ("ok", "longer"), ("ok", "swiglu"), ("longer", "longer"),
                 ("stream", "transformer"), ("stream", "swiglu"), ("ok", "timestamp_aware"),
                 ("ok", "timestamp_agnostic"), ("seqs", 1), ("seqs", 3), ("layers", 1), ("layers", 3),
                 ("empty", True, True), ("k", True), ("k", "mid")]:
        assert want in seen, (want, seen)


# ---- case by case --------------------------------------------------------------------------
def _cfg(encoder: str, **kw) -> ModelConfig:
    schema = synthetic_schema(max_history=kw.pop("max_history", 24), n_sequences=kw.pop("n_sequences", 2))
    return ModelConfig(schema=schema, family="hyformer", d_model=12, n_heads=2, n_layers=kw.pop("n_layers", 2),
                       ns_tokens=4, hy_queries=1, seq_encoder=encoder, longer_window=kw.pop("longer_window", 4),
                       seq_attention=kw.pop("seq_attention", "causal"), **kw)


@torch.no_grad()
def test_a_chain_of_appends_equals_one_full_encode():
    """One event at a time from an empty history to the full one, each step appended to the
    last appended state (never re-encoded), equals the full encode at every step."""
    for encoder in ("transformer", "longer", "swiglu"):
        cfg = _cfg(encoder, longer_window=30, n_layers=3)  # a window that never slides here
        model = _model(cfg, 3)
        req = _history_request(cfg.schema, np.random.default_rng(7), 24)
        h_prev, _ = encode_request(cfg.schema, _upto(req, 0))
        kv = encode_appendable(model, _t(h_prev))
        for n in range(1, 25):
            h, ns = encode_request(cfg.schema, _upto(req, n))
            kv, d = append_or_encode(model, kv, h_prev, h)
            assert d.ok and d.k == 1, (encoder, n, d.reason)
            full = model.encode_user(_t(h))
            assert_same_user(kv, full)
            assert _max_err(model.score_candidates(kv, _t(ns)), model.score_candidates(full, _t(ns))) <= TOL
            h_prev = h


def test_longer_limit_is_the_window():
    cfg = _cfg("longer", longer_window=4, n_layers=2)
    assert can_append(cfg, [3, 0], [1, 0])[0]  # 3 + 1 <= 4
    assert not can_append(cfg, [3, 0], [2, 0])[0]  # 3 + 2 > 4: layer 1's window slides
    assert can_append(cfg, [30, 0], [4, 0])[0]  # k >= window: no cached token stays past layer 0
    assert can_append(cfg, [0, 0], [9, 3])[0]  # nothing cached
    one = _cfg("longer", longer_window=4, n_layers=1)
    assert can_append(one, [30, 2], [1, 1])[0]  # one layer: layer 0 sees every token
    for enc in ("transformer", "swiglu"):
        assert can_append(_cfg(enc), [23, 0], [1, 0])[0]


def test_same_history_is_the_cached_state_and_other_histories_re_encode():
    cfg = _cfg("transformer")
    model = _model(cfg, 1)
    req = _history_request(cfg.schema, np.random.default_rng(2), 10)
    h, _ = encode_request(cfg.schema, req)
    kv = encode_appendable(model, _t(h))
    same, d = append_or_encode(model, kv, h, h)
    assert d.ok and d.k == 0 and same is kv
    changed = _upto(req, 10)
    changed.history = [dict(ev) for ev in req.history]
    changed.history[3] = {**changed.history[3], "item_id": changed.history[3]["item_id"] % 50 + 1}
    h2, _ = encode_request(cfg.schema, changed)
    if not np.array_equal(h2["s_item_id"], h["s_item_id"]):
        out, d = append_or_encode(model, kv, h, h2)
        assert not d.ok and "not the cached" in d.reason
        assert_same_user(out, model.encode_user(_t(h2)))
    shorter, _ = encode_request(cfg.schema, _upto(req, 5))
    out, d = append_or_encode(model, kv, h, shorter)
    assert not d.ok
    assert_same_user(out, model.encode_user(_t(shorter)))
    # a state that is not the old history's is not extended
    longer_h, _ = encode_request(cfg.schema, _upto(req, 10))
    kv5 = encode_appendable(model, _t(shorter))
    out, d = append_or_encode(model, kv5, h, longer_h)
    assert not d.ok and "not its state" in d.reason
    # a plain encode_user state has no self-attention K/V: re-encoded, said
    out, d = append_or_encode(model, model.encode_user(_t(shorter)), shorter, h)
    assert not d.ok and "self-attention" in d.reason
    assert_same_user(out, model.encode_user(_t(h)))


def test_refusals():
    cfg = _cfg("transformer")
    model = _model(cfg, 0)
    from onetrans_trt.models.onetrans import OneTrans

    ot_cfg = ModelConfig.from_preset("tiny", cfg.schema)
    with pytest.raises(ValueError, match="HyFormer"):
        encode_appendable(OneTrans(ot_cfg), {})
    h, _ = encode_request(cfg.schema, _history_request(cfg.schema, np.random.default_rng(0), 4))
    kv = encode_appendable(model, _t(h))
    bad = {"0": {"s_type": np.array([[2]]), "s_item_id": np.array([[1]]),
                 **{f"s_{f}": np.array([[1]]) for f in cfg.schema.seq_fields if f != "item_id"}}}
    with pytest.raises(ValueError, match="s_type must be 1"):
        append_user(model, kv, bad)
    with pytest.raises(ValueError, match="unknown sequences"):
        append_user(model, kv, {"7": bad["0"]})
    with pytest.raises(AppendRefused, match="self-attention"):
        append_user(model, model.encode_user(_t(h)), {})


def test_bidirectional_sequence_attention_never_appends():
    """The paper's full self-attention: a new event changes every cached token's output, so
    the plan refuses (saying why), the first state (nothing cached) is still exact, and a
    swiglu encoder (no attention) appends whatever seq_attention says."""
    from onetrans_trt.models.append_hyformer import appendable

    for enc in ("transformer", "longer"):
        cfg = _cfg(enc, seq_attention="bidirectional", longer_window=16)
        model = _model(cfg, 1)
        assert not appendable(cfg)[0] and "bidirectional" in appendable(cfg)[1]
        assert not can_append(cfg, [3, 0], [1, 0])[0]
        assert can_append(cfg, [0, 0], [4, 2])[0]  # nothing cached: the full encode
        req = _history_request(cfg.schema, np.random.default_rng(4), 9)
        h_old, _ = encode_request(cfg.schema, _upto(req, 6))
        h_new, _ = encode_request(cfg.schema, req)
        kv = encode_appendable(model, _t(h_old))
        out, d = append_or_encode(model, kv, h_old, h_new)
        assert not d.ok and "bidirectionally" in d.reason
        assert_same_user(out, model.encode_user(_t(h_new)))
        tokens = plan_append(_cfg(enc, longer_window=16), h_old, h_new).tokens  # what a causal twin appends
        assert tokens
        with pytest.raises(ValueError, match="bidirectional"):
            append_user(model, kv, tokens, force=True)
    assert appendable(_cfg("swiglu", seq_attention="bidirectional"))[0]
