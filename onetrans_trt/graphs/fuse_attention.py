"""Fuse attention: replace our exported attention subgraphs with the custom ops.

onnxscript rewriter rules (:mod:`onnxscript.rewriter.pattern`), each pattern written as the
computation it matches; a rule's ``check`` confirms what a pattern cannot say (constants, the
mask's source, K's layout) before anything is rewritten. A scale's Mul and a mask's Add take
either operand order.

- **TailCausalAttention(Q, K, V, s_length)** (user encoder): ``Softmax(mask(scale(Q @ K^T))) @ V``,
  Softmax on the last axis (``-1``, ``3`` or the default), the mask computed from ``s_length``
  (and shapes) alone: ``Where(cond, s, -inf)``, ``Where(cond, -inf, s)`` or
  ``s + Where(cond, 0, -inf)``; scale: ``* c`` or ``/ c`` on the scores or on Q, or ``* c`` on Q and K^T.
- **SharedPrefixAttention(Q, K_user, V_user, s_length, K_own, V_own)** (candidate scorer): the
  candidates' queries as one batch against the user's K/V (``user_k_<l>``/``user_v_<l>``
  inputs, through layout ops), their own causal part, and the online-softmax merge of the two,
  as :func:`onetrans_trt.models.attention.shared_prefix_attention` writes it (scales ``* c`` or ``/ c``).

K^T is a ``Transpose`` of K (any 4-axis perm: one merged with the head split's is undone by a
``Transpose`` added before the op) or K given pre-transposed (its shape against Q's says so). The
fused node carries ``scale``, ``plugin_namespace="onetrans"`` (TensorRT resolves the plugin by
it) and ``aot=1``; the replaced nodes, masks included, lose their consumers and are removed. ONNX
Runtime runs the ops through the function bodies :func:`onetrans_trt.plugins.attach_op_functions`
attaches on save.
"""

from __future__ import annotations

import math
import re
from collections import Counter

import numpy as np

import onnx_graphsurgeon as gs
from onnxscript import ir
from onnxscript.rewriter import pattern

from onetrans_trt.graphs import register
from onetrans_trt.plugins._onnx import DOMAIN, PLUGIN_NAMESPACE

LAYOUT = {"Slice", "Transpose", "Reshape", "Identity", "Cast", "Squeeze", "Unsqueeze"}


def _scalar(v: ir.Value | None) -> float | None:
    """A one-element constant's value, also one broadcast by ``Expand`` (torch's ``zeros_like``)."""
    if v is not None and v.producer() is not None and v.producer().op_type == "Expand":
        v = v.producer().inputs[0]
    t = ir.convenience.get_const_tensor(v) if v is not None else None
    return float(t.numpy().reshape(-1)[0]) if t is not None and t.size == 1 else None


def _scaled(op, x, c, tag: str):
    """``x * c``, ``c * x`` or ``x / c`` (``tag``: the power of ``c``)."""
    return pattern.OrValue([op.Mul(x, c), op.Mul(c, x), op.Div(x, c)], tag_var=tag, tag_values=[1, 1, -1])


def _masked(op, s, cond, fill, zero=None, tag: str = "mask"):
    """``Where(cond, s, fill)``, ``Where(cond, fill, s)``; with ``zero``, ``s + Where(cond, zero, fill)``."""
    where = [op.Where(cond, s, fill), op.Where(cond, fill, s)]
    add = [op.Add(s, op.Where(cond, zero, fill)), op.Add(op.Where(cond, zero, fill), s)] if zero is not None else []
    return pattern.OrValue(where + add, tag_var=tag, tag_values=["where"] * 2 + ["add"] * len(add))


def _source(v: ir.Value) -> str:
    """The graph input ``v`` is a layout-only view of, if any (else ``""``)."""
    while v.producer() is not None and v.producer().op_type in LAYOUT:
        v = v.producer().inputs[0]
    return v.name if v.is_graph_input() else ""


def _length(v: ir.Value, limit: int = 2000) -> ir.Value | None:
    """The ``s_length`` input when it is the only graph input whose *values* ``v`` reads (a
    ``Shape`` reads only a shape, so the walk stops there); None when the walk is cut short."""
    stack, seen, found = [v], set(), set()
    while stack and len(seen) <= limit:
        x = stack.pop()
        if x is None or x in seen:
            continue
        seen.add(x)
        found |= {x} if x.is_graph_input() else set()
        p = x.producer()
        stack += p.inputs if p is not None and p.op_type not in ("Shape", "Size") else []
    return found.pop() if not stack and len(found) == 1 and next(iter(found)).name == "s_length" else None


