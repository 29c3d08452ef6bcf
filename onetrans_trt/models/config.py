"""Model configuration: architecture + feature schema, stored as ``config.json``."""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field, fields
from typing import Annotated, Any, Literal

from pydantic import Discriminator, Field, Tag, model_validator

from onetrans_trt.data.schema import _JSON, FeatureSchema, Int, SchemaJSON, json_model, refusing
from onetrans_trt.errors import ConfigError

FAMILIES = ("onetrans", "hyformer", "baseline")
SEQ_ENCODERS = ("transformer", "longer", "swiglu")
NS_TOKENIZERS = ("auto_split", "group")
SEQ_ATTENTION = ("bidirectional", "causal")
# all_pools: N FFNs per sequence over concat(NS tokens, every sequence's mean pool), each giving one
# query (HyFormer §3.2); own_pool: one FFN per sequence over concat(NS tokens, its own pool) -> N queries
QUERY_GENS = ("all_pools", "own_pool")
HEAD_INPUTS = ("queries_ns", "queries")  # the final global queries and NS tokens, or the queries only
# The HyFormer options as the first release built them (before the paper-literal form became the
# default): a config without these keys is one of those checkpoints and loads with these values.
HYFORMER_WAVE1: dict[str, Any] = dict(seq_attention="causal", hy_sink=True, hy_kv_norm=True, hy_query_gen="own_pool",
                                      hy_head_input="queries")
# Keys only a HyFormer config writes (a OneTrans or baseline config.json stays as it was)
HYFORMER_ONLY = (*HYFORMER_WAVE1, "seq_queries", "seq_encoders", "seq_windows", "seq_max_len")
HYFORMER_FORMS: dict[str, dict[str, Any]] = {
    "paper": dict(seq_attention="bidirectional", hy_sink=False, hy_kv_norm=False, hy_query_gen="all_pools",
                  hy_head_input="queries_ns"),
    "wave1": HYFORMER_WAVE1,
}

# Architecture presets. The schema comes from the data source; these set the sizes.
PRESETS: dict[str, dict[str, Any]] = {
    # seconds to train; for tests
    "tiny": dict(d_model=16, n_heads=2, n_layers=2, ffn_mult=2, ns_tokens=3, final_queries=4),
    # the demo: trains on MovieLens-100K in a few minutes on 2 cores
    "small": dict(d_model=64, n_heads=4, n_layers=3, ffn_mult=2, ns_tokens=4, final_queries=16),
    # paper sizes (arXiv 2510.26104), for benchmarks with random weights
    "onetrans-s": dict(d_model=256, n_heads=4, n_layers=6, ffn_mult=4, ns_tokens=16, final_queries=12),
    "onetrans-l": dict(d_model=384, n_heads=4, n_layers=8, ffn_mult=4, ns_tokens=16, final_queries=16),
}

# HyFormer sizes. ``mixer_tokens`` (T) is the token count of query boosting: the J*N global
# queries (J sequences, N queries each) plus T - J*N auto-split NS-tokens; T divides d_model.
HYFORMER_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(d_model=16, n_heads=2, n_layers=2, ffn_mult=2, mixer_tokens=8, longer_window=8),
    # LONGER-style sequence encoders, as the paper's model (the newest `longer_window` tokens go on past
    # layer 0): 2.4x less work per step than full-length ones on MovieLens, like-AUC within 0.003
    # (LONGER's self-attention is causal, arXiv 2505.04421, so these presets say so)
    "small": dict(d_model=64, n_heads=4, n_layers=3, ffn_mult=2, mixer_tokens=8, longer_window=16,
                  seq_encoder="longer", seq_attention="causal"),
    # the paper's multi-sequence setting: 16 mixer tokens = 13 NS + 3 global (one per sequence); each
    # layer LONGER-style sequence encoding then RankMixer-style boosting; sized to the paper's 418M dense
    # parameters (Table 1): 413.3M on the MovieLens schema (d=512, 8 layers; d=448 or 7 layers: 317M/367M)
    "hyformer-paper": dict(d_model=512, n_heads=4, n_layers=8, ffn_mult=4, mixer_tokens=16, longer_window=64,
                           seq_encoder="longer", seq_attention="causal"),
}


