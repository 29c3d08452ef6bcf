"""One user's state (:class:`~onetrans_trt.kv.UserKV`) as bytes: what a shared store holds.

Layout (version 1), every integer little-endian::

    magic     8 bytes   b"OTUSTATE"
    version   uint32    FORMAT_VERSION
    hlen      uint32    length of the JSON header in bytes (at most MAX_HEADER_BYTES)
    header    hlen      UTF-8 JSON: format version, build hash, model family, history
                        fingerprint, valid lengths ({"dtype", "shape", "values"} or null),
                        n_layers, extras' names, and each tensor's name, dtype and shape
    tensors   ...       each tensor's raw bytes, C order, little-endian, in header order:
                        user_k_0, user_v_0, ..., user_k_<n-1>, user_v_<n-1>, user_<extra>...
    checksum  32 bytes  blake2b(digest_size=32) over everything before it

:func:`decode_state` reads only numpy dtypes from a fixed list (float16/32/64, int8/16/32/64,
uint8, bool: K/V in fp32 or fp16 alike) with ``numpy.frombuffer``: nothing is ever unpickled,
and nothing is allocated before the header's sizes have been checked against the bytes
present (a header claiming a huge shape is refused, not allocated). It refuses, with a
:class:`StateError` naming what was wrong, a value that is not a state, another format
version, a truncated value, trailing bytes, a bad checksum, and (:class:`StateBuildMismatch`)
a state written by another build. Encoding is deterministic: the same state gives the same
bytes, and decoding gives back the same dtypes, shapes and bits.

numpy only (no torch): torch tensors and ONNX Runtime ``OrtValue`` s are copied to host numpy
arrays on the way in; states come back as numpy arrays.
"""

from __future__ import annotations

import hashlib
import json
import struct
from typing import Any

import numpy as np

from onetrans_trt.errors import InputError
from onetrans_trt.kv import UserKV, kv_names

