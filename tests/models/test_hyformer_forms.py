"""HyFormer's two forms: the paper's (the default for new configs) and the first release's
(what a config written before the form keys existed loads as), and the paper form's edges:
decoding with no sink over an empty sequence, bidirectional sequence attention."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from onetrans_trt.data.requests import encode_request
from onetrans_trt.data.synthetic import synthetic_request, synthetic_schema
from onetrans_trt.models.attention import bidirectional_attention, masked_attention
from onetrans_trt.models.config import HYFORMER_FORMS, HYFORMER_WAVE1, ModelConfig
from onetrans_trt.models.hyformer import HyFormer, decode_attention
from tests.models.test_split_exactness import _randomize, _t


def _schema():
    return synthetic_schema(max_history=10, n_sequences=3)


def test_new_configs_are_the_paper_form_and_old_ones_load_as_wave1():
    cfg = ModelConfig.from_preset("tiny", _schema(), family="hyformer")
    assert {k: getattr(cfg, k) for k in HYFORMER_WAVE1} == HYFORMER_FORMS["paper"]
    d = cfg.to_dict()
    assert ModelConfig.from_dict(json.loads(json.dumps(d))) == cfg  # written with its form: reads back the same
    old = {k: v for k, v in d.items() if k not in HYFORMER_WAVE1}  # a config from before the keys existed
    got = ModelConfig.from_dict(old)
    assert {k: getattr(got, k) for k in HYFORMER_WAVE1} == HYFORMER_WAVE1
    # one key present: the config knows the keys, the rest take the (paper) defaults
    one = ModelConfig.from_dict({**old, "hy_sink": True})
    assert one.hy_sink and one.seq_attention == "bidirectional" and one.hy_query_gen == "all_pools"
    # OneTrans configs never change meaning
    ot = ModelConfig.from_preset("tiny", _schema())
    assert ModelConfig.from_dict({k: v for k, v in ot.to_dict().items() if k not in HYFORMER_WAVE1}) == ot


def test_forms_differ_in_their_weights():
    paper = HyFormer(ModelConfig.from_preset("tiny", _schema(), family="hyformer"))
    wave1 = HyFormer(ModelConfig.from_preset("tiny", _schema(), family="hyformer", **HYFORMER_WAVE1))
    pk, wk = set(paper.state_dict()), set(wave1.state_dict())
    assert not any("sink" in k or "kv_norm" in k for k in pk)
    assert any("sink_k" in k for k in wk) and any("kv_norm" in k for k in wk)
    # the paper's query generation: N FFNs per sequence over NS tokens + every pool
    cfg = paper.cfg
    assert len(paper.query_gen) == 3 and all(len(g) == cfg.hy_queries for g in paper.query_gen)
    m, d = cfg.num_ns_tokens, cfg.d_model
    assert paper.query_gen[0][0].net[0].in_features == (m + 3) * d
    assert paper.heads[0].net[0].in_features == (3 * cfg.hy_queries + m) * d  # queries and NS tokens
    assert wave1.heads[0].net[0].in_features == 3 * cfg.hy_queries * d  # queries only


@pytest.mark.parametrize("shared", [True, False])
def test_decoding_without_a_sink_over_no_key_is_zero_and_never_nan(shared):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 2, 2, 4, generator=g, requires_grad=True)
    k = torch.randn(1 if shared else 3, 2, 5, 4, generator=g, requires_grad=True)
    v = torch.randn(1 if shared else 3, 2, 5, 4, generator=g, requires_grad=True)
    valid = torch.tensor([0] if shared else [0, 2, 5])
    o = decode_attention(q, k, v, valid, None, None, shared)
    assert torch.isfinite(o).all()
    if shared:
        assert o.abs().max() == 0
    else:
        assert o[0].abs().max() == 0
        # the others: plain softmax attention over their real (newest) keys
        for b, n in ((1, 2), (2, 5)):
            want = torch.softmax(q[b] @ k[b, :, 5 - n:].transpose(-1, -2) / 2.0, -1) @ v[b, :, 5 - n:]
            assert torch.allclose(o[b], want, atol=1e-6)
    o.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
    assert torch.equal(decode_attention(q, k[:, :, :0], v[:, :, :0], valid, None, None, shared), torch.zeros_like(q))


def test_bidirectional_attention_sees_later_real_keys_and_no_padding():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 2, 6, 4, generator=g) for _ in range(3))
    valid = torch.tensor([6, 3])
    o = bidirectional_attention(q, k, v, valid)
    full = masked_attention(q[:1], k[:1], v[:1], torch.ones(1, 1, 6, 6, dtype=torch.bool))
    assert torch.allclose(o[:1], full, atol=1e-6)  # all real: plain full attention
    real = masked_attention(q[1:, :, 3:], k[1:, :, 3:], v[1:, :, 3:], torch.ones(1, 1, 3, 3, dtype=torch.bool))
    assert torch.allclose(o[1:, :, 3:], real, atol=1e-6)  # padding keys ignored
    assert torch.isfinite(o).all()  # padding queries see themselves
    assert torch.isfinite(bidirectional_attention(q, k, v, torch.tensor([0, 0]))).all()


def test_paper_form_trains_with_empty_sequences_without_nan():
    schema = _schema()
    cfg = ModelConfig.from_preset("tiny", schema, family="hyformer")
    model = HyFormer(cfg)
    rng = np.random.default_rng(0)
    req = synthetic_request(schema, rng, n_history=0, n_candidates=4)  # every sequence empty
    hist, ns = encode_request(schema, req)
    batch = _t({**{k: np.repeat(v, 4, axis=0) for k, v in hist.items()}, **ns})
    loss = model(batch).square().mean()
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_bidirectional_sequence_attention_reads_the_newer_events():
    """Causal: changing the newest event of a sequence leaves the older tokens' K/V alone;
    bidirectional: every real token's K/V moves (the paper's full self-attention)."""
    schema = synthetic_schema(max_history=10, n_sequences=1)
    rng = np.random.default_rng(5)
    req = synthetic_request(schema, rng, n_history=8, n_candidates=2)
    newest = max(range(len(req.history)), key=lambda i: req.history[i]["timestamp"])
    hist = _t(encode_request(schema, req)[0])
    req.history[newest]["item_id"] = (req.history[newest]["item_id"] + 7) % 500
    hist2 = _t(encode_request(schema, req)[0])
    for attn, moves in (("causal", False), ("bidirectional", True)):
        cfg = ModelConfig.from_preset("tiny", schema, family="hyformer", seq_attention=attn)
        model = HyFormer(cfg).eval()
        _randomize(model, torch.Generator().manual_seed(2))
        with torch.no_grad():
            a, b = model.encode_user(hist), model.encode_user(hist2)
        older = (a.keys[0][..., :-1, :] - b.keys[0][..., :-1, :]).abs().max().item()
        assert (older > 1e-4) == moves, (attn, older)


@pytest.mark.parametrize("encoders", [["transformer", "longer"], ["swiglu", "transformer"]])
def test_a_sequence_cap_keeps_exactly_its_newest_events(encoders):
    """``seq_max_len``: the capped model on a history equals the uncapped one (same weights) on
    that history with the capped sequence cut to its newest events by hand; the other sequence
    is untouched. Per-sequence encoders, windows and query counts are each sequence's own."""
    schema = synthetic_schema(max_history=14, n_sequences=2)
    common = dict(family="hyformer", d_model=16, n_heads=2, n_layers=2, ns_tokens=5, seq_encoders=encoders,
                  seq_windows=[2, 5], seq_queries=[2, 1])
    capped = HyFormer(ModelConfig(schema=schema, seq_max_len=[3, 14], **common)).eval()
    full = HyFormer(ModelConfig(schema=schema, **common)).eval()
    _randomize(capped, torch.Generator().manual_seed(7))
    full.load_state_dict(capped.state_dict())
    assert [layer[j].kind for layer in full.encoders for j in range(2)] == encoders * 2
    assert [layer[j].window for layer in full.encoders for j in range(2)] == [2, 5, 2, 5]
    assert [len(g) for g in full.query_gen] == [2, 1]
    rng = np.random.default_rng(11)
    for n_hist in (0, 2, 3, 9, 14, 20):
        req = synthetic_request(schema, rng, n_history=n_hist, n_candidates=3)
        first = schema.sequences[0].name
        order = sorted(range(len(req.history)), key=lambda i: req.history[i]["timestamp"])[-14:]
        mine = [i for i in order if req.history[i]["sequence"] == first]
        cut = copy.deepcopy(req)
        cut.history = [ev for i, ev in enumerate(req.history) if i in order and (
            ev["sequence"] != first or i in mine[-3:])]
        hist, ns = encode_request(schema, req)
        hist_cut, _ = encode_request(schema, cut)
        with torch.no_grad():
            a, b = capped.encode_user(_t(hist)), full.encode_user(_t(hist_cut))
            assert a.extras["seq_length"][0].tolist() == b.extras["seq_length"][0].tolist()
            assert a.extras["seq_length"][0, 0] == min(len(mine), 3)
            stream = hist["s_type"].shape[1]
            assert a.keys[0].shape[2] == min(stream, 3)  # sequence 0: the stream's width, capped
            want = full.score_candidates(b, _t(ns))
            got = capped.score_candidates(a, _t(ns))
        assert (got - want).abs().max() <= 1e-5, n_hist