# The presets that stand for a paper's model: a config naming one must have its sizes
# (heads change no weight shape, so a wrong head count would load and compute garbage).
PAPER_PRESETS = ("onetrans-s", "onetrans-l", "hyformer-paper")
SIZE_KEYS = ("d_model", "n_heads", "n_layers", "ffn_mult")
# What the papers report for them: dense parameters (sparse embedding tables excluded), and where.
PAPER_FIGURES: dict[str, dict[str, Any]] = {
    "onetrans-s": {"dense_parameters": 91_000_000, "source": "OneTrans (arXiv 2510.26104) Table 2: 91M"},
    "onetrans-l": {"dense_parameters": 330_000_000, "source": "OneTrans (arXiv 2510.26104) Table 2: 330M"},
    "hyformer-paper": {"dense_parameters": 418_000_000, "source": "HyFormer (arXiv 2601.12681) Table 1: 418M"},
}


def preset_sizes(preset: str | None, family: str) -> dict[str, int] | None:
    """The sizes a config claiming ``preset`` must have (None: it claims no paper preset)."""
    if preset not in PAPER_PRESETS:
        return None
    table = HYFORMER_PRESETS if family == "hyformer" else PRESETS
    if preset not in table:
        return {}
    return {k: table[preset][k] for k in SIZE_KEYS if k in table[preset]}


# "linear", "off", or explicit S-query counts (said apart by type: an error names the right one)
Pyramid = Annotated[Annotated[Literal["linear", "off"], Tag("name")] | Annotated[list[Int(1, 1 << 20)], Tag("counts")],
                    Discriminator(lambda v: "name" if isinstance(v, str) else "counts")]