ORDER = {"Less", "LessOrEqual", "Greater", "GreaterOrEqual"}


def _through_layout(v: ir.Value) -> ir.Value:
    while v.producer() is not None and v.producer().op_type in LAYOUT:
        v = v.producer().inputs[0]
    return v


def _prefix_valid(cond: ir.Value, limit: int = 2000) -> tuple[ir.Value, bool] | None:
    """``(valid, causal)`` when ``cond`` is a key mask over a left-padded axis computed from one
    valid-length tensor and shapes alone (a sequence's real count computed in the graph, not
    only the ``s_length`` input): the prefix comparison ``j >= n - valid`` (either side's order)
    names ``valid``; ``causal`` when the mask orders keys against query positions (``j <= pos``)
    or And-s the real keys with the bottom-right causal triangle as a constant (a static-shape
    export folds it). A mask with no ``And`` is bidirectional (each query sees every real key, a
    padding query itself). None when no single ``valid`` is found, the mask reads any other graph
    input's values, or it And-s the real keys with something else (a band, a window)."""
    prefix, cands = set(), set()
    stack, seen = [cond], set()
    while stack and len(seen) <= limit:  # the comparisons j >= n - valid: where valid is
        x = stack.pop()
        if x is None or x in seen:
            continue
        seen.add(x)
        p = x.producer()
        if p is None or p.op_type in ("Shape", "Size"):
            continue
        if p.op_type in ORDER and len(p.inputs) == 2:
            for side in (1, 0) if p.op_type in ("GreaterOrEqual", "Greater") else (0, 1):
                sub = _through_layout(p.inputs[side]).producer()
                if sub is not None and sub.op_type == "Sub" and len(sub.inputs) == 2:
                    prefix.add(p)
                    cands.add(_through_layout(sub.inputs[1]))
                    break
        stack += p.inputs
    if stack:
        return None
    # a comparison inside valid's own computation (the history's padding mask a count is taken
    # under) names a tensor valid is computed from: the mask's valid is the one no other depends on
    cands = {c for c in cands if not any(c in _cone(o, limit) for o in cands - {c})}
    if len(cands) != 1:
        return None
    valid = cands.pop()
    if valid.dtype is not None and valid.dtype != ir.DataType.INT64:
        return None
    ordered, folded, ands = False, False, False  # the mask itself: a function of valid and shapes
    stack, seen = [cond], {valid}
    while stack:
        x = stack.pop()
        if x is None or x in seen:
            continue
        seen.add(x)
        if x.is_graph_input():
            return None
        p = x.producer()
        if p is None or p.op_type in ("Shape", "Size"):
            continue
        ordered |= p.op_type in ORDER and p not in prefix  # keys ordered against query positions
        if p.op_type == "And":  # keys restricted beyond the real ones: by what?
            ands = True
            for t in (ir.convenience.get_const_tensor(_through_layout(i)) for i in p.inputs):
                if t is not None:  # a constant restriction must be the causal triangle (static shapes fold it)
                    if not _bottom_right_causal(t.numpy()):
                        return None
                    folded = True
        stack += p.inputs
    if ands and not (ordered or folded):
        return None  # a restriction that is neither causal nor absent: not an op of ours
    return valid, ordered or folded


def _bottom_right_causal(m: np.ndarray) -> bool:
    """``m`` (leading axes of size 1) is ``[Lq, Lk]`` with query i seeing keys ``j <= Lk - Lq + i``."""
    m = m.reshape(m.shape[-2:]) if m.ndim >= 2 and all(d == 1 for d in m.shape[:-2]) else None
    if m is None:
        return False
    lq, lk = m.shape
    return bool((m.astype(bool) == (np.arange(lk)[None] <= np.arange(lq)[:, None] + (lk - lq))).all())


def _cone(v: ir.Value, limit: int) -> set[ir.Value]:
    """The values ``v`` is computed from (``v`` included; shapes not followed)."""
    stack, seen = [v], set()
    while stack and len(seen) <= limit:
        x = stack.pop()
        if x is None or x in seen:
            continue
        seen.add(x)
        p = x.producer()
        stack += p.inputs if p is not None and p.op_type not in ("Shape", "Size") else []
    return seen


