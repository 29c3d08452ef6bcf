"""convert and calibrate cannot yet carry one tensor of 2 GiB or more through onnx-graphsurgeon:
they say so in one line (exit 3, missing capability) before any work, instead of a DecodeError
traceback after minutes and gigabytes. The table is declared external and backed by a sparse
file, so the test writes no gigabytes."""

from __future__ import annotations

import shutil
import subprocess
import sys

import onnx
import pytest
from onnx import TensorProto

from onetrans_trt.errors import MissingCapabilityError
from onetrans_trt.onnx_files import tensors_over

ROWS, DIM = 17_000_000, 32  # 2.03 GiB of float32


def _with_big_table(tiny_build, tmp_path):
    b = tmp_path / "b"
    shutil.copytree(tiny_build, b)
    path = b / "candidate_scorer.onnx"
    m = onnx.load(str(path))
    t = onnx.TensorProto(name="huge_table", data_type=TensorProto.FLOAT, dims=[ROWS, DIM])
    t.data_location = TensorProto.EXTERNAL
    for k, v in (("location", "huge.bin"), ("offset", "0"), ("length", str(ROWS * DIM * 4))):
        t.external_data.add(key=k, value=v)
    m.graph.initializer.append(t)
    onnx.save(m, str(path))
    with open(b / "huge.bin", "wb") as fh:
        fh.truncate(ROWS * DIM * 4)  # sparse: no blocks written
    return b


def test_convert_and_calibrate_refuse_a_table_over_2gib_in_one_line(tiny_build, tmp_path):
    from onetrans_trt.calibrate.fp16 import convert_build
    from onetrans_trt.calibrate.int8 import calibrate_build

    b = _with_big_table(tiny_build, tmp_path)
    assert tensors_over(b / "candidate_scorer.onnx") == [("huge_table", ROWS * DIM * 4)]
    assert tensors_over(b / "user_encoder.onnx") == []
    for run in (lambda: convert_build(b), lambda: calibrate_build(b, synthetic=True)):
        with pytest.raises(MissingCapabilityError, match=r"'huge_table' holds 2\.03 GiB"):
            run()
    assert not (b / "fp16").exists() and not (b / "int8").exists()
    for args in (["convert", b, "--quality-requests", "0"], ["calibrate", b, "--synthetic", "--quality-requests", "0"]):
        p = subprocess.run([sys.executable, "-m", "onetrans_trt.cli", *map(str, args)], capture_output=True, text=True)
        assert p.returncode == 3, p.stderr[-1500:]
        assert len(p.stderr.strip().splitlines()) == 1 and "huge_table" in p.stderr and "Traceback" not in p.stderr
