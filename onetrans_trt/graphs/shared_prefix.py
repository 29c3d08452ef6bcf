"""Shared prefix: rewrite a naive candidate scorer's per-candidate K/V copy into our fused op.

A hand-written scorer usually attends its candidates to the user's K/V by copying it once
per candidate, the pattern :mod:`onetrans_trt.graphs.no_broadcast` refuses::

    user_k_<l> [1, ...] --(layout, scale, cast)--> Expand/Tile [C, ...] --> Concat(., k_own)  (key axis)
    user_v_<l> [1, ...] --(layout, scale, cast)--> Expand/Tile [C, ...] --> Concat(., v_own)
    attention:  Softmax(MatMul(Q, K^T) [* scale | / s] [+ mask | Where(mask, s, -inf)]) @ V
                or the ONNX ``Attention`` op (opset 23, what SDPA exports to) with an attn_mask

This pass replaces each such site with one ``SharedPrefixAttention`` node (domain
``onetrans``; inputs ``q, k_prefix, v_prefix, prefix_valid, k_own, v_own`` in the op's
``[C, H, T, dh]`` / ``[1, H, L, dh]`` layout): the prefix side is the same chain of layout,
scale and cast ops applied to the *un-copied* K/V (the Expand/Tile keeps batch 1), the own
side is that chain applied to the candidates' own K/V, and transposes bring both to the op's
layout. The naive graph's mask is not interpreted: the op's semantics (the prefix left-padded
with ``prefix_valid`` real tokens at its end, the own part causal) either equal it or not.

**A rewrite is accepted only when proven.** The count ``prefix_valid`` is tried from, in turn
(:func:`count_choices`): the integer one-element graph inputs the site's mask reads, the integer
one-element tensors of the mask computed from them (``n_hist + 1`` when a SEP token counts as
real), the other integer one-element inputs, and last the whole prefix. For each, the graph
before and after the rewrite run in ONNX Runtime on the same random inputs, the input the count
comes from set to prefix lengths 0, 1, L/2, L and L+3, with C in {1, 3}; the first choice whose
outputs all agree within 1e-5 (absolute) is kept. When none does (a mask that is not the op's:
own tokens that see each other in full, right padding, ...), the site is left as it was and
the ``no-broadcast`` check still reports it. :func:`last_report` says what happened per site.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onetrans_trt.graphs import register
from onetrans_trt.graphs.split_kv import KV_NAME
from onetrans_trt.plugins._onnx import DOMAIN, PLUGIN_NAMESPACE

OP = "SharedPrefixAttention"
ATOL = 1e-5
PROOF_CANDIDATES = (1, 3)
PROOF_KV_LEN = 8  # the size given to a dynamic key axis in the proof; lengths 0, 1, L/2, L, L+3
# ops that act on each K/V element (or move it) without mixing candidates: the chain between the
# user's K/V and the Concat, and between the Concat and the attention, is made of these
REPLAYABLE = {"Transpose", "Cast", "Identity", "Mul", "Div", "Add", "Sub"}
BROADCASTS = {"Expand", "Tile"}


# ---------------------------------------------------------------- small graph helpers

def _producer(t: gs.Tensor) -> gs.Node | None:
    return t.inputs[0] if isinstance(t, gs.Variable) and len(t.inputs) == 1 else None


def _const(t: gs.Tensor) -> np.ndarray | None:
    """The value of a constant tensor (initializer or Constant node), else None."""
    if isinstance(t, gs.Constant):
        return np.asarray(t.values)
    p = _producer(t)
    if p is not None and p.op == "Constant" and "value" in p.attrs:
        v = p.attrs["value"]
        return np.asarray(v.values if isinstance(v, gs.Constant) else v)
    return None


def _const_scalar(t: gs.Tensor) -> float | None:
    v = _const(t)
    return float(v.reshape(-1)[0]) if v is not None and v.size == 1 else None


def _is_kv_derived(t: gs.Tensor, limit: int = 64) -> str | None:
    """The ``user_k_<l>``/``user_v_<l>`` input ``t`` is computed from (through data inputs), if any."""
    stack, seen = [t], set()
    while stack and len(seen) < limit:
        x = stack.pop()
        if id(x) in seen:
            continue
        seen.add(id(x))
        if not x.inputs and KV_NAME.match(x.name or ""):
            return x.name
        p = _producer(x)
        if p is not None and p.op not in ("Shape", "Size"):
            data = p.inputs[:1] if p.op in ("Reshape", "Expand", "Tile", "Slice", "Squeeze", "Unsqueeze") else p.inputs
            stack.extend(data)
    return None


def _replay_step(node: gs.Node, t: gs.Tensor) -> tuple[gs.Tensor, ...] | None:
    """``node`` seen as a function of its one data input ``t``: the other inputs, which must be
    constants (a Mul by a scale), or None when it is not such a node."""
    if node.op not in REPLAYABLE:
        return None
    others = [x for x in node.inputs if x is not t]
    if len(others) != len(node.inputs) - 1 or any(_const(x) is None for x in others):
        return None
    if node.op in ("Sub", "Div") and node.inputs[0] is not t:
        return None  # c - K, c / K: not kept in the chain (never seen on K/V)
    return tuple(others)


def _chain_back(t: gs.Tensor, stop: set[str]) -> tuple[gs.Node | None, list[gs.Node]]:
    """Walk back from ``t`` through replayable one-data-input nodes to a node in ``stop``.
    Returns (that node, the chain from it to ``t`` in execution order) or (None, [])."""
    chain: list[gs.Node] = []
    while True:
        p = _producer(t)
        if p is None:
            return None, []
        if p.op in stop:
            return p, chain[::-1]
        data = [x for x in p.inputs if _const(x) is None]
        if len(data) != 1 or _replay_step(p, data[0]) is None:
            return None, []
        chain.append(p)
        t = data[0]


def _data_input(node: gs.Node) -> gs.Tensor:
    return next(x for x in node.inputs if _const(x) is None)


# ---------------------------------------------------------------- the pattern

@dataclass
class KVSide:
    """One of K or V: ``Concat(post-chain(Expand(x) -> mid-chain), own) -> post-chain``."""

    source: str  # the user_k_<l>/user_v_<l> input
    broadcast: gs.Node  # the Expand/Tile
    mid: list[gs.Node]  # Expand -> Concat input
    concat: gs.Node
    own: gs.Tensor  # the candidates' own K/V, as concatenated
    post: list[gs.Node]  # Concat -> the attention's input
    axis: int  # the key axis, as seen by the attention


@dataclass
class Site:
    anchor: str  # name of the node whose output the fused node takes over
    kind: str  # "matmul" or "Attention"
    q: gs.Tensor
    k: KVSide
    v: KVSide
    scale: float
    mask: list[gs.Tensor] = field(default_factory=list)  # where the mask is read from (scores or attn_mask)
    stop: set[int] = field(default_factory=set)  # ids of the QK product and the K/V copy nodes

    def __post_init__(self) -> None:
        for side in (self.k, self.v):
            self.stop |= {id(n) for n in (side.broadcast, *side.mid, side.concat, *side.post)}


def _kv_side(t: gs.Tensor) -> KVSide | None:
    concat, post = _chain_back(t, {"Concat"})
    if concat is None or len(concat.inputs) != 2:
        return None
    rank = len(concat.outputs[0].shape) if concat.outputs[0].shape is not None else 4
    axis = int(concat.attrs.get("axis", 0)) % rank
    for node in post:
        if node.op == "Transpose":
            axis = list(node.attrs["perm"]).index(axis)
    for i, x in enumerate(concat.inputs):
        bc, mid = _chain_back(x, BROADCASTS)
        if bc is None or len(x.outputs) != 1:
            continue
        source = _is_kv_derived(bc.inputs[0])
        if source is None:
            continue
        return KVSide(source, bc, mid, concat, concat.inputs[1 - i], post, axis)
    return None


def _scores_root(t: gs.Tensor, scale: float = 1.0, depth: int = 0) -> tuple[gs.Node, float] | None:
    """Back from the Softmax input to ``MatMul(Q, K^T)`` through scale and mask ops."""
    p = _producer(t)
    if p is None or depth > 8:
        return None
    if p.op == "MatMul":
        return p, scale
    if p.op in ("Mul", "Div"):
        a, b = p.inputs
        for x, c in ((a, _const_scalar(b)), (b, _const_scalar(a) if p.op == "Mul" else None)):
            if c is not None and c != 0:
                return _scores_root(x, scale * (c if p.op == "Mul" else 1.0 / c), depth + 1)
        return None
    if p.op in ("Add", "Sub", "Where", "Cast"):
        data = p.inputs[1:] if p.op == "Where" else p.inputs[:1] if p.op == "Cast" else p.inputs
        found = [r for r in (_scores_root(x, scale, depth + 1) for x in data) if r is not None]
        return found[0] if len(found) == 1 else None
    return None


def _head_dim(*ts: gs.Tensor) -> int | None:
    for t in ts:
        if t.shape is not None and len(t.shape) == 4 and isinstance(t.shape[3], int):
            return t.shape[3]
    return None


def find_sites(graph: gs.Graph) -> list[Site]:
    """Every attention whose K and V are a per-candidate copy of user K/V concatenated with the
    candidates' own (structure only; :func:`shared_prefix` proves each before rewriting)."""
    sites = []
    for sm in [n for n in graph.nodes if n.op == "Softmax"]:
        if int(sm.attrs.get("axis", -1)) not in (-1, 3):
            continue
        pv = [n for n in sm.outputs[0].outputs if n.op == "MatMul" and n.inputs[0] is sm.outputs[0]]
        root = _scores_root(sm.inputs[0])
        if len(pv) != 1 or root is None:
            continue
        qk, scale = root
        k = _kv_side(qk.inputs[1])
        v = _kv_side(pv[0].inputs[1])
        if k is None or v is None or k.axis != 3 or v.axis != 2:  # K^T: keys on the last axis
            continue
        site = Site(pv[0].name, "matmul", qk.inputs[0], k, v, scale, [sm.inputs[0]])
        site.stop.add(id(qk))
        sites.append(site)
    for at in [n for n in graph.nodes if n.op == "Attention"]:
        ins = [x for x in at.inputs]
        extra_used = any(len(o.outputs) or o in graph.outputs for o in at.outputs[1:])
        if (len(ins) > 4 and any(x.name for x in ins[4:])) or extra_used or int(at.attrs.get("is_causal", 0)) \
                or float(at.attrs.get("softcap", 0.0)) or int(at.attrs.get("qk_matmul_output_mode", 0)):
            continue
        q = ins[0]
        if q.shape is not None and len(q.shape) != 4:
            continue  # the 3-D form [B, S, H*dh]: not handled
        k, v = _kv_side(ins[1]), _kv_side(ins[2])
        if k is None or v is None or k.axis != 2 or v.axis != 2:
            continue
        scale = at.attrs.get("scale")
        if scale is None:
            dh = _head_dim(q, ins[1], graph.tensors().get(k.source))
            if dh is None:
                continue
            scale = 1.0 / math.sqrt(dh)
        sites.append(Site(at.name, "Attention", q, k, v, float(scale), [x for x in ins[3:4] if x.name]))
    return sites


