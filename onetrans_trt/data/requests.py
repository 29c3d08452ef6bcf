"""Serving requests: raw JSON in, named tensors out.

A request is one user's features, their behaviour history, the request context, and a
list of candidates with their item features::

    {
      "user_key": "196",                          # optional: cache key for the user's K/V
      "user": {"user_id": "196", "age": "45-49", "gender": "M", "occupation": "writer"},
      "context": {},
      "history": [
        {"sequence": "rated_high", "timestamp": 881250949,
         "item_id": "242", "release_year": "1996", "genre": "Comedy"}
      ],
      "candidates": [{"item_id": "302", "release_year": "1997", "genres": ["Crime"]}]
    }

Raw values are looked up in the schema's tables; unknown values map to the OOV row.
Malformed requests raise :class:`~onetrans_trt.errors.RequestError` naming the field.

Tensors (numpy, int64 unless dense):
- ``ns_<feature>``: ``[C]`` categorical, ``[C, max_len]`` multi-hot (0-padded),
  ``[C, dim]`` float32 dense. User and context features are repeated per candidate.
- ``s_type`` ``[U, L]`` (0 pad, ``1..K`` the event's sequence, ``K+1..2K`` the [SEP]
  after sequence k), ``s_<field>`` ``[U, L]``, ``s_length`` ``[U]``: the merged S-token
  stream, **left-padded** (the newest token is last).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from onetrans_trt.contracts import refused
from onetrans_trt.data.schema import OOV, PAD, FeatureSchema
from onetrans_trt.errors import RequestError
from onetrans_trt.io import TooBig

FLOAT32_MAX = float(np.finfo(np.float32).max)


_POSITIVE = {"int_type": "expected a positive integer, got {input}",
             "greater_than": "expected a positive integer, got {input}"}


class RequestLimits(BaseModel):
    """What one request may hold. Over a limit the request is refused with the field named,
    never silently cut; with ``over_limit="truncate"`` the newest ``max_history`` events and
    the first ``max_candidates`` candidates are kept and the response records it."""

    model_config = ConfigDict(strict=True, extra="forbid", title="Limits")

    max_history: int = Field(10_000, gt=0, description="behaviour events per request")
    max_candidates: int = Field(10_000, gt=0, description="candidates per request")
    max_request_bytes: int = Field(16 << 20, gt=0, description="bytes of one request in a file or body")
    over_limit: Literal["refuse", "truncate"] = Field(
        "refuse", description="over a limit: refuse the request, or keep the newest events / first candidates")

    def __init__(self, *args: Any, **kw: Any) -> None:
        kw.update(zip(type(self).model_fields, args))  # positional, in the order above
        with refused(RequestError, kw, "limits", _POSITIVE):
            super().__init__(**kw)

    @classmethod
    def from_json(cls, obj: Any) -> "RequestLimits":
        with refused(RequestError, obj, "limits", {**_POSITIVE, "limits:model_type": "expected a JSON object"}):
            return cls.model_validate(obj)

    @classmethod
    def load(cls, path: str | Path) -> "RequestLimits":
        try:
            return cls.from_json(json.loads(read_regular_file(path, 1 << 16).decode("utf-8")))
        except TooBig as e:
            raise RequestError(f"{path}: {e.size} bytes is too big for a limits JSON file") from None
        except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
            raise RequestError(f"{path}: not a readable limits JSON file ({str(e)[:120]})") from None

    def apply(self, req: "Request") -> tuple["Request", dict[str, Any]]:
        """The request within the limits (or an error), and what was cut (empty if nothing)."""
        cut: dict[str, Any] = {}
        over = [(k, n, m) for k, n, m in (("history", len(req.history), self.max_history),
                                          ("candidates", len(req.candidates), self.max_candidates)) if n > m]
        if not over:
            return req, cut
        if self.over_limit == "refuse":
            k, n, m = over[0]
            raise RequestError(f"request.{k}: {n} entries is over the limit of {m} (limits.max_{k}; "
                               f"set limits.over_limit to 'truncate' to keep the newest/first ones)")
        history, cands = req.history, req.candidates
        if len(history) > self.max_history:
            order = sorted(range(len(history)), key=lambda i: (_timestamp(history[i], i), i))
            keep = sorted(order[-self.max_history:])
            cut["history"] = {"given": len(history), "kept": len(keep)}
            history = [history[i] for i in keep]
        if len(cands) > self.max_candidates:
            cut["candidates"] = {"given": len(cands), "kept": self.max_candidates}
            cands = cands[: self.max_candidates]
        return Request(req.user, req.context, history, cands, req.user_key, req.extra), cut


def _finite(v: Any) -> float | None:
    """``v`` as a finite float, or None (not a number, NaN/Inf, or an int too big for a float)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    try:
        f = float(v)
    except OverflowError:
        return None
    return f if math.isfinite(f) else None


