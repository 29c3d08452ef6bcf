"""shared-prefix on hand-made naive scorers (no tracing): each way of copying the user's K/V per
candidate is rewritten into one SharedPrefixAttention and proven, the count it reads is the one
the mask uses, lookalikes with another mask stay (and no-broadcast still reports them), and ONNX
Runtime computes the same before and after on inputs the proof never saw."""

from __future__ import annotations

import math

import numpy as np
import onnx_graphsurgeon as gs
import pytest
from onnx import helper

from onetrans_trt.graphs import shared_prefix as sp
from onetrans_trt.graphs.no_broadcast import kv_broadcasts
from onetrans_trt.plugins._onnx import DOMAIN, PLUGIN_NAMESPACE
from tests.mutation_kills.onnx_kit import BOOL, F32, I64, G, ops, run

H, DH, T = 2, 4, 2
NINF = -np.inf


def naive(*, layout="bhld", attn="matmul_add", copy="expand", own="causal", padding="left", layers=1,
          length="user_hist_len", length_type=I64, length_shape=(1,), sep=False, kv_heads=H, scale="div",
          static_kv=None, is_causal=0, softcap=0.0, extra_attention_output=False, q3d=False, attn_scale=None,
          extra_inputs=(), flags=()) -> G:
    g = G(opset=23)
    kvlen = static_kv or "kv_len_0"
    q = g.input("ns_q", ["candidates", H, T, "dh" if "q_dh_symbolic" in flags else DH])
    if "extra_first" in flags:
        for name, dt in extra_inputs:
            g.input(name, [1], dt)
    g.input(length, list(length_shape), length_type)
    for name, dt in ([] if "extra_first" in flags else extra_inputs):
        g.input(name, [1], dt)
    n_axis = 2 if layout == "bhld" else 1
    cshape = g.op("Shape", q, start=0, end=1, shape=[1], dtype=I64)
    hl = g.op("Cast", g.op("Reshape", length, g.const([1], np.int64)), to=7, shape=[1], dtype=I64)
    if sep:  # a SEP token counts as real: the mask reads n_hist + 1
        hl = g.op("Add", hl, g.const([1], np.int64), shape=[1], dtype=I64, out="n_real")
    if "noise_first" in flags:
        _noise(g, q)
    x = q
    for li in range(layers):
        kv_shape = [1, kv_heads, kvlen, DH] if layout == "bhld" else [1, kvlen, kv_heads, DH]
        uk, uv = g.input(f"user_k_{li}", kv_shape), g.input(f"user_v_{li}", kv_shape)
        own_shape = ["candidates", H, T, DH] if layout == "bhld" else ["candidates", T, H, DH]
        ko, vo = g.input(f"ns_k_{li}", own_shape), g.input(f"ns_v_{li}", own_shape)
        if copy == "mul_expand":
            uk = g.op("Mul", uk, g.const(0.5), shape=kv_shape)
        if "scale_first_before_copy" in flags:
            uk = g.op("Mul", g.const(0.5), uk, shape=kv_shape)
        if "zeros_like_k" in flags:  # a tensor shaped like K, not K: no copy of the user's K/V
            uk = g.op("ConstantOfShape", g.op("Shape", uk), value=helper.make_tensor("z", F32, [1], [0.0]),
                      shape=kv_shape)
        rest = [H if kv_heads != H and layout == "bhld" else 1, 1, H if kv_heads != H and layout != "bhld" else 1]
        how = g.op("Concat", cshape, g.const(rest, np.int64), axis=0, shape=[4], dtype=I64)
        if "copy_how_from_shapes" in flags:  # the target shape read from tensors: [C] + K's own [H, L, dh]
            how = g.op("Concat", cshape, g.op("Shape", f"user_k_{li}", start=1, end=4), axis=0, shape=[4], dtype=I64)
        if "const_how" in flags:  # a constant target (structure tests only: it fits C = 1)
            how = g.const([1, 1, 1, 1], np.int64)
        cp_shape = ["candidates", H, kvlen, DH] if layout == "bhld" else ["candidates", kvlen, H, DH]
        op = "Tile" if copy == "tile" else "Expand"
        if copy == "tile" and kv_heads != H:
            raise ValueError("tile with grouped heads is not built here")
        cps = None if "copy_unshaped" in flags or "copy_untyped" in flags else cp_shape
        kb, vb = g.op(op, uk, how, shape=cps), g.op(op, uv, how, shape=cps)
        if "copy_unshaped" in flags:  # the copy's type declared, its shape not
            g.infos += [helper.make_tensor_value_info(kb, F32, None), helper.make_tensor_value_info(vb, F32, None)]
        if "mid_mul" in flags:  # a scale between the copy and the concat
            kb = g.op("Mul", kb, g.const(0.5), shape=cp_shape)
        cat = ["candidates", H, f"{kvlen} + {T}", DH] if layout == "bhld" else ["candidates", f"{kvlen} + {T}", H, DH]
        cat_shape = None if "k_unshaped" in flags else cat
        K, V = g.op("Concat", kb, ko, axis=n_axis, shape=cat_shape), g.op("Concat", vb, vo, axis=n_axis, shape=cat_shape)
        if "post_mul_first" in flags:  # scale after the concat, the constant first
            K = g.op("Mul", g.const(0.5), K, shape=cat)
        if "post_constant_node" in flags:  # a scale from a Constant node
            K = g.op("Mul", K, g.op("Constant", value=helper.make_tensor("h", F32, [], [0.5])), shape=cat)
        if "post_cast" in flags:  # through float64 and back
            K = g.op("Cast", g.op("Cast", K, to=11, shape=cat, dtype=11), to=1, shape=cat)
        if "post_div" in flags:
            K = g.op("Div", K, g.const(2.0), shape=cat)
        if "sub_const_first" in flags:  # c - K: not replayed
            K = g.op("Sub", g.const(1.0), K, shape=cat)
        if "div_const_first" in flags:  # c / K: not replayed
            K = g.op("Div", g.const(1.0), K, shape=cat)
        if layout != "bhld":
            K = g.op("Transpose", K, perm=[0, 2, 1, 3], shape=["candidates", H, f"{kvlen} + {T}", DH])
            V = g.op("Transpose", V, perm=[0, 2, 1, 3], shape=["candidates", H, f"{kvlen} + {T}", DH])
        n = g.op("Shape", f"user_k_{li}", start=n_axis, end=n_axis + 1, shape=[1], dtype=I64)
        j = g.op("Range", g.const(0, np.int64), g.op("Squeeze", n), g.const(1, np.int64))
        real = g.op("GreaterOrEqual", j, g.op("Sub", n, hl)) if padding == "left" else g.op("Less", j, hl)
        real = g.op("Expand", g.op("Unsqueeze", real, g.const([0], np.int64)), g.op("Concat", g.const([T], np.int64), n,
                                                                                   axis=0))
        own_mask = np.tril(np.ones((T, T), bool)) if own == "causal" else np.ones((T, T), bool)
        mask = g.op("Concat", real, g.const(own_mask, dtype=bool), axis=1)  # [T, n + T]
        if attn.startswith("attention"):
            m = mask if attn == "attention_bool" else g.op("Where", mask, g.const(0.0), g.const(NINF))
            attrs = {"is_causal": is_causal}
            if softcap:
                attrs["softcap"] = softcap
            if attn_scale is not None:
                attrs["scale"] = attn_scale
            qq = g.op("Reshape", x, g.const([0, T, H * DH], np.int64), shape=["candidates", T, H * DH]) if q3d else x
            outs = 2 if extra_attention_output else 1
            a = g.op("Attention", qq, K, V, m, outputs=outs, q_num_heads=H, kv_num_heads=H, **attrs) if q3d else \
                g.op("Attention", qq, K, V, m, *([""] * 2 if "attention_empty_tail" in flags else []), outputs=outs,
                     **attrs)
            if extra_attention_output:
                g.output(g.nodes[-1].output[1])
            if q3d:
                a = g.op("Reshape", a, g.const([0, T, H, DH], np.int64))
                a = g.op("Transpose", a, perm=[0, 2, 1, 3])
        else:
            s = g.op("MatMul", x, g.op("Transpose", K, perm=[0, 1, 3, 2]))
            if "mask_then_scale" not in flags:
                s = g.op("Div", s, g.const(math.sqrt(DH))) if scale == "div" else g.op("Mul", g.const(1 / math.sqrt(DH)), s)
            if "mask_from_product" in flags:  # the same mask, through a product and a cast
                mf = g.op("Cast", mask, to=F32)
                mask = g.op("Cast", g.op("MatMul", g.const(np.eye(T)), mf), to=BOOL)
            if "sub_mask" in flags:  # scores minus (0 | inf)
                s = g.op("Sub", s, g.op("Where", mask, g.const(0.0), g.const(np.inf)))
            elif attn == "matmul_add":
                s = g.op("Add", s, g.op("Where", mask, g.const(0.0), g.const(NINF)))
            else:
                s = g.op("Where", mask, s, g.const(NINF))
            if "mask_then_scale" in flags:  # the mask added first, the scale after it
                s = g.op("Mul", s, g.const(0.5))
            sm = g.op("Softmax", s) if "softmax_no_axis" in flags else g.op(
                "Softmax", s, axis=3 if "softmax_axis3" in flags else -1)
            a = g.op("MatMul", sm, V, name=f"pv_{li}")
        x = g.op("Add", x, a)
    g.op("ReduceSum", x, g.const([1, 2, 3], np.int64), keepdims=0, out="logits")
    g.output("logits", ["candidates"])
    return g