def _same_dims(a: ir.Value, b: ir.Value, pairs: list[tuple[int, int]]) -> bool:
    """``a.shape[i] == b.shape[j]`` for every pair, each dim known (an int or a named symbol)."""
    if a.shape is None or b.shape is None:
        return False
    for i, j in pairs:
        x, y = a.shape[i], b.shape[j]
        x, y = (x if isinstance(x, int) else x.value), (y if isinstance(y, int) else y.value)
        if x is None or x != y:
            return False
    return True


def _key(k_t: ir.Value, q: ir.Value) -> tuple[ir.Value, list[int]] | None:
    """``(x, perm)`` with ``K = Transpose(x, perm)`` ([.., L, dh]), given the product's K^T."""
    p = k_t.producer()
    perm = list(p.attributes.get_ints("perm", [])) if p is not None and p.op_type == "Transpose" else []
    if len(perm) == 4:
        return p.inputs[0], [perm[i] for i in (0, 1, 3, 2)]
    kd, qd = k_t.shape, q.shape  # K^T as given: [B, H, dh, L] against Q's [B, H, L, dh]
    if kd is None or qd is None or len(kd) != 4 or len(qd) != 4:
        return None
    same = all(a == b and (isinstance(a, int) or a.value is not None) for a, b in zip(kd[:3], [qd[0], qd[1], qd[3]]))
    return (k_t, [0, 1, 3, 2]) if same else None


class _Attention(pattern.RewriteRuleClassBase):
    """What both fusions share: K brought to the op's layout, and the fused node."""

    def __init__(self, name: str | None = None):
        super().__init__(name, remove_nodes=False)  # P or a score may have other readers: cleanup decides

    def _k(self, op, which: str):
        src, perm = getattr(self, which)
        if perm == [0, 1, 2, 3]:
            return src
        out = op.Transpose(src, perm=perm, _name=f"{src.name}__bhtd_node", _outputs=[f"{src.name}__bhtd"])
        out.type, out.shape = src.type, ir.Shape([src.shape[i] for i in perm]) if src.shape is not None else None
        return out

    def _fused(self, op, *inputs, **attrs):
        return op.op(self.OP, *inputs, _domain=DOMAIN, scale=self._scale, **attrs, plugin_namespace=PLUGIN_NAMESPACE,
                     aot=1)


class TailCausal(_Attention):
    OP = "TailCausalAttention"

    def __init__(self, scaled: str):  # where the scale is applied: "scores", "q" or "qk" (both Q and K^T)
        super().__init__(f"{self.OP}[{scaled}]")
        self.scaled = scaled

    def pattern(self, op, q, k_t, v, cond, fill, zero, c, c_k):
        if self.scaled == "scores":
            s = _scaled(op, op.MatMul(q, k_t), c, "c_pow")
        elif self.scaled == "q":
            s = op.MatMul(pattern.OrValue([op.Mul(q, c), op.Div(q, c)], tag_var="c_pow", tag_values=[1, -1]), k_t)
        else:
            s = op.MatMul(op.Mul(q, c), op.Mul(k_t, c_k))
        return op.MatMul(op.Softmax(_masked(op, s, cond, fill, zero), _outputs=["p"]), v)

    def check(self, context, q, k_t, p, cond, fill, zero, c, c_k, mask, c_pow=1, **_):
        fills = {_scalar(fill)} if mask == "where" else {_scalar(fill), _scalar(zero)}
        scales = [_scalar(c), _scalar(c_k) if self.scaled == "qk" else 1.0]
        readers = [u for u in p.uses() if u.node.op_type == "MatMul" and u.idx == 0]  # P @ V alone
        self.key, found = _key(k_t, q), _prefix_valid(cond)
        if found is None:  # no mask of ours: j >= n - valid, with the causal part or without
            return False
        # the s_length input itself where the mask reads it alone (OneTrans's user encoder), else the
        # valid length computed in the graph (HyFormer's per-sequence counts)
        self._len, self._causal = _length(cond) or found[0], found[1]
        if None in scales or fills != ({-math.inf} if mask == "where" else {0.0, -math.inf}):
            return False
        self._scale = scales[0] ** c_pow * scales[1]
        axis = p.producer().attributes.get_int("axis", -1)
        return axis in (-1, 3) and len(readers) == 1 and None not in (self.key, self._len)

    def rewrite(self, op, q, v, **_):
        return self._fused(op, q, self._k(op, "key"), v, self._len, causal=int(self._causal))


