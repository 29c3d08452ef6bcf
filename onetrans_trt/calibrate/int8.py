"""INT8 variants with explicit Q/DQ from NVIDIA ModelOpt ONNX PTQ, on real data.

Quantization runs on the unfused graphs (ModelOpt's shape inference cannot see through
custom ops), re-cut from ``BUILD/serving.onnx`` with the build's passes minus fusion;
then the attention fusion runs on the quantized graphs. By default the attention
score/softmax products (MatMuls of two activations), norms and softmax stay in float
(``high_precision_dtype``), so Q/DQ sit around the projection/FFN/tokenizer/head matmuls.
Calibration: ``max``, CPU execution provider, per-channel weights (ModelOpt's default).
ModelOpt writes temporary files in the working directory, so it runs in a temp dir.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onetrans_trt.errors import MissingCapabilityError
from onetrans_trt.io import locks_build

FLOAT_OPS = ["Softmax", "RMSNormalization", "LayerNormalization", "ReduceMax", "ReduceSum", "ReduceMean", "Exp",
             "Sigmoid", "Gelu", "Div", "Where", "Pow", "Sqrt"]


def attention_matmuls(model: onnx.ModelProto) -> list[str]:
    """MatMuls whose both operands are activations (attention scores and P@V)."""
    consts = {i.name for i in model.graph.initializer} | {
        n.output[0] for n in model.graph.node if n.op_type == "Constant"}
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and not (set(n.input) & consts)]


def _named(model: onnx.ModelProto) -> onnx.ModelProto:
    for i, n in enumerate(model.graph.node):
        if not n.name:
            n.name = f"{n.op_type}_{i}"
    return model


def quantize_graph(model: onnx.ModelProto, feed_list: list[dict[str, np.ndarray]], *,
                   keep_float: list[str] | None = None, high_precision_dtype: str = "fp32",
                   log: Callable[[str], None] | None = None) -> onnx.ModelProto:
    """ModelOpt INT8 PTQ of one graph; returns the Q/DQ model."""
    try:
        from modelopt.onnx.quantization import quantize
    except ImportError:
        raise MissingCapabilityError("NVIDIA ModelOpt is not installed: pip install nvidia-modelopt lief "
                                     "cppimport onnxconverter-common (not the [onnx] extra)") from None
    from onetrans_trt.calibrate.data import FeedReader

    model = _named(onnx.ModelProto.FromString(model.SerializeToString()))
    keep = list(keep_float or [])
    present_ops = {n.op_type for n in model.graph.node}
    node_names = {n.name for n in model.graph.node}
    # an entry is an op type where the graph has that op, else a node name (calibrate_build
    # refuses entries that are neither in either graph)
    op_excl = FLOAT_OPS + [k for k in keep if k in present_ops and k not in FLOAT_OPS]
    node_excl = attention_matmuls(model) + [k for k in keep if k in node_names]
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory(prefix="onetrans-int8-") as tmp:
        src, dst = Path(tmp) / "in.onnx", Path(tmp) / "out.onnx"
        onnx.save(model, str(src))
        os.chdir(tmp)
        buf = io.StringIO()
        try:
            with contextlib.redirect_stdout(buf):
                quantize(str(src), quantize_mode="int8", calibration_data_reader=FeedReader(feed_list),
                         calibration_method="max", calibration_eps=["cpu"], op_types_to_quantize=["MatMul", "Gemm"],
                         op_types_to_exclude=op_excl,
                         nodes_to_exclude=node_excl, high_precision_dtype=high_precision_dtype,
                         disable_mha_qdq=True, output_path=str(dst), log_level="ERROR")
        finally:
            os.chdir(cwd)
        if log:
            log(buf.getvalue())
        return onnx.load(str(dst))


def qdq_summary(model: onnx.ModelProto) -> dict[str, Any]:
    """Which ops take quantized inputs (a DequantizeLinear feeding them)."""
    g = gs.import_onnx(model)
    fed: dict[str, int] = {}
    for n in g.nodes:
        if any(i.inputs and i.inputs[0].op == "DequantizeLinear" for i in n.inputs if isinstance(i, gs.Variable)):
            fed[n.op] = fed.get(n.op, 0) + 1
    return {"QuantizeLinear": sum(1 for n in g.nodes if n.op == "QuantizeLinear"),
            "DequantizeLinear": sum(1 for n in g.nodes if n.op == "DequantizeLinear"), "ops_fed_by_dq": fed}


@locks_build("calibrate")
def calibrate_build(build: str | Path, *, n_samples: int = 64, data_dir=None, keep_float: list[str] | None = None,
                    fuse: bool = True, progress: Callable[[str, int, int], None] | None = None,
                    inputs: str | Path | None = None, synthetic: bool = False) -> dict[str, Any]:
    """Write ``BUILD/int8/`` (both graphs + ``calibration.npz``) and record it in the manifest."""
    from onetrans_trt.calibrate.data import build_calibration_set, feeds
    from onetrans_trt.export.api import (
        CANDIDATE_SCORER,
        MANIFEST,
        USER_ENCODER,
        _io_spec,
        default_passes,
        read_manifest,
        sha256_file,
        split_with_passes,
    )
    from onetrans_trt.graphs.fuse_attention import count_fused, fuse_attention
    from onetrans_trt.io import atomic_directory, atomic_write_json
    from onetrans_trt.plugins import attach_op_functions

    say = progress or (lambda stage, i, n: None)
    build = Path(build)
    manifest = read_manifest(build)
    out = build / "int8"
    from onetrans_trt.calibrate.fp16 import resolve_keep

    ue, cs, _ = split_with_passes(build, *default_passes(fuse_attention=False))
    # names are those of the unfused graphs that get quantized (as quantize_graph names them)
    keep_ops, keep_nodes = resolve_keep(keep_float, {"user_encoder (unfused)": _named(gs.export_onnx(ue)),
                                                     "candidate_scorer (unfused)": _named(gs.export_onnx(cs))},
                                        option="--keep-float")
    arrays = build_calibration_set(build, n_samples, data_dir=data_dir, inputs=inputs, synthetic=synthetic,
                                   progress=lambda i, n: say("calibration data", i, n))
    info: dict[str, Any] = {"calibration": {"file": "int8/calibration.npz", "requests": int(arrays["count"]),
                                            "source": str(arrays["source"]), "method": "max"},
                            "float_ops": FLOAT_OPS + [k for k in keep_ops if k not in FLOAT_OPS],
                            "float_nodes": keep_nodes, "graphs": {}}
    # the whole int8/ directory is built aside and swapped in: never half old, half new
    with atomic_directory(out, force=True) as tmp_dir:
        with open(tmp_dir / "calibration.npz", "wb") as fh:
            np.savez(fh, **arrays)
        for i, (role, fname, graph, key) in enumerate((("user_encoder", USER_ENCODER, ue, "user"),
                                                      ("candidate_scorer", CANDIDATE_SCORER, cs, "scorer"))):
            say(f"quantize {role}", i, 2)
            q = quantize_graph(gs.export_onnx(graph), feeds(arrays, key), keep_float=keep_float)
            summary = qdq_summary(q)
            g = gs.import_onnx(q)
            if fuse:
                g = fuse_attention(g)
            model = attach_op_functions(gs.export_onnx(g))
            onnx.checker.check_model(model)
            onnx.save(model, str(tmp_dir / fname))
            info["graphs"][role] = {"file": f"int8/{fname}", "sha256": sha256_file(tmp_dir / fname),
                                    "qdq": summary, "fused": count_fused(g), **_io_spec(tmp_dir / fname)}
    say("done", 2, 2)
    manifest.setdefault("precisions", {})["int8"] = info
    atomic_write_json(build / MANIFEST, manifest)
    return info
