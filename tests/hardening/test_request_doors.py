"""Hostile request files and request values: every one ends in our own error, never a hang.

Files: integers of thousands of digits (Python's int/str conversion limit raises ValueError
inside ``json.loads``), devices and FIFOs (reading ``/dev/zero`` never ends; opening a FIFO
with no writer blocks), empty files. Values through the Python API: numpy arrays and scalars
are taken as the lists and numbers they hold; objects, bytes, sets, non-string keys,
integers outside 64 bits, self-referencing or deeply nested values are refused by name.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from onetrans_trt.data.requests import MAX_DEPTH, Request, RequestLimits, encode_request, load_requests
from onetrans_trt.errors import RequestError


def _err(fn, *a) -> str:
    with pytest.raises(RequestError) as e:
        fn(*a)
    msg = str(e.value)
    assert msg and "\n" not in msg
    return msg


def test_a_giant_integer_in_a_request_file_is_our_error(tmp_path):
    p = tmp_path / "r.json"
    p.write_text('{"user": {"user_id": ' + "7" * 5000 + '}, "candidates": []}')
    assert _err(load_requests, p).startswith(f"{p}: not usable JSON (Exceeds the limit")
    lines = tmp_path / "r.jsonl"
    lines.write_text('{"candidates": []}\n{"candidates": [' + "7" * 5000 + "]}\n")
    assert _err(load_requests, lines).startswith(f"{lines}: not usable JSON (Exceeds the limit")


def test_an_empty_request_file_is_refused(tmp_path):
    p = tmp_path / "r.json"
    p.write_text(" \n\n ")
    assert _err(load_requests, p) == f"{p}: holds no request (the file is empty)"


def test_devices_and_fifos_are_refused_without_reading_them(tmp_path):
    """In a child process with a deadline: before the fix, /dev/zero was read without end and
    a FIFO with no writer blocked the open forever."""
    fifo = tmp_path / "r.fifo"
    os.mkfifo(fifo)
    code = textwrap.dedent(f"""
        from onetrans_trt.data.requests import RequestLimits, load_requests
        from onetrans_trt.errors import RequestError
        for p in ["/dev/zero", {str(fifo)!r}]:
            for fn in (load_requests, RequestLimits.load):
                try:
                    fn(p)
                except RequestError as e:
                    print(e)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    want = [f"{p}: not a regular file (a device, pipe or socket); give a JSON file" for p in ("/dev/zero", fifo)]
    assert out.stdout.splitlines() == [want[0], want[0], want[1], want[1]]


def test_a_file_that_claims_to_be_empty_is_still_read_within_the_bound(tmp_path):
    """/proc files report size 0 and hold bytes: the read itself is bounded, not the stat."""
    lim = RequestLimits(max_request_bytes=1)
    msg = _err(load_requests, "/proc/self/maps", lim)
    assert msg == "/proc/self/maps: 1025 bytes is over the limit of 1024 requests of 1 bytes " \
                  "(limits.max_request_bytes)"


def _request(movielens) -> dict:
    (req, _), = movielens.requests(1, n_candidates=3, seed=2)
    return req.to_json()


def test_numpy_values_through_the_api_are_the_values_they_hold(movielens):
    plain = _request(movielens)
    with_np = json.loads(json.dumps(plain))
    with_np["candidates"] = np.array(with_np["candidates"], dtype=object)
    with_np["history"] = tuple(with_np["history"])
    ev = with_np["history"][0]
    ev["timestamp"] = np.int64(ev["timestamp"])
    with_np["candidates"][0]["genres"] = np.array(with_np["candidates"][0].get("genres", ["Drama"]))
    plain["candidates"][0]["genres"] = list(with_np["candidates"][0]["genres"])
    a = encode_request(movielens.schema, Request.from_json(plain))
    b = encode_request(movielens.schema, Request.from_json(with_np))
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


@pytest.mark.parametrize("bad, where", [
    (object(), "request.user.user_id: a object is not a JSON value"),
    (b"196", "request.user.user_id: a bytes is not a JSON value"),
    ({1, 2}, "request.user.user_id: a set is not a JSON value"),
    (np.array([b"x"]), "request.user.user_id: a ndarray is not a JSON value"),
    (2 ** 70, "request.user.user_id: integer outside the 64-bit range"),
    (-(2 ** 63) - 1, "request.user.user_id: integer outside the 64-bit range"),
    ({1: "a"}, "request.user.user_id: keys must be strings, got int"),
])
def test_values_that_are_not_json_are_refused_by_name(movielens, bad, where):
    obj = _request(movielens)
    obj["user"]["user_id"] = bad
    assert _err(Request.from_json, obj) == where


def test_the_64_bit_edges_are_accepted(movielens):
    obj = _request(movielens)
    for v in (2 ** 63 - 1, -(2 ** 63), np.uint64(2 ** 63 - 1)):
        obj["user"]["user_id"] = v
        assert Request.from_json(obj).user["user_id"] == int(v)


def test_self_referencing_and_deep_values_are_refused(movielens):
    obj = _request(movielens)
    loop: dict = {}
    loop["again"] = loop
    obj["context"] = loop
    msg = _err(Request.from_json, obj)
    assert msg.startswith("request.context.again.again") and msg.endswith(f"nested more than {MAX_DEPTH} levels deep")
    ok = _request(movielens)
    deep: list = ["leaf"]
    for _ in range(MAX_DEPTH - 4):  # request.candidates[0].x then MAX_DEPTH - 3 lists: just inside
        deep = [deep]
    ok["candidates"][0]["x"] = deep
    Request.from_json(ok)
    ok["candidates"][0]["x"] = [deep]
    assert _err(Request.from_json, ok).endswith(f"nested more than {MAX_DEPTH} levels deep")


@pytest.mark.parametrize("key", [{"a": 1}, [1], True, 1.5])
def test_user_key_must_be_a_string_or_integer(movielens, key):
    obj = _request(movielens)
    obj["user_key"] = key
    assert _err(Request.from_json, obj) == f"request.user_key: expected a string, got {type(key).__name__}"
    obj["user_key"] = 196
    assert Request.from_json(obj).user_key == "196"


def test_the_cli_refuses_hostile_request_files_with_one_line(tiny_ckpt, tmp_path):
    giant = tmp_path / "giant.json"
    giant.write_text('{"candidates": [' + "9" * 6000 + "]}")
    fifo = tmp_path / "r.fifo"
    os.mkfifo(fifo)
    for path, want in [(giant, f"error: {giant}: not usable JSON (Exceeds the limit"),
                       ("/dev/zero", "error: --request /dev/zero: not a regular file"),
                       (fifo, f"error: --request {fifo}: not a regular file")]:
        out = subprocess.run([sys.executable, "-m", "onetrans_trt.cli", "rank", str(tiny_ckpt), "--request", str(path)],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 2, (path, out.stderr[-2000:])
        assert out.stderr.startswith(want) and len(out.stderr.strip().splitlines()) == 1, out.stderr[-2000:]
        assert out.stdout == ""
