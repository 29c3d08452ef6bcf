"""A Triton Inference Server model repository for a build.

    REPO/user_encoder/config.pbtxt       batched over users (dynamic batching)
    REPO/user_encoder/1/model.onnx       (or model.plan with --backend tensorrt)
    REPO/candidate_scorer/config.pbtxt   C candidates of one user + that user's K/V
    REPO/candidate_scorer/1/model.onnx
    REPO/onetrans/config.pbtxt           ensemble: history + candidates -> logits, probs

Every ``config.pbtxt`` is parsed back with Triton's own ``ModelConfig`` protobuf
(``tritonclient``) before the repository is moved into place. (``serve-repo --backend
python``, the repository a CPU-only Triton serves, is written by
:mod:`onetrans_trt.serving.repository` with the same tensor contract.)

Every build (both families, and ``export --module``) gets the same three models, their
inputs and outputs read from its graphs (names, dtypes, dynamic dimensions as -1): the user
encoder batches over users (a per-user scalar travels as ``[1]`` reshaped to ``[]``), the
scorer takes one user's state with the encoder's client-facing rank (``[1, ...]``, reshaped
to the graph's shape where they differ), any user input it reads too (OneTrans's
``s_length``: ``[1, 1]``, reshaped to the graph's ``[1]``) and the candidates' inputs, and
the ``onetrans`` ensemble maps the user's inputs (one user: ``[1, ...]``; a per-user scalar
``[1, 1]``) and the candidates' inputs (``[C, ...]``) to the task outputs (``logits``,
``probs``). :func:`check_ensemble` then proves every ensemble tensor has one dtype and one
rank wherever it is produced or consumed (Triton's own load-time check lets a rank mismatch
through, and the request fails later: the old ``s_length`` wiring, ``[-1]`` into a batching
encoder's ``[N, 1]`` and a scorer's ``[1]``, did exactly that); what an ensemble cannot
express is an :class:`~onetrans_trt.errors.InputError` naming the tensor.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from onetrans_trt import lineage
from onetrans_trt.errors import BuildError, InputError, MissingCapabilityError
from onetrans_trt.io import atomic_directory, atomic_write_json

DTYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "int64": "TYPE_INT64", "int32": "TYPE_INT32"}
# a module build's graphs may carry more (Triton's data types, model_config.proto)
MODULE_DTYPES = {**DTYPES, "bool": "TYPE_BOOL", "bfloat16": "TYPE_BF16", "float64": "TYPE_FP64",
                 "int8": "TYPE_INT8", "uint8": "TYPE_UINT8", "int16": "TYPE_INT16", "uint16": "TYPE_UINT16",
                 "uint32": "TYPE_UINT32", "uint64": "TYPE_UINT64"}


def parse_config(text: str):
    """Parse with Triton's ModelConfig protobuf; raises on any error."""
    try:
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2
    except ImportError:
        raise MissingCapabilityError("validating config.pbtxt needs tritonclient: pip install 'tritonclient[grpc]'") \
            from None
    return text_format.Parse(text, model_config_pb2.ModelConfig())


def _copy_graph(src: Path, dst: Path) -> None:
    """Copy a graph into a model version directory as ``dst``, with its external data files
    (their recorded locations are relative to the graph's own directory, so they keep their
    names beside it); the graph is checked first (external data confined to its directory)."""
    import onnx

    from onetrans_trt.trust import check_onnx

    model = check_onnx(src)
    shutil.copyfile(src, dst)
    tensors = list(model.graph.initializer) + [a.t for n in model.graph.node for a in n.attribute if a.HasField("t")]
    for where in sorted({e.value for t in tensors if t.data_location == onnx.TensorProto.EXTERNAL
                         for e in t.external_data if e.key == "location"}):
        target = dst.parent / where
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src.parent / where, target)


# ---------------------------------------------------------------- module builds

def _triton_dtype(t: dict, where: str) -> str:
    dt = MODULE_DTYPES.get(t["dtype"])
    if dt is None:
        raise InputError(f"{where} {t['name']}: dtype {t['dtype']} has no Triton data type")
    return dt


def _wild(shape: list) -> list[int]:
    """Graph dims as Triton dims: a named or unknown dimension is -1."""
    return [int(d) if isinstance(d, int) and d > 0 else -1 for d in shape]


