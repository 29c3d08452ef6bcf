"""``ort-kv-copy``: the split as someone without this toolkit would export it.

The same two graphs as a build (the user encoder runs once per request and emits each
layer's K/V), but the candidate side is the straightforward one: the cached user K/V are
copied to every candidate (``expand`` + ``contiguous``: an ONNX ``Expand`` materialising
``[C, H, n, dh]`` per layer, K and V), and each candidate runs plain attention over
``concat(its copy of the user K/V, its own NS K/V)`` under the mask the unified model's NS
rows use. Exported with ``torch.onnx`` (the dynamo exporter, as ``export`` traces) and run
in ONNX Runtime, with no graph pass of ours.

``bench`` measures it next to ``ort`` so the report says what the shared-prefix scorer
(one user's K/V read by all C candidates, never copied) buys over the obvious export: the
copy is memory traffic of ``C x`` the user's K/V per request, with the same FLOPs.

OneTrans only: HyFormer's candidate side decodes per-sequence state through query tokens,
and has no single "concat and attend" form to copy; its builds get the peer skipped with
the reason.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from onetrans_trt.errors import InputError
from onetrans_trt.export.serving import _named_forward, ns_input_names
from onetrans_trt.kv import kv_names
from onetrans_trt.models.attention import masked_attention, merge_heads, prefix_key_mask, split_heads

if TYPE_CHECKING:
    from onetrans_trt.runtime.ort_backend import OrtSplitBackend

NAME = "ort-kv-copy"
GRAPH = "kv_copy.onnx"


def per_pair_ns_layer(layer: nn.Module, x_ns: Tensor, k_s: Tensor, v_s: Tensor, length: Tensor) -> Tensor:
    """One OneTrans layer's NS side with every candidate holding its own rows of the user K/V.

    ``x_ns`` ``[C, T, d]``; ``k_s`` / ``v_s`` ``[C, H, n, dh]`` (already copied per candidate,
    left-padded); ``length`` ``[1]``: real S-tokens (``>= n``: all). The NS rows of
    :meth:`OneTransLayer.forward_unified` (keys ``[S ; NS]``, real S keys, NS causal) over
    K/V read from the cache instead of recomputed: the per-pair form the unified model has,
    minus its S side (the model has no per-pair path over cached K/V to call). Built from the
    layer's own projections and the reference :func:`masked_attention`: the same numbers as
    the split, so a speed difference from ``ort`` is the copy's and the attention form's, not
    another model's.
    """
    h, n, t = layer.n_heads, k_s.shape[2], x_ns.shape[1]
    hns = layer.ns_norm1(x_ns)
    q = split_heads(layer.ns_q(hns), h)
    k = torch.cat([k_s, split_heads(layer.ns_k(hns), h)], dim=2)  # [C, H, n + T, dh]
    v = torch.cat([v_s, split_heads(layer.ns_v(hns), h)], dim=2)
    real = prefix_key_mask(n, length.clamp(max=n)).unsqueeze(1).expand(1, t, n)  # [1, T, n]
    causal = torch.ones(t, t, dtype=torch.bool, device=x_ns.device).tril().unsqueeze(0)  # [1, T, T]
    mask = torch.cat([real, causal], dim=2).unsqueeze(1)  # [1, 1, T, n + T]: the same for every candidate
    o = merge_heads(masked_attention(q, k, v, mask))
    return layer.ns_update(x_ns, o)


class KVCopyScorer(nn.Module):
    """C candidates of one user scored with the user's K/V copied to each of them.

    Inputs are named as ``candidate_scorer.onnx`` 's (``ns_*``, ``s_length``,
    ``user_k_<l>`` / ``user_v_<l>`` ``[1, H, n_l, dh]``), so the build's user encoder feeds it
    and :class:`~onetrans_trt.runtime.ort_backend.OrtSplitBackend` runs it as its scorer;
    outputs ``logits``, ``probs`` ``[C, tasks]``.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model.eval()
        self.ns_names = ns_input_names(model)
        self.kv_names = kv_names(model.cfg.n_layers)
        _named_forward(self, self.input_names)

    @property
    def input_names(self) -> list[str]:
        return [*self.ns_names, "s_length", *self.kv_names]

    @property
    def output_names(self) -> list[str]:
        return ["logits", "probs"]

    def _forward(self, tensors: tuple[Tensor, ...]) -> tuple[Tensor, Tensor]:
        n_ns = len(self.ns_names)
        ns = dict(zip(self.ns_names, tensors[:n_ns]))
        length = tensors[n_ns].reshape(1)
        kv = tensors[n_ns + 1:]
        x_ns = self.model.ns_tokenizer(ns)
        c = x_ns.shape[0]
        for i, layer in enumerate(self.model.layers):
            # the copy: every candidate gets its own [H, n, dh] rows of the user's K and V
            k = kv[2 * i].expand(c, -1, -1, -1).contiguous()
            v = kv[2 * i + 1].expand(c, -1, -1, -1).contiguous()
            x_ns = per_pair_ns_layer(layer, x_ns, k, v, length)
        logits = self.model.head(x_ns)
        return logits, torch.sigmoid(logits)


