"""The CPU INT8 variant (``BUILD/int8-cpu/``): a candidate scorer for ONNX Runtime's integer kernels.

TensorRT's INT8 graph (``int8/``, explicit Q/DQ, per-channel weights from ``calibrate``) does
not run on ORT's CPU integer kernels: they refuse a per-channel zero point on the NS tokens'
batched ``[T, d, d]`` weights, so ORT runs it as simulated quantization, no faster than FP32.
This variant is built for those kernels instead, chosen by measurement
(``tools/cpu_int8_probe.py``, README "CPU INT8"):

- ONNX Runtime's dynamic quantization of every MatMul with a constant weight
  (``quantize_dynamic``: ``MatMulInteger`` fed by ``DynamicQuantizeLinear``, which ORT fuses to
  ``DynamicQuantizeMatMul``): weights INT8 with one scale per weight tensor, activations
  quantized per tensor at run time from their own range, so there is nothing to calibrate and
  no calibration set that could miss a request's range;
- weights in **7 bits** (``reduce_range``; symmetric, so in [-64, 64]). ORT's u8s8 kernel on
  CPUs without VNNI (AVX2) adds pairs of u8 x s8 products in a saturating 16-bit lane
  (``vpmaddubsw``): 2 x 255 x 127 overflows it, 2 x 255 x 64 = 32,640 does not. With 7-bit weights the fast kernel is exact on every x86-64
  CPU, so the variant runs without ``session.x64quantprecision`` (which costs about 10% here);
  :func:`quantize_scorer` checks every INT8 weight is in range and marks the graph
  (``onetrans_trt.int8_weight_bits`` = ``7``, ``onetrans_trt/ort_options.py``) so sessions know
  it is safe;
- the scorer only: the user encoder runs once per request and is a small part of its time
  (``bench``), so ``int8-cpu/`` pairs an INT8 scorer with the build's float32 encoder and the
  user's K/V stay exact.

Attention scores and softmax stay float (our fused attention ops and their bodies have no
MatMul with a constant weight); so do norms.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import onnx

from onetrans_trt import lineage
from onetrans_trt.errors import BuildError
from onetrans_trt.export.api import CANDIDATE_SCORER, MANIFEST, read_manifest
from onetrans_trt.io import atomic_directory, atomic_write_json, locks_build
from onetrans_trt.ort_options import INT8_WEIGHT_BITS_KEY

VARIANT = "int8-cpu"
WEIGHT_BITS = 7
SAFE_WEIGHT = 64  # the largest |weight| whose u8 x s8 pair sums fit a signed 16-bit lane: 2*255*64 <= 32767
INTEGER_OPS = ("MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "QLinearMatMul")


def weight_range(model: onnx.ModelProto) -> tuple[int, int, int]:
    """``(count, min, max)`` over the INT8 weights the graph's integer MatMuls read (input B)."""
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    lo, hi, n = 0, 0, 0
    for node in model.graph.node:
        if node.op_type in INTEGER_OPS and len(node.input) > 1 and node.input[1] in inits:
            t = inits[node.input[1]]
            if t.data_type != onnx.TensorProto.INT8:
                continue
            a = numpy_helper.to_array(t)
            if a.size:
                lo, hi, n = min(lo, int(a.min())), max(hi, int(a.max())), n + 1
    return n, lo, hi


def quantize_scorer(src: str | Path, work: str | Path) -> onnx.ModelProto:
    """The CPU INT8 form of the scorer graph at ``src`` (its external data beside it), built in
    the directory ``work``; refused (:class:`BuildError`) when a weight falls outside 7 bits
    or nothing was quantized."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from onetrans_trt.log import captured_output
    from onetrans_trt.onnx_files import load_model

    out = Path(work) / "scorer_int8.onnx"
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # its "consider pre-processing" advice goes to the root logger
    try:
        with captured_output("onnxruntime.quantization"):
            quantize_dynamic(str(src), str(out), weight_type=QuantType.QInt8, per_channel=False,
                             reduce_range=True, op_types_to_quantize=["MatMul"],
                             extra_options={"MatMulConstBOnly": True}, use_external_data_format=True)
    except Exception as e:  # noqa: BLE001 - the quantizer raises untyped errors
        raise BuildError(f"{src}: ONNX Runtime's dynamic quantization failed ({str(e).splitlines()[0][:200]})") \
            from None
    finally:
        root.setLevel(level)
    model = load_model(out)
    n, lo, hi = weight_range(model)
    if n == 0:
        raise BuildError(f"{src}: no MatMul with a constant weight to quantize; the CPU INT8 variant would be the "
                         "float32 scorer")
    if lo < -SAFE_WEIGHT or hi > SAFE_WEIGHT:
        raise BuildError(f"{src}: quantized weights span [{lo}, {hi}], outside [-{SAFE_WEIGHT}, {SAFE_WEIGHT}]; "
                         "ORT's fast integer kernel could saturate on CPUs without VNNI")
    del model.metadata_props[:]
    model.metadata_props.add(key=INT8_WEIGHT_BITS_KEY, value=str(WEIGHT_BITS))
    model.metadata_props.add(key="onetrans_trt.variant", value=VARIANT)
    return model


@locks_build("convert")
def convert_int8_cpu(build: str | Path) -> dict[str, Any]:
    """Write ``BUILD/int8-cpu/candidate_scorer.onnx`` and record the variant in the manifest
    (its lineage: both graphs of the build, since the scorer reads the float32 encoder's K/V)."""
    from onetrans_trt.calibrate.fp16 import graph_record
    from onetrans_trt.export.api import sha256_file
    from onetrans_trt.interrupts import temporary_directory
    from onetrans_trt.onnx_files import refuse_tensors_over_2gib, save_model

    build = Path(build)
    manifest = read_manifest(build)
    src = build / CANDIDATE_SCORER
    if not src.is_file():
        raise BuildError(f"{src}: missing; re-run `onetrans-trt export`")
    refuse_tensors_over_2gib([src], "convert")
    info: dict[str, Any] = {"scheme": "dynamic", "weight_bits": WEIGHT_BITS, "weights": "per tensor, symmetric",
                            "activations": "per tensor, at run time", "graphs": {},
                            "lineage": lineage.record(manifest, command=["convert", "BUILD", "--precision", VARIANT])}
    with temporary_directory(prefix="onetrans-int8cpu-") as work, \
            atomic_directory(build / VARIANT, force=True) as tmp_dir:
        model = quantize_scorer(src, work)
        n, lo, hi = weight_range(model)
        info["quantized_matmuls"] = n
        info["weight_span"] = [lo, hi]
        save_model(model, tmp_dir / CANDIDATE_SCORER)
        info["graphs"]["candidate_scorer"] = graph_record(tmp_dir, CANDIDATE_SCORER, f"{VARIANT}/{CANDIDATE_SCORER}")
    ue = manifest["graphs"]["user_encoder"]
    info["graphs"]["user_encoder"] = {"file": ue.get("file", "user_encoder.onnx"),
                                      "sha256": ue.get("sha256") or sha256_file(build / "user_encoder.onnx"),
                                      "shared": "the build's float32 user encoder"}
    manifest.setdefault("precisions", {})[VARIANT] = info
    atomic_write_json(build / MANIFEST, manifest)
    return info
