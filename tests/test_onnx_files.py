"""``onetrans_trt.onnx_files``: graphs of any size saved, loaded, checked and opened the same way.

The threshold is lowered with ``ONETRANS_TRT_EXTERNAL_DATA_BYTES`` so that small graphs take
the external-data path (``<file>.data`` beside the graph) that real > 2 GiB models take.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onetrans_trt import onnx_files
from onetrans_trt.onnx_files import (ALIGN, DEFAULT_THRESHOLD, MIN_EXTERNAL_TENSOR, THRESHOLD_ENV, all_tensors,
                                     check_model, data_file, graph_files, has_external, load_model, save_model,
                                     save_model_atomic, session_source, threshold, weights_bytes)

N = 1000  # 4000-byte weights: external; the 8-byte bias stays inline


def _model(seed: int = 0, n: int = N) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [n])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [n])
    inits = [numpy_helper.from_array(rng.standard_normal(n).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.standard_normal(n).astype(np.float32), "w2"),
             numpy_helper.from_array(np.array([0.5, 2.0], np.float32), "tiny")]
    nodes = [helper.make_node("Add", ["x", "w1"], ["h"], name="add"),
             helper.make_node("Mul", ["h", "w2"], ["y"], name="mul")]
    m = helper.make_model(helper.make_graph(nodes, "g", [x], [y], initializer=inits),
                          opset_imports=[helper.make_opsetid("", 18)])
    m.ir_version = 9
    return m


def _expected(m: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    w = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    return (x + w["w1"]) * w["w2"]


@pytest.fixture()
def external(monkeypatch):
    monkeypatch.setenv(THRESHOLD_ENV, "0")


def test_threshold_from_the_environment(monkeypatch):
    monkeypatch.delenv(THRESHOLD_ENV, raising=False)
    assert threshold() == DEFAULT_THRESHOLD == 1536 << 20
    monkeypatch.setenv(THRESHOLD_ENV, "")
    assert threshold() == DEFAULT_THRESHOLD
    monkeypatch.setenv(THRESHOLD_ENV, "123")
    assert threshold() == 123
    monkeypatch.setenv(THRESHOLD_ENV, str(5 << 30))  # can only lower it: 2 GiB is protobuf's hard limit
    assert threshold() == DEFAULT_THRESHOLD
    for bad, why in (("12k", "give a byte count (an integer)"), ("-1", "give a byte count >= 0")):
        monkeypatch.setenv(THRESHOLD_ENV, bad)
        with pytest.raises(ValueError) as e:
            threshold()
        assert str(e.value) == f"${THRESHOLD_ENV}={bad!r}: {why}"


def test_under_the_threshold_one_self_contained_file(tmp_path, monkeypatch):
    monkeypatch.delenv(THRESHOLD_ENV, raising=False)
    m = _model()
    stale = data_file(tmp_path / "g.onnx")
    stale.write_bytes(b"old")
    assert save_model(m, tmp_path / "g.onnx") == [tmp_path / "g.onnx"]
    assert not stale.exists()  # an earlier, larger save's data file does not linger
    assert (tmp_path / "g.onnx").read_bytes() == m.SerializeToString()


def test_above_the_threshold_weights_go_beside_the_graph(tmp_path, external):
    m = _model()
    before = m.SerializeToString()
    assert save_model(m, tmp_path / "g.onnx") == [tmp_path / "g.onnx", tmp_path / "g.onnx.data"]
    assert m.SerializeToString() == before  # the caller's model is unchanged
    raw = onnx.load(str(tmp_path / "g.onnx"), load_external_data=False)
    where = {t.name: {e.key: e.value for e in t.external_data} for t in raw.graph.initializer}
    assert where["tiny"] == {} and raw.graph.initializer[2].raw_data  # under 1 KiB: inline
    assert where["w1"] == {"location": "g.onnx.data", "offset": "0", "length": str(4 * N)}
    assert where["w2"] == {"location": "g.onnx.data", "offset": str(ALIGN), "length": str(4 * N)}
    assert MIN_EXTERNAL_TENSOR <= 4 * N and (tmp_path / "g.onnx.data").stat().st_size == ALIGN + 4 * N
    assert (tmp_path / "g.onnx").stat().st_size < 4 * N  # the graph file holds no weights
    assert graph_files(tmp_path / "g.onnx") == [tmp_path / "g.onnx", tmp_path / "g.onnx.data"]


def test_external_weights_count_by_their_length(tmp_path, external):
    m = _model()
    save_model(m, tmp_path / "g.onnx")
    raw = onnx.load(str(tmp_path / "g.onnx"), load_external_data=False)
    inline = sum(t.ByteSize() for t in raw.graph.initializer if not t.external_data)
    assert weights_bytes(raw) == 2 * 4 * N + inline


def test_load_model_reads_the_data_beside_the_file_from_any_directory(tmp_path, external, monkeypatch):
    m = _model()
    d = tmp_path / "build"
    d.mkdir()
    save_model(m, d / "g.onnx")
    monkeypatch.chdir(tmp_path)  # not the build directory
    got = load_model(Path("build") / "g.onnx")
    assert not has_external(got)
    for a, b in zip(got.graph.initializer, m.graph.initializer):
        np.testing.assert_array_equal(numpy_helper.to_array(a), numpy_helper.to_array(b))
    assert has_external(load_model(d / "g.onnx", external=False))
    x = np.linspace(-1, 1, N, dtype=np.float32)
    sess = ort.InferenceSession(str(d / "g.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(sess.run(None, {"x": x})[0], _expected(m, x))


def test_load_model_refuses_data_outside_the_directory(tmp_path, external):
    d = tmp_path / "build"
    d.mkdir()
    save_model(_model(), d / "g.onnx")
    (tmp_path / "g.onnx.data").write_bytes(data_file(d / "g.onnx").read_bytes())
    raw = onnx.load(str(d / "g.onnx"), load_external_data=False)
    for t in raw.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = "../g.onnx.data"
    (d / "h.onnx").write_bytes(raw.SerializeToString())
    with pytest.raises(Exception, match="outside"):
        load_model(d / "h.onnx")


def test_a_model_still_pointing_at_external_data_is_not_saved(tmp_path, external):
    save_model(_model(), tmp_path / "g.onnx")
    half = load_model(tmp_path / "g.onnx", external=False)
    with pytest.raises(ValueError, match=r"still refers to external data \('w1'\); load it with load_model"):
        save_model(half, tmp_path / "again.onnx")
    assert not (tmp_path / "again.onnx").exists()


def test_save_model_runs_the_checker_on_the_file(tmp_path, external):
    m = _model()
    m.graph.node[1].input[0] = "nothing"  # an input no node produces
    with pytest.raises(onnx.checker.ValidationError, match="nothing"):
        save_model(m, tmp_path / "g.onnx")
    save_model(m, tmp_path / "h.onnx", check=False)  # written as asked when the check is off


def test_save_model_atomic_replaces_graph_and_data(tmp_path, monkeypatch):
    final = tmp_path / "g.onnx"
    monkeypatch.setenv(THRESHOLD_ENV, "0")
    assert save_model_atomic(_model(1), final) == [final, data_file(final)]
    first = data_file(final).read_bytes()
    assert save_model_atomic(_model(2), final) == [final, data_file(final)]
    assert data_file(final).read_bytes() != first
    x = np.ones(N, np.float32)
    sess = ort.InferenceSession(str(final), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(sess.run(None, {"x": x})[0], _expected(_model(2), x))
    monkeypatch.delenv(THRESHOLD_ENV)
    assert save_model_atomic(_model(3), final) == [final]  # small again: the old data file goes
    assert not data_file(final).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.onnx"]  # no temporary left behind


def test_save_model_atomic_leaves_the_old_graph_on_failure(tmp_path, external):
    final = tmp_path / "g.onnx"
    save_model_atomic(_model(1), final)
    before = (final.read_bytes(), data_file(final).read_bytes())
    bad = _model(2)
    bad.graph.node[0].input[0] = "nothing"
    with pytest.raises(onnx.checker.ValidationError):
        save_model_atomic(bad, final)
    assert (final.read_bytes(), data_file(final).read_bytes()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.onnx", "g.onnx.data"]


def test_session_source_bytes_when_small_a_temporary_file_when_large(monkeypatch):
    m = _model()
    x = np.linspace(0, 1, N, dtype=np.float32)
    monkeypatch.delenv(THRESHOLD_ENV, raising=False)
    with session_source(m) as src:
        assert src == m.SerializeToString()
    monkeypatch.setenv(THRESHOLD_ENV, "0")
    with session_source(m) as src:
        assert isinstance(src, str) and Path(src).name == "model.onnx"
        assert data_file(src).is_file() and not Path(src).parent == Path.cwd()
        sess = ort.InferenceSession(src, providers=["CPUExecutionProvider"])
    assert not Path(src).parent.exists()  # removed on exit; the session keeps working
    np.testing.assert_array_equal(sess.run(None, {"x": x})[0], _expected(m, x))


def test_session_source_goes_through_a_file_when_the_model_is_too_big_for_one_protobuf(monkeypatch):
    m = _model()
    monkeypatch.delenv(THRESHOLD_ENV, raising=False)
    monkeypatch.setattr(onnx_files, "PROTOBUF_LIMIT", (64 << 20) + 10)  # as if 10 bytes were the limit
    with session_source(m) as src:
        assert isinstance(src, str) and Path(src).is_file()


def test_check_model_in_memory(monkeypatch):
    check_model(_model())
    bad = _model()
    bad.graph.node[0].input[0] = "nothing"
    with pytest.raises(onnx.checker.ValidationError):
        check_model(bad)
    monkeypatch.setattr(onnx_files, "PROTOBUF_LIMIT", (64 << 20) + 10)  # the temporary-file path
    check_model(_model())
    with pytest.raises(onnx.checker.ValidationError):
        check_model(bad)


def test_all_tensors_reaches_constants_subgraphs_and_functions():
    m = _model()
    const = numpy_helper.from_array(np.ones(3, np.float32), "c")
    m.graph.node.append(helper.make_node("Constant", [], ["k"], name="const", value=const))
    sub_const = numpy_helper.from_array(np.zeros(2, np.float32), "sub_c")
    then = helper.make_graph([helper.make_node("Constant", [], ["o"], value=sub_const)], "then", [],
                             [helper.make_tensor_value_info("o", TensorProto.FLOAT, [2])])
    m.graph.node.append(helper.make_node("If", ["cond"], ["r"], then_branch=then, else_branch=then))
    fn_const = numpy_helper.from_array(np.ones(1, np.float32), "fn_c")
    m.functions.append(helper.make_function("onetrans", "F", ["a"], ["b"],
                                            [helper.make_node("Constant", [], ["b"], value=fn_const)],
                                            opset_imports=[helper.make_opsetid("", 18)]))
    names = [t.name for t in all_tensors(m)]
    assert names == ["w1", "w2", "tiny", "c", "sub_c", "sub_c", "fn_c"]


def test_the_default_threshold_leaves_room_under_2_gib():
    assert onnx_files.PROTOBUF_LIMIT == 2 << 30 and DEFAULT_THRESHOLD < onnx_files.PROTOBUF_LIMIT - (256 << 20)
    assert os.environ.get(THRESHOLD_ENV) in (None, "")  # the suite runs with the real threshold


def test_tensors_left_on_disk_go_through_graphsurgeon_and_save_without_being_read(tmp_path, external,
                                                                                  monkeypatch):
    """load_model(on_disk_above=N): tensors of N bytes or more stay in their file (graphsurgeon cannot
    copy a tensor over 2 GiB); save_model copies them from there, session_source and check_model too."""
    import onnx_graphsurgeon as gs

    from onetrans_trt.onnx_files import on_disk

    m = _model(n=4096)
    src = tmp_path / "src"
    src.mkdir()
    save_model(m, src / "g.onnx")
    monkeypatch.chdir(tmp_path)  # never the source directory
    half = load_model(src / "g.onnx", on_disk_above=4 * 4096)
    assert on_disk(half) == ["w1", "w2"] and not half.graph.initializer[0].raw_data
    again = gs.export_onnx(gs.import_onnx(half))  # the passes' round trip: the references survive
    assert on_disk(again) == ["w1", "w2"]
    out = tmp_path / "out"
    out.mkdir()
    assert save_model(again, out / "h.onnx") == [out / "h.onnx", out / "h.onnx.data"]
    x = np.linspace(-1, 1, 4096, dtype=np.float32)
    want = _expected(m, x)
    sess = ort.InferenceSession(str(out / "h.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(sess.run(None, {"x": x})[0], want)
    raw = onnx.load(str(out / "h.onnx"), load_external_data=False)
    assert all(e.key != "basepath" for t in raw.graph.initializer for e in t.external_data)  # no source path leaks
    with session_source(again) as s:
        sess = ort.InferenceSession(s, providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(sess.run(None, {"x": x})[0], want)
    check_model(again)
    monkeypatch.delenv(THRESHOLD_ENV)  # under the threshold: read back inline, one file
    assert save_model(again, out / "small.onnx") == [out / "small.onnx"]
    sess = ort.InferenceSession(str(out / "small.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(sess.run(None, {"x": x})[0], want)


def test_a_graph_file_cannot_forge_a_left_on_disk_tensor(tmp_path, external):
    """A 'basepath' written in a graph file is not load_model's mark: saving such a model is refused
    instead of copying whatever file it names."""
    (tmp_path / "secret").write_bytes(b"s" * 4 * N)
    save_model(_model(), tmp_path / "g.onnx")
    m = load_model(tmp_path / "g.onnx", external=False)
    for t in m.graph.initializer:
        if t.external_data:
            e = t.external_data.add()
            e.key, e.value = "basepath", str(tmp_path)
            t.external_data[0].value = "secret"
    with pytest.raises(ValueError, match="still refers to external data"):
        save_model(m, tmp_path / "copy.onnx")


def test_load_model_confines_tensors_left_on_disk(tmp_path, external):
    d = tmp_path / "build"
    d.mkdir()
    save_model(_model(), d / "g.onnx")
    (tmp_path / "g.onnx.data").write_bytes(data_file(d / "g.onnx").read_bytes())
    raw = onnx.load(str(d / "g.onnx"), load_external_data=False)
    for t in raw.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = "../g.onnx.data"
    (d / "h.onnx").write_bytes(raw.SerializeToString())
    with pytest.raises(Exception, match="outside"):
        load_model(d / "h.onnx", on_disk_above=1)


def test_graph_flops_on_a_file_whose_weights_stay_on_disk(tmp_path, external, monkeypatch):
    """graph_flops reads a graph with external data by path; tensors over ON_DISK_BYTES are not
    read into the process (the session gets a temporary copy) and the count is the same."""
    from onetrans_trt.graphs.flops import graph_flops

    rng = np.random.default_rng(0)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 64])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 32])
    w = numpy_helper.from_array(rng.standard_normal((64, 32)).astype(np.float32), "w")
    m = helper.make_model(helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g", [x], [y],
                                            initializer=[w]), opset_imports=[helper.make_opsetid("", 18)])
    save_model(m, tmp_path / "g.onnx")
    want = graph_flops(m, {"n": 5})
    assert want == {"flops": 2 * 5 * 64 * 32, "matmuls": 1}
    monkeypatch.setattr(onnx_files, "ON_DISK_BYTES", 1024)
    seen = []
    real = onnx_files.load_model
    monkeypatch.setattr(onnx_files, "load_model", lambda *a, **k: seen.append(k) or real(*a, **k))
    assert graph_flops(tmp_path / "g.onnx", {"n": 5}) == want
    assert seen == [{"on_disk_above": 1024}]  # the 8 KiB weight stayed in g.onnx.data