def _timestamp(ev: Any, i: int) -> float:
    t = _finite(ev.get("timestamp") if isinstance(ev, dict) else None)
    if t is None:
        raise RequestError(f"request.history[{i}].timestamp: expected a finite number")
    return t


MAX_DEPTH = 16  # a request is 4 levels deep (request.candidates[i].genres[j]); more is hostile
_INT64 = 1 << 63


def _where(path: list) -> str:
    out = "request"
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else f".{p}"
    return out


def _plain(v: Any, path: list) -> Any:
    """``v`` as plain JSON values (see :meth:`Request.from_json`); ``path`` names it in errors."""
    if v is None or isinstance(v, (str, bool, float)):
        return v
    if isinstance(v, int):
        if -_INT64 <= v < _INT64:
            return v
        raise RequestError(f"{_where(path)}: integer outside the 64-bit range")
    if len(path) >= MAX_DEPTH:
        raise RequestError(f"{_where(path[:MAX_DEPTH])}: nested more than {MAX_DEPTH} levels deep")
    if isinstance(v, dict):
        out = {}
        for k, x in v.items():
            if not isinstance(k, str):
                raise RequestError(f"{_where(path)}: keys must be strings, got {type(k).__name__}")
            out[k] = _plain(x, path + [k])
        return out
    if isinstance(v, (list, tuple)):
        return [_plain(x, path + [i]) for i, x in enumerate(v)]
    if isinstance(v, (np.ndarray, np.generic)) and v.dtype.kind in "biufUO":
        return _plain(v.tolist(), path)
    raise RequestError(f"{_where(path)}: a {type(v).__name__} is not a JSON value")


Features = dict[str, Any]  # feature name -> a value, a list (multi-hot, dense) or null


class EventJSON(BaseModel):
    """One behaviour event: its sequence, when it happened, and that sequence's fields
    (other keys are left alone)."""

    model_config = ConfigDict(strict=True, title="Event", json_schema_extra={"additionalProperties": True})
    sequence: str = Field(description="the name of one of the model's behaviour sequences")
    timestamp: float = Field(allow_inf_nan=False, description="when it happened; the newest events are kept")


class RequestJSON(BaseModel):
    """A serving request: one user, their history, the context and the candidates to score.
    Integers are 64-bit and values nest at most 16 levels deep; feature names and values are
    checked against the model's feature schema when the request is encoded (unknown ids map
    to the out-of-vocabulary row)."""

    model_config = ConfigDict(strict=True, title="Request")
    user: Features = Field(default_factory=dict, description="the user's features")
    context: Features = Field(default_factory=dict, description="the request context's features")
    history: list[EventJSON] = Field(default_factory=list, description="behaviour events, in any order")
    candidates: list[Features] = Field(description="the items to score, each an object of item features")
    user_key: str | int | None = Field(None, description="a cache key for the user's K/V (an integer becomes a string)")


_REQUEST_SAY = {"request:model_type": "expected a JSON object at the top level",
                "request.candidates:missing": "missing (a list of candidate items)"}


@dataclass
class Events:
    """A user's behaviour events, encoded: one entry per event, in any order."""

    types: np.ndarray  # [n] sequence index + 1
    timestamps: np.ndarray  # [n] float64
    fields: dict[str, np.ndarray]  # field -> [n] table rows (PAD where not in the sequence)

    def __len__(self) -> int:
        return int(self.types.shape[0])

    def slice(self, start: int, stop: int) -> "Events":
        return Events(self.types[start:stop], self.timestamps[start:stop],
                      {k: v[start:stop] for k, v in self.fields.items()})


