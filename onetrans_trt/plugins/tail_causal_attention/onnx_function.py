"""TailCausalAttention as an ONNX function of standard ops (ONNX Runtime runs it).

The bottom-right causal mask is explicit (never the ONNX ``Attention`` op's default
alignment, which is top-left for q_len < kv_len). The int attribute ``causal`` (default 1,
through the FunctionProto's ``attribute_proto``: nodes written before it existed stay causal)
switches the causal condition off (0: every real key; any nonzero value is causal).
"""

from __future__ import annotations

import numpy as np
import onnx

from onetrans_trt.plugins._onnx import Body, make_function
from onetrans_trt.plugins.tail_causal_attention import INPUTS, OP, OUTPUTS

ATTRIBUTES = ["scale", "plugin_namespace", "aot"]  # no default
DEFAULTS = {"causal": 1}  # a node without it is causal, as every node was before it existed


def function(opset: int = 18) -> onnx.FunctionProto:
    b = Body(OP)
    q, k, v, valid = INPUTS
    scale = b.op("CastLike", b.attr_const("scale"), q)
    ninf = b.op("CastLike", b.const(-np.inf, np.float32), q)
    zero = b.op("CastLike", b.const(0.0, np.float32), q)
    bidirectional = b.op("Not", b.op("Cast", b.attr_const("causal", "causal", kind="int"), to=onnx.TensorProto.BOOL))
    lq, lk = b.dim(q, 2), b.dim(k, 2)
    j = b.op("Unsqueeze", b.arange(lk), b.const([0]))  # [1, Lk]
    pos = b.op("Unsqueeze", b.op("Add", b.arange(lq), b.op("Sub", lk, lq)), b.const([1]))  # [Lq, 1]
    seen = b.op("Or", b.op("LessOrEqual", j, pos), bidirectional)  # [Lq, Lk]: at or before i, or any
    itself = b.op("Equal", j, pos)
    real = b.op("GreaterOrEqual", j, b.op("Unsqueeze", b.op("Sub", lk, valid), b.const([1])))  # [B, Lk]
    mask = b.op("Or", b.op("And", b.op("Unsqueeze", seen, b.const([0])), b.op("Unsqueeze", real, b.const([1]))),
                b.op("Unsqueeze", itself, b.const([0])))  # [B, Lq, Lk]
    mask = b.op("Unsqueeze", mask, b.const([1]))  # [B, 1, Lq, Lk]
    s = b.op("Mul", b.op("MatMul", q, b.op("Transpose", k, perm=[0, 1, 3, 2])), scale)
    p = b.op("Softmax", b.op("Add", s, b.op("Where", mask, zero, ninf)), axis=-1)
    b.nodes.append(onnx.helper.make_node("MatMul", [p, v], OUTPUTS))
    return make_function(OP, INPUTS, OUTPUTS, b, ATTRIBUTES, opset, defaults=DEFAULTS)