# ---------------------------------------------------------------- the rewrite

class _Builder:
    def __init__(self, graph: gs.Graph, tag: str):
        self.graph, self.tag, self.n = graph, tag, 0

    def node(self, op: str, inputs: list[gs.Tensor], shape, dtype, attrs=None, domain=None) -> gs.Variable:
        self.n += 1
        out = gs.Variable(f"{self.tag}_{op.lower()}_{self.n}", dtype=dtype, shape=shape)
        self.graph.nodes.append(gs.Node(op, name=f"{self.tag}_{op}_{self.n}", attrs=attrs or {}, inputs=inputs,
                                        outputs=[out], domain=domain))
        return out

    def const(self, value, dtype=np.int64) -> gs.Constant:
        self.n += 1
        return gs.Constant(f"{self.tag}_c{self.n}", np.asarray(value, dtype=dtype))

    def transpose(self, t: gs.Tensor, perm: list[int]) -> gs.Tensor:
        p = _producer(t)
        if p is not None and p.op == "Transpose" and p.name.startswith(self.tag):  # ours: fold the two
            t, perm = p.inputs[0], [list(p.attrs["perm"])[i] for i in perm]
        if perm == list(range(len(perm))):
            return t
        shape = [t.shape[i] for i in perm] if t.shape is not None else None
        return self.node("Transpose", [t], shape, t.dtype, {"perm": perm})

    def replay(self, chain: list[gs.Node], t: gs.Tensor) -> gs.Tensor:
        """Apply ``chain``'s ops to ``t`` instead of to the tensor they were applied to."""
        for node in chain:
            data = _data_input(node)
            if node.op == "Transpose":
                t = self.transpose(t, list(node.attrs["perm"]))
                continue
            shape = list(t.shape) if t.shape is not None else None  # elementwise with a constant, or a cast
            inputs = [t if x is data else x for x in node.inputs]
            t = self.node(node.op, inputs, shape, node.outputs[0].dtype, dict(node.attrs))
        return t

    def uncopied(self, side: KVSide) -> gs.Tensor:
        """The Expand/Tile's input, broadcast as before on every axis except the candidates'."""
        bc = side.broadcast
        x, how = bc.inputs[0], bc.inputs[1]
        out_shape = bc.outputs[0].shape
        if out_shape is not None:
            shape = [1, *out_shape[1:]]
        else:  # unknown: say at least that the candidates' axis is 1, so no-broadcast sees no copy
            shape = [1] + [None] * (len(x.shape) - 1) if x.shape is not None else None
        rest = _const(how)
        if rest is None and _producer(how) is not None and _producer(how).op == "Concat":
            parts = [_const(p) for p in _producer(how).inputs[1:]]
            rest = np.concatenate([p.reshape(-1) for p in parts]) if all(p is not None for p in parts) else None
        elif rest is not None:
            rest = rest.reshape(-1)[1:]
        if rest is not None and np.all(rest == 1) and x.shape is not None and len(x.shape) == len(rest) + 1:
            return x  # it only ever copied along the candidates
        tail = self.node("Slice", [how, self.const([1]), self.const([np.iinfo(np.int64).max])], None, np.int64)
        one = self.node("Concat", [self.const([1]), tail], None, np.int64, {"axis": 0})
        return self.node(bc.op, [x, one], shape, bc.outputs[0].dtype)

    def prefix_and_own(self, side: KVSide, transpose_last: bool) -> tuple[gs.Tensor, gs.Tensor]:
        prefix = self.replay(side.post, self.replay(side.mid, self.uncopied(side)))
        own = self.replay(side.post, side.own)
        if transpose_last:  # the matmul form reads K^T
            prefix, own = self.transpose(prefix, [0, 1, 3, 2]), self.transpose(own, [0, 1, 3, 2])
        return prefix, own


