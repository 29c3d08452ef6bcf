"""Segment users: a one-user candidate scorer -> a scorer of several users' candidates per call.

The scorer a build holds scores C candidates of one user: its user-side inputs are one row
``[1, ...]`` each (that user's K/V ``[1, H, L, dh]`` per layer, read by ``SharedPrefixAttention``
nodes, possibly through the cut's row-0 ``Slice``; the history length; any other per-user
tensor, such as a user token). This pass rewrites it into the packed form::

    per-candidate inputs [C, ...]            the candidates of all users, user by user
    cand_user [C] int64                      each candidate's user, in [0, U)
    user_k_<l>, user_v_<l> [U, H, L_l, dh]   user u's K/V in row u, left-padded to the longest
    user_k_<l>_len [U] int64                 each user's own K/V length in that layer
    other per-user inputs [U, ...]           stacked; each reader gets its candidate's user's row

Each ``SharedPrefixAttention`` becomes ``SegmentedPrefixAttention`` over the packed K/V. Its
length is the original one computed per user (the same casts, reshapes and arithmetic with
constants, such as ``n_hist + 1`` for a SEP token, on the ``[U]`` lengths) and capped at the
user's own K/V length, so the left padding of a shorter user's row is never attended. Every
other reader of a per-user input reads ``Gather(rows, cand_user)``, its candidate's user's row,
where it read the one row before. :func:`pack` builds the feeds from U users' own tensors and
:func:`unpack` splits the outputs.

Refused (``SegmentError``, saying what reads what): a scorer without fused attention (its K/V
would be copied per candidate: HyFormer's scorer today), K/V read by anything but the
attention, a length computed otherwise. Not a build pass (it changes the graph's inputs):
serving derives the packed scorer from the build's own, and :func:`check` proves, on real
inputs, that several users in one call equal one call per user before it is used.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onetrans_trt.plugins._onnx import DOMAIN

OP_IN, OP_OUT = "SharedPrefixAttention", "SegmentedPrefixAttention"
CAND_USER = "cand_user"
META_KEY = "onetrans.segment_users"
SHAPE_ONLY = {"Cast", "Identity", "Reshape", "Squeeze", "Unsqueeze", "Flatten"}  # on a one-element length
ARITH = {"Add", "Sub", "Mul", "Max", "Min"}  # with a one-element constant: per-user arithmetic (n_hist + 1)


class SegmentError(ValueError):
    """The scorer cannot be segmented; the message says what reads the user-side input."""


@dataclass
class Plan:
    """How U users' tensors become the packed scorer's feeds (stored in the graph's metadata)."""

    kv: list[str]  # K/V inputs, packed along axis 0 and left-padded on axis 2
    kv_len: dict[str, str]  # input -> the K/V whose per-user length (axis 2) it carries
    rows: list[str]  # other per-user inputs (lengths, user tokens), stacked along axis 0
    per_candidate: list[str]  # inputs with one row per candidate (concatenated user by user)
    shapes: dict[str, list[int]] = field(default_factory=dict)  # a row input's one-user shape (-1: dynamic)
    outputs: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(self.__dict__, sort_keys=True)

    @classmethod
    def from_model(cls, model: onnx.ModelProto) -> "Plan":
        for p in model.metadata_props:
            if p.key == META_KEY:
                return cls(**json.loads(p.value))
        raise SegmentError("this graph is not a segmented scorer (no onetrans.segment_users metadata)")


def _row0_slice(node: gs.Node) -> bool:
    """``Slice(x, [0], [1], [0])``: the cut's ``k[0:1]`` of a one-user K/V (a no-op there)."""
    if node.op != "Slice" or len(node.inputs) < 4:
        return False
    vals = [getattr(t, "values", None) for t in node.inputs[1:4]]
    if any(v is None for v in vals):
        return False
    starts, ends, axes = (np.asarray(v).reshape(-1).tolist() for v in vals)
    steps = np.asarray(node.inputs[4].values).reshape(-1).tolist() if len(node.inputs) > 4 and \
        getattr(node.inputs[4], "values", None) is not None else [1]
    return starts == [0] and ends == [1] and axes == [0] and steps == [1]


def _const(t: gs.Tensor) -> np.ndarray | None:
    if isinstance(t, gs.Constant):
        return np.asarray(t.values)
    if len(t.inputs) == 1 and t.inputs[0].op == "Constant":
        v = t.inputs[0].attrs.get("value")
        return np.asarray(v.values) if v is not None else None
    return None


def _length_chain(t: gs.Tensor, inputs: dict[str, gs.Variable]) -> tuple[str, list[gs.Node]]:
    """The graph input an attention's length comes from and the ops on the way (source first):
    shape-only ops and arithmetic with one-element constants, else SegmentError."""
    chain: list[gs.Node] = []
    while t.name not in inputs:
        if len(chain) > 16 or len(t.inputs) != 1:
            raise SegmentError(f"the prefix length {t.name} is not computed from a graph input by casts, reshapes and "
                               "arithmetic with constants, so a packed batch cannot give each user its own")
        n = t.inputs[0]
        if n.op in SHAPE_ONLY:
            t = n.inputs[0]
        elif n.op in ARITH and len(n.inputs) == 2 and sum(_const(x) is None for x in n.inputs) == 1:
            c = next(_const(x) for x in n.inputs if _const(x) is not None)
            if c.size != 1:
                raise SegmentError(f"{n.name}: the prefix length is combined with a {c.size}-element constant")
            t = next(x for x in n.inputs if _const(x) is None)
        else:
            raise SegmentError(f"the prefix length is computed by {n.op} ({n.name}): only casts, reshapes and "
                               "arithmetic with constants can be applied per user in a packed batch")
        chain.append(n)
    return t.name, chain[::-1]


def _shape(t: gs.Variable) -> list[int]:
    return [int(d) if isinstance(d, int) else -1 for d in (t.shape or [])]


def segment_users(model: onnx.ModelProto) -> tuple[onnx.ModelProto, Plan]:
    """The packed scorer of ``model`` (a one-user scorer) and its :class:`Plan`."""
    from onetrans_trt.plugins import attach_op_functions

    graph = gs.import_onnx(model)
    inputs = {t.name: t for t in graph.inputs}
    attn = [n for n in graph.nodes if n.op == OP_IN and n.domain == DOMAIN]
    if not attn:
        raise SegmentError("the scorer has no SharedPrefixAttention node: its attention over the user's K/V is "
                           "not fused, so several users cannot share one call (one user per call still works)")
    # a user-side input has one row ([1, ...] on axis 0); the candidates' have the candidate axis
    per_candidate = [t.name for t in graph.inputs if t.shape and not (isinstance(t.shape[0], int) and t.shape[0] == 1)]
    user_side = [t.name for t in graph.inputs if t.name not in per_candidate]
    kv: list[str] = []
    for n in attn:
        for i in (1, 2):
            t = n.inputs[i]
            if len(t.inputs) == 1 and _row0_slice(t.inputs[0]):
                t = t.inputs[0].inputs[0]
            if t.name not in inputs:
                raise SegmentError(f"{n.name}: its prefix {'KV'[i - 1]} is computed ({t.name}), not a user-side input")
            if t.name not in kv:
                kv.append(t.name)
    for name in kv:
        for r in inputs[name].outputs:
            readers = list(r.outputs[0].outputs) if _row0_slice(r) else [r]
            for rr in readers:
                if rr not in attn or rr.inputs.index(r.outputs[0] if _row0_slice(r) else inputs[name]) not in (1, 2):
                    raise SegmentError(f"user-side input {name} is read by {rr.op} ({rr.name}) besides "
                                       "SharedPrefixAttention: a packed batch would copy it per candidate")
    chains = {n.name: _length_chain(n.inputs[3], inputs) for n in attn}
    for src, _ in chains.values():
        if src in kv or src in per_candidate:
            raise SegmentError(f"the prefix length comes from {src}, not from a per-user input")
        if int(np.prod([d for d in _shape(inputs[src])[1:] if d != -1] or [1])) != 1 or -1 in _shape(inputs[src])[1:]:
            raise SegmentError(f"the prefix length input {src} holds more than one value per user")
    rows = [n for n in user_side if n not in kv]
    shapes = {n: _shape(inputs[n]) for n in rows}
    cand = gs.Variable(CAND_USER, dtype=np.int64, shape=[_cand_dim(graph, per_candidate)])
    # rows: packed [U, ...]; every reader gets each candidate's own user's row (Gather by cand_user)
    for name in rows:
        t = inputs[name]
        readers = list(t.outputs)
        t.shape = ["users", *list(t.shape[1:])]
        if readers:
            per = gs.Variable(f"{name}__per_candidate", dtype=t.dtype)
            graph.nodes.append(gs.Node("Gather", name=f"{name}__gather", inputs=[t, cand], outputs=[per],
                                       attrs={"axis": 0}))
            for r in readers:
                r.inputs[r.inputs.index(t)] = per
    for name in kv:  # packed: users on axis 0, the row-0 slices gone
        t = inputs[name]
        t.shape = ["users", *list(t.shape[1:])]
        for r in list(t.outputs):
            if _row0_slice(r):
                out = r.outputs[0]
                for rr in list(out.outputs):
                    rr.inputs[rr.inputs.index(out)] = t
                r.outputs.clear()
    # each attention's length, per user: its chain on the packed [U] lengths, capped at the
    # user's own K/V length in that layer (a row left-padded to the batch's longest)
    kv_len: dict[str, str] = {}
    len_of: dict[str, gs.Variable] = {}
    valid_of: dict[tuple[str, str], gs.Variable] = {}
    for n in attn:
        src, chain = chains[n.name]
        k = n.inputs[1].name
        key = (k, ";".join(f"{c.op}:{c.name}" for c in chain) + "<-" + src)
        if key not in valid_of:
            if k not in len_of:
                len_of[k] = gs.Variable(f"{k}_len", dtype=np.int64, shape=["users"])
                kv_len[len_of[k].name] = k
            x = _op(graph, "Reshape", [inputs[src], gs.Constant(f"{k}_{len(valid_of)}_flat", np.array([-1], np.int64))])
            for c in chain:
                if c.op == "Cast":
                    x = _op(graph, "Cast", [x], {"to": c.attrs["to"]})
                elif c.op in ARITH:
                    operands = [x if _const(i) is None else gs.Constant(f"{c.name}__c{len(valid_of)}_{j}",
                                                                       _const(i).reshape(1))
                                for j, i in enumerate(c.inputs)]
                    x = _op(graph, c.op, operands)
            x = _op(graph, "Cast", [x], {"to": onnx.TensorProto.INT64})
            valid_of[key] = _op(graph, "Min", [x, len_of[k]])
        n.op = OP_OUT
        n.inputs = [n.inputs[0], n.inputs[1], n.inputs[2], valid_of[key], cand, n.inputs[4], n.inputs[5]]
    graph.inputs = list(graph.inputs) + [cand, *len_of.values()]
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    out = gs.export_onnx(graph)
    out.ir_version = model.ir_version
    del out.functions[:]
    out.functions.extend(f for f in model.functions if f.name != OP_IN or f.domain != DOMAIN)
    out = attach_op_functions(out)
    plan = Plan(kv=kv, kv_len=kv_len, rows=rows, per_candidate=per_candidate, shapes=shapes,
                outputs=[t.name for t in graph.outputs])
    out.metadata_props.add(key=META_KEY, value=plan.to_json())
    onnx.checker.check_model(out)
    return out, plan


def _op(graph: gs.Graph, op: str, inputs: list, attrs: dict | None = None) -> gs.Variable:
    out = gs.Variable(f"segment_users_{len(graph.nodes)}_{op.lower()}")
    graph.nodes.append(gs.Node(op, name=out.name, inputs=inputs, outputs=[out], attrs=attrs or {}))
    return out


def _cand_dim(graph: gs.Graph, per_candidate: list[str]) -> Any:
    for t in graph.inputs:
        if t.name in per_candidate and t.shape:
            return t.shape[0]
    return "candidates"


# ---------------------------------------------------------------- feeds and outputs

def pack(plan: Plan, users: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The packed scorer's feeds for U users, each given as the one-user scorer's feeds
    (K/V ``[1, H, L_u, dh]``, per-user rows ``[1, ...]`` of one shape, per-candidate inputs
    ``[C_u, ...]``)."""
    if not users:
        raise ValueError("pack: no users")
    feeds: dict[str, np.ndarray] = {}
    for name in plan.kv:
        rows = [np.asarray(u[name]) for u in users]
        for i, r in enumerate(rows):
            if r.ndim != 4 or r.shape[0] != 1 or r.shape[1::2] != rows[0].shape[1::2]:
                raise ValueError(f"pack: {name} of user {i} has shape {list(r.shape)}, expected one user's "
                                 f"[1, {rows[0].shape[1]}, L, {rows[0].shape[3]}]")
        longest = max(r.shape[2] for r in rows)
        out = np.zeros((len(rows), rows[0].shape[1], longest, rows[0].shape[3]), rows[0].dtype)
        for i, r in enumerate(rows):
            if r.shape[2]:
                out[i, :, longest - r.shape[2]:] = r[0]
        feeds[name] = out
    for v, k in plan.kv_len.items():
        feeds[v] = np.array([np.asarray(u[k]).shape[2] for u in users], np.int64)
    for name in plan.rows:
        rows = [np.asarray(u[name]) for u in users]
        if any(r.shape != rows[0].shape or r.shape[:1] != (1,) for r in rows):
            raise ValueError(f"pack: {name} differs in shape between users ({sorted({r.shape for r in rows})}); "
                             "each user's row must be [1, ...] of one shape")
        feeds[name] = np.concatenate(rows)
    counts = [int(np.asarray(u[plan.per_candidate[0]]).shape[0]) for u in users]
    for name in plan.per_candidate:
        feeds[name] = np.concatenate([np.asarray(u[name]) for u in users])
    feeds[CAND_USER] = np.repeat(np.arange(len(users), dtype=np.int64), counts)
    return feeds


def unpack(outputs: dict[str, np.ndarray], counts: list[int]) -> list[dict[str, np.ndarray]]:
    """Split per-candidate outputs back into each user's rows."""
    ends = np.cumsum(counts)
    return [{n: v[e - c:e] for n, v in outputs.items()} for c, e in zip(counts, ends)]


def check(original: onnx.ModelProto, segmented: onnx.ModelProto, users: list[dict[str, np.ndarray]],
          atol: float = 1e-5) -> float:
    """Run both in ONNX Runtime: the packed call over ``users`` against one call per user;
    returns the worst absolute difference (raises SegmentError over ``atol``)."""
    import onnxruntime as ort

    from onetrans_trt.ort_options import session_options

    plan = Plan.from_model(segmented)
    one = ort.InferenceSession(original.SerializeToString(), sess_options=session_options(), providers=["CPUExecutionProvider"])
    many = ort.InferenceSession(segmented.SerializeToString(), sess_options=session_options(), providers=["CPUExecutionProvider"])
    names = [o.name for o in one.get_outputs()]
    kinds = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64}
    users = [{i.name: np.asarray(u[i.name]).astype(kinds.get(i.type, np.asarray(u[i.name]).dtype), copy=False)
              for i in one.get_inputs()} for u in users]
    try:
        want = [dict(zip(names, one.run(names, u))) for u in users]
        got = unpack(dict(zip(names, many.run(names, pack(plan, users)))),
                     [int(np.asarray(u[plan.per_candidate[0]]).shape[0]) for u in users])
    except Exception as e:  # noqa: BLE001 - ORT's own error types: the packed graph does not run
        raise SegmentError(f"the packed scorer does not run on the samples ({type(e).__name__}: "
                           f"{str(e).splitlines()[0][:200]})") from None
    worst = max((float(np.abs(g[n].astype(np.float64) - w[n].astype(np.float64)).max(initial=0.0))
                 for g, w in zip(got, want) for n in names), default=0.0)
    if not worst <= atol:
        raise SegmentError(f"the packed scorer differs from one call per user by {worst:.3g} (> {atol})")
    return worst
