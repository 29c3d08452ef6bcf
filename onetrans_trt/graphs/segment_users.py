"""Segment users: a one-user candidate scorer -> a scorer of several users' candidates per call.

The scorer a build holds scores C candidates of one user: its user-side inputs are that user's
K/V ``[1, H, L, dh]`` per layer and the history length ``[1]``, read only by
``SharedPrefixAttention`` nodes (the cut leaves a row-0 ``Slice`` of each K/V before them).
This pass rewrites it into the packed form::

    ns_* [C, ...]                      the candidates of all users, user by user
    cand_user [C] int64                each candidate's user, in [0, U)
    user_k_<l>, user_v_<l> [U, H, L_l, dh]   user u's K/V in row u, left-padded to the longest
    user_k_<l>_valid [U] int64         user u's real tokens in that layer (min(length, its L_l))

and each ``SharedPrefixAttention`` becomes ``SegmentedPrefixAttention`` over the packed K/V
(one valid input per K/V, since a user's row is padded per layer). Nothing else of the graph
changes: every other op works per candidate row. :func:`pack` builds the feeds from U users'
own tensors and :func:`unpack` splits the outputs; one user is the original scorer exactly.

Refused (``SegmentError``, saying what reads what): a user-side input read by anything but
the attention nodes (HyFormer's scorer reads its K/V through plain MatMuls and its pooled
summaries directly: its attention is not fused yet), or an attention whose length does not
come straight from a graph input. Not a build pass (it changes the graph's inputs): serving
derives the packed scorer from the build's own, and :func:`check` proves the two agree.
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
PASS_THROUGH = {"Cast", "Identity", "Reshape", "Squeeze", "Unsqueeze", "Flatten"}  # on a [1] length


class SegmentError(ValueError):
    """The scorer cannot be segmented; the message says what reads the user-side input."""


@dataclass
class Plan:
    """How U users' tensors become the packed scorer's feeds (stored in the graph's metadata)."""

    kv: list[str]  # K/V inputs, packed along axis 0 and left-padded on axis 2
    valid: dict[str, list[str]]  # valid input -> [the K/V input it counts, the length input it clamps]
    lengths: list[str]  # the original one-user length inputs (per user: one integer each)
    per_candidate: list[str]  # inputs with one row per candidate (concatenated user by user)
    outputs: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps({"kv": self.kv, "valid": self.valid, "lengths": self.lengths,
                           "per_candidate": self.per_candidate, "outputs": self.outputs}, sort_keys=True)

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


def _length_source(t: gs.Tensor, inputs: dict[str, gs.Variable]) -> str | None:
    """The graph input a one-element length comes from through casts and reshapes, else None."""
    seen = 0
    while t.name not in inputs and seen < 8:
        if not t.inputs or len(t.inputs) != 1 or t.inputs[0].op not in PASS_THROUGH:
            return None
        t, seen = t.inputs[0].inputs[0], seen + 1
    return t.name if t.name in inputs else None


def _other_reader(t: gs.Tensor, attn: list[gs.Node], outputs: set[str], depth: int = 0) -> str | None:
    """What reads ``t`` other than an attention's length (through casts and reshapes), else None."""
    if t.name in outputs or depth > 8:
        return "the graph's outputs"
    for r in t.outputs:
        if r in attn and r.inputs.index(t) == 3:
            continue
        if r.op in PASS_THROUGH:
            bad = _other_reader(r.outputs[0], attn, outputs, depth + 1)
            if bad is None:
                continue
            return f"{r.op} ({r.name}) -> {bad}"
        return f"{r.op} ({r.name})"
    return None


def segment_users(model: onnx.ModelProto) -> tuple[onnx.ModelProto, Plan]:
    """The packed scorer of ``model`` (a one-user scorer) and its :class:`Plan`."""
    from onetrans_trt.plugins import attach_op_functions

    graph = gs.import_onnx(model)
    inputs = {t.name: t for t in graph.inputs}
    attn = [n for n in graph.nodes if n.op == OP_IN and n.domain == DOMAIN]
    if not attn:
        raise SegmentError("the scorer has no SharedPrefixAttention node: its attention over the user's K/V is "
                           "not fused, so several users cannot share one call (one user per call still works)")
    # every user-side input: one row ([1, ...] on axis 0) that the candidates do not have
    per_candidate = [t.name for t in graph.inputs if t.shape and not (isinstance(t.shape[0], int) and t.shape[0] == 1)]
    user_side = [t.name for t in graph.inputs if t.name not in per_candidate]
    kv: list[str] = []
    for name in user_side:
        t = inputs[name]
        readers = list(t.outputs)
        direct = []
        for r in readers:
            if _row0_slice(r):
                for rr in list(r.outputs[0].outputs):
                    direct.append((rr, r.outputs[0]))
            else:
                direct.append((r, t))
        if all(r in attn and r.inputs.index(via) in (1, 2) for r, via in direct):
            kv.append(name)
    lengths: list[str] = []
    for n in attn:
        src = _length_source(n.inputs[3], inputs)
        if src is None:
            raise SegmentError(f"{n.name}: its prefix length is not a graph input (through casts/reshapes), "
                               "so a packed batch cannot give each user its own")
        if src not in lengths:
            lengths.append(src)
    for name in user_side:
        if name in kv or name in lengths:
            continue
        readers = ", ".join(sorted({r.op for r in inputs[name].outputs})) or "nothing"
        raise SegmentError(f"user-side input {name} is read by {readers}, not only by SharedPrefixAttention: a "
                           "packed batch would hand it every user's row (one user per call still works)")
    # length inputs read by anything else than the attentions' length chains would change meaning
    outputs = {t.name for t in graph.outputs}
    for name in lengths:
        bad = _other_reader(inputs[name], attn, outputs)
        if bad is not None:
            raise SegmentError(f"the length input {name} is read by {bad} besides the attention")
    for name in kv:  # packed: users on axis 0, the row-0 slices gone
        t = inputs[name]
        t.shape = ["users", *list(t.shape[1:])]
        for r in list(t.outputs):
            if _row0_slice(r):
                out = r.outputs[0]
                for rr in list(out.outputs):
                    rr.inputs[rr.inputs.index(out)] = t
                r.outputs.clear()
    cand = gs.Variable(CAND_USER, dtype=np.int64, shape=[_cand_dim(graph, per_candidate)])
    valid_of: dict[str, gs.Variable] = {}
    plan_valid: dict[str, list[str]] = {}
    for n in attn:
        k = n.inputs[1]
        if k.name not in inputs:
            raise SegmentError(f"{n.name}: its prefix K is computed ({k.name}), not a user-side input")
        src = _length_source(n.inputs[3], inputs)
        if k.name not in valid_of:
            v = gs.Variable(f"{k.name}_valid", dtype=np.int64, shape=["users"])
            valid_of[k.name] = v
            plan_valid[v.name] = [k.name, src]
        n.op = OP_OUT
        n.inputs = [n.inputs[0], n.inputs[1], n.inputs[2], valid_of[k.name], cand, n.inputs[4], n.inputs[5]]
    graph.inputs = [t for t in graph.inputs if t.name not in lengths] + [cand, *valid_of.values()]
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    out = gs.export_onnx(graph)
    out.ir_version = model.ir_version
    del out.functions[:]
    out.functions.extend(f for f in model.functions if f.name != OP_IN or f.domain != DOMAIN)
    out = attach_op_functions(out)
    plan = Plan(kv=kv, valid=plan_valid, lengths=lengths, per_candidate=per_candidate,
                outputs=[t.name for t in graph.outputs])
    out.metadata_props.add(key=META_KEY, value=plan.to_json())
    onnx.checker.check_model(out)
    return out, plan


def _cand_dim(graph: gs.Graph, per_candidate: list[str]) -> Any:
    for t in graph.inputs:
        if t.name in per_candidate and t.shape:
            return t.shape[0]
    return "candidates"


# ---------------------------------------------------------------- feeds and outputs

def pack(plan: Plan, users: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The packed scorer's feeds for U users, each given as the one-user scorer's feeds
    (K/V ``[1, H, L_u, dh]``, lengths ``[1]``, per-candidate inputs ``[C_u, ...]``)."""
    if not users:
        raise ValueError("pack: no users")
    feeds: dict[str, np.ndarray] = {}
    for name in plan.kv:
        rows = [np.asarray(u[name]) for u in users]
        longest = max(r.shape[2] for r in rows)
        out = np.zeros((len(rows), *rows[0].shape[1:2], longest, *rows[0].shape[3:]), rows[0].dtype)
        for i, r in enumerate(rows):
            if r.shape[0] != 1:
                raise ValueError(f"pack: {name} of user {i} has {r.shape[0]} rows, expected one user's [1, ...]")
            if r.shape[2]:
                out[i, :, longest - r.shape[2]:] = r[0]
        feeds[name] = out
    for v, (k, length) in plan.valid.items():
        feeds[v] = np.array([min(int(np.asarray(u[length]).reshape(-1)[0]), np.asarray(u[k]).shape[2])
                             for u in users], np.int64)
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
    one = ort.InferenceSession(original.SerializeToString(), session_options(), providers=["CPUExecutionProvider"])
    many = ort.InferenceSession(segmented.SerializeToString(), session_options(), providers=["CPUExecutionProvider"])
    names = [o.name for o in one.get_outputs()]
    kinds = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64}
    users = [{i.name: np.asarray(u[i.name]).astype(kinds.get(i.type, np.asarray(u[i.name]).dtype), copy=False)
              for i in one.get_inputs()} for u in users]
    want = [dict(zip(names, one.run(names, u))) for u in users]
    got = unpack(dict(zip(names, many.run(names, pack(plan, users)))),
                 [int(np.asarray(u[plan.per_candidate[0]]).shape[0]) for u in users])
    worst = max((float(np.abs(g[n].astype(np.float64) - w[n].astype(np.float64)).max(initial=0.0))
                 for g, w in zip(got, want) for n in names), default=0.0)
    if not worst <= atol:
        raise SegmentError(f"the packed scorer differs from one call per user by {worst:.3g} (> {atol})")
    return worst