class SharedPrefix(_Attention):
    OP = "SharedPrefixAttention"

    def pattern(self, op, q, k_t, v, k_o_t, v_o, shape, back_m, back_l, back_o, cond, cond_o, fill, fill_o, zero,
                c, c_o):
        def block(q, k_t, v, cond, fill, c, o="", guard=lambda m: m):  # -> running max, sum, P @ V
            s = _scaled(op, op.MatMul(q, k_t, _outputs=[f"qk{o}"]), c, f"c{o}_pow")
            s = _masked(op, s, cond, fill, tag=f"mask{o}")
            m = op.ReduceMax(s, _allow_other_inputs=True)
            p = op.Exp(op.Sub(s, guard(m)), _outputs=[f"p{o}"])
            return m, op.ReduceSum(p, _allow_other_inputs=True), op.MatMul(p, v)

        def per_candidate(x, shape):
            return op.Transpose(op.Reshape(x, shape), perm=[1, 0, 2, 3])

        q_all = op.Reshape(op.Transpose(q, perm=[1, 0, 2, 3]), shape)  # every candidate's queries: one batch
        m, l, o = block(q_all, k_t, v, cond, fill, c, guard=lambda m: op.Where(op.IsInf(m), zero, m))
        m, l, o = per_candidate(m, back_m), per_candidate(l, back_l), per_candidate(o, back_o)
        m_o, l_o, o_o = block(q, k_o_t, v_o, cond_o, fill_o, c_o, "_o")
        top = op.Max(m, m_o)
        a, a_o = op.Exp(op.Sub(m, top)), op.Exp(op.Sub(m_o, top))
        return op.Div(op.Add(op.Mul(a, o), op.Mul(a_o, o_o)), op.Add(op.Mul(a, l), op.Mul(a_o, l_o)))

    def check(self, context, q, k_t, v, k_o_t, c, c_o, c_pow, c_o_pow, qk, qk_o, p, p_o, **_):
        self.key, self.key_o = _key(k_t, q), _key(k_o_t, q)
        self._len = next((i for i in context.graph_or_function.inputs if i.name == "s_length"), None)
        scales = [_scalar(c), _scalar(c_o)]
        if None in (self.key, self.key_o, self._len, *scales) or scales[0] ** c_pow != scales[1] ** c_o_pow:
            return False
        self._scale = scales[0] ** c_pow
        pv = [u for x in (p, p_o) for u in x.uses() if u.node.op_type == "MatMul"]
        # each product read by its scale alone, each P by its P @ V alone; the user's K/V by name
        return len(qk.uses()) == len(qk_o.uses()) == 1 and len(pv) == 2 and \
            _source(self.key[0]).startswith("user_k_") and _source(v).startswith("user_v_")

    def rewrite(self, op, q, v, v_o, **_):
        return self._fused(op, q, self._k(op, "key"), v, self._len, self._k(op, "key_o"), v_o)


class SharedDecode(_Attention):
    """HyFormer's query decoding in the scorer: every candidate's queries, folded into one batch
    (``Reshape(Transpose(x))``, the head split's transposes merged in), over one user's K/V of
    one sequence with no part of their own, as
    :func:`onetrans_trt.models.attention.shared_decode_attention` writes it."""

    OP = "SharedDecodeAttention"

    def pattern(self, op, x, k_t, v, shape, back, cond, real, fill, zero, zero_p, zero_d, one, c):
        qq = op.Reshape(op.Transpose(x, _outputs=["q_t"]), shape, _outputs=["qq"])
        s = _masked(op, _scaled(op, op.MatMul(qq, k_t, _outputs=["qk"]), c, "c_pow"), cond, fill)
        m = op.ReduceMax(s, _allow_other_inputs=True)
        p = op.Where(real, op.Exp(op.Sub(s, op.Where(op.IsInf(m), zero, m))), zero_p, _outputs=["p"])
        den = op.ReduceSum(p, _allow_other_inputs=True)
        o = op.Div(op.MatMul(p, v), op.Where(op.Greater(den, zero_d), den, one))
        return op.Transpose(op.Reshape(o, back, _outputs=["o_r"]), _outputs=["out"])

    def _folded(self, q_t, qq, k_t, o_r, out) -> bool:
        """The candidates' queries folded into one batch and back: ``q_t [H, C, N, dh] -> qq [1, H,
        C*N, dh]``, ``o [1, H, C*N, dh] -> o_r [H, C, N, dh]``; sets K's layout and the op's input
        and output permutations (the head split's transposes merged into the fold's)."""
        pa = list(q_t.producer().attributes.get_ints("perm", []))
        pb = list(out.producer().attributes.get_ints("perm", []))
        if len(pa) != 4 or len(pb) != 4 or qq.shape is None or qq.shape[0] != 1:
            return False
        if not (_same_dims(qq, q_t, [(1, 0), (3, 3)]) and _same_dims(o_r, q_t, [(0, 0), (1, 1), (2, 2), (3, 3)])):
            return False
        self.key = _key(k_t, qq)
        self._q_perm = [pa[1], pa[0], pa[2], pa[3]]  # x -> [C, H, N, dh]
        self._out_perm = [[1, 0, 2, 3][i] for i in pb]  # the op's [C, H, N, dh] -> what `out` was
        return self.key is not None

    def check(self, context, x, k_t, v, cond, real, fill, zero, zero_p, zero_d, one, c, c_pow, mask, q_t, qq, qk, p,
              o_r, out, **_):
        if mask != "where" or _scalar(fill) != -math.inf or _scalar(c) is None:
            return False
        if {_scalar(zero), _scalar(zero_p), _scalar(zero_d)} != {0.0} or _scalar(one) != 1.0:
            return False
        found, found_p = _prefix_valid(cond), _prefix_valid(real)
        if found is None or found_p is None or found[0] is not found_p[0] or found[1] or found_p[1]:
            return False  # one key mask, no order of keys against queries
        self._len, self._scale = found[0], _scalar(c) ** c_pow
        readers = [u for u in p.uses() if u.node.op_type == "MatMul"]
        return self._folded(q_t, qq, k_t, o_r, out) and len(qk.uses()) == 1 and len(readers) == 1 and \
            _source(self.key[0]).startswith("user_k_") and _source(v).startswith("user_v_")

    def rewrite(self, op, x, v, **_):
        q = x if self._q_perm == [0, 1, 2, 3] else op.Transpose(x, perm=self._q_perm)
        out = self._fused(op, q, self._k(op, "key"), v, self._len)
        return out if self._out_perm == [0, 1, 2, 3] else op.Transpose(out, perm=self._out_perm)


