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

import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
import onnx.inliner
import onnx_graphsurgeon as gs

from onetrans_trt import interrupts, lineage
from onetrans_trt import log as logs
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
    """ModelOpt INT8 PTQ of one graph; returns the Q/DQ model.

    A graph holding our fused nodes (domain ``onetrans``: a module build's scorer after the
    ``shared-prefix`` rewrite, or a module that calls ``onetrans_trt.ops``) never reaches
    ModelOpt as such: with TensorRT installed ModelOpt hands graphs with custom ops to the
    TensorRT execution provider, which does not know our plugins, and its shape inference
    cannot see into them. Each such node is replaced by its ONNX function body (standard ops,
    the same math), the graph is quantized, and the node is put back in place of its body
    (:func:`_inline_fused` / :func:`_refold_fused`); :func:`_prove_refold` then runs both forms
    on the first calibration feed."""
    try:
        from modelopt.onnx.quantization import quantize
    except ImportError:
        raise MissingCapabilityError("NVIDIA ModelOpt is not installed: pip install nvidia-modelopt lief "
                                     "cppimport onnxconverter-common (not the [onnx] extra)") from None
    from onetrans_trt.calibrate.data import FeedReader
    from onetrans_trt.onnx_files import load_model, save_model

    copy = onnx.ModelProto()
    copy.CopyFrom(model)  # never the caller's model; no SerializeToString (a graph may exceed 2 GiB)
    model = _named(copy)
    keep = list(keep_float or [])
    present_ops = {n.op_type for n in model.graph.node}
    node_names = {n.name for n in model.graph.node}
    # an entry is an op type where the graph has that op, else a node name (calibrate_build
    # refuses entries that are neither in either graph)
    op_excl = FLOAT_OPS + [k for k in keep if k in present_ops and k not in FLOAT_OPS]
    node_excl = [k for k in keep if k in node_names]
    model, fused = _inline_fused(model)
    node_excl = attention_matmuls(model) + node_excl
    cwd = os.getcwd()
    with interrupts.temporary_directory(prefix="onetrans-int8-") as tmp:
        src, dst = Path(tmp) / "in.onnx", Path(tmp) / "out.onnx"
        save_model(model, src, check=False)
        os.chdir(tmp)
        try:
            with logs.captured_output("modelopt") as buf:  # ModelOpt prints: into the log (-v shows it)
                quantize(str(src), quantize_mode="int8", calibration_data_reader=FeedReader(feed_list),
                         calibration_method="max", calibration_eps=["cpu"], op_types_to_quantize=["MatMul", "Gemm"],
                         op_types_to_exclude=op_excl,
                         nodes_to_exclude=node_excl, high_precision_dtype=high_precision_dtype,
                         disable_mha_qdq=True, output_path=str(dst), log_level=logs.modelopt_level())
        finally:
            os.chdir(cwd)
        if log:
            log(buf.getvalue())
        q = load_model(dst)
    if fused:
        inlined = q
        q = _refold_fused(q, fused)
        if feed_list:
            _prove_refold(inlined, q, feed_list[0])
    return q


INLINED = "__onetrans_inlined__"  # name prefix of the nodes of an inlined fused node's body


def _inline_fused(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[onnx.NodeProto]]:
    """Replace every node of domain ``onetrans`` by its model-local function body; returns the
    model and the replaced nodes (to put back). Body nodes are named ``INLINED<i>_...``."""
    from onetrans_trt.plugins import DOMAIN

    fused = [n for n in model.graph.node if n.domain == DOMAIN]
    if not fused:
        return model, []
    have = {f.name for f in model.functions if f.domain == DOMAIN}
    missing = sorted({n.op_type for n in fused} - have)
    if missing:
        from onetrans_trt.plugins import attach_op_functions

        model = attach_op_functions(model)
        have = {f.name for f in model.functions if f.domain == DOMAIN}
        missing = sorted({n.op_type for n in fused} - have)
        if missing:
            from onetrans_trt.errors import BuildError

            raise BuildError(f"the graph holds {missing} (domain {DOMAIN}) without a function body to calibrate "
                             "through; re-export the build")
    saved = []
    for n in fused:
        keep = onnx.NodeProto()
        keep.CopyFrom(n)
        saved.append(keep)
    before = {n.name for n in model.graph.node}
    inlined = onnx.inliner.inline_selected_functions(model, [(DOMAIN, name) for name in sorted(have)],
                                                     exclude=False)
    for i, n in enumerate(inlined.graph.node):
        if n.name not in before or not n.name:
            n.name = f"{INLINED}{i}_{n.op_type}"
    if any(n.domain == DOMAIN for n in inlined.graph.node):
        from onetrans_trt.errors import BuildError

        raise BuildError(f"inlining left nodes of domain {DOMAIN} in the graph; cannot calibrate it")
    return inlined, saved


