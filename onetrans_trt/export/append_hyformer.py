"""The exported HyFormer append graph: one user's appendable state extended by each sequence's new events.

``BUILD/user_encoder_append.onnx`` (HyFormer) computes
:func:`onetrans_trt.models.append_hyformer.append_user` for one user, every width from input
shapes alone. Appending every event to the empty state is the full encode (nothing is cached,
so nothing can slide), so the same graph also makes a user's first appendable state
(:func:`empty_state`): the plain ``user_encoder.onnx`` does not output the self-attention K/V
an append needs. Whether an append is exact is decided on the host first
(:func:`~onetrans_trt.models.append_hyformer.plan_append`), as for OneTrans.

Inputs (``J`` sequences, ``S = n_layers * J`` slots; every tensor real tokens only, no padding:
:func:`append_feeds` trims a padded state):

- ``new<j>_s_type``, ``new<j>_s_<field>`` ``[1, k_j]`` int64: sequence j's new events, oldest
  first (``k_j`` may be 0);
- ``user_k_<slot>``, ``user_v_<slot>`` ``[1, H, n_slot, dh]``: the decoder K/V;
- ``user_seq_length`` ``[1, J]`` int64, ``user_seq_pool`` ``[1, J, d]``;
- ``user_enc_k_<slot>``, ``user_enc_v_<slot>`` ``[1, H, e_slot, dh]``: the self-attention K/V
  (none for ``swiglu``).

Outputs: the same names with ``_new`` (an ONNX value cannot be both input and output).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from onetrans_trt.errors import InputError
from onetrans_trt.kv import UserKV, kv_names

NEW = "_new"
BIG = 1 << 30  # a valid length >= any key count: "all keys real"


def _seq_keys(cfg) -> list[str]:
    return ["s_type", *[f"s_{f}" for f in cfg.schema.seq_fields]]


def token_input_names(cfg) -> list[str]:
    return [f"new{j}_{key}" for j in range(cfg.schema.num_sequences) for key in _seq_keys(cfg)]


def state_names(cfg) -> list[str]:
    from onetrans_trt.models.append_hyformer import enc_names

    slots = cfg.n_layers * cfg.schema.num_sequences
    return [*kv_names(slots), "user_seq_length", "user_seq_pool", *[f"user_{n}" for n in enc_names(cfg)]]


def append_input_names(cfg) -> list[str]:
    return token_input_names(cfg) + state_names(cfg)


def append_output_names(cfg) -> list[str]:
    return [n + NEW for n in state_names(cfg)]


def append_dynamic_axes(cfg) -> dict[str, dict[int, str]]:
    dyn: dict[str, dict[int, str]] = {}
    for j in range(cfg.schema.num_sequences):
        for key in _seq_keys(cfg):
            dyn[f"new{j}_{key}"] = {1: f"new_{j}"}
    for name in state_names(cfg):
        if name.startswith(("user_k_", "user_v_")):
            dyn[name] = {2: f"kv_len_{name.rsplit('_', 1)[1]}"}
        elif name.startswith(("user_enc_k_", "user_enc_v_")):
            dyn[name] = {2: f"enc_len_{name.rsplit('_', 1)[1]}"}
    return dyn


class HyAppendGraph(nn.Module):
    """:func:`append_user` for one user with one named input per tensor, for export."""

    def __init__(self, model: nn.Module):
        super().__init__()
        if model.cfg.family != "hyformer":
            raise InputError(f"no HyFormer append graph for family {model.cfg.family!r}")
        self.model, self.cfg = model.eval(), model.cfg
        from onetrans_trt.export.serving import _named_forward

        _named_forward(self, self.input_names)

    @property
    def input_names(self) -> list[str]:
        return append_input_names(self.cfg)

    @property
    def output_names(self) -> list[str]:
        return append_output_names(self.cfg)

    def _forward(self, tensors: tuple[Tensor, ...]):
        named = dict(zip(self.input_names, tensors))
        model, cfg = self.model, self.cfg
        n_seq = cfg.schema.num_sequences
        xs = []
        for j in range(n_seq):
            xs.append(model.s_tokenizer({key: named[f"new{j}_{key}"] for key in _seq_keys(cfg)}))
        lengths = named["user_seq_length"]
        pool_old = named["user_seq_pool"]
        pools = []
        for j, x in enumerate(xs):
            n = lengths[:, j].to(x.dtype)
            k = x.new_ones(x.shape[:2]).sum(dim=1)
            pools.append((pool_old[:, j] * n.unsqueeze(-1) + x.sum(dim=1)) / (n + k).clamp(min=1).unsqueeze(-1))
        seq_len = torch.stack([lengths[:, j] + xs[j].new_ones(xs[j].shape[:2], dtype=torch.int64).sum(dim=1)
                               for j in range(n_seq)], dim=1)
        keys, values, enc = [], [], []
        valid = torch.full((1,), BIG, dtype=torch.int64)
        for lay, layer in enumerate(model.encoders):
            for j, e in enumerate(layer):
                slot = lay * n_seq + j
                spec = cfg.hy_seq(j)  # sequence j's own encoder and window
                w, longer, attends = spec["window"], spec["encoder"] == "longer", spec["encoder"] != "swiglu"
                x = xs[j]
                past = None
                if attends:
                    sk, sv = named[f"user_enc_k_{slot}"], named[f"user_enc_v_{slot}"]
                    if longer and lay > 0:  # this layer's keys: the newest w tokens of layer lay-1's output
                        n_in, a = sk.shape[2], x.shape[1]
                        keep = torch.sym_min(n_in, w - a)
                        sk, sv = sk[:, :, n_in - keep:], sv[:, :, n_in - keep:]
                    past = (sk, sv)
                out, kk, vv, sk_new, sv_new = e.run(x, valid, past)
                ko, vo = named[f"user_k_{slot}"], named[f"user_v_{slot}"]
                if longer:  # the layer's output window: the newest w tokens
                    n_out = ko.shape[2]
                    keep_out = torch.sym_min(n_out, w - out.shape[1])
                    ko, vo = ko[:, :, n_out - keep_out:], vo[:, :, n_out - keep_out:]
                keys.append(torch.cat([ko, kk], dim=2))
                values.append(torch.cat([vo, vv], dim=2))
                if attends:
                    enc += [sk_new, sv_new]
                xs[j] = out
        state = [t for pair in zip(keys, values) for t in pair]
        return (*state, seq_len, torch.stack(pools, dim=1), *enc)


# ---- host side ----------------------------------------------------------------------------
def _real(t: Any, n: int) -> np.ndarray:
    from onetrans_trt.runtime.state import to_numpy

    a = to_numpy(t)
    w = a.shape[2]
    return np.ascontiguousarray(a[:, :, w - min(n, w):], dtype=np.float32)


def empty_state(cfg) -> UserKV:
    """The state of an empty history in the graph's layout (zero-width K/V): appending a
    history's every event to it is its full encode."""
    from onetrans_trt.models.append_hyformer import enc_names
    from onetrans_trt.models.hyformer import SEQ_LENGTH, SEQ_POOL

    j, h = cfg.schema.num_sequences, cfg.n_heads
    dh = cfg.d_model // h
    z = np.zeros((1, h, 0, dh), np.float32)
    slots = cfg.n_layers * j
    return UserKV([z] * slots, [z] * slots, np.zeros(1, np.int64),
                  {SEQ_LENGTH: np.zeros((1, j), np.int64), SEQ_POOL: np.zeros((1, j, cfg.d_model), np.float32),
                   **{n: z for n in enc_names(cfg)}})


