"""No broadcast: the candidate scorer must never copy the user's K/V per candidate.

A naive scorer expands the shared K/V to ``[C, H, L, dh]`` (``Expand``/``Tile``) and
concatenates the candidates' own K/V to it: memory O(C*L*d). Our scorer attends all
candidates' queries to the one shared K/V as a batch and merges with their own NS-to-NS
attention through the softmax statistics, so no such node exists. This pass proves it on
the graph: starting from each K/V input it follows layout-only ops (Transpose, Reshape,
Slice, Cast, Squeeze, Unsqueeze, Identity) and fails if it reaches an Expand, Tile or
Concat whose output carries the ``candidates`` dimension.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from onetrans_trt.errors import BuildError
from onetrans_trt.graphs import register
from onetrans_trt.graphs.split_kv import KV_NAME

LAYOUT_OPS = {"Transpose", "Reshape", "Slice", "Cast", "Squeeze", "Unsqueeze", "Identity", "Flatten"}
BROADCAST_OPS = {"Expand", "Tile", "Concat"}
CANDIDATE_DIM = "candidates"


def _has_candidate_dim(t: gs.Variable) -> bool | None:
    if t.shape is None:
        return None
    return any(isinstance(d, str) and CANDIDATE_DIM in d for d in t.shape)


def kv_broadcasts(graph: gs.Graph) -> list[str]:
    """Names of nodes that broadcast a K/V input along the candidate dimension."""
    found = []
    frontier = [t for t in graph.inputs if KV_NAME.match(t.name)]
    seen: set[int] = set()
    while frontier:
        t = frontier.pop()
        for node in t.outputs:
            if id(node) in seen:
                continue
            seen.add(id(node))
            if node.op in BROADCAST_OPS:
                if any(_has_candidate_dim(o) is not False for o in node.outputs):
                    found.append(f"{node.op} {node.name or '?'}")
                frontier.extend(node.outputs)  # a copy of K/V is still K/V
            elif node.op in LAYOUT_OPS:
                frontier.extend(node.outputs)
    return found


@register("no-broadcast")
def no_broadcast(graph: gs.Graph) -> gs.Graph:
    if not any(KV_NAME.match(t.name) for t in graph.inputs):
        return graph  # not a scorer graph: nothing to check
    bad = kv_broadcasts(graph)
    if bad:
        raise BuildError(f"no-broadcast: the candidate scorer copies the user's K/V per candidate "
                         f"({', '.join(bad[:3])}); attend the shared K/V as one batch instead")
    return graph