def _noise(g: G, q: str) -> None:
    """Attention-like nodes that are no site, ahead of the real one in node order."""
    pk, pv = g.input("ns_pk", ["candidates", H, T, DH]), g.input("ns_pv", ["candidates", H, T, DH])
    outs = []
    s = g.op("MatMul", q, g.op("Transpose", pk, perm=[0, 1, 3, 2]))
    outs.append(g.op("MatMul", g.op("Softmax", s, axis=2), pv))  # softmax over another axis
    outs.append(g.op("MatMul", g.op("Softmax", g.op("Relu", s), axis=-1), pv))  # scores not traced to a product
    outs.append(g.op("MatMul", g.op("Softmax", s, axis=-1), pv))  # K/V that are no copy of the user's
    outs.append(g.op("Attention", q, pk, pv, is_causal=1))  # causal: not handled
    q3 = g.op("Reshape", q, g.const([0, T, H * DH], np.int64), shape=["candidates", T, H * DH])
    k3 = g.op("Reshape", pk, g.const([0, T, H * DH], np.int64), shape=["candidates", T, H * DH])
    v3 = g.op("Reshape", pv, g.const([0, T, H * DH], np.int64), shape=["candidates", T, H * DH])
    outs.append(g.op("Attention", q3, k3, v3, q_num_heads=H, kv_num_heads=H))  # the 3-D form
    outs.append(g.op("Attention", q, pk, pv))  # K/V that are no copy
    for i, o in enumerate(outs):
        g.op("ReduceSum", o, keepdims=0, out=f"noise_{i}")
        g.output(f"noise_{i}", [])


