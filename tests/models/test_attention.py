"""The attention references agree with plain softmax attention over explicit masks."""

import math

import pytest
import torch

from onetrans_trt.models.attention import (
    masked_attention,
    shared_prefix_attention,
    tail_causal_attention,
    tail_causal_mask,
)


def test_tail_causal_mask_is_bottom_right_aligned():
    m = tail_causal_mask(5, 2, torch.tensor([5]))[0, 0]
    assert m.tolist() == [[True, True, True, True, False], [True, True, True, True, True]]
    # two padding keys on the left: real queries skip them, a padding query sees itself
    m = tail_causal_mask(4, 4, torch.tensor([2]))[0, 0]
    assert m.tolist() == [[True, False, False, False], [False, True, False, False],
                          [False, False, True, False], [False, False, True, True]]


@pytest.mark.parametrize("c,t,n,valid,dh", [(3, 2, 5, 5, 4), (1, 1, 1, 0, 8), (4, 3, 7, 2, 16), (2, 4, 6, 0, 2)])
def test_shared_prefix_equals_attention_over_concatenation(c, t, n, valid, dh):
    g = torch.Generator().manual_seed(c * 100 + n)
    h = 2
    q = torch.randn(c, h, t, dh, generator=g)
    kp, vp = torch.randn(1, h, n, dh, generator=g), torch.randn(1, h, n, dh, generator=g)
    ko, vo = torch.randn(c, h, t, dh, generator=g), torch.randn(c, h, t, dh, generator=g)
    out = shared_prefix_attention(q, kp, vp, torch.tensor([valid]), ko, vo)
    k = torch.cat([kp.expand(c, -1, -1, -1), ko], dim=2)
    v = torch.cat([vp.expand(c, -1, -1, -1), vo], dim=2)
    real = torch.arange(n) >= n - valid
    mask = torch.cat([real.expand(t, n), torch.ones(t, t, dtype=torch.bool).tril()], dim=1)
    ref = masked_attention(q, k, v, mask.expand(c, 1, t, n + t))
    assert torch.isfinite(out).all()
    assert (out - ref).abs().max() <= 1e-5


def test_shared_prefix_empty_history_with_large_negative_scores_has_no_nan():
    q = torch.full((2, 1, 2, 4), 30.0)
    ko = torch.full((2, 1, 2, 4), -30.0)  # own scores ~ -1800: exp(0 - m) would overflow
    out = shared_prefix_attention(q, torch.zeros(1, 1, 3, 4), torch.zeros(1, 1, 3, 4), torch.tensor([0]),
                                  ko, torch.ones(2, 1, 2, 4))
    assert torch.isfinite(out).all() and torch.allclose(out, torch.ones_like(out))


def test_tail_causal_attention_matches_a_loop():
    g = torch.Generator().manual_seed(0)
    b, h, lk, lq, dh = 2, 2, 6, 3, 4
    q, k, v = (torch.randn(b, h, n, dh, generator=g) for n in (lq, lk, lk))
    valid = torch.tensor([6, 4])
    out = tail_causal_attention(q, k, v, valid)
    for bi in range(b):
        for i in range(lq):
            pos = lk - lq + i
            keys = [j for j in range(lk) if (j <= pos and j >= lk - int(valid[bi])) or j == pos]
            s = (q[bi, :, i:i + 1] @ k[bi, :, keys].transpose(-1, -2)) / math.sqrt(dh)
            ref = torch.softmax(s, -1) @ v[bi, :, keys]
            assert (out[bi, :, i:i + 1] - ref).abs().max() <= 1e-6
