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
from onetrans_trt.variants import SUBDIR, graph_path, make_command

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


def _pb2():
    try:
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2
    except ImportError:
        raise MissingCapabilityError("writing config.pbtxt needs tritonclient: pip install 'tritonclient[grpc]'") \
            from None
    return model_config_pb2, text_format


def _tensor(msg, t: dict) -> None:
    """Fill a ModelInput/ModelOutput message from our tensor dict."""
    pb2, _ = _pb2()
    msg.name = t["name"]
    msg.data_type = pb2.DataType.Value(t["type"])
    msg.dims.extend(int(d) for d in t["dims"])
    if t.get("ragged"):
        msg.allow_ragged_batch = True  # the dynamic batcher merges requests whose shapes differ here
    if t.get("reshape") is not None:
        msg.reshape.shape.extend(int(d) for d in t["reshape"])
        if not t["reshape"]:
            msg.reshape.SetInParent()  # reshape: { shape: [ ] } (a per-user scalar)


def render(msg, comment: str = "") -> str:
    """``config.pbtxt`` text of a ModelConfig message (a ``#`` comment first), parsed back
    and compared with the message before it is returned."""
    _, text_format = _pb2()
    text = "".join(f"# {c}\n" for c in comment.splitlines()) + text_format.MessageToString(msg)
    if parse_config(text) != msg:  # pragma: no cover - text_format round-trips every message
        raise BuildError(f"config of {msg.name}: the text does not parse back to the same message")
    return text


def model_config(name: str, platform: str, inputs: list[dict], outputs: list[dict], max_batch: int,
                 dynamic_batching: bool, *, parameters: dict[str, str] | None = None, instances: int = 1,
                 preferred_batch_sizes: tuple[int, ...] = (), max_queue_delay_us: int = 200,
                 warmup: list[dict] | None = None, cc_model_filenames: dict[str, str] | None = None,
                 gpu_accelerator: dict[str, Any] | None = None):
    """A ``ModelConfig`` message. ``platform``: ``onnxruntime_onnx``, ``tensorrt_plan``,
    ``ensemble``, or ``backend:NAME`` for a backend without a platform (``backend:python``);
    ``parameters``: string parameters; ``instances``: the instance group's count (not for
    ensembles); ``preferred_batch_sizes`` and ``max_queue_delay_us``: the dynamic batcher's;
    ``warmup``: ``[{"name", "batch_size", "inputs": {tensor: {"type", "dims", "file"}}}]`` (files
    under the model's ``warmup/`` directory); ``cc_model_filenames``: compute capability -> file
    (TensorRT plans); ``gpu_accelerator``: ``{"name": ..., "parameters": {...}}``, the ONNX
    Runtime backend's GPU execution accelerator. Every model serves its latest version only."""
    pb2, _ = _pb2()
    m = pb2.ModelConfig(name=name, max_batch_size=int(max_batch))
    if platform.startswith("backend:"):
        m.backend = platform.split(":", 1)[1]
        kind = pb2.ModelInstanceGroup.Kind.KIND_CPU
    else:
        m.platform = platform
        kind = pb2.ModelInstanceGroup.Kind.KIND_AUTO
    for t in inputs:
        _tensor(m.input.add(), t)
    for t in outputs:
        _tensor(m.output.add(), t)
    if platform != "ensemble":
        m.instance_group.add(count=int(instances), kind=kind)
        m.version_policy.latest.num_versions = 1
    if dynamic_batching:
        m.dynamic_batching.max_queue_delay_microseconds = int(max_queue_delay_us)
        m.dynamic_batching.preferred_batch_size.extend(int(b) for b in preferred_batch_sizes)
    for k, v in (parameters or {}).items():
        m.parameters[k].string_value = v
    for cc, fname in (cc_model_filenames or {}).items():
        m.cc_model_filenames[cc] = fname
    if gpu_accelerator:
        acc = m.optimization.execution_accelerators.gpu_execution_accelerator.add(name=gpu_accelerator["name"])
        for k, v in gpu_accelerator.get("parameters", {}).items():
            acc.parameters[k] = str(v)
    for w in warmup or []:
        mw = m.model_warmup.add(name=w["name"], batch_size=int(w["batch_size"]))
        for tname, spec in w["inputs"].items():
            inp = mw.inputs[tname]
            inp.data_type = pb2.DataType.Value(spec["type"])
            inp.dims.extend(int(d) for d in spec["dims"])
            inp.input_data_file = spec["file"]
    return m


def _config(name: str, platform: str, inputs: list[dict], outputs: list[dict], max_batch: int,
            dynamic_batching: bool, comment: str = "", **kw: Any) -> str:
    """:func:`model_config` rendered (see there for the keywords)."""
    return render(model_config(name, platform, inputs, outputs, max_batch, dynamic_batching, **kw), comment)


