"""Append instead of re-encode, HyFormer: extend a cached user state by each sequence's new events.

HyFormer keeps its sequences apart (:meth:`HyFormer.sequences`): sequence ``j``'s state is a
function of its own real tokens only, in order (no positions, no other sequence). So a new
history appends to a cached one when **every sequence's new token list extends its cached
list** (``new_j = old_j ++ k_j tokens``, ``k_j >= 0``): however the merged stream interleaves
the events, and in either merge mode ([SEP] tokens belong to no sequence). When the merged
stream is full and its oldest events fall out, the sequences they belonged to lose their
oldest tokens and no longer extend: the window slides, re-encode (the decision says so).

**What each layer needs.** Layer ``l`` of sequence ``j`` reads ``X_l`` (the tokenizer's
tokens for ``l = 0``, else layer ``l-1``'s output ``Y_{l-1}``) and emits ``Y_l`` and the
decoder's K/V (a projection of ``Y_l``, per token: the :class:`UserKV` slot ``l * J + j``):

- ``swiglu``: per token, no attention: the new tokens' outputs need nothing cached;
- ``transformer``: causal self-attention over all of ``X_l``: a cached token's output never
  changes, and the new tokens attend ``[cached ; new]`` self-attention K/V of ``X_l``;
- ``longer``: layer 0's newest ``w = longer_window`` tokens attend all of ``X_0`` causally,
  and only they go on; layers ``>= 1`` self-attend those ``w`` tokens causally. A cached
  token still in layer ``l >= 1``'s new window keeps its output iff that window did not
  slide under it: exact iff ``n_old_j == 0``, or ``k_j >= w`` (no cached token stays in any
  window past layer 0), or ``n_layers == 1``, or ``n_old_j + k_j <= w``
  (:func:`can_append`; tight, the tests show a forced append over it differs).

The decoder's K/V cannot give back the self-attention K/V (a normed projection of ``Y_l``),
so an appendable state carries each attention layer's self-attention K/V too:
:func:`encode_appendable` returns :meth:`HyFormer.encode_user`'s state with extras
``enc_k_<slot>`` / ``enc_v_<slot>`` (``[U, H, n, dh]``, left-padded like the K/V; none for
``swiglu``). The scorer reads only ``user_k_*``, ``user_v_*``, ``seq_length`` and
``seq_pool``, so those extras ride along in the store unused by it.

**Pools.** ``seq_pool`` is each sequence's mean token; the appended mean is
``(pool_old * n_old + sum(new)) / (n_old + k)``: the cached mean times its count is the
running sum to within two roundings, far inside the 1e-5 the tests hold it to.

API: :func:`plan_append` (the per-sequence new tokens and whether appending is exact),
:func:`append_user` (one user's state extended by them), :func:`append_or_encode` (append when
exact, else a full :func:`encode_appendable`, saying why).
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch
from torch import Tensor

from onetrans_trt.kv import UserKV
from onetrans_trt.models.append import AppendRefused, Decision, _as_tensor, _stream

ENC_K, ENC_V = "enc_k_", "enc_v_"


def _self_attends(cfg, j: int) -> bool:
    return cfg.hy_seq(j)["encoder"] != "swiglu"


def appendable(cfg) -> tuple[bool, str]:
    """Whether this HyFormer's states can be appended to at all, and why not. Bidirectional
    (full) sequence self-attention lets every cached token attend the new ones, so each new
    event changes every cached token's output: no append exists, only a re-encode."""
    _check_family(cfg)
    attends = [cfg.hy_seq(j)["encoder"] for j in range(cfg.schema.num_sequences) if _self_attends(cfg, j)]
    if attends and cfg.seq_attention != "causal":
        return False, (f"this HyFormer's {attends[0]} sequence encoder attends bidirectionally (the paper's full "
                       f"self-attention): every new event changes every cached token's output, so no user state "
                       f"appends; train it with seq_attention 'causal' (or the swiglu encoder) to append")
    return True, ""


def enc_names(cfg) -> list[str]:
    """The extras an appendable state adds: ``enc_k_<slot>``, ``enc_v_<slot>`` (none for swiglu)."""
    j = cfg.schema.num_sequences
    return [f"{p}{s}" for s in range(cfg.n_layers * j) if _self_attends(cfg, s % j) for p in (ENC_K, ENC_V)]