def feeds_for(g: G, c: int, n: int, valid: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    out = {}
    for v in g.inputs:
        dims = [d.dim_value if d.HasField("dim_value") else (c if d.dim_param == "candidates" else n)
                for d in v.type.tensor_type.shape.dim]
        if v.type.tensor_type.elem_type == F32:
            out[v.name] = rng.standard_normal(dims).astype(np.float32)
        else:
            dt = np.int32 if v.type.tensor_type.elem_type == 6 else np.int64
            out[v.name] = np.full(dims, valid, dt)
    return out


def _same(g: G, after: gs.Graph, cases=((2, 6, 3), (1, 3, 0), (4, 5, 5), (3, 7, 1))):
    for i, (c, n, valid) in enumerate(cases):
        f = feeds_for(g, c, n, valid, 100 + i)
        want, got = run(g.model(), f), run(after, f)
        assert np.isfinite(want[0]).all()
        np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-5)


def _fused(graph) -> list[gs.Node]:
    return [n for n in graph.nodes if n.op == sp.OP]


VARIANTS = {
    "expand_add": {}, "where": {"attn": "matmul_where"}, "tile": {"copy": "tile"},
    "mul_expand": {"copy": "mul_expand"}, "blhd": {"layout": "blhd"}, "mul_scale": {"scale": "mul"},
    "gqa": {"kv_heads": 1}, "attention_bool": {"attn": "attention_bool"},
    "attention_float": {"attn": "attention_float"}, "attention_scale": {"attn": "attention_bool", "attn_scale": 0.3},
    "static_kv": {"static_kv": 6},
}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_each_naive_scorer_is_rewritten_and_proven(name):
    kw = VARIANTS[name]
    g = naive(**kw)
    before = g.gs()
    assert kv_broadcasts(before)  # it copies K/V per candidate
    after = sp.shared_prefix(before)
    fused = _fused(after)
    assert len(fused) == 1
    node = fused[0]
    assert node.domain == DOMAIN and node.attrs["plugin_namespace"] == PLUGIN_NAMESPACE and node.attrs["aot"] == 1
    scale = kw.get("attn_scale", 1 / math.sqrt(DH))
    assert node.attrs["scale"] == pytest.approx(scale) and isinstance(node.attrs["scale"], float)
    rep = sp.last_report()
    assert rep == after.__dict__["shared_prefix"] and after.__dict__["fused_attention"] == 1
    assert len(rep) == 1 and rep[0]["rewritten"] is True and rep[0]["prefix_valid"] == "user_hist_len"
    assert rep[0]["k"] == "user_k_0" and rep[0]["v"] == "user_v_0" and rep[0]["scale"] == pytest.approx(scale)
    assert rep[0]["kind"] == ("Attention" if "attn" in kw and kw["attn"].startswith("attention") else "matmul")
    assert "why_not" not in rep[0]
    assert node.name == f"{sp.OP}_{rep[0]['site']}"
    assert kv_broadcasts(after) == []  # the copy is gone
    assert not {"Softmax", "Attention"} & set(ops(after))
    assert node.inputs[0].name == "ns_q" and node.inputs[3].name == "user_hist_len"
    assert len(before.nodes) == len(g.nodes)  # the graph given is unchanged
    if kw.get("kv_heads") != 1 and kw.get("copy") != "mul_expand" and kw.get("layout") != "blhd":
        assert node.inputs[1].name == "user_k_0" and node.inputs[2].name == "user_v_0"  # no copy left at all
    _same(g, after)


