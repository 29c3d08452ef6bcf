"""fuse-attention on hand-made attention subgraphs: what is fused (node, inputs, attributes),
what is left alone, and that ONNX Runtime computes the same before and after (the fused ops
run through their ONNX function bodies)."""

from __future__ import annotations

import math

import numpy as np
import onnx_graphsurgeon as gs
import pytest
from onnx import numpy_helper

from onetrans_trt.graphs.fuse_attention import count_fused, fuse_attention, fuse_shared_prefix, fuse_tail_causal
from onetrans_trt.plugins._onnx import DOMAIN, PLUGIN_NAMESPACE
from tests.mutation_kills.onnx_kit import BOOL, F32, I64, G, ops, run

H, L, DH, C, T = 2, 5, 4, 3, 2
SCALE = 1 / math.sqrt(DH)
NINF = -np.inf


def _scalar(g: G, v, how: str) -> str:
    if how == "node":
        return g.op("Constant", value=numpy_helper.from_array(np.array(v, np.float32)))
    return g.const(v)


# ------------------------------------------------------------------ TailCausalAttention

def _tail_mask(g: G, q: str, length: str, size_term=False) -> str:
    """[B, 1, L, L]: (j <= i and j >= L - valid) or j == i, from s_length and shapes only."""
    n = g.op("Shape", q, start=2, end=3)
    if size_term:  # + 0 * Size(q): reads q's size only, not its values
        n = g.op("Add", n, g.op("Mul", g.op("Reshape", g.op("Size", q), g.const([1], np.int64)),
                                g.const([0], np.int64)))
    ar = g.op("Range", g.op("Squeeze", g.op("Mul", n, g.const(0, np.int64))), g.op("Squeeze", n), g.const(1, np.int64))
    jj, ii = g.op("Unsqueeze", ar, g.const([0], np.int64)), g.op("Unsqueeze", ar, g.const([1], np.int64))
    causal, itself = g.op("LessOrEqual", jj, ii), g.op("Equal", jj, ii)
    thr = g.op("Unsqueeze", g.op("Sub", n, length), g.const([1, 2], np.int64))  # [B, 1, 1]
    real = g.op("GreaterOrEqual", jj, thr)  # [B, 1, L]
    return g.op("Unsqueeze", g.op("Or", g.op("And", causal, real), itself), g.const([1], np.int64))


def tail_layer(g: G, q: str, k: str, v: str, length: str, *, out: str, where="scores_first", scale_first=False,
               consts="init", axis=-1, fill=NINF, k_layout="bhld", mask_from=None, extra_p_use=False,
               k_plain=False, mul_by_input=None, flags=()) -> str:
    if "k_identity_unshaped" in flags:  # K reaches the transpose through a tensor of unknown shape
        k = g.op("Identity", k)
    if "k_no_perm" in flags:
        kt = g.op("Transpose", k)  # the default perm (reversed axes): not K^T
    else:
        kt = k if k_plain else g.op("Transpose", k, perm=[0, 1, 3, 2] if k_layout == "bhld" else [0, 2, 3, 1])
    qk = g.op("MatMul", q, kt)
    sc = mul_by_input or _scalar(g, SCALE, consts)
    if "vector_scale" in flags:  # a per-key scale: not a scalar
        sc = g.const(np.linspace(0.3, 0.6, L))
    if "add_scale" in flags:
        s = g.op("Add", qk, sc)
    else:
        s = g.op("Mul", sc, qk) if scale_first else g.op("Mul", qk, sc)
    mask = _tail_mask(g, q, mask_from or length, size_term="size_term" in flags)
    f = _scalar(g, fill, consts)
    if where == "scores_first":
        s = g.op("Where", mask, s, f)
    else:
        s = g.op("Where", g.op("Not", mask), f, s)
    p = g.op("Softmax", s) if "no_axis" in flags else g.op("Softmax", s, axis=axis)
    if extra_p_use:  # P read by a second product: not this op's single P @ V
        g.op("MatMul", p, v, out="p_v2")
        g.output("p_v2", ["b", H, L, DH])
    if "p_side" in flags:  # P also read by something that is not a product (a debug output)
        g.op("ReduceSum", p, keepdims=0, out=f"{out}_p_sum")
        g.output(f"{out}_p_sum", [])
    return g.op("MatMul", p, v, out=out)


