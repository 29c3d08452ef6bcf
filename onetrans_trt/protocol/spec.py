"""The split spec: what a ranker's inputs are, which side reads each, and what the user state is.

A user's ranker follows the split protocol (``onetrans_trt.protocol``) and describes itself
with a :class:`SplitSpec` (a Python object or a JSON file of the same fields). The spec is
what lets the toolkit trace both graphs with the right dynamic dimensions, make random
inputs for the proofs, and find the per-layer K/V for the graph passes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from onetrans_trt.errors import ConfigError

Dim = Union[int, str]
NAMED_DIMS = ("users", "candidates", "history")
DTYPES = ("float32", "float16", "bfloat16", "int64", "int32", "bool")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class InputSpec(_Strict):
    name: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    side: Literal["user", "candidate"]
    dtype: Literal[DTYPES]  # type: ignore[valid-type]
    shape: list[Dim]
    role: Literal["history_length"] | None = None
    low: float | None = None  # random values: integers in [low, high); floats ~ N(0, 1) when unset
    high: float | None = None

    @field_validator("shape")
    @classmethod
    def _shape(cls, v: list[Dim]) -> list[Dim]:
        for d in v:
            if isinstance(d, bool) or (isinstance(d, int) and not 0 < d <= 1 << 20):
                raise ValueError(f"static dimension {d!r} must be a positive int")
            if isinstance(d, str) and not d.replace("_", "").isalnum():
                raise ValueError(f"dimension name {d!r} must be an identifier")
        return v

    @model_validator(mode="after")
    def _batch(self) -> "InputSpec":
        lead = "users" if self.side == "user" else "candidates"
        if not self.shape or self.shape[0] != lead:
            raise ValueError(f"a {self.side} input's first dimension must be {lead!r}")
        if self.role == "history_length" and (self.side != "user" or self.shape != ["users"]
                                              or self.dtype not in ("int64", "int32")):
            raise ValueError("the history_length input must be a user-side int64/int32 of shape ['users']")
        if "history" in self.shape and self.side != "user":
            raise ValueError("only user inputs have a 'history' dimension")
        if self.low is not None and self.high is not None and not self.low < self.high:
            raise ValueError("low must be < high")
        return self


class StateSpec(_Strict):
    name: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    kind: Literal["key", "value", "other"]
    layer: int | None = Field(default=None, ge=0, le=4096)
    layout: Literal["BHLD", "BLHD"] = "BHLD"


class HistorySpec(_Strict):
    max: int = Field(ge=1, le=1 << 20)
    padding: Literal["left", "right"] = "left"


class SplitSpec(_Strict):
    name: str = "model"
    inputs: list[InputSpec]
    state: list[StateSpec]
    tasks: list[str] = Field(min_length=1)
    history: HistorySpec
    dims: dict[str, tuple[int, int, int]] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _consistent(self) -> "SplitSpec":
        names = [i.name for i in self.inputs] + [s.name for s in self.state]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"names used twice: {dup}")
        if not any(i.side == "user" for i in self.inputs) or not any(i.side == "candidate" for i in self.inputs):
            raise ValueError("a split needs at least one user input and one candidate input")
        if sum(i.role == "history_length" for i in self.inputs) > 1:
            raise ValueError("at most one input can have role history_length")
        layers: dict[int, set[str]] = {}
        for s in self.state:
            if s.kind == "other":
                if s.layer is not None:
                    raise ValueError(f"state {s.name}: only key/value state has a layer")
                continue
            if s.layer is None:
                raise ValueError(f"state {s.name}: a {s.kind} needs its layer")
            if s.kind in layers.setdefault(s.layer, set()):
                raise ValueError(f"layer {s.layer} has two {s.kind} tensors")
            layers[s.layer].add(s.kind)
        unpaired = sorted(l for l, k in layers.items() if k != {"key", "value"})
        if unpaired:
            raise ValueError(f"layers {unpaired} need both a key and a value state tensor")
        for k, (lo, typ, hi) in self.dims.items():
            if not 1 <= lo <= typ <= hi:
                raise ValueError(f"dims.{k}: need 1 <= min <= typical <= max")
        return self

    # ---- views
    def side(self, side: str) -> list[InputSpec]:
        return [i for i in self.inputs if i.side == side]

    @property
    def history_length(self) -> InputSpec | None:
        return next((i for i in self.inputs if i.role == "history_length"), None)

    @property
    def kv_layers(self) -> list[int]:
        return sorted({s.layer for s in self.state if s.kind != "other"})

    def graph_name(self, state: str) -> str:
        """The graph name a state tensor gets: ``user_k_<i>``/``user_v_<i>`` for the i-th K/V
        pair (what the graph passes look for), ``user_<name>`` for the rest."""
        s = next(x for x in self.state if x.name == state)
        if s.kind == "other":
            return f"user_{s.name}"
        return f"user_{'k' if s.kind == 'key' else 'v'}_{self.kv_layers.index(s.layer)}"

    def kv_axis(self, state: str) -> int:
        s = next(x for x in self.state if x.name == state)
        return 2 if s.layout == "BHLD" else 1

    def dim_range(self, name: str) -> tuple[int, int, int]:
        if name in self.dims:
            return tuple(self.dims[name])
        if name == "history":
            return (1, self.history.max, self.history.max)
        return {"users": (1, 1, 64), "candidates": (1, 128, 1024)}.get(name, (1, 64, 4096))

    def to_json(self) -> dict[str, Any]:
        return json.loads(self.model_dump_json(exclude_none=True))

    # ---- loading
    @classmethod
    def parse(cls, data: Any, where: str = "spec") -> "SplitSpec":
        if isinstance(data, SplitSpec):
            return data
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            first = e.errors()[0]
            loc = ".".join(str(x) for x in first["loc"]) or "(top level)"
            raise ConfigError(f"{where}: {loc}: {first['msg']} ({len(e.errors())} problem(s); "
                              "see the README's 'Your own model' for the spec's fields)") from None

    @classmethod
    def from_file(cls, path: str | Path) -> "SplitSpec":
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"--spec {path}: no such file")
        if path.stat().st_size > 1 << 20:
            raise ConfigError(f"--spec {path}: over 1 MiB; not a split spec")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            raise ConfigError(f"--spec {path}: not valid JSON ({str(e)[:120]})") from None
        return cls.parse(data, f"--spec {path}")
