"""no-broadcast on small hand-made scorer graphs: which K/V copies it reports (node, route),
which it must not, and the pass's refusal message. Milliseconds per graph (no tracing)."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
import pytest

from onetrans_trt.errors import BuildError
from onetrans_trt.graphs.no_broadcast import KVBroadcast, kv_broadcasts, no_broadcast
from tests.mutation_kills.onnx_kit import BOOL, F32, I64, G, run

H, DH = 2, 4
KV = [1, H, "kv_len_0", DH]
CKV = ["candidates", H, "kv_len_0", DH]


def _base(kv_heads=H):
    g = G()
    g.input("ns_q", ["candidates", H, 1, DH])
    g.input("user_k_0", [1, kv_heads, "kv_len_0", DH])
    g.input("user_v_0", [1, kv_heads, "kv_len_0", DH])
    # [C, 1, 1, 1]: the per-candidate copy's target shape
    c = g.op("Shape", "ns_q", start=0, end=1, shape=[1], dtype=I64)
    g.copy_shape = g.op("Concat", c, g.const([1, 1, 1], np.int64), axis=0, shape=[4], dtype=I64)
    return g


def _attend(g: G, kb: str, v: str = "user_v_0") -> None:
    kt = g.op("Transpose", kb, perm=[0, 1, 3, 2])
    s = g.op("Softmax", g.op("MatMul", "ns_q", kt), axis=-1)
    g.op("ReduceSum", g.op("MatMul", s, v), g.const([1, 2, 3], np.int64), keepdims=0, out="logits")
    g.output("logits", ["candidates"])


def route(name: str) -> G:
    g = _base(kv_heads=1 if name == "heads_expand" else H)
    k = "user_k_0"
    if name == "expand":
        kb = g.op("Expand", k, g.copy_shape, shape=CKV, name="copy")
    elif name == "mul_expand":
        kb = g.op("Expand", g.op("Mul", k, g.const(0.5), shape=KV), g.copy_shape, shape=CKV, name="copy")
    elif name == "tile":
        kb = g.op("Tile", k, g.copy_shape, shape=CKV, name="copy")
    elif name == "transpose_expand":
        t = g.op("Transpose", k, perm=[0, 1, 3, 2], shape=[1, H, DH, "kv_len_0"])
        e = g.op("Expand", t, g.copy_shape, shape=["candidates", H, DH, "kv_len_0"], name="copy")
        kb = g.op("Transpose", e, perm=[0, 1, 3, 2], shape=CKV)
    elif name == "reshape_tile":
        r = g.op("Reshape", k, g.const([1, H, -1], np.int64), shape=[1, H, "kv_len_0*4"])
        reps = g.op("Concat", g.op("Shape", "ns_q", start=0, end=1), g.const([1, 1], np.int64), axis=0)
        t = g.op("Tile", r, reps, shape=["candidates", H, "kv_len_0*4"], name="copy")
        back = g.op("Concat", g.op("Shape", "ns_q", start=0, end=1), g.const([H, -1, DH], np.int64), axis=0)
        kb = g.op("Reshape", t, back, shape=CKV)
    elif name == "cast_expand":
        d = g.op("Cast", k, to=11, shape=KV, dtype=11)
        e = g.op("Expand", d, g.copy_shape, shape=CKV, name="copy", dtype=11)
        kb = g.op("Cast", e, to=1, shape=CKV)
    elif name == "implicit_mul":
        gate = g.op("Sigmoid", g.op("ReduceSum", "ns_q", g.const([1, 2, 3], np.int64), keepdims=1),
                    shape=["candidates", 1, 1, 1])
        kb = g.op("Mul", k, gate, shape=CKV, name="copy")
    elif name == "gather":
        idx = g.op("Mul", g.op("Cast", g.op("ReduceSum", "ns_q", g.const([1, 2, 3], np.int64), keepdims=0), to=7,
                               shape=["candidates"], dtype=I64), g.const(0, np.int64), shape=["candidates"], dtype=I64)
        kb = g.op("Gather", k, idx, axis=0, shape=CKV, name="copy")
    elif name == "unknown_shape":  # an Expand whose output shape nobody wrote down: it may copy
        kb = g.op("Expand", k, g.copy_shape, name="copy")
    elif name == "heads_expand":  # grouped heads: [1, 1, L, dh] -> [1, H, L, dh], not per candidate
        kb = g.op("Expand", k, g.const([1, H, 1, 1], np.int64), shape=KV, name="copy")
        v = g.op("Expand", "user_v_0", g.const([1, H, 1, 1], np.int64), shape=KV)
        _attend(g, kb, v)
        return g
    elif name == "plain":  # the shared K/V attended as one batch: nothing to report
        kb = g.op("Mul", k, g.const(0.5), shape=KV)
    else:
        raise ValueError(name)
    _attend(g, kb)
    return g


ROUTES = {  # route -> the ops from the K/V input to the reported copy
    "expand": ["Expand"], "mul_expand": ["Mul", "Expand"], "tile": ["Tile"],
    "transpose_expand": ["Transpose", "Expand"], "reshape_tile": ["Reshape", "Tile"],
    "cast_expand": ["Cast", "Expand"], "implicit_mul": ["Mul"], "gather": ["Gather"],
    "unknown_shape": ["Expand"],
}


def _feeds(c=3, n=5, heads=H, seed=0):
    rng = np.random.default_rng(seed)
    return {"ns_q": rng.standard_normal((c, H, 1, DH)).astype(np.float32),
            "user_k_0": rng.standard_normal((1, heads, n, DH)).astype(np.float32),
            "user_v_0": rng.standard_normal((1, heads, n, DH)).astype(np.float32)}


@pytest.mark.parametrize("name", sorted(ROUTES))
def test_each_copy_route_is_reported_once_with_its_path(name):
    g = route(name)
    assert np.isfinite(run(g.model(), _feeds())[0]).all()  # a graph that runs
    graph = g.gs()
    found = kv_broadcasts(graph)
    assert len(found) == 1, [str(f) for f in found]
    hit = found[0]
    assert hit.source == "user_k_0" and hit.node.name == "copy"
    assert [n.op for n in hit.path] == ROUTES[name] and hit.path[-1] is hit.node
    assert str(hit) == f"{hit.node.op} copy ({' -> '.join(['user_k_0', *ROUTES[name]])})"
    with pytest.raises(BuildError) as e:
        no_broadcast(graph)
    assert str(e.value) == ("no-broadcast: the candidate scorer copies the user's K/V per candidate "
                            f"({hit}); attend the shared K/V as one batch instead")


@pytest.mark.parametrize("name", ["plain", "heads_expand"])
def test_no_copy_per_candidate_passes(name):
    g = route(name)
    feeds = _feeds(heads=1 if name == "heads_expand" else H)
    assert np.isfinite(run(g.model(), feeds)[0]).all()
    graph = g.gs()
    assert kv_broadcasts(graph) == []
    assert no_broadcast(graph) is graph


def test_not_a_scorer_graph_is_left_alone():
    g = G()
    g.op("Expand", g.input("k", [1, 4]), g.const([3, 4], np.int64), out="y", shape=["candidates", 4])
    g.output("y", ["candidates", 4])
    graph = g.gs()
    assert no_broadcast(graph) is graph


def _extra(build) -> gs.Graph:
    g = _base()
    build(g)
    g.output("extra", None)
    return g.gs()


def test_the_walk_stops_at_matmul_and_at_non_data_inputs():
    def scores_then_expand(g):  # scores (not K/V) may be broadcast at will
        s = g.op("MatMul", "ns_q", g.op("Transpose", "user_k_0", perm=[0, 1, 3, 2]), shape=["candidates", H, 1, "kv_len_0"])
        g.op("Expand", s, g.copy_shape, out="extra", shape=["candidates", H, 1, "kv_len_0"])

    def kv_as_indices(g):  # K/V cast to indices into a per-candidate table: not a copy of K/V
        idx = g.op("Cast", "user_k_0", to=7, shape=KV, dtype=I64)
        g.op("Gather", "ns_q", idx, axis=3, out="extra", shape=["candidates", H, 1, 1, H, "kv_len_0", DH])

    def kv_as_condition(g):  # K/V only decides between per-candidate values
        cond = g.op("Cast", "user_k_0", to=9, shape=KV, dtype=BOOL)
        g.op("Where", cond, "ns_q", "ns_q", out="extra", shape=CKV)

    def kv_as_repeats(g):  # a Tile whose repeats come from K/V: its data is the candidates' own
        r = g.op("Cast", g.op("Reshape", "user_k_0", g.const([-1], np.int64), shape=["n"]), to=7, shape=["n"],
                 dtype=I64)
        g.op("Tile", "ns_q", r, out="extra", shape=["candidates", H, 1, DH])

    for build in (scores_then_expand, kv_as_indices, kv_as_condition, kv_as_repeats):
        assert kv_broadcasts(_extra(build)) == [], build.__name__


def test_where_on_kv_data_with_a_per_candidate_condition_is_reported():
    def where(g):
        cond = g.op("Less", "ns_q", g.const(0.0), shape=["candidates", H, 1, DH], dtype=BOOL)
        g.op("Where", cond, "user_k_0", g.const(0.0), out="extra", shape=CKV, name="w")

    found = kv_broadcasts(_extra(where))
    assert [(f.node.name, f.node.op) for f in found] == [("w", "Where")]


def test_after_a_copy_only_further_broadcast_ops_are_reported():
    def chain(g):
        e = g.op("Expand", "user_k_0", g.copy_shape, shape=CKV, name="first")
        m = g.op("Mul", e, g.const(2.0), shape=CKV, name="scaled_copy")  # already a copy: not again
        g.op("Tile", m, g.const([1, 1, 1, 1], np.int64), out="extra", shape=CKV, name="again")

    found = kv_broadcasts(_extra(chain))
    assert [(f.node.name, [n.name for n in f.path]) for f in found] == [
        ("first", ["first"]), ("again", ["first", "scaled_copy", "again"])]


def test_broadcast_ops_without_the_candidate_dim_are_not_reported_and_concat_with_it_is():
    def grow(g):
        a = g.op("Tile", "user_k_0", g.const([1, 1, 2, 1], np.int64), shape=[1, H, "2*kv_len_0", DH], name="t")
        g.op("Concat", a, "ns_q", axis=2, out="extra", shape=[1, H, "2*kv_len_0 + candidates", DH], name="cat")

    found = kv_broadcasts(_extra(grow))
    assert [(f.node.name, [n.name for n in f.path]) for f in found] == [("cat", ["t", "cat"])]


def test_the_shortest_route_is_reported_and_each_node_once():
    def two_routes(g):
        m = g.op("Mul", "user_k_0", g.const(0.5), shape=KV, name="m")
        s = g.op("Add", m, "user_k_0", shape=KV, name="a")  # reached directly from K and through m
        e = g.op("Expand", s, g.copy_shape, shape=CKV, name="copy")
        v = g.op("Expand", "user_v_0", g.copy_shape, shape=CKV, name="vcopy")
        g.op("Concat", e, v, axis=2, out="extra", shape=["candidates", H, "2*kv_len_0", DH], name="cat")

    found = kv_broadcasts(_extra(two_routes))
    got = sorted((f.source, f.node.name, tuple(n.name for n in f.path)) for f in found)
    assert got == [("user_k_0", "cat", ("a", "copy", "cat")), ("user_k_0", "copy", ("a", "copy")),
                   ("user_v_0", "vcopy", ("vcopy",))]


def test_the_message_names_at_most_three_copies():
    def many(g):
        outs = [g.op("Expand", "user_k_0", g.copy_shape, shape=CKV, name=f"e{i}") for i in range(4)]
        g.op("Sum", *outs, out="extra", shape=CKV)

    graph = _extra(many)
    assert len(kv_broadcasts(graph)) == 4
    with pytest.raises(BuildError) as e:
        no_broadcast(graph)
    msg = str(e.value)
    assert msg.count("Expand e") == 3 and "Expand e3" not in msg and msg.count("; ") == 3


def test_str_of_an_unnamed_node():
    node = gs.Node("Tile", name="")
    b = KVBroadcast("user_v_3", node, (gs.Node("Cast"), node))
    assert str(b) == "Tile ? (user_v_3 -> Cast -> Tile)"


def test_a_stopping_consumer_listed_first_does_not_hide_the_next():
    def shape_first(g):
        g.op("Shape", "user_k_0", out="kshape", shape=[4], dtype=I64)  # read first, not K/V data
        g.op("Expand", "user_k_0", g.copy_shape, out="extra", shape=CKV, name="copy")

    found = kv_broadcasts(_extra(shape_first))
    assert [(f.node.name, [n.op for n in f.path]) for f in found] == [("copy", ["Expand"])]


def test_the_message_joins_copies_with_semicolons():
    def two(g):
        a = g.op("Expand", "user_k_0", g.copy_shape, shape=CKV, name="e0")
        b = g.op("Tile", "user_v_0", g.copy_shape, shape=CKV, name="t1")
        g.op("Add", a, b, out="extra", shape=CKV)

    with pytest.raises(BuildError) as e:
        no_broadcast(_extra(two))
    assert str(e.value) == ("no-broadcast: the candidate scorer copies the user's K/V per candidate "
                            "(Expand e0 (user_k_0 -> Expand); Tile t1 (user_v_0 -> Tile)); "
                            "attend the shared K/V as one batch instead")


def test_a_node_is_judged_once_on_its_shortest_route():
    def late_plain_route(g):  # Add reached first through the copy (already a copy), later through plain K
        e = g.op("Expand", "user_k_0", g.copy_shape, shape=CKV, name="copy")
        m1 = g.op("Mul", "user_k_0", g.const(1.0), shape=KV, name="m1")
        m2 = g.op("Mul", m1, g.const(1.0), shape=KV, name="m2")
        g.op("Add", e, m2, out="extra", shape=CKV, name="add")

    found = kv_broadcasts(_extra(late_plain_route))
    assert [f.node.name for f in found] == ["copy"]
