"""Per-user K/V cache shared across requests.

Keyed by the request's user key *and* a fingerprint of the encoded history tensors, so a
user whose history changed never gets stale K/V, and no request can be answered with
another user's K/V (the K/V depend on nothing but those tensors). LRU, bounded in bytes,
thread-safe, with hit/miss/eviction counters.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from typing import Callable

import numpy as np

from onetrans_trt.kv import UserKV


def history_fingerprint(hist: dict[str, np.ndarray]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(hist):
        a = np.ascontiguousarray(hist[name])
        h.update(name.encode())
        h.update(str(a.dtype).encode() + str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


class UserKVCache:
    """Users' K/V shared across requests (``Ranker(..., cache=UserKVCache(max_bytes))``): keyed
    by the request's ``user_key`` and a fingerprint of its encoded history, LRU bounded in
    bytes, thread-safe; ``stats()`` gives the hit/miss/eviction counters."""

    def __init__(self, max_bytes: int = 256 << 20):
        if max_bytes < 0:
            raise ValueError("max_bytes must be >= 0")
        self.max_bytes = max_bytes
        self._items: OrderedDict[tuple[str, str], tuple[UserKV, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = self.misses = self.evictions = 0

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._items)

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"hits": self.hits, "misses": self.misses, "evictions": self.evictions,
                    "entries": len(self._items), "bytes": self._bytes, "max_bytes": self.max_bytes}

    def get_or_compute(self, user_key: str | None, hist: dict[str, np.ndarray],
                       compute: Callable[[], UserKV]) -> UserKV:
        key = (user_key or "", history_fingerprint(hist))
        with self._lock:
            hit = self._items.get(key)
            if hit is not None:
                self._items.move_to_end(key)
                self.hits += 1
                return hit[0]
            self.misses += 1
        kv = compute()  # outside the lock: encoders run concurrently
        size = kv.nbytes()
        with self._lock:
            if key not in self._items and size <= self.max_bytes:
                self._items[key] = (kv, size)
                self._bytes += size
                while self._bytes > self.max_bytes:
                    _, (_, s) = self._items.popitem(last=False)
                    self._bytes -= s
                    self.evictions += 1
        return kv
