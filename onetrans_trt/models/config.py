"""Model configuration: architecture + feature schema, stored as ``config.json``."""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from onetrans_trt.data.schema import FeatureSchema
from onetrans_trt.errors import ConfigError

FAMILIES = ("onetrans", "hyformer", "baseline")
SEQ_ENCODERS = ("transformer", "longer", "swiglu")
NS_TOKENIZERS = ("auto_split", "group")

# Architecture presets. The schema comes from the data source; these set the sizes.
PRESETS: dict[str, dict[str, Any]] = {
    # seconds to train; for tests
    "tiny": dict(d_model=16, n_heads=2, n_layers=2, ffn_mult=2, ns_tokens=3, final_queries=4),
    # the demo: trains on MovieLens-100K in a few minutes on 2 cores
    "small": dict(d_model=64, n_heads=4, n_layers=3, ffn_mult=2, ns_tokens=4, final_queries=16),
    # paper sizes (arXiv 2510.26104), for benchmarks with random weights
    "onetrans-s": dict(d_model=256, n_heads=4, n_layers=6, ffn_mult=4, ns_tokens=16, final_queries=12),
    "onetrans-l": dict(d_model=384, n_heads=6, n_layers=8, ffn_mult=4, ns_tokens=16, final_queries=16),
}

# HyFormer sizes. ``mixer_tokens`` (T) is the token count of query boosting: the J*N global
# queries (J sequences, N queries each) plus T - J*N auto-split NS-tokens; T divides d_model.
HYFORMER_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(d_model=16, n_heads=2, n_layers=2, ffn_mult=2, mixer_tokens=8, longer_window=8),
    "small": dict(d_model=64, n_heads=4, n_layers=3, ffn_mult=2, mixer_tokens=8, longer_window=16),
    # the paper's multi-sequence setting: 16 mixer tokens = 13 NS + 3 global (one per sequence)
    "hyformer-paper": dict(d_model=256, n_heads=4, n_layers=4, ffn_mult=4, mixer_tokens=16, longer_window=64),
}


