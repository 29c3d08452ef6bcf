"""SharedDecodeAttention as an ONNX function of standard ops (ONNX Runtime runs it).

The same computation as the reference: all C*N queries against the one K/V as a single
batch ``[1, H, C*N, dh]`` (no tensor holds the K/V per candidate), the keys left of the real
tail masked, the shift taken from the real keys only, masked keys weighted 0 by the mask
itself (not by ``exp(-inf)``: an FP16 graph stores -inf as -1e4), and a row with no real key
divided by 1 instead of 0, so it is exactly 0.

One always-masked zero key is put in front of the keys: the key axis is never empty, so no
``ReduceMax`` runs over an empty axis when n == 0 (ONNX leaves that to the runtime) and an
empty sequence takes the same path as ``valid = 0``.
"""

from __future__ import annotations

import numpy as np
import onnx

from onetrans_trt.plugins._onnx import Body, make_function
from onetrans_trt.plugins.shared_decode_attention import INPUTS, OP, OUTPUTS

ATTRIBUTES = ["scale", "plugin_namespace", "aot"]


def function(opset: int = 18) -> onnx.FunctionProto:
    b = Body(OP)
    q, k, v, valid = INPUTS
    scale = b.op("CastLike", b.attr_const("scale"), q)
    ninf = b.op("CastLike", b.const(-np.inf, np.float32), q)
    zero = b.op("CastLike", b.const(0.0, np.float32), q)
    one = b.op("CastLike", b.const(1.0, np.float32), q)
    last = b.const([-1])
    c, h, nq, dh = (b.dim(q, i) for i in range(4))
    # [1, H, C*N, dh]: every candidate's queries, one batch against the shared K/V
    q_all = b.op("Reshape", b.op("Transpose", q, perm=[1, 0, 2, 3]),
                 b.op("Concat", b.const([1]), h, b.const([-1]), dh, axis=0))
    # one masked zero key in front: [1, H, n + 1, dh], key 0 never real
    pad = b.op("Expand", zero, b.op("Concat", b.const([1]), h, b.const([1]), dh, axis=0))
    axis = 2
    k1, v1 = b.op("Concat", pad, k, axis=axis), b.op("Concat", pad, v, axis=axis)
    n1 = b.dim(k1, 2)  # n + 1
    # key j (of n + 1) is real iff j >= max(n + 1 - valid, 1): the last min(valid, n) of the n
    first = b.op("Max", b.op("Sub", n1, b.op("Cast", valid, to=onnx.TensorProto.INT64)), b.const([1]))
    real = b.op("GreaterOrEqual", b.arange(n1), first)  # [n + 1], broadcast over [1, H, C*N, n + 1]
    s = b.op("Mul", b.op("MatMul", q_all, b.op("Transpose", k1, perm=[0, 1, 3, 2])), scale)
    s = b.op("Where", real, s, ninf)
    m = b.op("ReduceMax", s, last, keepdims=1)  # -inf on a row with no real key
    m_safe = b.op("Where", b.op("IsInf", m), zero, m)
    p = b.op("Where", real, b.op("Exp", b.op("Sub", s, m_safe)), zero)
    den = b.op("ReduceSum", p, last, keepdims=1)
    o = b.op("Div", b.op("MatMul", p, v1), b.op("Where", b.op("Greater", den, zero), den, one))
    # [1, H, C*N, dh] -> [C, H, N, dh]
    back = b.op("Concat", h, c, nq, b.const([-1]), axis=0)
    b.nodes.append(onnx.helper.make_node("Transpose", [b.op("Reshape", o, back)], OUTPUTS, perm=[1, 0, 2, 3]))
    return make_function(OP, INPUTS, OUTPUTS, b, ATTRIBUTES, opset)