@dataclass
class ModelConfig:
    """A model's architecture and the feature schema it reads (a checkpoint's config.json)."""

    schema: FeatureSchema
    family: Literal[FAMILIES] = "onetrans"
    d_model: Int(1, 1 << 16, "token width; n_heads divides it") = 64
    n_heads: Int(1, 1024) = 4
    n_layers: Int(1, 1024) = 3
    ffn_mult: Int(1, 64) = 2
    ns_tokenizer: Literal[NS_TOKENIZERS] = "auto_split"
    ns_tokens: Int(1, 4096, "auto_split: the number of NS-tokens") = 4
    ns_groups: list[list[str]] | None = None  # group: feature names per NS-token (None: user/item/context)
    pyramid: Pyramid = "linear"  # or the S-queries each layer but the last keeps (none increasing)
    final_queries: Int(1, 1 << 20, "linear pyramid: S-queries of the second-to-last layer") = 16
    # How the user encoder realizes the pyramid: "slice_first" computes queries only for the
    # kept S-tokens; "compute_then_slice" computes the whole layer and slices the kept tail
    # afterwards (as PyTorch code often does; the `pyramid` graph pass makes it lean).
    pyramid_impl: Literal["slice_first", "compute_then_slice"] = "slice_first"
    tasks: Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1)] = field(
        default_factory=lambda: ["label"])  # unique names, a score each
    tokenizer_hidden: Int(0, 1 << 20, "0: 2 * d_model") = 0
    head_hidden: Int(0, 1 << 20, "0: d_model") = 0
    preset: str | None = None
    # HyFormer only
    hy_queries: Int(1, 1024, "HyFormer: global query tokens per sequence (N)") = 1
    seq_encoder: Literal[SEQ_ENCODERS] = "transformer"  # per-layer sequence encoder
    longer_window: Int(1, 1 << 20, "HyFormer longer: the newest S-tokens used as queries") = 16
    # HyFormer: the paper's form (the defaults) or the first release's (HYFORMER_WAVE1); a config
    # written before these keys existed lacks them and loads as the first release's (from_dict).
    seq_attention: Literal[SEQ_ATTENTION] = "bidirectional"  # transformer/longer self-attention
    hy_sink: bool = False  # a learned sink key/value per head in query decoding
    hy_kv_norm: bool = False  # an RMSNorm before each layer's K/V projection
    hy_query_gen: Literal[QUERY_GENS] = "all_pools"  # how the global queries are generated
    hy_head_input: Literal[HEAD_INPUTS] = "queries_ns"  # what the task heads read
    # HyFormer per sequence (one entry per schema sequence, in its order; None: the global value
    # above for every sequence): query count N_j, encoder, LONGER window, and the most events kept
    # (the newest; the sequence is laid out at that width, so a cap is also less work)
    seq_queries: list[Int(1, 1024)] | None = None
    seq_encoders: list[Literal[SEQ_ENCODERS]] | None = None
    seq_windows: list[Int(1, 1 << 20)] | None = None
    seq_max_len: list[Int(1, 1 << 20)] | None = None

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

    def hy_seq(self, j: int) -> dict[str, Any]:
        """HyFormer sequence ``j``'s own settings: ``queries``, ``encoder``, ``window``, ``max_len``
        (``max_len`` None: every event the stream keeps)."""
        return {"queries": self.seq_queries[j] if self.seq_queries else self.hy_queries,
                "encoder": self.seq_encoders[j] if self.seq_encoders else self.seq_encoder,
                "window": self.seq_windows[j] if self.seq_windows else self.longer_window,
                "max_len": self.seq_max_len[j] if self.seq_max_len else None}

    @property
    def hy_total_queries(self) -> int:
        """HyFormer: global queries over all sequences (sum of N_j)."""
        return sum(self.hy_seq(j)["queries"] for j in range(self.schema.num_sequences))

    # ---- validation and (de)serialization ------------------------------------------
    def validate(self) -> None:
        """Check the config as :meth:`from_dict` checks its JSON (through :class:`ConfigJSON`)."""
        if not isinstance(self.schema, FeatureSchema):
            raise ConfigError(f"model config: schema: expected a FeatureSchema, got {type(self.schema).__name__}")
        raw = {**{f.name: getattr(self, f.name) for f in fields(self)}, "schema": self.schema.to_dict()}
        with refusing(raw, "model config", _SAY):
            ConfigJSON.model_validate(raw)

    def to_dict(self) -> dict:
        d = {f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self) if f.name != "schema"
             and (self.family == "hyformer" or f.name not in HYFORMER_ONLY)}  # HyFormer's form: its own
        d["schema"] = self.schema.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: Any) -> "ModelConfig":
        if isinstance(d, dict) and d.get("family") == "hyformer" and not any(k in d for k in HYFORMER_WAVE1):
            d = {**d, **HYFORMER_WAVE1}  # written before the paper form existed: a wave-1 HyFormer
        with refusing(d, "model config", _SAY):
            m = ConfigJSON.model_validate(d)
        return cls(schema=FeatureSchema._from_model(m.schema_),
                   **{k: getattr(m, k) for k in ConfigJSON.model_fields if k != "schema_"})

    @classmethod
    def from_preset(cls, preset: str, schema: FeatureSchema, **overrides: Any) -> "ModelConfig":
        table = HYFORMER_PRESETS if overrides.get("family") == "hyformer" else PRESETS
        if preset not in table:
            raise ConfigError(f"unknown preset {preset!r} for {overrides.get('family', 'onetrans')}; "
                              f"choose one of {sorted(table)}")
        kw = dict(table[preset])
        if "mixer_tokens" in kw:  # HyFormer: NS-tokens fill the mixer up to T
            t = kw.pop("mixer_tokens")
            n_q = (sum(overrides["seq_queries"]) if overrides.get("seq_queries")
                   else schema.num_sequences * overrides.get("hy_queries", 1))
            if t - n_q < 1:
                raise ConfigError(f"preset {preset!r}: {t} mixer tokens leave no NS-token for "
                                  f"{n_q} global queries")
            kw["ns_tokens"] = t - n_q
        kw.update(overrides)
        claim = preset
        sizes = preset_sizes(preset, overrides.get("family", "onetrans"))
        if sizes and any(kw.get(k) != v for k, v in sizes.items()):
            claim = None  # resized: no longer the paper's model, so it does not claim to be
        return cls(schema=schema, preset=claim, **kw)