@dataclass
class ModelConfig:
    schema: FeatureSchema
    family: str = "onetrans"
    d_model: int = 64
    n_heads: int = 4
    n_layers: int = 3
    ffn_mult: int = 2
    ns_tokenizer: str = "auto_split"
    ns_tokens: int = 4  # auto_split: number of NS-tokens
    ns_groups: list[list[str]] | None = None  # group: feature names per NS-token
    pyramid: str | list[int] = "linear"  # "linear", "off", or explicit S-query counts
    final_queries: int = 16  # linear pyramid: S-queries of the second-to-last layer
    # How the user encoder realizes the pyramid: "slice_first" computes queries only for the
    # kept S-tokens; "compute_then_slice" computes the whole layer and slices the kept tail
    # afterwards (as PyTorch code often does; the `pyramid` graph pass makes it lean).
    pyramid_impl: str = "slice_first"
    tasks: list[str] = field(default_factory=lambda: ["label"])
    tokenizer_hidden: int = 0  # 0: 2 * d_model
    head_hidden: int = 0  # 0: d_model
    preset: str | None = None
    # HyFormer only
    hy_queries: int = 1  # global query tokens per sequence (N)
    seq_encoder: str = "transformer"  # per-layer sequence encoder: transformer | longer | swiglu
    longer_window: int = 16  # LONGER-style: the newest S-tokens used as queries

    def __post_init__(self) -> None:
        self.validate()

    # ---- derived -------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def num_ns_tokens(self) -> int:
        if self.ns_tokenizer == "auto_split":
            return self.ns_tokens
        return len(self.resolved_ns_groups())

    def resolved_ns_groups(self) -> list[list[str]]:
        if self.ns_groups is not None:
            return [list(g) for g in self.ns_groups]
        groups = []
        for g in ("user", "item", "context"):
            names = [f.name for f in self.schema.features_in(g)]
            if names:
                groups.append(names)
        return groups

    def query_schedule(self) -> list[int | None]:
        """S-token queries kept by each layer (``None``: all of them).

        Layer ``l`` (0-based) keeps the newest ``schedule[l]`` S-tokens as queries; its
        K/V cover all S-tokens the previous layer kept. The last layer's S-queries are
        never used, so its entry is always 0 (it only contributes K/V).
        """
        n = self.n_layers
        if self.pyramid == "off":
            sched: list[int | None] = [None] * (n - 1)
        elif self.pyramid == "linear":
            l0 = self.schema.s_max_len
            fin = min(self.final_queries, l0)
            sched = [round(l0 + (fin - l0) * (i + 1) / (n - 1)) for i in range(n - 1)] if n > 1 else []
        else:
            sched = list(self.pyramid)[: n - 1]
        return sched + [0]

    # ---- validation and (de)serialization ------------------------------------------
    def validate(self) -> None:
        def bad(msg: str) -> ConfigError:
            return ConfigError(f"model config: {msg}")

        if self.family not in FAMILIES:
            raise bad(f"family must be one of {FAMILIES}, got {self.family!r}")
        for name, most in (("d_model", 1 << 16), ("n_heads", 1024), ("n_layers", 1024), ("ffn_mult", 64),
                           ("final_queries", 1 << 20), ("hy_queries", 1024), ("longer_window", 1 << 20)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= most:
                raise bad(f"{name} must be an integer in 1..{most}, got {str(v)[:40]!r}")
        for name in ("tokenizer_hidden", "head_hidden"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 1 << 20:
                raise bad(f"{name} must be an integer in 0..{1 << 20} (0: default), got {str(v)[:40]!r}")
        if self.ns_tokenizer == "auto_split" and (isinstance(self.ns_tokens, bool) or
                                                  not isinstance(self.ns_tokens, int) or not 1 <= self.ns_tokens <= 4096):
            raise bad(f"ns_tokens must be an integer in 1..4096, got {str(self.ns_tokens)[:40]!r}")
        if not isinstance(self.tasks, list) or not all(isinstance(t, str) and t for t in self.tasks):
            raise bad("tasks must be a list of names")
        if self.d_model % self.n_heads:
            raise bad(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if self.ns_tokenizer not in NS_TOKENIZERS:
            raise bad(f"ns_tokenizer must be one of {NS_TOKENIZERS}, got {self.ns_tokenizer!r}")
        if self.ns_tokenizer == "auto_split" and (not isinstance(self.ns_tokens, int) or self.ns_tokens < 1):
            raise bad(f"ns_tokens must be a positive integer, got {self.ns_tokens!r}")
        if self.ns_tokenizer == "group":
            names = {f.name for f in self.schema.features}
            groups = self.resolved_ns_groups()
            if not groups:
                raise bad("group tokenizer needs at least one group")
            for g in groups:
                if not g:
                    raise bad("an NS group is empty")
                for n in g:
                    if n not in names:
                        raise bad(f"NS group names unknown feature {n!r}")
        if isinstance(self.pyramid, str):
            if self.pyramid not in ("linear", "off"):
                raise bad(f"pyramid must be 'linear', 'off' or a list of counts, got {self.pyramid!r}")
        else:
            p = list(self.pyramid)
            if len(p) < self.n_layers - 1 or any((not isinstance(x, int)) or x < 1 for x in p):
                raise bad(f"pyramid list needs {self.n_layers - 1} positive counts, got {p}")
            if any(b > a for a, b in zip(p, p[1:])):
                raise bad(f"pyramid counts must not increase, got {p}")
        if self.pyramid_impl not in ("slice_first", "compute_then_slice"):
            raise bad(f"pyramid_impl must be 'slice_first' or 'compute_then_slice', got {self.pyramid_impl!r}")
        if not isinstance(self.final_queries, int) or self.final_queries < 1:
            raise bad("final_queries must be a positive integer")
        if self.family == "hyformer":
            if not isinstance(self.hy_queries, int) or self.hy_queries < 1:
                raise bad(f"hy_queries must be a positive integer, got {self.hy_queries!r}")
            if self.seq_encoder not in SEQ_ENCODERS:
                raise bad(f"seq_encoder must be one of {SEQ_ENCODERS}, got {self.seq_encoder!r}")
            if not isinstance(self.longer_window, int) or self.longer_window < 1:
                raise bad(f"longer_window must be a positive integer, got {self.longer_window!r}")
            t = self.schema.num_sequences * self.hy_queries + self.num_ns_tokens
            if self.d_model % t:
                raise bad(f"HyFormer query boosting splits each token into T = sequences x hy_queries + "
                          f"NS-tokens = {t} chunks; d_model ({self.d_model}) must be divisible by it")
        if not self.tasks or len(set(self.tasks)) != len(self.tasks):
            raise bad(f"tasks must be a non-empty list of unique names, got {self.tasks}")

    def to_dict(self) -> dict:
        d = {f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self) if f.name != "schema"}
        d["schema"] = self.schema.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: Any) -> "ModelConfig":
        if not isinstance(d, dict):
            raise ConfigError("model config: expected a JSON object")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"model config: unknown keys {unknown}")
        if "schema" not in d:
            raise ConfigError("model config: missing 'schema'")
        kw = dict(d)
        kw["schema"] = FeatureSchema.from_dict(d["schema"])
        try:
            return cls(**kw)
        except TypeError as e:
            raise ConfigError(f"model config: {e}") from None

    @classmethod
    def from_preset(cls, preset: str, schema: FeatureSchema, **overrides: Any) -> "ModelConfig":
        table = HYFORMER_PRESETS if overrides.get("family") == "hyformer" else PRESETS
        if preset not in table:
            raise ConfigError(f"unknown preset {preset!r} for {overrides.get('family', 'onetrans')}; "
                              f"choose one of {sorted(table)}")
        kw = dict(table[preset])
        if "mixer_tokens" in kw:  # HyFormer: NS-tokens fill the mixer up to T
            t = kw.pop("mixer_tokens")
            n_q = schema.num_sequences * overrides.get("hy_queries", 1)
            if t - n_q < 1:
                raise ConfigError(f"preset {preset!r}: {t} mixer tokens leave no NS-token for "
                                  f"{n_q} global queries")
            kw["ns_tokens"] = t - n_q
        kw.update(overrides)
        return cls(schema=schema, preset=preset, **kw)


