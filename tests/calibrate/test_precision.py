"""FP16 and INT8 variants: ranking quality against the float32 PyTorch model on real
MovieLens test requests (ORT on CPU), and where the precision lives in the graphs."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_graphsurgeon as gs

SOFT_OPS = {"Softmax", "RMSNormalization", "ReduceMax", "ReduceSum", "Exp", "SharedPrefixAttention",
            "TailCausalAttention"}


def test_fp16_quality(small_build):
    build, reports = small_build
    rep = reports["fp16"]
    assert rep["requests"] == 200 and rep["labelled"] > 500
    for task, m in rep["metrics"].items():
        assert abs(m["delta_auc"]) <= 0.0005, (task, m)
    assert rep["ranking"]["top10_overlap_mean"] >= 0.9
    assert json.loads((build / "fp16" / "quality.json").read_text())["variant"] == "fp16"


def test_int8_quality(small_build):
    build, reports = small_build
    rep = reports["int8"]
    for task, m in rep["metrics"].items():
        assert abs(m["delta_auc"]) <= 0.003, (task, m)
    assert rep["ranking"]["top10_overlap_mean"] >= 0.8
    assert (build / "int8" / "calibration.npz").is_file()


def test_fp16_graphs_keep_norms_softmax_and_logits_in_fp32(small_build):
    build, _ = small_build
    for name in ("user_encoder", "candidate_scorer"):
        m = onnx.load(str(build / "fp16" / f"{name}.onnx"))
        g = gs.import_onnx(m)
        assert any(t.dtype == np.float16 for t in g.tensors().values() if isinstance(t, gs.Constant))
        for n in g.nodes:
            if n.op in SOFT_OPS:
                assert all(t.dtype != np.float16 for t in n.inputs if t.dtype is not None), (name, n.op)
        assert all(i.dtype in (np.float32, np.int64) for i in g.inputs)
        assert all(o.dtype == np.float32 for o in g.outputs)
    cs = gs.import_onnx(onnx.load(str(build / "fp16" / "candidate_scorer.onnx")))
    logits = next(o for o in cs.outputs if o.name == "logits")
    assert all(t.dtype != np.float16 for t in logits.inputs[0].inputs if t.dtype is not None)


def test_int8_qdq_around_matmuls_and_none_in_softmax_or_norm_paths(small_build):
    build, _ = small_build
    manifest = json.loads((build / "manifest.json").read_text())
    for name in ("user_encoder", "candidate_scorer"):
        g = gs.import_onnx(onnx.load(str(build / "int8" / f"{name}.onnx")))
        fed_by_dq = [n for n in g.nodes if any(isinstance(t, gs.Variable) and t.inputs and
                                                t.inputs[0].op == "DequantizeLinear" for t in n.inputs)]
        ops = {n.op for n in fed_by_dq}
        assert "MatMul" in ops or "Gemm" in ops, ops
        assert not ops & SOFT_OPS, ops & SOFT_OPS
        info = manifest["precisions"]["int8"]["graphs"][name]
        assert info["qdq"]["QuantizeLinear"] > 0
        assert sum(info["fused"].values()) > 0  # attention fused after quantization


def test_kv_fp16_option(small_build, tmp_path):
    import shutil

    from onetrans_trt.calibrate.fp16 import convert_build
    from onetrans_trt.runtime.ranker import Ranker

    build, _ = small_build
    b = tmp_path / "b"
    shutil.copytree(build, b)
    info = convert_build(b, kv_fp16=True)
    assert info["kv_dtype"] == "float16"
    ue = gs.import_onnx(onnx.load(str(b / "fp16" / "user_encoder.onnx")))
    cs = gs.import_onnx(onnx.load(str(b / "fp16" / "candidate_scorer.onnx")))
    assert all(o.dtype == np.float16 for o in ue.outputs)
    assert all(i.dtype == np.float16 for i in cs.inputs if i.name.startswith("user_"))
    from onetrans_trt.data.movielens import MovieLens

    req, _ = MovieLens().requests(1, n_candidates=8, seed=9)[0]
    a, c = Ranker.load(b).rank(req).logits, Ranker.load(b, backend="ort-fp16").rank(req).logits
    assert np.abs(a - c).max() < 0.02
