"""Users' state stores: the in-process LRU and Redis (a real redis-server on loopback).

Byte budgets, TTL, single-flight (threads and processes), two Ranker processes sharing one
Redis (the second encodes nobody), Redis killed mid-load (every request answered, scores
unchanged), slow and corrupt stores, and a new build never reading the old one's entries."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from onetrans_trt.errors import InputError, MissingCapabilityError
from onetrans_trt.kv import UserKV
from onetrans_trt.runtime.state import decode_state, encode_state, history_fingerprint
from onetrans_trt.runtime.store import (LocalStore, RedisStore, StoreError, UserStateStore, parse_store_url,
                                        store_from_url)

ROOT = Path(__file__).resolve().parents[2]
BUILD = "a" * 64


def _kv(nbytes: int = 64, tag: float = 0.0) -> UserKV:
    n = max(nbytes // 8, 1)
    return UserKV([np.full((1, 1, n, 1), tag, np.float32)], [np.full((1, 1, n, 1), -tag, np.float32)],
                  np.array([n], np.int64))


def _hist(v: int = 0) -> dict[str, np.ndarray]:
    return {"a": np.array([v, 1], np.int64)}


class Compute:
    """Counts its calls (thread-safe); optionally slow, so that concurrent misses overlap."""

    def __init__(self, nbytes: int = 64, delay: float = 0.0):
        self.nbytes, self.delay, self.calls = nbytes, delay, 0
        self._lock = threading.Lock()

    def __call__(self) -> UserKV:
        with self._lock:
            self.calls += 1
            tag = float(self.calls)
        time.sleep(self.delay)
        return _kv(self.nbytes, tag)


def _equal(a: UserKV, b: UserKV) -> bool:
    return all(np.asarray(x).tobytes() == np.asarray(y).tobytes() for x, y in zip(a.keys + a.values, b.keys + b.values))


# -- LocalStore --------------------------------------------------------------------------------
def test_local_store_byte_budget_and_evictions():
    s = LocalStore(max_bytes=3 * 64)
    assert isinstance(s, UserStateStore)
    got = {u: s.get_or_compute(u, _hist(), Compute(64)) for u in "abc"}  # 64 bytes each
    assert all(hit is False for _, hit in got.values()) and s.nbytes == 192 and len(s) == 3
    kv, hit = s.get_or_compute("a", _hist(), Compute(64))
    assert hit and kv is got["a"][0]
    s.get_or_compute("d", _hist(), Compute(64))  # evicts b, the least recently used
    st = s.stats()
    assert st["evictions"] == 1 and st["entries"] == 3 and st["bytes"] == 192
    assert s.get("b", history_fingerprint(_hist())) is None and s.get("a", history_fingerprint(_hist())) is got["a"][0]
    big = Compute(400)
    kv, hit = s.get_or_compute("big", _hist(), big)
    assert not hit and kv.nbytes() == 400 and s.stats()["too_big"] == 1 and len(s) == 3
    assert s.put("e", "fp", _kv(64)) and not s.put("f", "fp", _kv(400))


def test_local_store_ttl():
    s = LocalStore(ttl_s=0.2)
    c = Compute()
    s.get_or_compute("u", _hist(), c)
    assert s.get_or_compute("u", _hist(), c)[1] is True
    time.sleep(0.3)
    assert s.get_or_compute("u", _hist(), c)[1] is False
    assert c.calls == 2 and s.stats()["expired"] == 1


def _eight_at_once(s) -> tuple["Compute", list]:
    """Eight threads miss one user at the same moment; the compute (0.3 s) and their answers."""
    c = Compute(delay=0.3)
    barrier = threading.Barrier(8)

    def one(_):
        barrier.wait(5)
        return s.get_or_compute("u", _hist(), c)

    with ThreadPoolExecutor(8) as ex:
        return c, list(ex.map(one, range(8)))


def test_local_store_single_flight_eight_threads_one_compute():
    s = LocalStore()
    c, out = _eight_at_once(s)
    assert c.calls == 1
    assert all(kv is out[0][0] for kv, _ in out) and sorted(h for _, h in out) == [False] + [True] * 7
    st = s.stats()
    assert (st["misses"], st["hits"], st["waits"]) == (1, 7, 7)


def test_local_store_waiters_compute_themselves_when_the_leader_fails():
    s = LocalStore()
    started, release = threading.Event(), threading.Event()

    def failing():
        started.set()
        release.wait(5)
        raise RuntimeError("encoder failed")

    errors = []
    t = threading.Thread(target=lambda: errors.append(pytest.raises(RuntimeError, s.get_or_compute, "u", _hist(),
                                                                    failing)))
    t.start()
    assert started.wait(5)
    c = Compute()
    waiter = ThreadPoolExecutor(1).submit(s.get_or_compute, "u", _hist(), c)
    time.sleep(0.1)
    release.set()
    kv, hit = waiter.result(5)
    t.join(5)
    assert errors and hit is False and c.calls == 1 and len(s) == 1


def test_store_urls():
    m = store_from_url("memory://?max_mb=1&ttl_s=5")
    assert isinstance(m, LocalStore) and m.max_bytes == 1 << 20 and m.ttl_s == 5 and m.build_hash is None
    assert store_from_url("memory://").max_bytes == 256 << 20 and store_from_url("memory://").ttl_s is None
    kind, plain, kw = parse_store_url("redis://:secret@db.example:6380/2?ttl_s=9&max_mb=0.5&timeout_s=0.1")
    assert (kind, plain) == ("redis", "redis://:secret@db.example:6380/2")
    assert kw == {"ttl_s": 9.0, "max_bytes": 1 << 19, "timeout_s": 0.1, "lock_wait_s": 2.0, "retry_s": 1.0}
    assert parse_store_url("unix:///tmp/r.sock?db=3")[1] == "unix:///tmp/r.sock?db=3"
    for url, what in [("memcached://x", "use memory://"), ("memory://?max_gb=1", "unknown parameter"),
                      ("redis://h:1/0?ttl=5", r"unknown parameter\(s\) \['ttl'\]"),
                      ("redis://h:1/0?ttl_s=abc", "not a number"), ("redis://h:1/0?ttl_s=0", "ttl_s must be > 0"),
                      ("redis://h:1/0?max_mb=-1", "must be >= 0"), ("redis://h:1/0?ttl_s=nan", "finite"),
                      ("redis://h:x/0", "port is not a number"), ("redis:///0", "no host"),
                      ("redis://h:1/zero", "database number"), ("redis://h/0?ttl_s=1&ttl_s=2", "given twice")]:
        with pytest.raises(StoreError, match=what):
            parse_store_url(url)
    with pytest.raises(StoreError, match="needs the build hash"):
        store_from_url("redis://127.0.0.1:1/0")
    with pytest.raises(StoreError, match="unknown parameter") as e:
        parse_store_url("redis://:secret@h:1/0?x=1")
    assert "secret" not in str(e.value)  # a password never reaches a message


def test_missing_redis_client_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "redis", None)
    with pytest.raises(MissingCapabilityError, match=r"pip install 'onetrans-trt\[store\]'"):
        store_from_url("redis://127.0.0.1:1/0", build_hash=BUILD)


# -- Ranker wiring (no Redis) ------------------------------------------------------------------
def test_ranker_store_refusals_and_memory_store(tiny_build, tiny_ckpt, movielens):
    from onetrans_trt.runtime.cache import UserKVCache
    from onetrans_trt.runtime.ranker import Ranker, encoder_files, files_hash

    with pytest.raises(InputError, match="not both"):
        Ranker.load(tiny_build, store="memory://", cache=UserKVCache())
    with pytest.raises(InputError, match="encodes no user state"):
        Ranker.load(tiny_build, backend="ort-unified", store="memory://")
    with pytest.raises(InputError, match="goes in cache="):
        Ranker.load(tiny_build, store=UserKVCache())
    with pytest.raises(StoreError, match="not build"):
        Ranker.load(tiny_build, store=LocalStore(build_hash="0" * 64))
    r = Ranker.load(tiny_build, store="memory://?max_mb=8")
    assert r.build_hash == files_hash("ort", encoder_files(tiny_build, "ort"))
    assert r.store.build_hash == r.build_hash and r.store.family == "onetrans"
    req, _ = movielens.requests(1, n_candidates=4, seed=31)[0]
    a, b = r.rank(req), r.rank(req)
    assert np.array_equal(a.logits, b.logits) and r.encoder_runs == 1 and r.store.stats()["hits"] == 1
    t = Ranker.load(tiny_ckpt, store="memory://")  # a checkpoint: the hash of its weights
    t2 = Ranker.load(tiny_ckpt, store="memory://")
    assert t.build_hash == t2.build_hash != r.build_hash and len(t.build_hash) == 64
    with pytest.raises(InputError, match="needs build_hash="):
        Ranker(r.schema, r.tasks, r.backend, store="memory://")


def test_build_hash_follows_the_encoder_file(tmp_path):
    from onetrans_trt.runtime.ranker import files_hash

    f = tmp_path / "user_encoder.onnx"
    f.write_bytes(b"graph one")
    h1 = files_hash("ort", [f])
    assert files_hash("ort", [f]) == h1 and files_hash("ort-fp16", [f]) != h1
    f.write_bytes(b"graph two")
    assert files_hash("ort", [f]) != h1


# -- RedisStore --------------------------------------------------------------------------------
def test_redis_round_trip_key_ttl_and_budget(redis_server):
    client = redis_server.client()
    s = store_from_url(redis_server.url + "?ttl_s=1&max_mb=0.001", build_hash=BUILD, family="onetrans")
    assert isinstance(s, RedisStore) and isinstance(s, UserStateStore)
    fp = history_fingerprint(_hist())
    c = Compute(64)
    kv, hit = s.get_or_compute("user 1", _hist(), c)
    assert not hit and c.calls == 1
    key = f"onetrans:{BUILD}:user 1:{fp}"
    raw = client.get(key)
    assert raw is not None and _equal(decode_state(raw, build_hash=BUILD, fingerprint=fp), kv)
    assert 0 < client.pttl(key) <= 1000
    assert client.get(key + ":lock") is None  # released
    kv2, hit = s.get_or_compute("user 1", _hist(), c)
    assert hit and c.calls == 1 and _equal(kv2, kv)
    assert _equal(s.get("user 1", fp), kv) and s.get("user 2", fp) is None
    time.sleep(1.1)  # the TTL
    assert client.get(key) is None
    kv3, hit = s.get_or_compute("user 1", _hist(), c)
    assert not hit and c.calls == 2
    # over the byte budget (1 KiB here): served, not stored
    big = Compute(8192)
    kv4, hit = s.get_or_compute("big", _hist(), big)
    assert kv4.nbytes() == 8192 and not hit and client.get(f"onetrans:{BUILD}:big:{fp}") is None
    assert s.get_or_compute("big", _hist(), big)[1] is False and big.calls == 2
    assert not s.put("big", fp, kv4)
    st = s.stats()
    assert st["too_big"] == 3 and st["hits"] == 1 and st["misses"] == 4 and st["store_errors"] == 0


def test_named_states_of_any_names_travel_through_redis(redis_server):
    """What a Triton model holds (encoder outputs by graph name) round-trips bit for bit."""
    from onetrans_trt.runtime.state import named_state

    named = {"user_k_0": np.arange(24, dtype=np.float16).reshape(1, 2, 3, 4), "out.weird/name": np.array([[3]]),
             "user_seq_pool": np.linspace(-1, 1, 6, dtype=np.float32).reshape(1, 2, 3)}
    s = store_from_url(redis_server.url, build_hash=BUILD)
    c = Compute()
    s.get_or_compute("u", _hist(), lambda: named_state(named))
    kv, hit = s.get_or_compute("u", _hist(), c)
    assert hit and c.calls == 0 and list(kv.extras) == list(named)
    assert all(kv.extras[n].dtype == a.dtype and kv.extras[n].tobytes() == a.tobytes() for n, a in named.items())


def test_redis_single_flight_threads(redis_server):
    s = store_from_url(redis_server.url, build_hash=BUILD)
    c, out = _eight_at_once(s)
    assert c.calls == 1 and sorted(h for _, h in out) == [False] + [True] * 7
    assert s.stats()["waits"] == 7 and s.stats()["writes"] == 1


def test_redis_single_flight_across_processes(redis_server):
    """Another process holds the key's lock: this one waits for its value (no compute); a
    lock never released costs at most lock_wait_s, then a local encode."""
    client = redis_server.client()
    other = store_from_url(redis_server.url, build_hash=BUILD)
    s = store_from_url(redis_server.url + "?lock_wait_s=3", build_hash=BUILD)
    key = s.key("u", history_fingerprint(_hist()))
    assert client.set(key + ":lock", "other", nx=True, px=10000)
    value = _kv(64, 7.0)
    threading.Timer(0.3, lambda: other.put("u", history_fingerprint(_hist()), value)).start()
    c = Compute()
    t0 = time.monotonic()
    kv, hit = s.get_or_compute("u", _hist(), c)
    assert hit and c.calls == 0 and _equal(kv, value) and 0.25 < time.monotonic() - t0 < 2.5
    assert s.stats()["remote_waits"] == 1
    # a holder that never stores: bounded wait, then local
    s2 = store_from_url(redis_server.url + "?lock_wait_s=0.3", build_hash=BUILD)
    client.set(s2.key("v", history_fingerprint(_hist())) + ":lock", "other", px=10000)
    t0 = time.monotonic()
    kv, hit = s2.get_or_compute("v", _hist(), c)
    assert not hit and c.calls == 1 and 0.25 < time.monotonic() - t0 < 1.5
    # a holder that gives up (releases without a value): no need to wait it out
    client.set(s2.key("w", history_fingerprint(_hist())) + ":lock", "other", px=10000)
    threading.Timer(0.1, lambda: client.delete(s2.key("w", history_fingerprint(_hist())) + ":lock")).start()
    s3 = store_from_url(redis_server.url + "?lock_wait_s=5", build_hash=BUILD)
    t0 = time.monotonic()
    s3.get_or_compute("w", _hist(), c)
    assert c.calls == 2 and time.monotonic() - t0 < 1.5


def test_a_new_build_never_reads_the_old_entries(redis_server):
    client = redis_server.client()
    old = store_from_url(redis_server.url, build_hash="1" * 64)
    new = store_from_url(redis_server.url, build_hash="2" * 64)
    c_old, c_new = Compute(), Compute()
    old.get_or_compute("u", _hist(), c_old)
    kv, hit = new.get_or_compute("u", _hist(), c_new)
    assert not hit and c_new.calls == 1 and len(client.keys("onetrans:*")) == 2
    # the old build's bytes planted under the new build's key: refused by the header, dropped, recomputed
    fp = history_fingerprint(_hist(5))
    client.set(new.key("p", fp), encode_state(_kv(64, 3.0), build_hash="1" * 64, fingerprint=fp))
    kv, hit = new.get_or_compute("p", _hist(5), c_new)
    assert not hit and c_new.calls == 2 and new.stats()["corrupt"] == 1
    assert decode_state(client.get(new.key("p", fp)), build_hash="2" * 64) is not None
    with pytest.raises(StoreError, match="not build"):
        new.bind("1" * 64)


def test_slow_store_answers_within_the_timeout_and_logs_once(caplog):
    """A server that accepts and never answers: each request waits at most timeout_s, then
    encodes locally; one warning for the outage."""
    pytest.importorskip("redis")
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(16)
        port = srv.getsockname()[1]
        s = store_from_url(f"redis://127.0.0.1:{port}/0?timeout_s=0.1&retry_s=0.2", build_hash=BUILD)
        c = Compute()
        caplog.set_level(logging.INFO, logger="onetrans_trt")
        t0 = time.monotonic()
        for i in range(5):
            kv, hit = s.get_or_compute("u", _hist(i), c)
            assert not hit
        assert time.monotonic() - t0 < 1.5 and c.calls == 5
        st = s.stats()
        assert st["store_errors"] >= 1 and st["bypassed"] >= 1 and st["store_errors"] + st["bypassed"] == 5
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "store" in r.getMessage()]
        assert len(warnings) == 1 and "encoding users locally" in warnings[0].getMessage()


# -- Rankers over Redis (the tiny build) -------------------------------------------------------
@pytest.fixture(scope="module")
def reqs(movielens):
    return [r for r, _ in movielens.requests(6, n_candidates=5, seed=41)]


@pytest.fixture(scope="module")
def plain(tiny_build, reqs):
    from onetrans_trt.runtime.ranker import Ranker

    r = Ranker.load(tiny_build, backend="ort")
    return r, [r.rank(q).logits for q in reqs]


def test_two_processes_share_one_redis(redis_server, tiny_build, reqs, plain, tmp_path):
    """This process encodes the users; a second one (the CLI: rank --store) encodes nobody."""
    from onetrans_trt.runtime.ranker import Ranker

    first = Ranker.load(tiny_build, backend="ort", store=redis_server.url)
    for q, want in zip(reqs, plain[1]):
        assert np.array_equal(first.rank(q).logits, want)
    assert first.encoder_runs == len(reqs) and first.store.stats()["writes"] == len(reqs)
    req_file = tmp_path / "reqs.json"
    req_file.write_text(json.dumps([q.to_json() for q in reqs]))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "onetrans_trt.cli", "-v", "rank", str(tiny_build), "--request",
                        str(req_file), "--store", redis_server.url], capture_output=True, text=True, env=env,
                       cwd=ROOT, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert f"store: {len(reqs)} hits, 0 misses, 0 encoder runs, 0 store errors" in p.stderr, p.stderr[-2000:]
    out = json.loads(p.stdout)
    for o, want in zip(out, plain[1]):
        got = np.array([o["logits"][t] for t in plain[0].tasks]).T
        assert np.abs(got - want).max() <= 1e-5


def test_redis_killed_mid_load_loses_no_request(redis_server, tiny_build, reqs, plain):
    from onetrans_trt.runtime.ranker import Ranker

    r = Ranker.load(tiny_build, backend="ort", store=redis_server.url + "?retry_s=0.05&timeout_s=0.2")
    n = 48
    order = [i % len(reqs) for i in range(n)]
    killed = threading.Event()

    def one(i):
        if i == n // 2:
            redis_server.proc.kill()
            redis_server.proc.wait(5)
            killed.set()
        return r.rank(reqs[order[i]]).logits

    with ThreadPoolExecutor(4) as ex:
        out = list(ex.map(one, range(n)))
    assert killed.is_set() and len(out) == n
    worst = max(float(np.abs(got - plain[1][order[i]]).max()) for i, got in enumerate(out))
    assert worst <= 1e-5
    st = r.store.stats()
    assert st["store_errors"] > 0 and st["hits"] + st["misses"] == n and r.encoder_runs == st["misses"]
    assert st["hits"] > 0  # the store served before it died


@pytest.mark.parametrize("garbage", ["random", "flipped", "truncated"])
def test_a_corrupt_entry_is_dropped_and_recomputed(redis_server, tiny_build, reqs, plain, garbage):
    from onetrans_trt.data.requests import encode_request
    from onetrans_trt.runtime.ranker import Ranker

    client = redis_server.client()
    r = Ranker.load(tiny_build, backend="ort", store=redis_server.url)
    q, want = reqs[0], plain[1][0]
    r.rank(q)
    key = r.store.key(q.user_key, history_fingerprint(encode_request(r.schema, q)[0]))
    good = client.get(key)
    bad = {"random": os.urandom(len(good)), "flipped": good[:100] + bytes([good[100] ^ 1]) + good[101:],
           "truncated": good[:len(good) // 2]}[garbage]
    client.set(key, bad)
    assert np.array_equal(r.rank(q).logits, want)
    assert r.encoder_runs == 2 and r.store.stats()["corrupt"] == 1
    assert client.get(key) == good  # recomputed and stored again, bit for bit
    assert np.array_equal(r.rank(q).logits, want) and r.encoder_runs == 2  # a hit again
