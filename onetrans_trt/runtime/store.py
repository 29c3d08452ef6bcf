"""Where users' states (:class:`~onetrans_trt.kv.UserKV`) live between requests.

Two implementations of :class:`UserStateStore`:

- :class:`LocalStore`: in this process (an LRU bounded in bytes, optional TTL); what
  :class:`~onetrans_trt.runtime.cache.UserKVCache` is.
- :class:`RedisStore`: a Redis server shared by processes and hosts; states travel in the
  format of :mod:`onetrans_trt.runtime.state` (checksummed, never unpickled).

``store_from_url`` makes either from a URL: ``memory://?max_mb=256&ttl_s=600`` or
``redis://host:6379/0?ttl_s=3600&max_mb=64&timeout_s=0.25``.

Both are keyed by the request's ``user_key`` and the fingerprint of its encoded history
(:func:`~onetrans_trt.runtime.state.history_fingerprint`): a user whose history changed
never gets stale K/V, and no request is answered with another history's K/V. A store
belongs to one build (``build_hash``): a Redis key holds it, so a model update never reads
the old build's entries (they expire by TTL).

``get_or_compute`` is single-flight: concurrent misses for one key run ``compute`` once
(the others wait for its result; across processes through a Redis lock key). It answers
``(kv, hit)``: ``hit`` is True when this call ran no ``compute``.

Failures never fail a request nor change a score: a store that is down, slow (over
``timeout_s``) or answers an error makes the request encode locally (counted in
``store_errors``, logged once per outage; the store is skipped for ``retry_s`` after an
error, counted in ``bypassed``); an entry that does not decode (corrupt, truncated, another
build's) is dropped and recomputed (``corrupt``).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections import OrderedDict
from typing import Any, Callable, Protocol, runtime_checkable
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import numpy as np

from onetrans_trt.errors import InputError, MissingCapabilityError
from onetrans_trt.kv import UserKV
from onetrans_trt.log import get_logger
from onetrans_trt.runtime.state import StateError, decode_state, encode_state, history_fingerprint

log = get_logger(__name__)

REDIS_MISSING = "the Redis client is not installed: pip install 'onetrans-trt[store]' (or pip install 'redis>=5')"


class StoreError(InputError, ValueError):
    """A store cannot be made as asked (a bad URL or parameter, another build's store); a
    ValueError too (what ``UserKVCache`` raised for a bad bound before stores existed)."""


@runtime_checkable
class UserStateStore(Protocol):
    """What the Ranker (and the Triton models) need of a store of users' states."""

    build_hash: str | None

    def get(self, user_key: str | None, fingerprint: str) -> UserKV | None:
        """The state of (``user_key``, history ``fingerprint``), or None (absent, unusable, store down)."""

    def put(self, user_key: str | None, fingerprint: str, kv: UserKV) -> bool:
        """Keep ``kv``; False when it was not kept (over the byte budget, store down)."""

    def get_or_compute(self, user_key: str | None, hist: dict[str, np.ndarray],
                       compute: Callable[[], UserKV]) -> tuple[UserKV, bool]:
        """``(kv, hit)``: the stored state, else ``compute()`` (once for concurrent misses of
        one key) stored; ``hit``: this call ran no ``compute``."""

    def bind(self, build_hash: str) -> None:
        """Check that the store is ``build_hash``'s (a store without one takes it)."""

    def stats(self) -> dict[str, int]:
        ...

    def close(self) -> None:
        ...


class _Flight:
    """One in-progress ``compute`` that other threads of this process wait for."""

    __slots__ = ("done", "value", "ok")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.value: Any = None
        self.ok = False


class _Counters:
    def __init__(self, *names: str):
        self._c = dict.fromkeys(names, 0)
        self._lock = threading.Lock()

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._c[name] += n

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._c)


