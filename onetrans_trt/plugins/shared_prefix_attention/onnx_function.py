"""SharedPrefixAttention as an ONNX function of standard ops (ONNX Runtime runs it).

The same two-part computation as the reference: all C*T queries against the one prefix
as a single batch, each candidate's queries against its own keys causally, merged by
their running max and sums. No tensor ever holds the prefix per candidate.
"""

from __future__ import annotations

import numpy as np
import onnx

from onetrans_trt.plugins._onnx import Body, make_function, own_causal_merged
from onetrans_trt.plugins.shared_prefix_attention import INPUTS, OP, OUTPUTS

ATTRIBUTES = ["scale", "plugin_namespace", "aot"]


def function(opset: int = 18) -> onnx.FunctionProto:
    b = Body(OP)
    q, kp, vp, valid, ko, vo = INPUTS
    scale = b.op("CastLike", b.attr_const("scale"), q)
    ninf = b.op("CastLike", b.const(-np.inf, np.float32), q)
    zero = b.op("CastLike", b.const(0.0, np.float32), q)
    last = b.const([-1])
    c, h, t, dh = (b.dim(q, i) for i in range(4))
    # part 1: [1, H, C*T, dh] queries against the shared prefix
    q_all = b.op("Reshape", b.op("Transpose", q, perm=[1, 0, 2, 3]),
                 b.op("Concat", b.const([1]), h, b.const([-1]), dh, axis=0))
    # the prefix is left-padded and shared: slice its real tail instead of masking the
    # padding, so no pass over the [1, H, C*T, L] scores is spent on a mask
    n = b.dim(kp, 2)
    start = b.op("Max", b.op("Sub", n, valid), b.const([0]))
    axis = b.const([2])
    kp, vp = b.op("Slice", kp, start, n, axis), b.op("Slice", vp, start, n, axis)
    s1 = b.op("Mul", b.op("MatMul", q_all, b.op("Transpose", kp, perm=[0, 1, 3, 2])), scale)
    m1 = b.op("ReduceMax", s1, last, keepdims=1)  # -inf when the prefix is empty
    m1_safe = b.op("Where", b.op("IsInf", m1), zero, m1)
    p1 = b.op("Exp", b.op("Sub", s1, m1_safe))
    l1 = b.op("ReduceSum", p1, last, keepdims=1)
    o1 = b.op("MatMul", p1, vp)
    back = b.op("Concat", h, c, t, b.const([-1]), axis=0)

    def per_candidate(x: str) -> str:  # [1, H, C*T, k] -> [C, H, T, k]
        return b.op("Transpose", b.op("Reshape", x, back), perm=[1, 0, 2, 3])

    m1, l1, o1 = per_candidate(m1), per_candidate(l1), per_candidate(o1)
    # part 2: own NS-tokens, causal, merged with part 1
    own_causal_merged(b, q, ko, vo, scale, zero, ninf, last, (m1, l1, o1), OUTPUTS[0])
    return make_function(OP, INPUTS, OUTPUTS, b, ATTRIBUTES, opset)
