"""Engine builds: everything up to the engine without TensorRT (exit code 3); the real
build and the TensorRT backend when tensorrt and a GPU are present."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from onetrans_trt.engines.build import parse_overrides, profiles
from onetrans_trt.errors import InputError


def _have_trt_gpu() -> str | None:
    """Why no engine can be built here (None: TensorRT and a GPU are present)."""
    from tests.helpers import trt_gpu_missing

    return trt_gpu_missing()


def test_build_without_tensorrt_exits_3_and_writes_profiles_and_commands(tiny_build, tmp_path):
    if _have_trt_gpu() is None:
        pytest.skip("TensorRT and a GPU are present: the engine test below covers the build")
    b = tmp_path / "b"
    shutil.copytree(tiny_build, b)
    p = subprocess.run([sys.executable, "-m", "onetrans_trt.cli", "build", str(b), "--precision", "fp32",
                        "--profile", "candidates=1,64,512"], capture_output=True, text=True)
    assert p.returncode == 3, p.stderr
    reason = _have_trt_gpu()  # what is missing decides the message: TensorRT itself, or the GPU
    expected = "TensorRT is not usable here" if reason.startswith("tensorrt:") else "no CUDA GPU is visible"
    assert expected in p.stderr and "Traceback" not in p.stderr
    d = b / "engines" / "fp32"
    plan = json.loads((d / "profiles.json").read_text())
    prof = plan["graphs"]["candidate_scorer"]["profile"]
    assert prof["ns_item_id"] == {"min": [1], "opt": [64], "max": [512]}
    assert prof["user_k_0"]["max"][2] == 50 and prof["s_length"]["opt"] == [1]
    cmds = (d / "commands.sh").read_text()
    assert "trtexec --loadEngine=" in cmds and "--shapes=" in cmds
    assert "not built" in (d / "build_log.txt").read_text()
    assert not list(d.glob("*.engine"))


def test_unfused_graphs_get_full_trtexec_and_polygraphy_lines(tiny_build, tmp_path):
    from onetrans_trt.engines.build import command_lines
    import onnx

    from onetrans_trt.export.api import read_manifest

    m = read_manifest(tiny_build)
    model = onnx.load(str(tiny_build / "user_encoder.onnx"))
    prof = profiles(m, model, {})
    lines = command_lines(tmp_path / "engines" / "fp32", "user_encoder", tiny_build / "user_encoder.onnx", prof, False)
    assert any(l.startswith("trtexec --onnx=") and "--minShapes=s_type:1x1" in l for l in lines)
    assert any(l.startswith("polygraphy convert") for l in lines)


def test_profile_overrides_are_validated():
    assert parse_overrides(["candidates=1,128,1024"]) == {"candidates": (1, 128, 1024)}
    for bad in ["candidates=1,2", "candidates=5,2,9", "nonsense"]:
        with pytest.raises(InputError):
            parse_overrides([bad])


def test_missing_precision_variant_is_a_clear_error(tiny_build, tmp_path):
    b = tmp_path / "b"
    shutil.copytree(tiny_build, b)
    shutil.rmtree(b / "int8", ignore_errors=True)
    p = subprocess.run([sys.executable, "-m", "onetrans_trt.cli", "build", str(b), "--precision", "int8"],
                       capture_output=True, text=True)
    assert p.returncode == 2 and "onetrans-trt calibrate" in p.stderr


def test_engines_build_and_match_ort_on_a_gpu(tiny_build, tmp_path, movielens):
    reason = _have_trt_gpu()
    if reason:
        pytest.skip(reason)
    from onetrans_trt.engines.build import build_engines
    from onetrans_trt.runtime.ranker import Ranker

    b = tmp_path / "b"
    shutil.copytree(tiny_build, b)
    build_engines(b, "fp32")
    trt, ort = Ranker.load(b, backend="trt"), Ranker.load(b, backend="ort")
    for req, _ in movielens.requests(10, n_candidates=16, seed=4):
        assert np.abs(trt.rank(req).logits - ort.rank(req).logits).max() <= 1e-3
