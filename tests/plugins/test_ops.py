"""Each op's backends against its PyTorch reference, over shapes (seeded sweeps).

reference vs ONNX function (ORT) <= 1e-5; Triton (interpreter) vs reference <= 1e-5 in
fp32 and <= 2e-3 in fp16. Shapes cover empty (L=0) and padded prefixes, valid lengths
0 / partial / full / over, 1-4 heads and head dims 8 to 128. Ops with attributes run once
per value (TailCausalAttention: ``causal`` 1 and 0), the node carrying it.
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


def sda_case(seed: int):
    """SharedDecodeAttention: C candidates' N queries over one left-padded K/V. The key count n
    and the valid length cycle through every pair of {0, 1, 7, 33} x {0, n//2, n, n+5} in 16
    seeds (so n == 0 and valid == 0 are always covered); the rest is drawn."""
    rng = np.random.default_rng(2000 + seed)
    c, nq, h = int(rng.integers(1, 6)), int(rng.integers(1, 5)), int(rng.choice([1, 2, 4]))
    dh = int([8, 16, 32, 48, 64, 128][seed % 6])
    n = [0, 1, 7, 33][seed % 4]
    valid = [0, n // 2, n, n + 5][(seed // 4) % 4]
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(c, h, nq, dh, generator=g)
    k, v = (torch.randn(1, h, n, dh, generator=g) for _ in range(2))
    return [q, k, v, torch.tensor([valid])]


CASES = {"SharedPrefixAttention": spa_case, "TailCausalAttention": tca_case, "SegmentedPrefixAttention": seg_case,
         "SharedDecodeAttention": sda_case}
# every op once per value of its attributes (besides scale): (op, attributes)
VARIANTS = [("SharedPrefixAttention", {}), ("TailCausalAttention", {"causal": 1}),
            ("TailCausalAttention", {"causal": 0}), ("SegmentedPrefixAttention", {}), ("SharedDecodeAttention", {})]


def _variant_id(v) -> str:
    return v[0] + "".join(f"-{k}={x}" for k, x in v[1].items())


def _ort_model(op: str, args: list[torch.Tensor], **attrs) -> onnx.ModelProto:
    """A one-node model as fuse-attention writes it (``attrs``: the op's other attributes, e.g.
    ``causal``), with the op's ONNX function attached."""
    names = __import__(OPS[op].package, fromlist=["INPUTS"]).INPUTS
    ins = [helper.make_tensor_value_info(n, TensorProto.INT64 if a.dtype == torch.int64 else TensorProto.FLOAT,
                                         list(a.shape)) for n, a in zip(names, args)]
    out = helper.make_tensor_value_info("out", TensorProto.FLOAT, list(args[0].shape))
    node = helper.make_node(op, names, ["out"], domain=DOMAIN, scale=1.0 / math.sqrt(args[0].shape[-1]),
                            plugin_namespace=PLUGIN_NAMESPACE, aot=1, **attrs)
    model = helper.make_model(helper.make_graph([node], op, ins, [out]), opset_imports=[helper.make_opsetid("", 23)])
    model = attach_op_functions(model)
    onnx.checker.check_model(model)
    return model


def _ort(model: onnx.ModelProto, args: list[torch.Tensor]) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {i.name: a.numpy() for i, a in zip(sess.get_inputs(), args)})[0]


def test_every_op_is_swept():
    assert set(CASES) == set(OPS) == {op for op, _ in VARIANTS}


@pytest.mark.parametrize("variant", VARIANTS, ids=_variant_id)
def test_reference_vs_onnx_function(variant):
    op, attrs = variant
    ref_fn = OPS[op].module("reference").reference
    worst = 0.0
    for seed in range(N_CASES):
        args = CASES[op](seed)
        ref = ref_fn(*args, **attrs).numpy()
        out = _ort(_ort_model(op, args, **attrs), args)
        assert np.isfinite(out).all()
        worst = max(worst, float(np.abs(out - ref).max()))
    assert worst <= 1e-5, worst


