"""Theoretical FLOPs of a graph at given dynamic dimensions.

Matrix products dominate these models, so FLOPs are counted as ``2 * M * K * N`` (times
the broadcast batch) for every MatMul and Gemm. Shapes are measured, not guessed: the
graph runs once in ONNX Runtime on placeholder inputs of the requested sizes with every
matmul operand exposed as an output, so the count holds for any symbolic shape logic.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx

MATMUL_OPS = ("MatMul", "Gemm")


def placeholder_feeds(model: onnx.ModelProto, dims: dict[str, int]) -> dict[str, np.ndarray]:
    """Inputs of the requested sizes: zeros for ids (padding), ones for floats, and
    ``s_length`` (HyFormer: ``user_seq_length``) set to the full history so every token is real."""
    feeds = {}
    for v in model.graph.input:
        tt = v.type.tensor_type
        shape = []
        for d in tt.shape.dim:
            if d.dim_param:
                if d.dim_param not in dims:
                    raise KeyError(f"no size given for dimension {d.dim_param!r} of input {v.name!r}")
                shape.append(int(dims[d.dim_param]))
            else:
                shape.append(int(d.dim_value))
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)
        own = re.match(r"^s(\d+)_length$", v.name)  # HyFormer: sequence j's own length, its whole axis
        if v.name in ("s_length", "user_seq_length"):
            feeds[v.name] = np.full(shape, dims.get("history", 1), dtype=dtype)
        elif own:
            feeds[v.name] = np.full(shape, dims.get(f"history{own.group(1)}", dims.get("history", 1)), dtype=dtype)
        elif np.issubdtype(dtype, np.floating):
            feeds[v.name] = np.full(shape, 0.01, dtype=dtype)
        else:
            feeds[v.name] = np.zeros(shape, dtype=dtype)
    return feeds


def graph_flops(path: str | Path | onnx.ModelProto, dims: dict[str, int]) -> dict[str, int]:
    """``{"flops": total, "matmuls": count}`` for one run of the graph at ``dims``; the products
    inside model-local functions (our fused attention nodes, as ONNX Runtime runs them) included."""
    import onnxruntime as ort
    from onetrans_trt.ort_options import session_options

    from onetrans_trt.onnx_files import ON_DISK_BYTES, load_model, session_source

    if isinstance(path, onnx.ModelProto):
        model = onnx.ModelProto()
        model.CopyFrom(path)  # outputs are added below; the caller's model stays as it was
    else:
        # external data read beside the file; tensors of ON_DISK_BYTES or more stay there (the
        # session below gets a temporary copy of the graph with them beside it)
        model = load_model(path, on_disk_above=ON_DISK_BYTES)
    if model.functions:  # products inside our fused attention nodes (model-local functions) count too
        from onnx.inliner import inline_local_functions

        model = inline_local_functions(model)
    inits = {i.name: tuple(i.dims) for i in model.graph.initializer}
    consts = {}
    for n in model.graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    consts[n.output[0]] = tuple(a.t.dims)
    mm = [n for n in model.graph.node if n.op_type in MATMUL_OPS]
    wanted = []
    for n in mm:
        for name in n.input[:2]:
            if name not in inits and name not in consts and name not in wanted:
                wanted.append(name)
    existing = {o.name for o in model.graph.output}
    for name in wanted:
        if name not in existing:
            model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    opts = session_options(optimize=False)
    with session_source(model) as source:  # bytes, or a temporary file with external data when large
        sess = ort.InferenceSession(source, sess_options=opts, providers=["CPUExecutionProvider"])
    outs = sess.run(wanted, placeholder_feeds(model, dims)) if wanted else []
    shapes = {**inits, **consts, **{n: o.shape for n, o in zip(wanted, outs)}}
    total = 0
    for n in mm:
        a, b = shapes[n.input[0]], shapes[n.input[1]]
        if n.op_type == "Gemm":
            attrs = {x.name: x.i for x in n.attribute}
            m_, k_ = (a[1], a[0]) if attrs.get("transA") else (a[0], a[1])
            n_ = b[0] if attrs.get("transB") else b[1]
            total += 2 * m_ * k_ * n_
            continue
        a2 = (1,) + tuple(a) if len(a) == 1 else tuple(a)
        b2 = tuple(b) + (1,) if len(b) == 1 else tuple(b)
        batch = np.broadcast_shapes(a2[:-2], b2[:-2])
        total += 2 * int(np.prod(batch, dtype=np.int64)) * a2[-2] * a2[-1] * b2[-1]
    return {"flops": int(total), "matmuls": len(mm)}
