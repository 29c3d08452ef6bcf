"""Each op's backends against its PyTorch reference, over shapes (seeded sweeps).

reference vs ONNX function (ORT) <= 1e-5; Triton (interpreter) vs reference <= 1e-5 in
fp32 and <= 2e-3 in fp16. Shapes cover empty (L=0) and padded prefixes, valid lengths
0 / partial / full / over, 1-4 heads and head dims 16, 32, 64, 128.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from onetrans_trt.plugins import OPS, attach_op_functions
from onetrans_trt.plugins._onnx import DOMAIN, PLUGIN_NAMESPACE

N_CASES = 40


def spa_case(seed: int):
    rng = np.random.default_rng(seed)
    c, t, h = int(rng.integers(1, 6)), int(rng.integers(1, 7)), int(rng.choice([1, 2, 4]))
    dh = int([8, 16, 32, 48, 64, 128][seed % 6])  # 8: the tiny preset; 48: not a power of two
    n = int(rng.choice([0, 1, 7, 33]))
    valid = int(rng.choice([0, n // 2, n, n + 5]))
    g = torch.Generator().manual_seed(seed)
    q, ko, vo = (torch.randn(c, h, t, dh, generator=g) for _ in range(3))
    kp, vp = (torch.randn(1, h, n, dh, generator=g) for _ in range(2))
    return [q, kp, vp, torch.tensor([valid]), ko, vo]


def tca_case(seed: int):
    rng = np.random.default_rng(seed)
    b, h = int(rng.integers(1, 4)), int(rng.choice([1, 2, 4]))
    dh = int([8, 16, 32, 48, 64, 128][seed % 6])  # 8: the tiny preset; 48: not a power of two
    lk = int(rng.integers(1, 40))
    lq = int(rng.integers(1, lk + 1))
    valid = torch.tensor([int(rng.choice([0, rng.integers(0, lk + 1), lk, lk + 3])) for _ in range(b)])
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, lq, dh, generator=g)
    k, v = (torch.randn(b, h, lk, dh, generator=g) for _ in range(2))
    return [q, k, v, valid]


def seg_case(seed: int):
    """U users' packed K/V (rows left-padded to the longest), each candidate's user, in sorted
    or shuffled order, users with no candidate, lengths 0 / partial / full / over per user."""
    rng = np.random.default_rng(1000 + seed)
    u, c, t, h = int(rng.integers(1, 5)), int(rng.integers(1, 9)), int(rng.integers(1, 7)), int(rng.choice([1, 2, 4]))
    dh = int([8, 16, 32, 48, 64, 128][seed % 6])
    n = int(rng.choice([0, 1, 7, 33]))
    valid = torch.tensor([int(rng.choice([0, n // 2, n, n + 5])) for _ in range(u)])
    users = np.sort(rng.integers(0, u, c)) if seed % 2 else rng.integers(0, u, c)
    g = torch.Generator().manual_seed(seed)
    q, ko, vo = (torch.randn(c, h, t, dh, generator=g) for _ in range(3))
    kp, vp = (torch.randn(u, h, n, dh, generator=g) for _ in range(2))
    return [q, kp, vp, valid, torch.from_numpy(users.astype(np.int64)), ko, vo]


CASES = {"SharedPrefixAttention": spa_case, "TailCausalAttention": tca_case, "SegmentedPrefixAttention": seg_case}


def _ort_model(op: str, args: list[torch.Tensor]) -> onnx.ModelProto:
    names = OPS[op].module("__init__").INPUTS if False else __import__(OPS[op].package, fromlist=["INPUTS"]).INPUTS
    ins = [helper.make_tensor_value_info(n, TensorProto.INT64 if a.dtype == torch.int64 else TensorProto.FLOAT,
                                         list(a.shape)) for n, a in zip(names, args)]
    out = helper.make_tensor_value_info("out", TensorProto.FLOAT, list(args[0].shape))
    node = helper.make_node(op, names, ["out"], domain=DOMAIN, scale=1.0 / math.sqrt(args[0].shape[-1]),
                            plugin_namespace=PLUGIN_NAMESPACE, aot=1)
    model = helper.make_model(helper.make_graph([node], op, ins, [out]), opset_imports=[helper.make_opsetid("", 23)])
    model = attach_op_functions(model)
    onnx.checker.check_model(model)
    return model


@pytest.mark.parametrize("op", list(CASES))
def test_reference_vs_onnx_function(op):
    import onnxruntime as ort

    ref_fn = OPS[op].module("reference").reference
    worst = 0.0
    for seed in range(N_CASES):
        args = CASES[op](seed)
        ref = ref_fn(*args).numpy()
        sess = ort.InferenceSession(_ort_model(op, args).SerializeToString(), providers=["CPUExecutionProvider"])
        names = [i.name for i in sess.get_inputs()]
        out = sess.run(None, {n: a.numpy() for n, a in zip(names, args)})[0]
        assert np.isfinite(out).all()
        worst = max(worst, float(np.abs(out - ref).max()))
    assert worst <= 1e-5, worst


@pytest.mark.parametrize("op", list(CASES))
def test_triton_interpreter_vs_reference(op):
    pytest.importorskip("triton", reason="the 'kernels' extra (triton) is not installed")
    ref_fn = OPS[op].module("reference").reference
    kernel = OPS[op].module("triton_kernel")
    worst32 = worst16 = 0.0
    for seed in range(N_CASES // 2):
        args = CASES[op](seed)
        ref = ref_fn(*args)
        out = kernel.run_interpreted(*args)
        half = [a.half() if a.is_floating_point() else a for a in args]
        out16 = kernel.run_interpreted(*half)
        assert out16.dtype == torch.float16 and torch.isfinite(out16).all()
        worst32 = max(worst32, float((out - ref).abs().max()))
        worst16 = max(worst16, float((out16.float() - ref).abs().max()))
    assert worst32 <= 1e-5, worst32
    assert worst16 <= 2e-3, worst16


def test_cached_forward_equals_full_forward():
    """SharedPrefixAttention over cached K/V equals attention over the full sequence."""
    from onetrans_trt.models.attention import masked_attention

    args = spa_case(3)
    q, kp, vp, valid, ko, vo = args
    c, h, t, _ = q.shape
    n = kp.shape[2]
    k = torch.cat([kp.expand(c, -1, -1, -1), ko], dim=2)
    v = torch.cat([vp.expand(c, -1, -1, -1), vo], dim=2)
    real = torch.arange(n) >= n - int(valid)
    mask = torch.cat([real.expand(t, n), torch.ones(t, t, dtype=torch.bool).tril()], dim=1)
    full = masked_attention(q, k, v, mask.expand(c, 1, t, n + t))
    assert (OPS["SharedPrefixAttention"].module("reference").reference(*args) - full).abs().max() <= 1e-5


def test_segmented_with_one_user_is_shared_prefix_attention():
    """U = 1, every candidate of user 0: the segmented op is SharedPrefixAttention (reference
    bit for bit, ONNX function within 1e-6 of SharedPrefixAttention's)."""
    import onnxruntime as ort

    seg, spa = OPS["SegmentedPrefixAttention"], OPS["SharedPrefixAttention"]
    for seed in range(8):
        args = spa_case(seed)
        users = torch.zeros(args[0].shape[0], dtype=torch.int64)
        seg_args = args[:4] + [users] + args[4:]
        assert torch.equal(seg.module("reference").reference(*seg_args), spa.module("reference").reference(*args))
        outs = []
        for op, a in (("SegmentedPrefixAttention", seg_args), ("SharedPrefixAttention", args)):
            sess = ort.InferenceSession(_ort_model(op, a).SerializeToString(), providers=["CPUExecutionProvider"])
            outs.append(sess.run(None, {i.name: x.numpy() for i, x in zip(sess.get_inputs(), a)})[0])
        assert np.abs(outs[0] - outs[1]).max() <= 1e-6


def test_segmented_equals_one_call_per_user():
    """Each candidate's output is SharedPrefixAttention over its own user's K/V alone (the
    user's row cut to its own real length, not the batch's padding)."""
    spa = OPS["SharedPrefixAttention"].module("reference").reference
    for seed in range(12):
        q, kp, vp, valid, users, ko, vo = seg_case(seed)
        out = OPS["SegmentedPrefixAttention"].module("reference").reference(q, kp, vp, valid, users, ko, vo)
        for c in range(q.shape[0]):
            u = int(users[c])
            keep = min(int(valid[u]), kp.shape[2])
            alone = spa(q[c:c + 1], kp[u:u + 1, :, kp.shape[2] - keep:], vp[u:u + 1, :, kp.shape[2] - keep:],
                        torch.tensor([keep]), ko[c:c + 1], vo[c:c + 1])
            assert (out[c:c + 1] - alone).abs().max() <= 1e-6


def test_segmented_refuses_a_candidate_of_no_user():
    q, kp, vp, valid, users, ko, vo = seg_case(1)
    bad = users.clone()
    bad[0] = kp.shape[0]
    with pytest.raises(ValueError, match="cand_user must lie in"):
        OPS["SegmentedPrefixAttention"].module("reference").reference(q, kp, vp, valid, bad, ko, vo)