def test_two_layers_two_sites():
    g = naive(layers=2)
    after = sp.shared_prefix(g.gs())
    assert len(_fused(after)) == 2 and after.__dict__["fused_attention"] == 2
    assert [(r["k"], r["v"], r["rewritten"]) for r in sp.last_report()] == [
        ("user_k_0", "user_v_0", True), ("user_k_1", "user_v_1", True)]
    _same(g, after)


def test_the_count_may_be_a_tensor_of_the_mask_and_of_another_type():
    g = naive(sep=True)
    after = sp.shared_prefix(g.gs())
    assert sp.last_report()[0]["prefix_valid"] == "n_real"
    _same(g, after)
    g = naive(length_type=6, length_shape=())  # int32 scalar: cast and reshaped to [1] int64
    after = sp.shared_prefix(g.gs())
    node = _fused(after)[0]
    assert sp.last_report()[0]["prefix_valid"] == "user_hist_len"
    valid = node.inputs[3]
    assert valid.shape == [1] and np.dtype(valid.dtype) == np.int64
    assert valid.inputs[0].op == "Reshape" and valid.inputs[0].inputs[0].inputs[0].op == "Cast"
    _same(g, after)


def test_other_integer_inputs_are_tried_after_the_masks_own():
    g = naive(length="n_hist", extra_inputs=[("a_flag", I64)])  # a_flag sorts first, the mask reads n_hist
    site = sp.find_sites(g.gs())[0]
    choices = sp.count_choices(g.gs(), site)
    assert choices[0] == ("n_hist", "n_hist") and ("a_flag", "a_flag") in choices and choices[-1] == ("", None)
    assert choices.index(("a_flag", "a_flag")) > 0
    after = sp.shared_prefix(g.gs())
    assert sp.last_report()[0]["prefix_valid"] == "n_hist"
    _same(g, after)


def test_a_full_prefix_mask_is_rewritten_with_the_whole_prefix():
    g = naive(padding="right")  # right padding is not the op's: refused ...
    before = g.gs()
    after = sp.shared_prefix(before)
    rep = sp.last_report()
    assert _fused(after) == [] and rep[0]["rewritten"] is False and "prefix_valid" not in rep[0]
    assert rep[0]["why_not"].startswith("user_hist_len: C=1 length=")
    assert "whole prefix: C=" in rep[0]["why_not"] and "max abs error" in rep[0]["why_not"]
    assert kv_broadcasts(after)  # ... and no-broadcast still reports the copy
    assert after.__dict__["fused_attention"] == 0
    _same(g, after, cases=((2, 6, 3),))


