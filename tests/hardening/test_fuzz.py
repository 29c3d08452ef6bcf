"""Fuzzing the loaders and the Ranker: every mutated input ends in our own error type.

Mutations of valid artifacts (truncation, bit flips, wrong types, huge sizes, path tricks)
are fed to the checkpoint loader, the manifest reader, the ONNX loader (our checks, then
ONNX Runtime) and the Ranker. Accepted outcomes: a result, or a ``OneTransError`` (the CLI
turns it into one line and exit 2). Anything else fails the test, with the input that
caused it. ``FUZZ_SCALE`` multiplies the counts (``make fuzz`` runs 10x); ``FUZZ_SEED`` draws other request
inputs (the default 0: the inputs the suite always runs).

Counts at scale 1: requests 1200 (request values through ``Ranker.rank``) and request files
700 (through ``load_requests`` then ``Ranker.rank``; the files of
:mod:`tests.hardening.fuzz_requests`), checkpoints 400, manifests 400, ONNX files 300 (3000).
Request files through the command line (300 more): :mod:`tests.hardening.test_fuzz_cli`.
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import shutil
from pathlib import Path

import numpy as np
import pytest

from onetrans_trt.errors import OneTransError

SCALE = float(os.environ.get("FUZZ_SCALE", "1"))
SEED = int(os.environ.get("FUZZ_SEED", "0"))  # another seed, other inputs (the request fuzzes)


def n(count: int) -> int:
    return max(1, int(count * SCALE))


WEIRD = [None, True, False, 0, -1, 2 ** 70, -(2 ** 70), 10 ** 400, 1e308, -1e308, math.nan, math.inf, -math.inf,
         "", "x" * 5000, "9" * 5000, "../../etc/passwd", "\u0000", "\ud800", [], [None], [[[]]], {}, {"a": 1},
         [1.5, "a"], 3.5, "1e999", "-0"]


def _deep(n: int):
    v: list = []
    for _ in range(n):
        v = [v]
    return v


def _loop() -> dict:
    d: dict = {}
    d["self"] = d
    return d


# what only a Python caller can pass (the Ranker's request dicts): numpy values are taken as
# what they hold, the rest must be refused with our error
API_WEIRD = WEIRD + [
    np.array([1, 2]), np.array(["Comedy", "Drama"]), np.int64(7), np.float32("nan"), np.array([[1.5]]),
    np.array([{"item_id": "1"}], dtype=object), np.array([b"x"]), object(), b"bytes", {1, 2}, (1, "a"),
    {1: "int key"}, 10 ** 5000, 2 ** 63, _deep(50), _deep(200), _deep(100_000), _loop(), "h" * (1 << 20),
    {"k" * (1 << 16): 1}, np.full(3, np.nan), np.array([np.inf]), np.arange(100_000), np.array([2 ** 63], np.uint64),
    np.array(1.5), np.zeros((2, 0)), np.array([None, "x"], dtype=object),
]


def _show(obj) -> str:
    try:
        return repr(obj)[:300]
    except (ValueError, RecursionError):  # an int of thousands of digits; a list nested 100,000 deep
        return "<a value too large to show>"


def mutate_json(obj, rng: random.Random, depth: int = 0, weird: list = WEIRD):
    """One structural mutation somewhere in a JSON value (leaves drawn from ``weird``)."""
    if isinstance(obj, dict) and obj and rng.random() < 0.8:
        obj = dict(obj)
        k = rng.choice(list(obj))
        r = rng.random()
        if r < 0.2:
            del obj[k]
        elif r < 0.3:
            obj[rng.choice(["extra", "__proto__", "", f"{k}_"])] = rng.choice(weird)
        elif r < 0.6:
            obj[k] = rng.choice(weird)
        else:
            obj[k] = mutate_json(obj[k], rng, depth + 1, weird)
        return obj
    if isinstance(obj, list) and obj and rng.random() < 0.8:
        obj = list(obj)
        i = rng.randrange(len(obj))
        r = rng.random()
        if r < 0.15:
            del obj[i]
        elif r < 0.25:
            obj.extend(obj[:1] * rng.choice([1, 50]))  # shared, not copied: mutations copy what they change
        elif r < 0.5:
            obj[i] = rng.choice(weird)
        else:
            obj[i] = mutate_json(obj[i], rng, depth + 1, weird)
        return obj
    return rng.choice(weird)


def mutate_bytes(data: bytes, rng: random.Random) -> bytes:
    r = rng.random()
    if r < 0.3:
        return data[: rng.randrange(len(data))]
    b = bytearray(data)
    if r < 0.8:
        span = min(len(b), 64) if rng.random() < 0.5 else len(b)  # the header region often
        for _ in range(rng.choice([1, 2, 8])):
            i = rng.randrange(span)
            b[i] ^= 1 << rng.randrange(8)
        return bytes(b)
    if r < 0.9:
        return bytes(b) + bytes(rng.randrange(256) for _ in range(rng.choice([1, 100])))
    return b"\x00" * rng.choice([0, 8, 100])


def accepted(fn, what: str):
    """Run one fuzz case: a result or our error is fine; anything else fails."""
    try:
        fn()
        return "ok"
    except OneTransError as e:
        assert str(e) and "\n" not in str(e).strip(), (what, str(e))
        return "refused"
    except Exception as e:  # noqa: BLE001
        pytest.fail(f"{what}: unhandled {type(e).__name__}: {str(e)[:300]}")


# ---- requests -----------------------------------------------------------------------------
def test_fuzz_requests_through_the_ranker(tiny_ckpt, movielens):
    from onetrans_trt.data.requests import RequestLimits
    from onetrans_trt.runtime.ranker import Ranker

    ranker = Ranker.load(tiny_ckpt, limits=RequestLimits(max_history=500, max_candidates=200))
    base = [r.to_json() for r, _ in movielens.requests(5, n_candidates=3, seed=4)]
    rng = random.Random(1000 * SEED)
    outcomes = {"ok": 0, "refused": 0}
    for i in range(n(1200)):
        obj = copy.deepcopy(base[i % len(base)])
        for _ in range(rng.choice([1, 1, 2, 3])):
            obj = mutate_json(obj, rng, weird=API_WEIRD)
        outcomes[accepted(lambda: ranker.rank(obj), f"request #{i}: {_show(obj)}")] += 1
    assert outcomes["ok"] > 50 and outcomes["refused"] > 50, outcomes  # both paths really exercised


def test_fuzz_request_files_through_the_api(tiny_ckpt, movielens, tmp_path):
    """The request files of the CLI fuzz (and paths with a NUL byte, which only a Python
    caller can pass) through ``load_requests``, sometimes with a fuzzed limits file, each
    request loaded then ranked."""
    from onetrans_trt.data.requests import RequestLimits, load_requests
    from onetrans_trt.runtime.ranker import Ranker
    from tests.hardening import fuzz_requests as fr

    ranker = Ranker.load(tiny_ckpt)
    base = [r.to_json() for r, _ in movielens.requests(5, n_candidates=3, seed=4)]
    places = fr.Places(tmp_path / "in", fr.valid_text(random.Random(1), base))
    rng = random.Random(5 + 1000 * SEED)
    outcomes = {"ok": 0, "refused": 0}
    for i in range(n(700)):
        case = fr.make_case(rng, base, places.root, i, places, api=True)
        with_limits = rng.random() < 0.2
        limits_path, lnote = fr.limits_case(rng, places.root, i) if with_limits else (None, "")

        def run():
            limits = RequestLimits.load(limits_path) if limits_path is not None else None
            for req in load_requests(case.path, limits):
                (ranker if limits is None else Ranker(ranker.schema, ranker.tasks, ranker.backend,
                                                      limits=limits)).rank(req)

        outcomes[accepted(run, f"file #{i} ({case.kind}): {case.note} {lnote}")] += 1
    assert outcomes["ok"] > n(700) // 20 and outcomes["refused"] > n(700) // 2, outcomes


# ---- checkpoints ------------------------------------------------------------------------------
def test_fuzz_checkpoints(tiny_ckpt, tmp_path):
    from onetrans_trt.models.checkpoint import load_checkpoint

    weights = (tiny_ckpt / "model.safetensors").read_bytes()
    config = json.loads((tiny_ckpt / "config.json").read_text())
    header_len = int.from_bytes(weights[:8], "little")
    header = json.loads(weights[8:8 + header_len])
    rng = random.Random(1)
    outcomes = {"ok": 0, "refused": 0}
    for i in range(n(400)):
        case = tmp_path / f"c{i % 4}"
        shutil.rmtree(case, ignore_errors=True)
        case.mkdir()
        w, c = weights, json.dumps(config)
        kind = rng.choice(["weights-bytes", "weights-header", "config-json", "config-bytes"])
        if kind == "weights-bytes":
            w = mutate_bytes(weights, rng)
        elif kind == "weights-header":
            h = json.dumps(mutate_json(header, rng)).encode()
            w = len(h).to_bytes(8, "little") + h + weights[8 + header_len:]
        elif kind == "config-json":
            c = json.dumps(mutate_json(config, rng), default=str)
        else:
            c = mutate_bytes(c.encode(), rng).decode("latin-1")
        (case / "model.safetensors").write_bytes(w)
        (case / "config.json").write_text(c, encoding="latin-1")
        outcomes[accepted(lambda: load_checkpoint(case), f"checkpoint #{i} ({kind})")] += 1
    assert outcomes["refused"] > 100, outcomes


# ---- manifests ------------------------------------------------------------------------------
def test_fuzz_manifests(tiny_build, tmp_path):
    from onetrans_trt.export.api import read_manifest
    from onetrans_trt.runtime.ranker import Ranker

    build = tmp_path / "b"
    shutil.copytree(tiny_build, build)
    good = (build / "manifest.json").read_text()
    manifest = json.loads(good)
    rng = random.Random(2)
    outcomes = {"ok": 0, "refused": 0}
    loaded = 0
    for i in range(n(400)):
        if rng.random() < 0.8:
            text = json.dumps(mutate_json(manifest, rng), default=str)
        else:
            text = mutate_bytes(good.encode(), rng).decode("latin-1")
        (build / "manifest.json").write_text(text, encoding="latin-1")

        def load():
            read_manifest(build)
            nonlocal loaded
            if loaded < n(20):  # the full load (two ORT sessions) for some that pass
                loaded += 1
                Ranker.load(build)

        outcomes[accepted(load, f"manifest #{i}: {text[:200]}")] += 1
    assert outcomes["refused"] > 100, outcomes


# ---- ONNX files -------------------------------------------------------------------------------
def test_fuzz_onnx_files(tiny_build, tmp_path):
    import onnx

    from onetrans_trt.runtime.ort_backend import ort_session

    src = (tiny_build / "candidate_scorer.onnx").read_bytes()
    model = onnx.load_from_string(src)
    rng = random.Random(3)
    outcomes = {"ok": 0, "refused": 0}
    d = tmp_path / "g"
    d.mkdir()
    for i in range(n(300)):
        path = d / "candidate_scorer.onnx"
        kind = rng.choice(["bytes", "bytes", "external", "domain", "opset"])
        if kind == "bytes":
            path.write_bytes(mutate_bytes(src, rng))
        else:
            m = onnx.ModelProto()
            m.CopyFrom(model)
            if kind == "external":
                t = m.graph.initializer[rng.randrange(len(m.graph.initializer))]
                t.ClearField("raw_data")
                t.data_location = onnx.TensorProto.EXTERNAL
                del t.external_data[:]
                loc = rng.choice(["../outside.bin", "/etc/passwd", "sub/../../x.bin", "data.bin", ""])
                t.external_data.add(key="location", value=loc)
            elif kind == "domain":
                m.opset_import.add(domain=rng.choice(["com.evil", "ai.onnx.ml", "onetrans"]), version=rng.choice([1, 99]))
            else:
                m.opset_import[0].version = rng.choice([1, 7, 17, 23, 99])
            path.write_bytes(m.SerializeToString())
        outcomes[accepted(lambda: ort_session(path), f"onnx #{i} ({kind})")] += 1
    assert outcomes["refused"] > 100 and outcomes["ok"] > 0, outcomes


def test_external_data_outside_the_build_is_refused(tiny_build, tmp_path):
    import onnx

    from onetrans_trt.errors import BuildError
    from onetrans_trt.trust import check_onnx

    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"\x00" * 4096)
    build = tmp_path / "b"
    build.mkdir()
    m = onnx.load(str(tiny_build / "candidate_scorer.onnx"))
    t = max(m.graph.initializer, key=lambda x: len(x.raw_data))
    nbytes = len(t.raw_data)
    t.ClearField("raw_data")
    t.data_location = onnx.TensorProto.EXTERNAL
    t.external_data.add(key="location", value="../secret.bin")
    t.external_data.add(key="length", value=str(min(nbytes, 4096)))
    onnx.save(m, str(build / "candidate_scorer.onnx"))
    with pytest.raises(BuildError, match="outside"):
        check_onnx(build / "candidate_scorer.onnx")
    link = build / "user_encoder.onnx"  # a symlink out of the build is refused as well
    link.symlink_to(tiny_build / "user_encoder.onnx")
    with pytest.raises(BuildError, match="symbolic link"):
        check_onnx(link, root=build)
