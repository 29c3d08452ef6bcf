"""A Triton Inference Server model repository for a build.

    REPO/user_encoder/config.pbtxt       batched over users (dynamic batching)
    REPO/user_encoder/1/model.onnx       (or model.plan with --backend tensorrt)
    REPO/candidate_scorer/config.pbtxt   C candidates of one user + that user's K/V
    REPO/candidate_scorer/1/model.onnx
    REPO/onetrans/config.pbtxt           ensemble: history + candidates -> logits, probs

Every ``config.pbtxt`` is parsed back with Triton's own ``ModelConfig`` protobuf
(``tritonclient``) before the repository is moved into place.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from onetrans_trt.errors import BuildError, MissingCapabilityError
from onetrans_trt.io import atomic_directory

DTYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "int64": "TYPE_INT64", "int32": "TYPE_INT32"}


def _dims(shape: list, drop_first: bool) -> str:
    dims = [(-1 if isinstance(d, str) else int(d)) for d in shape]
    return ", ".join(str(d) for d in (dims[1:] if drop_first else dims))


def _tensor(spec: dict, drop_first: bool) -> str:
    dims = _dims(spec["shape"], drop_first)
    extra = ""
    if drop_first and not dims:  # a per-item scalar: Triton wants [1], the model sees []
        dims, extra = "1", " reshape: { shape: [ ] }"
    return f'  {{ name: "{spec["name"]}" data_type: {DTYPES[spec["dtype"]]} dims: [ {dims} ]{extra} }}'


def model_config(name: str, platform: str, io: dict, *, max_batch: int = 0, dynamic_batching: bool = False) -> str:
    batched = max_batch > 0
    lines = [f'name: "{name}"', f'platform: "{platform}"', f"max_batch_size: {max_batch}",
             "input [", ",\n".join(_tensor(s, batched) for s in io["inputs"]), "]",
             "output [", ",\n".join(_tensor(s, batched) for s in io["outputs"]), "]",
             "instance_group [ { count: 1 kind: KIND_AUTO } ]"]
    if dynamic_batching:
        lines.append("dynamic_batching { max_queue_delay_microseconds: 200 }")
    return "\n".join(lines) + "\n"


def ensemble_config(manifest: dict, name: str = "onetrans") -> str:
    ue, cs = manifest["graphs"]["user_encoder"], manifest["graphs"]["candidate_scorer"]
    hist = ue["inputs"]
    ns = [s for s in cs["inputs"] if s["name"].startswith("ns_")]
    kv = [o["name"] for o in ue["outputs"]]
    ins = ",\n".join(_tensor(s, False) for s in hist + ns)
    outs = ",\n".join(_tensor(s, False) for s in cs["outputs"])
    step1 = "\n".join([f'        input_map {{ key: "{s["name"]}" value: "{s["name"]}" }}' for s in hist] +
                      [f'        output_map {{ key: "{k}" value: "{k}" }}' for k in kv])
    step2 = "\n".join([f'        input_map {{ key: "{s["name"]}" value: "{s["name"]}" }}' for s in ns] +
                      ['        input_map { key: "s_length" value: "s_length" }'] +
                      [f'        input_map {{ key: "{k}" value: "{k}" }}' for k in kv] +
                      [f'        output_map {{ key: "{o["name"]}" value: "{o["name"]}" }}' for o in cs["outputs"]])
    return (f'name: "{name}"\nplatform: "ensemble"\nmax_batch_size: 0\ninput [\n{ins}\n]\noutput [\n{outs}\n]\n'
            "ensemble_scheduling {\n  step [\n"
            f'    {{\n        model_name: "user_encoder"\n        model_version: -1\n{step1}\n    }},\n'
            f'    {{\n        model_name: "candidate_scorer"\n        model_version: -1\n{step2}\n    }}\n'
            "  ]\n}\n")


def parse_config(text: str):
    """Parse with Triton's ModelConfig protobuf; raises on any error."""
    try:
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2
    except ImportError:
        raise MissingCapabilityError("validating config.pbtxt needs tritonclient: pip install 'tritonclient[grpc]'") \
            from None
    return text_format.Parse(text, model_config_pb2.ModelConfig())


def write_repository(build: str | Path, out: str | Path, *, backend: str = "onnxruntime", precision: str = "fp32",
                     force: bool = False) -> dict[str, Any]:
    from onetrans_trt.export.api import read_manifest
    from onetrans_trt.plugins import strip_functions  # noqa: F401  (engines are built from stripped graphs)

    build, out = Path(build), Path(out)
    manifest = read_manifest(build)
    if out.exists() and not force:
        raise BuildError(f"{out} already exists; pass --force to replace it")
    if precision not in ("fp32", "fp16", "int8"):
        raise BuildError(f"precision {precision!r}: expected fp32, fp16 or int8")
    if precision != "fp32" and precision not in (manifest.get("precisions") or {}):
        how = {"fp16": "convert", "int8": "calibrate"}[precision]
        raise BuildError(f"{build} has no {precision} variant; run `onetrans-trt {how} {build}` first")
    sub = {"fp32": "", "fp16": "fp16", "int8": "int8"}[precision]
    written: dict[str, str] = {}
    with atomic_directory(out, force=force) as tmp:
        for role in ("user_encoder", "candidate_scorer"):
            io = manifest["graphs"][role] if precision == "fp32" else manifest["precisions"][precision]["graphs"][role]
            (tmp / role / "1").mkdir(parents=True)
            if backend == "onnxruntime":
                src = (build / sub / f"{role}.onnx") if sub else build / f"{role}.onnx"
                dst, platform = tmp / role / "1" / "model.onnx", "onnxruntime_onnx"
            else:
                src = build / "engines" / precision / f"{role}.engine"
                dst, platform = tmp / role / "1" / "model.plan", "tensorrt_plan"
            if not src.is_file():
                how = "onetrans-trt build" if backend == "tensorrt" else "onetrans-trt export/convert/calibrate"
                raise BuildError(f"{src}: missing; run `{how}` first")
            shutil.copyfile(src, dst)
            maxb = manifest["dynamic_dims"]["users"]["max"] if role == "user_encoder" else 0
            text = model_config(role, platform, io, max_batch=maxb, dynamic_batching=role == "user_encoder")
            parse_config(text)
            (tmp / role / "config.pbtxt").write_text(text)
            written[role] = text
        text = ensemble_config(manifest)
        parse_config(text)
        (tmp / "onetrans" / "1").mkdir(parents=True)
        (tmp / "onetrans" / "config.pbtxt").write_text(text)
        written["onetrans"] = text
    return {"repository": str(out), "backend": backend, "precision": precision, "models": sorted(written)}
