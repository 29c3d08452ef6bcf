"""``onetrans_trt.data.requests`` pinned down where mutation testing found slack: request
parsing field by field, exact error messages, dtypes and shapes of every encoded tensor (also
for zero candidates), the list-of-users path, and the helpers no other fast test reaches."""

from __future__ import annotations

import json

import numpy as np
import pytest

from onetrans_trt.data.requests import (
    FLOAT32_MAX,
    Events,
    Request,
    RequestLimits,
    _encode_events_checked,
    _encode_events_fast,
    encode_events,
    encode_ns,
    load_requests,
    merge_stream,
    pad_streams,
    repeat_history,
)
from onetrans_trt.data.schema import OOV, Table
from onetrans_trt.data.synthetic import synthetic_schema
from onetrans_trt.errors import RequestError

S = synthetic_schema()


def _ev(seq, t, item, cat=1, **kw):
    return {"sequence": seq, "timestamp": t, "item_id": item, "category": cat, **kw}


def _cand(i=5):
    return {"item_id": i, "item_category": 2, "item_stats": [1, 2, 3]}


def _err(fn, *a, **kw) -> str:
    with pytest.raises(RequestError) as e:
        fn(*a, **kw)
    return str(e.value)


# ---- Request.from_json / to_json ----------------------------------------------------------

def test_from_json_reads_every_field():
    obj = {"user": {"user_id": 1}, "context": {"device": 2}, "history": [_ev("seq0", 1, 3)],
           "candidates": [_cand()], "user_key": 42}
    r = Request.from_json(obj)
    assert r.user == {"user_id": 1} and r.context == {"device": 2}
    assert r.history == [_ev("seq0", 1, 3)] and r.candidates == [_cand()]
    assert r.user_key == "42" and isinstance(r.user_key, str)  # any key becomes a string
    assert r.user is not obj["user"] and r.history is not obj["history"]  # copies
    assert r.to_json() == {**obj, "user_key": "42"}


def test_from_json_defaults():
    r = Request.from_json({"candidates": []})
    assert (r.user, r.context, r.history, r.candidates, r.user_key) == ({}, {}, [], [], None)
    assert "user_key" not in r.to_json()
    assert r.to_json() == {"user": {}, "context": {}, "history": [], "candidates": []}
    assert Request.from_json({"candidates": [], "user_key": ""}).user_key == ""


@pytest.mark.parametrize("obj,msg", [
    ([], "request: expected a JSON object at the top level"),
    ({"candidates": [], "user": []}, "request.user: expected an object"),
    ({"candidates": [], "context": 1}, "request.context: expected an object"),
    ({"candidates": [], "history": {}}, "request.history: expected a list"),
    ({"candidates": {}}, "request.candidates: expected a list"),
    ({"user": {}}, "request.candidates: missing (a list of candidate items)"),
    ({"candidates": [], "history": [_ev("seq0", 1, 3), 3]}, "request.history[1]: expected an object"),
    # an event needs its sequence and a finite timestamp (the encoder and the limits read both)
    ({"candidates": [], "history": [{}, 3]}, "request.history[0].sequence: missing"),
    ({"candidates": [], "history": [{"sequence": "seq0"}]}, "request.history[0].timestamp: missing"),
    ({"candidates": [], "history": [{"sequence": 0, "timestamp": 1}]},
     "request.history[0].sequence: expected a string, got int"),
    ({"candidates": [], "history": [_ev("seq0", True, 3)]},
     "request.history[0].timestamp: expected a finite number, got 'True'"),
    ({"candidates": [], "history": [_ev("seq0", float("-inf"), 3)]},
     "request.history[0].timestamp: expected a finite number, got '-inf'"),
    ({"candidates": [{}, {}, "x"]}, "request.candidates[2]: expected an object"),
])
def test_from_json_errors(obj, msg):
    assert _err(Request.from_json, obj) == msg


# ---- load_requests -------------------------------------------------------------------------

def test_load_requests_reads_one_a_list_or_json_lines(tmp_path):
    one = {"candidates": [_cand()], "user_key": "a"}
    p = tmp_path / "r.json"
    p.write_text(json.dumps(one), encoding="utf-8")
    assert [r.user_key for r in load_requests(p)] == ["a"]
    p.write_text(json.dumps([one, {**one, "user_key": "b"}]))
    assert [r.user_key for r in load_requests(p)] == ["a", "b"]
    p.write_text(json.dumps(one) + "\n\n" + json.dumps({**one, "user_key": "ü"}) + "\n", encoding="utf-8")
    assert [r.user_key for r in load_requests(p)] == ["a", "ü"]


