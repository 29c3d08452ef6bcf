"""The CPU INT8 variant (``BUILD/int8-cpu/``): a candidate scorer for ONNX Runtime's integer kernels.

TensorRT's INT8 graph (``int8/``, explicit Q/DQ, per-channel weights from ``calibrate``) does
not run on ORT's CPU integer kernels: they refuse a per-channel zero point on the NS tokens'
batched ``[T, d, d]`` weights, so ORT runs it as simulated quantization, no faster than FP32.
``calibrate --target cpu`` builds this variant for those kernels instead, chosen by
measurement (README "CPU INT8"; ``tools/cpu_int8_probe.py``):

- ONNX Runtime's static quantization (``quantize_static``, QDQ format) of every MatMul with a
  constant weight: weights INT8 with one scale per weight tensor (symmetric), activations UINT8
  with one scale and zero point per tensor from ``MinMax`` calibration on the same real requests
  as ``calibrate`` (the scorer on each user's candidates with the K/V the float32 encoder made).
  Dynamic quantization was as fast here but makes a candidate's score depend on the other
  candidates of its call (the activation range is the whole batch's): measured, scores moved as
  much as their whole INT8 error when the batch was halved. Static scales do not move;
- weights in **7 bits** (``reduce_range``; symmetric, so in [-64, 64]). ORT's u8s8 kernel on
  CPUs without VNNI (AVX2) adds pairs of u8 x s8 products in a saturating 16-bit lane
  (``vpmaddubsw``): 2 x 255 x 127 overflows it, 2 x 255 x 64 = 32,640 does not. With 7-bit
  weights the fast kernel is exact on every x86-64 CPU, so the variant runs without
  ``session.x64quantprecision`` (which costs about 10% here); :func:`quantize_scorer` checks
  every INT8 weight is in range and marks the graph (``onetrans_trt.int8_weight_bits`` = ``7``,
  ``onetrans_trt/ort_options.py``) so sessions know it is safe;
- the scorer only: the user encoder runs once per request and is a small part of its time
  (``bench``), so ``int8-cpu/`` pairs an INT8 scorer with the build's float32 encoder and the
  user's K/V stay exact.

Attention scores and softmax stay float (our fused attention ops and their bodies have no
MatMul with a constant weight); so do norms, and so do the ``Gemm`` layers (the tokenizers' and
heads' MLPs with a bias: a small share of the FLOPs): quantizing them too took the worst logit
error on a trained ``small`` from 0.026 to 0.49 (200 MovieLens requests, 2026-12-03).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

import numpy as np
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
    """``(count, min, max)`` over the graph's INT8 weight tensors (initializers of rank >= 2)."""
    from onnx import numpy_helper

    lo, hi, n = 0, 0, 0
    for t in model.graph.initializer:
        if t.data_type == onnx.TensorProto.INT8 and len(t.dims) >= 2:
            a = numpy_helper.to_array(t)
            if a.size:
                lo, hi, n = min(lo, int(a.min())), max(hi, int(a.max())), n + 1
    return n, lo, hi


def quantize_scorer(src: str | Path, work: str | Path, feed_list: list[dict[str, np.ndarray]]) -> onnx.ModelProto:
    """The CPU INT8 form of the scorer graph at ``src`` (its external data beside it),
    calibrated on ``feed_list`` and built in the directory ``work``; refused
    (:class:`BuildError`) when a weight falls outside 7 bits or nothing was quantized.

    ONNX Runtime's quantizer runs in a child process: NVIDIA ModelOpt (``calibrate``'s INT8 for
    TensorRT) replaces methods of ORT's calibrators and quantizers for the rest of any process it
    runs in (``modelopt/onnx/quantization/ort_patching.py``, ``patch_ort_modules``), after which
    ``quantize_static`` here failed ("Quantization parameters are not specified for param ...")."""
    import subprocess
    import sys

    from onetrans_trt.onnx_files import load_model

    if not feed_list:
        raise BuildError("no calibration requests for the CPU INT8 scorer")
    work = Path(work)
    out, feeds_path = work / "scorer_int8.onnx", work / "calibration_feeds.npz"
    with open(feeds_path, "wb") as fh:
        np.savez(fh, **{f"{i}/{k}": v for i, f in enumerate(feed_list) for k, v in f.items()})
    p = subprocess.run([sys.executable, "-m", "onetrans_trt.calibrate.int8_cpu", str(src), str(out), str(feeds_path)],
                       capture_output=True, text=True)
    if p.returncode != 0:
        why = next((ln for ln in reversed(p.stderr.strip().splitlines()) if ln.strip()), f"exit {p.returncode}")
        raise BuildError(f"{src}: ONNX Runtime's static quantization failed ({why[:200]})")
    return checked(load_model(out), src)


def checked(model: onnx.ModelProto, src: str | Path) -> onnx.ModelProto:
    """``model`` (a quantized scorer) with every INT8 weight checked to be within
    [-:data:`SAFE_WEIGHT`, :data:`SAFE_WEIGHT`] and marked so (:class:`BuildError` otherwise, or
    when nothing was quantized)."""
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


