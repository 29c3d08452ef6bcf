"""trust.py's external-data byte ranges and the manifest's ``graphs.<g>.data`` entries, pinned
message by message (found by the mutation run after external data arrived)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onetrans_trt.errors import BuildError
from onetrans_trt.trust import check_manifest, check_onnx
from tests.mutation_kills.test_trust import P, _bad, _manifest, _model, _save


def _ext(location="w.bin", offset: str | None = "0", length: str | None = "8", name="w") -> TensorProto:
    t = numpy_helper.from_array(np.ones(2, np.float32), name)
    t.ClearField("raw_data")
    t.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", offset), ("length", length)):
        if value is not None:
            e = t.external_data.add()
            e.key, e.value = key, value
    return t


def _graph(tmp_path, *tensors, data_bytes=8):
    (tmp_path / "w.bin").write_bytes(b"\0" * data_bytes)
    nodes = [helper.make_node("Add", ["x", t.name], [f"y{i}"], name=f"add{i}") for i, t in enumerate(tensors)]
    m = _model(nodes=nodes, initializers=list(tensors))
    del m.graph.output[:]
    m.graph.output.extend([helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [2]) for i in range(len(tensors))])
    return _save(m, tmp_path / "g.onnx")


def _refused(p) -> str:
    with pytest.raises(BuildError) as e:
        check_onnx(p)
    return str(e.value)


@pytest.mark.parametrize("offset,length", [("0", "8"), ("4", "4"), (None, "8"), ("0", None), ("8", "0"), ("", "8")])
def test_byte_ranges_inside_the_file_pass(tmp_path, monkeypatch, offset, length):
    monkeypatch.chdir(tmp_path)
    p = _graph(tmp_path, _ext(offset=offset, length=length))
    assert check_onnx(p).graph.initializer[0].data_location == TensorProto.EXTERNAL


@pytest.mark.parametrize("offset,length,rng", [("4", "8", "4..12"), ("-1", "4", "-1..3"), ("12", None, "12..8"),
                                               ("0", "9", "0..9")])
def test_byte_ranges_past_the_file_are_refused(tmp_path, offset, length, rng):
    p = _graph(tmp_path, _ext(offset=offset, length=length))
    assert _refused(p) == f"{p}: tensor 'w' needs bytes {rng} of 'w.bin', which has 8; re-export it"


@pytest.mark.parametrize("offset,length", [("x", "8"), ("0", "eight")])
def test_malformed_offsets_and_lengths_are_refused(tmp_path, offset, length):
    p = _graph(tmp_path, _ext(offset=offset, length=length))
    assert _refused(p) == f"{p}: tensor 'w' has a malformed external data offset or length; re-export it"


def test_a_missing_data_file_or_a_directory_is_refused(tmp_path):
    for loc in ("none.bin", "adir"):
        (tmp_path / "adir").mkdir(exist_ok=True)
        p = _graph(tmp_path, _ext(location=loc))
        assert _refused(p) == (f"{p}: tensor 'w' points its external data at {loc!r}, which is missing or not a "
                               "regular file; re-export it")


def test_two_tensors_share_one_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    p = _graph(tmp_path, _ext(offset="0", length="8", name="a"), _ext(offset="8", length="8", name="b"), data_bytes=16)
    assert len(check_onnx(p).graph.initializer) == 2
    p = _graph(tmp_path, _ext(offset="0", length="8", name="a"), _ext(offset="8", length="8", name="b"), data_bytes=12)
    assert _refused(p) == f"{p}: tensor 'b' needs bytes 8..16 of 'w.bin', which has 12; re-export it"


def test_is_sha256():
    from pydantic import TypeAdapter, ValidationError

    from onetrans_trt.manifest import Sha256

    sha = TypeAdapter(Sha256, config={"strict": True})
    assert sha.validate_python("0123456789abcdef" * 4)
    for x in ("0" * 63, "0" * 65, "A" * 64, "g" * 64, "X" * 64, 7, None, b"0" * 64, "0" * 64 + "\n"):
        with pytest.raises(ValidationError):
            sha.validate_python(x)


def _with_data(d) -> dict:
    m = _manifest()
    m["graphs"]["candidate_scorer"]["data"] = d
    return m


GOOD = {"file": "candidate_scorer.onnx.data", "sha256": "ab" * 32, "bytes": 10}


def test_a_graphs_external_data_entry():
    m = _with_data(dict(GOOD))
    assert check_manifest(m, P) is m
    assert check_manifest(_with_data({**GOOD, "bytes": 0}), P)
    for d, what in (("x", ": expected an object"), ({**GOOD, "file": 3}, ".file: expected a string, got int"),
                    ({k: v for k, v in GOOD.items() if k != "file"}, ".file: missing"),
                    ({**GOOD, "sha256": "AB" * 32}, f".sha256: expected a sha256 (64 lowercase hex digits), got {'AB' * 32!r}"),
                    ({**GOOD, "sha256": None}, ".sha256: expected a string, got NoneType"),
                    ({**GOOD, "bytes": True}, ".bytes: expected a valid integer, got True"),
                    ({**GOOD, "bytes": -1}, ".bytes: expected greater than or equal to 0, got -1"),
                    ({**GOOD, "bytes": 1.0}, ".bytes: expected a valid integer, got 1.0"),
                    ({k: v for k, v in GOOD.items() if k != "bytes"}, ".bytes: missing")):
        _bad(_with_data(d), f"graphs.candidate_scorer.data{what}")
    _bad(_with_data({**GOOD, "file": "other.onnx.data"}),
         "graphs.candidate_scorer: data.file 'other.onnx.data' is not 'candidate_scorer.onnx.data'")