def append_feeds(kv: UserKV, tokens: dict[str, dict[str, Any]] | None, cfg) -> dict[str, np.ndarray]:
    """The graph's inputs: a one-user state (padded or not: trimmed to its real tokens here)
    and :func:`plan_append`'s per-sequence tokens (a sequence absent: no new events)."""
    from onetrans_trt.models.append_hyformer import ENC_K, ENC_V, enc_names
    from onetrans_trt.models.hyformer import SEQ_LENGTH, SEQ_POOL
    from onetrans_trt.runtime.state import to_numpy

    n_seq = cfg.schema.num_sequences
    lengths = to_numpy(kv.extras[SEQ_LENGTH]).astype(np.int64).reshape(1, n_seq)
    feeds: dict[str, np.ndarray] = {}
    tokens = tokens or {}
    for j in range(n_seq):
        tok = tokens.get(str(j), {})
        for key in _seq_keys(cfg):
            feeds[f"new{j}_{key}"] = np.ascontiguousarray(np.asarray(tok.get(key, np.zeros((1, 0))),
                                                                     dtype=np.int64).reshape(1, -1))
    for slot, (kt, vt) in enumerate(zip(kv.keys, kv.values)):
        lay, j = divmod(slot, n_seq)
        w, longer = cfg.hy_seq(j)["window"], cfg.hy_seq(j)["encoder"] == "longer"
        n = int(lengths[0, j])
        n_out = min(n, w) if longer else n
        feeds[f"user_k_{slot}"], feeds[f"user_v_{slot}"] = _real(kt, n_out), _real(vt, n_out)
        if f"{ENC_K}{slot}" in kv.extras:
            n_in = min(n, w) if (longer and lay > 0) else n
            feeds[f"user_{ENC_K}{slot}"] = _real(kv.extras[f"{ENC_K}{slot}"], n_in)
            feeds[f"user_{ENC_V}{slot}"] = _real(kv.extras[f"{ENC_V}{slot}"], n_in)
    missing = [n for n in enc_names(cfg) if f"user_{n}" not in feeds]
    if missing:
        raise InputError("the state has no self-attention K/V (not an appendable state)")
    feeds["user_seq_length"] = np.ascontiguousarray(lengths)
    feeds["user_seq_pool"] = np.ascontiguousarray(to_numpy(kv.extras[SEQ_POOL]), dtype=np.float32)
    return feeds


