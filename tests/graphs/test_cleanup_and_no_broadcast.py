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


def _ort_outputs(graph: gs.Graph, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run ``graph`` with ONNX Runtime: every output, by the name ORT gives it."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(gs.export_onnx(graph).SerializeToString(), sess_options=opts,
                                providers=["CPUExecutionProvider"])
    values = sess.run(None, {i.name: feeds[i.name] for i in sess.get_inputs()})
    names = [o.name for o in sess.get_outputs()]
    assert len(names) == len(values)
    return {n: values[i] for i, n in enumerate(names)}


def _io(tensors) -> list[tuple]:
    return [(t.name, None if t.shape is None else list(t.shape), np.dtype(t.dtype)) for t in tensors]


@pytest.mark.parametrize("impl", ["slice_first", "compute_then_slice"])
def test_cleanup_keeps_outputs(serving_graphs, impl):
    """Same inputs and outputs (names, symbolic shapes, dtypes) and the same values."""
    model, graph, hist, ns = serving_graphs[impl]
    cs = candidate_scorer(graph)
    assert [o.name for o in cs.outputs] == ["logits", "probs"]
    feeds = _scorer_feeds(model, hist, ns, graph)
    want_inputs, want_outputs = _io(cs.inputs), _io(cs.outputs)
    before = _ort_outputs(cs, feeds)
    after_g = cleanup(cs)
    assert len(after_g.nodes) <= len(cs.nodes)
    assert _io(after_g.inputs) == want_inputs
    assert _io(after_g.outputs) == want_outputs
    after = _ort_outputs(after_g, feeds)
    assert list(before) == list(after) == ["logits", "probs"]
    for name, b in before.items():
        a = after[name]
        assert (a.shape, a.dtype) == (b.shape, b.dtype), name
        assert a.shape[0] == len(feeds["ns_item_id"]), name  # one row per candidate
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("impl", ["slice_first", "compute_then_slice"])
def test_our_scorer_never_broadcasts_kv(serving_graphs, impl):
    _, graph, _, _ = serving_graphs[impl]
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