def test_own_tokens_that_see_each_other_in_full_are_not_the_op():
    g = naive(own="full")
    after = sp.shared_prefix(g.gs())
    rep = sp.last_report()
    assert rep[0]["rewritten"] is False and _fused(after) == []
    assert len(rep[0]["why_not"].split("; ")) == len(sp.count_choices(g.gs(), sp.find_sites(g.gs())[0]))


def test_no_mask_count_at_all_uses_the_whole_prefix():
    g = naive(length="user_hist_len")
    # a graph whose prefix mask reads no count: every prefix key real
    g2 = G(opset=23)
    g2.__dict__.update({k: v for k, v in g.__dict__.items()})
    for node in g2.nodes:
        if node.op_type == "GreaterOrEqual":
            node.op_type = "LessOrEqual"
            node.input[1] = node.input[0]  # j <= j: always true
    after = sp.shared_prefix(g2.gs())
    assert sp.last_report()[0]["prefix_valid"] == "whole prefix"
    valid = _fused(after)[0].inputs[3]
    assert valid.inputs[0].op == "Shape" and valid.inputs[0].attrs == {"start": 2, "end": 3}
    _same(g2, after)


@pytest.mark.parametrize("kw", [{"attn": "attention_bool", "is_causal": 1}, {"attn": "attention_bool", "softcap": 5.0},
                                {"attn": "attention_bool", "extra_attention_output": True},
                                {"attn": "attention_bool", "q3d": True}], ids=lambda kw: list(kw)[-1])
def test_attention_ops_the_pass_does_not_handle_are_left(kw):
    g = naive(**kw)
    assert sp.find_sites(g.gs()) == []
    after = sp.shared_prefix(g.gs())
    assert sp.last_report() == [] and after.__dict__["fused_attention"] == 0 and _fused(after) == []


def test_not_a_scorer_graph_is_returned_as_is():
    g = G()
    g.op("Relu", g.input("x", [2]), out="y")
    g.output("y", [2])
    graph = g.gs()
    assert sp.shared_prefix(graph) is graph
    out, rep = sp.rewrite_shared_prefix(graph)
    assert rep == [] and ops(out) == ["Relu"]


def test_unnamed_nodes_get_names_and_sites_are_found_in_them():
    g = naive()
    for node in g.nodes:
        node.name = ""
    out, rep = sp.rewrite_shared_prefix(g.gs())
    assert len(rep) == 1 and rep[0]["rewritten"] and rep[0]["site"].startswith("node_")
    assert all(n.name for n in out.nodes)
    _same(g, out)


def test_scores_root_and_kv_side_refusals():
    g = G()
    q = g.input("q", [1, H, T, DH])
    k = g.input("user_k_0", [1, H, 3, DH])
    mm = g.op("MatMul", q, g.op("Transpose", k, perm=[0, 1, 3, 2]), name="qk")
    graph_in = g.input("w", [])
    chains = {
        "div": g.op("Div", mm, g.const(2.0)),
        "mul_left": g.op("Mul", g.const(3.0), mm),
        "div_by_zero": g.op("Div", mm, g.const(0.0)),
        "div_const_by": g.op("Div", g.const(2.0), mm),
        "mul_input": g.op("Mul", mm, graph_in),
        "cast": g.op("Cast", mm, to=1),
        "two_roots": g.op("Add", mm, mm),
        "relu": g.op("Relu", mm),
    }
    deep = mm
    for _ in range(10):
        deep = g.op("Mul", deep, g.const(1.0))
    chains["deep"] = deep
    graph = g.gs()
    t = graph.tensors()
    root = {name: sp._scores_root(t[v]) for name, v in chains.items()}
    assert root["div"][0].name == "qk" and root["div"][1] == pytest.approx(0.5)
    assert root["mul_left"][1] == pytest.approx(3.0) and root["cast"][1] == 1.0
    for name in ("div_by_zero", "div_const_by", "mul_input", "two_roots", "relu", "deep"):
        assert root[name] is None, name
    assert sp._kv_side(t[mm]) is None  # not a Concat of a copy