def _tail_graph(layers=1, with_length=True, first: dict | None = None, **kw) -> G:
    g = G()
    q = g.input("q", ["b", H, L, DH])
    klay = kw.get("k_layout", "bhld")
    k = g.input("k", ["b", H, L, DH] if klay == "bhld" else ["b", L, H, DH])
    v = g.input("v", ["b", H, L, DH])
    length = g.input("s_length" if with_length else "n_hist", ["b"], I64)
    if kw.get("mask_from"):
        g.input(kw["mask_from"], ["b"], I64)
    if kw.get("mul_by_input"):
        g.input(kw["mul_by_input"], [])
    x = q
    for i in range(layers):
        x = tail_layer(g, x, k, v, length, out=f"o{i}", **({**kw, **first} if first and i == 0 else kw))
    g.output(x, ["b", H, L, DH])
    return g


def _tail_feeds(b=2, seed=0, layout="bhld", extra=()):
    rng = np.random.default_rng(seed)
    f = {"q": rng.standard_normal((b, H, L, DH)).astype(np.float32),
         "k": rng.standard_normal((b, H, L, DH) if layout == "bhld" else (b, L, H, DH)).astype(np.float32),
         "v": rng.standard_normal((b, H, L, DH)).astype(np.float32),
         "s_length": np.array([L, 2][:b] + [0] * max(0, b - 2), np.int64)}
    f["n_hist"] = f["s_length"]
    for name in extra:
        f[name] = np.array([1, 3][:b], np.int64) if name != "gain" else np.array(SCALE, np.float32)
    return f


def _same(before, after, feeds):
    want, got = run(before, feeds), run(after, feeds)
    assert len(want) == len(got)
    for w, o in zip(want, got):
        assert w.shape == o.shape
        np.testing.assert_allclose(o, w, rtol=1e-5, atol=1e-5)


def _fused(graph: gs.Graph, op: str) -> list[gs.Node]:
    return [n for n in graph.nodes if n.op == op]


@pytest.mark.parametrize("kw", [{}, {"where": "fill_first"}, {"scale_first": True}, {"consts": "node"},
                                {"axis": 3}, {"k_layout": "blhd"}], ids=lambda kw: ",".join(kw) or "plain")
def test_tail_causal_is_fused_and_computes_the_same(kw):
    g = _tail_graph(**kw)
    before = g.gs()
    after = fuse_attention(before)
    nodes = _fused(after, "TailCausalAttention")
    assert len(nodes) == 1 and after.__dict__["fused_attention"] == 1
    n = nodes[0]
    assert n.name == "TailCausalAttention_1" and n.domain == DOMAIN
    assert n.attrs == {"scale": pytest.approx(SCALE), "causal": 1, "plugin_namespace": PLUGIN_NAMESPACE, "aot": 1}
    assert isinstance(n.attrs["scale"], float)
    assert [t.name for t in n.inputs][0] == "q" and n.inputs[2].name == "v" and n.inputs[3].name == "s_length"
    if kw.get("k_layout") == "blhd":  # a merged transpose: K brought back to [B, H, L, dh]
        assert n.inputs[1].name == "k__bhtd" and n.inputs[1].shape == ["b", H, L, DH]
        assert n.inputs[1].inputs[0].attrs["perm"] == [0, 2, 1, 3]
    else:
        assert n.inputs[1].name == "k"
    assert n.outputs[0].name == "o0"
    assert not {"Softmax", "Where", "Range"} & set(ops(after))  # the mask went with the attention
    assert count_fused(after) == {"TailCausalAttention": 1}
    assert "fused_attention" not in before.__dict__ and "Softmax" in ops(before)
    _same(g.model(), after, _tail_feeds(layout=kw.get("k_layout", "bhld")))


def test_two_layers_are_numbered():
    g = _tail_graph(layers=2)
    after = fuse_attention(g.gs())
    assert sorted(n.name for n in _fused(after, "TailCausalAttention")) == ["TailCausalAttention_1",
                                                                            "TailCausalAttention_2"]
    assert after.__dict__["fused_attention"] == 2 and count_fused(after) == {"TailCausalAttention": 2}
    _same(g.model(), after, _tail_feeds())