def _valid_tensor(b: _Builder, graph: gs.Graph, choice: str, k_prefix: gs.Tensor) -> gs.Tensor:
    if choice == "":  # the whole prefix is real
        return b.node("Shape", [k_prefix], [1], np.int64, {"start": 2, "end": 3})
    t = graph.tensors()[choice]
    if np.dtype(t.dtype) != np.int64:
        t = b.node("Cast", [t], t.shape, np.int64, {"to": onnx.TensorProto.INT64})
    if t.shape is None or list(t.shape) != [1]:
        t = b.node("Reshape", [t, b.const([1])], [1], np.int64)
    return t


def rewrite_site(graph: gs.Graph, site: Site, valid: str) -> gs.Node:
    """Replace ``site`` in ``graph`` (the graph it was found in) with one fused node reading
    ``valid`` (a graph input's name, or "" for the whole prefix). The dead copy is left for
    ``graph.cleanup()``."""
    b = _Builder(graph, f"shared_prefix_{site.anchor}")
    matmul = site.kind == "matmul"
    kp, ko = b.prefix_and_own(site.k, transpose_last=matmul)
    vp, vo = b.prefix_and_own(site.v, transpose_last=False)
    anchor = next(n for n in graph.nodes if n.name == site.anchor)
    out = anchor.outputs[0]
    anchor.outputs.clear()
    node = gs.Node(OP, name=f"{OP}_{site.anchor}", domain=DOMAIN,
                   inputs=[site.q, kp, vp, _valid_tensor(b, graph, valid, kp), ko, vo], outputs=[out],
                   attrs={"scale": float(site.scale), "plugin_namespace": PLUGIN_NAMESPACE, "aot": 1})
    graph.nodes.append(node)
    return node