def _bind(store: Any, build_hash: str) -> None:
    if store.build_hash is None:
        store.build_hash = build_hash
    elif store.build_hash != build_hash:
        raise StoreError(f"this store holds build {store.build_hash[:16]}..'s states, not build {build_hash[:16]}..'s; "
                         "make one store per build (Ranker.load(..., store=URL) does)")


class LocalStore:
    """Users' states in this process: LRU bounded in bytes (``max_bytes``; a state over it is
    not kept), entries older than ``ttl_s`` (None: no expiry) dropped, thread-safe,
    single-flight. States are kept as given (no copy, no serialization: device ``OrtValue`` s
    stay on the device). ``stats()``: hits, misses (= computes), waits (misses that waited
    for another thread's compute: counted as hits), evictions, expired, too_big, entries,
    bytes, max_bytes. ``compute`` may return anything with ``nbytes()``. ``single_flight=False``:
    concurrent misses of one key each compute (the first state stored stays)."""

    def __init__(self, max_bytes: int = 256 << 20, *, ttl_s: float | None = None, build_hash: str | None = None,
                 family: str = "", single_flight: bool = True):
        if max_bytes < 0:
            raise StoreError("max_bytes must be >= 0")
        if ttl_s is not None and not ttl_s > 0:
            raise StoreError("ttl_s must be > 0 (or None: no expiry)")
        self.max_bytes, self.ttl_s, self.build_hash, self.family = int(max_bytes), ttl_s, build_hash, family
        self.single_flight = single_flight
        self._items: OrderedDict[tuple[str, str], tuple[Any, int, float]] = OrderedDict()
        self._flights: dict[tuple[str, str], _Flight] = {}
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = self.misses = self.evictions = self.waits = self.expired = self.too_big = 0

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._items)

    def bind(self, build_hash: str) -> None:
        _bind(self, build_hash)

    def close(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"hits": self.hits, "misses": self.misses, "computes": self.misses, "waits": self.waits,
                    "evictions": self.evictions, "expired": self.expired, "too_big": self.too_big,
                    "entries": len(self._items), "bytes": self._bytes, "max_bytes": self.max_bytes}

    def _lookup(self, key: tuple[str, str]) -> Any:  # under the lock
        item = self._items.get(key)
        if item is None:
            return None
        if self.ttl_s is not None and time.monotonic() - item[2] > self.ttl_s:
            del self._items[key]
            self._bytes -= item[1]
            self.expired += 1
            return None
        self._items.move_to_end(key)
        return item[0]

    def _store(self, key: tuple[str, str], kv: Any, replace: bool = False) -> bool:  # under the lock
        size = int(kv.nbytes())
        if size > self.max_bytes:
            self.too_big += 1
            return False
        if key in self._items:
            if not replace:  # a concurrent compute of the same key stored it first: keep that one
                return True
            self._bytes -= self._items.pop(key)[1]
        self._items[key] = (kv, size, time.monotonic())
        self._bytes += size
        while self._bytes > self.max_bytes:
            _, (_, s, _) = self._items.popitem(last=False)
            self._bytes -= s
            self.evictions += 1
        return True

    def get(self, user_key: str | None, fingerprint: str) -> Any:
        with self._lock:
            return self._lookup((user_key or "", fingerprint))

    def put(self, user_key: str | None, fingerprint: str, kv: Any) -> bool:
        """Keep ``kv`` under the key, replacing what was there (Redis ``SET`` does the same)."""
        with self._lock:
            return self._store((user_key or "", fingerprint), kv, replace=True)

    def get_or_compute(self, user_key: str | None, hist: dict[str, np.ndarray],
                       compute: Callable[[], Any]) -> tuple[Any, bool]:
        key = (user_key or "", history_fingerprint(hist))
        while True:
            with self._lock:
                got = self._lookup(key)
                if got is not None:
                    self.hits += 1
                    return got, True
                flight = self._flights.get(key) if self.single_flight else None
                if flight is None:  # this call computes
                    flight = _Flight()
                    if self.single_flight:
                        self._flights[key] = flight
                    self.misses += 1
                    break
                self.waits += 1
            flight.done.wait()
            if flight.ok:
                with self._lock:
                    self.hits += 1
                return flight.value, True
            # the computing call raised: look again, and compute here if nobody else does
        try:
            kv = compute()  # outside the lock: encoders of different users run concurrently
        except BaseException:
            self._land(key, flight, None, False)
            raise
        self._land(key, flight, kv, True)
        return kv, False

    def _land(self, key: tuple[str, str], flight: _Flight, kv: Any, ok: bool) -> None:
        with self._lock:
            if ok:
                self._store(key, kv)
            if self._flights.get(key) is flight:
                del self._flights[key]
        flight.value, flight.ok = kv, ok
        flight.done.set()


