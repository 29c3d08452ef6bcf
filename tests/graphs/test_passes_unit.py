"""The pass registry, run_passes and the cleanup pass on small hand-made graphs (milliseconds)."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
import pytest

from onetrans_trt.errors import InputError
from onetrans_trt.graphs import PASSES, available_passes, register, run_passes
from onetrans_trt.graphs.cleanup import cleanup
from tests.mutation_kills.onnx_kit import BOOL, F32, I64, G, ops, run

ALL = {"cleanup", "fuse-attention", "no-broadcast", "pyramid", "shared-prefix"}


def test_available_passes_lists_every_pass_module():
    names = available_passes()
    assert isinstance(names, list) and set(names) == ALL and len(names) == len(set(names))
    assert all(PASSES[n].pass_name == n for n in names)


@pytest.fixture
def scratch_passes():
    before = dict(PASSES)
    yield
    PASSES.clear()
    PASSES.update(before)


def _tiny() -> gs.Graph:
    g = G()
    x = g.input("x", [2, 3])
    g.op("Relu", x, out="y", shape=[2, 3])
    g.output("y", [2, 3])
    return g.gs()


def test_register_records_the_pass_under_its_name(scratch_passes):
    def grow(graph):
        return graph

    got = register("unit-grow")(grow)
    assert got is grow and PASSES["unit-grow"] is grow and grow.pass_name == "unit-grow"


def test_run_passes_applies_in_order_and_records_counts(scratch_passes):
    calls = []

    def add_neg(graph):
        calls.append("neg")
        y = graph.outputs[0]
        z = gs.Variable("z", dtype=np.float32, shape=y.shape)
        graph.nodes.append(gs.Node("Neg", inputs=[y], outputs=[z]))
        graph.outputs = [z]
        return graph

    def mark(graph):
        calls.append("mark")
        new = graph.copy()
        new.__dict__["fused_attention"] = 7
        return new

    register("unit-neg")(add_neg)
    register("unit-mark")(mark)
    graph, recs = run_passes(_tiny(), ["unit-neg", "unit-mark"], graph_name="scorer")
    assert calls == ["neg", "mark"]
    assert recs == [{"pass": "unit-neg", "graph": "scorer", "nodes_before": 1, "nodes_after": 2},
                    {"pass": "unit-mark", "graph": "scorer", "nodes_before": 2, "nodes_after": 2, "fused": 7}]
    assert ops(graph) == ["Relu", "Neg"]
    _, recs = run_passes(_tiny(), ["unit-neg"])
    assert recs[0]["graph"] == "graph"
    _, recs = run_passes(_tiny(), [])
    assert recs == []


def test_run_passes_refuses_an_unknown_pass_naming_the_known_ones(scratch_passes):
    with pytest.raises(InputError) as e:
        run_passes(_tiny(), ["cleanup", "no-such-pass"])
    msg = str(e.value)
    assert msg.startswith("unknown graph pass 'no-such-pass'; available: ")
    assert set(msg.split("available: ")[1].split(", ")) == ALL


# ------------------------------------------------------------------------- cleanup

def _cleanup_graph() -> G:
    g = G()
    x = g.input("x", ["batch", 4])
    g.input("unused", ["batch", 2])
    c = g.op("Add", g.const(np.full(4, 0.5)), g.const(np.full(4, 1.5)))  # folds to a constant
    t = g.op("Mul", x, c, shape=["batch", 4])
    g.op("Relu", x, out="dead", shape=["batch", 4])  # nothing reads it
    g.op("Identity", t, out="logits", shape=["batch", 4])
    g.op("Sigmoid", t, out="probs", shape=["batch", 4])
    g.op("Less", t, g.const(0.0), out="neg", shape=["batch", 4], dtype=BOOL)
    g.output("logits", ["batch", 4])
    g.output("probs", ["batch", 4])
    g.output("neg", ["batch", 4], BOOL)
    return g


def test_cleanup_keeps_every_output_and_input_and_folds_the_rest():
    g = _cleanup_graph()
    before = g.gs()
    out = cleanup(before)
    assert [(t.name, t.shape, np.dtype(t.dtype)) for t in out.outputs] == [
        ("logits", ["batch", 4], np.float32), ("probs", ["batch", 4], np.float32), ("neg", ["batch", 4], np.bool_)]
    assert [(t.name, t.shape) for t in out.inputs] == [("x", ["batch", 4])]  # onnxslim drops unused inputs
    assert "Relu" not in ops(out) and "Add" not in ops(out)
    rng = np.random.default_rng(3)
    feeds = {"x": rng.standard_normal((5, 4)).astype(np.float32), "unused": np.zeros((5, 2), np.float32)}
    want, got = run(g.model(), feeds), run(out, feeds)
    assert len(want) == len(got) == 3
    for w, o in zip(want, got):
        assert w.dtype == o.dtype and w.shape == o.shape
        np.testing.assert_array_equal(w, o)


def test_cleanup_result_is_toposorted():
    out = cleanup(_cleanup_graph().gs())
    seen = {t.name for t in out.inputs} | {n for n, t in out.tensors().items() if isinstance(t, gs.Constant)}
    for node in out.nodes:
        assert all(i.name in seen or isinstance(i, gs.Constant) for i in node.inputs), node.name
        seen |= {o.name for o in node.outputs}


def test_cleanup_keeps_a_shape_onnxslim_infers_for_an_undeclared_output():
    g = G()
    x = g.input("x", ["batch", 4])
    g.op("Relu", x, out="y")
    g.output("y", None)  # declared without a shape
    out = cleanup(g.gs())
    assert out.outputs[0].name == "y" and out.outputs[0].shape == ["batch", 4]