# ---------------------------------------------------------------- the proof

def _one_int(t: gs.Tensor) -> bool:
    """An integer tensor of one element (a count): shape [], [1], [1, 1], ["users"] ..."""
    if isinstance(t, gs.Constant) or t.dtype is None or t.shape is None:
        return False
    try:
        integer = np.issubdtype(np.dtype(t.dtype), np.integer)
    except TypeError:
        return False
    return integer and all(d == 1 or d == "users" for d in t.shape)


def _int_scalar_inputs(graph: gs.Graph) -> list[str]:
    return [t.name for t in graph.inputs if _one_int(t)]


def _value_sources(t: gs.Tensor, stop: set[int], limit: int = 400) -> set[str] | None:
    """Graph inputs ``t``'s value depends on (not through Shape/Size); None when the walk
    reaches a ``stop`` node (the count would keep the K/V copy alive) or is cut short."""
    stack, seen, found = [t], set(), set()
    while stack:
        x = stack.pop()
        if id(x) in seen:
            continue
        seen.add(id(x))
        if len(seen) > limit:
            return None
        p = _producer(x)
        if p is None:
            if not isinstance(x, gs.Constant):
                found.add(x.name)
            continue
        if id(p) in stop:
            return None
        if p.op not in ("Shape", "Size"):
            stack.extend(p.inputs)
    return found


