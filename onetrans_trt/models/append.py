"""Append instead of re-encode: extend a cached OneTrans user state by the k newest S-tokens.

A user's history that grew by k events (appended at the newest end) gives S-token stream
``old ++ new`` (its newest ``s_max_len`` tokens). Attention on the S side is causal and
there are no positional embeddings, so a cached token's state at layer ``l`` depends only
on the tokens at or before it **within layer l's key window**. The windows (:func:`windows`):
``m[0] = s_max_len`` (the stream) and ``m[l] = min(m[l-1], schedule[l-1])`` (layer ``l``'s
K/V hold the S-tokens layer ``l-1`` kept).

**When appending is exact** (:func:`can_append`). Layer ``l >= 1``'s K/V of a cached token
are layer ``l-1``'s output for it, unchanged iff layer ``l-1``'s window did not slide
(``n_old + k <= m[l-1]``: no cached token dropped from its keys). That matters only where
layer ``l``'s new window still holds a cached token: ``n_old > 0`` and ``k < m[l]``. Layer
0's K/V are per token (always exact), and a window that slides only drops its oldest K/V.
So, with ``l*`` the deepest layer ``>= 1`` with ``m[l*] > k``:

    exact  iff  n_old == 0,  or no such l*,  or  n_old + k <= m[l* - 1]

(``n_old``: the longest cached user's real S-tokens). In particular: the last layer's
window may slide (it only holds K/V, no queries); ``pyramid="off"`` appends exactly until
the stream holds ``s_max_len`` tokens; a pyramid (with ``k < m[L-1]``) until it holds
``m[L-2]`` (the 2-layer tiny preset: ``s_max_len``); and a batch of ``k >= m[1]`` new events
is always exact (no cached token reaches layer 1). The
condition is tight: one token over it and a cached token loses keys at layer ``l*-1``, so
its K/V at layer ``l*`` change (tests show a forced append then differs). Otherwise fall
back to a full :meth:`OneTrans.encode_user`: the cache holds K/V, not the hidden states a
partial re-encode from the sliding layer would need.

Only ``timestamp_aware`` streams append: ``timestamp_agnostic`` ends every sequence with its
[SEP], so a new event lands inside the stream, never at its end.

API: :func:`new_tokens` finds the new S-tokens of a history given the cached one (the
new stream must be the newest ``s_max_len`` of ``old ++ new``); :func:`append_user` extends
a :class:`UserKV` by them (refusing with :class:`AppendRefused` unless exact);
:func:`plan_append` and :func:`append_or_encode` put the two together, the latter falling
back to a full encode and saying why.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import torch
from torch import Tensor

from onetrans_trt.errors import OneTransError
from onetrans_trt.kv import UserKV

INF = 1 << 62


class AppendRefused(OneTransError):
    """The new S-tokens cannot be appended exactly; ``reason`` says why (re-encode)."""

    def __init__(self, reason: str):
        super().__init__(f"cannot append to the cached user state: {reason}")
        self.reason = reason


@dataclass(frozen=True)
class Decision:
    """Whether (and how) a new history appends to a cached one.

    ``k``: new S-tokens (0: the same stream, the cached state is the state); ``tokens``:
    those tokens as a one-user batch (``s_type``, ``s_<field>`` ``[1, k]``, ``s_length``);
    ``reason``: why not, or what was found."""

    ok: bool
    reason: str
    k: int = 0
    tokens: dict[str, np.ndarray] | None = None

    def __bool__(self) -> bool:
        return self.ok


def windows(cfg) -> list[int]:
    """``m[l]``: the most S-tokens layer ``l``'s K/V hold (``m[0] = s_max_len``)."""
    m = [int(cfg.schema.s_max_len)]
    for q in cfg.query_schedule()[: cfg.n_layers - 1]:
        m.append(min(m[-1], INF if q is None else int(q)))
    return m


def _lengths(old_lengths: Any) -> np.ndarray:
    if isinstance(old_lengths, Tensor):
        old_lengths = old_lengths.detach().cpu().numpy()
    return np.asarray(old_lengths, dtype=np.int64).reshape(-1)


