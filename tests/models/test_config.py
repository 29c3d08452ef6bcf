"""``ModelConfig`` and its ``config.json``: byte-identical output, pydantic-checked input.

The goldens under ``tests/data/`` were written by the code before the config and the feature
schema were checked by pydantic models: ``golden_tiny_movielens_config.json`` is the tiny
preset's ``config.json`` on the MovieLens schema (as ``save_checkpoint`` writes it) and
``golden_config_sha256.json`` holds the sha256 of ``to_dict()`` (sorted and as written) of every
preset on MovieLens and on the synthetic schemas the tests build.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import random
import time
from pathlib import Path

import numpy as np
import pytest

from onetrans_trt.errors import ConfigError
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


# ---- every rule: one ConfigError naming the field -------------------------------------------
def _tiny() -> dict:
    from onetrans_trt.data.synthetic import synthetic_schema

    return ModelConfig.from_preset("tiny", synthetic_schema(max_history=8)).to_dict()


RULES = [
    (lambda d: d.update(family="transformer"), "family: expected 'onetrans', 'hyformer' or 'baseline'"),
    (lambda d: d.update(d_model=0), "d_model: expected greater than or equal to 1, got 0"),
    (lambda d: d.update(d_model=(1 << 16) + 2), "d_model: expected less than or equal to 65536"),
    (lambda d: d.update(d_model=True), "d_model: expected a valid integer, got True"),
    (lambda d: d.update(d_model="16"), "d_model: expected a valid integer, got '16'"),
    (lambda d: d.update(d_model=16.0), "d_model: expected a valid integer, got 16.0"),
    (lambda d: d.update(d_model=10 ** 5000), "d_model: expected less than or equal to 65536, got an integer of "
                                             "thousands of digits"),
    (lambda d: d.update(n_heads=1025), "n_heads: expected less than or equal to 1024"),
    (lambda d: d.update(n_layers=0), "n_layers: expected greater than or equal to 1"),
    (lambda d: d.update(n_layers=1025), "n_layers: expected less than or equal to 1024"),
    (lambda d: d.update(ffn_mult=65), "ffn_mult: expected less than or equal to 64"),
    (lambda d: d.update(final_queries=0), "final_queries: expected greater than or equal to 1"),
    (lambda d: d.update(final_queries=(1 << 20) + 1), "final_queries: expected less than or equal to 1048576"),
    (lambda d: d.update(hy_queries=1025), "hy_queries: expected less than or equal to 1024"),
    (lambda d: d.update(longer_window=0), "longer_window: expected greater than or equal to 1"),
    (lambda d: d.update(tokenizer_hidden=-1), "tokenizer_hidden: expected greater than or equal to 0"),
    (lambda d: d.update(head_hidden=(1 << 20) + 1), "head_hidden: expected less than or equal to 1048576"),
    (lambda d: d.update(ns_tokens=4097), "ns_tokens: expected less than or equal to 4096"),
    (lambda d: d.update(ns_tokens=None), "ns_tokens: expected a valid integer, got None"),
    (lambda d: d.update(ns_tokenizer="split"), "ns_tokenizer: expected 'auto_split' or 'group'"),
    (lambda d: d.update(pyramid="triangle"), "pyramid: expected 'linear' or 'off', got 'triangle'"),
    (lambda d: d.update(pyramid=5), "pyramid: expected 'linear', 'off' or a list of counts, got 5"),
    (lambda d: d.update(pyramid=[3, 0]), "pyramid[1]: expected greater than or equal to 1, got 0"),
    (lambda d: d.update(pyramid=[True]), "pyramid[0]: expected a valid integer, got True"),
    (lambda d: d.update(pyramid=[]), "pyramid: a list needs 1 counts (n_layers - 1), got []"),
    (lambda d: d.update(pyramid=[2, 3], n_layers=3), "pyramid: counts must not increase, got [2, 3]"),
    (lambda d: d.update(pyramid_impl="lazy"), "pyramid_impl: expected 'slice_first' or 'compute_then_slice'"),
    (lambda d: d.update(tasks=[]), "tasks: expected at least 1 item(s), got []"),
    (lambda d: d.update(tasks="label"), "tasks: expected a list, got str"),
    (lambda d: d.update(tasks=["a", ""]), "tasks[1]: expected a non-empty string"),
    (lambda d: d.update(tasks=["a", 1]), "tasks[1]: expected a string, got int"),
    (lambda d: d.update(tasks=["a", "a"]), "tasks: names must be unique, got ['a', 'a']"),
    (lambda d: d.update(preset=7), "preset: expected a string, got int"),
    (lambda d: d.update(seq_encoder="lstm"), "seq_encoder: expected 'transformer', 'longer' or 'swiglu'"),
    (lambda d: d.update(n_heads=3), "d_model (16) must be divisible by n_heads (3)"),
    (lambda d: d.update(ns_tokenizer="group", ns_groups=[]), "ns_groups: the group tokenizer needs at least one "
                                                             "group"),
    (lambda d: d.update(ns_tokenizer="group", ns_groups=[["user_id"], []]), "ns_groups[1]: an NS group is empty"),
    (lambda d: d.update(ns_tokenizer="group", ns_groups=[["user_id", "nope"]]), "ns_groups[0]: names unknown "
                                                                                "feature 'nope'"),
    (lambda d: d.update(ns_groups="user_id"), "ns_groups: expected a list, got str"),
    (lambda d: d.update(ns_groups=[["user_id", 3]]), "ns_groups[0][1]: expected a string, got int"),
    (lambda d: d.update(family="hyformer", ns_tokens=2), "HyFormer query boosting splits each token into T = "
                                                         "global queries (sequences x hy_queries, or the sum of "
                                                         "seq_queries) + NS-tokens = 5 chunks; d_model (16)"),
    (lambda d: d.update(seq_encoders=[]), "seq_encoders: a HyFormer setting; a onetrans config does not read it"),
    (lambda d: d.update(hy_sink=True), "hy_sink: a HyFormer setting; a onetrans config does not read it"),
    (lambda d: d.update(family="hyformer", ns_tokenizer="group"), "NS-tokens = 6 chunks"),  # 3 sequences + 3 groups
    (lambda d: d.update(d_modle=16, zz=1), "unknown keys ['d_modle', 'zz']"),
    (lambda d: d.update(schema_=d.pop("schema")), "unknown keys ['schema_']"),
    (lambda d: d.pop("schema"), "malformed: schema is missing"),
    (lambda d: d.update(schema=[]), "schema: expected an object, got list"),
    (lambda d: d["schema"]["tables"][0].update(size=-1), "schema.tables[0].size: expected greater than or equal to 1"),
    (lambda d: d["schema"].update(bogus=1), "schema: unknown keys ['bogus']"),
    (lambda d: d["schema"]["features"][0].update(kind=None), "schema.features[0].kind: expected 'categorical'"),
    (lambda d: d["schema"]["sequences"][0]["fields"].update(type="item"), "schema: sequences[0].fields.type: "
                                                                         "sequence field name 'type' is reserved"),
]


@pytest.mark.parametrize("mutate,words", RULES, ids=[w.split(":")[0][:40] for _, w in RULES])
def test_every_rule_is_one_config_error_naming_the_field(mutate, words):
    d = _tiny()
    mutate(d)
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_dict(d)
    msg = str(e.value)
    assert msg.startswith("model config: ") and words in msg and "\n" not in msg, msg


def test_configs_built_in_python_are_checked_by_the_same_model():
    from onetrans_trt.data.synthetic import synthetic_schema

    s = synthetic_schema(max_history=8)
    cases = [
        (dict(d_model=0), "d_model: expected greater than or equal to 1, got 0"),
        (dict(d_model=np.int64(16)), "d_model: expected a valid integer"),
        (dict(n_heads=True), "n_heads: expected a valid integer, got True"),
        (dict(pyramid=(2, 1)), "pyramid: expected 'linear', 'off' or a list of counts, got (2, 1)"),
        (dict(tasks=("a",)), "tasks: expected a list, got tuple"),
        (dict(family="hyformer", d_model=16, n_heads=2, ns_tokens=5, seq_encoder="lstm"), "seq_encoder: expected"),
        (dict(ns_tokenizer="group", ns_groups=[["nope"]]), "ns_groups[0]: names unknown feature 'nope'"),
        (dict(schema=s.to_dict()), "schema: expected a FeatureSchema, got dict"),
        (dict(schema=None), "schema: expected a FeatureSchema, got NoneType"),
        (dict(d_model=10 ** 5000), "d_model: expected less than or equal to 65536, got an integer of thousands"),
    ]
    for kw, words in cases:
        with pytest.raises(ConfigError) as e:
            ModelConfig(**{"schema": s, **kw})
        msg = str(e.value)
        assert msg.startswith("model config: ") and words in msg and "\n" not in msg, (kw, msg)
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        ModelConfig.from_preset("huge", s)
    with pytest.raises(ConfigError, match="leave no NS-token"):
        ModelConfig.from_preset("tiny", synthetic_schema(n_sequences=8), family="hyformer")
    with pytest.raises(ConfigError, match="^model config: n_layers: expected greater than or equal to 1"):
        dataclasses.replace(ModelConfig(schema=s), n_layers=0)


def test_defaults_are_the_dataclass_defaults_and_the_schema_publishes_them():
    from onetrans_trt.data.synthetic import synthetic_schema
    from onetrans_trt.models.config import ConfigJSON

    s = synthetic_schema(max_history=8)
    assert ModelConfig.from_dict({"schema": s.to_dict()}) == ModelConfig(schema=s)
    props = ConfigJSON.model_json_schema()["properties"]
    assert props["d_model"]["default"] == 64 and props["d_model"]["maximum"] == 1 << 16
    assert props["pyramid"]["default"] == "linear" and ConfigJSON.model_json_schema()["required"] == ["schema"]


# ---- fuzz: hostile config dicts give ConfigError and nothing else -------------------------------
WEIRD = [None, True, False, 0, -1, 1, 2, 3, 16, 2 ** 31, 2 ** 63, -(2 ** 63), 10 ** 100, 1.5, 16.0, float("nan"),
         float("inf"), "", "x", "16", "linear", "group", "hyformer", "user_id", "type", [], [1], [[]], [["user_id"]],
         ["a", "a"], {}, {"name": "x"}, {"schema": {}}, [None, "a"], {"tables": []}]


def _deep(rng: random.Random):
    v: object = rng.choice(WEIRD)
    for _ in range(rng.choice([2, 10, 100, 400])):
        v = [v] if rng.random() < 0.5 else {"k": v}
    return v


def _mutate(obj, rng: random.Random, keys: list[str]):
    if isinstance(obj, dict) and obj and rng.random() < 0.85:
        obj, k = dict(obj), rng.choice(sorted(obj, key=str))
        r = rng.random()
        if r < 0.15:
            del obj[k]
        elif r < 0.25:
            obj[rng.choice(keys + ["zz", "Schema", "d_modle", "_lookup"])] = rng.choice(WEIRD)
        elif r < 0.5:
            obj[k] = rng.choice(WEIRD)
        elif r < 0.55:
            obj[k] = _deep(rng)
        elif r < 0.6:
            obj[k] = rng.choice([10 ** 5000, -(10 ** 4000)])
        else:
            obj[k] = _mutate(obj[k], rng, keys)
        return obj
    if isinstance(obj, list) and obj and rng.random() < 0.85:
        obj, i = list(obj), rng.randrange(len(obj))
        r = rng.random()
        if r < 0.2:
            del obj[i]
        elif r < 0.3:
            obj.append(copy.deepcopy(obj[i]))
        elif r < 0.5:
            obj[i] = rng.choice(WEIRD)
        else:
            obj[i] = _mutate(obj[i], rng, keys)
        return obj
    return copy.deepcopy(rng.choice(WEIRD + [_deep(rng)]))


def test_fuzz_mutated_configs_raise_config_error_only():
    from onetrans_trt.data.synthetic import synthetic_schema

    s = synthetic_schema(max_history=8)
    docs = [ModelConfig.from_preset("tiny", s).to_dict(),
            ModelConfig.from_preset("tiny", s, family="hyformer").to_dict(),
            ModelConfig.from_preset("small", synthetic_schema(max_history=40, n_sequences=1), ns_tokenizer="group",
                                    ns_groups=[["user_id", "device"], ["item_id"]], pyramid=[30, 20]).to_dict()]
    keys = sorted({k for d in docs for k in d} | {k for d in docs for k in d["schema"]})
    rng = random.Random(16)
    seen = {"ok": 0, "refused": 0}
    t0 = time.perf_counter()
    for i in range(2500):
        doc = docs[i % len(docs)]
        for _ in range(rng.choice([1, 1, 2, 3])):
            doc = _mutate(doc, rng, keys)
        try:
            cfg = ModelConfig.from_dict(doc)
        except ConfigError as e:
            msg = str(e)
            assert msg.startswith("model config: ") and "\n" not in msg and len(msg) < 600, msg
            seen["refused"] += 1
        else:  # what is read writes back the same
            assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
            seen["ok"] += 1
    assert seen["ok"] > 100 and seen["refused"] > 1500, seen
    assert time.perf_counter() - t0 < 10


# ---- paper presets: a config naming one has its sizes --------------------------------------
def test_paper_presets_have_the_papers_heads():
    from onetrans_trt.models.config import HYFORMER_PRESETS, PRESETS

    assert (PRESETS["onetrans-s"]["n_layers"], PRESETS["onetrans-s"]["d_model"], PRESETS["onetrans-s"]["n_heads"]) \
        == (6, 256, 4)
    assert (PRESETS["onetrans-l"]["n_layers"], PRESETS["onetrans-l"]["d_model"], PRESETS["onetrans-l"]["n_heads"]) \
        == (8, 384, 4)
    assert HYFORMER_PRESETS["hyformer-paper"]["n_heads"] == 4


@pytest.mark.parametrize("key,value", [("n_heads", 6), ("n_heads", 8), ("d_model", 512), ("n_layers", 7),
                                       ("ffn_mult", 2)])
def test_a_config_claiming_a_paper_preset_with_other_sizes_is_refused(movielens, key, value):
    good = ModelConfig.from_preset("onetrans-l", movielens.schema).to_dict()
    assert good["preset"] == "onetrans-l"
    ModelConfig.from_dict(good)  # as saved: loads
    bad = {**good, key: value}
    with pytest.raises(ConfigError, match=f"preset 'onetrans-l' has {key} = .*this config {key} = {value}"):
        ModelConfig.from_dict(bad)
    ModelConfig.from_dict({**bad, "preset": None})  # a custom model says so, and loads


def test_resizing_a_paper_preset_drops_its_claim_and_other_overrides_keep_it(movielens):
    s = movielens.schema
    assert ModelConfig.from_preset("onetrans-s", s, n_layers=3).preset is None
    assert ModelConfig.from_preset("onetrans-s", s, pyramid="off").preset == "onetrans-s"
    assert ModelConfig.from_preset("tiny", s, n_layers=3).preset == "tiny"  # not a paper preset: unchecked
    with pytest.raises(ConfigError, match="not a onetrans preset"):
        ModelConfig.from_dict({**ModelConfig.from_preset("tiny", s).to_dict(), "preset": "hyformer-paper"})