def _batched(t: dict, role: str, batch_dim: str = "users") -> dict:
    """A tensor of a batching model: the graph's first axis is the batch (``users``)."""
    shape = t["shape"]
    if not shape or shape[0] != batch_dim:
        raise InputError(f"{role} {t['name']}: its first axis is {shape[0] if shape else 'missing'!r}, not the "
                         f"dynamic {batch_dim!r} axis Triton batches over; a Triton ensemble cannot express it")
    dims = _wild(shape[1:])
    return {"name": t["name"], "type": _triton_dtype(t, role), "dims": dims or [1],
            "reshape": None if dims else []}


def _plain(t: dict, role: str) -> dict:
    dims = _wild(t["shape"])
    return {"name": t["name"], "type": _triton_dtype(t, role), "dims": dims or [1], "reshape": None if dims else []}


def _render(t: dict) -> str:
    extra = "" if t["reshape"] is None else f" reshape: {{ shape: [ {', '.join(map(str, t['reshape']))} ] }}"
    return f'  {{ name: "{t["name"]}" data_type: {t["type"]} dims: [ {", ".join(map(str, t["dims"]))} ]{extra} }}'


def _config(name: str, platform: str, inputs: list[dict], outputs: list[dict], max_batch: int,
            dynamic_batching: bool, comment: str = "", *, parameters: dict[str, str] | None = None) -> str:
    """``platform``: ``onnxruntime_onnx``, ``tensorrt_plan``, ``ensemble``, or ``backend:NAME``
    for a backend without a platform (``backend:python``); ``parameters``: string parameters."""
    kind = "KIND_AUTO"
    head = f'platform: "{platform}"'
    if platform.startswith("backend:"):
        head, kind = f'backend: "{platform.split(":", 1)[1]}"', "KIND_CPU"
    lines = ([f"# {c}" for c in comment.splitlines()] if comment else []) + [
        f'name: "{name}"', head, f"max_batch_size: {max_batch}",
        "input [", ",\n".join(_render(t) for t in inputs), "]",
        "output [", ",\n".join(_render(t) for t in outputs), "]"]
    if platform != "ensemble":
        lines.append(f"instance_group [ {{ count: 1 kind: {kind} }} ]")
    if dynamic_batching:
        lines.append("dynamic_batching { max_queue_delay_microseconds: 200 }")
    for k, v in (parameters or {}).items():
        lines.append(f"parameters {{ key: {json.dumps(k)} value: {{ string_value: {json.dumps(v)} }} }}")
    return "\n".join(lines) + "\n"


def client_shape(t: dict, max_batch: int) -> list[int]:
    """The shape a tensor has outside its model (what an ensemble tensor must match): its
    ``dims`` (after ``reshape``), plus the batch axis when the model batches."""
    return ([-1] if max_batch > 0 else []) + list(t["dims"])


