"""Public attention helpers: call them in your ``score_candidates`` / ``encode_user`` to get
our fused nodes directly, instead of relying on the ``shared-prefix`` rewrite.

Eagerly each one computes the reference math (``onetrans_trt.plugins.*.reference``); under
``torch.onnx.export(..., dynamo=True)`` each emits one custom node of domain ``onetrans``
(``SharedPrefixAttention`` / ``TailCausalAttention`` / ``SharedDecodeAttention``, attributes ``scale``,
``plugin_namespace="onetrans"``, ``aot=1``) that TensorRT resolves to our plugin and ONNX
Runtime runs through the op's ONNX function
(:func:`onetrans_trt.plugins.attach_op_functions`).

Layouts are ``[batch, heads, tokens, head_dim]``; lengths count the real tokens at the right
end of a left-padded axis (``>= L`` means all of them).

Example::

    from onetrans_trt.ops import shared_prefix_attention

    def score_candidates(self, state, candidates):
        q, k, v = ...  # the candidates' own [C, H, T, dh]
        out = shared_prefix_attention(q, state["k0"], state["v0"], state["hist_len"], k, v)
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from onetrans_trt.plugins._onnx import DOMAIN, PLUGIN_NAMESPACE

__all__ = ["shared_decode_attention", "shared_prefix_attention", "tail_causal_attention"]


def _exporting() -> bool:
    """True while ``torch.onnx.export(dynamo=True)`` traces the module (not under a plain
    ``torch.export``, whose program other tools run: it keeps the reference math)."""
    return bool(torch.onnx.is_in_onnx_export() and torch.compiler.is_exporting())


def _scale(q: Tensor, scale: float | None) -> float:
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)


def _rescaled(q: Tensor, scale: float | None) -> Tensor:
    """The references scale scores by 1/sqrt(dh); another scale is applied to q first."""
    if scale is None:
        return q
    return q * (float(scale) * math.sqrt(q.shape[-1]))


def _as_valid(t: Tensor) -> Tensor:
    return t.reshape(-1).to(torch.int64)


def _check(name: str, **tensors: Tensor) -> None:
    for k, t in tensors.items():
        if t.dim() != 4:
            raise ValueError(f"{name}: {k} must be 4-D [batch, heads, tokens, head_dim], got shape {tuple(t.shape)}")


def shared_prefix_attention(q: Tensor, k_prefix: Tensor, v_prefix: Tensor, prefix_valid: Tensor,
                            k_own: Tensor, v_own: Tensor, scale: float | None = None) -> Tensor:
    """C candidates' queries attend one user's K/V (shared, never copied) plus their own, causally.

    q, k_own, v_own: ``[C, H, T, dh]``; k_prefix, v_prefix: ``[1, H, L, dh]`` left-padded;
    prefix_valid: ``[1]`` (or a scalar) int, real prefix tokens at the right end. NS-token i
    of a candidate sees the real prefix and its own tokens ``<= i``. Returns ``[C, H, T, dh]``.
    ``scale`` defaults to ``1/sqrt(dh)``.
    """
    _check("shared_prefix_attention", q=q, k_prefix=k_prefix, v_prefix=v_prefix, k_own=k_own, v_own=v_own)
    valid = _as_valid(prefix_valid)
    if _exporting():
        return torch.onnx.ops.symbolic(
            f"{DOMAIN}::SharedPrefixAttention", (q, k_prefix, v_prefix, valid, k_own, v_own),
            {"scale": _scale(q, scale), "plugin_namespace": PLUGIN_NAMESPACE, "aot": 1},
            dtype=q.dtype, shape=q.shape, version=1)
    from onetrans_trt.plugins.shared_prefix_attention.reference import reference

    return reference(_rescaled(q, scale), k_prefix, v_prefix, valid, k_own, v_own)


def tail_causal_attention(q: Tensor, k: Tensor, v: Tensor, valid: Tensor, scale: float | None = None,
                          causal: bool = True) -> Tensor:
    """The newest ``Lq`` of ``Lk`` tokens attend causally, bottom-right aligned (query i sits at
    key position ``Lk - Lq + i``), over a left-padded key axis with ``valid`` real tokens.

    q: ``[B, H, Lq, dh]``; k, v: ``[B, H, Lk, dh]``; valid: ``[B]`` int. A padding query sees
    only itself (no row is empty). Returns ``[B, H, Lq, dh]``. ``scale`` defaults to ``1/sqrt(dh)``.
    ``causal=False``: bidirectional, each query sees every real key (and itself).
    """
    _check("tail_causal_attention", q=q, k=k, v=v)
    valid = _as_valid(valid)
    if _exporting():  # causal always written: TensorRT's plugin has no default for a missing attribute
        return torch.onnx.ops.symbolic(
            f"{DOMAIN}::TailCausalAttention", (q, k, v, valid),
            {"scale": _scale(q, scale), "causal": int(bool(causal)), "plugin_namespace": PLUGIN_NAMESPACE, "aot": 1},
            dtype=q.dtype, shape=q.shape, version=1)
    from onetrans_trt.plugins.tail_causal_attention.reference import reference

    return reference(_rescaled(q, scale), k, v, valid, causal=int(bool(causal)))


def shared_decode_attention(q: Tensor, k: Tensor, v: Tensor, valid: Tensor, scale: float | None = None) -> Tensor:
    """C candidates' queries decode one user's K/V (shared, never copied), with no keys of their
    own (HyFormer's query decoding).

    q: ``[C, H, N, dh]``; k, v: ``[1, H, n, dh]`` left-padded; valid: ``[1]`` (or a scalar) int,
    real keys at the right end. A row with no real key is 0. Returns ``[C, H, N, dh]``.
    ``scale`` defaults to ``1/sqrt(dh)``.
    """
    _check("shared_decode_attention", q=q, k=k, v=v)
    valid = _as_valid(valid)
    if _exporting():
        return torch.onnx.ops.symbolic(
            f"{DOMAIN}::SharedDecodeAttention", (q, k, v, valid),
            {"scale": _scale(q, scale), "plugin_namespace": PLUGIN_NAMESPACE, "aot": 1},
            dtype=q.dtype, shape=q.shape, version=1)
    from onetrans_trt.plugins.shared_decode_attention.reference import reference

    return reference(_rescaled(q, scale), k, v, valid)
