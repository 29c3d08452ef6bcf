"""segment_users: the packed scorer of several users per call == one call per user (ORT, real
K/V from the build's user encoder on MovieLens requests), and clear refusals where it cannot be."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from onetrans_trt.graphs.segment_users import CAND_USER, Plan, SegmentError, check, pack, segment_users, unpack


def _users(build, movielens, n: int, seed: int, scorer: onnx.ModelProto, history_cut=None):
    """n users' one-user scorer feeds: K/V from the build's user encoder on real requests
    (histories cut to random lengths, 0 included), candidates 1..7 each."""
    from onetrans_trt.data.requests import encode_request
    from onetrans_trt.ort_options import session_options

    enc = ort.InferenceSession(str(build / "user_encoder.onnx"), session_options(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(seed)
    names = [i.name for i in scorer.graph.input]
    users = []
    for req, _ in movielens.requests(n, n_candidates=int(rng.integers(1, 8)), seed=seed):
        cut = int(rng.integers(0, len(req.history) + 1)) if history_cut is None else history_cut
        req = type(req)(**{**req.__dict__, "history": req.history[len(req.history) - cut:]})
        hist, ns = encode_request(movielens.schema, req)
        outs = dict(zip([o.name for o in enc.get_outputs()],
                        enc.run(None, {i.name: hist[i.name] for i in enc.get_inputs()})))
        users.append({k: (outs[k] if k in outs else hist[k][:1] if k == "s_length" else ns[k]) for k in names})
    return users


@pytest.fixture(scope="module")
def tiny_scorer(tiny_build):
    return onnx.load(str(tiny_build / "candidate_scorer.onnx"))


def test_packed_scorer_equals_one_call_per_user(tiny_build, tiny_scorer, movielens):
    seg, plan = segment_users(tiny_scorer)
    assert plan.rows == ["s_length"] and plan.kv_len == {"user_k_0_len": "user_k_0", "user_k_1_len": "user_k_1"}
    assert CAND_USER in [i.name for i in seg.graph.input]
    ops = {n.op_type for n in seg.graph.node}
    assert "SegmentedPrefixAttention" in ops and "SharedPrefixAttention" not in ops
    worst = 0.0
    for seed in range(6):  # 1..6 users, histories of every length from empty to full
        users = _users(tiny_build, movielens, seed + 1, seed, tiny_scorer)
        worst = max(worst, check(tiny_scorer, seg, users))
    assert worst <= 1e-5
    # empty histories for every user, and one user per call
    assert check(tiny_scorer, seg, _users(tiny_build, movielens, 3, 9, tiny_scorer, history_cut=0)) <= 1e-5
    assert check(tiny_scorer, seg, _users(tiny_build, movielens, 1, 10, tiny_scorer)) <= 1e-6


def test_a_length_meaning_all_is_capped_per_user(tiny_build, tiny_scorer, movielens):
    """A length >= the K/V's means "all real" to the one-user scorer; in a packed batch a shorter
    user's row is left-padded, so the packed graph caps each length at the user's own K/V
    length. Equal with the cap; without it (the caps fed huge) the padding leaks in."""
    seg, plan = segment_users(tiny_scorer)
    users = _users(tiny_build, movielens, 2, 4, tiny_scorer, history_cut=3) + \
        _users(tiny_build, movielens, 1, 5, tiny_scorer, history_cut=40)
    users[0]["s_length"] = np.array([10 ** 6], np.int64)  # "all": 3 real tokens, a row padded to 40
    assert check(tiny_scorer, seg, users) <= 1e-5
    sess = ort.InferenceSession(seg.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = pack(plan, users)
    good = sess.run(["logits"], feeds)[0]
    for v in plan.kv_len:
        feeds[v] = np.full_like(feeds[v], 10 ** 6)
    bad = sess.run(["logits"], feeds)[0]
    n0 = users[0]["ns_item_id"].shape[0]
    assert np.abs(good[:n0] - bad[:n0]).max() > 1e-3 and np.abs(good[n0:] - bad[n0:]).max() == 0
    parts = unpack({"logits": good}, [u["ns_item_id"].shape[0] for u in users])
    assert [p["logits"].shape[0] for p in parts] == [u["ns_item_id"].shape[0] for u in users]


def test_plan_travels_in_the_graph(tiny_scorer):
    seg, plan = segment_users(tiny_scorer)
    again = Plan.from_model(onnx.load_from_string(seg.SerializeToString()))
    assert again == plan
    with pytest.raises(SegmentError, match="not a segmented scorer"):
        Plan.from_model(tiny_scorer)


def test_a_length_read_besides_attention_is_gathered_per_candidate(tiny_build, tiny_scorer, movielens):
    """A per-user input read by another op: that op reads each candidate's own user's row."""
    m = onnx.ModelProto()
    m.CopyFrom(tiny_scorer)
    m.graph.node.append(onnx.helper.make_node("Cast", ["s_length"], ["s_length_f"], to=onnx.TensorProto.FLOAT))
    m.graph.node.append(onnx.helper.make_node("Unsqueeze", ["s_length_f", "one_ax"], ["s_length_col"]))
    m.graph.initializer.append(onnx.numpy_helper.from_array(np.array([1], np.int64), "one_ax"))
    m.graph.node.append(onnx.helper.make_node("Add", ["logits", "s_length_col"], ["logits_plus_len"]))
    m.graph.output.append(onnx.helper.make_tensor_value_info("logits_plus_len", onnx.TensorProto.FLOAT, ["candidates", 2]))
    seg, _ = segment_users(m)
    assert "Gather" in {n.op_type for n in seg.graph.node}
    users = _users(tiny_build, movielens, 4, 12, tiny_scorer)
    assert check(m, seg, users) <= 1e-5


def test_refuses_kv_read_by_other_ops(tiny_scorer):
    m = onnx.ModelProto()
    m.CopyFrom(tiny_scorer)
    m.graph.node.append(onnx.helper.make_node("ReduceSum", ["user_k_0"], ["k_sum"], keepdims=0))
    m.graph.output.append(onnx.helper.make_tensor_value_info("k_sum", onnx.TensorProto.FLOAT, []))
    with pytest.raises(SegmentError, match="user_k_0 is read by ReduceSum .*besides SharedPrefixAttention"):
        segment_users(m)


def test_refuses_a_scorer_without_fused_attention():
    from onnx import TensorProto, helper

    g = helper.make_graph([helper.make_node("MatMul", ["q", "user_k_0"], ["logits"])], "unfused",
                          [helper.make_tensor_value_info("q", TensorProto.FLOAT, ["candidates", 4]),
                           helper.make_tensor_value_info("user_k_0", TensorProto.FLOAT, [1, 4])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["candidates", 1])])
    with pytest.raises(SegmentError, match="no SharedPrefixAttention"):
        segment_users(helper.make_model(g))
