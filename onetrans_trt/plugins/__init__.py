"""Our custom attention ops, one folder each, with interchangeable backends:

- ``reference.py``: the PyTorch definition every other form is tested against;
- ``onnx_function.py``: an ONNX function body of standard ops (ONNX Runtime runs graphs
  holding the node on CPU);
- ``triton_kernel.py``: a flash-style Triton kernel (CPU interpreter in tests, AOT PTX);
- ``trt_plugin.py``: the TensorRT 11 plugin (``tensorrt.plugin``, ahead-of-time impl).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import onnx

from onetrans_trt.plugins._onnx import DOMAIN, PLUGIN_NAMESPACE, attach_functions, strip_functions  # noqa: F401


@dataclass(frozen=True)
class OpInfo:
    name: str
    package: str
    summary: str

    def module(self, backend: str):
        return importlib.import_module(f"{self.package}.{backend}")


OPS = {
    "SharedPrefixAttention": OpInfo(
        "SharedPrefixAttention", "onetrans_trt.plugins.shared_prefix_attention",
        "candidate scorer: C candidates' NS queries over one user's K/V (shared) plus their own, causal"),
    "TailCausalAttention": OpInfo(
        "TailCausalAttention", "onetrans_trt.plugins.tail_causal_attention",
        "user encoder: newest Lq of Lk S-tokens, bottom-right causal (causal=1) or bidirectional (causal=0), "
        "padded histories"),
    "SegmentedPrefixAttention": OpInfo(
        "SegmentedPrefixAttention", "onetrans_trt.plugins.segmented_prefix_attention",
        "candidate scorer across users: each candidate's NS queries over its own user's packed K/V plus its own"),
    "SharedDecodeAttention": OpInfo(
        "SharedDecodeAttention", "onetrans_trt.plugins.shared_decode_attention",
        "HyFormer query decoding: C candidates' queries over one user's K/V of one sequence (shared), nothing own"),
}


def attach_op_functions(model: onnx.ModelProto) -> onnx.ModelProto:
    """Attach the ONNX function of every one of our ops the graph uses (for ORT)."""
    used = {n.op_type for n in model.graph.node if n.domain == DOMAIN}
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 18)
    funcs = [OPS[name].module("onnx_function").function(opset) for name in sorted(used) if name in OPS]
    return attach_functions(model, funcs) if funcs else model


def register_trt_plugins() -> None:
    """Register every op's TensorRT plugin (raises MissingCapabilityError without TensorRT)."""
    for info in OPS.values():
        info.module("trt_plugin").register()


def backend_status() -> dict[str, dict[str, str]]:
    """What each op can run on here: ``available`` or why not."""
    import importlib.util

    have_triton = importlib.util.find_spec("triton") is not None
    try:
        import tensorrt  # noqa: F401

        trt = "available"
    except Exception as e:  # noqa: BLE001 - a broken install raises all sorts
        trt = f"unavailable: tensorrt cannot be imported ({type(e).__name__}); install the 'trt' extra on a GPU host"
    gpu = _gpu_status()
    out = {}
    for name in OPS:
        out[name] = {
            "reference": "available (PyTorch)",
            "onnx_function": "available (ONNX Runtime, any execution provider)",
            "triton": ("available: CPU interpreter (TRITON_INTERPRET=1) and AOT PTX/cubin" + (f"; {gpu}" if gpu else ""))
            if have_triton else "unavailable: install the 'kernels' extra (triton)",
            "tensorrt_plugin": trt if trt != "available" or gpu.startswith("GPU") else f"{trt}, but {gpu}",
        }
    return out


def _gpu_status() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return f"GPU: {torch.cuda.get_device_name(0)}"
    except Exception:  # noqa: BLE001
        pass
    return "no CUDA GPU visible"
