"""Split at K/V: the two cut graphs compose to the serving graph, and the scorer holds
nothing of the S side."""

import numpy as np
import onnx_graphsurgeon as gs
import pytest

from onetrans_trt.errors import BuildError
from onetrans_trt.graphs.split_kv import candidate_scorer, user_encoder
from tests.helpers import ort_run


def test_cut_graphs_compose_to_the_serving_graph(serving_graphs):
    model, graph, hist, ns = serving_graphs["slice_first"]
    hist = {k: v[:1] for k, v in hist.items()}  # the serving graph scores for the first user
    before = ort_run(gs.export_onnx(graph), {**hist, **ns})  # logits, probs, K/V...
    ue, cs = user_encoder(graph), candidate_scorer(graph)
    kv = ort_run(gs.export_onnx(ue), hist)
    names = [t.name for t in ue.outputs]
    out = ort_run(gs.export_onnx(cs), {**ns, "s_length": hist["s_length"], **dict(zip(names, kv))})
    assert np.abs(out[0] - before[0]).max() <= 1e-6
    for a, b in zip(kv, before[2:]):
        assert np.array_equal(a, b)


def test_scorer_has_no_s_side_and_encoder_no_candidate_side(serving_graphs):
    _, graph, _, _ = serving_graphs["slice_first"]
    ue, cs = user_encoder(graph), candidate_scorer(graph)
    assert {i.name for i in ue.inputs} == {"s_type", "s_item_id", "s_category", "s_action", "s_length"}
    assert [o.name for o in ue.outputs] == [f"user_{kv}_{l}" for l in range(3) for kv in "kv"]
    cs_inputs = [i.name for i in cs.inputs]
    assert not [n for n in cs_inputs if n.startswith("s_") and n != "s_length"]
    assert [o.name for o in cs.outputs] == ["logits", "probs"]
    # the scorer's K/V inputs are one user's, with a named length per layer
    k0 = next(i for i in cs.inputs if i.name == "user_k_0")
    assert k0.shape[0] == 1 and k0.shape[2] == "kv_len_0"
    # no node of the scorer reads a tensor computed from history inputs
    s_inputs = {i.name for i in graph.inputs if i.name.startswith("s_") and i.name != "s_length"}
    for node in cs.nodes:
        assert not s_inputs & {t.name for t in node.inputs}


def test_split_needs_marked_kv(serving_graphs):
    _, graph, _, _ = serving_graphs["slice_first"]
    g = graph.copy()
    g.outputs = [o for o in g.outputs if o.name == "logits"]
    with pytest.raises(BuildError, match="user_k_"):
        user_encoder(g)
