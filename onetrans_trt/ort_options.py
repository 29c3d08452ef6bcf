"""The ONNX Runtime session options every session of the toolkit starts from.

One setting matters for correctness, not speed: ``session.x64quantprecision``. ONNX Runtime's
CPU kernels for INT8 Q/DQ MatMuls (u8s8) sum pairs of 8-bit products in a saturating 16-bit
register on x86-64 CPUs without VNNI (AVX2-only and AVX-512 without VNNI: many AMD EPYC and
older Xeon hosts, and CI machines). There a Q/DQ graph is not slightly off, it is wrong
(``tests/test_ort_options.py`` runs a one-MatMul model under an emulated Haswell CPU: 8,160
instead of 1,032,256). The option makes ORT use its exact u8u8 kernels on those CPUs and changes
nothing on CPUs with VNNI (ONNX Runtime's ``onnxruntime_session_options_config_keys.h``:
``kOrtSessionOptionsAvx2PrecisionMode``). Our ``ort-int8`` backend stands in for TensorRT's INT8
arithmetic, which has no such saturation, and CPU serving must score the same on every host,
so every session sets it, except on a graph whose INT8 weights are all within 7 bits (the CPU
INT8 variant, ``onetrans_trt/calibrate/int8_cpu.py``): there the fast kernel cannot saturate,
and the option would only slow it down.
"""

from __future__ import annotations

from typing import Any

X64_QUANT_PRECISION = "session.x64quantprecision"
INT8_WEIGHT_BITS_KEY = "onetrans_trt.int8_weight_bits"  # graph metadata: the width of its INT8 weights


def int8_weights_cannot_saturate(model: Any) -> bool:
    """Whether the graph (a ``ModelProto``) says its INT8 weights are 7-bit (written by the CPU
    INT8 variant after checking every weight), so the fast kernels need no exact option."""
    return any(p.key == INT8_WEIGHT_BITS_KEY and p.value == "7" for p in model.metadata_props)


def session_options(*, severity: int = 3, threads: int | None = None, simulate_qdq: bool = False,
                    optimize: bool = True, exact_int8: bool = True) -> Any:
    """``onnxruntime.SessionOptions`` with exact INT8 MatMuls on every x86-64 CPU;
    ``severity``: ORT's log severity (0 verbose .. 4 fatal); ``threads``: intra-op threads;
    ``simulate_qdq``: run Q/DQ pairs as float (no integer kernels); ``optimize=False``: no graph
    optimizations (the graph runs as written); ``exact_int8=False``: ORT's fast INT8 kernels as they
    are (only for a graph whose weights cannot saturate them: 7-bit, see the module docstring)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = severity
    if exact_int8:
        opts.add_session_config_entry(X64_QUANT_PRECISION, "1")
    if simulate_qdq:
        opts.add_session_config_entry("session.disable_quant_qdq", "1")
    if threads:
        opts.intra_op_num_threads = threads
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return opts
