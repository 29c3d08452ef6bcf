"""Append instead of re-encode (models/append.py): extending a cached OneTrans user state by
k new S-tokens equals a full ``encode_user`` of the longer history, exactly when
``can_append`` says so, and the condition is tight.

A seeded sweep over random tiny models (layers 1-4, pyramid off / linear / explicit counts,
slice-first and compute-then-slice, 1-3 sequences) with three appends each: at the limit,
random, and one S-token over the limit (refused, and a forced append differs). Then the
MovieLens schema with real users' growing histories on a trained tiny model, several users
at once, the fallbacks (timestamp-agnostic, a changed or shorter history, another family).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from onetrans_trt.data.requests import Request, encode_events, encode_request, merge_stream, pad_streams
from onetrans_trt.data.synthetic import synthetic_request, synthetic_schema
from onetrans_trt.models.append import (AppendRefused, append_or_encode, append_user, can_append, new_tokens,
                                        plan_append, windows)
from onetrans_trt.models.config import ModelConfig
from onetrans_trt.models.onetrans import OneTrans
from tests.models.test_split_exactness import _randomize, _t

N_CONFIGS = 80  # x 2-3 appends each
TOL = 1e-5


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny tensors: one thread is ~50x faster


def _history_request(schema, rng: np.random.Generator, n: int, n_candidates: int = 3) -> Request:
    """A random request whose events have strictly increasing timestamps, so the history
    truncated to its first i events is a prefix of the stream (no ties to reorder)."""
    req = synthetic_request(schema, rng, n_history=n, n_candidates=n_candidates)
    t = 1.6e9
    for ev in req.history:
        t += 1.0 + float(rng.exponential(600.0))
        ev["timestamp"] = t
    return req


def _upto(req: Request, n: int) -> Request:
    r = copy.copy(req)
    r.history = req.history[:n]
    return r


def _max_err(a, b) -> float:
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a - b).abs().max()) if a.numel() else 0.0


def assert_same_state(kv_a, kv_b, tol=TOL):
    assert kv_a.n_layers == kv_b.n_layers
    for lay, (ka, kb, va, vb) in enumerate(zip(kv_a.keys, kv_b.keys, kv_a.values, kv_b.values)):
        assert ka.shape == kb.shape, (lay, ka.shape, kb.shape)
        assert _max_err(ka, kb) <= tol and _max_err(va, vb) <= tol, lay
    assert torch.equal(torch.as_tensor(kv_a.lengths).long(), torch.as_tensor(kv_b.lengths).long())


def assert_same_real(kv_a, kv_b, tol=TOL):
    """The same real S-tokens' K/V (the newest ``min(length, width)`` columns), any padding."""
    lengths = torch.as_tensor(kv_b.lengths).long()
    assert torch.equal(torch.as_tensor(kv_a.lengths).long(), lengths)
    for a, b in zip([*kv_a.keys, *kv_a.values], [*kv_b.keys, *kv_b.values]):
        assert a.shape[2] >= b.shape[2]
        for u, n in enumerate(lengths.tolist()):
            w = min(n, b.shape[2])
            assert _max_err(a[u, :, a.shape[2] - w:], b[u, :, b.shape[2] - w:]) <= tol


def state_err(kv_a, kv_b) -> float:
    return max(_max_err(a, b) for a, b in zip([*kv_a.keys, *kv_a.values], [*kv_b.keys, *kv_b.values]))


