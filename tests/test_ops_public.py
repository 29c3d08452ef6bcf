"""onetrans_trt.ops: a user's module that calls our helpers exports our fused nodes, and ORT
running them (through the ops' ONNX functions) equals the eager output."""

import math

import numpy as np
import pytest
import torch
from torch.export import Dim

from onetrans_trt import ops
from onetrans_trt.models.attention import NEG_INF
from onetrans_trt.plugins import attach_op_functions
from tests.helpers import ort_run

H, DH, T = 2, 8, 3


def _plain_shared_prefix(q, kp, vp, valid, ko, vo, scale):
    """Softmax over [real prefix ; own keys <= i], written out independently of the package."""
    c, h, t, dh = q.shape
    n = kp.shape[2]
    k = torch.cat([kp.expand(c, -1, -1, -1), ko], 2)
    v = torch.cat([vp.expand(c, -1, -1, -1), vo], 2)
    real = torch.arange(n) >= n - int(valid.reshape(-1)[0])
    own = torch.ones(t, t, dtype=torch.bool).tril()
    mask = torch.cat([real.expand(t, n), own], 1)
    s = (q @ k.transpose(-1, -2)) * scale
    return torch.softmax(s.masked_fill(~mask, NEG_INF), -1) @ v


class Scorer(torch.nn.Module):
    def __init__(self, scale=None):
        super().__init__()
        self.scale = scale
        self.proj = torch.nn.Linear(DH, 3 * DH)

    def forward(self, cand_x, user_k_0, user_v_0, hist_len):  # cand_x [C, H, T, dh]
        q, k, v = self.proj(cand_x).chunk(3, -1)
        out = ops.shared_prefix_attention(q, user_k_0, user_v_0, hist_len, k, v, scale=self.scale)
        return out.sum((1, 2, 3)).unsqueeze(1)


class Encoder(torch.nn.Module):
    def __init__(self, lq, scale=None):
        super().__init__()
        self.lq, self.scale = lq, scale
        self.proj = torch.nn.Linear(DH, 3 * DH)

    def forward(self, hist_x, hist_len):  # hist_x [B, H, L, dh]
        q, k, v = self.proj(hist_x).chunk(3, -1)
        return ops.tail_causal_attention(q[:, :, -self.lq:], k, v, hist_len, scale=self.scale)


def _export(module, args, names, dynamic):
    prog = torch.onnx.export(module.eval(), args, dynamo=True, opset_version=23, input_names=names,
                             output_names=["out"], dynamic_shapes=dynamic, external_data=False, verbose=False)
    return prog.model_proto


@pytest.mark.parametrize("scale", [None, 0.2])
def test_shared_prefix_attention_exports_our_node_and_ort_equals_eager(scale):
    torch.manual_seed(0)
    module = Scorer(scale)
    L = 7
    args = (torch.randn(3, H, T, DH), torch.randn(1, H, L, DH), torch.randn(1, H, L, DH), torch.tensor([4]))
    names = ["cand_x", "user_k_0", "user_v_0", "hist_len"]
    cands, kv = Dim("candidates", min=1, max=4096), Dim("kv_len_0", min=1, max=4096)
    model = _export(module, args, names, ({0: cands}, {2: kv}, {2: kv}, None))
    ours = [n for n in model.graph.node if n.domain == "onetrans"]
    assert [n.op_type for n in ours] == ["SharedPrefixAttention"]
    attrs = {a.name: a for a in ours[0].attribute}
    assert attrs["plugin_namespace"].s == b"onetrans" and attrs["aot"].i == 1
    assert attrs["scale"].f == pytest.approx(1 / math.sqrt(DH) if scale is None else scale, rel=1e-6)
    assert not [n for n in model.graph.node if n.op_type in ("Expand", "Tile")]  # nothing copied per candidate
    model = attach_op_functions(model)
    rng = np.random.default_rng(1)
    for c in (1, 5):
        for n in (0, 1, 3, L, L + 4):  # empty, short, full and over-long prefixes
            x = [torch.from_numpy(rng.standard_normal(s).astype(np.float32))
                 for s in ((c, H, T, DH), (1, H, L, DH), (1, H, L, DH))]
            valid = torch.tensor([n])
            with torch.no_grad():
                want = module(*x, valid).numpy()
                q, k, v = module.proj(x[0]).chunk(3, -1)
                plain = _plain_shared_prefix(q, x[1], x[2], valid, k, v, scale or 1 / math.sqrt(DH))
                eager = ops.shared_prefix_attention(q, x[1], x[2], valid, k, v, scale=scale)
            np.testing.assert_allclose(eager.numpy(), plain.numpy(), atol=1e-5)  # eager is the math
            got = ort_run(model, {"cand_x": x[0].numpy(), "user_k_0": x[1].numpy(), "user_v_0": x[2].numpy(),
                                  "hist_len": valid.numpy()})[0]
            np.testing.assert_allclose(got, want, atol=1e-5, err_msg=f"C={c} valid={n}")


