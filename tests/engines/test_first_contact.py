"""What reading TensorRT's, Polygraphy's and Triton's sources showed would break the first GPU
run (issue "TensorRT first contact"); each test fails on the code before the fix (b7c3d20)."""

import json
import re
import shlex
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import onnx
import pytest

from onetrans_trt.errors import BuildError, InputError, MissingCapabilityError


def _fake_trt(version: str):
    trt = types.SimpleNamespace(__version__=version)
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="workspace")
    return trt


# ---- defect 4: the test process has TRITON_INTERPRET=1; an AOT compile must still work
def test_aot_compile_works_while_the_interpreter_is_on():
    import os

    pytest.importorskip("triton")
    assert os.environ.get("TRITON_INTERPRET") == "1"  # tests/conftest.py
    from onetrans_trt.plugins.tail_causal_attention import triton_kernel

    k = triton_kernel.compile("float32", head_dim=32, arch=90)
    assert f".visible .entry {k.name}(" in k.ptx and len(k.cubin) > 1000


# ---- defect 5: the PTX ISA is capped (Triton 3.9 writes 9.4 otherwise: a CUDA 13.4 driver)
def test_ptx_version_is_capped_and_recorded(monkeypatch):
    pytest.importorskip("triton")
    from onetrans_trt.plugins import _triton
    from onetrans_trt.plugins.shared_prefix_attention import triton_kernel

    monkeypatch.delenv("ONETRANS_TRT_PTX_VERSION", raising=False)
    monkeypatch.setattr(_triton, "driver_cuda_version", lambda: None)
    k = triton_kernel.compile("float16", head_dim=64, arch=90)
    isa = re.search(r"^\.version (\d+)\.(\d+)", k.ptx, re.M)
    assert int(isa.group(1)) * 10 + int(isa.group(2)) == _triton.DEFAULT_PTX_VERSION == k.ptx_version == 84
    monkeypatch.setenv("ONETRANS_TRT_PTX_VERSION", "8.7")
    k = triton_kernel.compile("float16", head_dim=64, arch=90)
    assert re.search(r"^\.version 8\.7$", k.ptx, re.M) and k.ptx_cap_reason == "$ONETRANS_TRT_PTX_VERSION"


# ---- also: profile scratch, clusters and cooperative launches are refused like global scratch
@pytest.mark.parametrize("meta", [dict(profile_scratch_size=64), dict(num_ctas=2), dict(launch_cooperative_grid=True),
                                  dict(global_scratch_size=128)])
def test_kernels_tensorrt_cannot_launch_are_refused(monkeypatch, meta):
    triton = pytest.importorskip("triton")
    from onetrans_trt.plugins import _triton
    from onetrans_trt.plugins.tail_causal_attention import triton_kernel

    base = dict(name="k", num_warps=4, shared=0, global_scratch_size=0, profile_scratch_size=0, num_ctas=1,
                launch_cooperative_grid=False)
    fake = types.SimpleNamespace(metadata=types.SimpleNamespace(**{**base, **meta}),
                                 asm={"ptx": ".version 8.4\n.visible .entry k()", "cubin": b""})
    monkeypatch.delenv("TRITON_INTERPRET")  # compile in this process, through the patched compiler
    monkeypatch.setattr(triton, "compile", lambda *a, **k: fake)
    monkeypatch.setattr(_triton, "_CACHE", {})
    with pytest.raises((BuildError, RuntimeError), match="cannot run as a TensorRT AOT plugin|scratch"):
        triton_kernel.compile("float32", head_dim=16, arch=90)
    if "global_scratch_size" not in meta:  # the old check caught only global scratch
        with pytest.raises(BuildError, match="cannot run as a TensorRT AOT plugin"):
            _triton.check_launchable(fake.metadata)


# ---- also: triton >= 3.5 (the ASTSource form we compile with)
def test_triton_requirement_is_what_we_test(monkeypatch):
    text = Path(__file__).resolve().parents[2].joinpath("pyproject.toml").read_text()
    assert re.search(r'kernels = \["triton>=3\.5"\]', text)
    triton = pytest.importorskip("triton")
    from onetrans_trt.plugins import _triton

    monkeypatch.setattr(triton, "__version__", "3.2.0")
    with pytest.raises(MissingCapabilityError, match="too old"):
        _triton.require_triton()


# ---- also: TF32 off by default (fp32 engines are compared with ORT at fp32 tolerances)
def test_build_defaults_to_no_tf32_and_says_so_in_commands(tiny_build, tmp_path):
    b = tmp_path / "b"
    shutil.copytree(tiny_build, b)
    p = subprocess.run([sys.executable, "-m", "onetrans_trt.cli", "build", str(b)], capture_output=True, text=True)
    assert p.returncode in (0, 3), p.stderr
    plan = json.loads((b / "engines" / "fp32" / "profiles.json").read_text())
    assert plan["tf32"] is False
    from onetrans_trt.engines.build import build_engines
    import inspect

    assert inspect.signature(build_engines).parameters["tf32"].default is False