def _redis_module():
    try:
        import redis
    except ModuleNotFoundError as e:
        if (e.name or "").partition(".")[0] != "redis":
            raise
        raise MissingCapabilityError(REDIS_MISSING) from None
    return redis


def _safe_url(url: str) -> str:
    """``url`` without credentials or query: for log lines and messages."""
    u = urlsplit(url)
    host = u.hostname or ""
    try:
        port = u.port
    except ValueError:
        port = None
    return urlunsplit((u.scheme, f"{host}:{port}" if port else host, u.path, "", ""))


class RedisStore:
    """Users' states in a Redis server, shared by processes (and hosts) serving one build.

    Key ``onetrans:<build_hash>:<user_key>:<fingerprint>``; value: the
    :mod:`~onetrans_trt.runtime.state` format, checked on read (checksum, build hash,
    fingerprint); written with ``SET ... PX`` (``ttl_s``; the TTL counts from the write, a hit
    does not extend it).

    Byte budget: ``max_bytes`` caps one entry (a state over it is served but not stored,
    counted in ``too_big``). The total is Redis's to bound: run the server with
    ``maxmemory <bytes>`` and ``maxmemory-policy volatile-lru`` (or ``allkeys-lru``); every
    entry has a TTL, so old builds' and idle users' entries leave by themselves.

    Single-flight: within a process, concurrent misses for one key wait for one thread's
    ``compute``; across processes the computing one holds ``<key>:lock`` (``SET NX PX``,
    released by compare-and-delete) and the others poll for the value for at most
    ``lock_wait_s``, then encode locally (also when the lock is released without a value).

    Failures: every Redis error or timeout (``timeout_s`` on connect and on each command; no
    retries) makes the request encode locally (``store_errors``); the first error of an
    outage is logged once (a warning), recovery once (info); for ``retry_s`` after an error
    requests skip Redis (``bypassed``). An entry that does not decode is deleted and
    recomputed (``corrupt``). ``encode_state`` never pickles; ``decode_state`` never unpickles.
    """

    def __init__(self, url: str, *, build_hash: str, ttl_s: float = 3600.0, max_bytes: int = 64 << 20,
                 timeout_s: float = 0.25, lock_wait_s: float = 2.0, retry_s: float = 1.0, family: str = "",
                 client: Any = None):
        if not build_hash:
            raise StoreError("a Redis store needs the build hash its entries belong to "
                             "(Ranker.load(..., store=URL) passes the build's)")
        for name, v in (("ttl_s", ttl_s), ("timeout_s", timeout_s)):
            if not v > 0:
                raise StoreError(f"{name} must be > 0, got {v}")
        for name, v in (("max_bytes", max_bytes), ("lock_wait_s", lock_wait_s), ("retry_s", retry_s)):
            if v < 0:
                raise StoreError(f"{name} must be >= 0, got {v}")
        self.url, self.build_hash, self.family = _safe_url(url), build_hash, family
        self.ttl_ms, self.max_bytes, self.timeout_s = max(1, int(ttl_s * 1000)), int(max_bytes), float(timeout_s)
        self.lock_wait_s, self.retry_s = float(lock_wait_s), float(retry_s)
        self.lock_ms = max(1000, int((lock_wait_s + 30 * timeout_s) * 1000))  # a dead holder's lock expires
        if client is None:
            redis = _redis_module()
            from redis.backoff import NoBackoff
            from redis.retry import Retry

            try:
                pool = redis.ConnectionPool.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                                     retry=Retry(NoBackoff(), 0), health_check_interval=0)
            except ValueError as e:
                raise StoreError(f"store {self.url}: {str(e).splitlines()[0][:200]}") from None
            client = redis.Redis(connection_pool=pool)
        self.client = client
        self._release = client.register_script(
            "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0")
        self._flights: dict[str, _Flight] = {}
        self._lock = threading.Lock()
        self._down_until = 0.0
        self._down = False
        self._errors_this_outage = 0
        self.counters = _Counters("hits", "misses", "waits", "remote_waits", "store_errors", "bypassed", "corrupt",
                                  "too_big", "writes")

    # -- bookkeeping ---------------------------------------------------------------------------
    def key(self, user_key: str | None, fingerprint: str) -> str:
        return f"onetrans:{self.build_hash}:{user_key or ''}:{fingerprint}"

    def bind(self, build_hash: str) -> None:
        _bind(self, build_hash)

    def stats(self) -> dict[str, int]:
        s = self.counters.snapshot()
        s["computes"] = s["misses"]
        s["max_bytes"] = self.max_bytes
        return s

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.client.close()

    def _usable(self) -> bool:
        if self._down and time.monotonic() < self._down_until:
            self.counters.add("bypassed")
            return False
        return True

    def _failed(self, e: BaseException) -> None:
        self.counters.add("store_errors")
        with self._lock:
            self._down_until = time.monotonic() + self.retry_s
            self._errors_this_outage += 1
            first, self._down = not self._down, True
        if first:
            why = (str(e).splitlines() or [""])[0][:120]
            log.warning(f"user state store {self.url} failed ({type(e).__name__}: {why}); encoding users "
                        f"locally until it answers again (retried every {self.retry_s:g} s)")

    def _answered(self) -> None:
        if self._down:
            with self._lock:
                was, n = self._down, self._errors_this_outage
                self._down, self._errors_this_outage = False, 0
            if was:
                log.info(f"user state store {self.url} answers again (after {n} failed calls)")

    def _call(self, fn: Callable[[], Any]) -> tuple[bool, Any]:
        """``(ok, result)`` of one Redis round trip; an error is counted and logged, never raised."""
        redis = _redis_module()
        try:
            out = fn()
        except (redis.RedisError, OSError) as e:
            self._failed(e)
            return False, None
        self._answered()
        return True, out

    def _decode(self, key: str, data: bytes, fingerprint: str) -> UserKV | None:
        try:
            return decode_state(data, build_hash=self.build_hash, fingerprint=fingerprint)
        except StateError as e:
            self.counters.add("corrupt")
            log.warning(f"user state store {self.url}: dropped entry {key[:96]} ({e})")
            self._call(lambda: self.client.delete(key))
            return None

    # -- the store interface -------------------------------------------------------------------
    def get(self, user_key: str | None, fingerprint: str) -> UserKV | None:
        if not self._usable():
            return None
        key = self.key(user_key, fingerprint)
        ok, data = self._call(lambda: self.client.get(key))
        return self._decode(key, data, fingerprint) if ok and data is not None else None

    def put(self, user_key: str | None, fingerprint: str, kv: UserKV) -> bool:
        data = encode_state(kv, build_hash=self.build_hash, family=self.family, fingerprint=fingerprint)
        if len(data) > self.max_bytes:
            self.counters.add("too_big")
            return False
        if not self._usable():
            return False
        key = self.key(user_key, fingerprint)
        ok, _ = self._call(lambda: self.client.set(key, data, px=self.ttl_ms))
        if ok:
            self.counters.add("writes")
        return ok

    def get_or_compute(self, user_key: str | None, hist: dict[str, np.ndarray],
                       compute: Callable[[], UserKV]) -> tuple[UserKV, bool]:
        fp = history_fingerprint(hist)
        key = self.key(user_key, fp)
        with self._lock:
            flight = self._flights.get(key)
            leader = flight is None
            if leader:
                flight = self._flights[key] = _Flight()
        if not leader:
            self.counters.add("waits")
            flight.done.wait()
            if flight.ok:
                self.counters.add("hits")
                return flight.value, True
            return self._fetch(key, fp, compute)  # the leader's compute raised: try on our own
        try:
            kv, hit = self._fetch(key, fp, compute)
        except BaseException:
            self._land(key, flight, None, False)
            raise
        self._land(key, flight, kv, True)
        return kv, hit

    def _land(self, key: str, flight: _Flight, kv: Any, ok: bool) -> None:
        with self._lock:
            self._flights.pop(key, None)
        flight.value, flight.ok = kv, ok
        flight.done.set()

    def _computed(self, compute: Callable[[], UserKV]) -> tuple[UserKV, bool]:
        self.counters.add("misses")
        return compute(), False

    def _fetch(self, key: str, fp: str, compute: Callable[[], UserKV]) -> tuple[UserKV, bool]:
        """This process's one look-up of ``key``: Redis, else the cross-process lock, else local."""
        if not self._usable():
            return self._computed(compute)
        ok, data = self._call(lambda: self.client.get(key))
        if not ok:
            return self._computed(compute)
        if data is not None:
            kv = self._decode(key, data, fp)
            if kv is not None:
                self.counters.add("hits")
                return kv, True
        lock, token = f"{key}:lock", os.urandom(16).hex()
        ok, got = self._call(lambda: self.client.set(lock, token, nx=True, px=self.lock_ms))
        if not ok:
            return self._computed(compute)
        if not got:  # another process computes it: wait for its value, boundedly
            self.counters.add("remote_waits")
            kv = self._wait_remote(key, lock, fp)
            if kv is not None:
                self.counters.add("hits")
                return kv, True
            return self._computed(compute)
        try:
            kv, hit = self._computed(compute)
            self._put_key(key, fp, kv)
        finally:
            if not self._down:
                self._call(lambda: self._release(keys=[lock], args=[token]))
        return kv, hit

    def _put_key(self, key: str, fp: str, kv: UserKV) -> None:
        data = encode_state(kv, build_hash=self.build_hash, family=self.family, fingerprint=fp)
        if len(data) > self.max_bytes:
            self.counters.add("too_big")
            return
        if self._usable():
            ok, _ = self._call(lambda: self.client.set(key, data, px=self.ttl_ms))
            if ok:
                self.counters.add("writes")

    def _wait_remote(self, key: str, lock: str, fp: str) -> UserKV | None:
        deadline = time.monotonic() + self.lock_wait_s
        pause = 0.002
        while time.monotonic() < deadline:
            time.sleep(pause)
            pause = min(pause * 2, 0.025)

            def poll():
                pipe = self.client.pipeline(transaction=False)
                pipe.get(key)
                pipe.exists(lock)
                return pipe.execute()

            ok, out = self._call(poll)
            if not ok:
                return None
            data, locked = out
            if data is not None:
                return self._decode(key, data, fp)
            if not locked:  # released (or expired) without a value: the holder failed or did not store it
                return None
        return None


