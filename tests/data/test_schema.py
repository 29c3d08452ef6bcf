import pytest

from onetrans_trt.data.schema import OOV, PAD, Feature, FeatureSchema, Sequence, Table
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


@pytest.mark.parametrize("mutate,needle", [
    (lambda d: d.update(max_history=0), "max_history"),
    (lambda d: d.update(merge_mode="random"), "merge_mode"),
    (lambda d: d["features"][0].update(table="nope"), "unknown table"),
    (lambda d: d["features"][0].update(kind="image"), "kind"),
    (lambda d: d["features"].append(dict(d["features"][0])), "declared twice"),
    (lambda d: d["sequences"][0]["fields"].update(item_id="tag"), "two tables"),
    (lambda d: d.pop("tables"), "malformed"),
])
def test_invalid_schemas_raise_config_error(mutate, needle):
    d = synthetic_schema().to_dict()
    mutate(d)
    with pytest.raises(ConfigError, match=needle):
        FeatureSchema.from_dict(d)


def test_schema_needs_features_and_sequences():
    t = {"x": Table("x", 2, 2)}
    with pytest.raises(ConfigError, match="non-sequential"):
        FeatureSchema(t, [], [Sequence("s", {"f": "x"})], max_history=3)
    with pytest.raises(ConfigError, match="sequence"):
        FeatureSchema(t, [Feature("a", "categorical", "user", table="x")], [], max_history=3)
