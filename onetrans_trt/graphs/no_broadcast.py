"""No broadcast: the candidate scorer must never copy the user's K/V per candidate.

A naive scorer expands the shared K/V to ``[C, H, L, dh]`` (``Expand``/``Tile``) and
concatenates the candidates' own K/V to it: memory O(C*L*d). Our scorer attends all
candidates' queries to the one shared K/V as a batch and merges with their own NS-to-NS
attention through the softmax statistics, so no such node exists. This pass proves it on
the graph.

From each K/V input it walks once over the tensors that are still "the user's K/V": it
follows the ops that keep that true (:data:`KV_PRESERVING_OPS`: layout ops, casts and
quantize/dequantize, elementwise ops, and the broadcasts themselves, since a copy of K/V
is still K/V) through their data inputs, and stops at anything else (``MatMul``,
``Attention``, reductions: their outputs are scores, no longer K/V). It reports:

- an ``Expand``, ``Tile`` or ``Concat`` whose output carries the ``candidates``
  dimension, or whose output shape is unknown (it may);
- any other followed op whose output carries the ``candidates`` dimension while its K/V
  did not yet: an implicit broadcast (``K * gate[C, 1, 1, 1]``, ``Gather`` with one index
  per candidate).

A broadcast over another dimension (``[1, 1, L, dh]`` to ``[1, H, L, dh]`` for grouped
heads) is not reported: its size does not grow with the candidates. The ``candidates``
dimension is recognised by name in the graph's symbolic shapes (``candidates``,
``3*candidates``), as our exporter writes them.

:func:`kv_broadcasts` returns each offending node with its path from the K/V input, so
that a rewrite can replace what it finds.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_graphsurgeon as gs

from onetrans_trt.errors import BuildError
from onetrans_trt.graphs import register
from onetrans_trt.graphs.split_kv import KV_NAME

LAYOUT_OPS = {"Transpose", "Reshape", "Slice", "Squeeze", "Unsqueeze", "Identity", "Flatten", "Gather"}
CAST_OPS = {"Cast", "CastLike", "QuantizeLinear", "DequantizeLinear"}
ELEMENTWISE_OPS = {"Add", "Sub", "Mul", "Div", "Pow", "Neg", "Abs", "Sqrt", "Reciprocal", "Exp", "Log",
                   "Clip", "Min", "Max", "Where", "Relu", "Sigmoid", "Tanh", "Erf"}
BROADCAST_OPS = {"Expand", "Tile", "Concat"}
KV_PRESERVING_OPS = LAYOUT_OPS | CAST_OPS | ELEMENTWISE_OPS | BROADCAST_OPS
# Input slots that carry the data; the others are shapes, indices, scales or conditions.
# Ops not listed carry data in every input (Add, Concat, ...).
DATA_INPUTS = {"Reshape": (0,), "Slice": (0,), "Squeeze": (0,), "Unsqueeze": (0,), "Gather": (0,),
               "Expand": (0,), "Tile": (0,), "Clip": (0,), "CastLike": (0,), "QuantizeLinear": (0,),
               "DequantizeLinear": (0,), "Where": (1, 2)}
CANDIDATE_DIM = "candidates"


@dataclass(frozen=True)
class KVBroadcast:
    """A node that copies a K/V input per candidate, and how the K/V reaches it."""

    source: str  # the K/V graph input
    node: gs.Node
    path: tuple[gs.Node, ...]  # from the first node after ``source`` to ``node``, inclusive

    def __str__(self) -> str:
        route = " -> ".join([self.source, *(n.op for n in self.path)])
        return f"{self.node.op} {self.node.name or '?'} ({route})"


def _has_candidate_dim(t: gs.Variable) -> bool | None:
    """True/False from the symbolic shape; None when the shape is unknown."""
    if t.shape is None:
        return None
    return any(isinstance(d, str) and CANDIDATE_DIM in d for d in t.shape)


def _reads_as_data(node: gs.Node, t: gs.Variable) -> bool:
    slots = DATA_INPUTS.get(node.op, range(len(node.inputs)))
    return any(node.inputs[i] is t for i in slots if i < len(node.inputs))


def _copies_per_candidate(node: gs.Node, already: bool) -> bool:
    """Whether ``node`` (reached from K/V) makes a per-candidate copy of it."""
    outs = [_has_candidate_dim(o) for o in node.outputs]
    if node.op in BROADCAST_OPS:
        return any(c is not False for c in outs)
    return not already and any(c is True for c in outs)


def _walk(kv: gs.Variable) -> list[KVBroadcast]:
    found = []
    seen: set[int] = set()
    # (tensor still holding K/V, path to it, whether it is already a per-candidate copy)
    frontier: list[tuple[gs.Variable, tuple[gs.Node, ...], bool]] = [(kv, (), False)]
    while frontier:
        t, path, already = frontier.pop(0)  # breadth first: the shortest path is reported
        for node in t.outputs:
            if id(node) in seen or node.op not in KV_PRESERVING_OPS or not _reads_as_data(node, t):
                continue
            seen.add(id(node))
            here = (*path, node)
            copies = _copies_per_candidate(node, already)
            if copies:
                found.append(KVBroadcast(kv.name, node, here))
            frontier.extend((o, here, already or copies) for o in node.outputs)
    return found


def kv_broadcasts(graph: gs.Graph) -> list[KVBroadcast]:
    """The nodes that broadcast a K/V input along the candidate dimension (each once)."""
    found: dict[int, KVBroadcast] = {}
    for kv in graph.inputs:
        if KV_NAME.match(kv.name):
            for hit in _walk(kv):
                found.setdefault(id(hit.node), hit)
    return list(found.values())


@register("no-broadcast")
def no_broadcast(graph: gs.Graph) -> gs.Graph:
    if not any(KV_NAME.match(t.name) for t in graph.inputs):
        return graph  # not a scorer graph: nothing to check
    bad = kv_broadcasts(graph)
    if bad:
        raise BuildError(f"no-broadcast: the candidate scorer copies the user's K/V per candidate "
                         f"({'; '.join(str(b) for b in bad[:3])}); attend the shared K/V as one batch instead")
    return graph