class _ConfigRules(_JSON):
    @model_validator(mode="after")
    def _whole(self) -> Any:
        s = self.schema_
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if self.ns_tokenizer == "group" and self.ns_groups is not None:  # (None: user/item/context)
            if not self.ns_groups:
                raise ValueError("ns_groups: the group tokenizer needs at least one group")
            for i, g in enumerate(self.ns_groups):
                unknown = sorted(set(g) - {f.name for f in s.features})
                if not g or unknown:
                    raise ValueError(f"ns_groups[{i}]: " + (f"names unknown feature {unknown[0]!r}" if g else
                                                            "an NS group is empty"))
        if isinstance(self.pyramid, list):
            if len(self.pyramid) < self.n_layers - 1:
                raise ValueError(f"pyramid: a list needs {self.n_layers - 1} counts (n_layers - 1), got {self.pyramid}")
            if any(b > a for a, b in zip(self.pyramid, self.pyramid[1:])):
                raise ValueError(f"pyramid: counts must not increase, got {self.pyramid}")
        if self.family == "hyformer":
            groups = len(self.ns_groups) if self.ns_groups is not None else len({f.group for f in s.features})
            for key in ("seq_queries", "seq_encoders", "seq_windows", "seq_max_len"):
                got = getattr(self, key)
                if got is not None and len(got) != len(s.sequences):
                    raise ValueError(f"{key}: one entry per sequence ({len(s.sequences)}: "
                                     f"{', '.join(q.name for q in s.sequences)}), got {len(got)}")
            nq = sum(self.seq_queries) if self.seq_queries else len(s.sequences) * self.hy_queries
            t = nq + (groups if self.ns_tokenizer == "group" else self.ns_tokens)
            if self.d_model % t:
                raise ValueError(f"HyFormer query boosting splits each token into T = global queries (sequences "
                                 f"x hy_queries, or the sum of seq_queries) + NS-tokens = {t} chunks; d_model "
                                 f"({self.d_model}) must be divisible by it")
        else:  # HyFormer's own settings: a OneTrans or baseline config never reads them, so never accepts them
            for key in HYFORMER_ONLY:
                if getattr(self, key) != type(self).model_fields[key].default:
                    raise ValueError(f"{key}: a HyFormer setting; a {self.family} config does not read it "
                                     f"(remove the key, or set family to hyformer)")
        sizes = preset_sizes(self.preset, self.family)
        if sizes == {}:
            raise ValueError(f"preset {self.preset!r} is not a {self.family} preset")
        for key, want in (sizes or {}).items():
            if getattr(self, key) != want:
                raise ValueError(f"preset {self.preset!r} has {key} = {want} (the paper's), this config {key} = "
                                 f"{getattr(self, key)}: a config naming a paper preset must have its sizes; set "
                                 f"\"preset\" to null for a custom model")
        if len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"tasks: names must be unique, got {self.tasks}")
        return self


ConfigJSON = json_model(ModelConfig, "ModelConfig", _ConfigRules,
                        schema_=(SchemaJSON, Field(alias="schema", description="the feature schema")))
_SAY = {"pyramid:list_type": "expected 'linear', 'off' or a list of counts, got {input}"}


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