def check_append(model, cfg, req: Request, n_old: int, k: int) -> dict:
    """Append the events ``n_old .. n_old+k`` of ``req`` to the state of its first ``n_old``;
    checks the outcome against ``can_append`` and a full encode; returns what happened."""
    h_old, _ = encode_request(cfg.schema, _upto(req, n_old))
    h_new, ns = encode_request(cfg.schema, _upto(req, n_old + k))
    n_stream_old = int(h_old["s_length"][0])
    with torch.no_grad():
        kv_old = model.encode_user(_t(h_old))
        kv_full = model.encode_user(_t(h_new))
        full_scores = model.score_candidates(kv_full, _t(ns))
        d = plan_append(cfg, h_old, h_new, k=k)
        kk, tokens, said = new_tokens(cfg.schema, h_old, h_new, k=k)
        assert kk == k == d.k, said  # every history here extends the cached one
        ok, why = can_append(cfg, n_stream_old, k)
        assert d.ok == ok and why in d.reason
        kv_app, d2 = append_or_encode(model, kv_old, h_old, h_new, k=k)
        assert d2.ok == d.ok
        # with or without the append, the state is the full encode's
        assert_same_state(kv_app, kv_full)
        assert _max_err(model.score_candidates(kv_app, _t(ns)), full_scores) <= TOL
        forced = append_user(model, kv_old, tokens, force=True)
        if d.ok:
            assert_same_state(append_user(model, kv_old, tokens), kv_full)
            assert_same_state(forced, kv_full)
            static = append_user(model, kv_old, tokens, widths="static")  # an exported graph's widths
            assert_same_real(static, kv_full)
            assert _max_err(model.score_candidates(static, _t(ns)), full_scores) <= TOL
        else:
            assert "slides" in d.reason, d.reason
            with pytest.raises(AppendRefused, match="slides"):
                append_user(model, kv_old, tokens)
            # tight: appending anyway (over the limit by as little as one S-token) is wrong
            assert state_err(forced, kv_full) > 1e-4
            assert [a.shape for a in forced.keys] == [b.shape for b in kv_full.keys]
    return {"ok": d.ok, "n_old": n_stream_old, "k": k, "drop": n_old + k > cfg.schema.s_max_len}


def limit_for(cfg, k: int) -> int | None:
    """The most cached S-tokens k new ones append to exactly (None: any number)."""
    m = windows(cfg)
    deepest = max((lay for lay in range(1, len(m)) if m[lay] > k), default=None)
    return None if deepest is None else m[deepest - 1] - k


def random_config(seed: int) -> ModelConfig:
    rng = np.random.default_rng(seed)
    max_history = int(rng.integers(1, 40))
    schema = synthetic_schema(max_history=max_history, n_sequences=int(rng.integers(1, 4)),
                              emb_dim=int(rng.choice([2, 4, 8])), dense=bool(rng.integers(2)))
    n_layers = int(rng.integers(1, 5))
    kind = ["linear", "off", "linear", "list"][seed % 4]
    if kind == "list":
        counts = sorted(rng.integers(1, schema.s_max_len + 4, size=max(n_layers - 1, 0)).tolist(), reverse=True)
        pyramid: str | list[int] = [int(x) for x in counts]
    else:
        pyramid = kind
    return ModelConfig.from_preset("tiny", schema, n_layers=n_layers, pyramid=pyramid,
                                   final_queries=int(rng.integers(1, max_history + 2)),
                                   pyramid_impl=str(rng.choice(["slice_first", "compute_then_slice"])))


def sweep_cases(seed: int):
    """(cfg, request, [(n_old, k), ...]): at the limit, random, one over the limit."""
    cfg = random_config(seed)
    rng = np.random.default_rng(1000 + seed)
    big = cfg.schema.max_history
    k = int(rng.integers(1, 33))
    lim = limit_for(cfg, k)
    pairs = []
    if lim is None:  # k new tokens reach past layer 0's successors: any cached length works
        pairs.append((int(rng.integers(0, big + 1)), k))
    else:
        pairs.append((min(lim, big), k))  # at the limit (or the longest history)
        if lim + 1 <= big:
            pairs.append((lim + 1, k))  # one over: refused
    k2 = int(rng.integers(1, 33))
    pairs.append((int(rng.choice([0, 1, int(rng.integers(0, big + 1)), big])), k2))
    req = _history_request(cfg.schema, rng, max(n + kk for n, kk in pairs))
    return cfg, req, pairs


@pytest.mark.parametrize("seed", range(N_CONFIGS))
def test_append_equals_full_encode(seed):
    cfg, req, pairs = sweep_cases(seed)
    model = OneTrans(cfg).eval()
    _randomize(model, torch.Generator().manual_seed(seed))
    for n_old, k in pairs:
        check_append(model, cfg, req, n_old, k)