def _quantize(src: str, out: str, feeds_path: str) -> None:
    """The child process's work: ``quantize_static`` of ``src`` into ``out`` on the feeds saved
    at ``feeds_path`` (``<i>/<input>`` arrays; no pickle)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    from onetrans_trt.calibrate.data import FeedReader, feeds

    with np.load(feeds_path, allow_pickle=False) as z:
        feed_list = feeds({f"scorer/{k}": z[k] for k in z.files}, "scorer")
    logging.getLogger().setLevel(logging.ERROR)  # its "consider pre-processing" advice
    quantize_static(src, out, FeedReader(feed_list), quant_format=QuantFormat.QDQ, per_channel=False,
                    reduce_range=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    op_types_to_quantize=["MatMul"], calibrate_method=CalibrationMethod.MinMax,
                    use_external_data_format=True, extra_options={"MatMulConstBOnly": True})


@locks_build("calibrate")
def calibrate_int8_cpu(build: str | Path, *, n_samples: int = 128, data_dir=None, inputs: str | Path | None = None,
                       synthetic: bool = False, progress: Callable[[str, int, int], None] | None = None
                       ) -> dict[str, Any]:
    """Write ``BUILD/int8-cpu/`` (the INT8 scorer and ``calibration.npz``) and record the variant
    in the manifest (its lineage: both graphs, since the scorer is calibrated on, and reads, the
    float32 encoder's K/V). Calibration requests as ``calibrate``'s: MovieLens training-period
    ones, ``inputs``, or ``synthetic`` when asked; a module build's from its spec."""
    from onetrans_trt.calibrate.data import build_calibration_set, feeds
    from onetrans_trt.calibrate.fp16 import graph_record
    from onetrans_trt.calibrate.int8 import calibrate_command, calibration_source
    from onetrans_trt.export.api import sha256_file
    from onetrans_trt.interrupts import temporary_directory
    from onetrans_trt.onnx_files import refuse_tensors_over_2gib, save_model

    say = progress or (lambda stage, i, n: None)
    build = Path(build)
    manifest = read_manifest(build)
    src = build / CANDIDATE_SCORER
    if not src.is_file():
        raise BuildError(f"{src}: missing; re-run `onetrans-trt export`")
    refuse_tensors_over_2gib([src], "calibrate")
    if "protocol" in manifest:
        from onetrans_trt.calibrate.module import calibration_set
        from onetrans_trt.validate.module import read_spec

        spec = read_spec(build)
        reqs, source = calibration_source(spec, n_samples, inputs, synthetic)
        arrays = calibration_set(build, spec, reqs, source, progress=lambda i, n: say("calibration data", i, n))
    else:
        arrays = build_calibration_set(build, n_samples, data_dir=data_dir, inputs=inputs, synthetic=synthetic,
                                       progress=lambda i, n: say("calibration data", i, n))
        source = str(arrays["source"])
    info: dict[str, Any] = {
        "calibration": {"file": f"{VARIANT}/calibration.npz", "requests": int(arrays["count"]), "source": source,
                        "method": "minmax"},
        "scheme": "static QDQ", "weight_bits": WEIGHT_BITS, "weights": "INT8, per tensor, symmetric",
        "activations": "UINT8, per tensor (calibrated)", "graphs": {},
        "lineage": lineage.record(manifest, command=calibrate_command(n_samples, None, inputs, synthetic, target="cpu"))}
    say("quantize candidate_scorer", 0, 1)
    with temporary_directory(prefix="onetrans-int8cpu-") as work, \
            atomic_directory(build / VARIANT, force=True) as tmp_dir:
        model = quantize_scorer(src, work, feeds(arrays, "scorer"))
        n, lo, hi = weight_range(model)
        info["quantized_matmuls"] = n
        info["weight_span"] = [lo, hi]
        save_model(model, tmp_dir / CANDIDATE_SCORER)
        info["graphs"]["candidate_scorer"] = graph_record(tmp_dir, CANDIDATE_SCORER, f"{VARIANT}/{CANDIDATE_SCORER}")
        with open(tmp_dir / "calibration.npz", "wb") as fh:
            np.savez(fh, **arrays)
    say("done", 1, 1)
    ue = dict(manifest["graphs"]["user_encoder"])
    ue.setdefault("sha256", sha256_file(build / ue.get("file", "user_encoder.onnx")))
    info["graphs"]["user_encoder"] = {**ue, "shared": "the build's float32 user encoder"}
    manifest.setdefault("precisions", {})[VARIANT] = info
    atomic_write_json(build / MANIFEST, manifest)
    return info


if __name__ == "__main__":  # the child process of quantize_scorer
    import sys

    try:
        _quantize(*sys.argv[1:4])
    except Exception as e:  # noqa: BLE001 - one line for the parent's error message
        print(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", file=sys.stderr)
        sys.exit(1)