def can_append(cfg, old_lengths: Any, k: int) -> tuple[bool, str]:
    """Whether appending ``k`` S-tokens to states of ``old_lengths`` real S-tokens (an int or
    ``[U]``) equals a full encode of the longer streams, and why (see the module docstring)."""
    if cfg.family != "onetrans":
        return False, (f"this append covers OneTrans, not family {cfg.family!r}"
                       + (" (HyFormer: models.append_hyformer)" if cfg.family == "hyformer" else ""))
    if cfg.schema.merge_mode != "timestamp_aware":
        return False, (f"merge mode {cfg.schema.merge_mode!r}: each sequence ends with its [SEP], so a new "
                       f"event lands inside the stream, not at its end")
    k = int(k)
    if k < 0:
        return False, f"k = {k} new S-tokens"
    if k == 0:
        return True, "no new S-tokens: the cached state is the state"
    lens = _lengths(old_lengths)
    n_old = int(lens.max(initial=0))
    if n_old < 0:
        return False, f"negative cached length {n_old}"
    m = windows(cfg)
    if n_old == 0:
        return True, f"empty cached history: the {k} new S-tokens are encoded against no cached ones"
    deepest = max((lay for lay in range(1, len(m)) if m[lay] > k), default=None)
    if deepest is None:
        return True, f"{k} new S-tokens fill every window of layers >= 1: no cached S-token passes layer 0"
    cap = m[deepest - 1]
    if n_old + k > cap:
        where = "the stream holds at most s_max_len =" if deepest == 1 else f"layer {deepest - 1}'s K/V hold at most"
        return False, (f"{where} {cap} S-tokens and {n_old} cached + {k} new > {cap}: the window slides, so "
                       f"cached S-tokens lose keys there and their K/V at layer {deepest} change; re-encode")
    return True, f"{n_old} cached + {k} new <= {cap} (layer {deepest - 1}'s window, no slide)"


# ---- the new S-tokens of a history ------------------------------------------------------
def _stream(schema, hist: Mapping[str, Any], what: str) -> dict[str, np.ndarray]:
    """The real S-tokens of a one-user history batch as the model reads them (1-D, oldest first)."""
    keys = ["s_type"] + [f"s_{f}" for f in schema.seq_fields]
    arr = {key: np.asarray(hist[key].detach().cpu().numpy() if isinstance(hist[key], Tensor) else hist[key])
           for key in keys + ["s_length"]}
    if arr["s_type"].ndim != 2 or arr["s_type"].shape[0] != 1:
        raise ValueError(f"{what}: expected one user's history ([1, L] tensors), got s_type {arr['s_type'].shape}")
    width = arr["s_type"].shape[1]
    n = min(int(arr["s_length"].reshape(-1)[0]), width, schema.s_max_len)
    return {key: arr[key][0, width - n:].astype(np.int64) for key in keys}


def _same(a: dict[str, np.ndarray], b: dict[str, np.ndarray], a0: int, b1: int) -> bool:
    """``b[:b1] == a[a0:]`` for every tensor."""
    return all(np.array_equal(b[key][:b1], a[key][a0:]) for key in a)


def _fits(a: dict[str, np.ndarray], b: dict[str, np.ndarray], k: int, cap: int):
    """The k new tokens if ``b`` is the newest ``cap`` of ``a ++ (k tokens)``, else None."""
    na, nb = len(a["s_type"]), len(b["s_type"])
    drop = max(0, na + k - cap)
    if min(na + k, cap) != nb or not _same(a, b, drop, nb - min(k, nb)):
        return None
    tokens = {key: v[nb - min(k, nb):][None, :] for key, v in b.items()}
    tokens["s_length"] = np.array([tokens["s_type"].shape[1]], dtype=np.int64)
    return tokens, f"{k} new S-tokens" + (f" ({drop} oldest cached ones fall out of the stream)" if drop else "")