def module_models(manifest: dict, io: dict[str, dict], user_max_batch: int) -> dict[str, Any]:
    """The three models of a module build's repository as tensor lists (see the module
    docstring); raises InputError for what a Triton ensemble cannot express."""
    ue_io, cs_io = io["user_encoder"], io["candidate_scorer"]
    ue_in = [_batched(t, "user_encoder input") for t in ue_io["inputs"]]
    ue_out = [_batched(t, "user_encoder output") for t in ue_io["outputs"]]
    produced = {t["name"]: t for t in ue_out}
    user_in = {t["name"]: t for t in ue_in}
    cs_in, cand, state, shared = [], [], [], []
    for t in cs_io["inputs"]:
        if t["name"] in user_in and t["name"] not in produced:
            # a user input the scorer reads too (OneTrans: s_length): one user's row, fed from the
            # ensemble's user input ([1, ...]; a per-user scalar [1, 1]), reshaped to the graph's shape
            cs_in.append(_one_user(t, user_in[t["name"]]))
            shared.append(t["name"])
        elif t["name"] in produced:  # one user's state: the encoder's client-facing rank, batch 1
            p = produced[t["name"]]
            cs_in.append(_one_user(t, p))
            state.append(t["name"])
        else:
            if not t["shape"] or t["shape"][0] != "candidates":
                raise InputError(f"candidate_scorer input {t['name']}: neither a user encoder input or output nor "
                                 f"batched over the dynamic 'candidates' axis (shape {t['shape']}); a Triton ensemble cannot "
                                 "feed it")
            e = _plain(t, "candidate_scorer input")
            cs_in.append(e)
            cand.append(e)
    cs_out = [_plain(t, "candidate_scorer output") for t in cs_io["outputs"]]
    ens_in = [{**t, "dims": [1] + list(t["dims"]), "reshape": None} for t in ue_in] + \
             [{**t, "reshape": None} for t in cand]
    ens_out = [{**t, "reshape": None} for t in cs_out]
    names = [t["name"] for t in ens_in] + state + [t["name"] for t in ens_out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise InputError(f"tensor names {dup} are used for two things (a user or candidate input, the user state, "
                         "an output); a Triton ensemble names each tensor once")
    return {"user_encoder": {"inputs": ue_in, "outputs": ue_out, "max_batch": user_max_batch},
            "candidate_scorer": {"inputs": cs_in, "outputs": cs_out, "max_batch": 0},
            "onetrans": {"inputs": ens_in, "outputs": ens_out, "max_batch": 0, "state": state, "shared": shared,
                         "user_inputs": [t["name"] for t in ue_in], "candidate_inputs": [t["name"] for t in cand]}}


def _one_user(t: dict, p: dict) -> dict:
    """The scorer's entry for ``t``, one user's row of the encoder's tensor ``p`` (an encoder
    output, or an encoder input the scorer reads too): client shape ``[1] + p's dims``, the
    graph's own shape through Triton's ``reshape`` where the two differ."""
    want = [1] + list(p["dims"])  # the encoder's client-facing row for a batch of one
    got = _wild(t["shape"])
    if not got or got[0] not in (1, -1):
        raise InputError(f"candidate_scorer input {t['name']}: shape {t['shape']} is not one user's row "
                         "([1, ...]) of the user encoder's tensor; a Triton ensemble cannot feed it")
    if _triton_dtype(t, "candidate_scorer input") != p["type"]:
        raise InputError(f"{t['name']}: the user encoder has {p['type']}, the candidate scorer reads "
                         f"{_triton_dtype(t, 'candidate_scorer input')}; an ensemble tensor has one dtype")
    dims, reshape = want, None
    if len(got) == len(want) and all(-1 in (g, w) or g == w for g, w in zip(got, want)):
        # the same axes: dynamic wherever either side is (the scorer's kv_len vs a fixed window)
        dims = [-1 if -1 in (g, w) else g for g, w in zip(got, want)]
    else:  # the same elements in another shape: Triton's reshape, static sizes only
        n_want, n_got = _count(want), _count(got)
        if n_want is None or n_got is None or n_want != n_got:
            raise InputError(f"{t['name']}: the user encoder's row is {want}, the candidate scorer reads "
                             f"{t['shape']}; Triton's reshape maps only equal static sizes")
        reshape = got
    return {"name": t["name"], "type": p["type"], "dims": dims, "reshape": reshape}


def _count(dims: list[int]) -> int | None:
    if any(d < 0 for d in dims):
        return None
    n = 1
    for d in dims:
        n *= d
    return n


def check_ensemble(models: dict[str, Any]) -> None:
    """Every ensemble tensor: one dtype and one rank, fixed dims equal, wherever it is an
    ensemble input/output or a step's input/output (client-facing shapes)."""
    ens = models["onetrans"]
    seen: dict[str, list[tuple[str, str, list[int]]]] = {}
    for t in ens["inputs"] + ens["outputs"]:
        seen.setdefault(t["name"], []).append(("ensemble", t["type"], client_shape(t, 0)))
    for step in ("user_encoder", "candidate_scorer"):
        m = models[step]
        for t in m["inputs"] + m["outputs"]:
            if t["name"] in seen or t["name"] in ens["state"]:
                seen.setdefault(t["name"], []).append((step, t["type"], client_shape(t, m["max_batch"])))
    for name, uses in seen.items():
        if len({u[1] for u in uses}) > 1 or len({len(u[2]) for u in uses}) > 1:
            raise InputError(f"ensemble tensor {name}: " + "; ".join(f"{w} {dt} {shape}" for w, dt, shape in uses)
                             + ": one dtype and one rank needed")
        for axis in range(len(uses[0][2])):
            fixed = {u[2][axis] for u in uses if u[2][axis] >= 0}
            if len(fixed) > 1:
                raise InputError(f"ensemble tensor {name}: axis {axis} is {sorted(fixed)} in different places")


def module_ensemble_config(models: dict[str, Any], name: str = "onetrans") -> str:
    ens = models["onetrans"]
    cs_out = models["candidate_scorer"]["outputs"]
    step1 = "\n".join([f'        input_map {{ key: "{n}" value: "{n}" }}' for n in ens["user_inputs"]] +
                      [f'        output_map {{ key: "{n}" value: "{n}" }}' for n in ens["state"]])
    step2 = "\n".join([f'        input_map {{ key: "{n}" value: "{n}" }}' for n in ens["candidate_inputs"]] +
                      [f'        input_map {{ key: "{n}" value: "{n}" }}' for n in ens.get("shared", [])] +
                      [f'        input_map {{ key: "{n}" value: "{n}" }}' for n in ens["state"]] +
                      [f'        output_map {{ key: "{t["name"]}" value: "{t["name"]}" }}' for t in cs_out])
    head = _config(name, "ensemble", ens["inputs"], ens["outputs"], 0, False,
                   comment="one user per request: every user input is [1, ...] (a per-user scalar is [1, 1]); "
                           "candidate inputs [C, ...]")
    return (head + "ensemble_scheduling {\n  step [\n"
            f'    {{\n        model_name: "user_encoder"\n        model_version: -1\n{step1}\n    }},\n'
            f'    {{\n        model_name: "candidate_scorer"\n        model_version: -1\n{step2}\n    }}\n'
            "  ]\n}\n")


def prepare(build: Path, out: Path, *, backend: str, precision: str, force: bool) -> tuple[dict, dict, dict, str]:
    """What every repository of ``build`` needs, checked before anything is written: the
    manifest, the graphs' inputs/outputs of ``precision``, the three models' tensors
    (:func:`module_models`, wiring proven by :func:`check_ensemble`) and the variant's
    subdirectory (``""`` for fp32)."""
    from onetrans_trt.export.api import read_manifest

    manifest = read_manifest(build)
    if out.exists() and not force:
        raise BuildError(f"{out} already exists; pass --force to replace it")
    if precision not in ("fp32", "fp16", "int8"):
        raise BuildError(f"precision {precision!r}: expected fp32, fp16 or int8")
    if precision != "fp32" and precision not in (manifest.get("precisions") or {}):
        how = {"fp16": "convert", "int8": "calibrate"}[precision]
        raise BuildError(f"{build} has no {precision} variant; run `onetrans-trt {how} {build}` first")
    if precision != "fp32":  # refused before anything is written: a variant of graphs since rewritten
        lineage.check_variant(build, manifest, precision)
    if backend == "tensorrt":
        lineage.check_engines(build, manifest, precision)
    sub = {"fp32": "", "fp16": "fp16", "int8": "int8"}[precision]
    ios = {role: manifest["graphs"][role] if precision == "fp32" else manifest["precisions"][precision]["graphs"][role]
           for role in ("user_encoder", "candidate_scorer")}
    # everything the ensemble needs is checked before writing (both families and module builds)
    models = module_models(manifest, ios, manifest["dynamic_dims"]["users"]["max"])
    check_ensemble(models)
    return manifest, ios, models, sub


def lineage_record(build: Path, manifest: dict, ios: dict, backend: str, precision: str) -> dict:
    """``lineage.json`` of a repository: which build and graphs it was made from."""
    rec = {"format": lineage.FORMAT, "build": str(build.resolve()), "backend": backend, "precision": precision,
           "graphs": {role: ios[role].get("sha256") for role in ("user_encoder", "candidate_scorer")},
           "build_graphs": {k: g.get("sha256") for k, g in manifest["graphs"].items()}}
    if backend == "tensorrt":  # the engines' own record (None: built before lineage was recorded)
        rec["engines"] = lineage.engine_lineage(build, precision)
    return rec


def write_repository(build: str | Path, out: str | Path, *, backend: str = "onnxruntime", precision: str = "fp32",
                     force: bool = False) -> dict[str, Any]:
    from onetrans_trt.plugins import strip_functions  # noqa: F401  (engines are built from stripped graphs)

    build, out = Path(build), Path(out)
    manifest, ios, models, sub = prepare(build, out, backend=backend, precision=precision, force=force)
    written: dict[str, str] = {}
    with atomic_directory(out, force=force) as tmp:
        for role in ("user_encoder", "candidate_scorer"):
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
            if backend == "onnxruntime":
                _copy_graph(src, dst)
            else:
                shutil.copyfile(src, dst)
            m = models[role]
            text = _config(role, platform, m["inputs"], m["outputs"], m["max_batch"], role == "user_encoder")
            parse_config(text)
            (tmp / role / "config.pbtxt").write_text(text)
            written[role] = text
        text = module_ensemble_config(models)
        parse_config(text)
        (tmp / "onetrans" / "1").mkdir(parents=True)
        (tmp / "onetrans" / "config.pbtxt").write_text(text)
        written["onetrans"] = text
        # lineage: which build and graphs this repository was made from (Triton reads only directories)
        atomic_write_json(tmp / "lineage.json", lineage_record(build, manifest, ios, backend, precision))
    return {"repository": str(out), "backend": backend, "precision": precision, "models": sorted(written)}
