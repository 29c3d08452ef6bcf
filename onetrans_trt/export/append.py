"""The exported append graph: a cached OneTrans user state extended by k new S-tokens.

``BUILD/user_encoder_append.onnx`` computes :func:`onetrans_trt.models.append.append_user`
with ``widths="static"`` (every width from input shapes alone), so a server that holds a
user's K/V can extend it by the user's k newest events instead of re-running
``user_encoder.onnx`` over the whole history. Whether that is exact is decided on the host
(:func:`~onetrans_trt.models.append.can_append`) *before* calling the graph; the graph
itself appends whatever it is given.

Inputs (``U`` users, ``k`` new tokens, ``n_l`` cached K/V columns of layer ``l``):

- ``s_type``, ``s_<field>`` ``[U, k]`` int64: the new S-tokens, oldest first, real events
  only (no padding, no [SEP]);
- ``s_length`` ``[U]`` int64: the cached real S-tokens per user (the state's length);
- ``user_k_<l>``, ``user_v_<l>`` ``[U, H, n_l, dh]`` float32: the cached K/V (left-padded),
  as ``user_encoder.onnx`` (or this graph) returned them.

Outputs: ``user_k_<l>_new``, ``user_v_<l>_new`` ``[U, H, w_l, dh]`` float32 with
``w_l = min(n_l, m[l] - min(k, m[l])) + min(k, m[l])`` (``m``: :func:`windows`), and
``s_length_new`` ``[U]`` int64 ``= min(s_length + k, s_max_len)``. An ONNX value cannot be
both a graph input and a graph output, hence the ``_new`` suffix;
:func:`appended_state` turns the outputs back into a :class:`UserKV` (the scorer's
``user_k_<l>`` / ``s_length``).

Layer ``l`` keeps the newest ``min(n_l, m[l] - min(k, m[l]))`` cached columns, appends the
K/V of its ``min(k, m[l])`` new tokens, and (but the last layer) computes its output for
the newest ``min(k, m[l+1])`` of them with ``TailCausalAttention`` (our custom node: ORT runs
its ONNX function, TensorRT our plugin) over ``valid = min(s_length_new, w_l)`` keys.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from onetrans_trt.errors import BuildError, InputError
from onetrans_trt.kv import UserKV, kv_names
from onetrans_trt.models.append import can_append, windows
from onetrans_trt.models.attention import merge_heads, split_heads

APPEND_GRAPH = "user_encoder_append.onnx"
MANIFEST_KEY = "user_encoder_append"
NEW = "_new"


def token_input_names(cfg) -> list[str]:
    return ["s_type", *[f"s_{f}" for f in cfg.schema.seq_fields]]


def append_input_names(cfg) -> list[str]:
    return [*token_input_names(cfg), "s_length", *kv_names(cfg.n_layers)]


def append_output_names(cfg) -> list[str]:
    return [n + NEW for n in kv_names(cfg.n_layers)] + ["s_length" + NEW]


def append_dynamic_axes(cfg) -> dict[str, dict[int, str]]:
    """Per input, ``{axis: dimension name}``: users, new_tokens, kv_len_<l>."""
    dyn: dict[str, dict[int, str]] = {n: {0: "users", 1: "new_tokens"} for n in token_input_names(cfg)}
    dyn["s_length"] = {0: "users"}
    for lay in range(cfg.n_layers):
        dyn[f"user_k_{lay}"] = {0: "users", 2: f"kv_len_{lay}"}
        dyn[f"user_v_{lay}"] = {0: "users", 2: f"kv_len_{lay}"}
    return dyn


class AppendGraph(nn.Module):
    """:func:`append_user` (``widths="static"``) with one named input per tensor, for export.

    Widths come from shapes only (``torch.sym_min``: no guard on a dynamic size), and the
    attention is :func:`onetrans_trt.ops.tail_causal_attention` (eagerly the reference math,
    under export one ``onetrans::TailCausalAttention`` node)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        cfg = model.cfg
        ok, why = can_append(cfg, 0, 1)  # the family and merge mode (the lengths are the host's)
        if not ok:
            raise InputError(f"no append graph: {why}")
        self.model = model.eval()
        self.cfg = cfg
        self.m = windows(cfg)
        self.token_names = token_input_names(cfg)
        from onetrans_trt.export.serving import _named_forward

        _named_forward(self, self.input_names)

    @property
    def input_names(self) -> list[str]:
        return append_input_names(self.cfg)

    @property
    def output_names(self) -> list[str]:
        return append_output_names(self.cfg)

    def _forward(self, tensors: tuple[Tensor, ...]):
        from onetrans_trt.ops import tail_causal_attention

        named = dict(zip(self.input_names, tensors))
        model, m = self.model, self.m
        batch = {n: named[n] for n in self.token_names}
        k = batch["s_type"].shape[1]
        x = model.s_tokenizer(batch)
        first = torch.sym_min(k, m[0])
        x = x[:, k - first:]  # the new tokens still in the stream (all unless k > s_max_len)
        n_new = (named["s_length"] + k).clamp(max=m[0])
        out: list[Tensor] = []
        for lay, layer in enumerate(model.layers):
            h = layer.n_heads
            k_old, v_old = named[f"user_k_{lay}"], named[f"user_v_{lay}"]
            n_old = k_old.shape[2]
            new_here = torch.sym_min(k, m[lay])  # == x.shape[1]
            keep = torch.sym_min(n_old, m[lay] - new_here)
            hs = layer.s_norm1(x)
            kk = torch.cat([k_old[:, :, n_old - keep:], split_heads(layer.s_k(hs), h)], dim=2)
            vv = torch.cat([v_old[:, :, n_old - keep:], split_heads(layer.s_v(hs), h)], dim=2)
            out += [kk, vv]
            if not layer.s_queries:
                break
            nq = torch.sym_min(k, m[lay + 1])
            x_tail, hs_tail = x[:, new_here - nq:], hs[:, new_here - nq:]
            q = split_heads(layer.s_q(hs_tail), h)
            valid = n_new.clamp(max=keep + new_here)
            x = layer.s_update(x_tail, merge_heads(tail_causal_attention(q, kk, vv, valid)))
        return (*out, n_new)


