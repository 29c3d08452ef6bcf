"""The precision variants of a build and the ONNX Runtime backends that run them: one table.

==============  ==============  ========================================  ======================
variant         directory       made by                                   ONNX Runtime backend
==============  ==============  ========================================  ======================
``fp32``        the build       ``export``                                ``ort``
``fp16``        ``fp16/``       ``convert``                               ``ort-fp16``
``int8``        ``int8/``       ``calibrate`` (Q/DQ: what TensorRT runs)   ``ort-int8-qdq``
``int8-cpu``    ``int8-cpu/``   ``calibrate --target cpu``                ``ort-int8-cpu``
==============  ==============  ========================================  ======================

``ort-int8`` names the build's INT8 for the hardware it runs on: on the CPU execution provider
``int8-cpu/`` when the build has it (ONNX Runtime's integer kernels, the fast path on CPU),
else ``int8/``; on a GPU provider ``int8/``. ``int8-cpu/`` holds only a candidate scorer:
its user encoder is the build's float32 one (the scorer is nearly all of a request's time).

Low in the layering: names and paths only, no ONNX Runtime, no files read.
"""

from __future__ import annotations

from pathlib import Path

SUBDIR = {"fp32": "", "fp16": "fp16", "int8": "int8", "int8-cpu": "int8-cpu"}
MADE_BY = {"fp16": ["convert", "BUILD"], "int8": ["calibrate", "BUILD"],
           "int8-cpu": ["calibrate", "BUILD", "--target", "cpu"]}
BACKEND_OF = {"fp32": "ort", "fp16": "ort-fp16", "int8": "ort-int8-qdq", "int8-cpu": "ort-int8-cpu"}
VARIANT_OF = {b: v for v, b in BACKEND_OF.items()}
ORT_BACKENDS = ["ort", "ort-fp16", "ort-int8", "ort-int8-qdq", "ort-int8-cpu"]
# which of the variant's graphs it holds itself; the others are the build's float32 ones
OWN_GRAPHS = {"fp16": ("user_encoder", "candidate_scorer"), "int8": ("user_encoder", "candidate_scorer"),
              "int8-cpu": ("candidate_scorer",)}


def has_variant(build: str | Path, variant: str) -> bool:
    """Whether ``build`` holds the variant's scorer graph (fp32: the build's own)."""
    return (Path(build) / SUBDIR[variant] / "candidate_scorer.onnx").is_file()


def variant_of(build: str | Path, backend: str, *, on_cpu: bool = True) -> str:
    """The variant an ONNX Runtime backend runs: ``ort-int8`` resolves to ``int8-cpu`` on the CPU
    when the build has it, else to ``int8``; the others name theirs. ``on_cpu``: whether the
    sessions run on the CPU execution provider."""
    if backend == "ort-int8":
        return "int8-cpu" if on_cpu and has_variant(build, "int8-cpu") else "int8"
    if backend not in VARIANT_OF:
        raise KeyError(backend)
    return VARIANT_OF[backend]


def graph_file(variant: str, role: str) -> str:
    """The variant's graph of ``role`` (``user_encoder``/``candidate_scorer``) relative to its
    build (what ``OrtSplitBackend(build, user_graph=...)`` takes)."""
    if variant == "fp32" or role not in OWN_GRAPHS[variant]:
        return f"{role}.onnx"
    return f"{SUBDIR[variant]}/{role}.onnx"


def graph_path(build: str | Path, variant: str, role: str) -> Path:
    """Where the variant's graph of ``role`` (``user_encoder``/``candidate_scorer``) lies."""
    return Path(build) / graph_file(variant, role)


def make_command(variant: str) -> str:
    """The command line that makes ``variant``, every choice spelled out (``BUILD`` for the build)."""
    args = MADE_BY[variant] + (["--precision", "fp16"] if variant == "fp16" else [])
    return "onetrans-trt " + " ".join(args)


def int8_backends(build: str | Path) -> list[str]:
    """The INT8 backends a listing of every backend of ``build`` shows (``validate``, ``bench``):
    ``ort-int8-qdq`` and ``ort-int8-cpu`` when it has ``int8-cpu/`` (``ort-int8`` would repeat one
    of them), else ``ort-int8`` (which then names ``int8/``)."""
    return ["ort-int8-qdq", "ort-int8-cpu"] if has_variant(build, "int8-cpu") else ["ort-int8"]
