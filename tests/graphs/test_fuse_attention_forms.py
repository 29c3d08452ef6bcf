"""fuse-attention on the other ways exporters write the same attention: the scale before or after
the product, as Mul (either operand order) or Div by sqrt(dh); K transposed in the graph or given
pre-transposed; the mask as Where (either order) or added (either side, torch's ``zeros_like``
form too); Softmax on axis -1 or 3. Each form is fused to the same op and ONNX Runtime computes
the same before and after; lookalikes of the new forms are left alone."""

from __future__ import annotations

import math

import numpy as np
import pytest
from onnx import numpy_helper

from onetrans_trt.graphs.fuse_attention import count_fused, fuse_attention
from onetrans_trt.plugins._onnx import DOMAIN
from tests.graphs.test_fuse_attention_unit import DH, H, L, NINF, SCALE, _same, _sp_feeds, _sp_graph, _tail_mask
from tests.mutation_kills.onnx_kit import I64, G, ops

SCALES = ["mul", "mul_first", "div", "q_mul", "q_mul_first", "q_div", "qk_mul", "qk_mul_first"]
MASKS = ["where", "where_fill_first", "add", "add_left", "add_fill_first", "add_zeros_like"]


def _form_graph(scale="mul", mask="where", k_form="transpose", axis=-1, *, fill=NINF, zero=0.0, gain=None) -> G:
    """One tail-causal attention written in the given form; ``gain``: a graph input as Q's scale."""
    g = G()
    q, v = g.input("q", ["b", H, L, DH]), g.input("v", ["b", H, L, DH])
    length = g.input("s_length", ["b"], I64)
    if k_form == "transpose":
        kt = g.op("Transpose", g.input("k", ["b", H, L, DH]), perm=[0, 1, 3, 2])
    else:  # the exporter hands K^T over: [B, H, dh, L] (or dims that say nothing)
        kt = g.input("k_t", ["b", H, DH, L] if k_form == "pre_transposed" else ["b", "h", "d", "l"])
    c = lambda x: g.const(np.float32(x))  # noqa: E731
    if scale.startswith("q_"):
        s_q = g.input("gain", []) if gain else c(math.sqrt(DH) if scale == "q_div" else SCALE)
        op = "Div" if scale == "q_div" else "Mul"
        s = g.op("MatMul", g.op(op, *((s_q, q) if scale.endswith("first") else (q, s_q))), kt)
    elif scale.startswith("qk_"):  # torch's SDPA decomposition: sqrt(scale) on both sides
        r = g.input("gain", []) if gain else c(math.sqrt(SCALE))
        first = scale.endswith("first")
        s = g.op("MatMul", g.op("Mul", *((r, q) if first else (q, r))), g.op("Mul", *((r, kt) if first else (kt, r))))
    else:
        qk = g.op("MatMul", q, kt)
        s = {"mul": lambda: g.op("Mul", qk, c(SCALE)), "mul_first": lambda: g.op("Mul", c(SCALE), qk),
             "div": lambda: g.op("Div", qk, c(math.sqrt(DH)))}[scale]()
    keep = _tail_mask(g, q, length)  # [B, 1, L, L], True: the key is seen
    drop = g.op("Not", keep)
    if mask == "where":
        s = g.op("Where", keep, s, c(fill))
    elif mask == "where_fill_first":
        s = g.op("Where", drop, c(fill), s)
    else:
        if mask == "add_fill_first":
            bias = g.op("Where", drop, c(fill), c(zero))
        elif mask == "add_zeros_like":  # torch.zeros_like(s).masked_fill(~keep, -inf)
            bias = g.op("Where", drop, c(fill), g.op("Expand", c(zero), g.op("Shape", s)))
        else:
            bias = g.op("Where", keep, c(zero), c(fill))
        s = g.op("Add", bias, s) if mask == "add_left" else g.op("Add", s, bias)
    g.op("MatMul", g.op("Softmax", s, axis=axis), v, out="o")
    g.output("o", ["b", H, L, DH])
    return g


