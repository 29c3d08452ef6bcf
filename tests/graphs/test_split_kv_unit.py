"""split at K/V on a small hand-made serving graph: the user encoder and the candidate scorer
compute what the whole graph computes, with the renamed dims and the refusals."""

from __future__ import annotations

import numpy as np
import pytest

from onetrans_trt.errors import BuildError
from onetrans_trt.graphs.split_kv import candidate_scorer, kv_layer, user_encoder
from tests.mutation_kills.onnx_kit import F32, I64, G, run


def _serving(k_reads_ns=False, logits_read_s=False, kv_rank4=True, state_shape=True) -> G:
    g = G()
    s_x = g.input("s_x", ["users", 3, 2])
    s_len = g.input("s_length", ["users"], I64)
    ns_x = g.input("ns_x", ["candidates", 2])
    src = s_x
    if k_reads_ns:
        src = g.op("Add", s_x, g.op("ReduceSum", ns_x, keepdims=0))
    kshape = ["users", 1, 3, 2] if kv_rank4 else ["users", 3, 2]
    g.op("Reshape", src, g.const([0, 1, 3, 2] if kv_rank4 else [0, 3, 2], np.int64), out="user_k_0", shape=kshape)
    g.op("Neg", "user_k_0", out="user_v_0", shape=kshape)
    g.op("Identity", s_len, out="user_seq_len", shape=["users"] if state_shape else None, dtype=I64)
    g.op("Relu", s_x, out="debug", shape=["users", 3, 2])
    ns = g.op("ReduceSum", ns_x, g.const([1], np.int64), keepdims=1)  # [C, 1]
    kv = g.op("Add", g.op("ReduceSum", "user_k_0", keepdims=0), g.op("ReduceSum", "user_v_0", keepdims=0))
    kv = g.op("Mul", kv, g.const(0.5))
    extra = g.op("Cast", g.op("ReduceSum", g.op("Add", s_len, "user_seq_len"), keepdims=0), to=F32)
    logits = g.op("Add", g.op("Mul", ns, kv), extra)
    if logits_read_s:
        logits = g.op("Add", logits, g.op("ReduceSum", s_x, keepdims=0))
    g.op("Identity", logits, out="logits", shape=["candidates", 1])
    g.op("Sigmoid", "logits", out="probs", shape=["candidates", 1])
    for name, shape, dt in [("user_k_0", kshape, F32), ("user_v_0", kshape, F32),
                            ("user_seq_len", ["users"] if state_shape else None, I64),
                            ("debug", ["users", 3, 2], F32), ("logits", ["candidates", 1], F32),
                            ("probs", ["candidates", 1], F32)]:
        g.output(name, shape, dt)
    return g


def _feeds(users=1, c=4, seed=0):
    rng = np.random.default_rng(seed)
    return {"s_x": rng.standard_normal((users, 3, 2)).astype(np.float32),
            "s_length": rng.integers(0, 4, users).astype(np.int64),
            "ns_x": rng.standard_normal((c, 2)).astype(np.float32)}


def test_kv_layer():
    assert kv_layer("user_k_0") == 0 and kv_layer("user_v_12") == 12
    assert kv_layer("user_q_1") is None and kv_layer("user_k_") is None and kv_layer("xuser_k_1") is None


def test_user_encoder_keeps_only_the_user_state():
    g = _serving()
    graph = g.gs()
    enc = user_encoder(graph)
    assert [t.name for t in enc.outputs] == ["user_k_0", "user_v_0", "user_seq_len"]
    assert [t.shape for t in enc.outputs] == [["users", 1, "kv_len_0", 2], ["users", 1, "kv_len_0", 2], ["users"]]
    assert [t.name for t in enc.inputs] == ["s_x", "s_length"]
    assert {n.op for n in enc.nodes} == {"Reshape", "Neg", "Identity"}
    # the graph given is left as it was
    assert [t.name for t in graph.outputs] == ["user_k_0", "user_v_0", "user_seq_len", "debug", "logits", "probs"]
    assert graph.outputs[0].shape == ["users", 1, 3, 2]
    feeds = _feeds(users=3)
    whole, got = run(g.model(), feeds), run(enc, feeds)
    for w, o in zip(whole[:3], got):
        np.testing.assert_array_equal(w, o)


