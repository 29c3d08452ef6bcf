"""The serialized user state: bit-exact round trips (fp32/fp16 K/V, OneTrans and HyFormer
shapes, a real build's state), and refusals (another build, any flipped byte, truncation,
bad magic/version, headers claiming more than is there, absurd shapes: nothing allocated)."""

from __future__ import annotations

import hashlib
import json
import struct
import tracemalloc

import numpy as np
import pytest

from onetrans_trt.kv import UserKV
from onetrans_trt.runtime.state import (CHECKSUM_BYTES, MAGIC, StateBuildMismatch, StateError, decode_state,
                                        encode_state, history_fingerprint, read_header)

BUILD = "b" * 64


def _special(rng: np.random.Generator, shape: tuple[int, ...], dtype) -> np.ndarray:
    """Random values plus the ones a lossy path would change: NaN with a payload, inf, -0.0, tiny."""
    a = rng.standard_normal(shape).astype(dtype)
    flat = a.reshape(-1)
    specials = np.array([np.nan, np.inf, -np.inf, -0.0, np.finfo(dtype).tiny, np.finfo(dtype).max], dtype)
    flat[:len(specials)] = specials
    u = flat.view(np.uint16 if a.dtype == np.float16 else np.uint32)
    u[0] |= 1  # a NaN payload bit
    return a


def onetrans_kv(dtype=np.float32, u=1, heads=2, dh=4, ns=(7, 5, 3), seed=0) -> UserKV:
    rng = np.random.default_rng(seed)
    keys = [_special(rng, (u, heads, n, dh), dtype) for n in ns]
    values = [_special(rng, (u, heads, n, dh), dtype) for n in ns]
    return UserKV(keys, values, np.array([6] * u, np.int64))


def hyformer_kv(dtype=np.float32, layers=2, seqs=3, d=8, seed=1) -> UserKV:
    """Keys/values per (layer, sequence), extras: each sequence's length and pooled tokens."""
    rng = np.random.default_rng(seed)
    lens = [5, 3, 9]
    keys = [_special(rng, (1, 2, lens[j], 4), dtype) for _ in range(layers) for j in range(seqs)]
    values = [_special(rng, (1, 2, lens[j], 4), dtype) for _ in range(layers) for j in range(seqs)]
    extras = {"seq_length": np.array([lens], np.int64),
              "seq_pool": rng.standard_normal((1, seqs, d)).astype(np.float32)}
    return UserKV(keys, values, np.array([17], np.int64), extras)


def assert_bit_equal(a: UserKV, b: UserKV) -> None:
    assert a.n_layers == b.n_layers and list(a.extras) == list(b.extras)
    pairs = list(zip(a.keys + a.values + list(a.extras.values()), b.keys + b.values + list(b.extras.values())))
    for x, y in pairs:
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes()
    if a.lengths is None:
        assert b.lengths is None
    else:
        la, lb = np.asarray(a.lengths), np.asarray(b.lengths)
        assert la.dtype == lb.dtype and la.shape == lb.shape and np.array_equal(la, lb)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("make", [onetrans_kv, hyformer_kv])
def test_round_trip_is_bit_exact(make, dtype):
    kv = make(dtype)
    data = encode_state(kv, build_hash=BUILD, family="x", fingerprint="f" * 32)
    back = decode_state(data, build_hash=BUILD, fingerprint="f" * 32)
    assert_bit_equal(kv, back)
    assert all(np.asarray(t).flags.writeable for t in back.keys + back.values)  # owned arrays, not views of data
    assert encode_state(back, build_hash=BUILD, family="x", fingerprint="f" * 32) == data  # deterministic
    header, _ = read_header(data)
    assert header["build_hash"] == BUILD and header["family"] == "x" and header["fingerprint"] == "f" * 32
    assert header["lengths"]["values"] == np.asarray(kv.lengths).tolist()
    assert [t["dtype"] for t in header["tensors"][:2]] == [np.dtype(dtype).name] * 2
    # the tensor bytes are the raw little-endian bytes, in order, before a blake2b-256 of the rest
    raw = b"".join(np.asarray(t).astype(np.asarray(t).dtype.newbyteorder("<")).tobytes()
                   for p in zip(kv.keys, kv.values) for t in p)
    assert raw in data
    assert data[-CHECKSUM_BYTES:] == hashlib.blake2b(data[:-CHECKSUM_BYTES], digest_size=32).digest()