@torch.no_grad()
def encode_appendable(model, batch: Mapping[str, Tensor]) -> UserKV:
    """:meth:`HyFormer.encode_user` of ``batch`` with ``self_kv=True``: the state plus each
    attention layer's self-attention K/V (extras ``enc_k_<slot>`` / ``enc_v_<slot>``), a state
    :func:`append_user` can extend (same code path as the plain encode)."""
    _check_family(model.cfg)
    return model.encode_user(dict(batch), self_kv=True)


def _check_family(cfg) -> None:
    if cfg.family != "hyformer":
        raise ValueError(f"models.append_hyformer covers HyFormer, not family {cfg.family!r} "
                         f"(OneTrans: models.append)")


# ---- which tokens are new, and is appending exact ---------------------------------------
def sequence_tokens(schema, hist: Mapping[str, Any], what: str = "history",
                    caps: list[int | None] | None = None) -> list[dict[str, np.ndarray]]:
    """Each sequence's real tokens as the model lays them out (the newest ``s_max_len`` of
    the stream, oldest first; of those, the newest ``caps[j]`` of sequence j when given):
    ``[{"s_type": [n_j], "s_<field>": [n_j]}, ...]``."""
    stream = _stream(schema, hist, what)
    out = []
    for j in range(schema.num_sequences):
        mine = stream["s_type"] == j + 1
        cap = caps[j] if caps else None
        out.append({key: v[mine][-cap:] if cap else v[mine] for key, v in stream.items()})
    return out


def seq_caps(cfg) -> list[int | None]:
    return [cfg.hy_seq(j)["max_len"] for j in range(cfg.schema.num_sequences)]


def _extends(old: dict[str, np.ndarray], new: dict[str, np.ndarray], drop: int = 0) -> bool:
    n = len(old["s_type"]) - drop
    return len(new["s_type"]) >= n and all(np.array_equal(new[key][:n], old[key][drop:]) for key in old)


def can_append(cfg, n_old: list[int], k: list[int]) -> tuple[bool, str]:
    """Whether appending ``k[j]`` tokens to sequence ``j``'s ``n_old[j]`` cached ones equals a
    full encode (see the module docstring), and why."""
    _check_family(cfg)
    names = [s.name for s in cfg.schema.sequences]
    if any(int(x) < 0 for x in [*n_old, *k]):
        return False, f"negative counts: cached {list(n_old)}, new {list(k)}"
    ok, why = appendable(cfg)
    if not ok and any(int(n) > 0 and int(kk) > 0 for n, kk in zip(n_old, k)):
        return False, why
    if cfg.n_layers > 1:
        for j, (name, n, kk) in enumerate(zip(names, n_old, k)):
            w = cfg.hy_seq(j)["window"]
            if cfg.hy_seq(j)["encoder"] == "longer" and n > 0 and 0 < kk < w and n + kk > w:
                return False, (f"sequence {name!r}: LONGER keeps the newest {w} tokens after layer 0 and {n} cached "
                               f"+ {kk} new > {w}: that window slides, so cached tokens lose keys at layers >= 1 and "
                               f"their K/V change; re-encode")
    total = int(sum(int(x) for x in k))
    if total == 0:
        return True, "no new events: the cached state is the state"
    said = ", ".join(f"{name} {n}+{kk}" for name, n, kk in zip(names, n_old, k) if kk)
    return True, f"every sequence extends its cached tokens ({said}); no window slides"


