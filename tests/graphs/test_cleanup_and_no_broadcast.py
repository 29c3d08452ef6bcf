import numpy as np
import onnx_graphsurgeon as gs
import pytest

from onetrans_trt.errors import BuildError
from onetrans_trt.graphs import run_passes
from onetrans_trt.graphs.cleanup import cleanup
from onetrans_trt.graphs.no_broadcast import kv_broadcasts, no_broadcast
from onetrans_trt.graphs.split_kv import candidate_scorer
from tests.helpers import ort_run


def _scorer_feeds(model, hist, ns, graph):
    from onetrans_trt.graphs.split_kv import user_encoder

    hist1 = {k: v[:1] for k, v in hist.items()}
    ue = user_encoder(graph)
    kv = ort_run(gs.export_onnx(ue), hist1)
    return {**ns, "s_length": hist1["s_length"], **dict(zip([t.name for t in ue.outputs], kv))}


def test_cleanup_keeps_outputs(serving_graphs):
    model, graph, hist, ns = serving_graphs["slice_first"]
    cs = candidate_scorer(graph)
    feeds = _scorer_feeds(model, hist, ns, graph)
    before = ort_run(gs.export_onnx(cs), feeds)
    after_g = cleanup(cs)
    after = ort_run(gs.export_onnx(after_g), feeds)
    assert len(after_g.nodes) <= len(cs.nodes)
    for a, b in zip(before, after):
        assert np.abs(a - b).max() <= 1e-6
    assert [i.name for i in after_g.inputs] == [i.name for i in cs.inputs]


def test_our_scorer_never_broadcasts_kv(serving_graphs):
    _, graph, _, _ = serving_graphs["slice_first"]
    cs = candidate_scorer(graph)
    assert kv_broadcasts(cs) == []
    g, rec = run_passes(cs, ["no-broadcast"], graph_name="candidate_scorer")
    assert rec[0]["nodes_before"] == rec[0]["nodes_after"]


def test_a_naive_broadcasting_scorer_is_caught():
    """K [1,H,L,dh] expanded to [C,H,L,dh] and concatenated with the candidates' own K."""
    k = gs.Variable("user_k_0", dtype=np.float32, shape=[1, 2, "kv_len_0", 4])
    own = gs.Variable("own_k", dtype=np.float32, shape=["candidates", 2, 3, 4])
    shape = gs.Variable("shape", dtype=np.int64, shape=[4])
    big = gs.Variable("k_big", dtype=np.float32, shape=["candidates", 2, "kv_len_0", 4])
    cat = gs.Variable("k_all", dtype=np.float32, shape=["candidates", 2, "kv_len_0 + 3", 4])
    nodes = [
        gs.Node("Shape", inputs=[own], outputs=[shape]),
        gs.Node("Expand", inputs=[k, shape], outputs=[big]),
        gs.Node("Concat", attrs={"axis": 2}, inputs=[big, own], outputs=[cat]),
    ]
    g = gs.Graph(nodes=nodes, inputs=[own, k], outputs=[cat], opset=18)
    assert len(kv_broadcasts(g)) == 2
    with pytest.raises(BuildError, match="copies the user's K/V per candidate"):
        no_broadcast(g)
