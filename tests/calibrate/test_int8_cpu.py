"""The CPU INT8 variant (``calibrate --target cpu``, ``BUILD/int8-cpu/``): what it holds, that it
ranks like PyTorch, that a candidate's score does not depend on its batch, that ORT's fast
integer kernel is exact on it (also on an emulated CPU without VNNI), which backend runs it,
and its refusals."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onetrans_trt.ort_options import INT8_WEIGHT_BITS_KEY, X64_QUANT_PRECISION

QEMU = shutil.which("qemu-x86_64")
needs_qemu = pytest.mark.skipif(QEMU is None, reason="qemu-x86_64 not installed (make test installs Debian's "
                                                      "qemu-user): no CPU without VNNI to run on")


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "onetrans_trt.cli", *map(str, args)], capture_output=True, text=True)


@pytest.fixture(scope="module")
def cpu8(tiny_build, tmp_path_factory):
    """A copy of the tiny build with int8-cpu/ made by the CLI (32 calibration requests, quality
    report on 30)."""
    b = tmp_path_factory.mktemp("int8cpu") / "tiny"
    shutil.copytree(tiny_build, b)
    p = _cli("calibrate", b, "--target", "cpu", "--samples", "32", "--quality-requests", "30", "--json")
    assert p.returncode == 0, p.stderr[-2000:]
    return b, json.loads(p.stdout)


def test_the_variant_is_an_integer_scorer_beside_the_float_encoder(cpu8):
    b, out = cpu8
    assert sorted(x.name for x in (b / "int8-cpu").iterdir()) == ["calibration.npz", "candidate_scorer.onnx",
                                                                   "quality.json"]
    m = onnx.load(str(b / "int8-cpu" / "candidate_scorer.onnx"))
    consts = {i.name for i in m.graph.initializer}
    producer = {o: n for n in m.graph.node for o in n.output}
    matmuls = [n for n in m.graph.node if n.op_type == "MatMul"]
    # every MatMul with a constant weight reads it quantized (INT8 -> DequantizeLinear), and its
    # activation too (per tensor: one scale)
    assert not [n.name for n in matmuls if n.input[1] in consts]
    quantized = [n for n in matmuls if n.input[1] in producer and producer[n.input[1]].op_type == "DequantizeLinear"
                 and producer[n.input[1]].input[0] in consts]
    assert len(quantized) == out["int8-cpu"]["quantized_matmuls"] > 0
    assert all(producer[n.input[0]].op_type == "DequantizeLinear" for n in quantized)
    assert out["int8-cpu"]["calibration"]["requests"] == 32
    lo, hi = out["int8-cpu"]["weight_span"]
    assert -64 <= lo < 0 < hi <= 64
    assert {p.key: p.value for p in m.metadata_props}[INT8_WEIGHT_BITS_KEY] == "7"
    info = json.loads((b / "manifest.json").read_text())["precisions"]["int8-cpu"]
    assert info["lineage"]["command"] == ["calibrate", "BUILD", "--target", "cpu", "--samples", "32"]
    assert set(info["lineage"]["graphs"]) == {"user_encoder", "candidate_scorer"}
    assert info["graphs"]["user_encoder"]["file"] == "user_encoder.onnx"  # the build's own


def test_quality_report_against_pytorch(cpu8):
    b, out = cpu8
    rep = json.loads((b / "int8-cpu" / "quality.json").read_text())
    assert rep == out["quality"] and rep["variant"] == "int8-cpu" and rep["backend"] == "ort-int8-cpu"
    assert rep["requests"] == 30
    for task, m in rep["metrics"].items():
        assert abs(m["delta_auc"]) <= 0.003, (task, m)
    assert rep["ranking"]["top10_overlap_mean"] >= 0.9
    assert 0 < rep["max_abs_logit_error"] < 0.25  # quantized (not the float graph), and close


def test_a_candidates_score_does_not_depend_on_its_batch(cpu8):
    """Static scales: the same candidates scored in one call or in chunks of 7 give the same
    logits (dynamic quantization's per-batch activation range would move them)."""
    from onetrans_trt.runtime.ranker import Ranker

    b, _ = cpu8
    whole, chunked = Ranker.load(b, backend="ort-int8-cpu"), Ranker.load(b, backend="ort-int8-cpu", chunk_size=7)
    for req in _requests(b, 3, 40):
        assert np.array_equal(whole.rank(req).logits, chunked.rank(req).logits)


def _entry(sess, key: str = X64_QUANT_PRECISION):
    """A session's config entry, or None where it has none (ORT raises for a missing key)."""
    try:
        return sess.get_session_options().get_session_config_entry(key)
    except RuntimeError:
        return None


def _requests(b: Path, n: int, c: int = 50):
    from onetrans_trt.data.movielens import MovieLens
    from onetrans_trt.models.config import read_config

    schema = read_config(b).schema
    ml = MovieLens(max_history=schema.max_history, merge_mode=schema.merge_mode)
    return [r for r, _ in ml.requests(n, n_candidates=c, seed=5)]


def test_fast_kernel_equals_the_exact_one_here(cpu8):
    """No saturation on this host: the scorer session the backend opens (no
    ``session.x64quantprecision``: ORT's fast u8s8 kernel) ranks exactly like one with it."""
    import onnxruntime as ort

    from onetrans_trt.ort_options import session_options
    from onetrans_trt.runtime.ranker import Ranker

    b, _ = cpu8
    fast, exact = Ranker.load(b, backend="ort-int8-cpu"), Ranker.load(b, backend="ort-int8-cpu")
    assert _entry(fast.backend.scorer) is None and _entry(fast.backend.user) == "1"
    exact.backend.scorer = ort.InferenceSession(str(b / "int8-cpu" / "candidate_scorer.onnx"), session_options(),
                                                providers=["CPUExecutionProvider"])
    for req in _requests(b, 4):
        assert np.array_equal(fast.rank(req).logits, exact.rank(req).logits)


def test_backends_choose_the_variant(cpu8, tiny_int8_build, tmp_path):
    """``ort-int8-cpu`` runs int8-cpu/; ``ort-int8`` names it on the CPU when the build has it
    and int8/ otherwise; ``ort-int8-qdq`` is always int8/ (TensorRT's graphs)."""
    from onetrans_trt.errors import InputError
    from onetrans_trt.runtime.ranker import Ranker

    b, _ = cpu8
    both = tmp_path / "both"
    shutil.copytree(tiny_int8_build, both)
    assert _cli("calibrate", both, "--target", "cpu", "--samples", "8", "--quality-requests", "0").returncode == 0
    req = _requests(b, 1)[0]
    ref = Ranker.load(b, backend="ort").rank(req).logits
    got = {}
    for build, name in ((b, "ort-int8-cpu"), (b, "ort-int8"), (both, "ort-int8"), (both, "ort-int8-cpu"),
                        (both, "ort-int8-qdq"), (tiny_int8_build, "ort-int8"), (tiny_int8_build, "ort-int8-qdq")):
        r = Ranker.load(build, backend=name)
        got[build.name if build != tiny_int8_build else "qdq", name] = (r.backend.variant, r.rank(req).logits)
    assert {k: v[0] for k, v in got.items()} == {
        ("tiny", "ort-int8-cpu"): "int8-cpu", ("tiny", "ort-int8"): "int8-cpu", ("both", "ort-int8"): "int8-cpu",
        ("both", "ort-int8-cpu"): "int8-cpu", ("both", "ort-int8-qdq"): "int8", ("qdq", "ort-int8"): "int8",
        ("qdq", "ort-int8-qdq"): "int8"}
    # the same graphs give the same numbers, whichever name loaded them; each INT8 form is near float32
    assert np.array_equal(got["tiny", "ort-int8"][1], got["tiny", "ort-int8-cpu"][1])
    assert np.array_equal(got["both", "ort-int8-qdq"][1], got["qdq", "ort-int8"][1])
    for k, (_, logits) in got.items():
        err = float(np.abs(logits - ref).max())
        assert 0 < err < 0.25 * max(1.0, float(np.abs(ref).max())), (k, err)
    with pytest.raises(InputError, match=r"no int8-cpu/ graphs for backend 'ort-int8-cpu'; run `onetrans-trt "
                                         r"calibrate .* --target cpu` first"):
        Ranker.load(tiny_int8_build, backend="ort-int8-cpu")
    plain = tmp_path / "plain"
    shutil.copytree(b, plain)
    shutil.rmtree(plain / "int8-cpu")
    with pytest.raises(InputError, match=r"no int8/ graphs for backend 'ort-int8'; run `onetrans-trt calibrate "
                                         r".*` first \(or `onetrans-trt calibrate BUILD --target cpu` for "):
        Ranker.load(plain, backend="ort-int8")


def test_a_variant_of_rewritten_graphs_is_refused(cpu8, tmp_path):
    from onetrans_trt.errors import StaleArtifact
    from onetrans_trt.runtime.ranker import Ranker

    b = tmp_path / "b"
    shutil.copytree(cpu8[0], b)
    m = json.loads((b / "manifest.json").read_text())
    m["graphs"]["candidate_scorer"]["sha256"] = "0" * 64  # as after `graphs` rewrote the scorer
    (b / "manifest.json").write_text(json.dumps(m))
    for name in ("ort-int8-cpu", "ort-int8"):
        with pytest.raises(StaleArtifact, match=r"int8-cpu/ was made from graphs that have since been rewritten .*"
                                                r"re-run `onetrans-trt calibrate .* --target cpu --samples 32`"):
            Ranker.load(b, backend=name)


def test_keep_float_is_refused_with_the_cpu_target(tiny_build, tmp_path):
    b = tmp_path / "b"
    shutil.copytree(tiny_build, b)
    before = (b / "manifest.json").read_bytes()
    p = _cli("calibrate", b, "--target", "cpu", "--keep-float", "Softmax", "--quality-requests", "0")
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.startswith("error: --keep-float does not apply with --target cpu: ")
    assert len(p.stderr.strip().splitlines()) == 1
    assert not (b / "int8-cpu").exists() and (b / "manifest.json").read_bytes() == before


def _matmul_model(tmp_path: Path, weight: np.ndarray, name: str = "mm.onnx") -> Path:
    k, n = weight.shape
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["logits"])], "mm",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["c", k])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["c", n])],
                          [numpy_helper.from_array(weight, "w")])
    path = tmp_path / name
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 19)]), str(path))
    return path