def plan_append(cfg, old_hist: Mapping[str, Any], new_hist: Mapping[str, Any]) -> Decision:
    """Whether ``new_hist`` appends exactly to the state cached for ``old_hist``; ``tokens``:
    ``{"<j>": {"s_type": [1, k_j], "s_<field>": [1, k_j]}}`` for each sequence with new events,
    ``k``: their total."""
    _check_family(cfg)
    old = sequence_tokens(cfg.schema, old_hist, "old history", seq_caps(cfg))
    new = sequence_tokens(cfg.schema, new_hist, "new history", seq_caps(cfg))
    full = len(_stream(cfg.schema, new_hist, "new history")["s_type"]) >= cfg.schema.s_max_len
    for j, (seq, a, b) in enumerate(zip(cfg.schema.sequences, old, new)):
        if _extends(a, b):
            continue
        na, cap = len(a["s_type"]), cfg.hy_seq(j)["max_len"]
        capped = cap is not None and len(b["s_type"]) >= cap
        if (full or capped) and any(_extends(a, b, drop) for drop in range(1, na + 1)):
            limit = (f"sequence {seq.name!r} keeps its newest max_len = {cap} events" if capped else
                     f"the stream holds at most s_max_len = {cfg.schema.s_max_len} S-tokens")
            return Decision(False, f"{limit} and the oldest events of sequence {seq.name!r} left it: the window "
                                   f"slides, so that sequence no longer extends its cached tokens; re-encode")
        return Decision(False, f"sequence {seq.name!r}: the new history's {len(b['s_type'])} events are not the "
                               f"cached {na} with events appended at its newest end (an event changed, was removed "
                               f"or lands before a cached one)")
    n_old = [len(a["s_type"]) for a in old]
    k = [len(b["s_type"]) - n for b, n in zip(new, n_old)]
    ok, why = can_append(cfg, n_old, k)
    tokens = {str(j): {key: v[n:][None, :] for key, v in b.items()} for j, (b, n) in enumerate(zip(new, n_old))
              if len(b["s_type"]) > n}
    return Decision(ok, why, int(sum(k)), tokens if ok and sum(k) else None)


# ---- the append itself ------------------------------------------------------------------
def _real_tail(t: Tensor, n: int) -> Tensor:
    """The newest ``min(n, width)`` columns of a left-padded ``[1, H, width, dh]``."""
    w = t.shape[2]
    return t[:, :, w - min(n, w):]