def test_one_int_and_value_sources():
    assert sp._one_int(gs.Variable("a", dtype=np.int64, shape=[1, 1]))
    assert sp._one_int(gs.Variable("a", dtype=np.int32, shape=["users"]))
    assert sp._one_int(gs.Variable("a", dtype=np.int64, shape=[]))
    assert not sp._one_int(gs.Variable("a", dtype=np.int64, shape=[2]))
    assert not sp._one_int(gs.Variable("a", dtype=np.float32, shape=[1]))
    assert not sp._one_int(gs.Variable("a", dtype=None, shape=[1]))
    assert not sp._one_int(gs.Variable("a", dtype=np.int64, shape=None))
    assert not sp._one_int(gs.Constant("a", np.array([1], np.int64)))
    assert sp._int_scalar_inputs(naive(extra_inputs=[("f", F32)]).gs()) == ["user_hist_len"]


def test_dim_sizes_and_lengths_of_the_proof():
    assert sp._dim_size("candidates", 3) == 3 and sp._dim_size("3*candidates", 1) == 1
    assert sp._dim_size("kv_len_0", 3) == sp.PROOF_KV_LEN and sp._dim_size("history", 3) == sp.PROOF_KV_LEN
    assert sp._dim_size("users", 3) == 1 and sp._dim_size("other", 3) == 2
    # every static K/V dim above 1 (heads 2, head dim 4, a static length 6) and the proof's 8: n//2, n, n+3
    assert sp._lengths(naive().model()) == [0, 1, 2, 4, 5, 7, 8, 11]
    assert sp._lengths(naive(static_kv=6).model()) == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 11]
    f = sp._feeds(naive(extra_inputs=[("flag", BOOL)]).model(), 3, "user_hist_len", 5, 7)
    assert f["user_hist_len"].tolist() == [5] and f["ns_q"].shape == (3, H, T, DH)
    assert f["user_k_0"].shape == (1, H, sp.PROOF_KV_LEN, DH) and f["flag"].dtype == np.bool_
    again = sp._feeds(naive(extra_inputs=[("flag", BOOL)]).model(), 3, "user_hist_len", 5, 7)
    assert all(np.array_equal(f[k], again[k]) for k in f)  # seeded
    other = sp._feeds(naive().model(), 3, None, 5, 7)
    assert set(np.unique(other["user_hist_len"])) <= {0, 1}


def test_proof_rejects_a_rewrite_that_differs():
    g = naive()
    proof = sp._Proof(g.gs())
    ok, why = proof.holds(g.gs(), "user_hist_len")
    assert ok and why == ""
    wrong = naive(own="full")  # another computation on the same inputs
    ok, why = proof.holds(wrong.gs(), "user_hist_len")
    assert not ok and why.startswith("C=1 length=0: max abs error ") and why.endswith(f" > {sp.ATOL}")
    broken = G()
    broken.op("Relu", broken.input("x", [1]), out="logits")
    broken.output("logits", [1])
    ok, why = proof.holds(broken.gs(), "user_hist_len")
    kind, _, msg = why.partition(": ")
    assert not ok and kind.isidentifier() and kind != "NoneType" and msg and msg != "None" and "\n" not in why
    assert list(proof.cases(None)) == [(1, None, None, 1000), (3, None, None, 3000)]
    cases = list(proof.cases("user_hist_len"))
    assert [c[2] for c in cases] == [0, 1, 2, 4, 5, 7, 8, 11] * 2 and cases[1] == (1, "user_hist_len", 1, 1001)
    assert cases[8] == (3, "user_hist_len", 0, 3000)


@pytest.mark.parametrize("flags", [("mid_mul",), ("post_mul_first",), ("post_div",), ("scale_first_before_copy",)],
                         ids=lambda f: f[0])
def test_scales_around_the_copy_are_replayed(flags):
    g = naive(flags=flags)
    after = sp.shared_prefix(g.gs())
    assert len(_fused(after)) == 1 and sp.last_report()[0]["rewritten"]
    assert kv_broadcasts(after) == []
    _same(g, after)


@pytest.mark.parametrize("flags", [("sub_const_first",), ("div_const_first",), ("zeros_like_k",)], ids=lambda f: f[0])
def test_what_is_not_a_replayable_copy_of_kv_is_no_site(flags):
    g = naive(flags=flags)
    assert sp.find_sites(g.gs()) == []
    assert sp.last_report() is not None and _fused(sp.shared_prefix(g.gs())) == []