MAX_TRIALS = 12


def count_choices(graph: gs.Graph, site: Site) -> list[tuple[str, str | None]]:
    """What ``prefix_valid`` may be, most likely first: (tensor name, the graph input the proof
    varies). The integer one-element graph inputs the mask reads, then one-element integer
    tensors of the mask computed from them (``n_hist + 1`` when a SEP token counts as real),
    then the other integer one-element inputs, then ("", None): the whole prefix is real."""
    ints = _int_scalar_inputs(graph)
    inner: list[tuple[str, str]] = []
    inputs_read: list[str] = []
    stack, seen = list(site.mask), set()
    while stack and len(seen) < 2000:  # backwards over the mask, breadth first
        x = stack.pop(0)
        if id(x) in seen:
            continue
        seen.add(id(x))
        if x.name in ints:
            inputs_read.append(x.name)
        elif _one_int(x):
            src = _value_sources(x, site.stop)
            drive = [i for i in ints if src and i in src]
            if drive:
                inner.append((x.name, drive[0]))
        p = _producer(x)
        if p is not None and id(p) not in site.stop:
            stack.extend(p.inputs)
    first = [(i, i) for i in ints if i in inputs_read]
    rest = [(i, i) for i in ints if i not in inputs_read]
    return (first + inner[::-1] + rest)[:MAX_TRIALS - 1] + [("", None)]


def _dim_size(name: str, c: int) -> int:
    if "candidates" in name:
        return c
    if "kv_len" in name or "history" in name:
        return PROOF_KV_LEN
    return 1 if name == "users" else 2


