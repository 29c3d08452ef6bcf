"""Hostile request files for the fuzz tests (the CLI's ``--request``/``--requests``/``--inputs``
and the Python API's ``load_requests``).

:func:`make_case` writes one file (or picks one hostile path) from valid requests, in one of
these classes (``KINDS``, with their shares):

- ``json``: one to three structural mutations of a valid request, a list of them or JSON
  lines (keys deleted, added or renamed; values replaced by wrong types, ``null``, huge or
  giant numbers, NaN/inf, empty or nested containers; candidates duplicated 50 times);
- ``numbers``: a number token of the file replaced by ``NaN``, ``Infinity``, ``1e999``,
  integers of 20 to 100,000 digits (over Python's 4,300-digit int/str limit), the 64-bit
  edges, or tokens JSON does not allow (``0x10``, ``01``, ``.5``);
- ``deep``: JSON nested 20 to 1,000,000 levels (arrays or objects, whole file or one field,
  closed or truncated): enough to exhaust the parser's recursion;
- ``types``: a file whose top level, or one top-level key, has the wrong type;
- ``huge``: a string of 64 KiB to 4 MiB (a value, a key, the user key), or 10,001 candidates
  or history events (one over the default limits);
- ``bytes``: truncation, bit flips, appended or zeroed bytes of a valid file; a BOM, UTF-16,
  Latin-1, NUL bytes, CRLF or blank JSON lines;
- ``path``: path tricks instead of a file: missing, a directory, a symbolic link loop, a
  dangling link, a link to a device, ``/dev/zero``, ``/dev/null``, ``/proc`` files, a FIFO, a
  path through a file, names over 255 bytes, ``..`` detours, ``-`` and ``~``.

Deterministic for a given ``random.Random``; the Python-API-only extras (a NUL byte in the
path) are flagged so the CLI does not get them (no argv can hold a NUL byte).
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path

from tests.hardening.test_fuzz import WEIRD, mutate_bytes, mutate_json

KINDS = {"json": 30, "numbers": 10, "deep": 8, "types": 7, "huge": 5, "bytes": 28, "path": 12}

BIG = 1 << 16
FILE_WEIRD = WEIRD + ["y" * BIG, -0.0, 1e-320, 2 ** 63, -(2 ** 63) - 1, 2 ** 63 - 1, [{}] * 3, {"": None},
                      {"candidates": []}, "NaN", "Infinity", "\ufeff", "\n", "1" * 4400]

NUMBER_TOKENS = ["NaN", "Infinity", "-Infinity", "1e999", "-1e999", "1e-999", "-0", "0.0", "-0.0",
                 "9223372036854775807", "9223372036854775808", "-9223372036854775808", "-9223372036854775809",
                 "9" * 20, "9" * 4299, "9" * 4300, "9" * 4301, "9" * 20_000, "-" + "9" * 5000, "1" + "0" * 400 + ".5",
                 "9" * 5000 + ".0", "0." + "0" * 5000 + "1", "1e" + "9" * 5000, "0x10", "01", ".5", "1.", "+1", "--1",
                 "1e", "true", "null", "[]", "{}"]

TYPE_TEXTS = ["1", "null", "true", '"x"', "[]", "[[]]", "{}", "[{}]", "[null]", "[1, 2]", '{"candidates": {}}',
              '{"candidates": "abc"}', '{"candidates": null}', '{"candidates": [null]}', '{"candidates": [[]]}',
              '{"candidates": [1]}', '{"user": [], "candidates": []}', '{"user": "u", "candidates": []}',
              '{"context": 1, "candidates": []}', '{"history": {}, "candidates": []}',
              '{"history": [1], "candidates": []}', '{"history": [[]], "candidates": []}',
              '{"user_key": [], "candidates": []}', '{"user_key": {}, "candidates": []}',
              '{"user_key": true, "candidates": []}', '{"candidates": []}', '{"candidates": [{}]}',
              '{"candidates": [{"genres": {}}]}', '{"candidates": [{"genres": [[]]}]}',
              '{"candidates": [{"item_id": {"a": 1}}]}', '{"candidates": [{"item_id": [1]}]}',
              '{"candidates": []}\n{"candidates": []}', '[{"candidates": []}, 1]', "{\"candidates\": []}\n1",
              '{"candidates": [], "candidates": [1]}', '{"": 1, "candidates": []}']


@dataclass
class Case:
    kind: str
    path: str  # what the command is given (a file written here, or a hostile path)
    note: str  # what the case is, for a failure message
    api_only: bool = False  # a NUL byte: no command line can carry it


def _deep_text(rng: random.Random, depth: int) -> str:
    if rng.random() < 0.5:
        inner = "[" * depth + "1" + "]" * depth
    else:
        inner = '{"a": ' * depth + "1" + "}" * depth
    r = rng.random()
    if r < 0.4:
        return inner
    if r < 0.8:
        return '{"user": {"user_id": ' + inner + '}, "candidates": [' + inner + "]}"
    return inner[: rng.randrange(1, len(inner))]  # truncated: never closed


def _form(rng: random.Random, base: list[dict]) -> tuple[str, list | dict]:
    """A valid request file's value: one object, a list of them, or JSON lines."""
    k = rng.choice([1, 1, 2, 3])
    reqs = [copy.deepcopy(base[(rng.randrange(len(base)) + j) % len(base)]) for j in range(k)]
    form = rng.choice(["object", "list", "lines"]) if k > 1 else rng.choice(["object", "object", "list"])
    return form, reqs[0] if form == "object" else reqs