def test_a_non_kv_broadcast_listed_first_in_the_concat():
    g = G(opset=23)  # Concat(Expand(own K of one candidate), copy of the user's K): the user's is found
    q = g.input("ns_q", ["candidates", H, T, DH])
    uk = g.input("user_k_0", [1, H, "kv_len_0", DH])
    one = g.input("ns_k1", [1, H, T, DH])
    how = g.op("Concat", g.op("Shape", q, start=0, end=1), g.const([1, 1, 1], np.int64), axis=0)
    own = g.op("Expand", g.op("Neg", one), how, shape=["candidates", H, T, DH])
    kb = g.op("Expand", uk, how, shape=["candidates", H, "kv_len_0", DH])
    K = g.op("Concat", own, kb, axis=2, shape=["candidates", H, "kv_len_0 + 2", DH])
    side = sp._kv_side(g.gs().tensors()[K])
    assert side is not None and side.source == "user_k_0" and side.own.name == own and side.axis == 2
    assert side.broadcast.op == "Expand" and side.mid == [] and side.post == []


def test_an_attention_scale_from_the_first_static_head_dim():
    g = naive(attn="attention_bool", flags=("q_dh_symbolic",))
    sites = sp.find_sites(g.gs())
    assert len(sites) == 1 and sites[0].scale == pytest.approx(1 / math.sqrt(DH)) and sites[0].kind == "Attention"


def test_scores_root_through_eight_scale_ops():
    g = G()
    q = g.input("q", [1, H, T, DH])
    k = g.input("user_k_0", [1, H, 3, DH])
    x = g.op("MatMul", q, g.op("Transpose", k, perm=[0, 1, 3, 2]), name="qk")
    for _ in range(8):
        x = g.op("Mul", x, g.const(2.0))
    root = sp._scores_root(g.gs().tensors()[x])
    assert root is not None and root[0].name == "qk" and root[1] == 2.0 ** 8
    nine = g.op("Mul", x, g.const(2.0))
    assert sp._scores_root(g.gs().tensors()[nine]) is None  # nine: too deep


@pytest.mark.parametrize("kw", [{"flags": ("noise_first",)}, {"attn": "attention_bool", "flags": ("noise_first",)}],
                         ids=["matmul", "attention"])
def test_nodes_that_are_no_site_ahead_of_the_site(kw):
    g = naive(**kw)
    sites = sp.find_sites(g.gs())
    assert len(sites) == 1 and sites[0].k.source == "user_k_0"
    after = sp.shared_prefix(g.gs())
    assert len(_fused(after)) == 1 and ops(after).count("Attention") == 3 and ops(after).count("Softmax") == 3
    _same(g, after, cases=((2, 6, 3), (1, 4, 0)))


@pytest.mark.parametrize("kw", [{"flags": ("softmax_no_axis",)}, {"flags": ("post_constant_node",)},
                                {"flags": ("sub_mask",)}, {"attn": "matmul_where", "flags": ("mask_from_product",)},
                                {"flags": ("softmax_axis3",)}, {"attn": "matmul_where", "flags": ("mask_then_scale",)},
                                {"attn": "attention_bool", "flags": ("attention_empty_tail",)}],
                         ids=lambda kw: kw["flags"][0])
def test_more_forms_are_rewritten(kw):
    g = naive(**kw)
    after = sp.shared_prefix(g.gs())
    assert len(_fused(after)) == 1 and sp.last_report()[0]["rewritten"]
    _same(g, after, cases=((2, 6, 3), (1, 4, 0)))


def test_the_head_dim_from_the_user_kv_when_nothing_else_says():
    g = naive(attn="attention_bool", flags=("q_dh_symbolic", "k_unshaped"))
    sites = sp.find_sites(g.gs())
    assert len(sites) == 1 and sites[0].scale == pytest.approx(1 / math.sqrt(DH))


def test_an_attention_site_tries_the_count_its_mask_reads_first():
    g = naive(attn="attention_bool", length="n_hist", extra_inputs=[("a_flag", I64)], flags=("extra_first",))
    site = sp.find_sites(g.gs())[0]
    assert sp.count_choices(g.gs(), site)[0] == ("n_hist", "n_hist")


