"""The per-user K/V cache: hits skip the user encoder, results never change, LRU by
bytes, and no request is ever answered with another user's K/V (also under threads)."""

from __future__ import annotations

import threading

import numpy as np

from onetrans_trt.runtime.cache import UserKVCache
from onetrans_trt.runtime.ranker import Ranker


class CountingBackend:
    """Wraps a split backend and counts user-encoder runs."""

    def __init__(self, inner):
        self.inner, self.name, self.split = inner, inner.name, True
        self.encodes = 0
        self._lock = threading.Lock()

    def encode_user(self, hist):
        with self._lock:
            self.encodes += 1
        return self.inner.encode_user(hist)

    def score(self, kv, ns):
        return self.inner.score(kv, ns)


def test_hits_skip_the_encoder_and_change_nothing(tiny_build, movielens):
    plain = Ranker.load(tiny_build)
    counting = CountingBackend(plain.backend)
    cached = Ranker(plain.schema, plain.tasks, counting, cache=UserKVCache())
    reqs = [r for r, _ in movielens.requests(5, n_candidates=6, seed=12)]
    for _ in range(3):
        for r in reqs:
            assert np.array_equal(cached.rank(r).logits, plain.rank(r).logits)
    assert counting.encodes == 5
    assert cached.cache.stats()["hits"] == 10 and cached.cache.stats()["misses"] == 5
    # a changed history is a miss, never a stale hit
    reqs[0].history = reqs[0].history[:-1]
    cached.rank(reqs[0])
    assert counting.encodes == 6


def test_lru_bounded_in_bytes(tiny_build, movielens):
    r = Ranker.load(tiny_build)
    reqs = [q for q, _ in movielens.requests(6, n_candidates=2, seed=13)]
    one = r.backend.encode_user(__import__("onetrans_trt.data.requests", fromlist=["x"]).encode_request(
        r.schema, reqs[0])[0]).nbytes()
    cache = UserKVCache(max_bytes=int(one * 2.5))
    r.cache = cache
    for q in reqs:
        r.rank(q)
    s = cache.stats()
    assert s["bytes"] <= s["max_bytes"] and s["evictions"] >= 3 and s["entries"] <= 2


def test_threads_give_serial_scores_and_never_cross_users(tiny_build, movielens):
    base = Ranker.load(tiny_build)
    reqs = [r for r, _ in movielens.requests(20, n_candidates=5, seed=14)]
    serial = [base.rank(r).logits for r in reqs]
    cached = Ranker(base.schema, base.tasks, base.backend, cache=UserKVCache())
    order = np.random.default_rng(0).integers(0, len(reqs), size=(8, 200))
    errors = []

    def worker(row):
        for i in row:
            got = cached.rank(reqs[i]).logits
            if not np.array_equal(got, serial[i]):
                errors.append(int(i))

    threads = [threading.Thread(target=worker, args=(order[t],)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    s = cached.cache.stats()
    assert s["hits"] + s["misses"] == 1600 and s["entries"] == len(reqs)