def dump(form: str, value, *, ensure_ascii: bool = True) -> str:
    if form == "lines":
        return "\n".join(json.dumps(v, ensure_ascii=ensure_ascii, default=str) for v in value) + "\n"
    return json.dumps(value, ensure_ascii=ensure_ascii, default=str)


def valid_text(rng: random.Random, base: list[dict]) -> str:
    form, value = _form(rng, base)
    return dump(form, value)


def _with_token(rng: random.Random, base: list[dict]) -> str:
    """A valid request with one number (or string) replaced by a raw token."""
    req = copy.deepcopy(rng.choice(base))
    spots = [("user", "user_id"), ("user_key", None)]
    if req["history"]:
        spots += [("history", "timestamp"), ("history", "item_id")]
    if req["candidates"]:
        spots += [("candidates", "item_id"), ("candidates", "genres"), ("candidates", "release_year")]
    where, key = rng.choice(spots)
    mark = "__TOKEN__"
    if where == "user":
        req["user"][key] = mark
    elif where == "user_key":
        req["user_key"] = mark
    else:
        item = rng.choice(req[where])
        if key == "genres":
            item[key] = [mark]
        else:
            item[key] = mark
    return json.dumps(req).replace(f'"{mark}"', rng.choice(NUMBER_TOKENS))


def _huge(rng: random.Random, base: list[dict]) -> str:
    req = copy.deepcopy(rng.choice(base))
    size = rng.choice([BIG, 1 << 20, 4 << 20])
    s = rng.choice(["x", "9", "\u00e9", "\\", '"']) * size
    r = rng.random()
    if r < 0.2 and req["candidates"]:
        req["candidates"][0]["item_id"] = s
    elif r < 0.35:
        req["user_key"] = s
    elif r < 0.5:
        req["user"][s[:BIG]] = 1
    elif r < 0.6 and req["history"]:
        req["history"][0]["sequence"] = s
    elif r < 0.7:
        req["context"] = {"note": s}
    elif r < 0.85 and req["candidates"]:
        req["candidates"] = req["candidates"][:1] * 10_001  # over max_candidates (10,000)
    elif req["history"]:
        req["history"] = req["history"][:1] * 10_001  # over max_history (10,000)
    else:
        req["user_key"] = s
    return json.dumps(req)


def _bytes(rng: random.Random, base: list[dict]) -> bytes:
    text = valid_text(rng, base)
    r = rng.random()
    if r < 0.7:
        return mutate_bytes(text.encode(), rng)
    if r < 0.75:
        return b"\xef\xbb\xbf" + text.encode()  # a UTF-8 byte order mark
    if r < 0.8:
        return text.encode("utf-16")
    if r < 0.85:
        return text.replace('"1', '"\u00e9').encode("latin-1", "replace")  # not UTF-8
    if r < 0.9:
        i = rng.randrange(len(text))
        return (text[:i] + "\x00" + text[i:]).encode()
    if r < 0.95:
        return text.replace("\n", "\r\n").encode() + b"\r\n\r\n"
    return ("\n\n" + text.replace("\n", "\n \n\t\n") + "\n   \n").encode()  # blank JSON lines


