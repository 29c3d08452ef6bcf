"""Split at K/V: cut the serving graph into the user encoder and the candidate scorer.

The serving graph (``export/serving.py``) computes the user side and the candidate side
in one graph and marks each layer's S-token K and V by naming them as graph outputs
``user_k_<l>`` / ``user_v_<l>``. This pass cuts there:

- :func:`user_encoder`: the graph whose outputs are the K/V; everything only the
  candidates need (NS inputs, scorer, heads) is dead and removed.
- :func:`candidate_scorer`: each K/V tensor is disconnected from its producer and becomes
  a graph input (shape ``[1, H, kv_len_<l>, dh]``: one user's K/V); the S side is then
  dead and removed, so nothing of it is left in the scorer. ``s_length`` stays an input
  (``[1]``): the scorer masks the left padding of the K/V with it.
"""

from __future__ import annotations

import re

import onnx_graphsurgeon as gs

from onetrans_trt.errors import BuildError

KV_NAME = re.compile(r"^user_([kv])_(\d+)$")
STATE_NAME = re.compile(r"^user_\w+$")  # K/V and any further user state (HyFormer: user_seq_*)
SCORER_OUTPUTS = ("logits", "probs")
HISTORY_NAME = re.compile(r"^s\d*_")  # the merged stream s_*, or sequence j's own s<j>_* (HyFormer)


def kv_layer(name: str) -> int | None:
    m = KV_NAME.match(name)
    return int(m.group(2)) if m else None


def _kv_outputs(graph: gs.Graph) -> list[gs.Variable]:
    """The user state the graph is cut at: K/V first, then any other ``user_*`` outputs."""
    if not any(KV_NAME.match(t.name) for t in graph.outputs):
        raise BuildError("split at K/V: the graph has no user_k_<l>/user_v_<l> outputs to cut at; "
                         "export it with onetrans-trt export")
    return [t for t in graph.outputs if STATE_NAME.match(t.name)]


def _rename_kv_dims(t: gs.Variable, lead) -> None:
    if t.shape is None:
        return
    if KV_NAME.match(t.name) and len(t.shape) == 4:
        t.shape = [lead, t.shape[1], f"kv_len_{kv_layer(t.name)}", t.shape[3]]
    elif len(t.shape) >= 1:
        t.shape = [lead, *t.shape[1:]]


def user_encoder(graph: gs.Graph) -> gs.Graph:
    g = graph.copy()
    g.outputs = _kv_outputs(g)
    for t in g.outputs:
        _rename_kv_dims(t, "users")
    g.cleanup(remove_unused_graph_inputs=True).toposort()
    left = [i.name for i in g.inputs if i.name.startswith("ns_")]
    if left:
        raise BuildError(f"split at K/V: the user encoder still reads candidate inputs {left}")
    return g


def candidate_scorer(graph: gs.Graph) -> gs.Graph:
    g = graph.copy()
    kv = _kv_outputs(g)
    outs = [t for t in g.outputs if t.name in SCORER_OUTPUTS]
    for t in kv:
        t.inputs.clear()  # the producer (the user side) no longer feeds it
        _rename_kv_dims(t, 1)
    length = next((i for i in g.inputs if i.name == "s_length"), None)
    if length is not None:
        length.shape = [1]
    history = [i.name for i in g.inputs if HISTORY_NAME.match(i.name) and i.name != "s_length"]
    g.inputs = [i for i in g.inputs if i.name.startswith("ns_")] + ([length] if length is not None else []) + kv
    g.outputs = outs
    g.cleanup(remove_unused_graph_inputs=True).toposort()
    tensors = g.tensors()  # a history input still read after the cut is left dangling: refuse it
    s_side = [n for n in history if n in tensors and tensors[n].outputs]
    if s_side:
        raise BuildError(f"split at K/V: the candidate scorer still reads history inputs {s_side}")
    return g