def test_quantizer_guards(tmp_path):
    """A graph with nothing to quantize is refused; so are weights of 8 bits (a quantizer that
    stopped reducing the range: they could saturate the fast kernel the variant runs without the
    exact option)."""
    from onetrans_trt.calibrate.int8_cpu import checked, quantize_scorer
    from onetrans_trt.errors import BuildError

    g = helper.make_graph([helper.make_node("Relu", ["x"], ["logits"])], "relu",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [2])])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 19)]), str(tmp_path / "relu.onnx"))
    with pytest.raises(BuildError, match="no MatMul with a constant weight to quantize"):
        quantize_scorer(tmp_path / "relu.onnx", tmp_path, [{"x": np.ones(2, np.float32)}])
    src = _matmul_model(tmp_path, np.ones((64, 8), np.float32))
    m = quantize_scorer(src, tmp_path, [{"x": np.full((2, 64), 3.0, np.float32)}])
    w = next(i for i in m.graph.initializer if i.data_type == TensorProto.INT8 and len(i.dims) == 2)
    assert numpy_helper.to_array(w).max() == 64
    w.CopyFrom(numpy_helper.from_array(np.full((64, 8), 127, np.int8), w.name))
    with pytest.raises(BuildError, match=r"quantized weights span \[0, 127\], outside \[-64, 64\]"):
        checked(m, src)