def _num(q: dict[str, str], name: str, kind: type, default: Any) -> Any:
    if name not in q:
        return default
    raw = q.pop(name)
    try:
        v = kind(raw)
    except ValueError:
        raise StoreError(f"store URL: {name}={raw[:40]!r} is not a number") from None
    if v != v or v in (float("inf"), float("-inf")):
        raise StoreError(f"store URL: {name}={raw[:40]!r} is not a finite number")
    if v < 0:
        raise StoreError(f"store URL: {name} must be >= 0")
    return v


def parse_store_url(url: str) -> tuple[str, str, dict[str, Any]]:
    """``(kind, url without our parameters, keyword arguments)`` of a store URL (see
    :func:`store_from_url`), checked without connecting: ``kind`` is "memory" or "redis"."""
    u = urlsplit(url)
    pairs = parse_qsl(u.query, keep_blank_values=True)
    q = dict(pairs)
    if len(q) != len(pairs):
        raise StoreError(f"store URL {_safe_url(url)}: a query parameter is given twice")
    if u.scheme == "memory":
        kw = {"max_bytes": int(_num(q, "max_mb", float, 256.0) * (1 << 20)), "ttl_s": _num(q, "ttl_s", float, 0.0)}
        if q:
            raise StoreError(f"store URL {_safe_url(url)}: unknown parameter(s) {sorted(q)}; "
                             "memory:// takes max_mb, ttl_s")
        kw["ttl_s"] = kw["ttl_s"] or None
        return "memory", "memory://", kw
    if u.scheme in ("redis", "rediss", "unix"):
        kw = {"ttl_s": _num(q, "ttl_s", float, 3600.0), "max_bytes": int(_num(q, "max_mb", float, 64.0) * (1 << 20)),
              "timeout_s": _num(q, "timeout_s", float, 0.25), "lock_wait_s": _num(q, "lock_wait_s", float, 2.0),
              "retry_s": _num(q, "retry_s", float, 1.0)}
        for name in ("ttl_s", "timeout_s"):
            if not kw[name] > 0:
                raise StoreError(f"store URL: {name} must be > 0")
        db = q.pop("db", None) if u.scheme == "unix" else None
        if q:
            raise StoreError(f"store URL {_safe_url(url)}: unknown parameter(s) {sorted(q)}; redis:// takes "
                             "ttl_s, max_mb, timeout_s, lock_wait_s, retry_s")
        if u.scheme != "unix" and not u.hostname:
            raise StoreError(f"store URL {_safe_url(url)}: no host; use redis://host:port/db")
        try:
            u.port  # noqa: B018 - raises on a port that is not a number
        except ValueError:
            raise StoreError(f"store URL {_safe_url(url)}: the port is not a number") from None
        if u.scheme != "unix" and u.path.strip("/") and not u.path.strip("/").isdigit():
            raise StoreError(f"store URL {_safe_url(url)}: the path must be the database number (redis://host:port/0)")
        plain = f"{u.scheme}://{u.netloc}{u.path}" + (f"?{urlencode({'db': db})}" if db is not None else "")
        return "redis", plain, kw
    raise StoreError(f"store URL {_safe_url(url)!r}: use memory://?max_mb=N or redis://host:port/db")


def store_from_url(url: str, *, build_hash: str | None = None, family: str = "") -> LocalStore | RedisStore:
    """A store from a URL:

    - ``memory://?max_mb=256&ttl_s=600``: a :class:`LocalStore` (defaults: 256 MiB, no TTL);
    - ``redis://[:password@]host:port/db?ttl_s=3600&max_mb=64&timeout_s=0.25&lock_wait_s=2&retry_s=1``
      (also ``rediss://``, ``unix:///path.sock?db=0``): a :class:`RedisStore` (defaults shown;
      ``max_mb`` caps one entry). Needs ``build_hash``; connects on first use (a server that is
      down makes requests encode locally, see :class:`RedisStore`).

    Other query parameters are refused (a typo would otherwise be ignored)."""
    kind, plain, kw = parse_store_url(url)
    if kind == "memory":
        return LocalStore(kw["max_bytes"], ttl_s=kw["ttl_s"], build_hash=build_hash, family=family)
    if build_hash is None:
        raise StoreError("a Redis store needs the build hash its entries belong to "
                         "(Ranker.load(..., store=URL) passes the build's)")
    return RedisStore(plain, build_hash=build_hash, family=family, **kw)
