"""Feature schema: what a model reads, declared in the checkpoint config.

A schema has
- **tables**: embedding vocabularies. Index 0 is padding, index 1 is out-of-vocabulary
  (OOV); raw values map to ``2 + position`` in ``tokens`` (or, for a table without tokens,
  an integer raw value ``v`` in ``[0, size)`` maps to ``v + 2``).
- **features**: non-sequential (NS) features, each categorical, multi-hot or dense, and
  grouped into ``user`` / ``item`` / ``context``. Item features are per candidate.
- **sequences**: behaviour sequences (S side). Each event has an item id plus side
  fields (categorical, each naming a table) and a timestamp. Field names shared by
  several sequences share one table.
- ``max_history``: the most events kept per user (newest kept).

Tensor names produced by :mod:`onetrans_trt.data.requests` follow the schema:
``ns_<feature>`` for NS features, ``s_type`` / ``s_<field>`` / ``s_length`` for the
merged S-token stream.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from onetrans_trt.errors import ConfigError

PAD = 0
OOV = 1
GROUPS = ("user", "item", "context")
KINDS = ("categorical", "multihot", "dense")
MERGE_MODES = ("timestamp_aware", "timestamp_agnostic")


MAX_SIZE = 1 << 30  # rows of one table; bigger would not fit a float32 checkpoint anyway


@dataclass
class Table:
    """An embedding vocabulary."""

    name: str
    size: int  # number of real values (excluding PAD and OOV)
    dim: int
    tokens: list[str] | None = None
    _lookup: dict[str, int] | None = field(default=None, repr=False, compare=False)

    @property
    def rows(self) -> int:
        return self.size + 2

    def token_rows(self) -> dict[str, int]:
        """Token -> row (tables with tokens)."""
        if self._lookup is None:
            self._lookup = {t: i + 2 for i, t in enumerate(self.tokens or [])}
        return self._lookup

    def index(self, raw: Any) -> int:
        """Map a raw value to its row; unknown values map to OOV."""
        if raw is None:
            return PAD
        if self.tokens is not None:
            return self.token_rows().get(str(raw), OOV)
        if isinstance(raw, bool):
            return OOV
        if isinstance(raw, float) and raw.is_integer():
            raw = int(raw)
        if isinstance(raw, str):
            try:
                raw = int(raw)
            except ValueError:
                return OOV
        if isinstance(raw, int) and 0 <= raw < self.size:
            return raw + 2
        return OOV

    def to_dict(self) -> dict:
        d = {"name": self.name, "size": self.size, "dim": self.dim}
        if self.tokens is not None:
            d["tokens"] = list(self.tokens)
        return d


@dataclass
class Feature:
    """A non-sequential feature."""

    name: str
    kind: str  # categorical | multihot | dense
    group: str  # user | item | context
    table: str | None = None  # categorical / multihot
    max_len: int = 1  # multihot: values kept per example
    dim: int = 1  # dense: vector width

    def to_dict(self) -> dict:
        d: dict[str, Any] = {"name": self.name, "kind": self.kind, "group": self.group}
        if self.kind in ("categorical", "multihot"):
            d["table"] = self.table
        if self.kind == "multihot":
            d["max_len"] = self.max_len
        if self.kind == "dense":
            d["dim"] = self.dim
        return d


@dataclass
class Sequence:
    """A behaviour sequence: its events' categorical fields (each names a table)."""

    name: str
    fields: dict[str, str]  # field name -> table name

    def to_dict(self) -> dict:
        return {"name": self.name, "fields": dict(self.fields)}