def test_a_mask_from_another_length_tensor_is_fused_with_that_tensor():
    """The valid length is whatever tensor the mask's ``j >= n - valid`` reads (HyFormer's per-sequence
    counts are computed in the graph): here another graph input, not s_length."""
    g = _tail_graph(mask_from="n_seq")
    after = fuse_attention(g.gs())
    (n,) = _fused(after, "TailCausalAttention")
    assert n.inputs[3].name == "n_seq" and n.attrs["causal"] == 1
    feeds = {**_tail_feeds(), "n_seq": np.array([3, 0], np.int64)}
    _same(g.model(), after, feeds)


def _mask_graph(kind: str, source: str = "n_seq") -> G:
    """One attention under a mask from ``n_seq`` (a computed count in HyFormer): ``bidirectional``
    (real keys Or the query's own position), ``folded`` (the causal triangle a constant, as a
    static-shape export folds it, And-ed with the real keys) or ``window`` (real keys And a
    constant band: not bidirectional, so never fused as causal=0)."""
    g = G()
    q, k, v = g.input("q", ["b", H, L, DH]), g.input("k", ["b", H, L, DH]), g.input("v", ["b", H, L, DH])
    g.input("s_length", ["b"], I64)
    g.input("n_seq", ["b"], I64)
    n_seq = source
    n = g.op("Shape", q, start=2, end=3)
    ar = g.op("Range", g.const(0, np.int64), g.op("Squeeze", n), g.const(1, np.int64))
    jj, ii = g.op("Unsqueeze", ar, g.const([0], np.int64)), g.op("Unsqueeze", ar, g.const([1], np.int64))
    real = g.op("GreaterOrEqual", jj, g.op("Unsqueeze", g.op("Sub", n, n_seq), g.const([1, 2], np.int64)))
    eye = np.eye(L, dtype=bool)
    if kind == "bidirectional":
        mask = g.op("Or", real, g.op("Equal", jj, ii))
    elif kind == "folded":
        mask = g.op("Or", g.op("And", g.const(np.tril(np.ones((L, L), bool)), bool), real), g.const(eye, bool))
    else:
        band = np.abs(np.arange(L)[:, None] - np.arange(L)[None]) <= 1
        mask = g.op("Or", g.op("And", g.const(band, bool), real), g.const(eye, bool))
    mask = g.op("Unsqueeze", mask, g.const([1], np.int64))
    s = g.op("Mul", g.op("MatMul", q, g.op("Transpose", k, perm=[0, 1, 3, 2])), g.const(SCALE))
    p = g.op("Softmax", g.op("Where", mask, s, g.const(NINF)), axis=-1)
    g.op("MatMul", p, v, out="o")
    g.output("o", ["b", H, L, DH])
    return g


@pytest.mark.parametrize("kind,causal", [("bidirectional", 0), ("folded", 1)])
def test_mask_kinds_give_the_causal_attribute(kind, causal):
    """causal=0 only for the bidirectional form recognised positively; a folded triangle is causal."""
    g = _mask_graph(kind)
    after = fuse_attention(g.gs())
    (n,) = _fused(after, "TailCausalAttention")
    assert n.attrs["causal"] == causal and n.inputs[3].name == "n_seq"
    _same(g.model(), after, {**_tail_feeds(), "n_seq": np.array([3, 0], np.int64)})


@pytest.mark.parametrize("source", ["n_seq", "s_length"])
def test_a_band_mask_is_left_alone(source):
    """Real keys And-ed with a constant that is not the causal triangle (a band): neither causal nor
    bidirectional, so nothing is fused (causal=1 or 0 would both change the outputs), also where the
    mask reads s_length alone (fused as causal before: a mask from s_length was assumed causal)."""
    g = _mask_graph("window", source)
    after = fuse_attention(g.gs())
    assert count_fused(after) == {} and "Softmax" in ops(after)
    _same(g.model(), after, {**_tail_feeds(), "n_seq": np.array([3, 0], np.int64)})


@pytest.mark.parametrize("kw", [{"axis": 2}, {"fill": -1e9}, {"extra_p_use": True},
                                {"k_plain": True}, {"mul_by_input": "gain"}, {"with_length": False}],
                         ids=lambda kw: next(iter(kw)))
def test_tail_lookalikes_are_left_alone(kw):
    g = _tail_graph(**kw)
    graph = g.gs()
    assert fuse_tail_causal(graph) == 0
    after = fuse_attention(g.gs())
    assert after.__dict__["fused_attention"] == 0 and count_fused(after) == {}
    assert "Softmax" in ops(after)
    if not kw.get("k_plain"):
        extra = [x for x in ("s_type", "gain") if x in kw.values()]
        _same(g.model(), after, _tail_feeds(extra=extra))