def _matches(schema, old_hist, new_hist, k: int | None):
    """``(n_old, [(k, tokens, said), ...], why_not)``: every k that fits, smallest first."""
    a, b = _stream(schema, old_hist, "old history"), _stream(schema, new_hist, "new history")
    na, nb, cap = len(a["s_type"]), len(b["s_type"]), schema.s_max_len
    if k is not None:
        tries = [int(k)] if k >= 0 else []
    elif nb < cap:
        tries = [nb - na] if nb >= na else []
    else:  # at s_max_len; k >= s_max_len would drop every cached token (a full encode): not tried
        tries = list(range(max(0, cap - na), cap if na else cap + 1))
    found = []
    for kk in tries:
        hit = _fits(a, b, kk, cap)
        if hit is not None:
            found.append((kk, *hit))
    if found:
        return na, found, ""
    if k is not None and k < 0:
        why = f"k = {k} new S-tokens"
    elif nb < na and k is None:
        why = f"the new history's stream is shorter ({nb} S-tokens) than the cached one ({na})"
    else:
        why = (f"the new history's stream ({nb} S-tokens) is not the cached one ({na}) with "
               f"{'k = ' + str(k) + ' S-tokens' if k is not None else 'S-tokens'} appended at its newest end "
               f"(an event changed, was removed or lands before a cached one)")
    return na, [], why


def new_tokens(schema, old_hist: Mapping[str, Any], new_hist: Mapping[str, Any],
               k: int | None = None) -> tuple[int | None, dict[str, np.ndarray] | None, str]:
    """``(k, tokens, reason)``: the new stream is the newest ``s_max_len`` S-tokens of
    ``old ++ tokens`` with ``k = len(tokens)``; ``(None, None, reason)`` when it is not.

    ``old_hist`` / ``new_hist``: one user's history tensors (``encode_request``'s first
    output). With ``k`` None it is found: the unique one while the stream is below
    ``s_max_len``; at ``s_max_len`` (cached tokens dropped) the smallest that fits and keeps
    a cached token (any fitting one gives the same stream: the model reads token contents only)."""
    _, found, why = _matches(schema, old_hist, new_hist, k)
    if not found:
        return None, None, why
    kk, tokens, said = found[0]
    return kk, tokens, said


def plan_append(cfg, old_hist: Mapping[str, Any], new_hist: Mapping[str, Any], k: int | None = None) -> Decision:
    """Whether ``new_hist`` appends exactly to the state cached for ``old_hist``, with the new
    tokens when it does: :func:`new_tokens` and :func:`can_append` together (with ``k`` None
    at ``s_max_len``, the smallest fitting k that is exact)."""
    if cfg.family != "onetrans" or cfg.schema.merge_mode != "timestamp_aware":
        return Decision(False, can_append(cfg, 0, 1)[1])
    n_old, found, why = _matches(cfg.schema, old_hist, new_hist, k)
    first = None
    for kk, tokens, said in found:
        ok, reason = can_append(cfg, n_old, kk)
        d = Decision(ok, f"{said}; {reason}", kk, tokens if ok and kk else None)
        if ok:
            return d
        if first is None:
            first = d
    return first if first is not None else Decision(False, why)


# ---- the append itself ------------------------------------------------------------------
def _as_tensor(x: Any, device=None) -> Tensor:
    return x if isinstance(x, Tensor) else torch.as_tensor(np.asarray(x), device=device)


