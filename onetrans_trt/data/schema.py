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

import contextlib
from collections import Counter
from dataclasses import MISSING, dataclass, field, fields
from types import SimpleNamespace
from typing import Annotated, Any, Iterator, Literal, get_type_hints

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, model_validator

from onetrans_trt.contracts import one_line
from onetrans_trt.errors import ConfigError

PAD = 0
OOV = 1
GROUPS = ("user", "item", "context")
KINDS = ("categorical", "multihot", "dense")
MERGE_MODES = ("timestamp_aware", "timestamp_agnostic")


MAX_SIZE = 1 << 30  # rows of one table; bigger would not fit a float32 checkpoint anyway


def Int(least: int, most: int, what: str | None = None) -> Any:
    """An integer in ``least..most``: a field's type, its bounds in the JSON Schema (the models are
    strict: a bool, a float or a string is not an integer)."""
    return Annotated[int, Field(ge=least, le=most, description=what)]


# The classes below are dataclasses; their annotations (types and bounds) and defaults are also
# the pydantic models of their JSON (``json_model``: TableJSON, ..., SchemaJSON) that check them.
@dataclass
class Table:
    """An embedding vocabulary."""

    name: str
    size: Int(1, MAX_SIZE, "real values, excluding PAD (row 0) and OOV (row 1)")
    dim: Int(1, 1 << 16)
    tokens: list[str] | None = None  # the raw values in row order (2, 3, ...); size of them
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
    kind: Literal[KINDS]
    group: Literal[GROUPS]  # item features are per candidate
    table: str | None = None  # categorical / multihot
    max_len: Int(1, 1 << 16, "multihot: values kept per example") = 1
    dim: Int(1, 1 << 16, "dense: vector width") = 1

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
    fields: Annotated[dict[str, str], Field(min_length=1)]  # field name -> table name

    def to_dict(self) -> dict:
        return {"name": self.name, "fields": dict(self.fields)}


@dataclass
class FeatureSchema:
    """What a model reads: embedding tables, non-sequential features, behaviour sequences."""

    tables: dict[str, Table]
    features: list[Feature]
    sequences: list[Sequence]
    max_history: Int(1, 1 << 20, "the most events kept per user (newest kept)")
    merge_mode: Literal[MERGE_MODES] = "timestamp_aware"

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
        """Check the schema as :meth:`from_dict` checks its JSON (through :class:`SchemaJSON`)."""
        for name, kind in (("tables", dict), ("features", list), ("sequences", list)):
            if not isinstance(getattr(self, name), kind):
                raise ConfigError(f"feature schema: {name}: expected a {kind.__name__}, got "
                                  f"{type(getattr(self, name)).__name__}")
        raw = {"max_history": self.max_history, "merge_mode": self.merge_mode,
               "tables": [_fields_of(t, Table, f"tables[{k!r}]") for k, t in self.tables.items()],
               "features": [_fields_of(f, Feature, f"features[{i}]") for i, f in enumerate(self.features)],
               "sequences": [_fields_of(q, Sequence, f"sequences[{i}]") for i, q in enumerate(self.sequences)]}
        with refusing(raw, "feature schema"):
            SchemaJSON.model_validate(raw)
        for key, t in self.tables.items():
            if t.name != key:
                raise ConfigError(f"feature schema: tables[{key!r}]: key {key!r} does not match its name {t.name!r}")

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
        with refusing(d, "feature schema"):
            return cls._from_model(SchemaJSON.model_validate(d))

    @classmethod
    def _from_model(cls, m: Any) -> "FeatureSchema":
        """The schema a validated :class:`SchemaJSON` holds."""
        return cls({t.name: Table(**t.model_dump()) for t in m.tables}, [Feature(**f.model_dump()) for f in m.features],
                   [Sequence(**q.model_dump()) for q in m.sequences], m.max_history, m.merge_mode)


# ---- the JSON contract: pydantic models of the dataclasses' JSON ---------------------------
_SAY = {"missing": "malformed: {where} is missing", "list_type": "expected a list, got {type}",
        "dict_type": "expected an object, got {type}", "model_type": "expected an object, got {type}",
        "string_too_short": "expected a non-empty string", "invalid_key": "keys must be strings, got {input}"}


