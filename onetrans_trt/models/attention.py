"""Attention as the model defines it: the reference every other form is tested against.

Three forms share one softmax definition (scores scaled by ``1/sqrt(dh)``, masked keys
at ``-inf``, every query row sees at least itself so no row is fully masked):

- :func:`masked_attention`: plain attention under a boolean mask (the unified model).
- :func:`tail_causal_attention`: the user side. Queries are the newest ``Lq`` of ``Lk``
  S-tokens; causal **bottom-right** aligned; keys in the left padding are masked.
- :func:`shared_prefix_attention`: the candidate side. ``C`` candidates' NS queries attend
  one user's S-token K/V (shared, never copied per candidate) plus their own NS K/V
  causally; the two parts are merged through their running max and sums (an online
  softmax over two blocks), which equals softmax over the concatenation.

All tensors are ``[batch, heads, tokens, head_dim]``. ``valid`` counts the non-padding
tokens at the right end of a left-padded key axis.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

NEG_INF = float("-inf")


def split_heads(x: Tensor, n_heads: int) -> Tensor:
    b, n, d = x.shape
    return x.reshape(b, n, n_heads, d // n_heads).transpose(1, 2)


def merge_heads(x: Tensor) -> Tensor:
    b, h, n, dh = x.shape
    return x.transpose(1, 2).reshape(b, n, h * dh)


def masked_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    scale = 1.0 / math.sqrt(q.shape[-1])
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    s = s.masked_fill(~mask, NEG_INF)
    return torch.matmul(torch.softmax(s, dim=-1), v)


def prefix_key_mask(n_keys: int, valid: Tensor) -> Tensor:
    """``[B, n_keys]``: key ``j`` of a left-padded axis is real iff ``j >= n_keys - valid``."""
    j = torch.arange(n_keys, device=valid.device)
    return j.unsqueeze(0) >= (n_keys - valid).unsqueeze(1)


def tail_causal_mask(n_keys: int, n_queries: int, valid: Tensor) -> Tensor:
    """``[B, 1, Lq, Lk]``: query ``i`` sits at key position ``Lk - Lq + i`` (bottom-right).

    It sees real keys at or before its position; a padding query sees only itself, so
    its state stays finite and no row is empty.
    """
    j = torch.arange(n_keys, device=valid.device)
    pos = torch.arange(n_queries, device=valid.device) + (n_keys - n_queries)
    causal = j.unsqueeze(0) <= pos.unsqueeze(1)  # [Lq, Lk]
    itself = j.unsqueeze(0) == pos.unsqueeze(1)
    real = prefix_key_mask(n_keys, valid).unsqueeze(1)  # [B, 1, Lk]
    return ((causal.unsqueeze(0) & real) | itself.unsqueeze(0)).unsqueeze(1)


def tail_causal_attention(q: Tensor, k: Tensor, v: Tensor, valid: Tensor) -> Tensor:
    """Reference TailCausalAttention. q ``[B,H,Lq,dh]``, k/v ``[B,H,Lk,dh]``, valid ``[B]``."""
    return masked_attention(q, k, v, tail_causal_mask(k.shape[2], q.shape[2], valid))


def bidirectional_mask(n_keys: int, n_queries: int, valid: Tensor) -> Tensor:
    """``[B, 1, Lq, Lk]``: every query sees every real key (full self-attention over a
    left-padded axis) and itself (query ``i`` sits at key position ``Lk - Lq + i``), so no row
    is empty: a padding query sees the real keys too, and its output is never read."""
    j = torch.arange(n_keys, device=valid.device)
    pos = torch.arange(n_queries, device=valid.device) + (n_keys - n_queries)
    itself = j.unsqueeze(0) == pos.unsqueeze(1)  # [Lq, Lk]
    real = prefix_key_mask(n_keys, valid).unsqueeze(1)  # [B, 1, Lk]
    return (real | itself.unsqueeze(0)).unsqueeze(1)


def bidirectional_attention(q: Tensor, k: Tensor, v: Tensor, valid: Tensor) -> Tensor:
    """Full (non-causal) self-attention of the newest ``Lq`` of ``Lk`` tokens over all real
    keys. q ``[B,H,Lq,dh]``, k/v ``[B,H,Lk,dh]``, valid ``[B]``."""
    return masked_attention(q, k, v, bidirectional_mask(k.shape[2], q.shape[2], valid))


def _real_prefix_keys(k_prefix: Tensor, valid: Tensor) -> Tensor:
    """``[1, 1, 1, L]`` mask of the prefix's real keys, computed from the K tensor itself.

    Positions come from a cumulative sum over the key axis rather than from the symbolic
    length, so an exported scorer never reads the shape of the user encoder's inputs.
    """
    ones = torch.ones_like(k_prefix[0, 0, :, 0], dtype=torch.int64)
    j = torch.cumsum(ones, dim=0) - 1
    n = ones.sum()
    return (j >= n - valid.reshape(1)).reshape(1, 1, 1, -1)


def shared_prefix_attention(q: Tensor, k_prefix: Tensor, v_prefix: Tensor, prefix_valid: Tensor,
                            k_own: Tensor, v_own: Tensor) -> Tensor:
    """Reference SharedPrefixAttention.

    q, k_own, v_own: ``[C, H, T, dh]`` (C candidates, T NS-tokens each).
    k_prefix, v_prefix: ``[1, H, L, dh]``, one user's S-token K/V, left-padded.
    prefix_valid: ``[1]``, real tokens at the right end of the prefix (0: empty history).
    Returns ``[C, H, T, dh]``: softmax over ``[prefix ; own keys <= i]`` per query i.
    """
    c, h, t, dh = q.shape
    scale = 1.0 / math.sqrt(dh)
    # Part 1: every candidate's queries against the one shared prefix, as one batch.
    if k_prefix.shape[2] == 0:  # no prefix at all: only the candidates' own tokens
        k_prefix = torch.zeros(1, h, 1, dh, dtype=q.dtype, device=q.device)
        v_prefix, prefix_valid = k_prefix, torch.zeros_like(prefix_valid)
    q_all = q.transpose(0, 1).reshape(1, h, c * t, dh)
    s1 = torch.matmul(q_all, k_prefix.transpose(-1, -2)) * scale  # [1, H, C*T, L]
    s1 = s1.masked_fill(~_real_prefix_keys(k_prefix, prefix_valid), NEG_INF)
    m1 = s1.amax(dim=-1, keepdim=True)  # -inf when the prefix is empty
    p1 = torch.exp(s1 - torch.where(torch.isinf(m1), torch.zeros_like(m1), m1))  # no NaN
    l1 = p1.sum(dim=-1, keepdim=True)
    o1 = torch.matmul(p1, v_prefix)  # [1, H, C*T, dh]
    m1 = m1.reshape(h, c, t, 1).transpose(0, 1)
    l1 = l1.reshape(h, c, t, 1).transpose(0, 1)
    o1 = o1.reshape(h, c, t, dh).transpose(0, 1)  # [C, H, T, dh]
    # Part 2: each candidate's own NS-tokens, causal (token i sees tokens <= i).
    s2 = torch.matmul(q, k_own.transpose(-1, -2)) * scale  # [C, H, T, T]
    causal = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
    s2 = s2.masked_fill(~causal, NEG_INF)
    m2 = s2.amax(dim=-1, keepdim=True)
    p2 = torch.exp(s2 - m2)
    l2 = p2.sum(dim=-1, keepdim=True)
    o2 = torch.matmul(p2, v_own)
    # Merge: rescale both parts to the common max (m2 is finite: i sees itself, so an
    # empty prefix gives a1 = exp(-inf) = 0 and o1 = l1 = 0).
    m = torch.maximum(m1, m2)
    a1 = torch.exp(m1 - m)
    a2 = torch.exp(m2 - m)
    return (a1 * o1 + a2 * o2) / (a1 * l1 + a2 * l2)


def shared_decode_attention(q: Tensor, k: Tensor, v: Tensor, valid: Tensor) -> Tensor:
    """Reference SharedDecodeAttention: C candidates' queries decode one shared K/V (HyFormer's
    query decoding), with no part of their own.

    q: ``[C, H, N, dh]``; k, v: ``[1, H, n, dh]``, one user's K/V of one sequence, left-padded;
    valid: ``[1]``, real keys at the right end (>= n: all; 0: none). Returns ``[C, H, N, dh]``:
    softmax over the real keys; a row with no real key (an empty sequence) is 0, never NaN
    (the shift comes from the real keys only and masked keys weigh 0 by the mask itself, not
    by ``exp(-inf)``: an FP16 graph stores -inf as -1e4).
    """
    c, h, nq, dh = q.shape
    if k.shape[2] == 0:  # no key at all
        return torch.zeros_like(q)
    scale = 1.0 / math.sqrt(dh)
    qq = q.transpose(0, 1).reshape(1, h, c * nq, dh)  # every candidate's queries: one batch
    s = torch.matmul(qq, k.transpose(-1, -2)) * scale  # [1, H, C*N, n]
    real = _real_prefix_keys(k, valid)  # [1, 1, 1, n]
    s = s.masked_fill(~real, NEG_INF)
    m = s.amax(dim=-1, keepdim=True)  # -inf on a row with no real key
    p = torch.where(real, torch.exp(s - torch.where(torch.isinf(m), torch.zeros_like(m), m)), torch.zeros_like(s))
    den = p.sum(dim=-1, keepdim=True)
    o = torch.matmul(p, v) / torch.where(den > 0, den, torch.ones_like(den))
    return o.reshape(h, c, nq, dh).transpose(0, 1)


def segmented_prefix_attention(q: Tensor, k_prefix: Tensor, v_prefix: Tensor, prefix_valid: Tensor,
                               cand_user: Tensor, k_own: Tensor, v_own: Tensor) -> Tensor:
    """Reference SegmentedPrefixAttention: the candidates of U users in one call.

    k_prefix, v_prefix: ``[U, H, L, dh]``, user u's K/V in row u, left-padded; prefix_valid:
    ``[U]``; cand_user: ``[C]``, each candidate's user in ``[0, U)``; q, k_own, v_own:
    ``[C, H, T, dh]``. Defined as SharedPrefixAttention per user over that user's candidates,
    so one user per call is SharedPrefixAttention itself.
    """
    users = cand_user.reshape(-1).to(torch.int64)
    n_users = k_prefix.shape[0]
    if users.numel() != q.shape[0]:
        raise ValueError(f"cand_user has {users.numel()} entries for {q.shape[0]} candidates")
    if users.numel() and (int(users.min()) < 0 or int(users.max()) >= n_users):
        raise ValueError(f"cand_user must lie in [0, {n_users}), got {users.min().item()}..{users.max().item()}")
    valid = prefix_valid.reshape(-1)
    out = torch.empty_like(q)
    for u in range(n_users):
        rows = (users == u).nonzero().reshape(-1)
        if rows.numel():
            out[rows] = shared_prefix_attention(q[rows], k_prefix[u:u + 1], v_prefix[u:u + 1], valid[u:u + 1],
                                                k_own[rows], v_own[rows])
    return out