def _refold_fused(model: onnx.ModelProto, fused: list[onnx.NodeProto]) -> onnx.ModelProto:
    """Put each fused node back: it takes its original inputs and produces its original
    outputs; the body that produced them is then unused and removed."""
    from onetrans_trt.errors import BuildError
    from onetrans_trt.plugins import attach_op_functions

    graph = gs.import_onnx(model)
    tensors = graph.tensors()
    for n in fused:
        missing = [t for t in [*n.input, *n.output] if t and t not in tensors]
        if missing:
            raise BuildError(f"quantization renamed {missing}, the inputs/outputs of {n.op_type} {n.name!r}; "
                             "cannot put the fused node back")
        outs = [tensors[t] for t in n.output]
        for t in outs:
            for producer in list(t.inputs):
                producer.outputs = [gs.Variable(f"{t.name}__inlined_body", dtype=t.dtype, shape=t.shape)
                                    if o is t else o for o in producer.outputs]
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in attrs.items()}
        graph.nodes.append(gs.Node(n.op_type, name=n.name, domain=n.domain, attrs=attrs,
                                   inputs=[tensors[t] for t in n.input], outputs=outs))
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    out = gs.export_onnx(graph)
    left = [x.name for x in out.graph.node if x.name.startswith(INLINED)]
    if left:
        raise BuildError(f"quantization put nodes into the body of a fused node ({left[:3]}); cannot put the fused "
                         "node back")
    del out.functions[:]
    return attach_op_functions(out)


def _prove_refold(inlined: onnx.ModelProto, refolded: onnx.ModelProto, feed: dict[str, np.ndarray],
                  atol: float = 1e-5) -> None:
    """Both forms of the quantized graph, run in ONNX Runtime (Q/DQ as float math), agree."""
    from onetrans_trt.errors import BuildError
    from onetrans_trt.onnx_files import session_source
    from onetrans_trt.runtime.ort_backend import _quiet_ort

    import onnxruntime as ort
    from onetrans_trt.ort_options import session_options

    _quiet_ort()
    opts = session_options(severity=4, simulate_qdq=True)
    outs = []
    for m in (inlined, refolded):
        with session_source(m) as source:
            sess = ort.InferenceSession(source, sess_options=opts, providers=["CPUExecutionProvider"])
        names = [o.name for o in sess.get_outputs()]
        outs.append(dict(zip(names, sess.run(None, {i.name: feed[i.name] for i in sess.get_inputs()}))))
    for name, a in outs[0].items():
        b = outs[1][name]
        if a.shape != b.shape or (a.size and float(np.abs(a.astype(np.float64) - b).max()) > atol * max(1.0, float(np.abs(a).max()))):
            raise BuildError(f"the quantized graph with its fused nodes put back differs from its inlined form on "
                             f"{name}; not writing it")


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
        default_passes,
        read_manifest,
        split_with_passes,
    )
    from onetrans_trt.calibrate.fp16 import graph_record
    from onetrans_trt.graphs.fuse_attention import count_fused, fuse_attention
    from onetrans_trt.io import atomic_directory, atomic_write_json
    from onetrans_trt.onnx_files import save_model
    from onetrans_trt.plugins import attach_op_functions

    say = progress or (lambda stage, i, n: None)
    build = Path(build)
    manifest = read_manifest(build)
    from onetrans_trt.onnx_files import refuse_tensors_over_2gib

    refuse_tensors_over_2gib([p for p in (build / USER_ENCODER, build / CANDIDATE_SCORER) if p.is_file()], "calibrate")
    if "protocol" in manifest:
        return _calibrate_module(build, manifest, n_samples=n_samples, keep_float=keep_float, say=say,
                                 inputs=inputs, synthetic=synthetic)
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
            save_model(model, tmp_dir / fname)  # checked; external data beside it when large
            info["graphs"][role] = {**graph_record(tmp_dir, fname, f"int8/{fname}"), "qdq": summary,
                                    "fused": count_fused(g)}
    say("done", 2, 2)
    # lineage: serving.onnx is re-cut and quantized; the user encoder makes the scorer's calibration K/V
    info["lineage"] = lineage.record(manifest, ("serving", "user_encoder", "candidate_scorer"),
                                     calibrate_command(n_samples, keep_float, inputs, synthetic))
    manifest.setdefault("precisions", {})["int8"] = info
    atomic_write_json(build / MANIFEST, manifest)
    return info