def test_sweep_covers_the_cases():
    """>= 100 exact appends, on linear and off pyramids, and the refusals the issue names."""
    seen: dict = {}
    exact = 0
    for seed in range(N_CONFIGS):
        cfg, req, pairs = sweep_cases(seed)
        kind = cfg.pyramid if isinstance(cfg.pyramid, str) else "list"
        for n_old, k in pairs:
            h_old, _ = encode_request(cfg.schema, _upto(req, n_old))
            n = int(h_old["s_length"][0])
            ok, _ = can_append(cfg, n, k)
            exact += ok
            for key in [("ok" if ok else "refused", kind), ("k", k == 1 or k >= 32 or "mid"),
                        ("empty" if n == 0 else "full" if n == cfg.schema.max_history else "part", ok),
                        ("drop", n + k > cfg.schema.s_max_len, ok), ("layers", cfg.n_layers), cfg.pyramid_impl]:
                seen[key] = seen.get(key, 0) + 1
    assert exact >= 100, exact
    for want in [("ok", "linear"), ("ok", "off"), ("ok", "list"), ("refused", "linear"), ("refused", "off"),
                 ("refused", "list"), ("k", True), ("k", "mid"), ("empty", True), ("full", True), ("full", False),
                 ("part", True), ("part", False), ("drop", True, True), ("drop", True, False),
                 ("layers", 1), ("layers", 4), "slice_first", "compute_then_slice"]:
        assert want in seen, want


# ---- the condition, case by case ----------------------------------------------------------
def _model(schema, seed=0, **kw):
    cfg = ModelConfig.from_preset("tiny", schema, **kw)
    model = OneTrans(cfg).eval()
    _randomize(model, torch.Generator().manual_seed(seed))
    return cfg, model


def test_off_pyramid_appends_until_the_stream_is_full_and_not_one_more():
    schema = synthetic_schema(max_history=8)
    cfg, model = _model(schema, n_layers=3, pyramid="off")
    assert windows(cfg) == [8, 8, 8]
    req = _history_request(schema, np.random.default_rng(0), 12)
    assert check_append(model, cfg, req, 7, 1)["ok"]
    assert check_append(model, cfg, req, 0, 8)["ok"]
    r = check_append(model, cfg, req, 8, 1)  # the stream drops its oldest: layer 0's outputs change
    assert not r["ok"] and r["drop"]
    assert "layer 1's K/V hold at most 8 S-tokens and 8 cached + 1 new > 8" in can_append(cfg, 8, 1)[1]
    cfg2 = ModelConfig.from_preset("tiny", schema, pyramid="off")  # 2 layers: layer 0's window limits
    assert "the stream holds at most s_max_len = 8 S-tokens" in can_append(cfg2, 8, 1)[1]


def test_linear_pyramid_limit_is_the_second_to_last_window():
    """3 layers, s_max_len 12, final 4: windows [12, 8, 4]. The last window may slide (it only
    holds K/V); layer 1's (8) may not while a cached token still reaches layer 2 (k < 4)."""
    schema = synthetic_schema(max_history=12)
    cfg, model = _model(schema, n_layers=3, pyramid="linear", final_queries=4)
    assert windows(cfg) == [12, 8, 4]
    req = _history_request(schema, np.random.default_rng(1), 24)
    assert check_append(model, cfg, req, 6, 1)["ok"]  # the last layer's window (4) slides: fine
    assert check_append(model, cfg, req, 7, 1)["ok"]  # 7 + 1 = 8: at the limit
    refused = can_append(cfg, 8, 1)
    assert not refused[0] and "layer 1's K/V hold at most 8" in refused[1] and "at layer 2" in refused[1]
    assert not check_append(model, cfg, req, 8, 1)["ok"]  # one over: layer 2's cached K/V change
    # k = 4 new fill layer 2's window: layer 1 may slide, layer 0's (12) may not
    assert check_append(model, cfg, req, 8, 4)["ok"]
    assert not check_append(model, cfg, req, 9, 4)["ok"]
    assert "the stream holds at most s_max_len = 12" in can_append(cfg, 9, 4)[1]
    # k >= m[1] = 8: no cached token reaches layer 1, exact even when the stream drops old ones
    r = check_append(model, cfg, req, 12, 8)
    assert r["ok"] and r["drop"]


