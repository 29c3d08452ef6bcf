"""``UserKVCache`` on its own, with small numpy K/V (no model): keys, LRU order, the byte
bound, counters and the fingerprint. (tests/runtime/test_cache.py checks it through a real
Ranker; it takes minutes, too slow to run per mutant.)"""

from __future__ import annotations

import threading

import numpy as np
import pytest

from onetrans_trt.kv import UserKV
from onetrans_trt.runtime.cache import UserKVCache, history_fingerprint


def _kv(nbytes: int, tag: float = 0.0) -> UserKV:
    return UserKV(keys=[np.full(nbytes, tag, np.uint8)], values=[], lengths=np.zeros(1, np.int32))


def _hist(v: int = 0) -> dict[str, np.ndarray]:
    return {"a": np.array([v, 1], np.int64), "b": np.zeros((2, 3), np.float32)}


class Compute:
    def __init__(self, nbytes: int = 10):
        self.nbytes, self.calls = nbytes, 0

    def __call__(self) -> UserKV:
        self.calls += 1
        return _kv(self.nbytes, self.calls)


def test_fingerprint_depends_on_names_values_dtypes_and_shapes_not_order():
    h = _hist()
    fp = history_fingerprint(h)
    assert isinstance(fp, str) and len(fp) == 32  # 16-byte digest, hex
    assert history_fingerprint({"b": h["b"], "a": h["a"]}) == fp  # dict order does not matter
    assert history_fingerprint({k: v.copy() for k, v in h.items()}) == fp
    assert history_fingerprint(_hist(1)) != fp
    assert history_fingerprint({"c": h["a"], "b": h["b"]}) != fp  # names count
    assert history_fingerprint({**h, "a": h["a"].astype(np.int32)}) != fp  # dtype counts
    u8 = np.array([1, 2], np.uint8)
    assert history_fingerprint({"a": u8}) != history_fingerprint({"a": u8.view(np.int8)})  # same bytes
    assert history_fingerprint({**h, "b": h["b"].reshape(3, 2)}) != fp  # shape counts (same bytes)
    assert history_fingerprint({**h, "b": np.asfortranarray(np.arange(6.0).reshape(2, 3))}) == \
        history_fingerprint({**h, "b": np.arange(6.0).reshape(2, 3)})  # layout does not
    # names and contents are not confusable: moving a byte between name and data changes it
    assert history_fingerprint({"ab": np.zeros(0, np.uint8)}) != history_fingerprint({"a": np.zeros(0, np.uint8)})
    assert history_fingerprint({"x": np.zeros(0, np.uint8), "y": np.zeros(0, np.uint8)}) != \
        history_fingerprint({"x": np.zeros(0, np.uint8)})


def test_hits_misses_and_keys():
    c = UserKVCache(max_bytes=1000)
    comp = Compute()
    a = c.get_or_compute("u1", _hist(), comp)
    assert comp.calls == 1 and c.stats() == {"hits": 0, "misses": 1, "evictions": 0, "entries": 1,
                                              "bytes": 10, "max_bytes": 1000}
    assert c.get_or_compute("u1", _hist(), comp) is a and comp.calls == 1
    assert (c.hits, c.misses) == (1, 1)
    assert c.get_or_compute("u1", _hist(), comp) is a and (c.hits, c.misses) == (2, 1)  # counts add up
    b = c.get_or_compute("u2", _hist(), comp)  # another user, same history: its own entry
    assert b is not a and comp.calls == 2
    c.get_or_compute("u1", _hist(1), comp)  # a changed history: a miss, never a stale hit
    assert comp.calls == 3 and len(c) == 3 and c.nbytes == 30
    assert c.stats() == {"hits": 2, "misses": 3, "evictions": 0, "entries": 3, "bytes": 30, "max_bytes": 1000}
    # no user key: keyed by "" and the fingerprint
    n = c.get_or_compute(None, _hist(), comp)
    assert c.get_or_compute("", _hist(), comp) is n and comp.calls == 4


def test_lru_by_bytes_evicts_the_least_recently_used():
    c = UserKVCache(max_bytes=30)
    comp = Compute(10)
    kv = {u: c.get_or_compute(u, _hist(), comp) for u in ("a", "b", "c")}
    assert c.nbytes == 30 and c.evictions == 0  # exactly at the bound: nothing evicted
    c.get_or_compute("a", _hist(), comp)  # a becomes the most recent
    c.get_or_compute("d", _hist(), comp)  # evicts b, the least recently used
    assert c.evictions == 1 and len(c) == 3 and c.nbytes == 30
    assert c.get_or_compute("a", _hist(), comp) is kv["a"]
    assert c.get_or_compute("c", _hist(), comp) is kv["c"]
    calls = comp.calls
    c.get_or_compute("b", _hist(), comp)  # was evicted: recomputed
    assert comp.calls == calls + 1


def test_an_entry_larger_than_the_bound_is_returned_but_not_kept():
    c = UserKVCache(max_bytes=25)
    comp = Compute(10)
    c.get_or_compute("a", _hist(), comp)
    big = Compute(26)
    kv = c.get_or_compute("big", _hist(), big)
    assert kv.nbytes() == 26 and len(c) == 1 and c.nbytes == 10 and c.evictions == 0
    c.get_or_compute("big", _hist(), big)
    assert big.calls == 2  # never cached
    fits = Compute(25)
    c.get_or_compute("fits", _hist(), fits)  # exactly the bound: kept, evicting a
    assert len(c) == 1 and c.nbytes == 25 and c.evictions == 1


def test_one_insertion_can_evict_several():
    c = UserKVCache(max_bytes=30)
    for u in "abc":
        c.get_or_compute(u, _hist(), Compute(10))
    c.get_or_compute("d", _hist(), Compute(25))
    assert c.evictions == 3 and len(c) == 1 and c.nbytes == 25


def test_zero_bytes_caches_nothing_and_negative_is_refused():
    c = UserKVCache(max_bytes=0)
    comp = Compute(1)
    c.get_or_compute("a", _hist(), comp)
    c.get_or_compute("a", _hist(), comp)
    assert comp.calls == 2 and len(c) == 0 and c.nbytes == 0
    empty = Compute(0)
    c.get_or_compute("e", _hist(), empty)  # a zero-byte K/V fits a zero-byte cache
    assert len(c) == 1
    with pytest.raises(ValueError, match=r"^max_bytes must be >= 0$"):
        UserKVCache(max_bytes=-1)


def test_the_default_bound_is_256_mib():
    assert UserKVCache().max_bytes == 256 << 20
    assert UserKVCache().stats() == {"hits": 0, "misses": 0, "evictions": 0, "entries": 0, "bytes": 0,
                                     "max_bytes": 256 << 20}


def test_a_race_to_insert_the_same_key_keeps_one_entry():
    """Two threads miss on one key at once; both compute (outside the lock); one entry stays."""
    c = UserKVCache(max_bytes=1000)
    barrier = threading.Barrier(2)

    def compute():
        barrier.wait(timeout=10)
        return _kv(10)

    out = []
    ts = [threading.Thread(target=lambda: out.append(c.get_or_compute("u", _hist(), compute))) for _ in range(2)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(10)
    assert len(out) == 2 and len(c) == 1 and c.nbytes == 10 and c.misses == 2


def test_compute_runs_outside_the_lock():
    c = UserKVCache(max_bytes=1000)

    def compute():
        assert c._lock.acquire(timeout=5)  # would deadlock (time out) if held by get_or_compute
        c._lock.release()
        return _kv(1)

    c.get_or_compute("u", _hist(), compute)
    assert len(c) == 1
