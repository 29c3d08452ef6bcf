"""validate: a correct build passes; planted defects fail and the divergence finder names
the layer; reports render; goldens validate without PyTorch."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from onetrans_trt.validate.api import validate_build, validate_goldens


def _copy(build: Path, tmp: Path) -> Path:
    dst = tmp / "b"
    shutil.copytree(build, dst)
    return dst


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "onetrans_trt.cli", *map(str, args)], capture_output=True, text=True)


def test_correct_builds_pass_fp32_fp16_int8(small_build, tmp_path):
    build, _ = small_build
    p = _cli("validate", build, "--data", "ml-100k", "--count", "20", "--json-out", tmp_path / "r.json",
             "--html", tmp_path / "r.html")
    assert p.returncode == 0, p.stdout + p.stderr[-2000:]
    rep = json.loads((tmp_path / "r.json").read_text())
    # with int8-cpu/ beside int8/, each INT8 variant is validated under its own name
    assert rep["verdict"] == "pass" and set(rep["backends"]) == {"torch-split", "ort", "ort-fp16", "ort-int8-qdq",
                                                                 "ort-int8-cpu"}
    for b in rep["backends"].values():
        assert b["graphs"]["candidate_scorer"]["logits"]["pass"] and "metrics" in b["end_to_end"]
    assert "report:" in p.stdout


def test_tiny_build_passes_fp32_fp16_int8(tiny_build, tmp_path):
    import warnings

    from onetrans_trt.calibrate.fp16 import convert_build
    from onetrans_trt.calibrate.int8 import calibrate_build

    b = _copy(tiny_build, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        convert_build(b)
        calibrate_build(b, n_samples=64)
    p = _cli("validate", b, "--data", "ml-100k", "--count", "30")
    assert p.returncode == 0, p.stdout + p.stderr[-1500:]
    assert all(f"{n} " in p.stdout for n in ("ort", "ort-fp16", "ort-int8"))


def test_kv_swapped_scorer_is_caught_at_its_layer(tiny_build, tmp_path):
    b = _copy(tiny_build, tmp_path)
    m = onnx.load(str(b / "candidate_scorer.onnx"))
    for n in m.graph.node:
        n.input[:] = [{"user_k_1": "user_v_1", "user_v_1": "user_k_1"}.get(i, i) for i in n.input]
    onnx.save(m, str(b / "candidate_scorer.onnx"))
    rep = validate_build(b, backends=["ort"], n_requests=8)
    d = rep["backends"]["ort"]["divergence"]
    assert rep["verdict"] == "fail" and d["layer"] == 1 and d["role"] == "candidate_scorer", d


def test_pyramid_off_by_one_is_caught_at_its_layer(tiny_build, tmp_path):
    b = _copy(tiny_build, tmp_path)
    q = json.loads((b / "manifest.json").read_text())["pyramid"]["schedule"][0]
    m = onnx.load(str(b / "user_encoder.onnx"))
    consts = {i.name: i for i in m.graph.initializer}
    changed = 0
    for n in m.graph.node:
        if n.op_type == "Slice" and n.input[1] in consts and numpy_helper.to_array(consts[n.input[1]]).tolist() == [-q]:
            name = n.input[1] + "_off"
            if name not in consts:  # one planted constant per original (the graph must stay valid ONNX)
                consts[name] = numpy_helper.from_array(np.array([-(q + 1)], np.int64), name=name)
                m.graph.initializer.append(consts[name])
            n.input[1] = name
            changed += 1
    assert changed
    del m.graph.value_info[:]  # the recorded intermediate shapes no longer hold
    onnx.save(m, str(b / "user_encoder.onnx"))
    rep = validate_build(b, backends=["ort"], n_requests=8)
    d = rep["backends"]["ort"]["divergence"]
    assert rep["verdict"] == "fail" and d["layer"] == 0 and d["role"] == "user_encoder", d


def test_one_weight_perturbed_by_one_percent_is_caught_at_its_layer(tiny_build, tmp_path):
    b = _copy(tiny_build, tmp_path)
    m = onnx.load(str(b / "candidate_scorer.onnx"))
    w = next(i for i in m.graph.initializer if i.name == "model.layers.1.ns_ffn.up.weight")
    w.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w) * 1.01, name=w.name))
    onnx.save(m, str(b / "candidate_scorer.onnx"))
    p = _cli("validate", b, "--data", "ml-100k", "--count", "8", "--backends", "ort")
    assert p.returncode == 1, p.stdout + p.stderr[-1500:]
    assert "first divergence: layer 1, layers.1.ns_ffn.up" in p.stdout, p.stdout


@pytest.mark.heavy  # its own FP16 export (~35 s); the other catches below stay in make test
def test_fp16_norm_forced_to_fp16_overflows_and_is_caught(tiny_ckpt, tmp_path):
    """Activations of a few thousand are fine in FP32 and in an FP32 norm, but a norm
    computed in FP16 squares them past 65504."""
    from onetrans_trt.export.api import export_build
    from onetrans_trt.models.checkpoint import load_checkpoint, save_checkpoint

    import torch

    model = load_checkpoint(tiny_ckpt)
    with torch.no_grad():
        for mlp in model.s_tokenizer.mlps:
            mlp.net[2].weight.mul_(30000.0)
            mlp.net[2].bias.mul_(30000.0)
    ck = save_checkpoint(model, tmp_path / "ck")
    b = tmp_path / "b"
    export_build(ck, b, n_samples=1)
    (b / "fp16").mkdir()
    shutil.copy(b / "candidate_scorer.onnx", b / "fp16" / "candidate_scorer.onnx")
    m = onnx.load(str(b / "user_encoder.onnx"))
    idx, norm = next((i, n) for i, n in enumerate(m.graph.node) if n.op_type == "RMSNormalization")
    x, w = norm.input[0], norm.input[1]
    y = norm.output[0]
    h = lambda s: f"{norm.name}_fp16_{s}"  # noqa: E731
    eps = numpy_helper.from_array(np.array(1e-6, np.float32), h("eps"))
    m.graph.initializer.append(eps)
    # the norm's square held in FP16 (as an FP16 kernel would hold it); ORT's CPU provider
    # runs many FP16 ops in FP32, so the FP16 storage is made explicit with a cast pair
    nodes = [
        helper.make_node("Mul", [x, x], [h("sq32")], name=h("sq")),
        helper.make_node("Cast", [h("sq32")], [h("sq16")], to=onnx.TensorProto.FLOAT16, name=h("to16")),
        helper.make_node("Cast", [h("sq16")], [h("sq")], to=onnx.TensorProto.FLOAT, name=h("to32")),
        helper.make_node("ReduceSum", [h("sq"), h("axes")], [h("ss")], keepdims=1, name=h("sum")),
        helper.make_node("Div", [h("ss"), h("d")], [h("ms")], name=h("mean")),
        helper.make_node("Add", [h("ms"), h("eps")], [h("mse")], name=h("add")),
        helper.make_node("Sqrt", [h("mse")], [h("rms")], name=h("sqrt")),
        helper.make_node("Div", [x, h("rms")], [h("n")], name=h("div")),
        helper.make_node("Mul", [h("n"), w], [y], name=norm.name),  # keeps the norm's module scope
    ]
    m.graph.initializer.append(numpy_helper.from_array(np.array([-1], np.int64), h("axes")))
    d_model = json.loads((b / "config.json").read_text())["d_model"]
    m.graph.initializer.append(numpy_helper.from_array(np.array(d_model, np.float32), h("d")))
    del m.graph.node[idx]
    for k, n in enumerate(nodes):
        m.graph.node.insert(idx + k, n)
    onnx.save(m, str(b / "fp16" / "user_encoder.onnx"))
    ok = validate_build(b, backends=["ort"], n_requests=6)
    assert ok["verdict"] == "pass"  # the same model in FP32 is fine
    rep = validate_build(b, backends=["ort-fp16"], n_requests=6)
    d = rep["backends"]["ort-fp16"]["divergence"]
    assert rep["verdict"] == "fail" and d["layer"] == 0 and d["module"] == "layers.0.s_norm1", d


def test_html_report_renders_in_headless_chromium(tiny_build, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (make test installs it where apt-get is available)")
    from onetrans_trt.validate.report import write_html

    rep = validate_build(tiny_build, backends=["ort"], n_requests=5)
    write_html(rep, tmp_path / "r.html")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync"]
    shot = tmp_path / "shot.png"
    p = subprocess.run([chromium, *flags, f"--user-data-dir={tmp_path / 'u1'}", f"--screenshot={shot}",
                        "--window-size=1000,800", f"file://{tmp_path / 'r.html'}"], capture_output=True, text=True,
                       timeout=120)
    assert shot.is_file() and shot.stat().st_size > 10_000, p.stderr[-1000:]
    dom = subprocess.run([chromium, *flags, f"--user-data-dir={tmp_path / 'u2'}", "--dump-dom",
                          f"file://{tmp_path / 'r.html'}"], capture_output=True, text=True, timeout=120).stdout
    assert "Verdict: PASS" in dom and "<svg" in dom


def test_goldens_validate_without_pytorch(tiny_build, tmp_path):
    rep = validate_build(tiny_build, backends=["ort"], n_requests=5, save_goldens=tmp_path / "g")
    assert rep["verdict"] == "pass" and (tmp_path / "g" / "candidate_scorer_outputs.json").is_file()
    blocker = tmp_path / "notorch.py"
    blocker.write_text(
        "import sys\n"
        "class B:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'torch' or name.startswith('torch.'):\n"
        "            raise ImportError('torch is blocked')\n"
        "sys.meta_path.insert(0, B())\n"
        "from onetrans_trt.cli import main\n"
        "sys.argv = ['onetrans-trt'] + sys.argv[1:]\n"
        "main()\n")
    p = subprocess.run([sys.executable, str(blocker), "validate", str(tiny_build), "--goldens", str(tmp_path / "g"),
                        "--json-out", str(tmp_path / "g.json")], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr[-2000:]
    assert json.loads((tmp_path / "g.json").read_text())["verdict"] == "pass"
    # a perturbed graph fails against the same goldens
    b = _copy(tiny_build, tmp_path)
    m = onnx.load(str(b / "candidate_scorer.onnx"))
    w = next(i for i in m.graph.initializer if i.name == "model.layers.0.ns_o.weight")
    w.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w) * 1.05, name=w.name))
    onnx.save(m, str(b / "candidate_scorer.onnx"))
    assert validate_goldens(b, tmp_path / "g", backends=["ort"])["verdict"] == "fail"


def test_bad_inputs_exit_2(tiny_build, tmp_path):
    assert _cli("validate", tiny_build).returncode == 2
    (tmp_path / "p.json").write_text('{"fp32": {"atol": 1, "bogus": 2}}')
    p = _cli("validate", tiny_build, "--data", "ml-100k", "--policy", tmp_path / "p.json")
    assert p.returncode == 2 and "unknown keys" in p.stderr
    p = _cli("validate", tiny_build, "--data", "ml-100k", "--backends", "ort-int8")
    assert p.returncode == 2 and "not available" in p.stderr
    p = _cli("validate", tiny_build, "--goldens", tmp_path)
    assert p.returncode == 2 and "not a goldens directory" in p.stderr