def ensemble_config(name: str, inputs: list[dict], outputs: list[dict], steps: list[tuple[str, dict, dict]],
                    comment: str = "") -> str:
    """An ensemble: ``steps`` are ``(model, input_map, output_map)`` (model tensor -> ensemble tensor)."""
    m = model_config(name, "ensemble", inputs, outputs, 0, False)
    for model, imap, omap in steps:
        st = m.ensemble_scheduling.step.add(model_name=model, model_version=-1)
        for k, v in imap.items():
            st.input_map[k] = v
        for k, v in omap.items():
            st.output_map[k] = v
    return render(m, comment)


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
    return ensemble_config(name, models["onetrans"]["inputs"], models["onetrans"]["outputs"], ensemble_steps(models),
                           comment="one user per request: every user input is [1, ...] (a per-user scalar is [1, 1]); "
                                   "candidate inputs [C, ...]")


def ensemble_steps(models: dict[str, Any]) -> list[tuple[str, dict, dict]]:
    """The ``onetrans`` ensemble's two steps: the user's inputs -> ``user_encoder`` -> its state;
    the candidates' inputs, shared inputs and the state -> ``candidate_scorer`` -> the outputs."""
    ens = models["onetrans"]
    same = lambda names: {n: n for n in names}  # noqa: E731 - every tensor keeps its name
    return [("user_encoder", same(ens["user_inputs"]), same(ens["state"])),
            ("candidate_scorer", same([*ens["candidate_inputs"], *ens.get("shared", []), *ens["state"]]),
             same(t["name"] for t in models["candidate_scorer"]["outputs"]))]


# ``serve-repo --ort-accelerator``: the ONNX Runtime backend's TensorRT execution provider (keys
# of Triton's onnxruntime_backend: precision_mode, max_workspace_size_bytes)
ORT_ACCELERATORS = {
    "none": None,
    "tensorrt": {"name": "tensorrt", "parameters": {"precision_mode": "FP32", "max_workspace_size_bytes": 1 << 30}},
    "tensorrt-fp16": {"name": "tensorrt", "parameters": {"precision_mode": "FP16",
                                                         "max_workspace_size_bytes": 1 << 30}},
}


def check_config_options(instances: int, preferred_batch_sizes, models: dict[str, Any]) -> dict[str, Any]:
    """The instance count and preferred batch sizes, checked against the user encoder's
    maximum batch (an InputError before anything is written)."""
    top = models["user_encoder"]["max_batch"]
    sizes = tuple(int(b) for b in preferred_batch_sizes)
    if int(instances) < 1:
        raise InputError(f"instances {instances}: at least 1")
    bad = [b for b in sizes if not 1 <= b <= top]
    if bad:
        raise InputError(f"preferred batch size(s) {bad}: user_encoder batches 1..{top} users")
    return {"instances": int(instances), "preferred_batch_sizes": sizes}


def prepare(build: Path, out: Path, *, backend: str, precision: str, force: bool) -> tuple[dict, dict, dict, str]:
    """What every repository of ``build`` needs, checked before anything is written: the
    manifest, the graphs' inputs/outputs of ``precision``, the three models' tensors
    (:func:`module_models`, wiring proven by :func:`check_ensemble`) and the variant's
    variant (``precision``; its graphs: :func:`onetrans_trt.variants.graph_path`)."""
    from onetrans_trt.export.api import read_manifest

    manifest = read_manifest(build)
    if out.exists() and not force:
        raise BuildError(f"{out} already exists; pass --force to replace it")
    if precision not in SUBDIR:
        raise BuildError(f"precision {precision!r}: expected fp32, fp16, int8 or int8-cpu")
    if precision == "int8-cpu" and backend == "tensorrt":
        raise InputError("--precision int8-cpu is ONNX Runtime's CPU INT8: TensorRT builds from int8/ "
                         "(--precision int8)")
    if precision != "fp32" and precision not in (manifest.get("precisions") or {}):
        raise BuildError(f"{build} has no {precision} variant; run "
                         f"`{make_command(precision).replace(' BUILD', f' {build}')}` first")
    if precision != "fp32":  # refused before anything is written: a variant of graphs since rewritten
        lineage.check_variant(build, manifest, precision)
    if backend == "tensorrt":
        lineage.check_engines(build, manifest, precision)
    ios = {role: manifest["graphs"][role] if precision == "fp32" else manifest["precisions"][precision]["graphs"][role]
           for role in ("user_encoder", "candidate_scorer")}
    # everything the ensemble needs is checked before writing (both families and module builds)
    models = module_models(manifest, ios, manifest["dynamic_dims"]["users"]["max"])
    check_ensemble(models)
    return manifest, ios, models, precision