@dataclass
class Request:
    user: dict[str, Any]
    context: dict[str, Any]
    history: list[dict[str, Any]]
    candidates: list[dict[str, Any]]
    user_key: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, obj: Any) -> "Request":
        """A request from its JSON value (a dict as ``json.load`` gives it). Through the Python
        API numpy arrays and scalars are taken as the lists and numbers they hold, tuples as
        lists; anything that is not a JSON value (bytes, sets, objects), integers outside 64
        bits, non-string keys and nesting deeper than ``MAX_DEPTH`` raise :class:`RequestError`."""
        obj = _plain(obj, [])
        with refused(RequestError, obj, "request", _REQUEST_SAY):
            RequestJSON.model_validate(obj)
        key = obj.get("user_key")
        return cls(
            user=dict(obj.get("user", {})), context=dict(obj.get("context", {})),
            history=list(obj.get("history", [])), candidates=list(obj["candidates"]),
            user_key=None if key is None else str(key),
        )

    def to_json(self) -> dict:
        d = {"user": self.user, "context": self.context, "history": self.history,
             "candidates": self.candidates}
        if self.user_key is not None:
            d["user_key"] = self.user_key
        return d


def read_regular_file(path: str | Path, bound: int) -> bytes:
    """:func:`onetrans_trt.io.read_regular_file`, a device or pipe refused as a RequestError."""
    from onetrans_trt.io import NotRegular
    from onetrans_trt.io import read_regular_file as read

    try:
        return read(path, bound)
    except NotRegular:
        raise RequestError(f"{path}: not a regular file (a device, pipe or socket); give a JSON file") from None