def test_two_layer_tiny_appends_up_to_the_whole_stream():
    """The tiny preset (2 layers, linear, final 4): only the last window (4) is small, and it
    may slide, so every history below s_max_len appends."""
    schema = synthetic_schema(max_history=10)
    cfg, model = _model(schema)
    assert windows(cfg) == [10, 4]
    req = _history_request(schema, np.random.default_rng(2), 20)
    for n_old in range(0, 10):
        assert check_append(model, cfg, req, n_old, 10 - n_old)["ok"]
    assert not check_append(model, cfg, req, 10, 1)["ok"]
    assert check_append(model, cfg, req, 10, 4)["ok"]  # k >= m[1]: exact with 4 dropped


def test_one_layer_always_appends():
    schema = synthetic_schema(max_history=6)
    cfg, model = _model(schema, n_layers=1)
    req = _history_request(schema, np.random.default_rng(3), 20)
    for n_old, k in [(0, 1), (6, 1), (6, 7), (3, 9)]:
        assert check_append(model, cfg, req, n_old, k)["ok"]


def test_empty_cached_history_appends():
    schema = synthetic_schema(max_history=8)
    cfg, model = _model(schema, n_layers=3, pyramid="linear", final_queries=2)
    req = _history_request(schema, np.random.default_rng(4), 8)
    for k in (1, 2, 5, 8):
        r = check_append(model, cfg, req, 0, k)
        assert r["ok"] and r["n_old"] == 0
    assert "empty cached history" in can_append(cfg, 0, 3)[1]


def test_same_history_is_the_cached_state():
    schema = synthetic_schema(max_history=8)
    cfg, model = _model(schema)
    h, _ = encode_request(schema, _history_request(schema, np.random.default_rng(5), 5))
    with torch.no_grad():
        kv = model.encode_user(_t(h))
        got, d = append_or_encode(model, kv, h, h)
    assert d.ok and d.k == 0 and got is kv
    assert append_user(model, kv, {key: v[:, :0] for key, v in h.items() if key != "s_length"}) is kv


def test_several_users_at_once_equal_a_padded_full_encode():
    """U = 3 users of different cached lengths, the same k new events each: the appended state
    equals encode_user of the new streams padded to the longest, padding columns included."""
    schema = synthetic_schema(max_history=16)
    cfg, model = _model(schema, n_layers=3, pyramid="linear", final_queries=3)
    rng = np.random.default_rng(6)
    reqs = [_history_request(schema, rng, n) for n in (0, 5, 8)]
    k = 2
    for r in reqs:
        r.history += _history_request(schema, rng, k).history
        t0 = max([e["timestamp"] for e in r.history[:-k]], default=0.0)
        for i, e in enumerate(r.history[-k:]):
            e["timestamp"] = t0 + 1 + i
    streams_old = [merge_stream(schema, encode_events(schema, r.history[:-k])) for r in reqs]
    streams_new = [merge_stream(schema, encode_events(schema, r.history)) for r in reqs]
    h_old, h_new = pad_streams(schema, streams_old), pad_streams(schema, streams_new)
    tokens = {key: v[:, -k:] for key, v in h_new.items() if key != "s_length"}
    with torch.no_grad():
        kv_old = model.encode_user(_t(h_old))
        full = model.encode_user(_t(h_new))
        assert can_append(cfg, kv_old.lengths, k)[0]
        assert_same_state(append_user(model, kv_old, tokens), full)
        # each user alone, scored: the same as its own full encode
        for u, r in enumerate(reqs):
            hu, ns = encode_request(schema, r)
            one = model.encode_user(_t(hu))
            app = append_user(model, kv_old, tokens)
            n_u = int(app.lengths[u])
            for a, b in zip(app.keys + app.values, one.keys + one.values):
                w = min(n_u, b.shape[2])
                assert _max_err(a[u:u + 1, :, a.shape[2] - w:], b[:, :, b.shape[2] - w:]) <= TOL
    # the limit is the longest user's: 8 + 2 <= windows[1] = 10, and 9 + 2 is refused for the batch
    assert windows(cfg) == [16, 10, 3]
    assert not can_append(cfg, [0, 5, 9], 2)[0] and can_append(cfg, torch.tensor([0, 5, 8]), 2)[0]


