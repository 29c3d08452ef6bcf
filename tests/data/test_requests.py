import numpy as np
import pytest

from onetrans_trt.data.requests import (
    Request,
    encode_events,
    encode_ns,
    encode_request,
    load_requests,
    merge_stream,
    pad_streams,
)
from onetrans_trt.data.schema import OOV
from onetrans_trt.data.synthetic import synthetic_request, synthetic_schema
from onetrans_trt.errors import RequestError


def _ev(seq, t, item, cat=1, action=None):
    e = {"sequence": seq, "timestamp": t, "item_id": item, "category": cat}
    if action is not None:
        e["action"] = action
    return e


def test_timestamp_aware_merge_orders_by_time_and_keeps_newest():
    s = synthetic_schema(max_history=3)
    hist = [_ev("seq0", 5, 10), _ev("seq1", 1, 11, action=0), _ev("seq2", 3, 12), _ev("seq0", 9, 13)]
    m = merge_stream(s, encode_events(s, hist))
    # newest three by time: t=3 (seq2, item 12), t=5 (seq0, 10), t=9 (seq0, 13); oldest first
    assert m["s_item_id"].tolist() == [14, 12, 15]
    assert m["s_type"].tolist() == [3, 1, 1]
    assert m["s_action"].tolist() == [0, 0, 0]  # seq0/seq2 events have no action field


def test_timestamp_agnostic_merge_groups_by_sequence_with_sep():
    s = synthetic_schema(max_history=10, merge_mode="timestamp_agnostic")
    hist = [_ev("seq1", 2, 1, action=3), _ev("seq0", 1, 2), _ev("seq0", 3, 3)]
    m = merge_stream(s, encode_events(s, hist))
    k = s.num_sequences
    assert m["s_type"].tolist() == [1, 1, k + 1, 2, k + 2, k + 3]
    assert m["s_item_id"].tolist() == [4, 5, 0, 3, 0, 0]
    assert m["s_action"].tolist() == [0, 0, 0, 5, 0, 0]


def test_pad_streams_left_pads_and_reports_lengths():
    s = synthetic_schema()
    a = merge_stream(s, encode_events(s, [_ev("seq0", 1, 7)]))
    b = merge_stream(s, encode_events(s, []))
    out = pad_streams(s, [a, b])
    assert out["s_item_id"].tolist() == [[9], [0]]
    assert out["s_length"].tolist() == [1, 0]
    out = pad_streams(s, [a, b], length=3)
    assert out["s_item_id"].tolist() == [[0, 0, 9], [0, 0, 0]]


def test_ns_encoding_repeats_user_and_maps_oov():
    s = synthetic_schema()
    req = Request(user={"user_id": 3, "user_tags": [1, 99999, 2]}, context={"device": 1},
                  history=[], candidates=[{"item_id": 5, "item_category": 2, "item_stats": [1, 2, 3]},
                                          {"item_id": 10**9, "item_category": 0, "item_stats": [0, 0, 0.5]}])
    hist, ns = encode_request(s, req)
    assert ns["ns_user_id"].tolist() == [5, 5]
    assert ns["ns_item_id"].tolist() == [7, OOV]
    assert ns["ns_user_tags"][0].tolist() == [3, OOV, 4, 0]
    assert ns["ns_item_stats"].dtype == np.float32 and ns["ns_item_stats"].shape == (2, 3)
    assert hist["s_length"].tolist() == [0] and hist["s_type"].shape == (1, 1)


@pytest.mark.parametrize("mutate,field", [
    (lambda r: r["candidates"][0].pop("item_id"), r"candidates\[0\]\.item_id"),
    (lambda r: r["user"].pop("user_id"), r"user\.user_id"),
    (lambda r: r["candidates"][0].update(item_stats=[1, 2]), r"item_stats: expected 3"),
    (lambda r: r["candidates"][0].update(item_stats=[1, float("nan"), 2]), "NaN"),
    (lambda r: r["candidates"][0].update(item_stats=["a", 1, 2]), "expected a number"),
    (lambda r: r["history"][0].update(sequence="clicks"), r"history\[0\]\.sequence"),
    (lambda r: r["history"][0].update(timestamp="yesterday"), r"history\[0\]\.timestamp"),
    (lambda r: r["history"][0].pop("item_id"), r"history\[0\]\.item_id"),
    (lambda r: r["candidates"][0].update(item_id={"a": 1}), "single value"),
    (lambda r: r.update(candidates="x"), "candidates: expected a list"),
    (lambda r: r.pop("candidates"), "candidates: missing"),
])
def test_malformed_requests_name_the_field(mutate, field):
    s = synthetic_schema()
    raw = synthetic_request(s, np.random.default_rng(0), n_history=3, n_candidates=2).to_json()
    mutate(raw)
    with pytest.raises(RequestError, match=field):
        encode_request(s, Request.from_json(raw))