def test_candidate_scorer_reads_one_users_state():
    g = _serving()
    graph = g.gs()
    sc = candidate_scorer(graph)
    assert [t.name for t in sc.inputs] == ["ns_x", "s_length", "user_k_0", "user_v_0", "user_seq_len"]
    assert [t.shape for t in sc.inputs] == [["candidates", 2], [1], [1, 1, "kv_len_0", 2], [1, 1, "kv_len_0", 2], [1]]
    assert [t.name for t in sc.outputs] == ["logits", "probs"]
    assert not any(n.op in ("Reshape", "Neg", "Relu") for n in sc.nodes)
    assert graph.inputs[1].shape == ["users"] and len(graph.outputs) == 6
    feeds = _feeds(users=1, c=5, seed=1)
    whole = run(g.model(), feeds)
    state = {"user_k_0": whole[0], "user_v_0": whole[1], "user_seq_len": whole[2]}
    got = run(sc, {**feeds, **state})
    np.testing.assert_array_equal(got[0], whole[4])
    np.testing.assert_array_equal(got[1], whole[5])


def test_state_without_a_shape_and_kv_of_another_rank():
    enc = user_encoder(_serving(kv_rank4=False, state_shape=False).gs())
    assert [t.shape for t in enc.outputs] == [["users", 3, 2], ["users", 3, 2], None]
    sc = candidate_scorer(_serving(kv_rank4=False, state_shape=False).gs())
    assert {t.name: t.shape for t in sc.inputs}["user_k_0"] == [1, 3, 2]


def test_a_graph_without_kv_outputs_is_refused():
    g = G()
    g.op("Relu", g.input("s_x", [1, 2]), out="user_state", shape=[1, 2])
    g.output("user_state", [1, 2])
    for fn in (user_encoder, candidate_scorer):
        with pytest.raises(BuildError) as e:
            fn(g.gs())
        assert str(e.value) == ("split at K/V: the graph has no user_k_<l>/user_v_<l> outputs to cut at; "
                                "export it with onetrans-trt export")


def test_an_encoder_that_reads_candidates_is_refused():
    with pytest.raises(BuildError) as e:
        user_encoder(_serving(k_reads_ns=True).gs())
    assert str(e.value) == "split at K/V: the user encoder still reads candidate inputs ['ns_x']"


def test_a_scorer_that_reads_history_is_refused():
    with pytest.raises(BuildError) as e:
        candidate_scorer(_serving(logits_read_s=True).gs())
    assert str(e.value) == "split at K/V: the candidate scorer still reads history inputs ['s_x']"


def _no_length_graph(unused_ns=False) -> G:
    g = G()
    s_x = g.input("s_x", ["users", 3, 2])
    ns_x = g.input("ns_x", ["candidates", 2])
    if unused_ns:
        g.input("ns_unused", ["candidates", 5])
    g.op("Reshape", s_x, g.const([0, 1, 3, 2], np.int64), out="user_k_0", shape=["users", 1, 3, 2])
    g.op("Mul", ns_x, g.op("ReduceSum", "user_k_0", keepdims=0), out="logits", shape=["candidates", 2])
    g.output("user_k_0", ["users", 1, 3, 2])
    g.output("logits", ["candidates", 2])
    return g


def test_a_scorer_without_s_length_and_unused_inputs_dropped():
    sc = candidate_scorer(_no_length_graph(unused_ns=True).gs())
    assert [t.name for t in sc.inputs] == ["ns_x", "user_k_0"]
    g = _no_length_graph()
    feeds = {"s_x": np.ones((1, 3, 2), np.float32), "ns_x": np.arange(8, dtype=np.float32).reshape(4, 2)}
    whole = run(g.model(), feeds)
    np.testing.assert_array_equal(run(sc, {**feeds, "user_k_0": whole[0]})[0], whole[1])
    enc = user_encoder(_no_length_graph(unused_ns=True).gs())
    assert [t.name for t in enc.inputs] == ["s_x"]