def test_load_requests_errors(tmp_path):
    p = tmp_path / "missing.json"
    assert _err(load_requests, p) == f"{p}: no such request file"
    d = tmp_path / "dir.json"
    d.mkdir()
    assert _err(load_requests, d).startswith(f"{d}: cannot read ([Errno 21] Is a directory")
    bad = tmp_path / "bad.json"
    bad.write_bytes(b"\xff\xfe{}")
    assert _err(load_requests, bad).startswith(f"{bad}: cannot read ('utf-8' codec can't decode")
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    assert _err(load_requests, deep) == f"{deep}: JSON nested too deeply"
    deep_lines = tmp_path / "deep.jsonl"
    deep_lines.write_text("{}\n" + "[" * 100_000 + "]" * 100_000 + "\n")
    assert _err(load_requests, deep_lines) == f"{deep_lines}: JSON nested too deeply"


def test_load_requests_file_size_limit_is_inclusive(tmp_path):
    lim = RequestLimits(max_request_bytes=1)
    p = tmp_path / "r.jsonl"
    p.write_text("x" * 1024)  # exactly 1024 requests of 1 byte: not refused for its size
    assert "is over the limit of 1024 requests" not in _err(load_requests, p, lim)
    p.write_text("x" * 1025)
    assert _err(load_requests, p, lim) == (f"{p}: 1025 bytes is over the limit of 1024 requests of 1 bytes "
                                           f"(limits.max_request_bytes)")


# ---- RequestLimits ---------------------------------------------------------------------------

def test_limits_from_json_and_load_errors(tmp_path):
    assert _err(RequestLimits.from_json, []) == "limits: expected a JSON object"
    p = tmp_path / "l.json"
    p.write_bytes(b"\xff")
    msg = _err(RequestLimits.load, p)
    assert msg.startswith(f"{p}: not a readable limits JSON file ('utf-8' codec can't decode byte 0xff")
    long_dir = tmp_path / ("d" * 200)  # reading a directory: an error naming the long path
    long_dir.mkdir()
    msg = _err(RequestLimits.load, long_dir)
    inner = msg[len(f"{long_dir}: not a readable limits JSON file ("):-1]
    assert inner == f"[Errno 21] Is a directory: '{long_dir}'"[:120]
    p.write_text(json.dumps({"max_history": 7}), encoding="utf-8")
    assert RequestLimits.load(p) == RequestLimits(max_history=7)


def test_truncate_at_exactly_the_candidate_limit_cuts_nothing_and_keeps_extra():
    lim = RequestLimits(max_history=2, max_candidates=2, over_limit="truncate")
    req = Request({}, {}, [_ev("seq0", i, 1) for i in range(3)], [_cand(), _cand()], "k", {"trace": 1})
    out, cut = lim.apply(req)
    assert cut == {"history": {"given": 3, "kept": 2}}  # candidates at the limit: not cut
    assert out.extra == {"trace": 1} and out.user_key == "k" and len(out.candidates) == 2
    req = Request({"user_id": 1}, {"device": 2}, [], [_cand()] * 3, None)
    out, cut = lim.apply(req)
    assert (out.user, out.context, cut) == ({"user_id": 1}, {"device": 2}, {"candidates": {"given": 3, "kept": 2}})


def test_truncating_a_history_with_a_non_object_event_is_a_request_error():
    lim = RequestLimits(max_history=1, over_limit="truncate")
    req = Request({}, {}, [_ev("seq0", 1, 1), "not an event"], [])
    assert _err(lim.apply, req) == "request.history[1].timestamp: expected a finite number"


def test_limits_from_json_accepts_every_key():
    obj = {"max_history": 1, "max_candidates": 2, "max_request_bytes": 3, "over_limit": "truncate"}
    assert RequestLimits.from_json(obj) == RequestLimits(1, 2, 3, "truncate")


# ---- value encoding --------------------------------------------------------------------------

def _ns(user=None, context=None, items=None, **kw):
    user = {"user_id": 3, "user_tags": [1, 2]} if user is None else user
    return encode_ns(S, user, {"device": 1} if context is None else context,
                     [_cand()] if items is None else items, **kw)


def test_ns_dtypes_and_shapes_also_for_zero_candidates():
    for c in (0, 2):
        out = _ns(items=[_cand()] * c)
        assert out["ns_user_id"].dtype == np.int64 and out["ns_user_id"].shape == (c,)
        assert out["ns_item_id"].dtype == np.int64 and out["ns_item_id"].shape == (c,)
        assert out["ns_user_tags"].dtype == np.int64 and out["ns_user_tags"].shape == (c, 4)
        assert out["ns_item_stats"].dtype == np.float32 and out["ns_item_stats"].shape == (c, 3)