def _write(d: Path, i: int, data: str | bytes, slots: int) -> Path:
    p = d / f"r{i % slots}.json"
    if isinstance(data, str):
        p.write_text(data, encoding="utf-8", errors="surrogatepass")
    else:
        p.write_bytes(data)
    return p


class Places:
    """The fixed hostile paths, made once in ``root``."""

    def __init__(self, root: Path, good_text: str):
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        self.good = root / "good.json"
        self.good.write_text(good_text)
        (root / "a-dir").mkdir(exist_ok=True)
        fifo = root / "r.fifo"
        if not fifo.exists():
            os.mkfifo(fifo)
        links = {"loop": "loop", "dangling": "no-such-target", "to-zero": "/dev/zero", "to-dir": "a-dir",
                 "to-good": "good.json", "to-fifo": "r.fifo"}
        for name, target in links.items():
            if not (root / name).is_symlink():
                (root / name).symlink_to(target)
        self.paths = [
            str(root / "missing.json"), str(root / "a-dir"), str(root / "loop"), str(root / "dangling"),
            str(root / "to-zero"), str(root / "to-dir"), str(root / "to-good"), str(root / "to-fifo"),
            str(fifo), "/dev/zero", "/dev/null", "/dev/urandom", "/proc/self/status", "/proc/self/maps",
            "/proc/self/mem", "/proc/self/environ", "/etc/passwd", "/", ".", "..", "-", "~/r.json", "",
            str(self.good / "x"), str(root / "a-dir" / ".." / "good.json"),
            str(root / "a-dir" / ".." / ".." / root.name / "good.json"), str(root / ("n" * 256)),
            str(root / ("n" * 255)), "/" + "a/" * 2100 + "r.json", str(root / "sp ace \u00e9\u4e2d.json"),
            "file://" + str(self.good), str(root / "good.json/"), str(root) + "//good.json",
        ]
        (root / "sp ace \u00e9\u4e2d.json").write_text(good_text)


def make_case(rng: random.Random, base: list[dict], d: Path, i: int, places: Places, *, slots: int = 4,
              api: bool = False) -> Case:
    kind = rng.choices(list(KINDS), weights=list(KINDS.values()))[0]
    if kind == "json":
        form, value = _form(rng, base)
        for _ in range(rng.choice([1, 1, 2, 3])):
            value = mutate_json(value, rng, weird=FILE_WEIRD)
        if form == "lines" and not isinstance(value, list):
            form = "object"
        text = dump(form, value, ensure_ascii=rng.random() < 0.7)
        return Case(kind, str(_write(d, i, text, slots)), text[:200])
    if kind == "numbers":
        text = _with_token(rng, base)
        return Case(kind, str(_write(d, i, text, slots)), text[:200])
    if kind == "deep":
        depth = rng.choice([20, 1000, 3000, 100_000, 1_000_000])
        return Case(kind, str(_write(d, i, _deep_text(rng, depth), slots)), f"nested {depth} deep")
    if kind == "types":
        text = rng.choice(TYPE_TEXTS)
        return Case(kind, str(_write(d, i, text, slots)), text)
    if kind == "huge":
        text = _huge(rng, base)
        return Case(kind, str(_write(d, i, text, slots)), f"{len(text)} chars: {text[:120]}")
    if kind == "bytes":
        data = _bytes(rng, base)
        return Case(kind, str(_write(d, i, data, slots)), repr(data[:200]))
    if api and rng.random() < 0.1:
        p = str(places.good) + rng.choice(["\x00", "\x00.json", "/\x00"])
        return Case(kind, p, repr(p), api_only=True)
    p = rng.choice(places.paths)
    return Case(kind, p, repr(p[:200]))