def append_user(model, kv_old: UserKV, tokens: Mapping[str, Any], *, force: bool = False,
                widths: str = "longest") -> UserKV:
    """``kv_old`` extended by ``tokens`` (``s_type``, ``s_<field>`` ``[U, k]``, no padding:
    the same k new S-tokens per user, newest last): each layer's K/V equal (up to float
    rounding) to :meth:`OneTrans.encode_user` of the longer streams, padded to the longest.

    ``widths``: ``"longest"`` trims the cached left padding to the longest user (the shapes
    of that full encode); ``"static"`` keeps layer ``l``'s cached width ``n_l`` up to
    ``min(n_l, m[l] - min(k, m[l]))``, from shapes alone (what an exported append graph can
    do): the same real tokens, possibly more (masked) left padding.

    Refuses (:class:`AppendRefused`) unless :func:`can_append` holds; ``force`` skips that
    check (for tests: a forced append over the limit is *not* the full encode). ``k = 0``
    returns ``kv_old`` itself."""
    if widths not in ("longest", "static"):
        raise ValueError(f"widths: 'longest' or 'static', got {widths!r}")
    cfg = model.cfg
    keys = ["s_type"] + [f"s_{f}" for f in cfg.schema.seq_fields]
    missing = [key for key in keys if key not in tokens]
    if missing:
        raise ValueError(f"new tokens: missing {missing}")
    device = kv_old.keys[0].device if isinstance(kv_old.keys[0], Tensor) else None
    batch = {key: _as_tensor(tokens[key], device).to(torch.int64) for key in keys}
    types = batch["s_type"]
    u = len(_lengths(kv_old.lengths))
    if types.ndim != 2 or types.shape[0] != u:
        raise ValueError(f"new tokens: s_type must be [U={u}, k], got {tuple(types.shape)}")
    k = int(types.shape[1])
    if k and (int(types.min()) < 1 or int(types.max()) > cfg.schema.num_sequences):
        raise ValueError("new tokens: every one must be an event (s_type in 1..K): no padding, no [SEP]")
    if not force:
        ok, why = can_append(cfg, kv_old.lengths, k)
        if not ok:
            raise AppendRefused(why)
    if k == 0:
        return kv_old
    m = windows(cfg)
    n_old = _as_tensor(kv_old.lengths, device).to(torch.int64).reshape(-1)
    n_new = (n_old + k).clamp(max=m[0])
    top = int(n_new.max())
    x = model.s_tokenizer(batch)[:, -min(k, m[0]):]  # the new tokens in the stream
    keys_out, values_out = [], []
    for lay, layer in enumerate(model.layers):
        new_here = x.shape[1]  # == min(k, m[lay])
        k_old, v_old = _as_tensor(kv_old.keys[lay], device), _as_tensor(kv_old.values[lay], device)
        if widths == "longest":  # a full encode's K/V width here (padded to the longest user)
            width = min(top, m[lay])
        else:
            width = min(k_old.shape[2], m[lay] - new_here) + new_here
        keep = width - new_here  # cached columns still in the window (their padding trimmed)
        if keep > k_old.shape[2]:
            raise ValueError(f"layer {lay}: cached K/V hold {k_old.shape[2]} S-tokens, {keep} needed")
        past = slice(k_old.shape[2] - keep, k_old.shape[2])
        nq = min(k, m[lay + 1]) if lay + 1 < len(m) else None
        kk, vv, x = layer.append_s(x, k_old[:, :, past], v_old[:, :, past], n_new.clamp(max=width), nq)
        keys_out.append(kk)
        values_out.append(vv)
    return UserKV(keys_out, values_out, n_new)


def append_or_encode(model, kv_old: UserKV, old_hist: Mapping[str, Any], new_hist: Mapping[str, Any],
                     k: int | None = None) -> tuple[UserKV, Decision]:
    """The state of ``new_hist``: appended to ``kv_old`` (cached for ``old_hist``) when exact,
    else a full :meth:`OneTrans.encode_user` of ``new_hist``; the decision says which and why."""
    d = plan_append(model.cfg, old_hist, new_hist, k)
    n_cached = _lengths(kv_old.lengths)
    n_hist = len(_stream(model.cfg.schema, old_hist, "old history")["s_type"]) if d.ok else None
    if d.ok and (len(n_cached) != 1 or int(n_cached[0]) != n_hist):
        d = Decision(False, f"the cached state holds {n_cached.tolist()} S-tokens, the old history {n_hist}: "
                            f"not its state")
    if d.ok:
        return (kv_old if d.k == 0 else append_user(model, kv_old, d.tokens)), d
    batch = {key: _as_tensor(v) for key, v in new_hist.items()}
    return model.encode_user(batch), d


__all__ = ["AppendRefused", "Decision", "append_or_encode", "append_user", "can_append", "new_tokens",
           "plan_append", "windows"]