def appended_state(outputs: dict[str, Any] | list, cfg=None) -> UserKV:
    """The append graph's outputs (by name, or in order with ``cfg``) as a :class:`UserKV`."""
    if not isinstance(outputs, dict):
        outputs = dict(zip(append_output_names(cfg), outputs))
    n = sum(1 for key in outputs if key.startswith("user_k_"))
    return UserKV([outputs[f"user_k_{i}{NEW}"] for i in range(n)], [outputs[f"user_v_{i}{NEW}"] for i in range(n)],
                  outputs["s_length" + NEW])


def append_feeds(kv: UserKV, tokens: dict[str, Any], cfg) -> dict[str, np.ndarray]:
    """The graph's inputs: a cached state and the new tokens (``[U, k]``) as numpy arrays."""
    def arr(t, dtype):
        t = t.detach().cpu().numpy() if isinstance(t, Tensor) else np.asarray(t)
        return np.ascontiguousarray(t.astype(dtype, copy=False))

    feeds = {n: arr(tokens[n], np.int64) for n in token_input_names(cfg)}
    feeds["s_length"] = arr(kv.lengths, np.int64).reshape(-1)
    for i, (kt, vt) in enumerate(zip(kv.keys, kv.values)):
        feeds[f"user_k_{i}"], feeds[f"user_v_{i}"] = arr(kt, np.float32), arr(vt, np.float32)
    return feeds


def _example_feeds(model) -> dict[str, np.ndarray]:
    """Tracing inputs with every dynamic size >= 2 and distinct (users 2, k 3, kv_len 5+l)."""
    cfg = model.cfg
    rng = np.random.default_rng(0)
    u, k = 2, 3
    feeds: dict[str, np.ndarray] = {"s_type": rng.integers(1, cfg.schema.num_sequences + 1, (u, k))}
    for f, table in cfg.schema.seq_fields.items():
        feeds[f"s_{f}"] = rng.integers(1, cfg.schema.tables[table].rows, (u, k))
    feeds["s_length"] = np.array([4, 1], dtype=np.int64)
    h, dh = cfg.n_heads, cfg.d_model // cfg.n_heads
    for lay in range(cfg.n_layers):
        for kv in "kv":
            feeds[f"user_{kv}_{lay}"] = rng.standard_normal((u, h, 5 + lay, dh)).astype(np.float32)
    return {n: np.ascontiguousarray(v.astype(np.int64) if v.dtype.kind == "i" else v) for n, v in feeds.items()}