MAGIC = b"OTUSTATE"
FORMAT_VERSION = 1
_PREFIX = struct.Struct("<8sII")  # magic, version, header length
CHECKSUM_BYTES = 32
MAX_HEADER_BYTES = 1 << 20
MAX_NDIM = 8
DTYPES = ("float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "bool")


class StateError(InputError):
    """A serialized user state is not usable (not a state, truncated, corrupt)."""


class StateBuildMismatch(StateError):
    """A serialized user state was written by another build (its K/V do not fit this one)."""


def history_fingerprint(hist: dict[str, np.ndarray]) -> str:
    """blake2b-128 over the encoded history tensors (names, dtypes, shapes, bytes) in name order."""
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(hist):
        a = np.ascontiguousarray(hist[name])
        h.update(name.encode())
        h.update(str(a.dtype).encode() + str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def to_numpy(t: Any) -> np.ndarray:
    """A host numpy array of a numpy array, a torch tensor or an ONNX Runtime ``OrtValue``."""
    if isinstance(t, np.ndarray):
        return t
    if hasattr(t, "detach"):  # torch
        return t.detach().cpu().numpy()
    if hasattr(t, "numpy"):  # OrtValue (copied to the host when on a device)
        return np.asarray(t.numpy())
    return np.asarray(t)


def named_state(named: dict[str, Any]) -> UserKV:
    """A state held as graph tensors by name (a Triton model's encoder outputs) as a
    :class:`~onetrans_trt.kv.UserKV` that :func:`encode_state` stores losslessly whatever the
    names: no layers, every tensor an extra under its own name; ``kv.extras`` gives the dict
    back (same names, same order)."""
    return UserKV([], [], None, dict(named))


def _le(a: np.ndarray) -> np.ndarray:
    """``a`` C-contiguous in little-endian byte order (a no-op on little-endian hosts)."""
    if a.dtype.name not in DTYPES:
        raise StateError(f"user state: dtype {a.dtype} is not storable; use one of {', '.join(DTYPES)}")
    return np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<"))


def encode_state(kv: UserKV, *, build_hash: str, family: str = "", fingerprint: str = "") -> bytes:
    """``kv`` as bytes (see the module docstring); ``build_hash`` names the build whose user
    encoder made it (:func:`decode_state` refuses it under any other), ``fingerprint`` the
    history it was made from (:func:`history_fingerprint`)."""
    named = [(n, to_numpy(t)) for n, t in zip(kv_names(kv.n_layers), [x for p in zip(kv.keys, kv.values) for x in p])]
    if len(kv.keys) != len(kv.values):
        raise StateError(f"user state: {len(kv.keys)} keys but {len(kv.values)} values")
    named += [(f"user_{k}", to_numpy(v)) for k, v in kv.extras.items()]
    arrays = [(n, _le(a)) for n, a in named]
    lengths = None
    if kv.lengths is not None:
        ln = to_numpy(kv.lengths)
        if ln.dtype.kind not in "iu":
            raise StateError(f"user state: lengths must be integers, got {ln.dtype}")
        lengths = {"dtype": ln.dtype.name, "shape": list(ln.shape), "values": ln.reshape(-1).tolist()}
    header = {"format": FORMAT_VERSION, "build_hash": str(build_hash), "family": str(family),
              "fingerprint": str(fingerprint), "lengths": lengths, "n_layers": kv.n_layers,
              "extras": list(kv.extras),
              "tensors": [{"name": n, "dtype": a.dtype.name, "shape": list(a.shape)} for n, a in arrays]}
    hbytes = json.dumps(header, separators=(",", ":"), sort_keys=True).encode("utf-8")
    if len(hbytes) > MAX_HEADER_BYTES:
        raise StateError(f"user state: header of {len(hbytes)} bytes (over {MAX_HEADER_BYTES}); too many tensors")
    parts = [_PREFIX.pack(MAGIC, FORMAT_VERSION, len(hbytes)), hbytes, *(a.tobytes() for _, a in arrays)]
    h = hashlib.blake2b(digest_size=CHECKSUM_BYTES)
    for p in parts:
        h.update(p)
    parts.append(h.digest())
    return b"".join(parts)


def _shape(spec: Any, what: str) -> tuple[int, ...]:
    if (not isinstance(spec, list) or len(spec) > MAX_NDIM
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in spec)):
        raise StateError(f"user state: {what} has an invalid shape {str(spec)[:80]} (non-negative integers, "
                         f"at most {MAX_NDIM} dims); the entry is corrupt, recompute it")
    return tuple(spec)


def _dtype(name: Any, what: str) -> np.dtype:
    if name not in DTYPES:
        raise StateError(f"user state: {what} has dtype {str(name)[:40]!r}, not one of {', '.join(DTYPES)}; "
                         "the entry is corrupt, recompute it")
    return np.dtype(name)


def read_header(data: bytes | bytearray | memoryview) -> tuple[dict[str, Any], int]:
    """``(header, offset of the first tensor byte)`` after the checks that need no checksum:
    magic, version, the header's length and JSON. Refuses with :class:`StateError`."""
    n = len(data)
    if n < _PREFIX.size + CHECKSUM_BYTES:
        raise StateError(f"user state: truncated ({n} bytes, fewer than the {_PREFIX.size + CHECKSUM_BYTES} "
                         "of an empty state); recompute it")
    magic, version, hlen = _PREFIX.unpack_from(data, 0)
    if magic != MAGIC:
        raise StateError(f"user state: not a serialized user state (magic {bytes(magic)!r}, expected {MAGIC!r})")
    if version != FORMAT_VERSION:
        raise StateError(f"user state: format version {version}, this reader reads version {FORMAT_VERSION}; "
                         "recompute it with this version")
    if hlen > MAX_HEADER_BYTES:
        raise StateError(f"user state: header length {hlen} over {MAX_HEADER_BYTES} bytes; the entry is corrupt")
    if _PREFIX.size + hlen + CHECKSUM_BYTES > n:
        raise StateError(f"user state: truncated (the header claims {hlen} bytes, {n} bytes in all are present); "
                         "recompute it")
    try:
        header = json.loads(bytes(data[_PREFIX.size:_PREFIX.size + hlen]).decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise StateError("user state: the header is not valid JSON; the entry is corrupt, recompute it") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT_VERSION:
        raise StateError("user state: the header is not a version-1 header; the entry is corrupt, recompute it")
    return header, _PREFIX.size + hlen


def decode_state(data: bytes | bytearray | memoryview, *, build_hash: str,
                 fingerprint: str | None = None) -> UserKV:
    """The :class:`~onetrans_trt.kv.UserKV` ``data`` holds (numpy arrays, writable, native
    byte order); refuses (:class:`StateError`) anything but an intact state of build
    ``build_hash`` (and, when given, made from the history with ``fingerprint``)."""
    header, off = read_header(data)
    n = len(data)
    try:
        n_layers, extras, specs = header["n_layers"], header["extras"], header["tensors"]
        if (not isinstance(n_layers, int) or not isinstance(extras, list) or not isinstance(specs, list)
                or not 0 <= 2 * n_layers <= len(specs) or not all(isinstance(e, str) for e in extras)):
            raise ValueError
        want_names = kv_names(n_layers) + [f"user_{e}" for e in extras]
        layout = []
        for spec in specs:
            name = spec["name"]
            what = f"tensor {str(name)[:40]!r}"
            dt, shape = _dtype(spec["dtype"], what), _shape(spec["shape"], what)
            layout.append((name, dt, shape, dt.itemsize * int(np.prod(shape, dtype=object))))
    except (KeyError, TypeError, ValueError, AttributeError):
        raise StateError("user state: the header's n_layers, extras or tensors are missing or invalid; "
                         "the entry is corrupt, recompute it") from None
    if [x[0] for x in layout] != want_names:
        raise StateError("user state: the header's tensors do not match its n_layers and extras; the entry is corrupt")
    need = off + sum(x[3] for x in layout) + CHECKSUM_BYTES  # Python ints: no overflow, nothing allocated
    if need > n:
        raise StateError(f"user state: truncated (the header claims {need} bytes, {n} are present); recompute it")
    if need < n:
        raise StateError(f"user state: {n - need} bytes after the checksum's place; the entry is corrupt")
    view = memoryview(data)
    digest = hashlib.blake2b(view[:n - CHECKSUM_BYTES], digest_size=CHECKSUM_BYTES).digest()
    if digest != bytes(view[n - CHECKSUM_BYTES:]):
        raise StateError("user state: checksum mismatch (the bytes were changed); the entry is corrupt, recompute it")
    if header.get("build_hash") != build_hash:
        raise StateBuildMismatch(f"user state: written by build {str(header.get('build_hash'))[:16]}.., not this "
                                 f"build {build_hash[:16]}..; recompute it with this build")
    if fingerprint is not None and header.get("fingerprint") != fingerprint:
        raise StateError("user state: made from another history (fingerprint mismatch); recompute it")
    arrays = []
    for name, dt, shape, size in layout:
        a = np.frombuffer(view[off:off + size], dtype=dt.newbyteorder("<")).reshape(shape)
        arrays.append(a.astype(dt, copy=True))  # owned, writable, native byte order
        off += size
    lengths = None
    ln = header.get("lengths")
    if ln is not None:
        try:
            dt = _dtype(ln["dtype"], "lengths")
            shape = _shape(ln["shape"], "lengths")
            if dt.kind not in "iu" or int(np.prod(shape, dtype=object)) != len(ln["values"]):
                raise ValueError
            lengths = np.array(ln["values"], dtype=dt).reshape(shape)
        except (KeyError, TypeError, ValueError, OverflowError):
            raise StateError("user state: the header's lengths are invalid; the entry is corrupt") from None
    keys, values = arrays[0:2 * n_layers:2], arrays[1:2 * n_layers:2]
    return UserKV(keys, values, lengths, dict(zip(extras, arrays[2 * n_layers:])))
