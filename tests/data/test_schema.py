import copy
import json

import pytest

from onetrans_trt.data.schema import OOV, PAD, Feature, FeatureSchema, SchemaJSON, Sequence, Table
from onetrans_trt.data.synthetic import synthetic_schema
from onetrans_trt.errors import ConfigError


def test_round_trip_and_derived_views():
    s = synthetic_schema(merge_mode="timestamp_agnostic", max_history=10)
    again = FeatureSchema.from_dict(s.to_dict())
    assert again.to_dict() == s.to_dict()
    assert s.s_max_len == 10 + s.num_sequences  # one [SEP] per sequence
    assert list(s.seq_fields) == ["item_id", "category", "action"]


def test_table_index_maps_unknown_to_oov():
    t = Table("t", 3, 4, tokens=["a", "b", "c"])
    assert [t.index(x) for x in ("a", "c", "zzz", None)] == [2, 4, OOV, PAD]
    n = Table("n", 5, 4)
    assert [n.index(x) for x in (0, 4, 5, -1, "3", "x", 2.0, True)] == [2, 6, OOV, OOV, 5, OOV, 4, OOV]


# every rule of the feature schema, through its JSON (from_dict): the mutation and the words of
# the one-line error (which name the field)
RULES = [
    (lambda d: d.update(max_history=0), "max_history: expected greater than or equal to 1, got 0"),
    (lambda d: d.update(max_history=(1 << 20) + 1), "max_history: expected less than or equal to 1048576"),
    (lambda d: d.update(max_history=True), "max_history: expected a valid integer, got True"),
    (lambda d: d.update(max_history="8"), "max_history: expected a valid integer, got '8'"),
    (lambda d: d.update(max_history=8.0), "max_history: expected a valid integer, got 8.0"),
    (lambda d: d.update(max_history=10 ** 5000), "max_history: expected less than or equal to 1048576, got an "
                                                 "integer of thousands of digits"),
    (lambda d: d.update(merge_mode="random"), "merge_mode: expected 'timestamp_aware' or 'timestamp_agnostic'"),
    (lambda d: d.pop("tables"), "malformed: tables is missing"),
    (lambda d: d.update(tables={}), "tables: expected a list, got dict"),
    (lambda d: d.update(extra=1, other=2), "unknown keys ['extra', 'other']"),
    (lambda d: d["tables"][0].update(size=0), "tables[0].size: expected greater than or equal to 1"),
    (lambda d: d["tables"][0].update(size=(1 << 30) + 1), "tables[0].size: expected less than or equal to 1073741824"),
    (lambda d: d["tables"][0].update(dim=1 << 17), "tables[0].dim: expected less than or equal to 65536"),
    (lambda d: d["tables"][0].update(dim=[]), "tables[0].dim: expected a valid integer, got []"),
    (lambda d: d["tables"][0].update(name=5), "tables[0].name: expected a string, got int"),
    (lambda d: d["tables"][0].update(tokens="abc"), "tables[0].tokens: expected a list, got str"),
    (lambda d: d["tables"][0].update(tokens=[1] * 200), "tables[0].tokens[0]: expected a string, got int"),
    (lambda d: d["tables"][0].update(tokens=["a", "b"]), "tables[0]: table 'user' has 2 tokens but size 200"),
    (lambda d: d["tables"][0].update(colour="red"), "tables[0]: unknown keys ['colour']"),
    (lambda d: d["tables"].append(dict(d["tables"][0])), "table 'user' declared twice"),
    (lambda d: d["tables"].__setitem__(0, []), "tables[0]: expected an object, got list"),
    (lambda d: d["features"][0].update(table="nope"), "features[0].table: feature 'user_id' uses unknown table 'nope'"),
    (lambda d: d["features"][0].pop("table"), "features[0].table: feature 'user_id' uses unknown table None"),
    (lambda d: d["features"][0].update(kind="image"), "features[0].kind: expected 'categorical', 'multihot' or "
                                                      "'dense', got 'image'"),
    (lambda d: d["features"][0].update(group="world"), "features[0].group: expected 'user', 'item' or 'context'"),
    (lambda d: d["features"][1].update(max_len=0), "features[1].max_len: expected greater than or equal to 1"),
    (lambda d: d["features"][4].update(dim=1 << 17), "features[4].dim: expected less than or equal to 65536"),
    (lambda d: d["features"][0].pop("kind"), "malformed: features[0].kind is missing"),
    (lambda d: d["features"].append(dict(d["features"][0])), "feature 'user_id' declared twice"),
    (lambda d: d.update(features=[]), "features: expected at least 1 item(s), got []"),
    (lambda d: d.update(sequences=[]), "sequences: expected at least 1 item(s), got []"),
    (lambda d: d["sequences"].append(copy.deepcopy(d["sequences"][0])), "sequence 'seq0' declared twice"),
    (lambda d: d["sequences"][0].update(fields={}), "sequences[0].fields: expected at least 1 item(s), got {}"),
    (lambda d: d["sequences"][0].update(fields=[]), "sequences[0].fields: expected an object, got list"),
    (lambda d: d["sequences"][0]["fields"].update(x=3), "sequences[0].fields.x: expected a string, got int"),
    (lambda d: d["sequences"][0]["fields"].update(x="nope"), "sequences[0].fields.x: sequence 'seq0' field 'x' uses "
                                                             "unknown table 'nope'"),
    (lambda d: d["sequences"][0]["fields"].update(item_id="tag"), "sequences[1].fields.item_id: field 'item_id' maps "
                                                                  "to two tables across sequences"),
    (lambda d: d["sequences"][0]["fields"].update(type="item"), "sequences[0].fields.type: sequence field name "
                                                                "'type' is reserved"),
    (lambda d: d["sequences"][0]["fields"].update(length="item"), "field name 'length' is reserved"),
]