def appended_state(outputs: dict[str, Any], s_length: Any, cfg: Any = None) -> UserKV:
    """The graph's outputs (by name) as an appendable :class:`UserKV`, every K/V slot
    left-padded (zeros, masked: ``seq_length`` says how many columns are real) to the width
    ``user_encoder.onnx`` gives it for a stream of ``s_length`` events (at least 1): the
    exported scorer was traced on those widths (slots of equal width share one dimension, and
    ONNX Runtime plans its buffers on that), and a LONGER slot must stay no wider than its
    window, where ``seq_length`` >= its width means "all real". Without ``cfg`` (one encoder
    for every sequence): one common width."""
    from onetrans_trt.models.hyformer import SEQ_LENGTH

    named = {k[: -len(NEW)]: v for k, v in outputs.items()}
    n = sum(1 for k in named if k.startswith("user_k_"))
    real = [max(np.asarray(named[f"user_{kv}_{i}"]).shape[2] for kv in "kv") for i in range(n)]
    if cfg is None:
        widths = [max([1] + real)] * n
    else:
        from onetrans_trt.export.api import hyformer_manifest
        from onetrans_trt.export.inspect import hyformer_slot_lengths

        stream = int(np.asarray(s_length).reshape(-1)[0])
        widths = [max(1, w, r) for w, r in zip(hyformer_slot_lengths(hyformer_manifest(cfg), stream), real)]

    def one(a, width):
        a = np.asarray(a)
        if a.shape[2] == width:
            return a
        return np.concatenate([np.zeros((*a.shape[:2], width - a.shape[2], a.shape[3]), a.dtype), a], axis=2)

    extras = {k[len("user_"):]: v for k, v in named.items() if not k.startswith(("user_k_", "user_v_"))}
    extras[SEQ_LENGTH] = np.asarray(extras[SEQ_LENGTH], dtype=np.int64)
    return UserKV([one(named[f"user_k_{i}"], widths[i]) for i in range(n)],
                  [one(named[f"user_v_{i}"], widths[i]) for i in range(n)],
                  np.asarray(s_length, dtype=np.int64).reshape(-1), extras)


def _example_feeds(cfg) -> dict[str, np.ndarray]:
    """Tracing inputs: every dynamic size >= 2 and distinct."""
    rng = np.random.default_rng(0)
    h, dh, n_seq = cfg.n_heads, cfg.d_model // cfg.n_heads, cfg.schema.num_sequences
    feeds: dict[str, np.ndarray] = {}
    for j in range(n_seq):
        k = 3 + j
        feeds[f"new{j}_s_type"] = np.full((1, k), j + 1, np.int64)
        for f, table in cfg.schema.seq_fields.items():
            feeds[f"new{j}_s_{f}"] = rng.integers(1, cfg.schema.tables[table].rows, (1, k))
    for name in state_names(cfg):
        if name == "user_seq_length":
            feeds[name] = np.arange(7, 7 + n_seq, dtype=np.int64).reshape(1, n_seq)
        elif name == "user_seq_pool":
            feeds[name] = rng.standard_normal((1, n_seq, cfg.d_model)).astype(np.float32)
        else:
            slot = int(name.rsplit("_", 1)[1])
            width = (5 if name.startswith("user_enc") else 9) + 2 * slot
            feeds[name] = rng.standard_normal((1, h, width, dh)).astype(np.float32)
    return {n: np.ascontiguousarray(v) for n, v in feeds.items()}


def export_hyformer_append(model: nn.Module, path: Path, opset: int) -> float:
    """Trace :class:`HyAppendGraph` to ``path`` (atomically); returns the seconds it took."""
    from onetrans_trt import interrupts
    from onetrans_trt.export.api import trace_onnx
    from onetrans_trt.onnx_files import load_model, save_model_atomic

    graph = HyAppendGraph(model)
    t0 = time.perf_counter()
    with interrupts.temporary_directory(prefix="onetrans-append-") as tmp:
        raw = tmp / path.name
        trace_onnx(graph, _example_feeds(model.cfg), raw, opset, dynamic=append_dynamic_axes(model.cfg))
        save_model_atomic(load_model(raw), path)
    return time.perf_counter() - t0


__all__ = ["HyAppendGraph", "append_feeds", "append_input_names", "append_output_names", "appended_state",
           "empty_state", "export_hyformer_append"]
