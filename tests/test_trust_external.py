"""``trust.check_onnx`` on graphs whose weights live in external data (``<file>.data``).

A legitimate build keeps the data beside its graph: the check must pass from ANY working
directory (the ONNX checker resolves an in-memory model's external data against the working
directory, so it used to pass only from the build directory itself). Data pointing outside
the build (absolute path, ``..``, a symbolic link out) is refused with one line naming it.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onetrans_trt.trust as trust
from onetrans_trt.errors import BuildError
from onetrans_trt.onnx_files import THRESHOLD_ENV, data_file, save_model
from onetrans_trt.trust import check_onnx

N = 4096  # floats per weight: 16 KiB, well above save_model's 1 KiB per-tensor cut


def _model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [N])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [N])
    w1 = numpy_helper.from_array(rng.standard_normal(N).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal(N).astype(np.float32), "w2")
    nodes = [helper.make_node("Add", ["x", "w1"], ["h"], name="add"),
             helper.make_node("Mul", ["h", "w2"], ["y"], name="mul")]
    m = helper.make_model(helper.make_graph(nodes, "g", [x], [y], initializer=[w1, w2]),
                          opset_imports=[helper.make_opsetid("", 18)])
    m.ir_version = 9
    return m


@pytest.fixture()
def build(tmp_path, monkeypatch):
    """A build directory holding ``g.onnx`` + ``g.onnx.data`` (threshold 0: external data)."""
    monkeypatch.setenv(THRESHOLD_ENV, "0")
    d = tmp_path / "build"
    d.mkdir()
    written = save_model(_model(), d / "g.onnx")
    assert written == [d / "g.onnx", d / "g.onnx.data"]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # never the build directory
    return d


def _err(path, root=None) -> str:
    with pytest.raises(BuildError) as e:
        check_onnx(path, root)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def _point(build: Path, location: str) -> Path:
    """``build/h.onnx``: g.onnx with every external tensor pointed at ``location``."""
    m = onnx.load(str(build / "g.onnx"), load_external_data=False)
    for t in m.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = location
    p = build / "h.onnx"
    p.write_bytes(m.SerializeToString())
    return p


def test_a_graph_with_confined_external_data_passes_from_another_directory(build):
    assert Path.cwd() != build
    m = check_onnx(build / "g.onnx")
    assert [t.data_location for t in m.graph.initializer] == [TensorProto.EXTERNAL] * 2
    assert not any(t.raw_data for t in m.graph.initializer)  # the weights were not read
    # relative build paths too, from the build's parent
    os.chdir(build.parent)
    check_onnx(Path("build") / "g.onnx")


def test_the_graph_runs_on_ort_from_another_directory(build):
    from onetrans_trt.runtime.ort_backend import ort_session

    x = np.linspace(-1, 1, N, dtype=np.float32)
    got = ort_session(build / "g.onnx").run(None, {"x": x})[0]
    w = {t.name: numpy_helper.to_array(t) for t in _model().graph.initializer}
    np.testing.assert_array_equal(got, (x + w["w1"]) * w["w2"])


@pytest.mark.parametrize("where", ["absolute", "dotdot", "dotdot-inside-out", "symlink"])
def test_external_data_outside_the_build_is_refused(build, where, tmp_path):
    secret = tmp_path / "secret.bin"
    secret.write_bytes(data_file(build / "g.onnx").read_bytes())  # a file that WOULD load
    if where == "absolute":
        loc = str(secret)
    elif where == "dotdot":
        loc = "../secret.bin"
    elif where == "dotdot-inside-out":
        loc = "sub/../../secret.bin"
    else:
        (build / "link.data").symlink_to(secret)
        loc = "link.data"
    p = _point(build, loc)
    assert _err(p) == f"{p}: tensor 'w1' points its external data at {loc!r}, outside {build}; refusing to load it"
    from onetrans_trt.runtime.ort_backend import ort_session

    with pytest.raises(BuildError, match="outside"):
        ort_session(p)


def test_a_symlink_to_data_inside_the_build_is_refused_by_the_checker(build):
    (build / "alias.data").symlink_to(build / "g.onnx.data")
    p = _point(build, "alias.data")
    msg = _err(p)
    assert msg.startswith(f"{p}: fails the ONNX checker (") and "symbolic link" in msg


def test_missing_or_truncated_external_data_is_refused(build):
    data = data_file(build / "g.onnx")
    full = data.read_bytes()
    data.write_bytes(full[:-4])  # the last tensor's last float is gone
    assert _err(build / "g.onnx") == (f"{build / 'g.onnx'}: tensor 'w2' needs bytes {N * 4}..{2 * N * 4} of "
                                      f"'g.onnx.data', which has {2 * N * 4 - 4}; re-export it")
    data.unlink()
    assert _err(build / "g.onnx") == (f"{build / 'g.onnx'}: tensor 'w1' points its external data at 'g.onnx.data', "
                                      f"which is missing or not a regular file; re-export it")


def test_the_size_limit_is_the_graph_file_not_its_data(build, monkeypatch):
    size = (build / "g.onnx").stat().st_size
    assert data_file(build / "g.onnx").stat().st_size > size  # the data is the big part
    monkeypatch.setattr(trust, "MAX_ONNX_BYTES", size)
    check_onnx(build / "g.onnx")
    monkeypatch.setattr(trust, "MAX_ONNX_BYTES", size - 1)
    assert _err(build / "g.onnx") == f"{build / 'g.onnx'}: {size} bytes is over the {size - 1} byte limit"


# ---- the manifest's data entries ----------------------------------------------------------

def _manifest(**graph_extra):
    g = {"file": "user_encoder.onnx", **graph_extra}
    return {"format": "onetrans-trt/build/1", "created": "x", "checkpoint": {}, "versions": {}, "opset": 23,
            "model": {"family": "module", "d_model": 8, "n_heads": 2, "n_layers": 1, "tasks": ["t"], "s_max_len": 4},
            "pyramid": {}, "graphs": {"user_encoder": g, "candidate_scorer": {"file": "candidate_scorer.onnx"}},
            "dynamic_dims": {}, "passes": [], "samples": {}}


def test_a_manifest_graph_may_name_its_data_file():
    ok = {"file": "user_encoder.onnx.data", "sha256": "0" * 64, "bytes": 12}
    assert trust.check_manifest(_manifest(data=ok), Path("m.json"))["graphs"]["user_encoder"]["data"] == ok


@pytest.mark.parametrize("data,why", [
    ({"file": "../x.data", "sha256": "0" * 64, "bytes": 1}, "graphs.user_encoder: data.file '../x.data' is not "
                                                              "'user_encoder.onnx.data'"),
    ({"file": "other.onnx.data", "sha256": "0" * 64, "bytes": 1}, "graphs.user_encoder: data.file "
                                                                  "'other.onnx.data' is not 'user_encoder.onnx.data'"),
    ({"file": "user_encoder.onnx.data", "sha256": "zz", "bytes": 1}, "graphs.user_encoder.data.sha256: expected a "
                                                                     "sha256 (64 lowercase hex digits), got 'zz'"),
    ({"file": "user_encoder.onnx.data", "sha256": "0" * 64, "bytes": -1}, "graphs.user_encoder.data.bytes: expected "
                                                                          "greater than or equal to 0, got -1"),
    ({"file": "user_encoder.onnx.data", "sha256": "0" * 64, "bytes": True}, "graphs.user_encoder.data.bytes: "
                                                                            "expected a valid integer, got True"),
    ("user_encoder.onnx.data", "graphs.user_encoder.data: expected an object"),
])
def test_a_bad_data_entry_is_refused(data, why):
    with pytest.raises(BuildError) as e:
        trust.check_manifest(_manifest(data=data), Path("m.json"))
    assert str(e.value) == f"m.json: {why}; re-run `onetrans-trt export`"