@pytest.mark.parametrize("mutate,words", RULES, ids=[w.split(":")[0] for _, w in RULES])
def test_every_rule_is_one_config_error_naming_the_field(mutate, words):
    d = synthetic_schema().to_dict()
    mutate(d)
    with pytest.raises(ConfigError) as e:
        FeatureSchema.from_dict(d)
    msg = str(e.value)
    assert msg.startswith("feature schema: ") and words in msg and "\n" not in msg, msg


@pytest.mark.parametrize("bad", [None, [], "schema", 3, {1: 2}])
def test_a_schema_that_is_not_an_object_is_refused(bad):
    with pytest.raises(ConfigError, match="^feature schema: "):
        FeatureSchema.from_dict(bad)


def test_schemas_built_in_python_are_checked_by_the_same_model():
    s = synthetic_schema()
    t, f, q = s.tables, s.features, s.sequences
    cases = [
        (lambda: FeatureSchema(t, [], q, max_history=3), "features: expected at least 1 item(s)"),
        (lambda: FeatureSchema(t, f, [], max_history=3), "sequences: expected at least 1 item(s)"),
        (lambda: FeatureSchema(t, f, q, max_history=0), "max_history: expected greater than or equal to 1"),
        (lambda: FeatureSchema(t, f, q, max_history=True), "max_history: expected a valid integer, got True"),
        (lambda: FeatureSchema(t, f, q, 3, merge_mode="x"), "merge_mode: expected 'timestamp_aware'"),
        (lambda: FeatureSchema(list(t.values()), f, q, 3), "tables: expected a dict, got list"),
        (lambda: FeatureSchema(t, tuple(f), q, 3), "features: expected a list, got tuple"),
        (lambda: FeatureSchema(t, f + [{"name": "x"}], q, 3), "features[6]: expected a Feature, got dict"),
        (lambda: FeatureSchema({**t, "zz": {"size": 1}}, f, q, 3), "tables['zz']: expected a Table, got dict"),
        (lambda: FeatureSchema({**t, "zz": Table("yy", 1, 1)}, f, q, 3), "tables['zz']: key 'zz' does not match "
                                                                          "its name 'yy'"),
        (lambda: FeatureSchema({**t, "user": Table("user", 0, 1)}, f, q, 3), "tables[0].size: expected greater"),
        (lambda: FeatureSchema({"t": Table("t", 2, 2, tokens=("a", "b"))}, [Feature("a", "categorical", "user", "t")],
                               [Sequence("s", {"f": "t"})], 3), "tables[0].tokens: expected a list, got tuple"),
        (lambda: FeatureSchema(t, f + [Feature("d", "dense", "item", dim=0)], q, 3), "features[6].dim: expected"),
        (lambda: FeatureSchema(t, f + [Feature("d", "dense", "item", dim=1.5)], q, 3), "features[6].dim: expected a "
                                                                                      "valid integer, got 1.5"),
        (lambda: FeatureSchema(t, f, q + [Sequence("s", {"f": 1})], 3), "sequences[3].fields.f: expected a string"),
        (lambda: FeatureSchema(t, f, q + [Sequence("s", {})], 3), "sequences[3].fields: expected at least 1 item(s)"),
        (lambda: FeatureSchema(t, f + f[:1], q, 3), "feature 'user_id' declared twice"),
    ]
    for build, words in cases:
        with pytest.raises(ConfigError) as e:
            build()
        msg = str(e.value)
        assert msg.startswith("feature schema: ") and words in msg and "\n" not in msg, (words, msg)


def test_the_json_model_is_what_to_dict_writes():
    s = synthetic_schema()
    m = SchemaJSON.model_validate(json.loads(json.dumps(s.to_dict())))
    assert FeatureSchema._from_model(m) == s
    schema = SchemaJSON.model_json_schema()
    assert set(schema["required"]) == {"max_history", "tables", "features", "sequences"}
    assert schema["properties"]["max_history"]["maximum"] == 1 << 20