def _name_output_dims(proto, cfg):
    """Name the outputs' symbolic sizes (the exporter writes its own ``u0 + u2``):
    ``users``, ``kv_len_<l>_new``."""
    for out in proto.graph.output:
        dims = out.type.tensor_type.shape.dim
        if dims and dims[0].dim_param:
            dims[0].dim_param = "users"
        if out.name.startswith("user_") and len(dims) == 4 and dims[2].dim_param:
            dims[2].dim_param = f"kv_len_{out.name.split('_')[2]}{NEW}"
    return proto


def export_append(ckpt_or_model: str | Path | nn.Module, build_dir: str | Path, *, opset: int | None = None,
                  record: bool = True) -> Path:
    """Trace :class:`AppendGraph` to ``build_dir/user_encoder_append.onnx`` (atomically, with our
    ops' ONNX functions attached so ONNX Runtime runs it) and return its path. OneTrans with
    timestamp-aware streams (else :class:`InputError`, nothing written), or HyFormer (its own
    graph: :mod:`onetrans_trt.export.append_hyformer`).

    When ``build_dir`` holds a manifest (an ``export`` build) and ``record``, the graph is listed
    there as ``graphs.user_encoder_append`` (file, sha256, bytes, inputs, outputs, and the
    ``windows`` / ``export_seconds`` it was made with), the manifest replaced atomically; a
    checkpoint other than the build's is refused (:class:`BuildError`). An ``nn.Module`` is
    taken as the build's model (not checked)."""
    from onetrans_trt.export.api import MANIFEST, graph_entry, read_manifest, trace_onnx
    from onetrans_trt import interrupts
    from onetrans_trt.io import atomic_write_json, build_lock
    from onetrans_trt.onnx_files import load_model, save_model_atomic
    from onetrans_trt.plugins import attach_op_functions
    from onetrans_trt.trust import DEFAULT_OPSET, check_manifest, check_opset

    if isinstance(ckpt_or_model, nn.Module):
        model = ckpt_or_model
    else:
        from onetrans_trt.export.api import load_splittable

        model = load_splittable(ckpt_or_model)
    build = Path(build_dir)
    has_manifest = (build / MANIFEST).is_file()
    if has_manifest and record and not isinstance(ckpt_or_model, nn.Module):
        from onetrans_trt.models.checkpoint import checkpoint_hash

        made_from = read_manifest(build)["checkpoint"]["sha256"]
        if checkpoint_hash(ckpt_or_model) != made_from:
            raise BuildError(f"{ckpt_or_model} is not the checkpoint {build} was exported from "
                             f"(sha256 {made_from[:12]}); export the append graph of that one")
    if opset is None:
        opset = read_manifest(build)["opset"] if has_manifest else DEFAULT_OPSET
    check_opset(opset)
    hyformer = model.cfg.family == "hyformer"
    if hyformer:
        from onetrans_trt.models.append_hyformer import appendable

        ok, why = appendable(model.cfg)
        if not ok:
            raise InputError(f"export --append: {why}")
    graph = None if hyformer else AppendGraph(model)
    t0 = time.perf_counter()
    with build_lock(build, "export --append"):
        build.mkdir(parents=True, exist_ok=True)
        path = build / APPEND_GRAPH
        if hyformer:  # per-sequence inputs, its own module (export/append_hyformer.py)
            from onetrans_trt.export.append_hyformer import export_hyformer_append

            export_hyformer_append(model, path, opset)
        else:
            with interrupts.temporary_directory(prefix="onetrans-append-") as tmp:
                raw = tmp / APPEND_GRAPH
                trace_onnx(graph, _example_feeds(model), raw, opset, dynamic=append_dynamic_axes(model.cfg))
                proto = attach_op_functions(_name_output_dims(load_model(raw), model.cfg))
            save_model_atomic(proto, path)
        seconds = time.perf_counter() - t0
        if has_manifest and record:
            manifest = read_manifest(build)
            manifest["graphs"].pop(MANIFEST_KEY, None)
            shape = ({"seq_encoder": model.cfg.seq_encoder, "longer_window": model.cfg.longer_window} if hyformer
                     else {"windows": graph.m})
            manifest["graphs"][MANIFEST_KEY] = {**graph_entry(build, APPEND_GRAPH), **shape,
                                                "export_seconds": round(seconds, 3)}
            check_manifest(manifest, build / MANIFEST)  # checked before it replaces the old one
            atomic_write_json(build / MANIFEST, manifest)
    return path


__all__ = ["APPEND_GRAPH", "AppendGraph", "append_dynamic_axes", "append_feeds", "append_input_names",
           "append_output_names", "appended_state", "export_append"]