def test_fp16_state_is_half_the_bytes_of_fp32():
    a = encode_state(onetrans_kv(np.float32), build_hash=BUILD)
    b = encode_state(onetrans_kv(np.float16), build_hash=BUILD)
    payload32 = sum(t.nbytes for t in onetrans_kv(np.float32).keys) * 2
    assert len(a) - len(b) == payload32 // 2


def test_big_endian_and_torch_inputs_come_back_native_and_equal():
    torch = pytest.importorskip("torch")
    kv = onetrans_kv()
    be = UserKV([k.astype(">f4") for k in kv.keys], [torch.from_numpy(v) for v in kv.values], kv.lengths)
    back = decode_state(encode_state(be, build_hash=BUILD), build_hash=BUILD)
    assert_bit_equal(kv, back)
    assert back.keys[0].dtype == np.dtype("float32") and back.keys[0].dtype.isnative


def test_no_lengths_no_extras_no_layers():
    for kv in (UserKV([], [], None), UserKV([np.zeros((1, 1, 0, 2), np.float32)], [np.zeros((1, 1, 0, 2), np.float32)],
                                            np.zeros(1, np.int32))):
        assert_bit_equal(kv, decode_state(encode_state(kv, build_hash=BUILD), build_hash=BUILD))


def test_a_real_builds_state_round_trips_and_scores_the_same(tiny_build, movielens):
    from onetrans_trt.data.requests import encode_request
    from onetrans_trt.runtime.ranker import Ranker

    r = Ranker.load(tiny_build, backend="ort")
    req, _ = movielens.requests(1, n_candidates=9, seed=21)[0]
    hist, ns = encode_request(r.schema, req)
    kv = r.backend.encode_user(hist)
    fp = history_fingerprint(hist)
    back = decode_state(encode_state(kv, build_hash=BUILD, family="onetrans", fingerprint=fp), build_hash=BUILD,
                        fingerprint=fp)
    assert_bit_equal(UserKV([np.asarray(k) for k in kv.keys], [np.asarray(v) for v in kv.values], kv.lengths,
                            kv.extras), back)
    assert np.array_equal(r.backend.score(back, ns), r.backend.score(kv, ns))


def test_another_build_or_history_is_refused():
    data = encode_state(onetrans_kv(), build_hash=BUILD, fingerprint="a" * 32)
    with pytest.raises(StateBuildMismatch, match=r"written by build bbbbbbbbbbbbbbbb\.\., not this build c"):
        decode_state(data, build_hash="c" * 64)
    with pytest.raises(StateError, match="fingerprint mismatch"):
        decode_state(data, build_hash=BUILD, fingerprint="e" * 32)
    decode_state(data, build_hash=BUILD, fingerprint="a" * 32)


def test_every_flipped_byte_is_refused():
    data = encode_state(hyformer_kv(np.float16, layers=1, seqs=1, d=2), build_hash=BUILD)
    assert len(data) < 4000
    for i in range(len(data)):
        bad = bytearray(data)
        bad[i] ^= 0x10
        with pytest.raises(StateError):
            decode_state(bytes(bad), build_hash=BUILD)


