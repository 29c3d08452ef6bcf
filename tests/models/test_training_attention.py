"""Training runs attention through PyTorch's fused SDPA (``training_fast_path``): the same
function as the explicit form, values and gradients, on every mask our models build (tail
causal, bidirectional, padding, empty sequences, HyFormer's sink), and never outside training.
Each test compares against the explicit form forced (the fast path patched off)."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

from onetrans_trt.data.requests import encode_request, repeat_history
from onetrans_trt.models import attention as attn
from onetrans_trt.models import hyformer as hy
from onetrans_trt.models.hyformer import HyFormer, decode_attention
from onetrans_trt.models.onetrans import OneTrans
from tests.models import test_hyformer_split, test_split_exactness
from tests.models.test_split_exactness import _randomize, _t


@contextlib.contextmanager
def explicit_only(monkeypatch):
    """The explicit (reference) form everywhere, as before the fast path existed."""
    with monkeypatch.context() as m:
        m.setattr(attn, "training_fast_path", lambda *xs: False)
        m.setattr(hy, "training_fast_path", lambda *xs: False)
        yield


@contextlib.contextmanager
def sdpa_calls():
    """Counts calls of torch's SDPA (the fast path's kernel)."""
    real = torch.nn.functional.scaled_dot_product_attention
    calls = []

    def spy(*a, **k):
        calls.append(1)
        return real(*a, **k)

    torch.nn.functional.scaled_dot_product_attention = spy
    try:
        yield calls
    finally:
        torch.nn.functional.scaled_dot_product_attention = real


def _grads(fn, *xs):
    xs = [x.detach().clone().requires_grad_() for x in xs]
    out = fn(*xs)
    w = torch.linspace(-1, 1, out.numel()).reshape(out.shape)  # a loss that weighs every output differently
    (out * w).sum().backward()
    return out.detach(), [x.grad for x in xs]


def _close(a, b, tol=1e-5):
    return (a - b).abs().max().item() <= tol * max(1.0, b.abs().max().item())


@pytest.mark.parametrize("form", ["tail_causal", "bidirectional"])
def test_self_attention_fast_path_equals_the_explicit_form(form, monkeypatch):
    g = torch.Generator().manual_seed(0)
    f = attn.tail_causal_attention if form == "tail_causal" else attn.bidirectional_attention
    for (b, h, lq, lk) in [(5, 2, 3, 7), (4, 1, 7, 7), (6, 4, 1, 5)]:
        q, k, v = torch.randn(b, h, lq, 8, generator=g), torch.randn(b, h, lk, 8, generator=g), torch.randn(b, h, lk, 8, generator=g)
        valid = torch.tensor([0, 1, lk, lk + 3, 2, lk // 2][:b])  # empty, one, full, over-long, partial
        fn = lambda q, k, v: f(q, k, v, valid)  # noqa: E731
        with sdpa_calls() as calls:
            fast, gfast = _grads(fn, q, k, v)
        assert calls, "the fast path did not run"
        with explicit_only(monkeypatch), sdpa_calls() as calls:
            ref, gref = _grads(fn, q, k, v)
        assert not calls
        assert torch.isfinite(fast).all() and _close(fast, ref)
        assert all(_close(a, r) for a, r in zip(gfast, gref))


@pytest.mark.parametrize("sink", [False, True])
def test_decoding_fast_path_equals_the_explicit_form(sink, monkeypatch):
    g = torch.Generator().manual_seed(1)
    b, h, nq, n, dh = 6, 2, 3, 5, 4
    q, k, v = torch.randn(b, h, nq, dh, generator=g), torch.randn(b, h, n, dh, generator=g), torch.randn(b, h, n, dh, generator=g)
    sk, sv = torch.randn(h, dh, generator=g), torch.randn(h, dh, generator=g)
    valid = torch.tensor([0, 1, 3, 5, 9, 0])  # two empty sequences, partial, full, over-long

    def fn(q, k, v, sk, sv):
        return decode_attention(q, k, v, valid, sk if sink else None, sv if sink else None, False)

    with sdpa_calls() as calls:
        fast, gfast = _grads(fn, q, k, v, sk, sv)
    assert calls
    with explicit_only(monkeypatch):
        ref, gref = _grads(fn, q, k, v, sk, sv)
    assert torch.isfinite(fast).all() and _close(fast, ref)
    assert all(_close(a, r) for a, r in zip(gfast[:3], gref[:3]))
    if sink:
        assert all(_close(a, r) for a, r in zip(gfast[3:], gref[3:]))
    else:  # an empty sequence decodes to 0 and passes no gradient back to its queries
        assert fast[0].abs().max() == 0 and fast[5].abs().max() == 0
        assert gfast[0][0].abs().max() == 0


def test_no_fast_path_outside_training():
    q, k, v = (torch.randn(2, 1, 3, 4, requires_grad=True) for _ in range(3))
    valid = torch.tensor([3, 1])
    with sdpa_calls() as calls:
        with torch.no_grad():  # inference: the reference math, so eval scores never move
            attn.tail_causal_attention(q, k, v, valid)
        attn.tail_causal_attention(q.detach(), k.detach(), v.detach(), valid)  # nothing needs a gradient
    assert not calls
    assert not attn.training_fast_path(q.detach())
    assert attn.training_fast_path(q)


def test_no_fast_path_while_compiling_or_exporting(monkeypatch):
    q = torch.randn(2, 1, 3, 4, requires_grad=True)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert not attn.training_fast_path(q)
    monkeypatch.undo()
    monkeypatch.setattr(torch.onnx, "is_in_onnx_export", lambda: True)
    assert not attn.training_fast_path(q)


def _batch(cfg, req, extra_pad):
    from onetrans_trt.data.requests import pad_streams

    hist, ns = encode_request(cfg.schema, req)
    width = hist["s_type"].shape[1] + extra_pad
    stream = {k: v[0, v.shape[1] - int(hist["s_length"][0]):] for k, v in hist.items() if k != "s_length"}
    padded = pad_streams(cfg.schema, [stream], length=width)
    return _t({**repeat_history(padded, len(req.candidates)), **ns})


def _model_grads(model, batch):
    model.zero_grad(set_to_none=True)
    out = model(batch)
    (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family,seed", [*(("hyformer", s) for s in range(16)), *(("onetrans", s) for s in range(8))])
def test_training_step_gradients_equal_the_explicit_forms(family, seed, monkeypatch):
    """A whole model in training mode (random configs of the split sweeps, every HyFormer form
    and encoder among them, empty and padded histories): the same logits and gradients."""
    mod, cls = (test_hyformer_split, HyFormer) if family == "hyformer" else (test_split_exactness, OneTrans)
    cfg, req, extra_pad = mod.random_case(seed)
    model = cls(cfg).train()
    _randomize(model, torch.Generator().manual_seed(seed))
    batch = _batch(cfg, req, extra_pad)
    with sdpa_calls() as calls:
        fast, gfast = _model_grads(model, batch)
    with explicit_only(monkeypatch):
        ref, gref = _model_grads(model, batch)
    assert calls  # every OneTrans layer attends; every HyFormer layer decodes
    assert _close(fast, ref)
    assert gfast.keys() == gref.keys()
    bad = [n for n in gref if not _close(gfast[n], gref[n], 1e-4)]
    assert not bad, bad


def test_the_sweep_runs_the_fast_path_in_both_families(monkeypatch):
    seen = {}
    for family, mod, cls in (("hyformer", test_hyformer_split, HyFormer), ("onetrans", test_split_exactness, OneTrans)):
        cfg, req, extra_pad = mod.random_case(0)
        model = cls(cfg).train()
        with sdpa_calls() as calls:
            _model_grads(model, _batch(cfg, req, extra_pad))
        seen[family] = len(calls)
    assert all(seen.values()), seen


def test_movielens_training_batch_same_gradients(movielens, monkeypatch):
    """The paper-form `small` on a real MovieLens batch (what `train` runs)."""
    from onetrans_trt.data.movielens import TASKS
    from onetrans_trt.models.config import ModelConfig
    from onetrans_trt.models.training import to_torch

    cfg = ModelConfig.from_preset("small", movielens.schema, family="hyformer", tasks=list(TASKS),
                                  seq_max_len=movielens.sequence_caps(movielens.train))
    torch.manual_seed(0)
    model = HyFormer(cfg).train()
    idx = np.random.default_rng(0).choice(len(movielens.train), 64, replace=False)
    batch = to_torch(movielens.batch(movielens.train, idx))
    fast, gfast = _model_grads(model, batch)
    with explicit_only(monkeypatch):
        ref, gref = _model_grads(model, batch)
    assert _close(fast, ref)
    assert all(_close(gfast[n], gref[n], 1e-4) for n in gref)