@contextlib.contextmanager
def refusing(data: Any, what: str, say: dict[str, str] | None = None) -> Iterator[None]:
    """A validation in the block that fails raises ``ConfigError("<what>: <field>: ...")``, about
    unknown keys first (a misspelt key is named before the key it misses)."""
    try:
        yield
    except ValidationError as e:
        first = sorted(e.errors(include_url=False), key=lambda x: x["type"] not in ("extra_forbidden", "invalid_key"))
        try:
            line = one_line(SimpleNamespace(errors=lambda **_: first), data, "", {**_SAY, **(say or {})})
        except RecursionError:  # a value nested too deep to be shown
            line = ".".join(map(str, first[0]["loc"])) + ": a value nested too deeply"
        raise ConfigError(f"{what}: {line}") from None


def _fields_of(obj: Any, cls: type, where: str) -> dict[str, Any]:
    """A dataclass's fields as the JSON object its model checks."""
    if not isinstance(obj, cls):
        raise ConfigError(f"feature schema: {where}: expected a {cls.__name__}, got {type(obj).__name__}")
    return {f.name: getattr(obj, f.name) for f in fields(cls) if not f.name.startswith("_")}


class _JSON(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


def json_model(dc: type, title: str, rules: type[BaseModel] = _JSON, **types: Any) -> Any:
    """The pydantic model of dataclass ``dc``'s JSON: its fields' types and defaults (``types``
    replaces some: ``name=(type, default)``, ``name_`` for ``name``), ``rules`` its cross-field rules."""
    hints = get_type_hints(dc, include_extras=True)
    spec = {f.name: (hints[f.name], ... if f.default is MISSING and f.default_factory is MISSING else
                     Field(default_factory=f.default_factory) if f.default is MISSING else f.default)
            for f in fields(dc) if f.name[0] != "_" and f.name not in types and f"{f.name}_" not in types}
    return create_model(f"{dc.__name__}JSON", __base__=rules, __doc__=dc.__doc__, __module__=dc.__module__,
                        __cls_kwargs__={"title": title}, **spec, **types)


class _SchemaRules(_JSON):
    @model_validator(mode="after")
    def _whole(self) -> Any:
        tables = {t.name for t in self.tables}
        for what, items in (("table", self.tables), ("feature", self.features), ("sequence", self.sequences)):
            twice = [n for n, k in Counter(x.name for x in items).items() if k > 1]
            if twice:
                raise ValueError(f"{what} {twice[0]!r} declared twice")
        for i, t in enumerate(self.tables):
            if t.tokens is not None and len(t.tokens) != t.size:
                raise ValueError(f"tables[{i}]: table {t.name!r} has {len(t.tokens)} tokens but size {t.size}")
        for i, f in enumerate(self.features):
            if f.kind != "dense" and f.table not in tables:
                raise ValueError(f"features[{i}].table: feature {f.name!r} uses unknown table {f.table!r}")
        field_tables: dict[str, str] = {}
        for i, q in enumerate(self.sequences):
            for name, table in q.fields.items():
                where = f"sequences[{i}].fields.{name}: "
                if table not in tables:
                    raise ValueError(f"{where}sequence {q.name!r} field {name!r} uses unknown table {table!r}")
                if field_tables.setdefault(name, table) != table:
                    raise ValueError(f"{where}field {name!r} maps to two tables across sequences")
                if name in ("type", "length"):
                    raise ValueError(f"{where}sequence field name {name!r} is reserved")
        return self


TableJSON = json_model(Table, "Table")
FeatureJSON = json_model(Feature, "Feature")
SequenceJSON = json_model(Sequence, "Sequence")
SchemaJSON = json_model(FeatureSchema, "FeatureSchema", _SchemaRules, tables=(list[TableJSON], ...),
                        features=(Annotated[list[FeatureJSON], Field(min_length=1)], ...),
                        sequences=(Annotated[list[SequenceJSON], Field(min_length=1)], ...))