def test_count_choices_are_capped():
    g = naive(extra_inputs=[(f"flag_{i:02d}", I64) for i in range(14)])
    site = sp.find_sites(g.gs())[0]
    choices = sp.count_choices(g.gs(), site)
    assert len(choices) == sp.MAX_TRIALS and choices[0][0] == "user_hist_len" and choices[-1] == ("", None)
    flags = [c for c, _ in choices[1:-1] if c.startswith("flag_")]
    inner = [c for c, _ in choices[1:-1] if not c.startswith("flag_")]  # tensors of the mask computed from it
    assert inner and flags == [f"flag_{i:02d}" for i in range(sp.MAX_TRIALS - 2 - len(inner))]


def test_why_not_lists_each_choice_tried():
    g = naive(padding="right", extra_inputs=[("a_flag", I64)])
    sp.shared_prefix(g.gs())
    parts = sp.last_report()[0]["why_not"].split("; ")
    names = [c or "whole prefix" for c, _ in sp.count_choices(g.gs(), sp.find_sites(g.gs())[0])]
    assert [p.split(": ", 1)[0] for p in parts] == names


@pytest.mark.parametrize("op", ["Reshape", "Expand", "Tile", "Slice", "Squeeze", "Unsqueeze"])
def test_a_copy_whose_shape_comes_from_kv_values_is_no_kv_copy(op):
    """Only the data input of these ops carries K/V; their shape/index inputs do not (structure only)."""
    g = G(opset=23)
    q = g.input("ns_q", ["candidates", H, T, DH])
    g.input("user_k_0", [1, H, "kv_len_0", DH])
    uv = g.input("user_v_0", [1, H, "kv_len_0", DH])
    bias = g.input("ns_bias", [1, H, "kv_len_0", DH])
    ko, vo = g.input("ns_k", ["candidates", H, T, DH]), g.input("ns_v", ["candidates", H, T, DH])
    how = g.op("Cast", g.op("ReduceMax", "user_k_0", keepdims=0), to=7, dtype=I64)  # a value of K, as an index
    copy_shape = g.op("Concat", g.op("Shape", q, start=0, end=1), g.const([1, 1, 1], np.int64), axis=0)
    if op in ("Expand", "Tile"):
        kb = g.op(op, bias, how, shape=["candidates", H, "kv_len_0", DH])
    else:
        extra = [how, how] if op == "Slice" else [how]
        kb = g.op("Expand", g.op(op, bias, *extra), copy_shape, shape=["candidates", H, "kv_len_0", DH])
    vb = g.op("Expand", uv, copy_shape, shape=["candidates", H, "kv_len_0", DH])
    K = g.op("Concat", kb, ko, axis=2)
    V = g.op("Concat", vb, vo, axis=2)
    s = g.op("MatMul", q, g.op("Transpose", K, perm=[0, 1, 3, 2]))
    g.op("MatMul", g.op("Softmax", s, axis=-1), V, out="att")
    g.output("att", None)
    assert sp.find_sites(g.gs()) == []


@pytest.mark.parametrize("kw", [{"flags": ("copy_how_from_shapes",)}, {"kv_heads": 1, "flags": ("copy_unshaped",)},
                                {"flags": ("post_cast",)}], ids=lambda kw: kw["flags"][0])
def test_copies_rebuilt_without_the_candidates(kw):
    g = naive(**kw)
    after = sp.shared_prefix(g.gs())
    assert len(_fused(after)) == 1 and sp.last_report()[0]["rewritten"]
    assert kv_broadcasts(after) == []  # what is left of the copy keeps batch 1, declared
    _same(g, after, cases=((2, 6, 3), (1, 4, 0)))


def test_a_constant_copy_target_of_ones_is_dropped():
    g = naive(flags=("const_how",))
    graph = g.gs()
    site = sp.find_sites(graph)[0]
    node = sp.rewrite_site(graph, site, "user_hist_len")
    assert node.inputs[1].name == "user_k_0" and node.inputs[2].name == "user_v_0"  # no Expand left before the op


@pytest.mark.xfail(strict=True, reason="shared_prefix._Builder.uncopied gives the rebuilt Expand the copy's declared "
                                       "dtype; with none declared (no value_info) the export in the proof fails, so the "
                                       "site is left as it was (safe: no-broadcast still reports it)")
def test_a_copy_without_a_declared_type_is_rewritten():
    g = naive(kv_heads=1, flags=("copy_untyped",))
    after = sp.shared_prefix(g.gs())
    assert sp.last_report()[0]["rewritten"], sp.last_report()[0].get("why_not")