def kv_copy_module(model: Any) -> KVCopyScorer:
    """The K/V-copy scorer over ``model`` (a OneTrans; else :class:`InputError` with the reason)."""
    family = getattr(getattr(model, "cfg", None), "family", None)
    if family != "onetrans":
        raise InputError(f"the K/V-copy peer is built for OneTrans only (this model is {family!r}: its candidate "
                         "side decodes per-sequence state, with no single concat-and-attend form to copy)")
    return KVCopyScorer(model)


def export_kv_copy(model: Any, out: str | Path, *, opset: int | None = None) -> Path:
    """Export :func:`kv_copy_module` of ``model`` to ``out`` with ``torch.onnx`` (dynamo), dynamic in
    ``candidates`` and in each layer's K/V length ``kv_len_<l>`` (the names of the build's
    scorer, so ``request_dims`` sizes both graphs alike). The trace example is the exporter's
    own (:func:`~onetrans_trt.export.api._example`) through the eager user encoder; a K/V
    shorter than 2 is widened to 2 for the trace only (``torch.export`` specialises 0/1)."""
    from onetrans_trt.export.api import _example, trace_onnx
    from onetrans_trt.trust import DEFAULT_OPSET

    module = kv_copy_module(model)
    out = Path(out)
    hist, ns = _example(model)
    with torch.no_grad():
        kv = model.encode_user({k: torch.from_numpy(v[:1]) for k, v in hist.items()})
    feeds: dict[str, Any] = {**ns, "s_length": hist["s_length"][:1].astype(np.int64)}
    for name, t in zip(module.kv_names, [x for pair in zip(kv.keys, kv.values) for x in pair]):
        a = t.detach().numpy()
        if a.shape[2] < 2:
            a = np.concatenate([np.zeros_like(a[:, :, :2 - a.shape[2]]), a], axis=2)
        feeds[name] = np.ascontiguousarray(a)
    dynamic: dict[str, dict[int, str]] = {n: {0: "candidates"} for n in module.ns_names}
    dynamic["s_length"] = {}
    dynamic.update({n: {2: f"kv_len_{i // 2}"} for i, n in enumerate(module.kv_names)})
    out.parent.mkdir(parents=True, exist_ok=True)
    trace_onnx(module, feeds, out, opset or DEFAULT_OPSET, dynamic=dynamic)
    return out


def kv_copies(graph: Any) -> list[dict[str, Any]]:
    """The copies in an exported K/V-copy graph (a path or a ``ModelProto``): each ``Expand`` /
    ``Tile`` fed by a ``user_k_*`` / ``user_v_*`` input (directly or through reshapes and casts)
    whose output's first axis is ``candidates``, as ``{"node", "op", "input", "shape"}``."""
    import onnx

    m = onnx.load(str(graph), load_external_data=False) if isinstance(graph, (str, Path)) else graph
    shapes = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in [*m.graph.value_info, *m.graph.output, *m.graph.input]}
    producer = {o: n for n in m.graph.node for o in n.output}
    passthrough = {"Identity", "Reshape", "Unsqueeze", "Squeeze", "Cast"}

    def source(name: str) -> str | None:
        while name in producer:
            node = producer[name]
            if node.op_type not in passthrough or not node.input:
                return None
            name = node.input[0]
        return name if name.startswith(("user_k_", "user_v_")) else None

    out = []
    for n in m.graph.node:
        if n.op_type in ("Expand", "Tile") and n.input:
            src = source(n.input[0])
            shape = shapes.get(n.output[0])
            if src and shape and shape[0] == "candidates":
                out.append({"node": n.name, "op": n.op_type, "input": src, "shape": shape})
    return out


def kv_copy_backend(build: str | Path, work: str | Path, *, threads: int | None = None,
                    providers: list[str] | None = None) -> OrtSplitBackend:
    """The ``ort-kv-copy`` peer of a build: its own ``user_encoder.onnx`` for the K/V and the
    K/V-copy scorer exported from its checkpoint into ``work`` (never into the build), as an
    :class:`~onetrans_trt.runtime.ort_backend.OrtSplitBackend` named ``ort-kv-copy``.
    :class:`InputError` (the peer is skipped with it) when the build is not OneTrans or its
    checkpoint is gone."""
    from onetrans_trt.export.api import load_splittable, read_manifest
    from onetrans_trt.runtime.ort_backend import OrtSplitBackend

    build = Path(build)
    m = read_manifest(build)
    family = m["model"].get("family")
    if family != "onetrans":
        raise InputError(f"the K/V-copy peer is built for OneTrans only (this build is {family!r})")
    ck = Path(m["checkpoint"]["path"])
    if not (ck / "model.safetensors").is_file():
        raise InputError(f"checkpoint {ck} not found (the K/V-copy graph is exported from it)")
    path = export_kv_copy(load_splittable(ck), Path(work) / GRAPH, opset=m.get("opset"))
    return OrtSplitBackend(build, name=NAME, scorer_graph=str(path.resolve()), providers=providers,
                           threads=threads)
