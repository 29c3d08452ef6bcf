"""The S tokenizer runs each sequence's MLP on that sequence's positions only when eager
(training), and over the whole stream under a type mask when traced, exported or compiled: the
same tokens and the same gradients, on every kind of stream (merged timestamp-aware or agnostic
with [SEP] types, padding, one sequence, an empty stream), and the traced form keeps its static
graph."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from onetrans_trt.data.requests import encode_request, pad_streams
from onetrans_trt.data.synthetic import synthetic_request, synthetic_schema
from onetrans_trt.models import tokenizers
from onetrans_trt.models.config import ModelConfig
from onetrans_trt.models.hyformer import HyFormer
from onetrans_trt.models.onetrans import OneTrans
from onetrans_trt.models.tokenizers import Embeddings, STokenizer
from tests.models.test_split_exactness import _randomize, _t


def _stream_batch(schema, rng, users: int):
    """``users`` histories of random lengths (0 included) padded to one width."""
    streams = []
    for u in range(users):
        n = 0 if u == 0 else int(rng.integers(0, schema.s_max_len + 3))
        req = synthetic_request(schema, rng, n_history=n, n_candidates=1)
        hist, _ = encode_request(schema, req)
        streams.append({k: v[0, v.shape[1] - int(hist["s_length"][0]):] for k, v in hist.items() if k != "s_length"})
    return _t(pad_streams(schema, streams, length=schema.s_max_len + 2))


def _tokens_and_grads(tok, batch, own: bool):
    tok.own_positions_eagerly = own
    tok.zero_grad(set_to_none=True)
    out = tok(batch)
    (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in tok.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("seed", range(8))
def test_own_positions_equal_the_masked_stream(seed):
    rng = np.random.default_rng(seed)
    schema = synthetic_schema(max_history=int(rng.integers(1, 20)), n_sequences=int(rng.integers(1, 4)),
                              merge_mode=str(rng.choice(["timestamp_aware", "timestamp_agnostic"])),
                              emb_dim=int(rng.choice([2, 4, 8])))
    tok = STokenizer(Embeddings(schema), 16, 24)
    _randomize(tok, torch.Generator().manual_seed(seed))
    batch = _stream_batch(schema, rng, users=5)
    types = batch["s_type"]
    assert (types == 0).any()  # padding in the stream
    if schema.merge_mode == "timestamp_agnostic" and schema.num_sequences > 1:
        assert (types > schema.num_sequences).any()  # [SEP] positions: a type row, no MLP
    fast, gfast = _tokens_and_grads(tok, batch, True)
    ref, gref = _tokens_and_grads(tok, batch, False)
    assert (fast - ref).abs().max().item() <= 1e-6 * max(1.0, ref.abs().max().item())
    assert gfast.keys() == gref.keys()
    assert all((gfast[n] - gref[n]).abs().max().item() <= 1e-5 * max(1.0, gref[n].abs().max().item()) for n in gref)


def test_an_empty_stream_is_the_type_rows_only():
    schema = synthetic_schema(max_history=4, n_sequences=2)
    tok = STokenizer(Embeddings(schema), 8, 8)
    batch = _stream_batch(schema, np.random.default_rng(0), users=1)  # user 0: no history
    assert (batch["s_type"] == 0).all()
    assert torch.equal(tok(batch), tok.type_emb(batch["s_type"]))


def test_each_mlp_runs_on_its_own_positions_only_when_eager(monkeypatch):
    schema = synthetic_schema(max_history=12, n_sequences=3)
    tok = STokenizer(Embeddings(schema), 8, 8)
    batch = _stream_batch(schema, np.random.default_rng(1), users=4)
    rows = []
    for mlp in tok.mlps:
        mlp.register_forward_hook(lambda m, inp, out: rows.append(inp[0].shape[:-1].numel()))
    tok(batch)
    counts = [int((batch["s_type"] == k + 1).sum()) for k in range(3)]
    assert rows == [c for c in counts if c]  # each MLP saw its own events, none saw the others'
    rows.clear()
    monkeypatch.setattr(tokenizers, "static_shapes", lambda: True)  # what a trace or an export sees
    tok(batch)
    assert rows == [batch["s_type"].numel()] * 3  # every MLP over the whole stream


@pytest.mark.parametrize("family", ["onetrans", "hyformer"])
def test_a_training_step_is_the_same(family):
    """A whole model in training mode: the same logits and gradients either way."""
    schema = synthetic_schema(max_history=10, n_sequences=3)
    cfg = ModelConfig.from_preset("tiny", schema, family=family)
    model = (OneTrans if family == "onetrans" else HyFormer)(cfg).train()
    _randomize(model, torch.Generator().manual_seed(4))
    rng = np.random.default_rng(4)
    hist = _stream_batch(schema, rng, users=6)
    ns = {}
    for _ in range(6):
        _, one = encode_request(schema, synthetic_request(schema, rng, n_history=1, n_candidates=1))
        for k, v in one.items():
            ns.setdefault(k, []).append(v)
    batch = {**hist, **_t({k: np.concatenate(v) for k, v in ns.items()}),
             "s_length": (hist["s_type"] != 0).sum(dim=1)}
    res = {}
    for own in (True, False):
        model.s_tokenizer.own_positions_eagerly = own
        model.zero_grad(set_to_none=True)
        out = model(batch)
        out.square().sum().backward()
        res[own] = (out.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None])
    (a, ga), (b, gb) = res[True], res[False]
    assert (a - b).abs().max().item() <= 1e-5
    assert len(ga) == len(gb) and all((x - y).abs().max().item() <= 1e-4 * max(1.0, y.abs().max().item())
                                      for x, y in zip(ga, gb))
