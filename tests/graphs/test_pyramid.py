"""Pyramid truncation: a compute-then-slice user encoder becomes as lean as slice-first,
with identical outputs."""

import numpy as np
import onnx_graphsurgeon as gs

from onetrans_trt.graphs.flops import graph_flops
from onetrans_trt.graphs.pyramid import pyramid
from onetrans_trt.graphs.split_kv import user_encoder
from tests.helpers import ort_run

DIMS = {"users": 2, "history": 12}


def _feeds(hist):
    return {**hist, "s_length": np.array([12, 3], dtype=np.int64)}


def test_compute_then_slice_becomes_as_lean_as_slice_first(serving_graphs):
    _, g_cts, hist, _ = serving_graphs["compute_then_slice"]
    _, g_sf, _, _ = serving_graphs["slice_first"]
    ue_cts, ue_sf = user_encoder(g_cts), user_encoder(g_sf)
    feeds = _feeds(hist)
    before = ort_run(gs.export_onnx(ue_cts), feeds)
    after_graph = pyramid(ue_cts)
    after = ort_run(gs.export_onnx(after_graph), feeds)
    for a, b in zip(before, after):
        assert np.array_equal(a, b)
    # same weights and same math as the slice-first model (both randomized with seed 1)
    for a, b in zip(after, ort_run(gs.export_onnx(ue_sf), feeds)):
        assert np.abs(a - b).max() <= 1e-5
    f_before = graph_flops(gs.export_onnx(ue_cts), DIMS)["flops"]
    f_after = graph_flops(gs.export_onnx(after_graph), DIMS)["flops"]
    f_sf = graph_flops(gs.export_onnx(ue_sf), DIMS)["flops"]
    assert f_after == f_sf < f_before


def test_slice_first_is_left_unchanged(serving_graphs):
    _, g_sf, hist, _ = serving_graphs["slice_first"]
    ue = user_encoder(g_sf)
    after = pyramid(ue)
    assert graph_flops(gs.export_onnx(after), DIMS) == graph_flops(gs.export_onnx(ue), DIMS)
    for a, b in zip(ort_run(gs.export_onnx(ue), _feeds(hist)), ort_run(gs.export_onnx(after), _feeds(hist))):
        assert np.array_equal(a, b)


def test_slice_stops_where_the_full_tensor_is_needed():
    """x feeds both a full consumer and a tail slice: the slice must not move above x."""
    x = gs.Variable("x", dtype=np.float32, shape=["b", "n", 4])
    y = gs.Variable("y", dtype=np.float32, shape=["b", "n", 4])
    full = gs.Variable("full", dtype=np.float32, shape=["b", "n", 4])
    tail = gs.Variable("tail", dtype=np.float32, shape=["b", "q", 4])
    c = lambda n, v: gs.Constant(n, np.array([v], dtype=np.int64))  # noqa: E731
    nodes = [
        gs.Node("Relu", inputs=[x], outputs=[y]),
        gs.Node("Neg", inputs=[y], outputs=[full]),
        gs.Node("Sigmoid", inputs=[y], outputs=[gs.Variable("s", dtype=np.float32, shape=["b", "n", 4])]),
    ]
    sig = nodes[2].outputs[0]
    nodes.append(gs.Node("Slice", inputs=[sig, c("st", -2), c("en", 2**62), c("ax", 1)], outputs=[tail]))
    g = gs.Graph(nodes=nodes, inputs=[x], outputs=[full, tail], opset=18)
    feeds = {"x": np.random.default_rng(0).normal(size=(2, 5, 4)).astype(np.float32)}
    before = ort_run(gs.export_onnx(g), feeds)
    after_g = pyramid(g)
    after = ort_run(gs.export_onnx(after_g), feeds)
    for a, b in zip(before, after):
        assert np.array_equal(a, b)
    ops = [n.op for n in after_g.nodes]
    # the sigmoid now runs on the tail only; y is still computed once, in full
    assert ops.count("Relu") == 1 and ops.count("Sigmoid") == 1
    sig_node = next(n for n in after_g.nodes if n.op == "Sigmoid")
    assert sig_node.inputs[0].inputs[0].op == "Slice"