@pytest.mark.parametrize("variant", VARIANTS, ids=_variant_id)
def test_triton_interpreter_vs_reference(variant):
    pytest.importorskip("triton", reason="the 'kernels' extra (triton) is not installed")
    op, attrs = variant
    ref_fn = OPS[op].module("reference").reference
    kernel = OPS[op].module("triton_kernel")
    worst32 = worst16 = 0.0
    for seed in range(N_CASES // 2):
        args = CASES[op](seed)
        ref = ref_fn(*args, **attrs)
        out = kernel.run_interpreted(*args, **attrs)
        half = [a.half() if a.is_floating_point() else a for a in args]
        out16 = kernel.run_interpreted(*half, **attrs)
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


# ---------------------------------------------------------------- TailCausalAttention's causal attribute


def test_a_tail_causal_node_without_causal_is_causal():
    """Nodes written before ``causal`` existed carry none: the ONNX function's default (1, its
    ``attribute_proto``) keeps them causal, and the attribute is really read (0 differs)."""
    func = OPS["TailCausalAttention"].module("onnx_function").function(23)
    assert "causal" not in func.attribute
    assert [(a.name, a.type, a.i) for a in func.attribute_proto] == [("causal", onnx.AttributeProto.INT, 1)]
    ref = OPS["TailCausalAttention"].module("reference").reference
    worst, apart = 0.0, 0.0
    for seed in range(12):
        args = tca_case(seed)
        got = _ort(_ort_model("TailCausalAttention", args), args)
        worst = max(worst, float(np.abs(got - ref(*args, causal=1).numpy()).max()))
        apart = max(apart, float(np.abs(got - ref(*args, causal=0).numpy()).max()))
    assert worst <= 1e-5, worst
    assert apart > 1e-2, apart


def _bidirectional_by_hand(q, k, v, valid):
    """Full attention over the real keys, written out per row: query i (at key position
    ``Lk - Lq + i``) sees every real key, and a padding query (left of the real tail) also
    itself, as ``models.attention.bidirectional_mask`` computes ``real | itself`` (its docstring
    says a padding query sees only itself; the code, which the model runs, is the contract)."""
    b, h, lq, dh = q.shape
    lk = k.shape[2]
    out = torch.empty_like(q)
    for bi in range(b):
        first = lk - min(max(int(valid[bi]), 0), lk)
        for i in range(lq):
            pos = lk - lq + i
            keys = list(range(first, lk)) if pos >= first else [pos, *range(first, lk)]
            s = q[bi, :, i:i + 1] @ k[bi][:, keys].transpose(-1, -2) / math.sqrt(dh)  # [H, 1, keys]
            out[bi, :, i] = (torch.softmax(s, -1) @ v[bi][:, keys])[:, 0]
    return out


def test_bidirectional_mode_is_full_attention_over_the_real_keys():
    """causal=0 on every backend against a per-row formula written here; causal=1 gives a
    different answer wherever a real query has a later real key."""
    triton_kernel = None
    try:
        import triton  # noqa: F401

        triton_kernel = OPS["TailCausalAttention"].module("triton_kernel")
    except ImportError:
        pass
    ref = OPS["TailCausalAttention"].module("reference").reference
    differs = 0
    for seed in range(10):
        args = tca_case(seed)
        want = _bidirectional_by_hand(*args)
        assert (ref(*args, causal=0) - want).abs().max() <= 1e-5
        assert np.abs(_ort(_ort_model("TailCausalAttention", args, causal=0), args) - want.numpy()).max() <= 1e-5
        if triton_kernel is not None:
            assert (triton_kernel.run_interpreted(*args, causal=0) - want).abs().max() <= 1e-5
        differs += bool((ref(*args, causal=1) - want).abs().max() > 1e-3)
    assert differs >= 3, differs


def test_causal_values_other_than_0_and_1_are_refused():
    from onetrans_trt.plugins.tail_causal_attention import trt_plugin

    args = tca_case(0)
    with pytest.raises(ValueError, match="causal must be 0 or 1"):
        OPS["TailCausalAttention"].module("reference").reference(*args, causal=2)
    with pytest.raises(ValueError, match="causal must be 0 or 1"):
        trt_plugin.causal_mode(np.array([2], np.int32))
    assert trt_plugin.causal_mode(np.array([0], np.int32)) == 0 and trt_plugin.causal_mode(np.array([1], np.int32)) == 1
    with pytest.raises(ValueError, match="int attribute"):
        trt_plugin.causal_mode(np.array([1.0], np.float32))
    pytest.importorskip("triton", reason="the 'kernels' extra (triton) is not installed")
    with pytest.raises(ValueError, match="causal must be 0 or 1"):
        OPS["TailCausalAttention"].module("triton_kernel").run_interpreted(*args, causal=-1)


def test_function_defaults_and_required_attributes_do_not_overlap():
    from onetrans_trt.plugins._onnx import Body, make_function

    with pytest.raises(ValueError, match="both with and without a default"):
        make_function("X", ["a"], ["b"], Body("X"), ["causal"], defaults={"causal": 1})


# ---------------------------------------------------------------- SharedDecodeAttention


def _sda_by_hand(q, k, v, valid):
    """softmax over the last min(valid, n) keys per query row, written out; no key: 0."""
    c, h, nq, dh = q.shape
    n = k.shape[2]
    keep = min(max(int(valid.reshape(-1)[0]), 0), n)
    if keep == 0:
        return torch.zeros_like(q)
    kr, vr = k[:, :, n - keep:], v[:, :, n - keep:]  # [1, H, keep, dh]
    return torch.softmax(q @ kr.transpose(-1, -2) / math.sqrt(dh), -1) @ vr


def test_shared_decode_is_softmax_over_the_real_keys():
    ref = OPS["SharedDecodeAttention"].module("reference").reference
    for seed in range(16):
        args = sda_case(seed)
        want = _sda_by_hand(*args)
        assert (ref(*args) - want).abs().max() <= 1e-5
        assert np.abs(_ort(_ort_model("SharedDecodeAttention", args), args) - want.numpy()).max() <= 1e-5


@pytest.mark.parametrize("n,valid", [(0, 0), (0, 5), (7, 0), (33, -2)])
def test_shared_decode_rows_without_a_real_key_are_exactly_zero(n, valid):
    g = torch.Generator().manual_seed(n + 100)
    q = torch.randn(3, 2, 4, 16, generator=g)
    k, v = (torch.randn(1, 2, n, 16, generator=g) for _ in range(2))
    args = [q, k, v, torch.tensor([valid])]
    zeros = np.zeros(q.shape, np.float32)
    assert np.array_equal(OPS["SharedDecodeAttention"].module("reference").reference(*args).numpy(), zeros)
    assert np.array_equal(_ort(_ort_model("SharedDecodeAttention", args), args), zeros)
    pytest.importorskip("triton", reason="the 'kernels' extra (triton) is not installed")
    kernel = OPS["SharedDecodeAttention"].module("triton_kernel")
    assert np.array_equal(kernel.run_interpreted(*args).numpy(), zeros)
    half = [a.half() if a.is_floating_point() else a for a in args]
    assert np.array_equal(kernel.run_interpreted(*half).float().numpy(), zeros)


def test_shared_decode_function_never_reduces_over_an_empty_axis():
    """With n == 0 (and with no real key) every ReduceMax/ReduceSum of the ONNX function still
    reads a non-empty key axis (ONNX leaves a reduction over an empty axis to the runtime), and
    the output is 0: the function inlined, each reduction's input exposed as a graph output."""
    import onnx.inliner

    for n, valid in ((0, 0), (0, 3), (5, 0)):
        g = torch.Generator().manual_seed(7)
        q = torch.randn(2, 2, 3, 8, generator=g)
        k, v = (torch.randn(1, 2, n, 8, generator=g) for _ in range(2))
        args = [q, k, v, torch.tensor([valid])]
        model = onnx.inliner.inline_local_functions(_ort_model("SharedDecodeAttention", args))
        reduced = [nd.input[0] for nd in model.graph.node if nd.op_type in ("ReduceMax", "ReduceSum")]
        assert len(reduced) == 2, [nd.op_type for nd in model.graph.node]
        model.graph.output.extend(helper.make_empty_tensor_value_info(x) for x in reduced)
        import onnxruntime as ort

        sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        res = sess.run(None, {i.name: a.numpy() for i, a in zip(sess.get_inputs(), args)})
        assert np.array_equal(res[0], np.zeros(q.shape, np.float32))
        for x in res[1:]:
            assert x.shape[-1] == n + 1 >= 1, x.shape