def _feeds(model: onnx.ModelProto, c: int, length_input: str | None, n: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {}
    for v in model.graph.input:
        tt = v.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else _dim_size(d.dim_param, c) for d in tt.shape.dim]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)
        if v.name == length_input:
            feeds[v.name] = np.full(shape, n, dtype=dtype)
        elif np.issubdtype(dtype, np.floating):
            feeds[v.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype == np.bool_:
            feeds[v.name] = rng.random(shape) < 0.5
        else:
            feeds[v.name] = rng.integers(0, 2, size=shape).astype(dtype)
    return feeds


def _session(model: onnx.ModelProto):
    import onnxruntime as ort

    from onetrans_trt.onnx_files import session_source
    from onetrans_trt.ort_options import session_options

    opts = session_options(threads=1)

    with session_source(model) as source:  # bytes, or a temporary file with external data when large
        return ort.InferenceSession(source, sess_options=opts, providers=["CPUExecutionProvider"])


def _lengths(model: onnx.ModelProto) -> list[int]:
    sizes = {PROOF_KV_LEN}
    for v in model.graph.input:
        if KV_NAME.match(v.name):
            sizes |= {d.dim_value for d in v.type.tensor_type.shape.dim[1:] if d.HasField("dim_value") and d.dim_value > 1}
    return sorted({0, 1} | {s // 2 for s in sizes} | sizes | {s + 3 for s in sizes})


class _Proof:
    """Runs the graph before any rewrite once per input set and compares a candidate against it."""

    def __init__(self, before: gs.Graph):
        from onetrans_trt.plugins import attach_op_functions

        self.attach = attach_op_functions
        self.model = attach_op_functions(gs.export_onnx(before))
        self.sess = None
        self.cache: dict[tuple, list[np.ndarray]] = {}

    def cases(self, length_input: str | None):
        lengths = _lengths(self.model) if length_input else [None]
        for c in PROOF_CANDIDATES:
            for i, n in enumerate(lengths):
                yield (c, length_input, n, 1000 * c + i)

    def _before(self, case) -> list[np.ndarray]:
        if case not in self.cache:
            if self.sess is None:
                self.sess = _session(self.model)
            self.cache[case] = self.sess.run(None, _feeds(self.model, case[0], case[1], case[2] or 0, case[3]))
        return self.cache[case]

    def holds(self, after: gs.Graph, length_input: str | None) -> tuple[bool, str]:
        try:
            model = self.attach(gs.export_onnx(after))
            sess = _session(model)
            for case in self.cases(length_input):
                want = self._before(case)
                got = sess.run(None, _feeds(self.model, case[0], case[1], case[2] or 0, case[3]))
                for w, g in zip(want, got):
                    if w.shape != g.shape or not np.array_equal(np.isnan(w), np.isnan(g)):
                        return False, f"C={case[0]} length={case[2]}: outputs differ in shape or NaNs"
                    err = float(np.nanmax(np.abs(w.astype(np.float64) - g))) if w.size else 0.0
                    if not err <= ATOL:
                        return False, f"C={case[0]} length={case[2]}: max abs error {err:.3g} > {ATOL}"
        except Exception as e:  # noqa: BLE001 - a rewrite ORT cannot even run is simply not proven
            return False, f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        return True, ""


# ---------------------------------------------------------------- the pass

_LAST: list[dict] = []


def last_report() -> list[dict]:
    """Per site of the last run: anchor, sources, rewritten (bool), prefix_valid or why not."""
    return list(_LAST)


def rewrite_shared_prefix(graph: gs.Graph) -> tuple[gs.Graph, list[dict]]:
    """The rewritten graph (a copy) and a record per site found."""
    graph = graph.copy()
    for i, node in enumerate(graph.nodes):
        if not node.name:
            node.name = f"node_{i}_{node.op}"
    sites = find_sites(graph)
    report: list[dict] = []
    if not sites:
        return graph, report
    proof = _Proof(graph)
    current = graph
    for site in sites:
        rec = {"site": site.anchor, "kind": site.kind, "k": site.k.source, "v": site.v.source, "scale": site.scale,
               "rewritten": False}
        tried = []
        for choice, drive in count_choices(graph, site):
            trial = current.copy()
            found = {s.anchor: s for s in find_sites(trial)}.get(site.anchor)
            if found is None:
                tried.append(f"{choice or 'whole prefix'}: the site is gone")
                break
            rewrite_site(trial, found, choice)
            trial.cleanup().toposort()
            ok, why = proof.holds(trial, drive)
            if ok:
                current = trial
                rec.update(rewritten=True, prefix_valid=choice or "whole prefix")
                break
            tried.append(f"{choice or 'whole prefix'}: {why}")
        if not rec["rewritten"]:
            rec["why_not"] = "; ".join(tried)
        report.append(rec)
    return current, report


@register("shared-prefix")
def shared_prefix(graph: gs.Graph) -> gs.Graph:
    """Rewrite every proven naive per-candidate K/V copy into ``SharedPrefixAttention``."""
    if not any(KV_NAME.match(t.name) for t in graph.inputs):
        return graph  # not a scorer graph
    out, report = rewrite_shared_prefix(graph)
    _LAST[:] = report
    out.__dict__["fused_attention"] = sum(r["rewritten"] for r in report)
    out.__dict__["shared_prefix"] = report
    return out