def test_ns_errors_name_the_field():
    assert _err(_ns, user={"user_id": [1], "user_tags": []}) == "request.user.user_id: expected a single value, got list"
    assert _err(_ns, user={"user_id": 1, "user_tags": [{}]}) == "request.user.user_tags[0]: expected a single value, got dict"
    assert _err(_ns, user={"user_id": 1, "user_tags": [1, [2]]}) == "request.user.user_tags[1]: expected a single value, got list"
    assert _err(_ns, items=[_cand(), {"item_id": 1, "item_category": 1}]) == "request.candidates[1].item_stats: missing"
    assert _err(_ns, context={}) == "request.context.device: missing"
    assert _err(_ns, context={}, where="rq") == "rq.context.device: missing"


def test_multihot_single_values_none_pad_and_truncation():
    out = _ns(user={"user_id": 1, "user_tags": 3})  # a single value counts as a list of one
    assert out["ns_user_tags"].tolist() == [[5, 0, 0, 0]]
    out = _ns(user={"user_id": 1, "user_tags": None})
    assert out["ns_user_tags"].tolist() == [[0, 0, 0, 0]]
    out = _ns(user={"user_id": 1, "user_tags": [None, 1, None, 2, 3, 4, 5]})  # PADs dropped, then cut to 4
    assert out["ns_user_tags"].tolist() == [[3, 4, 5, 6]]


def test_dense_values_and_errors():
    c = {"item_id": 1, "item_category": 1}
    out = _ns(items=[{**c, "item_stats": [1, 2.5, -3]}])
    assert out["ns_item_stats"].tolist() == [[1.0, 2.5, -3.0]]
    one = synthetic_schema()
    # a dense feature of dim 1 accepts a bare number
    from onetrans_trt.data.requests import _dense

    assert _dense(2.5, 1, "w").tolist() == [2.5] and _dense(2.5, 1, "w").dtype == np.float32
    assert _dense([FLOAT32_MAX], 1, "w").tolist() == [FLOAT32_MAX]  # the largest float32 is fine
    assert _err(_dense, 2.5, 2, "w") == "w: expected 2 number(s), got 1"
    assert _err(_dense, ["x" * 50], 1, "w") == f"w: expected a number, got {'x' * 40!r}"
    assert _err(_dense, [True], 1, "w") == "w: expected a number, got 'True'"
    assert _err(_dense, [float("nan")], 1, "w") == "w: NaN/Inf (or a number too big for a float) is not allowed"
    assert _err(_dense, [1e39], 1, "w") == "w: 1e+39 overflows float32"
    assert _err(_dense, [-1e39], 1, "w") == "w: -1e+39 overflows float32"
    assert one is not None


def test_a_list_of_users_one_per_row():
    users = [{"user_id": 1, "user_tags": [1]}, {"user_id": 2, "user_tags": [2, 3]}]
    out = encode_ns(S, users, {"device": 1}, [_cand(), _cand(6)])
    assert out["ns_user_id"].tolist() == [3, 4]
    assert out["ns_user_tags"].tolist() == [[3, 0, 0, 0], [4, 5, 0, 0]]
    assert out["ns_device"].tolist() == [3, 3]
    assert out["ns_item_id"].tolist() == [7, 8]
    assert _err(encode_ns, S, [users[0], {"user_tags": []}], {"device": 1}, [_cand(), _cand()]) == \
        "request[1].user.user_id: missing"


def test_shared_user_and_context_values_are_encoded_once_but_items_each_time():
    """One user/context object is encoded once (cached by identity) even for many rows; the
    same item object listed twice is encoded per row (rows of candidates are independent)."""
    calls = []

    class Counting(dict):
        def __getitem__(self, k):
            calls.append(k)
            return super().__getitem__(k)

    item = Counting(_cand())
    out = encode_ns(S, Counting({"user_id": 3, "user_tags": [1]}), Counting({"device": 1}), [item, item, item])
    assert calls.count("user_id") == 1 and calls.count("device") == 1 and calls.count("user_tags") == 1
    assert calls.count("item_id") == 3
    assert out["ns_item_id"].tolist() == [7, 7, 7] and out["ns_user_id"].tolist() == [5, 5, 5]
    # two different users in a list are both encoded even when equal
    calls.clear()
    users = [Counting({"user_id": 3, "user_tags": []}), Counting({"user_id": 3, "user_tags": []})]
    encode_ns(S, users, {"device": 1}, [_cand(), _cand()])
    assert calls.count("user_id") == 2