@dataclass
class FeatureSchema:
    tables: dict[str, Table]
    features: list[Feature]
    sequences: list[Sequence]
    max_history: int
    merge_mode: str = "timestamp_aware"

    def __post_init__(self) -> None:
        self.validate()

    # ---- derived views -------------------------------------------------------------
    @property
    def seq_fields(self) -> dict[str, str]:
        """Union of all sequences' fields (name -> table), in first-seen order."""
        out: dict[str, str] = {}
        for s in self.sequences:
            for f, t in s.fields.items():
                out.setdefault(f, t)
        return out

    @property
    def num_sequences(self) -> int:
        return len(self.sequences)

    @property
    def s_max_len(self) -> int:
        """Longest S-token stream: the events plus one [SEP] per sequence if agnostic."""
        extra = self.num_sequences if self.merge_mode == "timestamp_agnostic" else 0
        return self.max_history + extra

    def features_in(self, group: str) -> list[Feature]:
        return [f for f in self.features if f.group == group]

    def sequence_index(self, name: str) -> int:
        for i, s in enumerate(self.sequences):
            if s.name == name:
                return i
        raise KeyError(name)

    # ---- validation and (de)serialization ------------------------------------------
    def validate(self) -> None:
        def bad(msg: str) -> ConfigError:
            return ConfigError(f"feature schema: {msg}")

        def posint(v: Any, what: str, most: int = MAX_SIZE) -> None:
            if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= most:
                raise bad(f"{what} must be an integer in 1..{most}, got {str(v)[:40]!r}")

        posint(self.max_history, "max_history", 1 << 20)
        if not isinstance(self.tables, dict) or not isinstance(self.features, list) or \
                not isinstance(self.sequences, list):
            raise bad("tables must be an object, features and sequences lists")
        for name, t in self.tables.items():
            posint(t.size, f"table {name!r} size")
            posint(t.dim, f"table {name!r} dim", 1 << 16)
            if t.tokens is not None and not (isinstance(t.tokens, list) and all(isinstance(x, str) for x in t.tokens)):
                raise bad(f"table {name!r} tokens must be a list of strings")
        for f in self.features:
            if f.kind == "multihot":
                posint(f.max_len, f"feature {f.name!r} max_len", 1 << 16)
            if f.kind == "dense":
                posint(f.dim, f"feature {f.name!r} dim", 1 << 16)
        for q in self.sequences:
            if not isinstance(q.fields, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                         for k, v in q.fields.items()):
                raise bad(f"sequence {q.name!r} fields must map names to table names")
        if self.merge_mode not in MERGE_MODES:
            raise bad(f"merge_mode must be one of {MERGE_MODES}, got {self.merge_mode!r}")
        for name, t in self.tables.items():
            if t.name != name:
                raise bad(f"table key {name!r} does not match its name {t.name!r}")
            if t.size < 1 or t.dim < 1:
                raise bad(f"table {name!r} needs size >= 1 and dim >= 1")
            if t.tokens is not None and len(t.tokens) != t.size:
                raise bad(f"table {name!r} has {len(t.tokens)} tokens but size {t.size}")
        seen: set[str] = set()
        for f in self.features:
            if f.name in seen:
                raise bad(f"feature {f.name!r} declared twice")
            seen.add(f.name)
            if f.kind not in KINDS:
                raise bad(f"feature {f.name!r}: kind must be one of {KINDS}, got {f.kind!r}")
            if f.group not in GROUPS:
                raise bad(f"feature {f.name!r}: group must be one of {GROUPS}, got {f.group!r}")
            if f.kind in ("categorical", "multihot") and f.table not in self.tables:
                raise bad(f"feature {f.name!r} uses unknown table {f.table!r}")
            if f.kind == "multihot" and f.max_len < 1:
                raise bad(f"feature {f.name!r}: max_len must be >= 1")
            if f.kind == "dense" and f.dim < 1:
                raise bad(f"feature {f.name!r}: dim must be >= 1")
        if not self.features:
            raise bad("at least one non-sequential feature is needed")
        if not self.sequences:
            raise bad("at least one behaviour sequence is needed")
        names = [s.name for s in self.sequences]
        if len(set(names)) != len(names):
            raise bad(f"sequence names must be unique, got {names}")
        field_tables: dict[str, str] = {}
        for s in self.sequences:
            if not s.fields:
                raise bad(f"sequence {s.name!r} has no fields")
            for fname, tname in s.fields.items():
                if tname not in self.tables:
                    raise bad(f"sequence {s.name!r} field {fname!r} uses unknown table {tname!r}")
                if field_tables.setdefault(fname, tname) != tname:
                    raise bad(f"field {fname!r} maps to two tables across sequences")
                if fname in ("type", "length"):
                    raise bad(f"sequence field name {fname!r} is reserved")

    def to_dict(self) -> dict:
        return {
            "max_history": self.max_history,
            "merge_mode": self.merge_mode,
            "tables": [t.to_dict() for t in self.tables.values()],
            "features": [f.to_dict() for f in self.features],
            "sequences": [s.to_dict() for s in self.sequences],
        }

    @classmethod
    def from_dict(cls, d: Any) -> "FeatureSchema":
        if not isinstance(d, dict):
            raise ConfigError("feature schema: expected a JSON object")
        try:
            tables = {}
            for t in d["tables"]:
                tokens = t.get("tokens")
                tables[t["name"]] = Table(
                    name=str(t["name"]), size=int(t["size"]), dim=int(t["dim"]),
                    tokens=[str(x) for x in tokens] if tokens is not None else None,
                )
            features = [
                Feature(
                    name=str(f["name"]), kind=str(f["kind"]), group=str(f["group"]),
                    table=f.get("table"), max_len=int(f.get("max_len", 1)),
                    dim=int(f.get("dim", 1)),
                )
                for f in d["features"]
            ]
            sequences = [
                Sequence(name=str(s["name"]), fields={str(k): str(v) for k, v in s["fields"].items()})
                for s in d["sequences"]
            ]
            return cls(
                tables=tables, features=features, sequences=sequences,
                max_history=int(d["max_history"]),
                merge_mode=str(d.get("merge_mode", "timestamp_aware")),
            )
        except ConfigError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as e:
            raise ConfigError(f"feature schema: malformed ({type(e).__name__}: {e})") from None