_NP_OF = {"TYPE_FP32": "float32", "TYPE_FP16": "float16", "TYPE_BF16": None, "TYPE_FP64": "float64",
          "TYPE_INT64": "int64", "TYPE_INT32": "int32", "TYPE_INT16": "int16", "TYPE_INT8": "int8",
          "TYPE_UINT8": "uint8", "TYPE_UINT16": "uint16", "TYPE_UINT32": "uint32", "TYPE_UINT64": "uint64",
          "TYPE_BOOL": "bool"}


def warmup_for(build: Path, model: dict, model_dir: Path) -> list[dict]:
    """Triton ``model_warmup`` of one model from the build's first real sample
    (``samples/samples.npz``): each input's tensor written raw (row-major, the config's data
    type) to ``model_dir/warmup/<input>``, so the server runs the model once on real data at load
    (a model that cannot run fails to load, not the first request). ``[]`` when the build has
    no samples or the sample lacks an input."""
    import numpy as np

    path = build / "samples" / "samples.npz"
    if not path.is_file():
        return []
    with np.load(path, allow_pickle=False) as z:
        sample = {k[2:]: z[k] for k in z.files if k.startswith("0/")}
    batching = model["max_batch"] > 0
    spec = {}
    for t in model["inputs"]:
        arr, dtype = sample.get(t["name"]), _NP_OF.get(t["type"])
        if arr is None or dtype is None:
            return []
        if batching:
            if arr.ndim == 0 or arr.shape[0] != 1:
                return []
            arr = arr[0]
            dims = [1] if t.get("reshape") == [] else list(arr.shape)
        else:
            want = [int(d) for d in t["dims"]]
            dims = list(arr.shape) if arr.ndim == len(want) else list(np.empty(arr.shape)
                                                                      .reshape([d if d > 0 else -1 for d in want]).shape)
        if any(d > 0 and d != g for d, g in zip(t["dims"], dims)) or len(dims) != len(t["dims"]):
            return []
        (model_dir / "warmup").mkdir(parents=True, exist_ok=True)
        (model_dir / "warmup" / t["name"]).write_bytes(np.ascontiguousarray(arr.reshape(dims).astype(dtype)).tobytes())
        spec[t["name"]] = {"type": t["type"], "dims": dims, "file": t["name"]}
    return [{"name": "sample 0 of the build", "batch_size": 1 if batching else 0, "inputs": spec}]


def lineage_record(build: Path, manifest: dict, ios: dict, backend: str, precision: str) -> dict:
    """``lineage.json`` of a repository: which build and graphs it was made from."""
    rec = {"format": lineage.FORMAT, "build": str(build.resolve()), "backend": backend, "precision": precision,
           "graphs": {role: ios[role].get("sha256") for role in ("user_encoder", "candidate_scorer")},
           "build_graphs": {k: g.get("sha256") for k, g in manifest["graphs"].items()}}
    if backend == "tensorrt":  # the engines' own record (None: built before lineage was recorded)
        rec["engines"] = lineage.engine_lineage(build, precision)
    return rec


def write_repository(build: str | Path, out: str | Path, *, backend: str = "onnxruntime", precision: str = "fp32",
                     force: bool = False, instances: int = 1, preferred_batch_sizes: tuple[int, ...] = (),
                     ort_accelerator: str = "none") -> dict[str, Any]:
    """The repository (module docstring); ``instances``: model instances of user_encoder and
    candidate_scorer; ``preferred_batch_sizes``: user_encoder's dynamic batcher's;
    ``ort_accelerator`` (``--backend onnxruntime``): a key of :data:`ORT_ACCELERATORS`."""
    if ort_accelerator not in ORT_ACCELERATORS:
        raise InputError(f"ORT accelerator {ort_accelerator!r}: choose one of {', '.join(ORT_ACCELERATORS)}")
    if ort_accelerator != "none" and backend != "onnxruntime":
        raise InputError(f"an ONNX Runtime accelerator does not apply to --backend {backend}")
    from onetrans_trt.plugins import strip_functions  # noqa: F401  (engines are built from stripped graphs)

    build, out = Path(build), Path(out)
    manifest, ios, models, variant = prepare(build, out, backend=backend, precision=precision, force=force)
    config_options = check_config_options(instances, preferred_batch_sizes, models)
    written: dict[str, str] = {}
    with atomic_directory(out, force=force) as tmp:
        for role in ("user_encoder", "candidate_scorer"):
            (tmp / role / "1").mkdir(parents=True)
            if backend == "onnxruntime":
                src = graph_path(build, variant, role)
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
            cc = (lineage.engine_lineage(build, precision) or {}).get("compute_capability") \
                if backend == "tensorrt" else None
            text = _config(role, platform, m["inputs"], m["outputs"], m["max_batch"], role == "user_encoder",
                           warmup=warmup_for(build, m, tmp / role), **config_options,
                           cc_model_filenames={cc: "model.plan"} if cc else None,
                           gpu_accelerator=ORT_ACCELERATORS[ort_accelerator],
                           comment=f"TensorRT plan built on a GPU of compute capability {cc}" if cc else "")
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