# ---- events ----------------------------------------------------------------------------------

def test_fast_and_checked_paths_agree_and_have_the_same_dtypes():
    hist = [_ev("seq1", 2.5, 7, action=3), _ev("seq0", 1, 10**6), _ev("seq2", 3, 4, cat=99)]
    fast = _encode_events_fast(S, hist)
    checked = _encode_events_checked(S, hist)
    assert fast is not None
    for ev in (fast, checked, encode_events(S, hist)):
        assert ev.types.tolist() == [2, 1, 3] and ev.types.dtype == np.int64 and ev.types.shape == (3,)
        assert ev.timestamps.tolist() == [2.5, 1.0, 3.0] and ev.timestamps.dtype == np.float64
        assert ev.fields["item_id"].tolist() == [9, OOV, 6] and ev.fields["item_id"].dtype == np.int64
        assert ev.fields["category"].tolist() == [3, 3, OOV]
        assert ev.fields["action"].tolist() == [5, 0, 0]


def test_tokens_tables_on_the_fast_path():
    t = Table("tok", 2, 4, tokens=["a", "b"])
    from onetrans_trt.data.requests import _table_rows

    rows = _table_rows(t, ["b", "zz", "a"])
    assert rows.tolist() == [3, OOV, 2] and rows.dtype == np.int64
    assert _table_rows(t, ["a", 1]) is None
    ints = _table_rows(Table("n", 3, 4), [0, 2, 3, -1])
    assert ints.tolist() == [2, 4, OOV, OOV] and ints.dtype == np.int64


def test_unusual_histories_take_the_checked_path_with_messages():
    assert _encode_events_fast(S, [_ev("seq0", None, 1)]) is None
    assert _encode_events_fast(S, [_ev("nope", 1, 1)]) is None
    assert _err(encode_events, S, [_ev("nope", 1, 1)]) == \
        "request.history[0].sequence: 'nope' is not one of ['seq0', 'seq1', 'seq2']"
    assert _err(encode_events, S, [_ev("seq0", 1, 1), _ev("seq0", "x" * 50, 1)]) == \
        f"request.history[1].timestamp: expected a finite number, got {'x' * 40!r}"
    assert _err(encode_events, S, [_ev("seq0", float("inf"), 1)], where="h") == \
        "h[0].timestamp: expected a finite number, got 'inf'"
    assert _err(_encode_events_checked, S, [{"sequence": "seq0", "timestamp": 1}]) == \
        "request.history[0].item_id: missing"
    # an unusual but valid history (a bool-free numeric string id) is encoded by the checked path
    ev = encode_events(S, [_ev("seq0", 1, "7")])
    assert ev.fields["item_id"].tolist() == [9] and ev.timestamps.dtype == np.float64


def test_events_slice():
    ev = encode_events(S, [_ev("seq0", i, i) for i in range(5)])
    part = ev.slice(1, 3)
    assert isinstance(part, Events) and len(part) == 2
    assert part.types.tolist() == [1, 1] and part.timestamps.tolist() == [1.0, 2.0]
    assert part.fields["item_id"].tolist() == [3, 4] and set(part.fields) == set(ev.fields)


def test_agnostic_merge_dtypes():
    s = synthetic_schema(merge_mode="timestamp_agnostic")
    m = merge_stream(s, encode_events(s, [_ev("seq0", 1, 1)]))
    assert all(v.dtype == np.int64 for v in m.values())


def test_pad_streams_shapes_dtypes_and_errors():
    a = merge_stream(S, encode_events(S, [_ev("seq0", 1, 7), _ev("seq0", 2, 8)]))
    out = pad_streams(S, [a])
    assert all(v.dtype == np.int64 for v in out.values()), {k: v.dtype for k, v in out.items()}
    assert out["s_length"].tolist() == [2]
    assert out["s_item_id"].shape == (1, 2)
    empty = pad_streams(S, [])
    assert empty["s_item_id"].shape == (0, 1) and empty["s_length"].dtype == np.int64
    with pytest.raises(ValueError, match=r"^stream longer than the padded length 1$"):
        pad_streams(S, [a], length=1)


def test_repeat_history():
    h = {"s_type": np.array([[1, 2]]), "s_length": np.array([2])}
    r = repeat_history(h, 3)
    assert r["s_type"].tolist() == [[1, 2]] * 3 and r["s_length"].tolist() == [2, 2, 2]
    assert set(r) == set(h)