def test_a_softmax_without_a_mask_or_scale_is_skipped():
    g = G()
    q, k, v = g.input("q", ["b", H, L, DH]), g.input("k", ["b", H, L, DH]), g.input("v", ["b", H, L, DH])
    g.input("s_length", ["b"], I64)
    s1 = g.op("Softmax", g.op("MatMul", q, g.op("Transpose", k, perm=[0, 1, 3, 2])), axis=-1)  # no Where
    o1 = g.op("MatMul", s1, v)
    mask = _tail_mask(g, q, "s_length")
    s2 = g.op("Softmax", g.op("Where", mask, g.op("MatMul", o1, g.op("Transpose", k, perm=[0, 1, 3, 2])), g.const(NINF)),
              axis=-1)  # masked but not scaled
    g.op("MatMul", s2, v, out="o")
    g.output("o", ["b", H, L, DH])
    assert fuse_tail_causal(g.gs()) == 0


# ------------------------------------------------------------------ SharedPrefixAttention

def _sp_graph(*, k_name="user_k_0", v_name="user_v_0", q_perm=(1, 0, 2, 3), scale2=SCALE, with_length=True,
              second_div=False, own_plain_k=False) -> G:
    """The candidate scorer's attention as our model writes it (prefix batch + own causal, merged)."""
    g = G(opset=18)
    q = g.input("ns_q", ["candidates", H, T, DH])
    kp = g.input(k_name, [1, H, "kv_len_0", DH])
    vp = g.input(v_name, [1, H, "kv_len_0", DH])
    valid = g.input("s_length" if with_length else "n_hist", [1], I64)
    ko, vo = g.input("ns_k", ["candidates", H, T, DH]), g.input("ns_v", ["candidates", H, T, DH])
    zero, ninf, last = g.const(0.0), g.const(NINF), g.const([-1], np.int64)
    q_all = g.op("Reshape", g.op("Transpose", q, perm=list(q_perm)), g.const([1, H, -1, DH], np.int64))
    m1 = g.op("MatMul", q_all, g.op("Transpose", kp, perm=[0, 1, 3, 2]))
    s1 = g.op("Mul", m1, g.const(SCALE))
    n = g.op("Shape", kp, start=2, end=3)
    j = g.op("Range", g.const(0, np.int64), g.op("Squeeze", n), g.const(1, np.int64))
    s1 = g.op("Where", g.op("GreaterOrEqual", j, g.op("Sub", n, valid)), s1, ninf)
    mx1 = g.op("ReduceMax", s1, last, keepdims=1)
    p1 = g.op("Exp", g.op("Sub", s1, g.op("Where", g.op("IsInf", mx1), zero, mx1)))
    l1 = g.op("ReduceSum", p1, last, keepdims=1)
    o1 = g.op("MatMul", p1, vp)
    back = g.op("Concat", g.const([H], np.int64), g.op("Shape", q, start=0, end=1), g.const([T, -1], np.int64), axis=0)
    per = lambda x: g.op("Transpose", g.op("Reshape", x, back), perm=[1, 0, 2, 3])  # noqa: E731
    mx1, l1, o1 = per(mx1), per(l1), per(o1)
    kot = ko if own_plain_k else g.op("Transpose", ko, perm=[0, 1, 3, 2])
    s2 = g.op("Mul", g.op("MatMul", q, kot), g.const(scale2))
    s2 = g.op("Where", g.const(np.tril(np.ones((T, T), bool)), dtype=bool), s2, ninf)
    mx2 = g.op("ReduceMax", s2, last, keepdims=1)
    p2 = g.op("Exp", g.op("Sub", s2, mx2))
    l2 = g.op("ReduceSum", p2, last, keepdims=1)
    o2 = g.op("MatMul", p2, vo)
    m = g.op("Max", mx1, mx2)
    a1, a2 = g.op("Exp", g.op("Sub", mx1, m)), g.op("Exp", g.op("Sub", mx2, m))
    num = g.op("Add", g.op("Mul", a1, o1), g.op("Mul", a2, o2))
    den = g.op("Add", g.op("Mul", a1, l1), g.op("Mul", a2, l2))
    if second_div:
        num = g.op("Div", num, g.const(1.0))
    g.op("Div", num, den, out="att")
    g.op("ReduceSum", "att", g.const([1, 2, 3], np.int64), keepdims=0, out="logits")
    g.output("logits", ["candidates"])
    return g