def test_load_requests_accepts_object_list_and_jsonl(tmp_path):
    s = synthetic_schema()
    reqs = [synthetic_request(s, np.random.default_rng(i), n_history=2, n_candidates=1).to_json() for i in range(2)]
    import json

    (tmp_path / "one.json").write_text(json.dumps(reqs[0]))
    (tmp_path / "many.json").write_text(json.dumps(reqs))
    (tmp_path / "lines.jsonl").write_text("\n".join(json.dumps(r) for r in reqs))
    assert len(load_requests(tmp_path / "one.json")) == 1
    assert len(load_requests(tmp_path / "many.json")) == 2
    assert len(load_requests(tmp_path / "lines.jsonl")) == 2
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(RequestError, match="not JSON"):
        load_requests(tmp_path / "bad.json")
    with pytest.raises(RequestError, match="no such request file"):
        load_requests(tmp_path / "missing.json")


def test_encode_ns_handles_zero_candidates():
    s = synthetic_schema()
    ns = encode_ns(s, {"user_id": 1, "user_tags": []}, {"device": 0}, [])
    assert ns["ns_item_stats"].shape == (0, 3) and ns["ns_user_tags"].shape == (0, 4)


def _token_schema():
    """The synthetic schema with every table keyed by string tokens (as MovieLens is)."""
    from onetrans_trt.data.schema import FeatureSchema, Table

    s = synthetic_schema(max_history=64)
    tables = {n: Table(n, t.size, t.dim, tokens=[f"{n}-{i}" for i in range(t.size)]) for n, t in s.tables.items()}
    return FeatureSchema(tables, s.features, s.sequences, s.max_history, s.merge_mode)


def _same_events(a, b):
    assert a.types.dtype == b.types.dtype and a.timestamps.dtype == b.timestamps.dtype
    np.testing.assert_array_equal(a.types, b.types)
    np.testing.assert_array_equal(a.timestamps, b.timestamps)
    assert a.fields.keys() == b.fields.keys()
    for k in a.fields:
        assert a.fields[k].dtype == b.fields[k].dtype
        np.testing.assert_array_equal(a.fields[k], b.fields[k])


@pytest.mark.parametrize("tokens", [False, True])
def test_column_wise_event_encoding_equals_the_checked_path(tokens):
    from onetrans_trt.data.requests import _encode_events_checked, _encode_events_fast

    s = _token_schema() if tokens else synthetic_schema(max_history=64)
    rng = np.random.default_rng(3)
    for n in (0, 1, 7, 300):
        hist = synthetic_request(s, rng, n_history=n, n_candidates=1).history
        fast = _encode_events_fast(s, hist)
        assert fast is not None, "well-formed histories must take the column-wise path"
        _same_events(fast, _encode_events_checked(s, hist))
    # odd but valid values (None, numeric strings, floats, bools, huge ints, int timestamps) give
    # the checked path's rows, whichever path takes them
    hist = synthetic_request(s, rng, n_history=12, n_candidates=1).history
    for i, v in enumerate([None, "3", 4.0, True, 2**70, -5, "x", 10**6]):
        hist[i]["item_id"] = v
    hist[9]["timestamp"] = 1_600_000_000
    hist[10]["timestamp"] = 2**80
    _same_events(encode_events(s, hist), _encode_events_checked(s, hist))


@pytest.mark.parametrize("bad,match", [
    ({"timestamp": float("inf")}, r"history\[4\]\.timestamp"),
    ({"timestamp": 10**400}, r"history\[4\]\.timestamp"),
    ({"timestamp": True}, r"history\[4\]\.timestamp"),
    ({"sequence": ["seq0"]}, r"history\[4\]\.sequence"),
    ({"item_id": [1, 2]}, r"history\[4\]\.item_id: expected a single value"),
])
def test_event_errors_name_the_first_bad_event(bad, match):
    s = synthetic_schema(max_history=64)
    hist = synthetic_request(s, np.random.default_rng(4), n_history=10, n_candidates=1).history
    hist[4].update(bad)
    hist[7].update(timestamp="later")  # a second error further on is not the one reported
    with pytest.raises(RequestError, match=match):
        encode_events(s, hist)
