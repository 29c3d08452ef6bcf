"""Request limits: refused over a limit (the field named), or truncated to the newest history
and the first candidates with the cut recorded; ``max_request_bytes`` on files; the same
through ``Ranker`` and ``onetrans-trt rank --limits FILE``."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from click.testing import CliRunner

from onetrans_trt.cli import cli
from onetrans_trt.data.requests import Request, RequestLimits, load_requests
from onetrans_trt.errors import RequestError


def _request(n_history: int, n_candidates: int, seed: int = 0, *, movielens=None) -> Request:
    """A request whose history timestamps are shuffled (list order is not time order)."""
    rng = random.Random(seed)
    if movielens is not None:
        base, _ = movielens.requests(1, n_candidates=n_candidates, seed=seed)[0]
        events = (base.history * (n_history // max(1, len(base.history)) + 1))[:n_history]
        user, cands = base.user, base.candidates
    else:
        events = [{"sequence": "rated_high", "item_id": str(i)} for i in range(n_history)]
        user, cands = {"user_id": "1"}, [{"item_id": str(100 + i)} for i in range(n_candidates)]
    stamps = list(range(1000, 1000 + n_history))
    rng.shuffle(stamps)
    history = [{**ev, "timestamp": t, "tag": i} for i, (ev, t) in enumerate(zip(events, stamps))]
    return Request(dict(user), {}, history, [dict(c) for c in cands], user_key="u1")


# ---- the limits themselves ----------------------------------------------------------------
@pytest.mark.parametrize("kw,needle", [
    ({"max_history": 0}, "limits.max_history"),
    ({"max_candidates": -3}, "limits.max_candidates"),
    ({"max_request_bytes": True}, "limits.max_request_bytes"),
    ({"max_history": "10"}, "limits.max_history"),
    ({"over_limit": "drop"}, "limits.over_limit"),
])
def test_bad_limits_are_refused_naming_the_field(kw, needle):
    with pytest.raises(RequestError, match=needle):
        RequestLimits(**kw)


def test_limits_file(tmp_path):
    p = tmp_path / "limits.json"
    p.write_text(json.dumps({"max_history": 7, "over_limit": "truncate"}))
    lim = RequestLimits.load(p)
    assert (lim.max_history, lim.max_candidates, lim.over_limit) == (7, 10_000, "truncate")
    p.write_text(json.dumps({"max_histroy": 7}))
    with pytest.raises(RequestError, match=r"unknown keys \['max_histroy'\]"):
        RequestLimits.load(p)
    p.write_text("[7]")
    with pytest.raises(RequestError, match="expected a JSON object"):
        RequestLimits.load(p)
    p.write_text("{")
    with pytest.raises(RequestError, match="not a readable limits JSON"):
        RequestLimits.load(p)
    with pytest.raises(RequestError, match="not a readable limits JSON"):
        RequestLimits.load(tmp_path / "missing.json")


# ---- apply: within, refuse, truncate -------------------------------------------------------
def test_within_the_limits_nothing_changes():
    req = _request(5, 3)
    for mode in ("refuse", "truncate"):
        out, cut = RequestLimits(max_history=5, max_candidates=3, over_limit=mode).apply(req)
        assert cut == {}
        assert out.history == req.history and out.candidates == req.candidates


@pytest.mark.parametrize("n_hist,n_cand,field,n,m", [(6, 3, "history", 6, 5), (5, 4, "candidates", 4, 3)])
def test_refuse_names_the_field_and_the_limit(n_hist, n_cand, field, n, m):
    req = _request(n_hist, n_cand)
    with pytest.raises(RequestError) as e:
        RequestLimits(max_history=5, max_candidates=3).apply(req)
    msg = str(e.value)
    assert msg.startswith(f"request.{field}: {n} entries is over the limit of {m} (limits.max_{field};"), msg
    assert "truncate" in msg


def test_truncate_keeps_the_newest_history_in_order_and_the_first_candidates():
    req = _request(40, 9, seed=3)
    out, cut = RequestLimits(max_history=12, max_candidates=4, over_limit="truncate").apply(req)
    assert cut == {"history": {"given": 40, "kept": 12}, "candidates": {"given": 9, "kept": 4}}
    newest = sorted(req.history, key=lambda ev: ev["timestamp"])[-12:]
    # the newest 12 by timestamp (not the last 12 of the list), in the request's own order
    assert out.history == [ev for ev in req.history if ev in newest]
    assert [ev["tag"] for ev in out.history] != [ev["tag"] for ev in req.history[-12:]]
    assert out.candidates == req.candidates[:4]
    assert (out.user, out.user_key) == (req.user, req.user_key)
    assert len(req.history) == 40 and len(req.candidates) == 9  # the input is not mutated


def test_truncate_breaks_timestamp_ties_by_position():
    hist = [{"sequence": "rated_high", "item_id": str(i), "timestamp": t} for i, t in enumerate([5, 9, 9, 9, 1])]
    out, cut = RequestLimits(max_history=2, over_limit="truncate").apply(Request({}, {}, hist, [{}]))
    assert [ev["item_id"] for ev in out.history] == ["2", "3"]  # of the three 9s, the later two
    assert cut == {"history": {"given": 5, "kept": 2}}


def test_truncate_only_cuts_what_is_over():
    req = _request(3, 9)
    out, cut = RequestLimits(max_history=3, max_candidates=2, over_limit="truncate").apply(req)
    assert cut == {"candidates": {"given": 9, "kept": 2}} and out.history == req.history


def test_truncate_needs_timestamps_to_pick_the_newest():
    req = _request(4, 1)
    del req.history[2]["timestamp"]
    with pytest.raises(RequestError, match=r"request.history\[2\].timestamp"):
        RequestLimits(max_history=2, over_limit="truncate").apply(req)


# ---- max_request_bytes on files ----------------------------------------------------------
def test_max_request_bytes(tmp_path):
    req = _request(30, 5).to_json()
    one = json.dumps(req)
    size = len(one.encode())
    p = tmp_path / "r.json"
    p.write_text(one)
    assert len(load_requests(p, RequestLimits(max_request_bytes=size))) == 1  # at the limit: fine
    with pytest.raises(RequestError, match=f"over {size - 1} bytes per request"):
        load_requests(p, RequestLimits(max_request_bytes=size - 1))
    # a list of two may hold twice the bytes
    p.write_text(json.dumps([req, req]))
    assert len(load_requests(p, RequestLimits(max_request_bytes=size + 2))) == 2
    # JSON lines: each line on its own
    small = json.dumps(_request(1, 1).to_json())
    p.write_text(small + "\n" + one + "\n")
    with pytest.raises(RequestError, match=f"line 2 is over {size - 1} bytes"):
        load_requests(p, RequestLimits(max_request_bytes=size - 1))
    assert len(load_requests(p, RequestLimits(max_request_bytes=size))) == 2
    # far over (more than 1024 requests' worth): refused from its size, before it is read
    p.write_text(" " * 2048 + one)
    with pytest.raises(RequestError, match="over the limit of 1024 requests of 1 bytes"):
        load_requests(p, RequestLimits(max_request_bytes=1))


# ---- through the Ranker -------------------------------------------------------------------
@pytest.fixture(scope="module")
def random_ckpt(movielens, tmp_path_factory):
    """A random-weight tiny OneTrans on the MovieLens schema (no training needed: truncation
    must change the scores, and it does with any non-degenerate weights)."""
    from onetrans_trt.data.movielens import TASKS
    from onetrans_trt.models.checkpoint import save_checkpoint
    from onetrans_trt.models.config import ModelConfig
    from onetrans_trt.models.onetrans import OneTrans
    from tests.helpers import randomize

    cfg = ModelConfig.from_preset("tiny", movielens.schema, tasks=list(TASKS))
    return save_checkpoint(randomize(OneTrans(cfg), seed=11), tmp_path_factory.mktemp("limits") / "ck")


def test_ranker_truncates_records_and_scores_the_truncated_request(random_ckpt, movielens):
    from onetrans_trt.runtime.ranker import Ranker

    req = _request(30, 6, seed=4, movielens=movielens)
    limits = RequestLimits(max_history=8, max_candidates=4, over_limit="truncate")
    res = Ranker.load(random_ckpt, limits=limits).rank(req)
    assert res.truncated == {"history": {"given": 30, "kept": 8}, "candidates": {"given": 6, "kept": 4}}
    assert res.to_json()["truncated"] == res.truncated
    cut, _ = limits.apply(req)
    plain = Ranker.load(random_ckpt)
    ref = plain.rank(cut)
    assert ref.truncated is None and "truncated" not in ref.to_json()
    np.testing.assert_array_equal(res.logits, ref.logits)  # exactly the truncated request's scores
    full = plain.rank(req)
    assert full.logits.shape == (6, 2)
    assert not np.allclose(full.logits[:4], res.logits)  # the cut history did change the scores
    with pytest.raises(RequestError, match=r"request.history: 30 entries is over the limit of 8"):
        Ranker.load(random_ckpt, limits=RequestLimits(max_history=8)).rank(req)


# ---- through the CLI ----------------------------------------------------------------------
def _rank(ckpt, req_path, limits: dict | None, tmp_path):
    args = ["rank", str(ckpt), "--request", str(req_path)]
    if limits is not None:
        (tmp_path / "limits.json").write_text(json.dumps(limits))
        args += ["--limits", str(tmp_path / "limits.json")]
    return CliRunner().invoke(cli, args, catch_exceptions=False)


def _one_error_line(r):
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert r.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error:"), (r.exit_code, r.stderr)
    assert r.stdout == ""
    return lines[0]


def test_rank_limits_file(random_ckpt, movielens, tmp_path):
    req = _request(30, 6, seed=5, movielens=movielens)
    path = tmp_path / "req.json"
    path.write_text(json.dumps(req.to_json()))
    r = _rank(random_ckpt, path, None, tmp_path)  # defaults: far under them
    assert r.exit_code == 0, r.output
    full = json.loads(r.stdout)
    assert "truncated" not in full and len(full["scores"]["like"]) == 6

    r = _rank(random_ckpt, path, {"max_history": 8, "max_candidates": 4, "over_limit": "truncate"}, tmp_path)
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["truncated"] == {"history": {"given": 30, "kept": 8}, "candidates": {"given": 6, "kept": 4}}
    assert len(out["scores"]["like"]) == 4 and len(out["order"]) == 4
    cut, _ = RequestLimits(max_history=8, max_candidates=4, over_limit="truncate").apply(req)
    (tmp_path / "cut.json").write_text(json.dumps(cut.to_json()))
    ref = json.loads(_rank(random_ckpt, tmp_path / "cut.json", None, tmp_path).stdout)
    assert "truncated" not in ref
    assert out["logits"] == ref["logits"]  # the newest 8 events and the first 4 items were scored
    assert out["logits"]["like"] != full["logits"]["like"][:4]  # not the full history

    line = _one_error_line(_rank(random_ckpt, path, {"max_candidates": 5}, tmp_path))
    assert "request.candidates: 6 entries is over the limit of 5" in line
    line = _one_error_line(_rank(random_ckpt, path, {"max_history": 29}, tmp_path))
    assert "request.history: 30 entries is over the limit of 29" in line
    line = _one_error_line(_rank(random_ckpt, path, {"max_request_bytes": 100}, tmp_path))
    assert "limits.max_request_bytes" in line
    line = _one_error_line(_rank(random_ckpt, path, {"max_history": 8, "over_limit": "cut"}, tmp_path))
    assert "limits.over_limit" in line
    line = _one_error_line(_rank(random_ckpt, path, {"max_candidates": 0}, tmp_path))
    assert "limits.max_candidates" in line
