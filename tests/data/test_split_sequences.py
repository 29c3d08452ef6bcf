"""Each sequence on its own (``split_sequences`` / ``history_feeds``): what HyFormer's graphs
read, built on the host from the merged stream every request encodes to. Checked against the
request's own events (no stream, no model), on hostile layouts: empty histories, [SEP] tokens,
a stream wider than ``s_max_len``, lengths past the width, zero and negative."""

from __future__ import annotations

import numpy as np
import pytest

from onetrans_trt.data.requests import (
    encode_events,
    history_feeds,
    is_sequence_input,
    merge_stream,
    pad_streams,
    sequence_input_names,
    split_sequences,
)
from onetrans_trt.data.synthetic import synthetic_request, synthetic_schema


def _expected(schema, history, j):
    """Sequence j's kept events (oldest first), from the request events themselves."""
    order = sorted(range(len(history)), key=lambda i: (history[i]["timestamp"],
                                                       schema.sequence_index(history[i]["sequence"]), i))
    kept = [history[i] for i in order][max(0, len(order) - schema.max_history):]
    return [ev for ev in kept if schema.sequence_index(ev["sequence"]) == j]


@pytest.mark.parametrize("merge", ["timestamp_aware", "timestamp_agnostic"])
@pytest.mark.parametrize("extra", [0, 5])
def test_each_sequence_holds_its_own_kept_events_in_order(merge, extra):
    schema = synthetic_schema(max_history=9, n_sequences=3, merge_mode=merge)
    rng = np.random.default_rng(3)
    reqs = [synthetic_request(schema, rng, n_history=n, n_candidates=1) for n in (0, 1, 4, 9, 15)]
    # one user with only the last sequence's events
    reqs.append(synthetic_request(schema, rng, n_history=0, n_candidates=1))
    last = schema.sequences[-1].name
    reqs[-1].history = [e for e in synthetic_request(schema, rng, n_history=20, n_candidates=1).history
                        if e["sequence"] == last]
    streams = [merge_stream(schema, encode_events(schema, r.history)) for r in reqs]
    hist = pad_streams(schema, streams, length=schema.s_max_len + extra)  # wider than s_max_len
    own = split_sequences(schema, hist)
    assert sorted(own) == sorted(sequence_input_names(schema))
    for j, seq in enumerate(schema.sequences):
        width = own[f"s{j}_length"].max(initial=0)
        for f in seq.fields:
            assert own[f"s{j}_{f}"].shape == (len(reqs), max(1, width)) and own[f"s{j}_{f}"].dtype == np.int64
        for u, req in enumerate(reqs):
            n = int(own[f"s{j}_length"][u])
            assert n == len(_expected(schema, req.history, j)), (j, u)  # the count, from the events
            for f in seq.fields:
                row = own[f"s{j}_{f}"][u]
                assert (row[:len(row) - n] == 0).all()  # left padding
    # the values themselves: the merged stream's real events of sequence j, in order
    for u, s in enumerate(streams):
        for j, seq in enumerate(schema.sequences):
            mine = s["s_type"] == j + 1
            for f in seq.fields:
                n = int(own[f"s{j}_length"][u])
                got = own[f"s{j}_{f}"][u][own[f"s{j}_{f}"].shape[1] - n:]
                assert got.tolist() == s[f"s_{f}"][mine][len(s[f"s_{f}"][mine]) - n:].tolist()


def test_lengths_past_the_width_zero_and_negative():
    schema = synthetic_schema(max_history=6, n_sequences=2)
    hist = {"s_type": np.array([[1, 2, 1, 2], [1, 1, 2, 2], [0, 0, 1, 2]]),
            "s_item_id": np.arange(12).reshape(3, 4) + 100,
            "s_length": np.array([99, 0, -3])}
    hist.update({f"s_{f}": np.ones((3, 4), np.int64) for f in schema.seq_fields if f != "item_id"})
    own = split_sequences(schema, hist)
    assert own["s0_length"].tolist() == [2, 0, 0] and own["s1_length"].tolist() == [2, 0, 0]
    assert own["s0_item_id"].tolist() == [[100, 102], [0, 0], [0, 0]]
    assert own["s1_item_id"].tolist() == [[101, 103], [0, 0], [0, 0]]
    # s_max_len cuts the stream first: only the newest positions count
    wide = {k: (np.pad(v, ((0, 0), (5, 0)), constant_values=1) if v.ndim == 2 else v) for k, v in hist.items()}
    wide["s_length"] = np.array([99, 99, 99])
    cut = split_sequences(schema, wide)  # s_max_len 6: of the 9 columns, the newest 6 count
    assert cut["s0_length"].tolist() == [4, 4, 3]  # newest 6: 1,1,1,2,1,2 / 1,1,1,1,2,2 / 1,1,0,0,1,2
    with pytest.raises(ValueError, match="one per user"):
        split_sequences(schema, {**hist, "s_length": np.array([1, 2])})
    with pytest.raises(ValueError, match="users, history"):
        split_sequences(schema, {**hist, "s_type": hist["s_type"][0]})


def test_history_feeds_takes_or_splits_by_the_graphs_names():
    schema = synthetic_schema(max_history=6, n_sequences=2)
    rng = np.random.default_rng(0)
    req = synthetic_request(schema, rng, n_history=6, n_candidates=1)
    hist = pad_streams(schema, [merge_stream(schema, encode_events(schema, req.history))])
    merged = ["s_type", *[f"s_{f}" for f in schema.seq_fields], "s_length"]
    assert history_feeds(hist, merged).keys() == set(merged)  # OneTrans: as they are, no split
    assert all(history_feeds(hist, merged)[n] is hist[n] for n in merged)
    names = sequence_input_names(schema)
    got = history_feeds(hist, names, schema)
    assert list(got) == names and all(is_sequence_input(n) for n in names)
    assert not any(is_sequence_input(n) for n in merged + ["ns_user", "user_k_0"])
    # without a schema: the fields come from the names themselves
    no_schema = history_feeds(hist, names)
    assert all(np.array_equal(no_schema[n], got[n]) for n in names)
    # given per-sequence inputs already: taken as they are
    assert history_feeds(got, names)["s0_length"] is got["s0_length"]
    with pytest.raises(KeyError):
        history_feeds(hist, ["s0_rating"])  # a field the stream does not have
    with pytest.raises(KeyError):
        history_feeds({"s0_length": np.array([1])}, names)  # nothing to split from
