"""Per-user K/V cache shared across requests (in this process).

Keyed by the request's user key *and* a fingerprint of the encoded history tensors, so a
user whose history changed never gets stale K/V, and no request can be answered with
another user's K/V (the K/V depend on nothing but those tensors). LRU, bounded in bytes,
thread-safe, with hit/miss/eviction counters: a
:class:`~onetrans_trt.runtime.store.LocalStore` whose ``get_or_compute`` answers the state
alone. For a store shared by processes (Redis) see :mod:`onetrans_trt.runtime.store`.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from onetrans_trt.runtime.state import history_fingerprint
from onetrans_trt.runtime.store import LocalStore

__all__ = ["UserKVCache", "history_fingerprint"]


class UserKVCache(LocalStore):
    """Users' K/V shared across requests (``Ranker(..., cache=UserKVCache(max_bytes))``): keyed
    by the request's ``user_key`` and a fingerprint of its encoded history, LRU bounded in
    bytes, thread-safe; ``stats()`` gives the hit/miss/eviction counters. Unlike
    :meth:`LocalStore.get_or_compute`, :meth:`get_or_compute` answers the state alone."""

    def __init__(self, max_bytes: int = 256 << 20):
        super().__init__(max_bytes, single_flight=False)  # as before stores: each concurrent miss computes

    def stats(self) -> dict[str, int]:
        s = super().stats()
        return {k: s[k] for k in ("hits", "misses", "evictions", "entries", "bytes", "max_bytes")}

    def get_or_compute(self, user_key: str | None, hist: dict[str, np.ndarray],  # type: ignore[override]
                       compute: Callable[[], Any]) -> Any:
        return super().get_or_compute(user_key, hist, compute)[0]
