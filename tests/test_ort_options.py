"""Every ONNX Runtime session runs INT8 MatMuls exactly, also on x86-64 CPUs without VNNI.

ORT's u8s8 CPU kernels saturate a 16-bit sum on AVX2-only hosts (``onetrans_trt.ort_options``).
This machine has VNNI, so the saturation is shown under ``qemu-x86_64 -cpu Haswell`` (user-mode
emulation of an AVX2 CPU without VNNI): a planted one-MatMul model and the tiny build's INT8
user encoder, each with ORT's default options (wrong) and with ours (the same numbers as here).
"""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onetrans_trt.ort_options import X64_QUANT_PRECISION, session_options

PKG = Path(__file__).resolve().parents[1] / "onetrans_trt"
QEMU = shutil.which("qemu-x86_64")
needs_qemu = pytest.mark.skipif(QEMU is None, reason="qemu-x86_64 not installed (make test installs Debian's "
                                                      "qemu-user): no CPU without VNNI to run on")
K = 64


def test_no_session_is_made_without_our_options():
    """No module builds ``SessionOptions`` itself, and every ``InferenceSession`` gets ours."""
    found = []
    for path in sorted(PKG.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            rel = path.relative_to(PKG).as_posix()
            if name == "SessionOptions" and rel != "ort_options.py":
                found.append(f"{rel}:{node.lineno} SessionOptions()")
            if name == "InferenceSession" and not any(k.arg == "sess_options" for k in node.keywords):
                found.append(f"{rel}:{node.lineno} InferenceSession without sess_options")
    assert not found, found


def test_our_sessions_carry_the_exact_int8_option(tmp_path):
    from onetrans_trt.runtime.ort_backend import ort_session

    path = _saturating_model(tmp_path)
    assert session_options().get_session_config_entry(X64_QUANT_PRECISION) == "1"
    sess = ort_session(path)
    assert sess.get_session_options().get_session_config_entry(X64_QUANT_PRECISION) == "1"
    got = sess.run(None, {"x": np.full((1, K), 127, np.float32)})[0]
    assert np.array_equal(got, np.full((1, 8), 127 * 127 * K, np.float32))


@needs_qemu
def test_without_vnni_a_planted_int8_matmul_is_exact_only_with_our_options(tmp_path):
    path = _saturating_model(tmp_path)
    out = _under_haswell(f"""
import numpy as np, onnxruntime as ort
from onetrans_trt.runtime.ort_backend import ort_session
x = {{"x": np.full((1, {K}), 127, np.float32)}}
plain = ort.InferenceSession({str(path)!r}, ort.SessionOptions(), providers=["CPUExecutionProvider"])
print(json.dumps([float(plain.run(None, x)[0][0, 0]), float(ort_session({str(path)!r}).run(None, x)[0][0, 0])]))
""")
    plain, ours = out
    assert ours == 127 * 127 * K
    assert plain < ours / 10, f"the emulated CPU did not saturate ({plain}): the test shows nothing"


@needs_qemu
def test_without_vnni_the_tiny_int8_encoder_scores_as_here(tiny_int8_build, tmp_path):
    """The CI failure of 2026-12-02 (ort-int8 user_v_1 0.472 > 0.407 on a host without VNNI),
    reproduced and gone: the INT8 encoder under emulation with ORT's defaults is far from the
    float graph; with our options it gives this host's numbers."""
    from onetrans_trt.runtime.ort_backend import ort_session

    b = tiny_int8_build
    z = np.load(b / "int8" / "calibration.npz")
    feeds = [{k.split("/", 2)[2]: z[k] for k in z.files if k.startswith(f"user/{i}/")} for i in range(8)]
    np.savez(tmp_path / "feeds.npz", **{f"{i}/{k}": v for i, f in enumerate(feeds) for k, v in f.items()})
    ref, here = ort_session(b / "user_encoder.onnx"), ort_session(b / "int8" / "user_encoder.onnx")
    names = [o.name for o in ref.get_outputs()]
    fp32 = [ref.run(None, f) for f in feeds]
    int8_here = [here.run(None, f) for f in feeds]
    out = _under_haswell(f"""
import numpy as np, onnxruntime as ort
from onetrans_trt.runtime.ort_backend import ort_session
z = np.load({str(tmp_path / "feeds.npz")!r})
feeds = [{{k.split("/", 1)[1]: z[k] for k in z.files if k.startswith(f"{{i}}/")}} for i in range(8)]
g = {str(b / "int8" / "user_encoder.onnx")!r}
plain = ort.InferenceSession(g, ort.SessionOptions(), providers=["CPUExecutionProvider"])
ours = ort_session(g)
np.savez({str(tmp_path / "emulated.npz")!r}, **{{f"{{s}}/{{i}}/{{j}}": o for s, sess in (("plain", plain), ("ours", ours))
         for i, f in enumerate(feeds) for j, o in enumerate(sess.run(None, f))}})
print("[]")
""")
    assert out == []
    em = np.load(tmp_path / "emulated.npz")

    def worst(kind):
        return max(float(np.abs(em[f"{kind}/{i}/{j}"] - fp32[i][j]).max()) for i in range(8) for j in range(len(names)))

    here_err = max(float(np.abs(int8_here[i][j] - fp32[i][j]).max()) for i in range(8) for j in range(len(names)))
    same = max(float(np.abs(em[f"ours/{i}/{j}"] - int8_here[i][j]).max()) for i in range(8) for j in range(len(names)))
    assert same <= 1e-5, f"emulated with our options differs from this host by {same}"
    assert worst("plain") > 3 * here_err, (worst("plain"), here_err)


def _saturating_model(tmp_path: Path) -> Path:
    """x (1, K) -> Q/DQ int8 (scale 1, zero point 0) @ an int8 weight of 127s: every u8s8 pair sums
    2 x 255 x 127 > 32767 in ORT's 16-bit register on CPUs without VNNI."""
    init = [numpy_helper.from_array(np.array(1.0, np.float32), "s"), numpy_helper.from_array(np.array(0, np.int8), "z"),
            numpy_helper.from_array(np.full((K, 8), 127, np.int8), "wq")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
             helper.make_node("DequantizeLinear", ["wq", "s", "z"], ["wd"]),
             helper.make_node("MatMul", ["xd", "wd"], ["y"])]
    g = helper.make_graph(nodes, "saturate", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, K])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])], init)
    path = tmp_path / "saturate.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 19)]), str(path))
    return path


def _under_haswell(code: str):
    """Run ``code`` in this interpreter under qemu's Haswell (AVX2, no VNNI); its last stdout
    line is JSON."""
    p = subprocess.run([QEMU, "-cpu", "Haswell", sys.executable, "-c", "import json\n" + code],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    return json.loads(p.stdout.strip().splitlines()[-1])