@pytest.mark.parametrize("scale", [None, 0.5])
def test_tail_causal_attention_exports_our_node_and_ort_equals_eager(scale):
    torch.manual_seed(0)
    L, lq = 9, 4
    module = Encoder(lq, scale)
    args = (torch.randn(2, H, L, DH), torch.tensor([5, 9]))
    users, hist = Dim("users", min=1, max=64), Dim("history", min=lq, max=4096)
    model = _export(module, args, ["hist_x", "hist_len"], ({0: users, 2: hist}, {0: users}))
    ours = [n for n in model.graph.node if n.domain == "onetrans"]
    assert [n.op_type for n in ours] == ["TailCausalAttention"]
    scale_attr = next(a.f for a in ours[0].attribute if a.name == "scale")
    assert scale_attr == pytest.approx(1 / math.sqrt(DH) if scale is None else scale, rel=1e-6)
    model = attach_op_functions(model)
    rng = np.random.default_rng(2)
    for b, lens in ((1, [0]), (3, [1, L, L + 3])):
        x = torch.from_numpy(rng.standard_normal((b, H, L, DH)).astype(np.float32))
        valid = torch.tensor(lens * (b // len(lens)))
        with torch.no_grad():
            want = module(x, valid).numpy()
        got = ort_run(model, {"hist_x": x.numpy(), "hist_len": valid.numpy()})[0]
        np.testing.assert_allclose(got, want, atol=1e-5, err_msg=str(lens))


def test_eager_scale_is_applied():
    """A non-default scale changes the eager result as plain softmax(q k^T * scale) says."""
    torch.manual_seed(3)
    q, k, v = (torch.randn(1, H, 5, DH) for _ in range(3))
    valid = torch.tensor([5])
    for scale in (None, 0.05, 1.0):
        s = q @ k.transpose(-1, -2) * (scale or 1 / math.sqrt(DH))
        causal = torch.ones(5, 5, dtype=torch.bool).tril()
        want = torch.softmax(s.masked_fill(~causal, NEG_INF), -1) @ v
        np.testing.assert_allclose(ops.tail_causal_attention(q, k, v, valid, scale=scale).numpy(), want.numpy(),
                                   atol=1e-6)


class Decoder(torch.nn.Module):
    def forward(self, cand_x, user_k_0, user_v_0, seq_len):  # cand_x [C, H, N, dh]
        return ops.shared_decode_attention(cand_x * 2.0, user_k_0, user_v_0, seq_len).sum((1, 2, 3)).unsqueeze(1)


def test_shared_decode_attention_exports_our_node_and_ort_equals_eager_and_plain_math():
    torch.manual_seed(4)
    module = Decoder()
    args = (torch.randn(3, H, 2, DH), torch.randn(1, H, 6, DH), torch.randn(1, H, 6, DH), torch.tensor([4]))
    cands, n = Dim("candidates", min=1, max=1024), Dim("n", min=1, max=4096)
    model = _export(module, args, ["cand_x", "user_k_0", "user_v_0", "seq_len"],
                    ({0: cands}, {2: n}, {2: n}, None))
    ours = [o for o in model.graph.node if o.domain == "onetrans"]
    assert [o.op_type for o in ours] == ["SharedDecodeAttention"]
    model = attach_op_functions(model)
    rng = np.random.default_rng(5)
    for c, length, real in ((2, 6, 4), (1, 3, 0), (4, 5, 9)):
        x, k, v = (torch.from_numpy(rng.standard_normal(s).astype(np.float32))
                   for s in ((c, H, 2, DH), (1, H, length, DH), (1, H, length, DH)))
        valid = torch.tensor([real])
        with torch.no_grad():
            want = module(x, k, v, valid).numpy()
        s_ = (x * 2.0) @ k.transpose(-1, -2) / math.sqrt(DH)  # written out: softmax over the real keys, 0 for none
        keep = torch.arange(length) >= length - real
        p = torch.softmax(s_.masked_fill(~keep, NEG_INF), -1).nan_to_num(0.0) if real else torch.zeros_like(s_)
        plain = (p @ v).sum((1, 2, 3)).unsqueeze(1).numpy()
        np.testing.assert_allclose(want, plain, atol=1e-5)
        got = ort_run(model, {"cand_x": x.numpy(), "user_k_0": k.numpy(), "user_v_0": v.numpy(),
                              "seq_len": valid.numpy()})[0]
        np.testing.assert_allclose(got, want, atol=1e-5, err_msg=f"C={c} n={length} valid={real}")


@pytest.mark.parametrize("causal", [True, False])
def test_tail_causal_attention_writes_causal_and_bidirectional_differs(causal):
    """The node always carries ``causal`` (TensorRT's plugin has no default for a missing one);
    causal=False lets every query see every real key."""
    torch.manual_seed(6)
    q, k, v = (torch.randn(1, H, 5, DH) for _ in range(3))
    valid = torch.tensor([4])

    class Enc(torch.nn.Module):
        def forward(self, x, n):
            return ops.tail_causal_attention(x, x, x, n, causal=causal)

    model = _export(Enc(), (q, valid), ["x", "n"], ({0: Dim("users", min=1, max=64)}, {0: Dim("users", min=1, max=64)}))
    (node,) = [o for o in model.graph.node if o.domain == "onetrans"]
    assert next(a.i for a in node.attribute if a.name == "causal") == int(causal)
    got = ort_run(attach_op_functions(model), {"x": q.numpy(), "n": valid.numpy()})[0]
    real = torch.arange(5) >= 1
    seen = (torch.ones(5, 5, dtype=torch.bool).tril() if causal else torch.ones(5, 5, dtype=torch.bool)) & real
    seen |= torch.eye(5, dtype=torch.bool)
    want = torch.softmax((q @ q.transpose(-1, -2) / math.sqrt(DH)).masked_fill(~seen, NEG_INF), -1) @ q
    np.testing.assert_allclose(got, want.numpy(), atol=1e-5)
    np.testing.assert_allclose(ops.tail_causal_attention(q, q, q, valid, causal=causal).numpy(), want.numpy(), atol=1e-6)
