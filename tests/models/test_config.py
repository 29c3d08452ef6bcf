"""``ModelConfig`` and its ``config.json``: byte-identical output, pydantic-checked input.

The goldens under ``tests/data/`` were written by the code before the config and the feature
schema were checked by pydantic models: ``golden_tiny_movielens_config.json`` is the tiny
preset's ``config.json`` on the MovieLens schema (as ``save_checkpoint`` writes it) and
``golden_config_sha256.json`` holds the sha256 of ``to_dict()`` (sorted and as written) of every
preset on MovieLens and on the synthetic schemas the tests build.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from onetrans_trt.models.config import HYFORMER_PRESETS, PRESETS, ModelConfig

DATA = Path(__file__).resolve().parents[1] / "data"
GOLDEN_TINY = DATA / "golden_tiny_movielens_config.json"
GOLDEN_SHA = DATA / "golden_config_sha256.json"


def _written(cfg: ModelConfig) -> str:
    """``config.json`` as ``save_checkpoint`` and ``export_build`` write it."""
    return json.dumps(cfg.to_dict(), indent=2) + "\n"


def _sorted(cfg: ModelConfig) -> str:
    return json.dumps(cfg.to_dict(), sort_keys=True)


def _token_schema():
    """The synthetic schema with every table keyed by string tokens (tests/data/test_requests.py)."""
    from onetrans_trt.data.schema import FeatureSchema, Table
    from onetrans_trt.data.synthetic import synthetic_schema

    s = synthetic_schema(max_history=64)
    tables = {n: Table(n, t.size, t.dim, tokens=[f"{n}-{i}" for i in range(t.size)]) for n, t in s.tables.items()}
    return FeatureSchema(tables, s.features, s.sequences, s.max_history, s.merge_mode)


def golden_cases(movielens) -> dict[str, ModelConfig]:
    from onetrans_trt.data.movielens import TASKS, MovieLens
    from onetrans_trt.data.synthetic import synthetic_schema

    tasks = list(TASKS)
    schemas = {"movielens": movielens.schema,
               "movielens-agnostic": MovieLens(merge_mode="timestamp_agnostic", fetch=False).schema,
               "synthetic": synthetic_schema(),
               "synthetic-agnostic": synthetic_schema(merge_mode="timestamp_agnostic", max_history=10),
               "synthetic-1seq": synthetic_schema(max_history=8, n_sequences=1, dense=False, context=False),
               "synthetic-3seq-8": synthetic_schema(max_history=8, n_sequences=3),
               "tokens": _token_schema()}
    cases: dict[str, ModelConfig] = {}
    for sname, s in schemas.items():
        for p in PRESETS:
            cases[f"onetrans/{p}/{sname}"] = ModelConfig.from_preset(p, s, tasks=tasks)
        for p in HYFORMER_PRESETS:
            cases[f"hyformer/{p}/{sname}"] = ModelConfig.from_preset(p, s, family="hyformer", tasks=tasks)
        cases[f"baseline/tiny/{sname}"] = ModelConfig.from_preset("tiny", s, family="baseline", tasks=tasks)
        cases[f"onetrans/group/{sname}"] = ModelConfig.from_preset("tiny", s, ns_tokenizer="group")
        cases[f"onetrans/options/{sname}"] = ModelConfig.from_preset(
            "small", s, pyramid=[6, 4, 2], pyramid_impl="compute_then_slice", tokenizer_hidden=24, head_hidden=8,
            tasks=["a", "b"])
        cases[f"onetrans/off/{sname}"] = ModelConfig.from_preset("tiny", s, pyramid="off", n_layers=3)
        groups = [[f.name for f in s.features][:2], [f.name for f in s.features][2:]]
        cases[f"onetrans/groups/{sname}"] = ModelConfig(schema=s, d_model=8, n_heads=2, ns_tokenizer="group",
                                                         ns_groups=groups, final_queries=3)
        for enc in ("longer", "swiglu"):
            cases[f"hyformer/{enc}/{sname}"] = ModelConfig.from_preset("tiny", s, family="hyformer",
                                                                      seq_encoder=enc, longer_window=4)
    return cases


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def write_goldens(movielens) -> None:  # run once, on the code before the change
    from onetrans_trt.data.movielens import TASKS

    GOLDEN_TINY.write_text(_written(ModelConfig.from_preset("tiny", movielens.schema, tasks=list(TASKS))))
    shas = {k: {"sorted": _sha(_sorted(c)), "written": _sha(_written(c))} for k, c in golden_cases(movielens).items()}
    GOLDEN_SHA.write_text(json.dumps(shas, indent=1, sort_keys=True) + "\n")


def test_the_tiny_movielens_config_json_is_byte_identical(movielens):
    from onetrans_trt.data.movielens import TASKS

    cfg = ModelConfig.from_preset("tiny", movielens.schema, tasks=list(TASKS))
    golden = GOLDEN_TINY.read_text()
    assert _written(cfg) == golden
    again = ModelConfig.from_dict(json.loads(golden))
    assert _written(again) == golden and again == cfg
    assert _sorted(again) == json.dumps(json.loads(golden), sort_keys=True)


def test_every_golden_config_is_byte_identical_and_round_trips(movielens):
    shas = json.loads(GOLDEN_SHA.read_text())
    cases = golden_cases(movielens)
    assert sorted(cases) == sorted(shas)
    for name, cfg in cases.items():
        assert _sha(_sorted(cfg)) == shas[name]["sorted"], name
        assert _sha(_written(cfg)) == shas[name]["written"], name
        again = ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
        assert _sorted(again) == _sorted(cfg) and _written(again) == _written(cfg), name
        assert again == cfg, name
