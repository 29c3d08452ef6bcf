"""``onetrans_trt.trust`` tested directly: each check of an incoming ONNX file and manifest,
with the exact message (mutation testing found these reached only through slower tests that
do not pin which check fired)."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onetrans_trt.trust as trust
from onetrans_trt.errors import BuildError
from onetrans_trt.trust import check_manifest, check_onnx


def _model(opsets=(("", 18),), nodes=None, initializers=(), functions=()) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    nodes = nodes if nodes is not None else [helper.make_node("Relu", ["x"], ["y"], name="relu")]
    g = helper.make_graph(nodes, "g", [x], [y], initializer=list(initializers))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets],
                          functions=list(functions))
    m.ir_version = 9
    return m


def _save(m: onnx.ModelProto, path: Path) -> Path:
    path.write_bytes(m.SerializeToString())
    return path


def _err(path, root=None) -> str:
    with pytest.raises(BuildError) as e:
        check_onnx(path, root)
    return str(e.value)


def test_a_good_model_is_returned_parsed(tmp_path):
    m = _model()
    got = check_onnx(_save(m, tmp_path / "g.onnx"))
    assert isinstance(got, onnx.ModelProto) and got.SerializeToString() == m.SerializeToString()
    assert check_onnx(str(tmp_path / "g.onnx"), str(tmp_path)).graph.node[0].op_type == "Relu"


@pytest.mark.parametrize("opsets", [(("", 18),), (("", 23),), (("ai.onnx", 18),), (("", 20), ("onetrans", 1))])
def test_supported_opsets_pass(tmp_path, opsets):
    check_onnx(_save(_model(opsets), tmp_path / "g.onnx"))


@pytest.mark.parametrize("opsets,msg", [
    ((("", 17),), "opset 17 of domain 'ai.onnx' is outside the supported 18..23"),
    ((("", 24),), "opset 24 of domain 'ai.onnx' is outside the supported 18..23"),
    ((("", 18), ("onetrans", 2)), "opset 2 of domain 'onetrans' is outside the supported 1..1"),
    ((("", 18), ("onetrans", 0)), "opset 0 of domain 'onetrans' is outside the supported 1..1"),
    ((("", 18), ("com.evil", 1)),
     "operator domain 'com.evil' is not one this toolkit produces (['ai.onnx', 'onetrans'] and the default)"),
])
def test_unsupported_opsets_are_refused(tmp_path, opsets, msg):
    p = _save(_model(opsets), tmp_path / "g.onnx")
    assert _err(p) == f"{p}: {msg}"


def test_a_node_in_an_unknown_domain_is_refused(tmp_path):
    node = helper.make_node("Relu", ["x"], ["y"], name="odd", domain="com.evil")
    p = _save(_model(nodes=[node]), tmp_path / "g.onnx")
    assert _err(p) == f"{p}: node 'odd' uses domain 'com.evil', which is not supported"


def test_nodes_in_supported_domains_are_accepted(tmp_path):
    # an onetrans-domain node (a plugin op, no function body): its domain is a supported one
    node = helper.make_node("Mystery", ["x"], ["y"], name="m", domain="onetrans")
    p = _save(_model(opsets=(("", 18), ("onetrans", 1)), nodes=[node]), tmp_path / "g.onnx")
    assert check_onnx(p).graph.node[0].domain == "onetrans"


def test_a_local_function_domain_is_known(tmp_path):
    fn = helper.make_function("onetrans", "MyRelu", ["a"], ["b"], [helper.make_node("Relu", ["a"], ["b"])],
                              opset_imports=[helper.make_opsetid("", 18)])
    node = helper.make_node("MyRelu", ["x"], ["y"], name="f", domain="onetrans")
    p = _save(_model(opsets=(("", 18), ("onetrans", 1)), nodes=[node], functions=[fn]), tmp_path / "g.onnx")
    assert check_onnx(p).functions[0].name == "MyRelu"


def test_a_model_failing_the_checker_is_refused_with_its_first_line(tmp_path):
    node = helper.make_node("Relu", ["nope"], ["y"], name="bad")  # an input nothing produces
    p = _save(_model(nodes=[node]), tmp_path / "g.onnx")
    msg = _err(p)
    assert msg.startswith(f"{p}: fails the ONNX checker (") and msg.endswith(")")
    inner = msg[len(f"{p}: fails the ONNX checker ("):-1]
    assert "nope" in inner and "\n" not in inner and len(inner) <= 200


def test_the_checker_message_is_cut_at_200_characters(tmp_path, monkeypatch):
    def long_fail(model):
        raise ValueError("A" * 300 + "\nsecond line")

    monkeypatch.setattr(onnx.checker, "check_model", long_fail)
    p = _save(_model(), tmp_path / "g.onnx")
    assert _err(p) == f"{p}: fails the ONNX checker ({'A' * 200})"


def test_missing_directory_and_garbage_files_are_refused(tmp_path):
    p = tmp_path / "none.onnx"
    assert _err(p) == f"{p}: missing or not a regular file; re-run `onetrans-trt export`"
    d = tmp_path / "d.onnx"
    d.mkdir()
    assert _err(d) == f"{d}: missing or not a regular file; re-run `onetrans-trt export`"
    g = tmp_path / "g.onnx"
    g.write_bytes(b"\xff\x00garbage" * 10)
    msg = _err(g)
    assert msg.startswith(f"{g}: not a readable ONNX model (") and msg.endswith("); re-export it")
    assert msg != f"{g}: not a readable ONNX model (); re-export it"


def test_the_size_limit_is_inclusive(tmp_path, monkeypatch):
    p = _save(_model(), tmp_path / "g.onnx")
    size = p.stat().st_size
    monkeypatch.setattr(trust, "MAX_ONNX_BYTES", size)
    check_onnx(p)  # exactly at the limit: fine
    monkeypatch.setattr(trust, "MAX_ONNX_BYTES", size - 1)
    assert _err(p) == f"{p}: {size} bytes is over the {size - 1} byte limit"


def test_the_default_size_limit_is_protobufs_2_gib():
    assert trust.MAX_ONNX_BYTES == 2 * 1024**3


def test_symlinks(tmp_path):
    root = tmp_path / "build"
    root.mkdir()
    outside = _save(_model(), tmp_path / "outside.onnx")
    link = root / "g.onnx"
    link.symlink_to(outside)
    assert _err(link) == f"{link}: a symbolic link out of {root}; refusing to load it"
    assert check_onnx(link, tmp_path).graph.name == "g"  # inside the root it names: fine
    inner = _save(_model(), root / "real.onnx")
    (root / "alias.onnx").symlink_to(inner)
    assert check_onnx(root / "alias.onnx").graph.name == "g"  # a link inside its own directory
    (root / "dangling.onnx").symlink_to(root / "missing.onnx")
    assert _err(root / "dangling.onnx").endswith("missing or not a regular file; re-run `onetrans-trt export`")


def _external(name: str, location: str | None) -> TensorProto:
    t = numpy_helper.from_array(np.ones(2, np.float32), name)
    t.ClearField("raw_data")
    t.data_location = TensorProto.EXTERNAL
    if location is not None:
        e = t.external_data.add()
        e.key, e.value = "location", location
    for key, value in (("offset", "0"), ("length", "8")):
        e = t.external_data.add()
        e.key, e.value = key, value
    return t


def _with_initializer(t: TensorProto) -> onnx.ModelProto:
    node = helper.make_node("Add", ["x", t.name], ["y"], name="add")
    return _model(nodes=[node], initializers=[t])


def test_external_data_inside_the_graphs_directory_is_allowed(tmp_path, monkeypatch):
    # onnx.checker resolves an in-memory model's external data against the working directory,
    # so a graph with external data passes the checker only from its own directory (the
    # toolkit writes no external data today; reported to the lead)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "w.bin").write_bytes(np.ones(2, np.float32).tobytes())
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "w.bin").write_bytes(np.ones(2, np.float32).tobytes())
    for loc in ("w.bin", "sub/w.bin"):
        p = _save(_with_initializer(_external("w", loc)), tmp_path / "g.onnx")
        m = check_onnx(p)
        assert m.graph.initializer[0].data_location == TensorProto.EXTERNAL
        assert not m.graph.initializer[0].raw_data  # external data not loaded


@pytest.mark.parametrize("loc", ["../w.bin", "/etc/passwd", "", None, "sub/../../w.bin"])
def test_external_data_outside_or_unnamed_is_refused(tmp_path, loc):
    d = tmp_path / "b"
    d.mkdir()
    p = _save(_with_initializer(_external("w", loc)), d / "g.onnx")
    where = loc or ""
    assert _err(p) == (f"{p}: tensor 'w' points its external data at {where!r}, outside {d}; refusing to load it")


def test_external_data_in_a_constant_nodes_attribute_is_checked_too(tmp_path):
    d = tmp_path / "b"
    d.mkdir()
    t = _external("c", "../c.bin")
    node = helper.make_node("Constant", [], ["y"], name="const", value=t)
    m = _model(nodes=[node])
    m.graph.ClearField("input")
    p = _save(m, d / "g.onnx")
    assert _err(p) == f"{p}: tensor 'c' points its external data at '../c.bin', outside {d}; refusing to load it"


# ---- manifest ----------------------------------------------------------------------------

def _manifest(family: str = "onetrans") -> dict:
    m = {
        "format": "onetrans-trt/build/1", "created": "2024-01-01T00:00:00Z", "checkpoint": {},
        "versions": {}, "opset": 23,
        "model": {"family": family, "d_model": 32, "n_heads": 4, "n_layers": 2, "tasks": ["click"],
                  "s_max_len": 64},
        "pyramid": {"schedule": [8, None, 0]},
        "graphs": {"user_encoder": {"file": "user_encoder.onnx"}, "candidate_scorer": {"file": "candidate_scorer.onnx"}},
        "dynamic_dims": {}, "passes": [], "samples": {},
    }
    if family == "hyformer":
        m["hyformer"] = {"sequences": 2, "state_slots": 4, "longer_window": 8}
    return m


P = Path("b/manifest.json")


def _bad(m, msg: str) -> None:
    with pytest.raises(BuildError) as e:
        check_manifest(m, P)
    assert str(e.value) == f"{P}: {msg}; re-run `onetrans-trt export`", str(e.value)


def test_good_manifests_are_returned_as_they_are():
    for fam in ("onetrans", "hyformer"):
        m = _manifest(fam)
        assert check_manifest(m, P) is m
    m = _manifest()
    m.update(precisions={}, engines={})
    m["model"]["d_model"] = 1 << 20  # the upper bound is inclusive
    m["pyramid"]["schedule"] = []
    assert check_manifest(m, P) is m
    m = _manifest("baseline")
    m["pyramid"] = {}  # a schedule is required of onetrans only
    check_manifest(m, P)


@pytest.mark.parametrize("m", [None, [], "x", {"format": "onetrans-trt/build/2"}, {}])
def test_not_a_manifest(m):
    with pytest.raises(BuildError) as e:
        check_manifest(m, P)
    assert str(e.value) == f"{P}: not an onetrans-trt build manifest"


def test_unknown_and_missing_keys():
    m = _manifest()
    m["zzz"] = 1
    m["aaa"] = 2
    _bad(m, "unknown keys ['aaa', 'zzz']")
    for key in ("created", "checkpoint", "versions", "opset", "model", "pyramid", "graphs", "dynamic_dims",
                "passes", "samples"):
        m = _manifest()
        del m[key]
        _bad(m, f"{key}: missing")


@pytest.mark.parametrize("key,value,msg", [
    ("opset", "23", "opset: expected a valid integer, got '23'"),
    ("opset", True, "opset: expected a valid integer, got True"),
    ("passes", {}, "passes: expected a list"),
    ("model", [], "model: expected an object"),
    ("created", 5, "created: expected a string, got int"),
])
def test_wrong_types(key, value, msg):
    m = _manifest()
    m[key] = value
    _bad(m, msg)


@pytest.mark.parametrize("key", ["hyformer", "precisions", "engines"])
def test_optional_keys_must_be_dicts(key):
    m = _manifest()
    m[key] = []
    _bad(m, f"{key}: expected an object")


@pytest.mark.parametrize("key,value,msg", [
    ("family", 1, "model.family: expected a string, got int"),
    ("d_model", True, "model.d_model: expected a valid integer, got True"),
    ("n_heads", 4.0, "model.n_heads: expected a valid integer, got 4.0"),
    ("tasks", None, "model.tasks: expected a list"),
    ("d_model", 0, "model.d_model: expected greater than or equal to 1, got 0"),
    ("n_heads", -1, "model.n_heads: expected greater than or equal to 1, got -1"),
    ("n_layers", (1 << 20) + 1, f"model.n_layers: expected less than or equal to {1 << 20}, got {(1 << 20) + 1}"),
    ("s_max_len", 0, "model.s_max_len: expected greater than or equal to 1, got 0"),
])
def test_model_fields(key, value, msg):
    m = _manifest()
    m["model"][key] = value
    _bad(m, msg)
    if key in ("d_model", "n_heads", "n_layers", "s_max_len") and isinstance(value, int) and not isinstance(value, bool):
        m["model"][key] = 1
        check_manifest(m, P)  # the lower bound, 1, is fine


def test_a_missing_model_field():
    m = _manifest()
    del m["model"]["s_max_len"]
    _bad(m, "model.s_max_len: missing")


def test_graphs():
    m = _manifest()
    del m["graphs"]["user_encoder"]
    _bad(m, "graphs ['user_encoder'] are not listed")
    m = _manifest()
    m["graphs"] = {}
    _bad(m, "graphs ['candidate_scorer', 'user_encoder'] are not listed")
    for g, what in (("x", ": expected an object"), ({"file": 3}, ".file: expected a string, got int"),
                    ({}, ".file: missing")):
        m = _manifest()
        m["graphs"]["user_encoder"] = g
        _bad(m, f"graphs.user_encoder{what}")
    for f in ("../x.onnx", "a/b.onnx", "a\\b.onnx", ".hidden.onnx", "x.bin", "x.onnx.data"):
        m = _manifest()
        m["graphs"]["candidate_scorer"] = {"file": f}
        _bad(m, f"graphs.candidate_scorer.file: expected a plain .onnx file name in the build directory, got {f!r}")
    m = _manifest()
    m["graphs"]["extra"] = {"file": "extra.onnx"}  # extra graphs are allowed when well formed
    check_manifest(m, P)


@pytest.mark.parametrize("sched", [None, "1,2", [1, -1], [1.0], [True, "x"], {"a": 1}])
def test_a_onetrans_pyramid_schedule_must_be_non_negative_counts(sched):
    m = _manifest()
    m["pyramid"]["schedule"] = sched
    _bad(m, "pyramid.schedule must be a list of non-negative counts")
    m["model"]["family"] = "baseline"  # other families do not need one
    check_manifest(m, P)


@pytest.mark.parametrize("hy", [None, {}, {"sequences": 2, "state_slots": 4},
                                {"sequences": 2, "state_slots": 0, "longer_window": 8},
                                {"sequences": "2", "state_slots": 4, "longer_window": 8},
                                {"sequences": 2, "state_slots": 4, "longer_window": -8}])
def test_a_hyformer_manifest_needs_its_fields(hy):
    m = _manifest("hyformer")
    if hy is None:
        del m["hyformer"]
    else:
        m["hyformer"] = hy
    _bad(m, "a HyFormer manifest needs hyformer.sequences/state_slots/longer_window")
    m["model"]["family"] = "onetrans"
    if hy is None or isinstance(hy, dict):
        check_manifest(m, P)  # only HyFormer needs them


def test_check_manifest_does_not_modify_its_input():
    m = _manifest("hyformer")
    before = copy.deepcopy(m)
    check_manifest(m, P)
    assert m == before


def test_hyformer_counts_of_one_are_fine():
    m = _manifest("hyformer")
    m["hyformer"] = {"sequences": 1, "state_slots": 1, "longer_window": 1}
    check_manifest(m, P)


def test_an_unreadable_file_names_the_parser_error(tmp_path):
    g = tmp_path / "g.onnx"
    g.write_bytes(b"\xff\x00garbage" * 10)
    try:
        onnx.load(str(g), load_external_data=False)
    except Exception as e:  # noqa: BLE001
        name = type(e).__name__
    assert _err(g) == f"{g}: not a readable ONNX model ({name}); re-export it"


def test_every_external_tensor_is_checked_not_only_up_to_the_first_internal_one(tmp_path):
    d = tmp_path / "b"
    d.mkdir()
    inner = numpy_helper.from_array(np.ones(2, np.float32), "a")
    node = helper.make_node("Add", ["x", "a"], ["t"], name="add1")
    node2 = helper.make_node("Add", ["t", "w"], ["y"], name="add2")
    p = _save(_model(nodes=[node, node2], initializers=[inner, _external("w", "../w.bin")]), d / "g.onnx")
    assert _err(p) == f"{p}: tensor 'w' points its external data at '../w.bin', outside {d}; refusing to load it"


def test_a_local_functions_domain_passes_the_domain_check_and_the_checker_decides(tmp_path):
    # a node calling a model-local function in a domain of its own: not refused by our domain
    # check (the domain is a function's), so the ONNX checker's verdict is the one reported
    fn = helper.make_function("custom.fn", "MyRelu", ["a"], ["b"], [helper.make_node("Relu", ["a"], ["b"])],
                              opset_imports=[helper.make_opsetid("", 18)])
    node = helper.make_node("MyRelu", ["x"], ["y"], name="f", domain="custom.fn")
    p = _save(_model(nodes=[node], functions=[fn]), tmp_path / "g.onnx")
    assert _err(p).startswith(f"{p}: fails the ONNX checker (No opset import for domain 'custom.fn'")


GOOD_SEQ = {"queries": 1, "encoder": "longer", "window": 4, "max_len": None}


@pytest.mark.parametrize("per", ["x", [GOOD_SEQ], [GOOD_SEQ, {**GOOD_SEQ, "encoder": "lstm"}],
                                 [GOOD_SEQ, {**GOOD_SEQ, "queries": 0}], [GOOD_SEQ, {**GOOD_SEQ, "window": "4"}],
                                 [GOOD_SEQ, {**GOOD_SEQ, "max_len": 0}], [GOOD_SEQ, {**GOOD_SEQ, "max_len": 2.5}],
                                 [GOOD_SEQ, 3]])
def test_a_hyformer_manifest_per_sequence_block_is_checked(per):
    m = _manifest("hyformer")
    m["hyformer"] = {"sequences": 2, "state_slots": 4, "longer_window": 8, "per_sequence": per}
    _bad(m, "hyformer.per_sequence must list each sequence's queries, encoder, window and max_len (positive "
           "counts; max_len may be null)")
    m["hyformer"]["per_sequence"] = [GOOD_SEQ, {**GOOD_SEQ, "encoder": "swiglu", "max_len": 7}]
    check_manifest(m, P)