def read_config(directory) -> "ModelConfig":
    """``config.json`` of a checkpoint or build directory (no torch needed)."""
    import json
    from pathlib import Path

    from onetrans_trt.errors import CheckpointError

    d = Path(directory)
    path = d / "config.json"
    if not d.is_dir():
        raise CheckpointError(f"{d}: not a checkpoint directory (it does not exist)")
    if not path.exists() and not path.is_symlink():
        raise CheckpointError(f"{d}: missing config.json; is this a checkpoint directory?")
    from onetrans_trt.io import NotRegular, TooBig, read_regular_file

    try:
        raw = json.loads(read_regular_file(path, 16 << 20).decode("utf-8"))
    except TooBig as e:
        raise CheckpointError(f"{path}: {e.size} bytes is too big for a config") from None
    except NotRegular:
        raise CheckpointError(f"{path}: not a regular file (a device, pipe or socket)") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({str(e)[:120]})") from None
    except (ValueError, UnicodeDecodeError, RecursionError) as e:  # bad JSON, deep nesting, 5,000-digit ints
        raise CheckpointError(f"{path}: not valid JSON ({str(e)[:120]})") from None
    try:
        return ModelConfig.from_dict(raw)
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from None


__all__ = ["ModelConfig", "PRESETS", "asdict", "read_config"]
