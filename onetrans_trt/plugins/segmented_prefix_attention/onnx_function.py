"""SegmentedPrefixAttention as an ONNX function of standard ops (ONNX Runtime runs it).

The candidates are scattered into a per-user block ``[U, H, Cmax*T, dh]`` (Cmax: the most
candidates any user has; a candidate's slot is its rank among its user's candidates), so
every user's queries meet only that user's K/V in one batched MatMul against the packed
``[U, H, L, dh]`` prefix: the prefix is never copied per candidate, and the work is that of
U separate calls plus the padding of the candidate blocks. Keys left of a user's real tail
are masked; the own-token part and the merge are SharedPrefixAttention's.
"""

from __future__ import annotations

import numpy as np
import onnx

from onetrans_trt.plugins._onnx import Body, make_function, own_causal_merged
from onetrans_trt.plugins.segmented_prefix_attention import INPUTS, OP, OUTPUTS

ATTRIBUTES = ["scale", "plugin_namespace", "aot"]


def function(opset: int = 18) -> onnx.FunctionProto:
    b = Body(OP)
    q, kp, vp, valid, cand_user, ko, vo = INPUTS
    scale = b.op("CastLike", b.attr_const("scale"), q)
    ninf = b.op("CastLike", b.const(-np.inf, np.float32), q)
    zero = b.op("CastLike", b.const(0.0, np.float32), q)
    last = b.const([-1])
    c, h, t, dh = (b.dim(q, i) for i in range(4))
    n_users, n = b.dim(kp, 0), b.dim(kp, 2)
    # each candidate's slot: its user's block, then its rank among that user's candidates
    user = b.op("Cast", cand_user, to=onnx.TensorProto.INT64)
    mine = b.op("Cast", b.op("Equal", b.op("Unsqueeze", user, b.const([1])),
                             b.op("Unsqueeze", b.arange(n_users), b.const([0]))), to=onnx.TensorProto.INT64)  # [C, U]
    rank = b.op("Sub", b.op("ReduceSum", b.op("Mul", mine, b.op("CumSum", mine, b.const(0))), b.const([1]),
                            keepdims=0), b.const(1))
    cmax = b.op("ReduceMax", b.op("ReduceSum", mine, b.const([0]), keepdims=0), b.const([0]), keepdims=1)  # [1]
    slot = b.op("Add", b.op("Mul", user, cmax), rank)  # [C]
    # part 1: [U, H, Cmax*T, dh] queries against their own user's prefix, masked left of its real tail
    blocks = b.op("Mul", n_users, cmax)
    flat = b.op("Reshape", q, b.op("Concat", c, b.const([-1]), axis=0))
    width = b.dim(flat, 1)
    empty = b.op("Expand", zero, b.op("Concat", blocks, width, axis=0))
    packed = b.op("ScatterND", empty, b.op("Unsqueeze", slot, b.const([1])), flat)
    q_u = b.op("Reshape", b.op("Transpose", b.op("Reshape", packed, b.op("Concat", n_users, cmax, h, t, dh, axis=0)),
                                perm=[0, 2, 1, 3, 4]), b.op("Concat", n_users, h, b.const([-1]), dh, axis=0))
    s1 = b.op("Mul", b.op("MatMul", q_u, b.op("Transpose", kp, perm=[0, 1, 3, 2])), scale)
    real = b.op("GreaterOrEqual", b.op("Unsqueeze", b.arange(n), b.const([0])),
                b.op("Unsqueeze", b.op("Sub", n, valid), b.const([1])))  # [U, L]
    s1 = b.op("Where", b.op("Unsqueeze", real, b.const([1, 2])), s1, ninf)
    m1 = b.op("ReduceMax", s1, last, keepdims=1)  # -inf for a user with no real prefix
    m1_safe = b.op("Where", b.op("IsInf", m1), zero, m1)
    p1 = b.op("Exp", b.op("Sub", s1, m1_safe))
    l1 = b.op("ReduceSum", p1, last, keepdims=1)
    o1 = b.op("MatMul", p1, vp)
    to_blocks = b.op("Concat", n_users, h, cmax, t, b.const([-1]), axis=0)
    to_slots = b.op("Concat", blocks, h, t, b.const([-1]), axis=0)

    def per_candidate(x: str) -> str:  # [U, H, Cmax*T, k] -> [C, H, T, k]
        x = b.op("Transpose", b.op("Reshape", x, to_blocks), perm=[0, 2, 1, 3, 4])
        return b.op("Gather", b.op("Reshape", x, to_slots), slot, axis=0)

    m1, l1, o1 = per_candidate(m1), per_candidate(l1), per_candidate(o1)
    # part 2: own NS-tokens, causal, merged with part 1
    own_causal_merged(b, q, ko, vo, scale, zero, ninf, last, (m1, l1, o1), OUTPUTS[0])
    return make_function(OP, INPUTS, OUTPUTS, b, ATTRIBUTES, opset)