def test_modelopt_in_the_same_process_does_not_break_it(tmp_path):
    """ModelOpt patches ONNX Runtime's quantizer for the rest of a process (``calibrate`` for
    TensorRT, then ``--target cpu`` in one Python session failed); the quantizer now runs apart."""
    from modelopt.onnx.quantization.ort_patching import patch_ort_modules

    from onetrans_trt.calibrate.int8_cpu import quantize_scorer

    patch_ort_modules()
    src = _matmul_model(tmp_path, np.linspace(-1, 1, 64 * 8, dtype=np.float32).reshape(64, 8))
    m = quantize_scorer(src, tmp_path, [{"x": np.full((2, 64), 3.0, np.float32)}])
    producer = {o: n for n in m.graph.node for o in n.output}
    [mm] = [n for n in m.graph.node if n.op_type == "MatMul"]
    assert [producer[i].op_type for i in mm.input] == ["DequantizeLinear", "DequantizeLinear"]


@needs_qemu
def test_without_vnni_the_fast_kernel_is_exact_on_7_bit_weights_only(tmp_path):
    """Under ``qemu-x86_64 -cpu Haswell`` (AVX2, no VNNI), with ORT's fast options: the planted
    worst case (every activation 255, every weight at full scale) through our quantizer gives
    the exact product; the same weights in 8 bits saturate (the test has teeth)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from onetrans_trt.calibrate.int8_cpu import quantize_scorer
    from onetrans_trt.onnx_files import save_model

    k = 64
    src = _matmul_model(tmp_path, np.ones((k, 8), np.float32))
    save_model(quantize_scorer(src, tmp_path, [{"x": np.full((1, k), 3.0, np.float32)}]), tmp_path / "s7.onnx")
    quantize_dynamic(str(src), str(tmp_path / "s8.onnx"), weight_type=QuantType.QInt8, reduce_range=False)
    code = f"""