def test_the_paper_preset_has_the_papers_dense_parameter_count(movielens):
    """hyformer-paper on the MovieLens schema and tasks: within 2% of HyFormer Table 1's 418M dense
    parameters (built on the meta device: no memory), with 13 NS + 3 global mixer tokens."""
    from onetrans_trt.cli import dense_parameters
    from onetrans_trt.models.config import PAPER_FIGURES

    with torch.device("meta"):
        model = HyFormer(ModelConfig.from_preset("hyformer-paper", movielens.schema, family="hyformer",
                                                 tasks=["like", "love"]))  # MovieLens's two tasks
    cfg = model.cfg
    assert (cfg.num_ns_tokens, cfg.hy_total_queries) == (13, 3) and cfg.preset == "hyformer-paper"
    want = PAPER_FIGURES["hyformer-paper"]["dense_parameters"]
    assert abs(dense_parameters(model) - want) / want <= 0.02, dense_parameters(model)


def test_training_lays_each_sequence_out_at_the_batchs_real_counts_with_the_same_numbers(movielens):
    """In training (eager) each sequence is laid out at the batch's most kept events of it, not the
    stream's width: the same logits and the same gradients as the static layout (eval mode, what
    the exported graphs do), and narrower K/V on real MovieLens batches (each rating bucket holds
    part of the stream)."""
    from onetrans_trt.models.training import to_torch

    cfg = ModelConfig.from_preset("tiny", movielens.schema, family="hyformer", tasks=["like", "love"],
                                  seq_encoders=["transformer", "longer", "swiglu"], seq_max_len=[50, 7, 50])
    model = HyFormer(cfg)
    _randomize(model, torch.Generator().manual_seed(3))
    rng = np.random.default_rng(4)
    narrower = 0
    for _ in range(3):
        batch = to_torch(movielens.batch(movielens.train, rng.choice(len(movielens.train), 24, replace=False)))
        grads = {}
        for mode in ("train", "eval"):
            model.train(mode == "train")
            model.zero_grad(set_to_none=True)
            kv = model.encode_user(batch)
            out = model(batch)
            out.square().sum().backward()
            grads[mode] = (out.detach(), [p.grad.clone() for p in model.parameters()], kv)
        (a, ga, kva), (b, gb, kvb) = grads["train"], grads["eval"]
        assert (a - b).abs().max() <= 1e-5
        assert all((x - y).abs().max() <= 1e-4 * max(1.0, y.abs().max().item()) for x, y in zip(ga, gb))
        counts = kvb.extras["seq_length"].max(dim=0).values.tolist()
        widths = [kva.keys[j].shape[2] for j in range(3)]
        assert widths == [max(1, min(c, cap)) for c, cap in zip(counts, (50, 7, 50))], (widths, counts)
        assert all(w <= kvb.keys[j].shape[2] for j, w in enumerate(widths))
        narrower += sum(w < kvb.keys[j].shape[2] for j, w in enumerate(widths))
    assert narrower > 0