# ---- also: the polygraphy line survives the shell (shapes quoted) and states TF32
@pytest.mark.parametrize("tf32", [False, True])
def test_polygraphy_and_trtexec_lines_survive_the_shell(tiny_build, tmp_path, tf32):
    from onetrans_trt.engines.build import command_lines, profiles
    from onetrans_trt.export.api import read_manifest

    model = onnx.load(str(tiny_build / "candidate_scorer.onnx"))
    prof = profiles(read_manifest(tiny_build), model, {})
    lines = command_lines(tmp_path / "engines" / "fp32", "candidate_scorer", tmp_path / "dir with space" / "g.onnx",
                          prof, False, tf32)
    poly = shlex.split(next(line for line in lines if line.startswith("polygraphy convert")))
    assert poly[2] == str(tmp_path / "dir with space" / "g.onnx")
    assert ("--tf32" in poly) is tf32
    for flag, which in (("--trt-min-shapes", "min"), ("--trt-opt-shapes", "opt"), ("--trt-max-shapes", "max")):
        i = poly.index(flag)
        got = {}
        for tok in poly[i + 1:i + 1 + len(prof)]:
            m = re.fullmatch(r"(\w+):\[([\d,]*)\]", tok)
            assert m, tok  # one token per input, no spaces: Polygraphy's NAME:[d0,d1] form
            got[m.group(1)] = [int(x) for x in m.group(2).split(",")] if m.group(2) else []
        assert got == {n: p[which] for n, p in prof.items()}
    trtexec = shlex.split(next(line for line in lines if line.startswith("trtexec --onnx")))
    assert ("--noTF32" in trtexec) is (not tf32)
    shapes = next(t for t in trtexec if t.startswith("--minShapes="))
    assert dict(x.split(":") for x in shapes[len("--minShapes="):].split(",")) == \
        {n: "x".join(map(str, p["min"])) for n, p in prof.items()}


# ---- also: Polygraphy raises on a failed build; it never returns None
def test_a_failed_build_is_a_one_line_build_error(monkeypatch, tmp_path):
    pytest.importorskip("polygraphy")
    import polygraphy.backend.trt as ptrt
    from polygraphy.exception import PolygraphyException

    from onetrans_trt.engines import build as eb

    class Failing:
        def __init__(self, *a, **k):
            pass

        def __call__(self):
            raise PolygraphyException("Invalid Engine. Please ensure the engine was built correctly\nmore detail")

    for name in ("EngineBytesFromNetwork", "NetworkFromOnnxBytes", "CreateConfig"):
        monkeypatch.setattr(ptrt, name, Failing)
    model = onnx.helper.make_model(onnx.helper.make_graph([], "g", [], []))
    with pytest.raises(BuildError, match="^TensorRT could not build the engine: Invalid Engine") as e:
        eb._build_one(_fake_trt("11.1.0"), model, {}, tmp_path / "timing.cache", 64, False)
    assert "\n" not in str(e.value)


# ---- also: TensorRT 10.x needs strongly_typed=True from Polygraphy; AOT plugins need >= 10.9
@pytest.mark.parametrize("version,typed", [("10.9.0", True), ("10.16.1", True), ("11.1.0", None)])
def test_strongly_typed_networks_on_every_tensorrt(monkeypatch, tmp_path, version, typed):
    pytest.importorskip("polygraphy")
    import polygraphy.backend.trt as ptrt

    from onetrans_trt.engines import build as eb

    seen = {}

    class Network:
        def __init__(self, data, **kw):
            seen.update(kw)

    class Engine:
        def __init__(self, *a, **k):
            pass

        def __call__(self):
            return b"plan"

    monkeypatch.setattr(ptrt, "NetworkFromOnnxBytes", Network)
    monkeypatch.setattr(ptrt, "EngineBytesFromNetwork", Engine)
    monkeypatch.setattr(ptrt, "CreateConfig", lambda **k: k)
    model = onnx.helper.make_model(onnx.helper.make_graph([], "g", [], []))
    assert eb._build_one(_fake_trt(version), model, {}, tmp_path / "c", 64, False) == b"plan"
    assert seen.get("strongly_typed") is typed
    eb.require_aot_plugins(_fake_trt(version))
    with pytest.raises(MissingCapabilityError, match=">= 10.9"):
        eb.require_aot_plugins(_fake_trt("10.8.0"))


# ---- also: set_input_shape's result is checked (False: the shape is outside the profile)
def test_a_shape_outside_the_profile_is_an_input_error():
    import torch

    from onetrans_trt.runtime.trt_backend import TrtSplitBackend

    class Ctx:
        def set_input_shape(self, name, shape):
            return shape[0] <= 4  # profile max 4

        def set_tensor_address(self, name, ptr):
            pass

        def get_tensor_shape(self, name):
            return (1,)

        def execute_async_v3(self, stream):
            return True

    class Engine:
        num_io_tensors = 2

        def get_tensor_name(self, i):
            return ["x", "y"][i]

        def get_tensor_mode(self, name):
            return "in" if name == "x" else "out"

        def get_tensor_dtype(self, name):
            return "f32"

        def get_tensor_profile_shape(self, name, profile):
            return (1,), (2,), (4,)

    be = object.__new__(TrtSplitBackend)
    be.trt = types.SimpleNamespace(TensorIOMode=types.SimpleNamespace(INPUT="in"), nptype=lambda t: np.float32)
    be.torch, be.device, be.stream = torch, "cpu", None
    be.engines, be.contexts = {"r": Engine()}, {"r": Ctx()}
    assert set(be._run("r", {"x": np.zeros(3, np.float32)})) == {"y"}
    with pytest.raises(InputError, match=r"input x has shape \(9,\), outside the engine's optimization profile \(1,\)..\(4,\)"):
        be._run("r", {"x": np.zeros(9, np.float32)})
