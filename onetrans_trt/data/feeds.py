"""The user's own inputs, as graph feeds: ``--inputs FILE`` of ``validate`` and ``calibrate``.

Two formats, one meaning: a list of *requests*, each a dict ``{input name: array}`` holding
every input of the model (user side and candidate side, named as the graphs name them).

* ``.npz`` (plain arrays, never pickles): either keys ``<i>/<name>`` (request ``i``, any
  number of requests) or bare ``<name>`` keys (one request).
* Polygraphy's JSON input format (``polygraphy run --save-inputs``, ``--load-inputs``): a
  list of feed dicts, or one feed dict. Decoded by Polygraphy (``allow_pickle=False``).

For our own checkpoints a request JSON/JSONL (raw events and features) is also accepted; see
:func:`input_kind`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from onetrans_trt.errors import InputError

MAX_REQUESTS = 100_000


def input_kind(path: str | Path) -> str:
    """``"npz"``, ``"polygraphy"`` (JSON of arrays) or ``"requests"`` (request JSON/JSONL)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"--inputs {path}: no such file")
    try:
        with open(path, "rb") as fh:
            head = fh.read(4096)
    except OSError as e:  # a file that stats as regular and cannot be read: /proc/self/mem (EIO)
        raise InputError(f"--inputs {path}: cannot read ({e.strerror or e})") from None
    if head.startswith(b"PK"):
        return "npz"
    text = head.decode("utf-8", "replace").lstrip()
    if "__polygraphy_encoded" in text or "polygraphy_class" in text:
        return "polygraphy"
    if text[:1] in ("{", "["):
        return "requests"
    raise InputError(f"--inputs {path}: neither an .npz, Polygraphy JSON of arrays, nor request JSON/JSONL")


def _check_array(path: Path, where: str, a: Any) -> np.ndarray:
    if not isinstance(a, np.ndarray):
        raise InputError(f"--inputs {path}: {where} is {type(a).__name__}, not an array")
    if a.dtype.kind not in "biuf":
        raise InputError(f"--inputs {path}: {where} has dtype {a.dtype}; give numbers or booleans")
    if a.dtype.kind == "f" and not np.isfinite(a).all():
        raise InputError(f"--inputs {path}: {where} holds NaN or infinite values")
    return a


def _from_npz(path: Path) -> list[dict[str, np.ndarray]]:
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as e:  # noqa: BLE001 - zipfile/numpy raise many kinds
        raise InputError(f"--inputs {path}: not a readable .npz of plain arrays ({str(e).splitlines()[0][:160]})") \
            from None
    if not arrays:
        raise InputError(f"--inputs {path}: holds no arrays")
    indexed = [k for k in arrays if "/" in k]
    if not indexed:
        return [{k: _check_array(path, k, v) for k, v in arrays.items()}]
    if len(indexed) != len(arrays):
        raise InputError(f"--inputs {path}: mixes '<i>/<name>' keys with bare names "
                         f"({sorted(set(arrays) - set(indexed))[:3]}); use one form")
    out: dict[int, dict[str, np.ndarray]] = {}
    for key, v in arrays.items():
        i, _, name = key.partition("/")
        if not i.isdigit() or not name:
            raise InputError(f"--inputs {path}: key {key!r} is not '<request index>/<input name>'")
        out.setdefault(int(i), {})[name] = _check_array(path, key, v)
    if len(out) > MAX_REQUESTS:
        raise InputError(f"--inputs {path}: {len(out)} requests; at most {MAX_REQUESTS}")
    if sorted(out) != list(range(len(out))):
        raise InputError(f"--inputs {path}: request indices must be 0..{len(out) - 1} without gaps")
    return [out[i] for i in range(len(out))]


def _from_polygraphy(path: Path) -> list[dict[str, np.ndarray]]:
    from polygraphy.json import load_json

    from onetrans_trt.log import captured_output

    try:
        with captured_output("polygraphy"):  # it prints its "[!] Could not decode ..." before raising
            obj = load_json(str(path))
    except Exception as e:  # noqa: BLE001 - polygraphy raises various errors on bad JSON
        raise InputError(f"--inputs {path}: not readable as Polygraphy JSON ({type(e).__name__})") from None
    items = [obj] if isinstance(obj, dict) else obj
    if not isinstance(items, list) or not items or not all(isinstance(d, dict) for d in items):
        raise InputError(f"--inputs {path}: Polygraphy JSON must be a list of feed dicts (name -> array)")
    if len(items) > MAX_REQUESTS:
        raise InputError(f"--inputs {path}: {len(items)} requests; at most {MAX_REQUESTS}")
    return [{str(k): _check_array(path, f"request {i} {k!r}", v) for k, v in d.items()} for i, d in enumerate(items)]


def load_feed_list(path: str | Path) -> tuple[list[dict[str, np.ndarray]], str]:
    """The requests in ``path`` (npz or Polygraphy JSON) and a description of the source."""
    path = Path(path)
    kind = input_kind(path)
    if kind == "requests":
        raise InputError(f"--inputs {path}: request JSON is for our own checkpoints; a module build takes an .npz "
                         "or Polygraphy JSON of arrays")
    feeds = _from_npz(path) if kind == "npz" else _from_polygraphy(path)
    return feeds, f"--inputs {path} ({len(feeds)} request{'s' if len(feeds) != 1 else ''}, {kind})"


def split_feeds(path: str | Path, feeds: list[dict[str, np.ndarray]], user_names: list[str],
                candidate_names: list[str]) -> list[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]:
    """Each request split into (user inputs, candidate inputs); every name must be present and
    nothing else may be (a typo in an input name is an error, not a silently ignored array)."""
    known = set(user_names) | set(candidate_names)
    out = []
    for i, f in enumerate(feeds):
        missing = [n for n in (*user_names, *candidate_names) if n not in f]
        extra = sorted(set(f) - known)
        if missing:
            raise InputError(f"--inputs {path}: request {i} lacks {missing}; every request needs {sorted(known)}")
        if extra:
            raise InputError(f"--inputs {path}: request {i} has {extra}, which no graph takes; inputs are "
                             f"{sorted(known)}")
        out.append(({n: f[n] for n in user_names}, {n: f[n] for n in candidate_names}))
    return out