def limits_case(rng: random.Random, d: Path, i: int) -> tuple[Path, str]:
    """A ``--limits`` file: small valid limits (so the limits are reached), or a mutated one."""
    lim = {"max_history": rng.choice([1, 2, 5, 50, 10_000]), "max_candidates": rng.choice([1, 2, 3, 100]),
           "max_request_bytes": rng.choice([1, 64, 512, 4096, 1 << 20]),
           "over_limit": rng.choice(["refuse", "truncate"])}
    if rng.random() < 0.3:
        for _ in range(rng.choice([1, 2])):
            lim = mutate_json(lim, rng, weird=FILE_WEIRD)
    text = json.dumps(lim, default=str)
    if rng.random() < 0.1:
        text = mutate_bytes(text.encode(), rng).decode("latin-1")
    p = d / f"limits{i % 2}.json"
    p.write_text(text, encoding="latin-1", errors="replace")
    return p, text[:200]


def no_nan(text: str):
    """``json.loads`` that refuses NaN/Infinity (what a strict JSON reader of our output does)."""
    def bad(tok: str):
        raise ValueError(f"non-standard JSON constant {tok}")
    return json.loads(text, parse_constant=bad)


def finite(x) -> bool:
    return not isinstance(x, float) or math.isfinite(x)


# ---- graph feeds (``validate --inputs``: .npz or Polygraphy JSON of arrays) ----------------
def valid_feeds(build: Path) -> list[dict]:
    """The build's sample requests as feed dicts holding every graph input (what ``--inputs``
    takes), from its ``samples/samples.npz`` (which also holds the outputs)."""
    import numpy as np

    manifest = json.loads((build / "manifest.json").read_text())
    names = {i["name"] for g in ("user_encoder", "candidate_scorer") for i in manifest["graphs"][g]["inputs"]}
    names -= {o["name"] for o in manifest["graphs"]["user_encoder"]["outputs"]}  # the K/V the scorer is fed
    with np.load(build / "samples" / "samples.npz") as z:
        feeds: dict[int, dict] = {}
        for key in z.files:
            i, _, name = key.partition("/")
            if name in names:
                feeds.setdefault(int(i), {})[name] = z[key]
    return [feeds[i] for i in sorted(feeds)]


def _mutate_feeds(rng: random.Random, feeds: list[dict]) -> list[dict]:
    import numpy as np

    feeds = [dict(f) for f in feeds]
    f = rng.choice(feeds)
    k = rng.choice(sorted(f))
    r = rng.random()
    if r < 0.15:
        del f[k]
    elif r < 0.25:
        f[k + rng.choice(["_", "x", ""]) or "extra"] = f[k]
    elif r < 0.4:
        f[k] = f[k].astype(rng.choice([np.float32, np.float16, np.int32, np.uint8, np.bool_, np.complex64]))
    elif r < 0.5:
        f[k] = np.full(f[k].shape, rng.choice([np.nan, np.inf, -1e30]), np.float32)
    elif r < 0.6:
        f[k] = np.zeros(rng.choice([(0,), (0, 3), (1, 1, 1), (2, 10_000), ()]), f[k].dtype)
    elif r < 0.7:
        f[k] = np.full(f[k].shape, rng.choice([-1, 2 ** 31, -(2 ** 62), 2 ** 63 - 1]), np.int64)
    elif r < 0.8:
        f[k] = np.repeat(f[k], rng.choice([2, 50]), axis=0) if f[k].ndim else f[k]
    elif r < 0.9:
        f[k] = np.array(["x"] * max(1, f[k].size))
    else:
        feeds = feeds[:0] if rng.random() < 0.5 else feeds * rng.choice([2, 40])
    return feeds


def feeds_case(rng: random.Random, feeds: list[dict], d: Path, i: int) -> Case:
    """An ``--inputs`` file of graph feeds: valid, mutated arrays, or mutated bytes."""
    import io

    import numpy as np
    from polygraphy.json import to_json

    value = feeds if rng.random() < 0.2 else _mutate_feeds(rng, feeds)
    if rng.random() < 0.5:
        buf = io.BytesIO()
        np.savez(buf, **{f"{j}/{k}": v for j, f in enumerate(value) for k, v in f.items()})
        data, p = buf.getvalue(), d / f"f{i % 2}.npz"
    else:
        data, p = to_json(value).encode(), d / f"f{i % 2}.json"
    note = f"feeds of {len(value)} requests"
    if rng.random() < 0.4:
        data, note = mutate_bytes(data, rng), note + ", bytes mutated"
    p.write_bytes(data)
    return Case("feeds", str(p), note)
