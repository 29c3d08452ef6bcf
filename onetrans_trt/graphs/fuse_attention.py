"""Fuse attention: replace our exported attention subgraphs with the custom ops.

Two patterns, each anchored on the matrix products that define it and checked on its
structure before anything is rewritten:

- **TailCausalAttention** (user encoder): ``Softmax(Where(mask, Mul(MatMul(Q, Transpose(K)),
  scale), -inf))`` followed by ``MatMul(P, V)``, where the mask is computed from the
  ``s_length`` input. Becomes ``TailCausalAttention(Q, K, V, s_length)``.
- **SharedPrefixAttention** (candidate scorer): the candidates' queries reshaped to one
  batch ``MatMul``-ed with the transposed user K (a ``user_k_<l>`` input), the candidates'
  own causal part ``MatMul(Q, Transpose(K_own))``, both ``P @ V`` products, and the final
  ``Div`` that merges them. Becomes ``SharedPrefixAttention(Q, K_user, V_user, s_length,
  K_own, V_own)``.

The fused node carries ``scale``, ``plugin_namespace="onetrans"`` (TensorRT resolves the
plugin by it) and ``aot=1``. The replaced nodes lose their consumers and are removed; the
mask computations go with them. ONNX Runtime runs the fused graph through the ops' ONNX
function bodies, which :func:`onetrans_trt.plugins.attach_op_functions` attaches on save.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_graphsurgeon as gs

from onetrans_trt.graphs import register
from onetrans_trt.plugins._onnx import DOMAIN, PLUGIN_NAMESPACE

LAYOUT = {"Slice", "Transpose", "Reshape", "Identity", "Cast", "Squeeze", "Unsqueeze"}


def _producer(t: gs.Tensor) -> gs.Node | None:
    return t.inputs[0] if isinstance(t, gs.Variable) and t.inputs else None


def _source_input(t: gs.Tensor, graph_inputs: set[str]) -> str | None:
    """The graph input ``t`` is a layout-only view of, if any."""
    while True:
        if t.name in graph_inputs:
            return t.name
        p = _producer(t)
        if p is None or p.op not in LAYOUT:
            return None
        t = p.inputs[0]


def _value_inputs(t: gs.Tensor, graph: gs.Graph, limit: int = 2000) -> set[str] | None:
    """Graph inputs whose *values* ``t`` depends on (a ``Shape`` reads only a shape, so
    the walk stops there); ``None`` when the walk is cut short."""
    names = {i.name for i in graph.inputs}
    stack, seen, found = [t], set(), set()
    while stack:
        if len(seen) > limit:
            return None
        x = stack.pop()
        if id(x) in seen:
            continue
        seen.add(id(x))
        if x.name in names:
            found.add(x.name)
        p = _producer(x)
        if p is not None and p.op not in ("Shape", "Size"):
            stack.extend(p.inputs)
    return found


def _const_scalar(t: gs.Tensor) -> float | None:
    if isinstance(t, gs.Constant):
        v = np.asarray(t.values)
    else:
        p = _producer(t)
        if p is None or p.op != "Constant":
            return None
        v = np.asarray(p.attrs["value"].values)
    return float(v.reshape(-1)[0]) if v.size == 1 else None


def _transposed_last_two(t: gs.Tensor, graph: gs.Graph | None = None) -> gs.Tensor | None:
    """``x`` such that ``t = x^T`` on the last two axes of a 4-D tensor.

    ``t`` must come from a Transpose. When a simplifier merged the head split's transpose
    into it (``t = Transpose(y, P)`` with another ``P``), ``x`` is ``Transpose(y, Q)``
    with ``Q = P o [0, 1, 3, 2]``, added to ``graph`` (``None``: only report whether it
    is a transpose at all, returning ``t``'s source).
    """
    p = _producer(t)
    if p is None or p.op != "Transpose":
        return None
    perm = list(p.attrs.get("perm", []))
    if len(perm) != 4:
        return None
    q = [perm[i] for i in (0, 1, 3, 2)]
    if q == [0, 1, 2, 3]:
        return p.inputs[0]
    if graph is None:
        return p.inputs[0]
    src = p.inputs[0]
    shape = [src.shape[i] for i in q] if src.shape is not None else None
    out = gs.Variable(f"{src.name}__bhtd", dtype=src.dtype, shape=shape)
    graph.nodes.append(gs.Node("Transpose", name=f"{out.name}_node", attrs={"perm": q}, inputs=[src], outputs=[out]))
    return out


def _scaled_scores(t: gs.Tensor) -> tuple[gs.Node, float] | None:
    """``t = Mul(MatMul(..), scale)`` (either operand order) -> (the MatMul, scale)."""
    p = _producer(t)
    if p is None or p.op != "Mul":
        return None
    for a, b in (p.inputs, p.inputs[::-1]):
        mm, s = _producer(a), _const_scalar(b)
        if mm is not None and mm.op == "MatMul" and s is not None:
            return mm, s
    return None


def _scale_after(mm: gs.Node) -> float | None:
    """The constant a MatMul's scores are multiplied by (its only consumer is that Mul)."""
    users = mm.outputs[0].outputs
    if len(users) != 1 or users[0].op != "Mul":
        return None
    a, b = users[0].inputs
    return _const_scalar(b if a is mm.outputs[0] else a)


def _masked(t: gs.Tensor) -> gs.Tensor | None:
    """``Where(cond, -inf, scores)`` or ``Where(cond, scores, -inf)`` -> the scores."""
    p = _producer(t)
    if p is None or p.op != "Where":
        return None
    _, a, b = p.inputs
    if _const_scalar(a) == -math.inf:
        return b
    if _const_scalar(b) == -math.inf:
        return a
    return None


def _new_node(graph: gs.Graph, op: str, inputs: list[gs.Tensor], out: gs.Variable, scale: float, n: int) -> None:
    producer = _producer(out)
    if producer is not None:
        producer.outputs.clear()
    graph.nodes.append(gs.Node(op, name=f"{op}_{n}", domain=DOMAIN, inputs=inputs, outputs=[out],
                               attrs={"scale": float(scale), "plugin_namespace": PLUGIN_NAMESPACE, "aot": 1}))


def fuse_tail_causal(graph: gs.Graph) -> int:
    if "s_length" not in {t.name for t in graph.inputs}:
        return 0
    length = next(t for t in graph.inputs if t.name == "s_length")
    count = 0
    for sm in [n for n in graph.nodes if n.op == "Softmax"]:
        if int(sm.attrs.get("axis", -1)) not in (-1, 3):
            continue
        scores = _masked(sm.inputs[0])
        found = _scaled_scores(scores) if scores is not None else None
        if found is None:
            continue
        qk, scale = found
        q, kt = qk.inputs
        k = _transposed_last_two(kt, graph)
        pv = [n for n in sm.outputs[0].outputs if n.op == "MatMul" and n.inputs[0] is sm.outputs[0]]
        cond = _producer(sm.inputs[0]).inputs[0]
        # the mask must be a function of s_length (and shapes) alone: a mask built from other
        # values (HyFormer's per-sequence counts from s_type) is not this op's mask
        if k is None or len(pv) != 1 or _value_inputs(cond, graph) != {"s_length"}:
            continue
        v = pv[0].inputs[1]
        count += 1
        _new_node(graph, "TailCausalAttention", [q, k, v, length], pv[0].outputs[0], scale, count)
    return count


def _downstream(start: gs.Node, limit: int = 400) -> list[gs.Node]:
    out, seen, stack = [], set(), [start]
    while stack and len(out) < limit:
        n = stack.pop()
        if id(n) in seen:
            continue
        seen.add(id(n))
        out.append(n)
        if n.op == "Div" and n is not start:
            continue
        for o in n.outputs:
            stack.extend(o.outputs)
    return out


def fuse_shared_prefix(graph: gs.Graph) -> int:
    inputs = {t.name for t in graph.inputs}
    if "s_length" not in inputs:
        return 0
    length = next(t for t in graph.inputs if t.name == "s_length")
    count = 0
    for m1 in [n for n in graph.nodes if n.op == "MatMul"]:
        kp = _transposed_last_two(m1.inputs[1])
        if kp is None or not (_source_input(kp, inputs) or "").startswith("user_k_"):
            continue
        reshape = _producer(m1.inputs[0])
        tr = _producer(reshape.inputs[0]) if reshape is not None and reshape.op == "Reshape" else None
        if tr is None or tr.op != "Transpose" or list(tr.attrs.get("perm", [])) != [1, 0, 2, 3]:
            continue
        q = tr.inputs[0]
        region = _downstream(m1)
        div = [n for n in region if n.op == "Div"]
        mms = [n for n in region if n.op == "MatMul" and n is not m1]
        own = [n for n in q.outputs if n.op == "MatMul" and n.inputs[0] is q and _transposed_last_two(n.inputs[1]) is not None]
        if len(div) != 1 or len(own) != 1 or len(mms) != 1:
            continue
        pv_prefix = mms[0]
        vp = pv_prefix.inputs[1]
        if not (_source_input(vp, inputs) or "").startswith("user_v_"):
            continue
        ko = _transposed_last_two(own[0].inputs[1], graph)
        pv_own = [n for n in _downstream(own[0]) if n.op == "MatMul" and n is not own[0]]
        if len(pv_own) != 1 or pv_own[0] in region:
            continue
        vo = pv_own[0].inputs[1]
        scale = _scale_after(m1)
        if scale is None or scale != _scale_after(own[0]):
            continue
        kp = _transposed_last_two(m1.inputs[1], graph)
        count += 1
        _new_node(graph, "SharedPrefixAttention", [q, kp, vp, length, ko, vo], div[0].outputs[0], scale, count)
    return count


@register("fuse-attention")
def fuse_attention(graph: gs.Graph) -> gs.Graph:
    """Replace every recognized attention subgraph with our custom node."""
    graph = graph.copy()
    n = fuse_tail_causal(graph) + fuse_shared_prefix(graph)
    graph.cleanup().toposort()
    graph.__dict__["fused_attention"] = n  # reported by run_passes (plain attribute: gs's
    # Graph.__getattr__ would look an unknown name up as a registered graph function)
    return graph


def count_fused(graph: gs.Graph) -> dict[str, int]:
    out: dict[str, int] = {}
    for node in graph.nodes:
        if node.domain == DOMAIN:
            out[node.op] = out.get(node.op, 0) + 1
    return out