def _feeds(g: G, b=2, seed=0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for vi in g.inputs:
        dims = [d.dim_value if d.HasField("dim_value") else {"b": b, "h": H, "d": DH, "l": L}[d.dim_param]
                for d in vi.type.tensor_type.shape.dim]
        if vi.name == "s_length":
            out[vi.name] = np.array([L, 2, 0][:b], np.int64)
        else:
            out[vi.name] = rng.standard_normal(dims).astype(np.float32) if dims else np.array(SCALE, np.float32)
    return out


def _check_fused(g: G, q="q", k="k"):
    after = fuse_attention(g.gs())
    assert after.__dict__["fused_attention"] == 1 and count_fused(after) == {"TailCausalAttention": 1}
    (n,) = [n for n in after.nodes if n.domain == DOMAIN]
    assert n.name == "TailCausalAttention_1" and n.outputs[0].name == "o"
    assert n.attrs["scale"] == pytest.approx(SCALE, rel=1e-6)
    assert n.inputs[0].name == q and n.inputs[2].name == "v" and n.inputs[3].name == "s_length"
    assert n.inputs[1].name == k
    assert not {"Softmax", "Where", "Range", "Mul", "Div"} & set(ops(after))  # scale and mask went with it
    for b, seed in ((2, 0), (3, 1), (1, 2)):
        _same(g.model(), after, _feeds(g, b, seed))
    return n


@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("scale", SCALES)
def test_every_scale_and_mask_form_is_fused_and_computes_the_same(scale, mask):
    _check_fused(_form_graph(scale, mask, axis=-1 if SCALES.index(scale) % 2 else 3))


@pytest.mark.parametrize("axis", [-1, 3])
@pytest.mark.parametrize("scale", ["mul", "q_div", "qk_mul"])
def test_a_pre_transposed_k_is_fused_with_k_brought_back(scale, axis):
    n = _check_fused(_form_graph(scale, "add", k_form="pre_transposed", axis=axis), k="k_t__bhtd")
    assert n.inputs[1].inputs[0].op == "Transpose" and n.inputs[1].inputs[0].attrs["perm"] == [0, 1, 3, 2]
    assert n.inputs[1].inputs[0].inputs[0].name == "k_t" and n.inputs[1].shape == ["b", H, L, DH]


@pytest.mark.parametrize("kw", [
    {"mask": "add", "fill": -1e9},  # not -inf: not this op's mask
    {"mask": "add_left", "zero": 0.5},  # a bias that is not 0 where keys are seen
    {"mask": "add_zeros_like", "zero": 1.0},
    {"scale": "q_mul", "gain": True},  # Q scaled by an input, not a constant
    {"scale": "qk_mul", "gain": True, "mask": "add"},
    {"k_form": "pre_transposed_unknown"},  # K^T whose shape does not say it is one
    {"mask": "add", "axis": 2},
], ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_lookalikes_of_the_new_forms_are_left_alone(kw):
    g = _form_graph(**kw)
    after = fuse_attention(g.gs())
    assert after.__dict__["fused_attention"] == 0 and count_fused(after) == {} and "Softmax" in ops(after)
    _same(g.model(), after, _feeds(g))


def _scale_consts(g: G) -> set[str]:
    return {t.name for t in g.inits if t.data_type == 1 and numpy_helper.to_array(t).size == 1
            and np.isclose(numpy_helper.to_array(t), SCALE)}


def test_shared_prefix_with_both_scales_as_div_by_sqrt_dh_is_fused():
    g = _sp_graph()
    scales = _scale_consts(g)
    for n in g.nodes:
        if n.op_type == "Mul" and n.input[1] in scales:
            n.op_type, n.input[1] = "Div", g.const(math.sqrt(DH))
    assert [n.op_type for n in g.nodes].count("Div") == 3  # the two scales and the merge
    after = fuse_attention(g.gs())
    assert count_fused(after) == {"SharedPrefixAttention": 1}
    (n,) = [n for n in after.nodes if n.domain == DOMAIN]
    assert n.attrs["scale"] == pytest.approx(SCALE, rel=1e-6)
    assert [t.name for t in n.inputs] == ["ns_q", "user_k_0", "user_v_0", "s_length", "ns_k", "ns_v"]
    for f in (_sp_feeds(), _sp_feeds(c=1, n=4, valid=0, seed=1), _sp_feeds(c=4, n=7, valid=7, seed=2)):
        _same(g.model(), after, f)


def test_one_scale_as_mul_the_other_as_div_is_fused_when_they_agree():
    g = _sp_graph()
    scales = _scale_consts(g)
    own = next(n for n in reversed(g.nodes) if n.op_type == "Mul" and n.input[1] in scales)
    own.op_type, own.input[1] = "Div", g.const(math.sqrt(DH))
    after = fuse_attention(g.gs())
    assert count_fused(after) == {"SharedPrefixAttention": 1}
    _same(g.model(), after, _sp_feeds())
    own.input[1] = g.const(3.0)  # 1/3 against 1/sqrt(dh): not one attention's scale
    assert count_fused(fuse_attention(g.gs())) == {}


@pytest.mark.slow
def test_attention_written_other_ways_in_torch_is_fused_after_export(tmp_path):
    """Three attentions as people write them in PyTorch (Div by sqrt(dh) and masked_fill; Q scaled
    and a zeros_like bias added on the left; torch.where bias added on the right, softmax on dim 3),
    exported by the exporter our builds use: all three fused, outputs unchanged."""
    import onnx
    import onnx_graphsurgeon as gs
    import torch

    from onetrans_trt.export.api import trace_onnx
    from onetrans_trt.models.attention import tail_causal_mask
    from tests.mutation_kills.onnx_kit import run

    class Styles(torch.nn.Module):
        input_names, output_names = ["q", "k", "v", "s_length"], ["o_div", "o_bias", "o_where"]

        def forward(self, q, k, v, s_length):
            keep = tail_causal_mask(k.shape[2], q.shape[2], s_length)
            s = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
            o_div = torch.softmax(s.masked_fill(~keep, float("-inf")), dim=-1) @ v
            s = torch.matmul(q * SCALE, k.transpose(-2, -1))
            o_bias = torch.softmax(torch.zeros_like(s).masked_fill(~keep, float("-inf")) + s, dim=-1) @ v
            s = torch.matmul(q, k.permute(0, 1, 3, 2)) * SCALE
            o_where = torch.softmax(s + torch.where(keep, 0.0, float("-inf")), dim=3) @ v
            return o_div, o_bias, o_where

    rng = np.random.default_rng(0)
    feeds = lambda b: {**{n: rng.standard_normal((b, H, L, DH)).astype(np.float32) for n in "qkv"},  # noqa: E731
                       "s_length": np.array([L, 2, 0][:b], np.int64)}
    path = tmp_path / "styles.onnx"
    trace_onnx(Styles(), feeds(2), path, 23, {n: {0: "b"} for n in Styles.input_names})
    model = onnx.load(str(path))
    after = fuse_attention(gs.import_onnx(model))
    assert count_fused(after) == {"TailCausalAttention": 3} and "Softmax" not in ops(after)
    assert sorted(n.outputs[0].name for n in after.nodes if n.domain == DOMAIN) == ["o_bias", "o_div", "o_where"]
    for b in (2, 3, 1):
        f = feeds(b)
        for want, got in zip(run(model, f), run(after, f)):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