def calibrate_command(n_samples: int, keep_float, inputs, synthetic: bool, target: str = "tensorrt") -> list[str]:
    """``calibrate`` as it was run (for the re-run a stale int8/ or int8-cpu/ names)."""
    return ["calibrate", "BUILD", *(["--target", target] if target != "tensorrt" else []), "--samples", str(n_samples),
            *(["--inputs", str(Path(inputs).resolve())] if inputs is not None else []),
            *(["--synthetic"] if synthetic else []),
            *(["--keep-float", ",".join(keep_float)] if keep_float else [])]


def calibration_source(spec, n_samples: int, inputs: str | Path | None, synthetic: bool):
    """A module build's calibration requests and their label: exactly the ``inputs`` file's,
    or ``n_samples`` synthetic ones from the spec when asked; neither is an InputError."""
    from onetrans_trt.calibrate.module import describe, read_requests, synthetic_calibration
    from onetrans_trt.errors import InputError

    if inputs is not None and synthetic:
        raise InputError("--inputs and --synthetic exclude each other: calibrate on one source")
    if inputs is not None:
        reqs, label = read_requests(inputs, spec)
        return reqs, f"{label}: {describe(reqs)}"
    if synthetic:
        reqs = synthetic_calibration(spec, n_samples)
        return reqs, (f"synthetic (asked for): {n_samples} random users from the spec, histories empty to "
                      f"over-long, {reqs[0][1][next(iter(reqs[0][1]))].shape[0]} candidates each")
    raise InputError("a module build has no dataset of its own: calibrate it on your inputs (--inputs FILE.npz) or "
                     "on random inputs drawn from its spec (--synthetic)")


def _calibrate_module(build: Path, manifest: dict, *, n_samples: int, keep_float, say, inputs,
                      synthetic: bool) -> dict[str, Any]:
    """``calibrate`` on a build from ``export --module``: its own graphs are quantized (fused
    nodes go through :func:`quantize_graph`'s inline and refold), the scorer calibrated on the
    candidates plus the state the float32 ONNX Runtime user encoder produced for each user."""
    from onetrans_trt.calibrate.data import feeds
    from onetrans_trt.calibrate.fp16 import graph_record, resolve_keep
    from onetrans_trt.calibrate.module import calibration_set
    from onetrans_trt.export.api import CANDIDATE_SCORER, MANIFEST, USER_ENCODER
    from onetrans_trt.graphs.fuse_attention import count_fused
    from onetrans_trt.io import atomic_directory, atomic_write_json
    from onetrans_trt.onnx_files import load_model, save_model
    from onetrans_trt.validate.module import read_spec

    spec = read_spec(build)
    graphs = {role: load_model(build / fname) for role, fname in (("user_encoder", USER_ENCODER),
                                                                 ("candidate_scorer", CANDIDATE_SCORER))}
    keep_ops, keep_nodes = resolve_keep(keep_float, {role: _named(m) for role, m in graphs.items()},
                                        option="--keep-float")
    reqs, source = calibration_source(spec, n_samples, inputs, synthetic)
    arrays = calibration_set(build, spec, reqs, source, progress=lambda i, n: say("calibration data", i, n))
    info: dict[str, Any] = {"calibration": {"file": "int8/calibration.npz", "requests": int(arrays["count"]),
                                            "source": source, "method": "max"},
                            "float_ops": FLOAT_OPS + [k for k in keep_ops if k not in FLOAT_OPS],
                            "float_nodes": keep_nodes, "graphs": {}}
    out = build / "int8"
    with atomic_directory(out, force=True) as tmp_dir:
        with open(tmp_dir / "calibration.npz", "wb") as fh:
            np.savez(fh, **arrays)
        for i, (role, fname, key) in enumerate((("user_encoder", USER_ENCODER, "user"),
                                                ("candidate_scorer", CANDIDATE_SCORER, "scorer"))):
            say(f"quantize {role}", i, 2)
            q = quantize_graph(graphs[role], feeds(arrays, key), keep_float=keep_float)
            save_model(q, tmp_dir / fname)  # checked; external data beside it when large
            info["graphs"][role] = {**graph_record(tmp_dir, fname, f"int8/{fname}"), "qdq": qdq_summary(q),
                                    "fused": count_fused(gs.import_onnx(q))}
    say("done", 2, 2)
    info["lineage"] = lineage.record(manifest, command=calibrate_command(n_samples, keep_float, inputs, synthetic))
    manifest.setdefault("precisions", {})["int8"] = info
    atomic_write_json(build / MANIFEST, manifest)
    return info