def _sp_feeds(c=C, n=6, valid=3, seed=0, k_name="user_k_0", v_name="user_v_0"):
    rng = np.random.default_rng(seed)
    r = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    return {"ns_q": r(c, H, T, DH), k_name: r(1, H, n, DH), v_name: r(1, H, n, DH), "s_length": np.array([valid]),
            "n_hist": np.array([valid]), "ns_k": r(c, H, T, DH), "ns_v": r(c, H, T, DH)}


def test_shared_prefix_is_fused_and_computes_the_same():
    g = _sp_graph()
    feeds = [_sp_feeds(), _sp_feeds(c=1, n=4, valid=0, seed=1), _sp_feeds(c=4, n=7, valid=7, seed=2)]
    for f in feeds:  # the hand-made graph is the op's definition
        assert np.isfinite(run(g.model(), f)[0]).all()
    after = fuse_attention(g.gs())
    nodes = _fused(after, "SharedPrefixAttention")
    assert len(nodes) == 1 and after.__dict__["fused_attention"] == 1
    n = nodes[0]
    assert n.name == "SharedPrefixAttention_1" and n.domain == DOMAIN
    assert [t.name for t in n.inputs] == ["ns_q", "user_k_0", "user_v_0", "s_length", "ns_k", "ns_v"]
    assert n.attrs == {"scale": pytest.approx(SCALE), "plugin_namespace": PLUGIN_NAMESPACE, "aot": 1}
    assert n.outputs[0].name == "att"
    assert ops(after).count("MatMul") == 0 and "Range" not in ops(after)
    assert count_fused(after) == {"SharedPrefixAttention": 1}
    for f in feeds:
        _same(g.model(), after, f)


@pytest.mark.parametrize("kw", [{"k_name": "other_k_0"}, {"v_name": "other_v_0"}, {"q_perm": (0, 1, 2, 3)},
                                {"scale2": 0.3}, {"with_length": False}, {"second_div": True},
                                {"own_plain_k": True}], ids=lambda kw: next(iter(kw)))
def test_shared_prefix_lookalikes_are_left_alone(kw):
    g = _sp_graph(**kw)
    assert fuse_shared_prefix(g.gs()) == 0
    after = fuse_attention(g.gs())
    assert after.__dict__["fused_attention"] == 0 and count_fused(after) == {}
    if "q_perm" not in kw and "own_plain_k" not in kw:  # (those two do not run: shapes)
        feeds = _sp_feeds(k_name=kw.get("k_name", "user_k_0"), v_name=kw.get("v_name", "user_v_0"))
        _same(g.model(), after, feeds)


def test_count_fused_counts_only_our_domain():
    nodes = [gs.Node("Relu"), gs.Node("TailCausalAttention", domain=DOMAIN), gs.Node("TailCausalAttention", domain=DOMAIN),
             gs.Node("SharedPrefixAttention", domain=DOMAIN), gs.Node("TailCausalAttention", domain="other")]
    assert count_fused(gs.Graph(nodes=nodes)) == {"TailCausalAttention": 2, "SharedPrefixAttention": 1}


@pytest.mark.parametrize("flags", [("no_axis",), ("p_side",), ("size_term",), ("k_identity_unshaped",)],
                         ids=lambda f: f[0])
def test_more_tail_forms_are_fused(flags):
    kw = {"flags": flags}
    if "k_identity_unshaped" in flags:
        kw["k_layout"] = "blhd"
    g = _tail_graph(**kw)
    after = fuse_attention(g.gs())
    assert after.__dict__["fused_attention"] == 1 and count_fused(after) == {"TailCausalAttention": 1}
    _same(g.model(), after, _tail_feeds(layout=kw.get("k_layout", "bhld")))


@pytest.mark.parametrize("first", [{"axis": 2}, {"flags": ("add_scale",)}, {"flags": ("vector_scale",)},
                                   {"flags": ("k_no_perm",)}, {"fill": -1e9}, {"extra_p_use": True}],
                         ids=lambda kw: str(list(kw.values())[0]))
