"""FP16 variants of the two graphs (onnxconverter-common), written to ``BUILD/fp16/``.

Inputs and outputs stay float32 (``keep_io_types``), except the K/V between the graphs
when ``kv_fp16`` halves the cache. Norms, the softmax paths (our fused attention ops and
any Softmax/Exp/reductions), and the heads' final logits stay FP32 by default; more op
types or node names can be kept with ``keep_fp32``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onetrans_trt import lineage
from onetrans_trt.errors import BuildError, InputError
from onetrans_trt.export.api import (
    CANDIDATE_SCORER,
    MANIFEST,
    USER_ENCODER,
    _io_spec,
    read_manifest,
    sha256_file,
)
from onetrans_trt.io import atomic_directory, atomic_write_json, locks_build

DEFAULT_FP32_OPS = [
    "RMSNormalization", "LayerNormalization", "SimplifiedLayerNormalization", "Softmax", "Exp", "Log",
    "ReduceMax", "ReduceSum", "ReduceMean", "Pow", "Sqrt", "Reciprocal", "Sigmoid",
    "SharedPrefixAttention", "TailCausalAttention", "SharedDecodeAttention", "Range", "CumSum",
    # onnxconverter-common retypes its value attribute but not its output: keep it FP32 (cast after)
    "ConstantOfShape",
]


def _head_nodes(model: onnx.ModelProto, output: str = "logits", depth: int = 3) -> list[str]:
    """Names of the last few nodes producing ``output`` (the heads' final layers)."""
    producers = {o: n for n in model.graph.node for o in n.output}
    names, frontier = [], [output]
    for _ in range(depth):
        nxt = []
        for t in frontier:
            n = producers.get(t)
            if n is not None and n.name not in names:
                names.append(n.name)
                nxt += [i for i in n.input if i in producers]
        frontier = nxt
    return names


def _ensure_names(model: onnx.ModelProto) -> None:
    for i, n in enumerate(model.graph.node):
        if not n.name:
            n.name = f"{n.op_type}_{i}"


def resolve_keep(keep: list[str] | None, models: dict[str, onnx.ModelProto],
                 option: str = "--keep-fp32") -> tuple[list[str], list[str]]:
    """Split ``keep`` into op types and node names found in ``models`` (unnamed nodes are
    named ``<op>_<index>``, as the conversion names them). An entry that is neither is
    refused, naming it and listing the op types present: a typo must not be a no-op."""
    ops: set[str] = set()
    names: list[str] = []
    for model in models.values():
        for i, n in enumerate(model.graph.node):
            ops.add(n.op_type)
            names.append(n.name or f"{n.op_type}_{i}")
    known = set(names)
    keep = list(keep or [])
    unknown = [k for k in keep if k not in ops and k not in known]
    if unknown:
        raise InputError(f"{option}: unknown {', '.join(repr(k) for k in unknown)}: neither an op type nor a node "
                         f"name in {', '.join(models)}; op types there: {', '.join(sorted(ops))}; or a node name "
                         f"such as {names[0]!r} (list them with `onetrans-trt inspect BUILD --json`)")
    return [k for k in keep if k in ops], [k for k in keep if k in known]


def to_fp16(model: onnx.ModelProto, *, keep_fp32: list[str] | None = None, kv_fp16: bool = False,
            role: str = "user_encoder", kv_names: set[str] | None = None) -> onnx.ModelProto:
    """The FP16 variant of one graph. ``kv_names``: the graph tensors that are per-layer K/V
    (what ``kv_fp16`` recasts); default: our builds' naming, ``user_k_<i>``/``user_v_<i>``. A
    build from ``export --module`` passes the names its spec declares as key/value state, so
    other state whose name happens to start the same way stays float32."""
    from onnxconverter_common import float16

    from onetrans_trt.plugins import attach_op_functions

    copy = onnx.ModelProto()
    copy.CopyFrom(model)  # never the caller's model; no SerializeToString (a graph may exceed 2 GiB)
    model = copy
    _ensure_names(model)
    funcs = list(model.functions)
    # a graph output that is also consumed inside the graph needs an Identity first
    graph = gs.import_onnx(model)
    for out in list(graph.outputs):
        if out.outputs:
            inner = gs.Variable(f"{out.name}__inner", dtype=out.dtype, shape=out.shape)
            for node in list(out.inputs):
                node.outputs = [inner if o is out else o for o in node.outputs]
            for node in list(out.outputs):
                node.inputs = [inner if i is out else i for i in node.inputs]
            graph.nodes.append(gs.Node("Identity", inputs=[inner], outputs=[out]))
    model = gs.export_onnx(graph.cleanup().toposort())
    _ensure_names(model)
    keep = list(keep_fp32 or [])
    present_ops = {n.op_type for n in model.graph.node}
    node_names = {n.name for n in model.graph.node}
    # an entry is an op type where the graph has that op, else a node name (convert_build
    # refuses entries that are neither in any graph)
    op_block = DEFAULT_FP32_OPS + [k for k in keep if k in present_ops and k not in DEFAULT_FP32_OPS]
    node_block = [k for k in keep if k in node_names]
    if role == "candidate_scorer":
        node_block += _head_nodes(model)
    # fresh types for every tensor (the local functions let inference see through our
    # ops), then leave the function bodies alone: they follow their inputs' dtype
    del model.graph.value_info[:]
    model = _infer_shapes(model)
    del model.functions[:]
    converted = float16.convert_float_to_float16(model, keep_io_types=True, op_block_list=op_block,
                                                 node_block_list=node_block, disable_shape_infer=True)
    _align_casts(converted)
    del converted.functions[:]
    converted.functions.extend(funcs)
    converted = _float32_outputs(converted)
    if kv_fp16:
        converted = _kv_to_fp16(converted, role, kv_names)
    return attach_op_functions(converted)


def _infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """ONNX shape inference on a model of any size (a large one through a file with its
    weights beside it: the in-memory form is limited to 2 GiB)."""
    from onetrans_trt.onnx_files import PROTOBUF_LIMIT, has_external, load_model, save_model

    if model.ByteSize() < PROTOBUF_LIMIT - (64 << 20) and not has_external(model):
        return onnx.shape_inference.infer_shapes(model)
    from onetrans_trt.interrupts import temporary_directory

    with temporary_directory(prefix="onetrans-fp16-") as tmp:
        path = Path(tmp) / "model.onnx"
        save_model(model, path, check=False)
        onnx.shape_inference.infer_shapes_path(str(path))
        return load_model(path)


def _float32_outputs(model: onnx.ModelProto) -> onnx.ModelProto:
    """Graph outputs stay float32 (the converter leaves some FP16 behind an Identity), and
    float32 -> float16 -> float32 cast round trips (around kept-FP32 nodes) are dropped,
    so values computed in FP32 are never rounded to FP16 on their way out."""
    graph = gs.import_onnx(model)
    graph.outputs = [_recast_output(graph, o, np.float32) if o.dtype == np.float16 else o for o in graph.outputs]
    _drop_roundtrips(graph)
    return gs.export_onnx(graph.cleanup().toposort())


def _recast_output(graph: gs.Graph, out: gs.Variable, dtype) -> gs.Variable:
    """Make graph output ``out`` a Cast to ``dtype`` of what its producer computed."""
    inner = gs.Variable(f"{out.name}__{np.dtype(out.dtype).name if out.dtype is not None else 'x'}",
                        dtype=out.dtype, shape=out.shape)
    for node in list(out.inputs):
        node.outputs = [inner if o is out else o for o in node.outputs]
    new = gs.Variable(out.name, dtype=dtype, shape=out.shape)
    to = onnx.TensorProto.FLOAT16 if dtype == np.float16 else onnx.TensorProto.FLOAT
    graph.nodes.append(gs.Node("Cast", attrs={"to": to}, inputs=[inner], outputs=[new]))
    return new


def _drop_roundtrips(graph: gs.Graph) -> None:
    for up in [n for n in graph.nodes if n.op == "Cast" and n.attrs.get("to") == onnx.TensorProto.FLOAT]:
        src = up.inputs[0]
        down = src.inputs[0] if src.inputs else None
        if down is None or down.op != "Cast" or down.attrs.get("to") != onnx.TensorProto.FLOAT16:
            continue
        if down.inputs[0].dtype != np.float32:
            continue
        out = up.outputs[0]
        full = down.inputs[0]
        if out in graph.outputs:
            up.inputs = [full]
            up.attrs["to"] = onnx.TensorProto.FLOAT  # a float32 -> float32 cast: an identity
            continue
        for consumer in list(out.outputs):
            consumer.inputs = [full if t is out else t for t in consumer.inputs]
    graph.cleanup()


def _align_casts(model: onnx.ModelProto) -> None:
    """The converter retypes a float Cast's output to FP16 without changing its ``to``."""
    types = {v.name: v.type.tensor_type.elem_type for v in model.graph.value_info}
    for n in model.graph.node:
        if n.op_type != "Cast" or types.get(n.output[0]) != onnx.TensorProto.FLOAT16:
            continue
        for a in n.attribute:
            if a.name == "to" and a.i == onnx.TensorProto.FLOAT:
                a.i = onnx.TensorProto.FLOAT16


def _is_kv_name(name: str) -> bool:
    """Our builds' K/V naming (``onetrans_trt.kv.kv_names``)."""
    return name.startswith("user_k_") or name.startswith("user_v_")


def _kv_to_fp16(model: onnx.ModelProto, role: str, kv_names: set[str] | None = None) -> onnx.ModelProto:
    """User encoder emits FP16 K/V; the scorer takes FP16 K/V (cast up inside). ``kv_names``:
    which tensors are K/V (default: our naming); only float32 ones are recast."""
    graph = gs.import_onnx(model)

    def kv(t) -> bool:
        named = t.name in kv_names if kv_names is not None else _is_kv_name(t.name)
        return named and t.dtype == np.float32
    if role == "user_encoder":
        graph.outputs = [_recast_output(graph, o, np.float16) if kv(o) else o for o in graph.outputs]
    else:
        for i, inp in enumerate(list(graph.inputs)):
            if kv(inp):
                full = gs.Variable(f"{inp.name}__fp32", dtype=np.float32, shape=inp.shape)
                for node in list(inp.outputs):
                    node.inputs = [full if x is inp else x for x in node.inputs]
                half = gs.Variable(inp.name, dtype=np.float16, shape=inp.shape)
                graph.nodes.append(gs.Node("Cast", attrs={"to": onnx.TensorProto.FLOAT}, inputs=[half], outputs=[full]))
                graph.inputs[i] = half
    return gs.export_onnx(graph.cleanup().toposort())  # gs carries the local functions along


def graph_record(directory: Path, fname: str, rel: str) -> dict[str, Any]:
    """A manifest entry for a written variant graph: its file (``rel``), sha256, its external
    data file when it has one, and its inputs and outputs."""
    from onetrans_trt.onnx_files import data_file

    path = directory / fname
    entry: dict[str, Any] = {"file": rel, "sha256": sha256_file(path)}
    side = data_file(path)
    if side.is_file():
        entry["data"] = {"file": side.name, "sha256": sha256_file(side), "bytes": side.stat().st_size}
    return {**entry, **_io_spec(path)}


@locks_build("convert")
def convert_build(build: str | Path, *, keep_fp32: list[str] | None = None, kv_fp16: bool = False) -> dict[str, Any]:
    """Write ``BUILD/fp16/`` (both graphs) and record it in the manifest. On a build from
    ``export --module`` the K/V to recast under ``kv_fp16`` are the spec's key/value state."""
    from onetrans_trt.onnx_files import load_model, refuse_tensors_over_2gib, save_model

    build = Path(build)
    manifest = read_manifest(build)
    out = build / "fp16"
    kv_names = None
    if "protocol" in manifest:
        from onetrans_trt.calibrate.module import kv_graph_names
        from onetrans_trt.validate.module import read_spec

        kv_names = kv_graph_names(read_spec(build))
    sources = {}
    for fname in (USER_ENCODER, CANDIDATE_SCORER):
        if not (build / fname).is_file():
            raise BuildError(f"{build / fname}: missing; re-run `onetrans-trt export`")
    refuse_tensors_over_2gib([build / USER_ENCODER, build / CANDIDATE_SCORER], "convert")
    for role, fname in (("user_encoder", USER_ENCODER), ("candidate_scorer", CANDIDATE_SCORER)):
        sources[role] = load_model(build / fname)
    keep_ops, keep_nodes = resolve_keep(keep_fp32, {f"{r}.onnx": m for r, m in sources.items()})
    info: dict[str, Any] = {"kv_dtype": "float16" if kv_fp16 else "float32",
                            "fp32_ops": DEFAULT_FP32_OPS + [k for k in keep_ops if k not in DEFAULT_FP32_OPS],
                            "fp32_nodes": keep_nodes, "graphs": {}}
    if kv_names is not None:
        info["kv_tensors"] = sorted(kv_names)
    # what fp16/ is made from (lineage): the two graphs as they are now, and how to make it again
    info["lineage"] = lineage.record(manifest, command=["convert", "BUILD", *(["--kv-fp16"] if kv_fp16 else []),
                                                       *(["--keep-fp32", ",".join(keep_fp32)] if keep_fp32 else [])])
    # the whole fp16/ directory is built aside and swapped in: never half old, half new
    with atomic_directory(out, force=True) as tmp_dir:
        for role, fname in (("user_encoder", USER_ENCODER), ("candidate_scorer", CANDIDATE_SCORER)):
            model = to_fp16(sources[role], keep_fp32=keep_fp32, kv_fp16=kv_fp16, role=role, kv_names=kv_names)
            save_model(model, tmp_dir / fname)  # checked; external data beside it when large
            info["graphs"][role] = graph_record(tmp_dir, fname, f"fp16/{fname}")
    manifest.setdefault("precisions", {})["fp16"] = info
    atomic_write_json(build / MANIFEST, manifest)
    return info