import json, numpy as np
from onetrans_trt.runtime.ort_backend import ort_session
import onnxruntime as ort
x = {{"x": np.full((1, {k}), 3.0, np.float32)}}
ours = ort_session({str(tmp_path / "s7.onnx")!r})
plain8 = ort.InferenceSession({str(tmp_path / "s8.onnx")!r}, ort.SessionOptions(), providers=["CPUExecutionProvider"])
try:
    option = ours.get_session_options().get_session_config_entry("session.x64quantprecision")
except RuntimeError:
    option = None
print(json.dumps([option, float(ours.run(None, x)[0][0, 0]), float(plain8.run(None, x)[0][0, 0])]))
"""
    p = subprocess.run([QEMU, "-cpu", "Haswell", sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    option, s7, s8 = json.loads(p.stdout.strip().splitlines()[-1])
    assert option is None  # the fast kernel, as the backend runs it
    assert s7 == pytest.approx(3.0 * k, rel=1e-6)
    assert s8 < 0.9 * 3.0 * k, f"8-bit weights did not saturate on the emulated CPU ({s8}): the test shows nothing"


@needs_qemu
def test_without_vnni_the_tiny_int8_cpu_scorer_scores_as_here(cpu8, tmp_path):
    from onetrans_trt.runtime.ranker import Ranker

    b, _ = cpu8
    req = _requests(b, 1, 20)[0]
    here = Ranker.load(b, backend="ort-int8-cpu").rank(req).logits
    (tmp_path / "req.json").write_text(json.dumps(req.to_json() if hasattr(req, "to_json") else req))
    code = f"""
import json
from onetrans_trt.runtime.ranker import Ranker
req = json.load(open({str(tmp_path / "req.json")!r}))
print(json.dumps(Ranker.load({str(b)!r}, backend="ort-int8-cpu").rank(req).logits.tolist()))
"""
    p = subprocess.run([QEMU, "-cpu", "Haswell", sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    assert np.array_equal(np.asarray(json.loads(p.stdout.strip().splitlines()[-1]), np.float32), here)