def test_a_tail_lookalike_before_a_real_one(first):
    g = _tail_graph(layers=2, first=first)
    after = fuse_attention(g.gs())
    nodes = _fused(after, "TailCausalAttention")
    assert len(nodes) == 1 and nodes[0].outputs[0].name == "o1" and nodes[0].name == "TailCausalAttention_1"
    assert nodes[0].inputs[0].name == "o0"  # the second layer's queries: the first layer's output
    if "k_no_perm" not in str(first):
        _same(g.model(), after, _tail_feeds())


# ------------------------------------------------------------------ shared prefix: more forms

def _sp_block(g: G, i: int, variant: str | None = None) -> str:
    """One candidate-side attention block reading ns_q{i}, user_k_{i}, user_v_{i}, ns_k{i}, ns_v{i}
    and s_length; ``variant`` makes it a lookalike (or another valid form)."""
    blhd = variant == "blhd_k"
    q = g.input(f"ns_q{i}", ["candidates", H, T, DH])
    kp = g.input(("other_k_" if variant == "k_name" else "user_k_") + str(i),
                 [1, "kv_len", H, DH] if blhd else [1, H, "kv_len", DH])
    vp = g.input(("other_v_" if variant == "v_name" else "user_v_") + str(i), [1, H, "kv_len", DH])
    ko = g.input(f"ns_k{i}", ["candidates", T, H, DH] if blhd else ["candidates", H, T, DH])
    vo = g.input(f"ns_v{i}", ["candidates", H, T, DH])
    valid = "s_length"
    zero, ninf, last = g.const(0.0), g.const(NINF), g.const([-1], np.int64)
    if variant == "q_all_input":
        q_all = g.input(f"q_all{i}", [1, H, "ct", DH])
    else:
        tq = g.op("Transpose", q) if variant == "q_transpose_no_perm" else g.op(
            "Transpose", q, perm=[0, 1, 2, 3] if variant == "q_perm" else [1, 0, 2, 3])
        if variant == "identity_not_reshape":
            q_all = g.op("Identity", tq)
        else:
            q_all = g.op("Reshape", tq, g.const([1, H, -1, DH], np.int64))
    kt_src = kp
    vp_src = vp
    if variant == "k_via_layout":  # user K/V reach the products through layout ops
        kt_src = g.op("Reshape", kp, g.const([1, H, -1, DH], np.int64))
        vp_src = g.op("Identity", vp)
    if variant == "k_no_perm":
        kt = g.op("Transpose", kt_src)
    else:
        kt = g.op("Transpose", kt_src, perm=[0, 2, 3, 1] if blhd else [0, 1, 3, 2])
    m1 = g.op("MatMul", q_all, kt)
    if variant == "m1_extra_user":
        g.op("ReduceSum", m1, keepdims=0, out=f"m1sum{i}")
        g.output(f"m1sum{i}", [])
    s1 = g.op("Mul", g.const(SCALE), m1) if variant == "scale_first" else g.op("Mul", m1, g.const(SCALE))
    n = g.op("Shape", kp, start=1 if blhd else 2, end=2 if blhd else 3)
    j = g.op("Range", g.const(0, np.int64), g.op("Squeeze", n), g.const(1, np.int64))
    s1 = g.op("Where", g.op("GreaterOrEqual", j, g.op("Sub", n, valid)), s1, ninf)
    mx1 = g.op("ReduceMax", s1, last, keepdims=1)
    p1 = g.op("Exp", g.op("Sub", s1, g.op("Where", g.op("IsInf", mx1), zero, mx1)))
    l1 = g.op("ReduceSum", p1, last, keepdims=1)
    o1 = g.op("MatMul", p1, vp_src)
    back = g.op("Concat", g.const([H], np.int64), g.op("Shape", q, start=0, end=1), g.const([T, -1], np.int64), axis=0)
    per = lambda x: g.op("Transpose", g.op("Reshape", x, back), perm=[1, 0, 2, 3])  # noqa: E731
    mx1, l1, o1 = per(mx1), per(l1), per(o1)
    kot = g.op("Transpose", ko, perm=[0, 2, 3, 1] if blhd else [0, 1, 3, 2])
    own = g.op("MatMul", q, kot)
    sc2 = g.const(0.3 if variant == "scale2" else SCALE)
    s2 = g.op("Mul", sc2, own) if variant == "scale_first" else g.op("Mul", own, sc2)
    s2 = g.op("Where", g.const(np.tril(np.ones((T, T), bool)), dtype=bool), s2, ninf)
    mx2 = g.op("ReduceMax", s2, last, keepdims=1)
    p2 = g.op("Exp", g.op("Sub", s2, mx2))
    l2 = g.op("ReduceSum", p2, last, keepdims=1)
    o2 = g.op("MatMul", p2, vo)
    if variant == "own_two_pv":
        g.op("MatMul", p2, vo, out=f"pv2_{i}")
        g.output(f"pv2_{i}", None)
    m = g.op("Max", mx1, mx2)
    a1, a2 = g.op("Exp", g.op("Sub", mx1, m)), g.op("Exp", g.op("Sub", mx2, m))
    num = g.op("Add", g.op("Mul", a1, o1), g.op("Mul", a2, o2))
    den = g.op("Add", g.op("Mul", a1, l1), g.op("Mul", a2, l2))
    if variant == "second_div":
        num = g.op("Div", num, g.const(1.0))
    att = g.op("Div", num, den, out=f"att{i}")
    if variant == "proj_after_div":  # an output projection after the merge: outside the attention
        att = g.op("MatMul", att, g.const(np.eye(DH) * 0.5))
    return g.op("ReduceSum", att, g.const([1, 2, 3], np.int64), keepdims=0)