def _ints(v: ir.Value) -> list[int] | None:
    t = ir.convenience.get_const_tensor(v) if v is not None else None
    return [int(x) for x in t.numpy().reshape(-1)] if t is not None else None


class SharedDecodeSink(SharedDecode):
    """The same decoding with a learned sink key/value per head (``hy_sink``): softmax over
    ``[keys ; sink]``, the sink's share times its value. The sink is one more key, always real,
    so the op reads ``[K ; sink_k]`` and ``[V ; sink_v]`` with ``min(valid, n) + 1`` real keys."""

    def pattern(self, op, x, k_t, v, shape, back, cond, fill, sink_k, sink_v, c, c0, ax, ax_s0, s_lo, e_lo, s_hi,
                e_hi, ax_lo, ax_hi):
        qq = op.Reshape(op.Transpose(x, _outputs=["q_t"]), shape, _outputs=["qq"])
        s = _masked(op, _scaled(op, op.MatMul(qq, k_t, _outputs=["qk"]), c, "c_pow"), cond, fill)
        s0 = _scaled(op, op.ReduceSum(op.Mul(qq, sink_k), ax_s0, keepdims=1), c0, "c0_pow")
        p = op.Softmax(op.Concat(s, s0, axis=-1), _outputs=["p"])
        o = op.Add(op.MatMul(op.Slice(p, s_lo, e_lo, ax_lo, _allow_other_inputs=True), v),
                   op.Mul(op.Slice(p, s_hi, e_hi, ax_hi, _allow_other_inputs=True), sink_v))
        return op.Transpose(op.Reshape(o, back, _outputs=["o_r"]), _outputs=["out"])

    def check(self, context, x, k_t, v, cond, fill, sink_k, sink_v, c, c0, c_pow, c0_pow, ax_s0, s_lo, e_lo, s_hi,
              e_hi, ax_lo, ax_hi, mask, q_t, qq, qk, p, o_r, out, **_):
        if mask != "where" or _scalar(fill) != -math.inf or None in (_scalar(c), _scalar(c0)) \
                or _scalar(c) ** c_pow != _scalar(c0) ** c0_pow:
            return False
        axis = p.producer().attributes.get_int("axis", -1)
        last = ({-1, 3}, {-1, 3}, {-1, 3})
        if axis not in (-1, 3) or any(set(_ints(a) or [9]) - ok for a, ok in zip((ax_s0, ax_lo, ax_hi), last)):
            return False
        if (_ints(s_lo), _ints(e_lo), _ints(s_hi)) != ([0], [-1], [-1]) or not (_ints(e_hi) or [0])[0] >= 2 ** 31 - 1:
            return False  # p[..., :-1] (the keys') and p[..., -1:] (the sink's)
        found = _prefix_valid(cond)
        if found is None or found[1]:
            return False
        self._len, self._scale = found[0], _scalar(c) ** c_pow
        if not self._folded(q_t, qq, k_t, o_r, out):
            return False
        # the sink's key and value: [1, H, 1, dh] each, broadcast over the rows
        if not all(t.shape is not None and len(t.shape) == 4 and t.shape[0] == 1 and t.shape[2] == 1 and
                   _same_dims(t, qq, [(1, 1), (3, 3)]) for t in (sink_k, sink_v)):
            return False
        readers = [u for u in p.uses() if u.node.op_type == "Slice"]
        return len(qk.uses()) == 1 and len(readers) == 2 and \
            _source(self.key[0]).startswith("user_k_") and _source(v).startswith("user_v_")

    def rewrite(self, op, x, v, sink_k, sink_v, **_):
        q = x if self._q_perm == [0, 1, 2, 3] else op.Transpose(x, perm=self._q_perm)
        k = self._k(op, "key")
        n = op.Shape(k, start=2, end=3)
        valid = op.Add(op.Min(self._len, n), op.Constant(value_ints=[1]))  # the sink: one more real key, newest
        out = self._fused(op, q, op.Concat(k, sink_k, axis=2), op.Concat(v, sink_v, axis=2), valid)
        return out if self._out_perm == [0, 1, 2, 3] else op.Transpose(out, perm=self._out_perm)


