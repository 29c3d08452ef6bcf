"""FLOP counting on small hand-made graphs whose products are counted by hand here."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onetrans_trt.graphs.flops import graph_flops, placeholder_feeds
from tests.mutation_kills.onnx_kit import F32, I64, G


def test_placeholder_feeds_sizes_and_values():
    g = G()
    g.input("s_length", ["users"], I64)
    g.input("user_seq_length", [1], TensorProto.INT32)
    g.input("x", ["batch", 3])
    g.input("h", [2], TensorProto.FLOAT16)
    g.input("ids", ["batch", "history"], I64)
    feeds = placeholder_feeds(g.model(), {"batch": 4, "history": 7, "users": 2})
    assert list(feeds) == ["s_length", "user_seq_length", "x", "h", "ids"]
    assert feeds["s_length"].dtype == np.int64 and feeds["s_length"].tolist() == [7, 7]
    assert feeds["user_seq_length"].dtype == np.int32 and feeds["user_seq_length"].tolist() == [7]
    assert feeds["x"].dtype == np.float32 and feeds["x"].shape == (4, 3) and np.all(feeds["x"] == np.float32(0.01))
    assert feeds["h"].dtype == np.float16 and np.all(feeds["h"] == np.float16(0.01))
    assert feeds["ids"].dtype == np.int64 and feeds["ids"].shape == (4, 7) and not feeds["ids"].any()


def test_placeholder_feeds_history_defaults_to_one_and_a_missing_size_is_named():
    g = G()
    g.input("s_length", [1], I64)
    assert placeholder_feeds(g.model(), {})["s_length"].tolist() == [1]
    g.input("x", ["batch", "width"])
    with pytest.raises(KeyError) as e:
        placeholder_feeds(g.model(), {"batch": 2})
    assert e.value.args[0] == "no size given for dimension 'width' of input 'x'"


def _products() -> tuple[onnx.ModelProto, int, int]:
    """Every kind of product; returns (model, flops at batch=5, matmul count)."""
    g = G()
    a = g.input("a", ["batch", 6])
    b3 = g.input("b3", [2, "batch", 6])
    v = g.input("v", [6])
    w = g.const(np.ones((6, 4)), name="w")  # initializer operand
    flops = 0
    g.op("MatMul", a, w, out="o1")  # [5,6]@[6,4]
    flops += 2 * 5 * 6 * 4
    g.op("MatMul", b3, w, out="o2")  # batch 2: [2,5,6]@[6,4]
    flops += 2 * 2 * 5 * 6 * 4
    g.op("MatMul", v, w, out="o3")  # 1-D first operand: [6]@[6,4]
    flops += 2 * 1 * 6 * 4
    g.op("MatMul", a, v, out="o4")  # 1-D second operand: [5,6]@[6]
    flops += 2 * 5 * 6 * 1
    b4 = g.op("Reshape", b3, g.const([2, 1, -1, 6], np.int64))  # [2,1,5,6] @ [3,6,4]: batch (2,3)
    g.op("MatMul", b4, g.const(np.ones((3, 6, 4)), name="w3"), out="o5")
    flops += 2 * 6 * 5 * 6 * 4
    cnode = g.op("Constant", value=numpy_helper.from_array(np.ones((4, 6), np.float32)))  # Constant-node operand
    g.op("Gemm", a, cnode, transB=1, out="o6")  # [5,6] x [4,6]^T
    flops += 2 * 5 * 6 * 4
    at = g.op("Transpose", a, perm=[1, 0])  # [6,5]
    g.op("Gemm", at, w, transA=1, out="o7")  # [6,5]^T x [6,4]
    flops += 2 * 5 * 6 * 4
    g.op("Gemm", at, a, out="o8")  # [6,5] x [5,6]: neither transposed, both measured
    flops += 2 * 6 * 5 * 6
    for o in ["o1", "o2", "o3", "o4", "o5", "o6", "o7", "o8"]:
        g.output(o)
    g.output(at)  # an operand that is already an output is not added twice
    return g.model(), flops, 8


def test_graph_flops_counts_every_product(tmp_path):
    model, want, n = _products()
    outputs = len(model.graph.output)
    assert graph_flops(model, {"batch": 5}) == {"flops": want, "matmuls": n}
    assert len(model.graph.output) == outputs  # the model given is not changed
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    assert graph_flops(path, {"batch": 5}) == {"flops": want, "matmuls": n}
    assert graph_flops(str(path), {"batch": 5})["flops"] == want


def test_graph_flops_scales_with_the_dims():
    model, _, _ = _products()
    f5, f10 = graph_flops(model, {"batch": 5})["flops"], graph_flops(model, {"batch": 10})["flops"]
    assert f10 == 2 * f5 - 2 * 1 * 6 * 4  # o3 does not grow, the rest (o8 included: 2*6*b*6) doubles


def test_graph_flops_of_a_graph_without_products():
    g = G()
    g.op("Relu", g.input("x", ["n"]), out="y")
    g.output("y")
    assert graph_flops(g.model(), {"n": 3}) == {"flops": 0, "matmuls": 0}


def test_an_operand_shared_by_two_products_is_measured_once():
    g = G()
    x = g.input("x", ["n", 3])
    h = g.op("Relu", x)
    g.op("MatMul", h, g.const(np.ones((3, 2))), out="y1")
    g.op("MatMul", h, g.const(np.ones((3, 5))), out="y2")
    g.output("y1")
    g.output("y2")
    assert graph_flops(g.model(), {"n": 4}) == {"flops": 2 * 4 * 3 * 2 + 2 * 4 * 3 * 5, "matmuls": 2}


def test_placeholder_feeds_bool_inputs_are_false():
    g = G()
    g.input("mask", ["n"], TensorProto.BOOL)
    f = placeholder_feeds(g.model(), {"n": 3})
    assert f["mask"].dtype == np.bool_ and f["mask"].tolist() == [False, False, False]


def test_gemm_trans_b_reads_the_other_dim():
    g = G()
    a = g.input("a", ["m", 6])
    g.op("Gemm", a, g.const(np.ones((4, 6))), transB=1, out="y1")  # [m,6] x [4,6]^T: n = 4
    g.op("Gemm", a, g.const(np.ones((6, 9))), out="y2")  # n = 9
    g.output("y1")
    g.output("y2")
    assert graph_flops(g.model(), {"m": 2}) == {"flops": 2 * 2 * 6 * 4 + 2 * 2 * 6 * 9, "matmuls": 2}


def test_products_inside_our_fused_attention_nodes_are_counted():
    """A fused scorer's attention runs inside SharedPrefixAttention nodes (model-local ONNX
    functions): their products are work the graph does. Once they were not counted, so bench's
    scorer GFLOP/s left out the whole attention (about 14% of onetrans-s's scorer FLOPs at L=512)."""
    from onetrans_trt.plugins._onnx import attach_functions
    from onetrans_trt.plugins.shared_prefix_attention.onnx_function import function

    c, h, t, dh, n = 3, 2, 4, 8, 5
    g = G(opset=18)  # the functions' opset
    q = g.input("q", [c, h, t, dh])
    kp, vp = g.input("k_prefix", [1, h, "history", dh]), g.input("v_prefix", [1, h, "history", dh])
    valid = g.input("s_length", [1], I64)  # placeholder: the history, every prefix key real
    ko, vo = g.input("k_own", [c, h, t, dh]), g.input("v_own", [c, h, t, dh])
    g.op("SharedPrefixAttention", q, kp, vp, valid, ko, vo, domain="onetrans", out="o", scale=0.5,
         plugin_namespace="onetrans", aot=0)
    g.output("o")
    model = attach_functions(g.model(), [function(18)])
    want = 2 * (2 * h * (c * t) * n * dh) + 2 * (2 * c * h * t * t * dh)  # prefix QK^T, PV; own QK^T, PV
    assert graph_flops(model, {"history": n}) == {"flops": want, "matmuls": 4}