# ---- fallbacks ------------------------------------------------------------------------------
def test_timestamp_agnostic_falls_back():
    schema = synthetic_schema(max_history=8, merge_mode="timestamp_agnostic")
    cfg, model = _model(schema, pyramid="off")
    req = _history_request(schema, np.random.default_rng(7), 6)
    h_old, _ = encode_request(schema, _upto(req, 3))
    h_new, _ = encode_request(schema, req)
    ok, why = can_append(cfg, 3, 3)
    assert not ok and "[SEP]" in why
    with torch.no_grad():
        kv_old = model.encode_user(_t(h_old))
        got, d = append_or_encode(model, kv_old, h_old, h_new)
        assert not d.ok and "[SEP]" in d.reason
        assert_same_state(got, model.encode_user(_t(h_new)))
        tokens = {key: np.ones((1, 2), dtype=np.int64) for key in h_new if key != "s_length"}  # 2 events
        with pytest.raises(AppendRefused, match="SEP"):
            append_user(model, kv_old, tokens)
        with pytest.raises(ValueError, match="no \\[SEP\\]"):  # the stream's own tail ends with a [SEP]
            append_user(model, kv_old, {key: v[:, -3:] for key, v in h_new.items() if key != "s_length"})


@pytest.mark.parametrize("change", ["edited", "removed", "earlier", "tie", "shorter", "wrong_k"])
def test_a_history_that_does_not_extend_the_cached_one_is_refused(change):
    schema = synthetic_schema(max_history=16, n_sequences=3)
    cfg, model = _model(schema, pyramid="off")
    rng = np.random.default_rng(8)
    req = _history_request(schema, rng, 10)
    old = _upto(req, 6)
    new = copy.deepcopy(_upto(req, 9))
    k = None
    if change == "edited":
        new.history[2]["item_id"] = (new.history[2]["item_id"] + 1) % 500
    elif change == "removed":
        del new.history[1]
    elif change == "earlier":  # a new event older than the newest cached one
        new.history[-1]["timestamp"] = old.history[-1]["timestamp"] - 0.5
    elif change == "tie":  # same timestamp as the newest cached one, an earlier sequence: sorts before it
        last = old.history[-1]
        seq = schema.sequences[0].name if last["sequence"] != schema.sequences[0].name else None
        if seq is None:  # make the cached newest event a later sequence first
            last = old.history[-1] = new.history[5] = {**last, "sequence": schema.sequences[1].name,
                                                        "action": 1}
            seq = schema.sequences[0].name
        new.history[-1] = {"sequence": seq, "timestamp": last["timestamp"], "item_id": 3, "category": 1}
    elif change == "shorter":
        new = _upto(req, 4)
    else:
        k = 2  # 3 were added
    h_old, _ = encode_request(schema, old)
    h_new, _ = encode_request(schema, new)
    kk, tokens, why = new_tokens(schema, h_old, h_new, k)
    assert kk is None and tokens is None
    assert ("shorter" if change == "shorter" else "is not the cached one") in why
    with torch.no_grad():
        kv_old = model.encode_user(_t(h_old))
        got, d = append_or_encode(model, kv_old, h_old, h_new, k)
        assert not d.ok and d.reason == why
        assert_same_state(got, model.encode_user(_t(h_new)))


