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
    assert plan.lengths == ["s_length"] and CAND_USER in [i.name for i in seg.graph.input]
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


def test_a_wrong_packing_is_caught(tiny_build, tiny_scorer, movielens):
    """The check can fail: users given the wrong length (not clamped per layer) differ."""
    seg, plan = segment_users(tiny_scorer)
    users = _users(tiny_build, movielens, 3, 4, tiny_scorer)
    sess = ort.InferenceSession(seg.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = pack(plan, users)
    good = sess.run(["logits"], feeds)[0]
    for v in plan.valid:
        feeds[v] = np.full_like(feeds[v], 10 ** 6)  # "all real": the padding of shorter users leaks in
    bad = sess.run(["logits"], feeds)[0]
    assert np.abs(good - bad).max() > 1e-3
    parts = unpack({"logits": good}, [u["ns_item_id"].shape[0] for u in users])
    assert [p["logits"].shape[0] for p in parts] == [u["ns_item_id"].shape[0] for u in users]


def test_plan_travels_in_the_graph(tiny_scorer):
    seg, plan = segment_users(tiny_scorer)
    again = Plan.from_model(onnx.load_from_string(seg.SerializeToString()))
    assert again == plan
    with pytest.raises(SegmentError, match="not a segmented scorer"):
        Plan.from_model(tiny_scorer)


def test_refuses_a_length_read_besides_attention(tiny_scorer):
    m = onnx.ModelProto()
    m.CopyFrom(tiny_scorer)
    m.graph.node.append(onnx.helper.make_node("Identity", ["s_length"], ["s_length_too"]))
    m.graph.output.append(onnx.helper.make_tensor_value_info("s_length_too", onnx.TensorProto.INT64, [1]))
    with pytest.raises(SegmentError, match="s_length is read by Identity.*outputs"):
        segment_users(m)


def test_refuses_kv_read_by_other_ops(tiny_scorer):
    m = onnx.ModelProto()
    m.CopyFrom(tiny_scorer)
    m.graph.node.append(onnx.helper.make_node("ReduceSum", ["user_k_0"], ["k_sum"], keepdims=0))
    m.graph.output.append(onnx.helper.make_tensor_value_info("k_sum", onnx.TensorProto.FLOAT, []))
    with pytest.raises(SegmentError, match="user_k_0 is read by .*ReduceSum"):
        segment_users(m)


def test_refuses_a_scorer_without_fused_attention():
    from onnx import TensorProto, helper

    g = helper.make_graph([helper.make_node("MatMul", ["q", "user_k_0"], ["logits"])], "unfused",
                          [helper.make_tensor_value_info("q", TensorProto.FLOAT, ["candidates", 4]),
                           helper.make_tensor_value_info("user_k_0", TensorProto.FLOAT, [1, 4])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["candidates", 1])])
    with pytest.raises(SegmentError, match="no SharedPrefixAttention"):
        segment_users(helper.make_model(g))