HISTORY_LENGTH = re.compile(r"^s\d*_length$")  # the merged stream's s_length, or sequence j's s<j>_length
TAIL = [TailCausal.rule("scores"), *TailCausal.rule("q").commute(), *TailCausal.rule("qk").commute()]
RULES = pattern.RewriteRuleSet([*TAIL, SharedPrefix.rule(), SharedDecode.rule(), SharedDecodeSink.rule()])


def _fuse(graph: gs.Graph, rules: pattern.RewriteRuleSet) -> tuple[gs.Graph, int]:
    """A copy of ``graph`` with ``rules`` applied (to its onnx_ir model), and how many sites they fused."""
    graph = graph.copy()
    given = {t.name for t in graph.inputs}
    if not any(HISTORY_LENGTH.match(n) or n.startswith("user_k_") for n in given):  # no attention of ours
        return graph.cleanup().toposort(), 0
    proto = gs.export_onnx(graph.toposort(), do_type_check=False)
    model = ir.serde.deserialize_model(proto)
    model.functions.clear()  # the ops' bodies (when attached) are not ours to rewrite
    names = {node: node.name for node in model.graph}
    n = rules.apply_to_model(model)
    if not n:
        return graph.cleanup().toposort(), 0
    counts: dict[str, int] = {}
    for node in model.graph:  # the rewriter names every node: the graph's own keep their names
        if node in names:
            node.name = names[node]
            continue
        node.metadata_props.clear()  # (the rule's name, the replaced nodes' merged metadata)
        if node.domain == DOMAIN:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
            node.name = f"{node.op_type}_{counts[node.op_type]}"
    out = ir.serde.serialize_model(model)
    weights = {t.name: t for t in proto.graph.initializer}  # back as they came: one left on disk stays there
    for t in out.graph.initializer:
        t.CopyFrom(weights[t.name])
    out.functions.extend(proto.functions)
    return gs.import_onnx(out).cleanup().toposort(), n


def fuse_tail_causal(graph: gs.Graph) -> int:
    """How many TailCausalAttention sites ``graph`` has (``graph`` itself is left as it is)."""
    return _fuse(graph, pattern.RewriteRuleSet(TAIL))[1]


def fuse_shared_prefix(graph: gs.Graph) -> int:
    """How many SharedPrefixAttention sites ``graph`` has (``graph`` itself is left as it is)."""
    return _fuse(graph, pattern.RewriteRuleSet([SharedPrefix.rule()]))[1]


@register("fuse-attention")
def fuse_attention(graph: gs.Graph) -> gs.Graph:
    """Replace every recognized attention subgraph with our custom node."""
    graph, n = _fuse(graph, RULES)
    graph.__dict__["fused_attention"] = n  # reported by run_passes (plain attribute: gs's
    # Graph.__getattr__ would look an unknown name up as a registered graph function)
    return graph


def count_fused(graph: gs.Graph) -> dict[str, int]:
    return dict(Counter(node.op for node in graph.nodes if node.domain == DOMAIN))
