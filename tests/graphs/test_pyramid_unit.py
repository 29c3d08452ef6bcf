"""pyramid on small hand-made graphs: where each tail slice ends up (which tensors are sliced),
what it may not cross, and that the graph computes the same values after."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
import pytest
from onnx import helper

from onetrans_trt.graphs.pyramid import pyramid
from tests.mutation_kills.onnx_kit import F32, I64, G, ops, run

T, D, KEEP = 6, 4, 2
MAX = np.iinfo(np.int64).max


def _w(g: G, rng, *shape, name=None):
    return g.const(rng.standard_normal(shape), name=name)


def _tail(g: G, x: str, out: str, shape, axis=1, start=-KEEP, end=MAX, steps=None, name="tail"):
    ins = [x, g.const([start], np.int64), g.const([end], np.int64), g.const([axis], np.int64)]
    if steps is not None:
        ins.append(g.const([steps], np.int64))
    return g.op("Slice", *ins, out=out, shape=shape, name=name)


def _layer(constant_nodes=False) -> G:
    """One attention + FFN layer over T tokens, computed in full, then the last KEEP tokens."""
    rng = np.random.default_rng(0)
    g = G()
    x = g.input("x", ["b", T, D])
    n = g.op("LayerNormalization", x, _w(g, rng, D), _w(g, rng, D), axis=-1, out="n", shape=["b", T, D])
    heads = {}
    for w in "qkv":
        p = g.op("MatMul", n, _w(g, rng, D, D), out=w, shape=["b", T, D])
        r = g.op("Reshape", p, g.const([0, T, 2, 2], np.int64), out=f"{w}_split", shape=["b", T, 2, 2])
        heads[w] = g.op("Transpose", r, perm=[0, 2, 1, 3], out=f"{w}_h", shape=["b", 2, T, 2])
    kt = g.op("Transpose", heads["k"], perm=[0, 1, 3, 2], out="kt", shape=["b", 2, 2, T])
    s = g.op("MatMul", heads["q"], kt, out="qk", shape=["b", 2, T, T])
    scale = g.op("Constant", value_float=0.7) if constant_nodes else g.const(0.7)
    s = g.op("Mul", s, scale, out="scaled", shape=["b", 2, T, T])
    mask = np.triu(np.full((T, T), -1e9, np.float32), 1)
    s = g.op("Add", s, g.const(mask, name="mask"), out="masked", shape=["b", 2, T, T])
    p = g.op("Softmax", s, axis=-1, out="p", shape=["b", 2, T, T])
    o = g.op("MatMul", p, heads["v"], out="o", shape=["b", 2, T, 2])
    o = g.op("Transpose", o, perm=[0, 2, 1, 3], out="o_t", shape=["b", T, 2, 2])
    o = g.op("Reshape", o, g.const([0, T, D], np.int64), out="o_merged", shape=["b", T, D])
    y = g.op("Add", x, g.op("MatMul", o, _w(g, rng, D, D), out="attn", shape=["b", T, D]), out="y", shape=["b", T, D])
    h = g.op("Relu", g.op("MatMul", y, _w(g, rng, D, 8), out="up", shape=["b", T, 8]), out="act", shape=["b", T, 8])
    z = g.op("Add", y, g.op("MatMul", h, _w(g, rng, 8, D), out="down", shape=["b", T, D]), out="z", shape=["b", T, D])
    _tail(g, z, "out", ["b", KEEP, D])
    g.output("out", ["b", KEEP, D])
    return g


def _sliced(graph: gs.Graph) -> set[str]:
    """Names of the float tensors the graph's Slices read (the originals, for the pass's new
    slices; the int64 slices of reshape targets are left out)."""
    return {n.inputs[0].name for n in graph.nodes if n.op == "Slice" and np.dtype(n.inputs[0].dtype) != np.int64}


def _same(g: G, after: gs.Graph, feeds: dict) -> None:
    want, got = run(g.model(), feeds), run(after, feeds)
    assert [w.shape for w in want] == [o.shape for o in got]
    for w, o in zip(want, got):
        np.testing.assert_allclose(o, w, rtol=1e-5, atol=1e-5)


def _x(b=2, t=T, d=D, seed=1):
    return {"x": np.random.default_rng(seed).standard_normal((b, t, d)).astype(np.float32)}


@pytest.mark.parametrize("constant_nodes", [False, True])
def test_a_layer_computes_queries_only_for_the_kept_tokens(constant_nodes):
    g = _layer(constant_nodes)
    before = g.gs()
    after = pyramid(before)
    if constant_nodes:  # a scale from a Constant node has no known shape: the slice stops after the scores
        assert _sliced(after) == {"scaled", "x", "mask"}
        _same(g, after, _x())
        return
    # the slice stops at the normalized input (K and V need every token), the residual input and the mask
    assert _sliced(after) == {"n", "x", "mask"}
    assert len(before.nodes) == len(g.nodes)  # the graph given is not changed
    assert _sliced(before) == {"z"}
    q_mm = [nd for nd in after.nodes if nd.op == "MatMul" and nd.inputs[0].name.startswith("n__tail")]
    assert len(q_mm) == 1  # the query projection reads the kept tokens; K and V read n in full
    assert sum(1 for nd in after.nodes if nd.op == "MatMul" and nd.inputs[0].name == "n") == 2
    # every S-token op after the K/V projections runs on KEEP tokens: no [.., T, T] scores any more
    for nd in after.nodes:
        if nd.op in ("Softmax", "Add", "Mul", "Relu"):
            shape = nd.outputs[0].shape
            assert shape[len(shape) - 2] == KEEP, (nd.name, shape)  # the token (query) axis
    _same(g, after, _x())
    _same(g, after, _x(b=1, seed=2))


def _chain(build, out_shape, **tail) -> G:
    g = G()
    x = g.input("x", ["b", T, D])
    y = build(g, x)
    _tail(g, y, "out", out_shape, **tail)
    g.output("out", out_shape)
    return g


def _check(g: G, sliced: set[str], feeds=None) -> gs.Graph:
    after = pyramid(g.gs())
    assert _sliced(after) == sliced
    _same(g, after, feeds or _x())
    return after


def test_norms_and_softmax_over_other_axes_and_clip():
    def build(g, x):
        r = g.op("Relu", x, out="r", shape=["b", T, D])
        c = g.op("Clip", r, g.const(0.1), g.const(0.9), out="c", shape=["b", T, D])
        ln = g.op("LayerNormalization", c, g.const(np.ones(D)), g.const(np.zeros(D)), axis=2, out="ln",
                  shape=["b", T, D])
        return g.op("Softmax", ln, axis=-1, out="sm", shape=["b", T, D])

    _check(_chain(build, ["b", KEEP, D]), {"x"})


def test_softmax_over_the_sliced_axis_stops_the_slice():
    def build(g, x):
        r = g.op("Relu", x, out="r", shape=["b", T, D])
        return g.op("Softmax", r, axis=1, out="sm", shape=["b", T, D])

    _check(_chain(build, ["b", KEEP, D]), {"sm"})


def test_norm_over_the_sliced_axis_stops_the_slice():
    def build(g, x):
        r = g.op("Relu", x, out="r", shape=["b", T, D])
        return g.op("LayerNormalization", r, g.const(np.ones((T, D))), axis=1, out="ln", shape=["b", T, D])

    _check(_chain(build, ["b", KEEP, D]), {"ln"})


def test_matmul_columns_are_not_sliced_and_batch_axes_are():
    rng = np.random.default_rng(0)

    def cols(g, x):
        return g.op("MatMul", g.op("Relu", x, out="r", shape=["b", T, D]), _w(g, rng, D, T), out="mm", shape=["b", T, T])

    _check(_chain(cols, ["b", T, KEEP], axis=2), {"mm"})

    def batch(g, x):  # slice axis 0 of a batched product: both operands (the weight broadcasts: kept)
        a = g.op("Relu", x, out="r", shape=["b", T, D])
        return g.op("MatMul", a, _w(g, rng, 1, D, 3), out="mm", shape=["b", T, 3])

    _check(_chain(batch, [1, T, 3], axis=0, start=0, end=1), {"x"}, _x(b=3))

    def batch_both(g, x):
        a = g.op("Relu", x, out="r", shape=[3, T, D])
        bb = g.op("Transpose", g.op("Neg", x, out="nx", shape=[3, T, D]), perm=[0, 2, 1], out="bt", shape=[3, D, T])
        return g.op("MatMul", a, bb, out="mm", shape=[3, T, T])

    g = _chain(batch_both, [1, T, T], axis=0, start=1, end=2)
    after = pyramid(g.gs())
    _same(g, after, _x(b=3))
    assert "mm" not in _sliced(after) and "r" not in _sliced(after)


def test_unsqueeze_and_transpose_move_the_axis():
    def build(g, x):
        u = g.op("Unsqueeze", g.op("Relu", x, out="r", shape=["b", T, D]), g.const([0], np.int64), out="u",
                 shape=[1, "b", T, D])
        return g.op("Transpose", u, perm=[0, 3, 2, 1], out="t", shape=[1, D, T, "b"])

    _check(_chain(build, [1, D, KEEP, "b"], axis=2), {"x"})


def test_unsqueeze_on_the_sliced_axis_and_a_transpose_without_perm_stop():
    def unsq(g, x):
        return g.op("Unsqueeze", g.op("Relu", x, out="r", shape=["b", T, D]), g.const([-1], np.int64), out="u",
                    shape=["b", T, D, 1])

    _check(_chain(unsq, ["b", T, D, 1], axis=3, start=0, end=1), {"u"})
    _check(_chain(unsq, ["b", KEEP, D, 1], axis=-3), {"x"})

    def tr(g, x):
        return g.op("Transpose", g.op("Relu", x, out="r", shape=["b", T, D]), out="t", shape=[D, T, "b"])

    _check(_chain(tr, [D, KEEP, "b"]), {"t"})


def test_a_reshape_that_mixes_the_sliced_axis_stops():
    def mix(g, x):
        return g.op("Reshape", g.op("Relu", x, out="r", shape=["b", T, D]), g.const([0, T * D], np.int64), out="flat",
                    shape=["b", T * D])

    _check(_chain(mix, ["b", KEEP * D], start=-KEEP * D), {"flat"})

    def split(g, x):  # head split keeps [b, T]: the slice passes, with a new target shape
        return g.op("Reshape", g.op("Relu", x, out="r", shape=["b", T, D]), g.const([0, T, 2, 2], np.int64),
                    out="heads", shape=["b", T, 2, 2])

    after = _check(_chain(split, ["b", KEEP, 2, 2]), {"x"})
    assert {"Shape", "Concat"} <= set(ops(after))

    def unknown(g, x):  # the reshape's output dims are not known
        return g.op("Reshape", g.op("Relu", x, out="r", shape=["b", T, D]), g.const([0, T, 2, 2], np.int64),
                    out="heads")

    _check(_chain(unknown, ["b", KEEP, 2, 2]), {"heads"})


def test_tensors_needed_in_full_elsewhere_stay_whole():
    def shared(g, x):
        r = g.op("Relu", x, out="r", shape=["b", T, D])
        g.op("Neg", r, out="also", shape=["b", T, D])
        g.output("also", ["b", T, D])  # r is needed in full by another output
        return g.op("Sigmoid", r, out="s", shape=["b", T, D])

    _check(_chain(shared, ["b", KEEP, D]), {"r"})

    def output(g, x):
        r = g.op("Relu", x, out="r", shape=["b", T, D])
        g.output("r", ["b", T, D])
        return r

    _check(_chain(output, ["b", KEEP, D]), {"r"})


def test_slices_that_are_not_plain_tails_stay():
    def relu(g, x):
        return g.op("Relu", x, out="r", shape=["b", T, D])

    _check(_chain(relu, ["b", 3, D], start=0, end=T, steps=2), {"r"})  # step 2
    after = _check(_chain(relu, ["b", KEEP, D], steps=1), {"x"})  # step 1 given
    assert ops(after).count("Slice") == 1

    g = G()  # bounds that are not constants
    x = g.input("x", ["b", T, D])
    st = g.input("start", [1], I64)
    r = g.op("Relu", x, out="r", shape=["b", T, D])
    g.op("Slice", r, st, g.const([MAX], np.int64), g.const([1], np.int64), out="out", shape=["b", "k", D])
    g.output("out", ["b", "k", D])
    after = pyramid(g.gs())
    assert _sliced(after) == {"r"}
    feeds = {**_x(), "start": np.array([-3], np.int64)}
    _same(g, after, feeds)

    g = G()  # two axes at once
    x = g.input("x", ["b", T, D])
    r = g.op("Relu", x, out="r", shape=["b", T, D])
    g.op("Slice", r, g.const([-2, 1], np.int64), g.const([MAX, 3], np.int64), g.const([1, 2], np.int64), out="out",
         shape=["b", 2, 2])
    g.output("out", ["b", 2, 2])
    after = pyramid(g.gs())
    assert _sliced(after) == {"r"}
    _same(g, after, _x())

    g = G()  # no shape known on the sliced tensor
    x = g.input("x", ["b", T, D])
    r = g.op("Relu", x, out="r")
    _tail(g, r, "out", ["b", KEEP, D])
    g.output("out", ["b", KEEP, D])
    assert _sliced(pyramid(g.gs())) == {"r"}


def test_an_elementwise_input_of_unknown_shape_stops_the_slice_and_broadcast_inputs_are_kept():
    g = G()
    x = g.input("x", ["b", T, D])
    y = g.input("y", None)
    gate = g.input("gate", ["b", 1, D])
    a = g.op("Add", x, y, out="a", shape=["b", T, D])
    m = g.op("Mul", a, gate, out="m", shape=["b", T, D])
    _tail(g, m, "out", ["b", KEEP, D])
    g.output("out", ["b", KEEP, D])
    after = pyramid(g.gs())
    assert _sliced(after) == {"a"}  # pushed past Mul (gate broadcasts: kept whole), stopped at Add
    rng = np.random.default_rng(0)
    feeds = {**_x(), "y": rng.standard_normal((2, T, D)).astype(np.float32),
             "gate": rng.standard_normal((2, 1, D)).astype(np.float32)}
    _same(g, after, feeds)


def test_a_node_with_two_outputs_is_not_crossed():
    g = G()
    x = g.input("x", ["b", T, D])
    g.nodes.append(helper.make_node("Split", [x, g.const([2, 2], np.int64)], ["s0", "s1"], axis=2, name="split"))
    g.infos.append(helper.make_tensor_value_info("s0", F32, ["b", T, 2]))
    _tail(g, "s0", "out", ["b", KEEP, 2])
    g.op("Relu", "s1", out="other", shape=["b", T, 2])
    g.output("out", ["b", KEEP, 2])
    g.output("other", ["b", T, 2])
    after = pyramid(g.gs())
    assert _sliced(after) == {"s0"}
    _same(g, after, _x())


def test_the_same_slice_of_a_tensor_is_made_once():
    def build(g, x):
        r = g.op("Relu", x, out="r", shape=["b", T, D])
        return g.op("Mul", r, r, out="sq", shape=["b", T, D])

    after = _check(_chain(build, ["b", KEEP, D]), {"x"})
    assert ops(after).count("Slice") == 1


def test_a_graph_without_slices_is_unchanged():
    g = G()
    g.op("Relu", g.input("x", ["b", T, D]), out="out", shape=["b", T, D])
    g.output("out", ["b", T, D])
    after = pyramid(g.gs())
    assert ops(after) == ["Relu"]
    _same(g, after, _x())


def _relu(g, x, shape=("b", T, D)):
    return g.op("Relu", x, out="r", shape=list(shape) if shape is not None else None)


def test_slice_bounds_from_constant_nodes_are_read():
    g = G()
    x = g.input("x", ["b", T, D])
    r = _relu(g, x)
    c = lambda v: g.op("Constant", value=helper.make_tensor("v", 7, [1], [v]))  # noqa: E731
    g.op("Slice", r, c(-KEEP), c(MAX), c(1), out="out", shape=["b", KEEP, D])
    g.output("out", ["b", KEEP, D])
    _check(g, {"x"})


def test_slices_without_axes_or_with_computed_ends_stay():
    g = G()
    x = g.input("x", ["b", T, D])
    r = _relu(g, x)
    g.op("Slice", r, g.const([0], np.int64), g.const([1], np.int64), out="out", shape=[1, T, D])  # no axes input
    g.output("out", [1, T, D])
    _check(g, {"r"})
    g = G()
    x = g.input("x", ["b", T, D])
    end = g.input("end", [1], I64)
    r = _relu(g, x)
    g.op("Slice", r, g.const([-2], np.int64), end, g.const([1], np.int64), out="out", shape=["b", "k", D])
    g.output("out", ["b", "k", D])
    after = pyramid(g.gs())
    assert _sliced(after) == {"r"}
    _same(g, after, {**_x(), "end": np.array([MAX], np.int64)})


def test_a_per_token_constant_is_sliced_with_the_tokens():
    g = G()
    x = g.input("x", ["b", T])
    pos = g.const(np.arange(T, dtype=np.float32) * 0.5, name="pos")
    a = g.op("Add", x, pos, out="a", shape=["b", T])
    _tail(g, g.op("Relu", a, out="r", shape=["b", T]), "out", ["b", KEEP])
    g.output("out", ["b", KEEP])
    after = pyramid(g.gs())
    assert _sliced(after) == {"x", "pos"}
    _same(g, after, {"x": np.random.default_rng(0).standard_normal((2, T)).astype(np.float32)})


def test_a_reshape_of_a_graph_input():
    g = _chain(lambda g, x: g.op("Reshape", x, g.const([0, T, 2, 2], np.int64), out="heads", shape=["b", T, 2, 2]),
               ["b", KEEP, 2, 2])
    _check(g, {"x"})


def test_reshape_dims_that_are_not_known():
    def later_unknown(g, x):  # a dim after the sliced axis unknown: fine
        return g.op("Reshape", _relu(g, x), g.const([0, T, 2, 2], np.int64), out="heads", shape=["b", T, None, 2])

    _check(_chain(later_unknown, ["b", KEEP, None, 2]), {"x"})

    g = G()  # a leading dim unknown (up to the sliced axis): stop
    x = g.input("x", [None, T, D])
    r = g.op("Relu", x, out="r", shape=[None, T, D])
    h = g.op("Reshape", r, g.const([0, T, 2, 2], np.int64), out="heads", shape=[None, T, 2, 2])
    _tail(g, h, "out", [None, KEEP, 2, 2])
    g.output("out", [None, KEEP, 2, 2])
    _check(g, {"heads"})

    def no_input_shape(g, x):
        return g.op("Reshape", g.op("Relu", x, out="r"), g.const([0, T, 2, 2], np.int64), out="heads",
                    shape=["b", T, 2, 2])

    _check(_chain(no_input_shape, ["b", KEEP, 2, 2]), {"heads"})


def test_a_slice_output_without_a_shape_stays():
    g = G()
    x = g.input("x", ["b", T, D])
    _tail(g, _relu(g, x), "tail", None)
    g.op("Identity", "tail", out="out", shape=["b", KEEP, D])
    g.output("out", ["b", KEEP, D])
    _check(g, {"r"})


def test_an_op_of_another_domain_keeps_it():
    def build(g, x):
        return g.op("Gelu", _relu(g, x), domain="com.microsoft", out="n", shape=["b", T, D])

    after = _check(_chain(build, ["b", KEEP, D]), {"x"})
    assert [n.domain for n in after.nodes if n.op == "Gelu"] == ["com.microsoft"]


def test_clip_bounds_from_constant_nodes_are_kept():
    def build(g, x):
        lo = g.op("Constant", value=helper.make_tensor("lo", 1, [], [0.1]))
        return g.op("Clip", _relu(g, x), lo, out="c", shape=["b", T, D])

    _check(_chain(build, ["b", KEEP, D]), {"x"})


def test_softmax_axis_default_and_axis_zero():
    def default(g, x):
        return g.op("Softmax", _relu(g, x), out="sm", shape=["b", T, D])  # axis -1 by default

    _check(_chain(default, ["b", KEEP, D]), {"x"})

    def axis0(g, x):
        return g.op("Softmax", _relu(g, x), axis=0, out="sm", shape=["b", T, D])

    _check(_chain(axis0, ["b", KEEP, D]), {"sm"})


def test_a_matmul_with_an_unshaped_operand_stays():
    def build(g, x):
        return g.op("MatMul", g.op("Relu", x, out="r"), g.const(np.ones((D, D))), out="mm", shape=["b", T, D])

    _check(_chain(build, ["b", KEEP, D]), {"mm"})


def test_a_slice_pushed_onto_a_tensor_of_unknown_shape():
    def build(g, x):
        return g.op("Softmax", g.op("Relu", x, out="r"), axis=-1, out="sm", shape=["b", T, D])

    _check(_chain(build, ["b", KEEP, D]), {"r"})


def test_two_slices_of_one_tensor_get_two_names():
    g = G()
    x = g.input("x", ["b", T, D])
    _tail(g, g.op("Relu", x, out="r", shape=["b", T, D]), "out1", ["b", KEEP, D], name="t1")
    _tail(g, g.op("Neg", x, out="n", shape=["b", T, D]), "out2", ["b", 3, D], start=-3, name="t2")
    g.output("out1", ["b", KEEP, D])
    g.output("out2", ["b", 3, D])
    after = _check(g, {"x"})
    names = [n.outputs[0].name for n in after.nodes if n.op == "Slice"]
    assert len(names) == 2 and len(set(names)) == 2


def test_the_pass_stops_once_nothing_moves(monkeypatch):
    calls = []
    real = gs.Graph.cleanup

    def counting(self, *a, **k):
        calls.append(1)
        return real(self, *a, **k)

    monkeypatch.setattr(gs.Graph, "cleanup", counting)
    g = G()  # a slice that cannot move (its producer has two outputs)
    x = g.input("x", ["b", T, D])
    g.nodes.append(helper.make_node("Split", [x, g.const([2, 2], np.int64)], ["s0", "s1"], axis=2, name="split"))
    g.infos.append(helper.make_tensor_value_info("s0", F32, ["b", T, 2]))
    _tail(g, "s0", "out", ["b", KEEP, 2])
    g.output("out", ["b", KEEP, 2])
    g.output("s1", ["b", T, 2])
    pyramid(g.gs())
    assert len(calls) == 1
    calls.clear()
    pyramid(_layer().gs())  # a slice that moves step by step: one cleanup per step, then one more
    assert 2 <= len(calls) <= 30