def _sp_blocks(*variants) -> G:
    g = G(opset=18)
    g.input("s_length", [1], I64)
    outs = [_sp_block(g, i, v) for i, v in enumerate(variants)]
    total = outs[0] if len(outs) == 1 else g.op("Sum", *outs)
    g.op("Identity", total, out="logits")
    g.output("logits", ["candidates"])
    return g


def _blocks_feeds(g: G, c=C, n=6, valid=3, seed=0) -> dict:
    rng = np.random.default_rng(seed)
    out = {}
    for v in g.inputs:
        dims = [d.dim_value if d.HasField("dim_value") else {"candidates": c, "kv_len": n, "ct": c * T}[d.dim_param]
                for d in v.type.tensor_type.shape.dim]
        out[v.name] = np.array([valid]) if v.name == "s_length" else rng.standard_normal(dims).astype(np.float32)
    return out


@pytest.mark.parametrize("variant", ["k_via_layout", "blhd_k", "scale_first", "proj_after_div"])
def test_more_shared_prefix_forms_are_fused(variant):
    g = _sp_blocks(variant)
    after = fuse_attention(g.gs())
    nodes = _fused(after, "SharedPrefixAttention")
    assert len(nodes) == 1 and after.__dict__["fused_attention"] == 1
    if variant == "blhd_k":  # both K brought to [.., L, dh] by a transpose the pass adds
        assert nodes[0].inputs[1].inputs[0].attrs["perm"] == [0, 2, 1, 3]
        assert nodes[0].inputs[4].inputs[0].attrs["perm"] == [0, 2, 1, 3]
    for seed, (c, n, valid) in enumerate([(C, 6, 3), (1, 4, 0), (2, 5, 5)]):
        _same(g.model(), after, _blocks_feeds(g, c, n, valid, seed))


LOOKALIKES = ["k_name", "v_name", "q_perm", "scale2", "second_div", "m1_extra_user", "own_two_pv", "q_all_input",
              "identity_not_reshape", "q_transpose_no_perm", "k_no_perm"]


@pytest.mark.parametrize("variant", LOOKALIKES)
def test_a_shared_prefix_lookalike_before_a_real_one(variant):
    g = _sp_blocks(variant, None)
    after = fuse_attention(g.gs())
    nodes = _fused(after, "SharedPrefixAttention")
    assert len(nodes) == 1, variant
    assert [t.name for t in nodes[0].inputs] == ["ns_q1", "user_k_1", "user_v_1", "s_length", "ns_k1", "ns_v1"]
    assert nodes[0].name == "SharedPrefixAttention_1"


def test_two_shared_prefix_sites_are_numbered():
    g = _sp_blocks(None, None)
    after = fuse_attention(g.gs())
    assert sorted(n.name for n in _fused(after, "SharedPrefixAttention")) == ["SharedPrefixAttention_1",
                                                                              "SharedPrefixAttention_2"]
    _same(g.model(), after, _blocks_feeds(g))