def test_found_k_at_a_full_stream():
    """At s_max_len the cached oldest drop; k is found (the smallest exact one)."""
    schema = synthetic_schema(max_history=8)
    cfg, model = _model(schema)  # windows [8, 4]
    req = _history_request(schema, np.random.default_rng(9), 20)
    h_old, _ = encode_request(schema, _upto(req, 8))
    for k, want_ok in [(1, False), (3, False), (4, True), (6, True)]:
        h_new, ns = encode_request(schema, _upto(req, 8 + k))
        d = plan_append(cfg, h_old, h_new)
        assert d.ok == want_ok, d.reason
        if want_ok:
            assert d.k == k and f"({k} oldest cached ones fall out of the stream)" in d.reason
        with torch.no_grad():
            kv_old = model.encode_user(_t(h_old))
            got, _ = append_or_encode(model, kv_old, h_old, h_new)
            assert_same_state(got, model.encode_user(_t(h_new)))


def test_a_state_of_another_history_is_not_extended():
    schema = synthetic_schema(max_history=8)
    cfg, model = _model(schema)
    req = _history_request(schema, np.random.default_rng(12), 6)
    h_old, _ = encode_request(schema, _upto(req, 3))
    h_other, _ = encode_request(schema, _upto(req, 2))
    h_new, _ = encode_request(schema, req)
    with torch.no_grad():
        got, d = append_or_encode(model, model.encode_user(_t(h_other)), h_old, h_new)
        assert not d.ok and "not its state" in d.reason
        assert_same_state(got, model.encode_user(_t(h_new)))


def test_other_families_and_bad_inputs_are_refused():
    schema = synthetic_schema(max_history=8)
    hy = ModelConfig.from_preset("tiny", schema, family="hyformer")
    assert not can_append(hy, 3, 1)[0] and "append_hyformer" in can_append(hy, 3, 1)[1]
    cfg, model = _model(schema)
    assert not can_append(cfg, 3, -1)[0]
    h, _ = encode_request(schema, _history_request(schema, np.random.default_rng(10), 4))
    with torch.no_grad():
        kv = model.encode_user(_t(h))
    tokens = {key: v[:, -2:].copy() for key, v in h.items() if key != "s_length"}
    tokens["s_type"][0, 0] = 0  # padding inside the new tokens
    with pytest.raises(ValueError, match="no padding"):
        append_user(model, kv, tokens)
    with pytest.raises(ValueError, match="missing"):
        append_user(model, kv, {"s_type": tokens["s_type"]})
    with pytest.raises(ValueError, match="widths"):
        append_user(model, kv, tokens, widths="some")


# ---- MovieLens: real users' growing histories, a trained model --------------------------------
def test_movielens_trained_model_appends_real_histories(movielens, tiny_ckpt):
    from onetrans_trt.models.checkpoint import load_checkpoint

    model = load_checkpoint(tiny_ckpt).eval()
    cfg = model.cfg
    assert cfg.schema.max_history == movielens.schema.max_history
    reqs = movielens.requests(12, n_candidates=5, seed=3)
    rng = np.random.default_rng(11)
    counts = {"ok": 0, "slides": 0, "does not extend": 0}
    big = cfg.schema.max_history
    for req, _ in reqs:
        row = movielens.user_ids.index(req.user_key) if isinstance(movielens.user_ids, list) else \
            list(movielens.user_ids).index(req.user_key)
        events = movielens.history_json(row, len(movielens.raw_events[row]))
        for _ in range(4):
            n_old = int(rng.integers(0, min(big, len(events)) + 1))
            k = int(rng.integers(1, 33))
            old = Request(req.user, {}, events[:n_old], req.candidates)
            new = Request(req.user, {}, events[:n_old + k], req.candidates)
            h_old, _ = encode_request(cfg.schema, old)
            h_new, ns = encode_request(cfg.schema, new)
            with torch.no_grad():
                kv_old = model.encode_user(_t(h_old))
                full = model.encode_user(_t(h_new))
                got, d = append_or_encode(model, kv_old, h_old, h_new)
                assert_same_state(got, full)
                assert _max_err(model.score_candidates(got, _t(ns)), model.score_candidates(full, _t(ns))) <= TOL
            key = "ok" if d.ok else "slides" if "slides" in d.reason else "does not extend"
            assert d.ok or key != "ok"
            counts[key] += 1
    # real logs: ratings in the same second reorder (does not extend), long histories slide
    print("movielens appends:", counts)
    assert counts["ok"] >= 15, counts