@torch.no_grad()
def append_user(model, kv_old: UserKV, tokens: Mapping[str, Mapping[str, Any]], *, force: bool = False,
                s_length: Any = None) -> UserKV:
    """``kv_old`` (one user, from :func:`encode_appendable` or this function) extended by
    ``tokens`` (:func:`plan_append`'s: per sequence ``"<j>"`` its new tokens ``[1, k_j]``,
    oldest first, real events only). Each slot's K/V hold exactly the real tokens (no
    padding); the scorer reads them as a full encode's (equal up to float rounding).
    ``s_length``: the new history's stream length (``lengths``; HyFormer's scorer reads the
    per-sequence ``seq_length``). Refuses (:class:`AppendRefused`) unless :func:`can_append`
    holds; ``force`` skips that check (for tests)."""
    from onetrans_trt.models.hyformer import SEQ_LENGTH, SEQ_POOL

    cfg = model.cfg
    _check_family(cfg)
    n_seq = cfg.schema.num_sequences
    if kv_old.keys[0].shape[0] != 1:
        raise ValueError("append_user takes the state of exactly one user (U=1)")
    missing = [n for n in enc_names(cfg) if n not in kv_old.extras]
    if missing:
        raise AppendRefused("the cached state has no self-attention K/V (encode it with encode_appendable)")
    unknown = [key for key in tokens if key not in {str(j) for j in range(n_seq)}]
    if unknown:
        raise ValueError(f"new tokens: unknown sequences {unknown} (keys are '0'..'{n_seq - 1}')")
    device = kv_old.keys[0].device
    n_old = [int(x) for x in _as_tensor(kv_old.extras[SEQ_LENGTH], device).reshape(-1).tolist()]
    new_x: dict[int, Tensor] = {}
    for key, tok in tokens.items():
        j = int(key)
        batch = {name: _as_tensor(v, device).to(torch.int64).reshape(1, -1) for name, v in tok.items()}
        if batch["s_type"].numel() and not bool((batch["s_type"] == j + 1).all()):
            raise ValueError(f"new tokens of sequence {j}: every s_type must be {j + 1}")
        if batch["s_type"].numel():
            new_x[j] = model.s_tokenizer(batch)
    k = [int(new_x[j].shape[1]) if j in new_x else 0 for j in range(n_seq)]
    if not force:
        ok, why = can_append(cfg, n_old, k)
        if not ok:
            raise AppendRefused(why)
    if not new_x:
        return kv_old
    pool = _as_tensor(kv_old.extras[SEQ_POOL], device).clone()
    for j, x in new_x.items():
        total = pool[0, j] * n_old[j] + x[0].sum(dim=0)
        pool[0, j] = total / max(n_old[j] + k[j], 1)
    keys, values = list(kv_old.keys), list(kv_old.values)
    extras = dict(kv_old.extras)
    xs = dict(new_x)
    for lay, layer in enumerate(model.encoders):
        for j, enc in enumerate(layer):
            if j not in xs:
                continue
            slot = lay * n_seq + j
            kind, w = cfg.hy_seq(j)["encoder"], cfg.hy_seq(j)["window"]
            x = xs[j]
            a = x.shape[1]  # new tokens entering this layer
            past = None
            if _self_attends(cfg, j):
                sk, sv = extras[f"{ENC_K}{slot}"], extras[f"{ENC_V}{slot}"]
                real_in = n_old[j] if (lay == 0 or kind == "transformer") else min(n_old[j], w)
                keep = real_in if (lay == 0 or kind == "transformer") else max(0, min(real_in, w - a))
                past = (_real_tail(sk, real_in)[:, :, real_in - keep:], _real_tail(sv, real_in)[:, :, real_in - keep:])
                valid = torch.tensor([keep + a], device=device)
            else:
                valid = torch.tensor([a], device=device)
            out, kk, vv, sk_new, sv_new = enc.run(x, valid, past)
            if sk_new is not None:
                extras[f"{ENC_K}{slot}"], extras[f"{ENC_V}{slot}"] = sk_new, sv_new
            real_out = n_old[j] if kind != "longer" else min(n_old[j], w)
            keep_out = real_out if kind != "longer" else max(0, min(real_out, w - out.shape[1]))
            keys[slot] = torch.cat([_real_tail(keys[slot], real_out)[:, :, real_out - keep_out:], kk], dim=2)
            values[slot] = torch.cat([_real_tail(values[slot], real_out)[:, :, real_out - keep_out:], vv], dim=2)
            xs[j] = out
    lengths = torch.tensor([[n + kk for n, kk in zip(n_old, k)]], device=device)
    extras[SEQ_LENGTH], extras[SEQ_POOL] = lengths.to(torch.int64), pool
    if s_length is None:
        s_length = _as_tensor(kv_old.lengths, device) + sum(k)
    return UserKV(keys, values, _as_tensor(s_length, device).reshape(-1), extras)


@torch.no_grad()
def append_or_encode(model, kv_old: UserKV, old_hist: Mapping[str, Any],
                     new_hist: Mapping[str, Any]) -> tuple[UserKV, Decision]:
    """The appendable state of ``new_hist``: ``kv_old`` (cached for ``old_hist``) appended when
    exact, else :func:`encode_appendable` of ``new_hist``; the decision says which and why."""
    from onetrans_trt.models.hyformer import SEQ_LENGTH

    d = plan_append(model.cfg, old_hist, new_hist)
    if d.ok:
        cached = _as_tensor(kv_old.extras[SEQ_LENGTH]).reshape(-1).tolist()
        have = [len(s["s_type"]) for s in sequence_tokens(model.cfg.schema, old_hist, "old history", seq_caps(model.cfg))]
        if [int(x) for x in cached] != have:
            d = Decision(False, f"the cached state holds {cached} tokens per sequence, the old history {have}: "
                                f"not its state")
        elif any(n not in kv_old.extras for n in enc_names(model.cfg)):
            d = Decision(False, "the cached state has no self-attention K/V (not from encode_appendable)")
    if d.ok:
        s_len = _as_tensor(np.asarray(new_hist["s_length"]) if not isinstance(new_hist["s_length"], Tensor)
                           else new_hist["s_length"])
        return (kv_old if d.k == 0 else append_user(model, kv_old, d.tokens, s_length=s_len)), d
    batch = {key: _as_tensor(v) for key, v in new_hist.items()}
    return encode_appendable(model, batch), d


__all__ = ["ENC_K", "ENC_V", "append_or_encode", "append_user", "appendable", "can_append", "seq_caps", "enc_names", "encode_appendable",
           "plan_append", "sequence_tokens"]