def load_requests(path: str | Path, limits: RequestLimits | None = None) -> list[Request]:
    """Read one request (a JSON object) or many (a JSON list, or JSON lines); a file over
    ``limits.max_request_bytes`` times the number of requests it could hold is refused
    before it is read. Only regular files are read (a device, pipe or socket is refused), and
    never more than that bound, even from a file that grows or lies about its size."""
    path = Path(path)
    limits = limits or RequestLimits()
    bound = limits.max_request_bytes * 1024
    try:
        text = read_regular_file(path, bound).decode("utf-8")
    except TooBig as e:
        raise RequestError(f"{path}: {e.size} bytes is over the limit of 1024 requests of "
                           f"{limits.max_request_bytes} bytes (limits.max_request_bytes)") from None
    except FileNotFoundError:
        raise RequestError(f"{path}: no such request file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise RequestError(f"{path}: cannot read ({e})") from None
    if not text.strip():
        raise RequestError(f"{path}: holds no request (the file is empty)")
    try:
        obj = json.loads(text)
        lines = [text]
    except json.JSONDecodeError:
        try:
            lines = [line for line in text.splitlines() if line.strip()]
            obj = [json.loads(line) for line in lines]
        except json.JSONDecodeError as e:
            raise RequestError(f"{path}: not JSON or JSON lines ({e})") from None
        except RecursionError:
            raise RequestError(f"{path}: JSON nested too deeply") from None
        except ValueError as e:  # an integer of thousands of digits (int/str conversion limit)
            raise RequestError(f"{path}: not usable JSON ({str(e)[:100]})") from None
    except RecursionError:
        raise RequestError(f"{path}: JSON nested too deeply") from None
    except ValueError as e:
        raise RequestError(f"{path}: not usable JSON ({str(e)[:100]})") from None
    items = obj if isinstance(obj, list) else [obj]
    if len(lines) == 1 and len(text.encode("utf-8")) > limits.max_request_bytes * max(1, len(items)):
        raise RequestError(f"{path}: over {limits.max_request_bytes} bytes per request (limits.max_request_bytes)")
    for i, line in enumerate(lines if len(lines) > 1 else []):
        if len(line.encode("utf-8")) > limits.max_request_bytes:
            raise RequestError(f"{path}: line {i + 1} is over {limits.max_request_bytes} bytes "
                               f"(limits.max_request_bytes)")
    return [Request.from_json(o) for o in items]


# ---- value encoding ------------------------------------------------------------------
def _categorical(schema: FeatureSchema, table: str, value: Any, where: str) -> int:
    if isinstance(value, (dict, list)):
        raise RequestError(f"{where}: expected a single value, got {type(value).__name__}")
    return schema.tables[table].index(value)


def _multihot(schema: FeatureSchema, table: str, value: Any, max_len: int, where: str) -> np.ndarray:
    if value is None:
        value = []
    if not isinstance(value, list):
        value = [value]
    out = np.zeros(max_len, dtype=np.int64)
    rows = [_categorical(schema, table, v, f"{where}[{i}]") for i, v in enumerate(value)]
    rows = [r for r in rows if r != PAD][:max_len]
    out[: len(rows)] = rows
    return out


def _dense(value: Any, dim: int, where: str) -> np.ndarray:
    if not isinstance(value, list):
        value = [value]
    if len(value) != dim:
        raise RequestError(f"{where}: expected {dim} number(s), got {len(value)}")
    out = np.empty(dim, dtype=np.float32)
    for i, v in enumerate(value):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise RequestError(f"{where}: expected a number, got {str(v)[:40]!r}")
        if _finite(v) is None:
            raise RequestError(f"{where}: NaN/Inf (or a number too big for a float) is not allowed")
        if abs(v) > FLOAT32_MAX:
            raise RequestError(f"{where}: {v!r} overflows float32")
        out[i] = v
    return out


def encode_ns(schema: FeatureSchema, user: Mapping[str, Any] | Sequence[Mapping[str, Any]],
              context: Mapping[str, Any], items: Sequence[Mapping[str, Any]], *,
              where: str = "request") -> dict[str, np.ndarray]:
    """Encode the NS features of ``len(items)`` candidates.

    ``user`` and ``context`` are repeated for every candidate; ``user`` may also be a list
    with one user per row (training batches, one sample per row).
    """
    c = len(items)
    out: dict[str, np.ndarray] = {}
    for f in schema.features:
        if f.group == "item":
            sources = [(items[i], f"{where}.candidates[{i}].{f.name}") for i in range(c)]
        elif f.group == "user" and not isinstance(user, Mapping):
            sources = [(user[i], f"{where}[{i}].user.{f.name}") for i in range(c)]
        else:
            src = user if f.group == "user" else context
            sources = [(src, f"{where}.{f.group}.{f.name}")] * c
        vals = []
        cache: dict[int, np.ndarray | int] = {}
        for obj, loc in sources:
            if id(obj) in cache and f.group != "item":
                vals.append(cache[id(obj)])
                continue
            if f.name not in obj:
                raise RequestError(f"{loc}: missing")
            v = obj[f.name]
            if f.kind == "categorical":
                enc: Any = _categorical(schema, f.table, v, loc)
            elif f.kind == "multihot":
                enc = _multihot(schema, f.table, v, f.max_len, loc)
            else:
                enc = _dense(v, f.dim, loc)
            cache[id(obj)] = enc
            vals.append(enc)
        if f.kind == "categorical":
            out[f"ns_{f.name}"] = np.asarray(vals, dtype=np.int64).reshape(c)
        elif f.kind == "multihot":
            out[f"ns_{f.name}"] = np.stack(vals).astype(np.int64) if c else np.zeros((0, f.max_len), np.int64)
        else:
            out[f"ns_{f.name}"] = np.stack(vals).astype(np.float32) if c else np.zeros((0, f.dim), np.float32)
    return out


def encode_events(schema: FeatureSchema, history: Sequence[Mapping[str, Any]], *,
                  where: str = "request.history") -> Events:
    """Encode behaviour events. Well-formed histories take a column-wise path (a request's
    history is its largest part: ~4x faster at 1,024 events); anything unusual goes through
    the checked event-by-event path, which names the first bad field."""
    fast = _encode_events_fast(schema, history)
    return fast if fast is not None else _encode_events_checked(schema, history, where=where)


def _table_rows(table: Any, values: list[Any]) -> np.ndarray | None:
    """Rows of ``values`` in ``table`` exactly as :meth:`Table.index` maps them, or None
    when a value needs the checked path (its type is unusual or it may be an error)."""
    if table.tokens is not None:
        lookup = table.token_rows()
        if all(type(v) is str for v in values):
            return np.fromiter((lookup.get(v, OOV) for v in values), dtype=np.int64, count=len(values))
        return None
    if all(type(v) is int for v in values):
        try:
            raw = np.array(values, dtype=np.int64)
        except OverflowError:
            return None
        return np.where((raw >= 0) & (raw < table.size), raw + 2, OOV)
    return None


def _encode_events_fast(schema: FeatureSchema, history: Sequence[Mapping[str, Any]]) -> Events | None:
    n = len(history)
    index: dict[str, int] = {}
    for k, seq in enumerate(schema.sequences):
        index.setdefault(seq.name, k)
    try:
        types = np.fromiter((index[ev["sequence"]] + 1 for ev in history), dtype=np.int64, count=n)
        stamps = [ev["timestamp"] for ev in history]
    except (KeyError, TypeError, AttributeError):
        return None
    if not all(type(t) is float or type(t) is int for t in stamps):
        return None
    try:
        ts = np.array(stamps, dtype=np.float64).reshape(n)
    except OverflowError:
        return None
    if not np.isfinite(ts).all():
        return None
    fields = {f: np.zeros(n, dtype=np.int64) for f in schema.seq_fields}
    for k, seq in enumerate(schema.sequences):
        at = np.flatnonzero(types == k + 1)
        if not len(at):
            continue
        events = [history[i] for i in at.tolist()]
        for fname, table in seq.fields.items():
            try:
                rows = _table_rows(schema.tables[table], [ev[fname] for ev in events])
            except KeyError:
                return None
            if rows is None:
                return None
            fields[fname][at] = rows
    return Events(types, ts, fields)


def _encode_events_checked(schema: FeatureSchema, history: Sequence[Mapping[str, Any]], *,
                           where: str = "request.history") -> Events:
    n = len(history)
    seq_fields = schema.seq_fields
    types = np.zeros(n, dtype=np.int64)
    ts = np.zeros(n, dtype=np.float64)
    fields = {f: np.zeros(n, dtype=np.int64) for f in seq_fields}
    for i, ev in enumerate(history):
        loc = f"{where}[{i}]"
        name = ev.get("sequence")
        try:
            k = schema.sequence_index(name)
        except KeyError:
            known = [s.name for s in schema.sequences]
            raise RequestError(f"{loc}.sequence: {name!r} is not one of {known}") from None
        types[i] = k + 1
        t = ev.get("timestamp")
        if _finite(t) is None:
            raise RequestError(f"{loc}.timestamp: expected a finite number, got {str(t)[:40]!r}")
        ts[i] = float(t)
        for fname, table in schema.sequences[k].fields.items():
            if fname not in ev:
                raise RequestError(f"{loc}.{fname}: missing")
            fields[fname][i] = _categorical(schema, table, ev[fname], f"{loc}.{fname}")
    return Events(types, ts, fields)


def merge_stream(schema: FeatureSchema, ev: Events) -> dict[str, np.ndarray]:
    """Order a user's events into one S-token stream (1-D arrays, newest last).

    The newest ``max_history`` events are kept. ``timestamp_aware`` interleaves them by
    time (ties: sequence order, then input order); ``timestamp_agnostic`` concatenates
    the sequences in schema order (most important first), each followed by its [SEP].
    """
    k = schema.num_sequences
    order = np.lexsort((np.arange(len(ev)), ev.types, ev.timestamps))  # by time, stable
    order = order[max(0, len(order) - schema.max_history):]
    types = ev.types[order]
    fields = {f: v[order] for f, v in ev.fields.items()}
    if schema.merge_mode == "timestamp_agnostic":
        parts_t, parts_f = [], {f: [] for f in fields}
        for s in range(1, k + 1):
            sel = types == s
            parts_t += [types[sel], np.array([k + s], dtype=np.int64)]
            for f in fields:
                parts_f[f] += [fields[f][sel], np.zeros(1, dtype=np.int64)]
        types = np.concatenate(parts_t)
        fields = {f: np.concatenate(v) for f, v in parts_f.items()}
    return {"s_type": types, **{f"s_{f}": v for f, v in fields.items()}}


def pad_streams(schema: FeatureSchema, streams: Sequence[Mapping[str, np.ndarray]],
                length: int | None = None) -> dict[str, np.ndarray]:
    """Left-pad merged streams into ``[U, L]`` tensors plus ``s_length``.

    ``length`` defaults to the longest stream (at least 1, so shapes are never empty).
    """
    lens = np.array([len(s["s_type"]) for s in streams], dtype=np.int64)
    width = int(length if length is not None else max(1, int(lens.max(initial=0))))
    if (lens > width).any():
        raise ValueError(f"stream longer than the padded length {width}")
    keys = ["s_type"] + [f"s_{f}" for f in schema.seq_fields]
    out = {key: np.zeros((len(streams), width), dtype=np.int64) for key in keys}
    for i, s in enumerate(streams):
        n = int(lens[i])
        if n:
            for key in keys:
                out[key][i, width - n:] = s[key]
    out["s_length"] = lens
    return out


# ---- each sequence on its own (HyFormer's graphs) ---------------------------------------
_OWN_INPUT = re.compile(r"^s(\d+)_(.+)$")


def sequence_input_names(schema: FeatureSchema) -> list[str]:
    """The per-sequence history inputs: for sequence ``j``, ``s<j>_<field>`` ``[U, W_j]``
    (its own fields only, left-padded) and ``s<j>_length`` ``[U]``."""
    names: list[str] = []
    for j, seq in enumerate(schema.sequences):
        names += [f"s{j}_{f}" for f in seq.fields] + [f"s{j}_length"]
    return names


def is_sequence_input(name: str) -> bool:
    """Whether ``name`` is one of sequence j's own inputs (``s<j>_<field>``, ``s<j>_length``)."""
    return _OWN_INPUT.match(name) is not None


def _own_fields(names: Sequence[str]) -> dict[int, list[str]]:
    """``{j: [field, ...]}`` of the per-sequence names among ``names``."""
    out: dict[int, list[str]] = {}
    for n in names:
        m = _OWN_INPUT.match(n)
        if m:
            fields = out.setdefault(int(m.group(1)), [])
            if m.group(2) != "length":
                fields.append(m.group(2))
    return out


def split_sequences(schema: FeatureSchema | None, hist: Mapping[str, np.ndarray], min_width: int = 1, *,
                    names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """A merged ``[U, L]`` stream (``s_type``, ``s_<field>``, ``s_length``) as each sequence's
    own inputs (:func:`sequence_input_names`, or the per-sequence ones among ``names``): the
    stream's newest ``s_max_len`` positions (all without a schema), of those the real ones (the
    last ``s_length``), of those sequence j's events in order, left-padded to the batch's most
    (at least ``min_width``: shapes are never empty). [SEP] tokens belong to no sequence. What a
    model laying each sequence out from the merged stream reads, exactly."""
    types = np.asarray(hist["s_type"])
    if types.ndim != 2:
        raise ValueError(f"s_type: expected [users, history], got shape {types.shape}")
    u, width = types.shape
    n = width if schema is None else min(width, schema.s_max_len)
    types = types[:, width - n:]
    lens = np.clip(np.asarray(hist["s_length"]).reshape(-1).astype(np.int64), 0, n)
    if lens.shape[0] != u:
        raise ValueError(f"s_length: expected {u} lengths (one per user), got {lens.shape[0]}")
    real = np.arange(n)[None, :] >= (n - lens)[:, None]
    wanted = _own_fields(names if names is not None else sequence_input_names(schema))
    out: dict[str, np.ndarray] = {}
    for j, fields in sorted(wanted.items()):
        mine = (types == j + 1) & real
        count = mine.sum(axis=1).astype(np.int64)
        w = max(min_width, int(count.max(initial=0)))
        for f in fields:
            src = np.asarray(hist[f"s_{f}"])[:, width - n:]
            dst = np.zeros((u, w), dtype=src.dtype)
            for i in range(u):
                if count[i]:
                    dst[i, w - count[i]:] = src[i][mine[i]]
            out[f"s{j}_{f}"] = dst
        out[f"s{j}_length"] = count
    return out


def history_feeds(hist: Mapping[str, Any], names: Sequence[str], schema: FeatureSchema | None = None) -> dict[str, Any]:
    """The user-encoder feeds ``names`` out of ``hist``: taken as they are, or, for a graph that
    reads each sequence on its own (``s<j>_*``) given a merged stream, split first
    (:func:`split_sequences`). A name neither has raises ``KeyError``."""
    if "s_type" in hist and any(n not in hist and _OWN_INPUT.match(n) for n in names):
        hist = {**hist, **split_sequences(schema, hist, names=names)}
    return {n: hist[n] for n in names}


def encode_request(schema: FeatureSchema, req: Request) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Encode one request: (user history tensors with U=1, candidate NS tensors with C rows)."""
    ev = encode_events(schema, req.history)
    hist = pad_streams(schema, [merge_stream(schema, ev)])
    ns = encode_ns(schema, req.user, req.context, req.candidates)
    return hist, ns


def repeat_history(hist: Mapping[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
    """Repeat a one-user history ``n`` times (the naive, unified path's input)."""
    return {k: np.repeat(v, n, axis=0) for k, v in hist.items()}