def test_truncation_at_every_eighth_is_refused():
    data = encode_state(onetrans_kv(), build_hash=BUILD)
    for k in range(8):
        with pytest.raises(StateError, match="truncated"):
            decode_state(data[:len(data) * k // 8], build_hash=BUILD)
    with pytest.raises(StateError, match="truncated"):
        decode_state(data[:-1], build_hash=BUILD)
    with pytest.raises(StateError, match="1 bytes after"):
        decode_state(data + b"\0", build_hash=BUILD)


def _forge(data: bytes, edit=None, *, magic=MAGIC, version=1, hlen=None) -> bytes:
    """``data`` with its header rewritten by ``edit`` (and a valid checksum), so that what is
    refused is the header, not the checksum."""
    _, _, n = struct.unpack_from("<8sII", data)
    header = json.loads(data[16:16 + n])
    body = data[16 + n:-CHECKSUM_BYTES]
    if edit:
        edit(header)
    hb = json.dumps(header).encode()
    out = struct.pack("<8sII", magic, version, len(hb) if hlen is None else hlen) + hb + body
    return out + hashlib.blake2b(out, digest_size=32).digest()


def test_forged_headers_are_refused():
    data = encode_state(onetrans_kv(), build_hash=BUILD)
    assert decode_state(_forge(data), build_hash=BUILD) is not None  # the forger itself is sound
    with pytest.raises(StateError, match="not a serialized user state"):
        decode_state(_forge(data, magic=b"NOTSTATE"), build_hash=BUILD)
    with pytest.raises(StateError, match="format version 2, this reader reads version 1"):
        decode_state(_forge(data, version=2), build_hash=BUILD)
    with pytest.raises(StateError, match="truncated \\(the header claims 99999 bytes"):
        decode_state(_forge(data, hlen=99999), build_hash=BUILD)
    with pytest.raises(StateError, match="header length"):
        decode_state(_forge(data, hlen=1 << 30), build_hash=BUILD)

    def grow(h):
        h["tensors"][0]["shape"][2] += 1

    with pytest.raises(StateError, match="truncated \\(the header claims"):
        decode_state(_forge(data, grow), build_hash=BUILD)

    def shrink(h):
        h["tensors"][0]["shape"][2] -= 1

    with pytest.raises(StateError, match="bytes after"):
        decode_state(_forge(data, shrink), build_hash=BUILD)
    for bad, what in [({"dtype": "object"}, "not one of"), ({"dtype": "<f4"}, "not one of"),
                      ({"shape": [1, -2, 3, 4]}, "invalid shape"), ({"shape": [1] * 9}, "invalid shape"),
                      ({"shape": [1.5, 2]}, "invalid shape"), ({"shape": "big"}, "invalid shape"),
                      ({"name": "user_v_0"}, "do not match")]:
        with pytest.raises(StateError, match=what):
            decode_state(_forge(data, lambda h, b=bad: h["tensors"][0].update(b)), build_hash=BUILD)
    for edit, what in [(lambda h: h.update(n_layers=10 ** 12), "missing or invalid"),
                       (lambda h: h.update(n_layers="3"), "missing or invalid"),
                       (lambda h: h.pop("tensors"), "missing or invalid"),
                       (lambda h: h.update(extras=[1]), "missing or invalid"),
                       (lambda h: h.update(lengths={"dtype": "float32", "shape": [1], "values": [1]}), "lengths"),
                       (lambda h: h.update(lengths={"dtype": "int64", "shape": [2], "values": [1]}), "lengths"),
                       (lambda h: h.update(format=2), "version-1 header")]:
        with pytest.raises(StateError, match=what):
            decode_state(_forge(data, edit), build_hash=BUILD)
    bad_json = bytearray(_forge(data))
    bad_json[16] = ord("[")
    with pytest.raises(StateError, match="not valid JSON|version-1 header"):
        decode_state(bytes(bad_json), build_hash=BUILD)


def test_absurd_shapes_allocate_nothing():
    data = encode_state(onetrans_kv(), build_hash=BUILD)

    def absurd(h):
        h["tensors"][0]["shape"] = [1 << 40, 1 << 40, 1 << 40, 1 << 40]

    forged = _forge(data, absurd)
    tracemalloc.start()
    try:
        with pytest.raises(StateError, match="truncated"):
            decode_state(forged, build_hash=BUILD)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < (1 << 20)


def test_unstorable_inputs_are_refused_on_encode():
    kv = onetrans_kv()
    with pytest.raises(StateError, match="dtype object is not storable"):
        encode_state(UserKV([np.array([None])], [np.array([None])], None), build_hash=BUILD)
    with pytest.raises(StateError, match="lengths must be integers"):
        encode_state(UserKV(kv.keys, kv.values, np.array([1.5])), build_hash=BUILD)
    with pytest.raises(StateError, match="2 keys but 3 values"):
        encode_state(UserKV(kv.keys[:2], kv.values, kv.lengths), build_hash=BUILD)


def test_the_reader_never_unpickles():
    import onetrans_trt.runtime.state as state
    import inspect

    src = inspect.getsource(state)
    assert "pickle" not in src.replace("never unpickled", "").replace("nothing is ever unpickled", "")
    assert "allow_pickle" not in src and "np.load" not in src
