"""``export``: a OneTrans checkpoint becomes a build directory.

    BUILD/
      manifest.json            what is here and how it was made
      serving.onnx             the raw traced serving graph (user side + scorer, K/V marked)
      user_encoder.onnx        history -> each layer's S-token K/V (batched over users)
      candidate_scorer.onnx    C candidates' NS features + one user's K/V -> logits, probs
      unified.onnx             (--unified) the naive model: full sequence per candidate
      samples/                 real requests, their inputs (npz + polygraphy JSON) and
                               the PyTorch outputs
      <graph>.onnx.data        a graph's weights when they exceed the external-data
                               threshold (1.5 GiB; see onetrans_trt.onnx_files), beside it

The directory is assembled in a temporary sibling and renamed into place, so an
interrupted export never leaves a partial build.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np

from onetrans_trt import __version__, interrupts, log
from onetrans_trt.data.requests import Request, encode_events, encode_request, merge_stream, pad_streams
from onetrans_trt.errors import BuildError, CheckpointError, InputError
from onetrans_trt.io import atomic_directory, atomic_write_json, locks_build
from onetrans_trt.trust import DEFAULT_OPSET, check_opset

MANIFEST = "manifest.json"
USER_ENCODER = "user_encoder.onnx"
CANDIDATE_SCORER = "candidate_scorer.onnx"
SERVING = "serving.onnx"
UNIFIED = "unified.onnx"
USER_PASSES = ["pyramid", "cleanup", "fuse-attention"]
SCORER_PASSES = ["no-broadcast", "cleanup", "fuse-attention"]


def default_passes(fuse_attention: bool = True) -> tuple[list[str], list[str]]:
    """The passes ``export`` runs on (user encoder, candidate scorer)."""
    keep = (lambda p: True) if fuse_attention else (lambda p: p != "fuse-attention")
    return [p for p in USER_PASSES if keep(p)], [p for p in SCORER_PASSES if keep(p)]

# Ranges of the dynamic dimensions (for TensorRT optimization profiles): min/typical/max.
DEFAULT_RANGES = {"users": (1, 1, 64), "candidates": (1, 128, 1024)}


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _versions() -> dict[str, str]:
    """Every tool that can touch the graphs (``provenance.TOOLS``), plus Python."""
    from onetrans_trt.provenance import versions

    return {"onetrans_trt": __version__, **versions()}


def _made_by() -> dict[str, Any]:
    """The manifest's ``provenance``: the command line and the host (``versions`` is its own key)."""
    from onetrans_trt.provenance import command_line, host

    return {"command": command_line(), "host": host()}


def _example(model, n_users: int = 2, n_candidates: int = 3) -> tuple[dict, dict]:
    """Example inputs for tracing: sizes >= 2 on every dynamic axis."""
    from onetrans_trt.data.synthetic import synthetic_request

    schema = model.cfg.schema
    rng = np.random.default_rng(0)
    reqs = [synthetic_request(schema, rng, n_history=schema.max_history, n_candidates=n_candidates)
            for _ in range(n_users)]
    streams = [merge_stream(schema, encode_events(schema, r.history)) for r in reqs]
    hist = pad_streams(schema, streams, length=max(2, schema.s_max_len))
    if model.cfg.family == "hyformer":  # each sequence on its own, >= 2 wide (no 0/1 specialisation)
        from onetrans_trt.data.requests import split_sequences

        hist = {**hist, **split_sequences(schema, hist, min_width=2)}
    _, ns = encode_request(schema, reqs[0])
    return hist, ns


_OWN_SEQ = re.compile(r"^s(\d+)_(.+)$")


def _default_axes(name: str) -> dict[int, str]:
    """Our models' dynamic axes: ``s_length`` and ``s<j>_length`` by users; the merged stream
    ``s_*`` by users and ``history``; sequence j's own ``s<j>_*`` by users and ``history<j>``;
    the rest by candidates."""
    own = _OWN_SEQ.match(name)
    if name == "s_length" or (own and own.group(2) == "length"):
        return {0: "users"}
    if own:
        return {0: "users", 1: f"history{own.group(1)}"}
    return {0: "users", 1: "history"} if name.startswith("s_") else {0: "candidates"}


def trace_onnx(module: torch.nn.Module, feeds: dict[str, np.ndarray], path: Path, opset: int,
               dynamic: dict[str, dict[int, str]] | None = None) -> None:
    """Export ``module`` (an :mod:`export.serving` graph, or any module with ``input_names`` /
    ``output_names`` and one positional parameter per input) with the dynamo exporter.
    ``dynamic``: per input, ``{axis: dimension name}``; default: our models' naming
    (``s_length`` by users, ``s_*`` by users and history, the rest by candidates)."""
    import torch
    from torch.export import Dim

    if dynamic is None:
        dynamic = {n: _default_axes(n) for n in module.input_names}
    top = {"users": 4096, "history": 1 << 16, "candidates": 1 << 20,
           **{d: 1 << 16 for axes in dynamic.values() for d in axes.values() if d.startswith("history")}}
    dims: dict[str, Any] = {}
    shapes: dict[str, Any] = {}
    for name in module.input_names:
        spec = {}
        for axis, dim in dynamic.get(name, {}).items():
            if dim not in dims:
                dims[dim] = Dim(dim, min=1, max=top.get(dim, 1 << 20))
            spec[axis] = dims[dim]
        shapes[name] = spec or None
    module.eval()
    args = tuple(torch.from_numpy(np.ascontiguousarray(feeds[n])) if isinstance(feeds[n], np.ndarray)
                 else feeds[n].contiguous() for n in module.input_names)
    with interrupts.temporary_directory(prefix="onetrans-export-") as tmp:  # the exporter may leave report files behind
        cwd = os.getcwd()
        os.chdir(tmp)
        try:
            with log.captured_output("torch.onnx"):  # the exporter's own printing: into the log (-v shows it)
                prog = torch.onnx.export(module, args, dynamo=True, opset_version=opset,
                                         input_names=module.input_names, output_names=module.output_names,
                                         dynamic_shapes=shapes, external_data=False, verbose=False)
        finally:
            os.chdir(cwd)
        interrupts.check()  # the exporter swallows a Ctrl-C raised inside it (then tries another strategy)
    from onetrans_trt.onnx_files import data_file, threshold

    size = sum(v.const_value.nbytes for v in prog.model.graph.initializers.values() if v.const_value is not None)
    # above the threshold the weights go to <file>.data beside the graph (the exporter's own layout:
    # one file, relative location), streamed from the module's tensors without another copy
    if data_file(path).exists():
        data_file(path).unlink()
    prog.save(str(path), external_data=size > threshold())
    del prog


def _io_spec(graph_path: Path) -> dict[str, list[dict]]:
    import onnx

    m = onnx.load(str(graph_path), load_external_data=False)

    def spec(v):
        tt = v.type.tensor_type
        return {"name": v.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type).name,
                "shape": [d.dim_param if d.dim_param else d.dim_value for d in tt.shape.dim]}

    return {"inputs": [spec(v) for v in m.graph.input], "outputs": [spec(v) for v in m.graph.output]}


def hyformer_manifest(cfg) -> dict[str, Any]:
    """A HyFormer build's ``manifest["hyformer"]``: its sequences and each one's own settings."""
    j = cfg.schema.num_sequences
    return {"sequences": j, "queries_per_sequence": cfg.hy_queries, "seq_encoder": cfg.seq_encoder,
            "longer_window": cfg.longer_window, "state_slots": cfg.n_layers * j,
            "per_sequence": [cfg.hy_seq(i) for i in range(j)]}


def _dynamic_dims(model) -> dict[str, dict[str, int]]:
    schema = model.cfg.schema
    lmax = schema.s_max_len
    dims = {k: dict(zip(("min", "typical", "max"), v)) for k, v in DEFAULT_RANGES.items()}
    dims["history"] = {"min": 1, "typical": lmax, "max": lmax}
    n_min, n_typ = 1, lmax
    cfg = model.cfg
    if cfg.family == "hyformer":
        from onetrans_trt.export.inspect import hyformer_slot_lengths

        for i, n in enumerate(hyformer_slot_lengths(hyformer_manifest(cfg), lmax)):
            dims[f"kv_len_{i}"] = {"min": 1, "typical": n, "max": n}
        for j in range(schema.num_sequences):  # sequence j's own inputs: up to the whole stream (the graph
            cap = cfg.hy_seq(j)["max_len"]      # keeps its newest max_len), typically its cap
            dims[f"history{j}"] = {"min": 1, "typical": lmax if cap is None else min(lmax, cap), "max": lmax}
        return dims
    for l, q in enumerate(cfg.query_schedule()):
        dims[f"kv_len_{l}"] = {"min": n_min, "typical": n_typ, "max": n_typ}
        if q is not None:
            n_min, n_typ = min(q, n_min), min(q, n_typ)
    return dims


def _graph_model(graph):
    """A graphsurgeon graph as a ModelProto with our ops' functions attached."""
    import onnx_graphsurgeon as gs

    from onetrans_trt.plugins import attach_op_functions

    return attach_op_functions(gs.export_onnx(graph))


def _save_graph(graph, path: Path) -> None:
    """``graph`` to ``path`` (and ``<path>.data`` above the external-data threshold), checked."""
    from onetrans_trt.onnx_files import save_model

    save_model(_graph_model(graph), path)


def graph_entry(build: Path, fname: str) -> dict[str, Any]:
    """A manifest ``graphs`` entry: the file, its sha256 and bytes, its external data file (when
    it has one: ``data`` with its own sha256 and bytes) and its inputs and outputs."""
    from onetrans_trt.onnx_files import data_file

    path = build / fname
    entry: dict[str, Any] = {"file": fname, "sha256": sha256_file(path), "bytes": path.stat().st_size}
    side = data_file(path)
    if side.is_file():
        entry["data"] = {"file": side.name, "sha256": sha256_file(side), "bytes": side.stat().st_size}
    return {**entry, **_io_spec(path)}


def load_onetrans_config(build: str | Path):
    """The model config saved in a build directory."""
    from onetrans_trt.models.config import read_config

    return read_config(build)


def sample_requests(model, n: int, data_dir: str | Path | None = None, *, seed: int = 123,
                    n_candidates: int = 16, period: str = "test",
                    synthetic: bool | None = None) -> tuple[list[Request], str]:
    """Requests for samples and calibration, and where they came from.

    MovieLens' schema: real MovieLens requests, or a :class:`DataError` naming the fix when the
    data cannot be read (never a silent switch to synthetic data); ``synthetic=True`` asks for
    synthetic ones. Another schema has no dataset here: synthetic requests when ``synthetic`` is
    True or None (export's samples), a :class:`DataError` when it is False (calibration must be
    asked for synthetic data). ``model`` is a model or a :class:`ModelConfig`.
    """
    from onetrans_trt.data import movielens as mlmod
    from onetrans_trt.errors import DataError

    schema = getattr(model, "cfg", model).schema
    is_ml = [s.name for s in schema.sequences] == mlmod.SEQUENCES and "item_id" in schema.tables
    if is_ml and not synthetic:
        try:
            ml = mlmod.MovieLens(data_dir, max_history=schema.max_history, merge_mode=schema.merge_mode)
        except Exception as e:  # noqa: BLE001 - any failure to read the data is reported, not replaced
            raise DataError(f"MovieLens-100K cannot be read ({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}); "
                            "run `onetrans-trt fetch-data`, pass --inputs FILE (requests JSON/JSONL), or ask for "
                            "synthetic requests with --synthetic") from None
        return [r for r, _ in ml.requests(n, n_candidates=n_candidates, seed=seed, period=period)], "ml-100k"
    if not is_ml and synthetic is False:
        raise DataError("this build's schema is not MovieLens' and no data was given: pass --inputs FILE "
                        "(requests JSON/JSONL) or ask for synthetic requests with --synthetic")
    from onetrans_trt.data.synthetic import synthetic_request

    rng = np.random.default_rng(seed)
    why = "asked for" if synthetic else "the model's schema has no dataset"
    return [synthetic_request(schema, rng, n_history=int(rng.integers(0, schema.max_history + 1)),
                              n_candidates=n_candidates) for _ in range(n)], f"synthetic ({why})"


def write_samples(model, reqs: list[Request], out: Path) -> dict[str, Any]:
    """Inputs and PyTorch outputs for each request, as npz and polygraphy JSON."""
    import torch
    from polygraphy.json import save_json

    from onetrans_trt.data.requests import history_feeds
    from onetrans_trt.export.serving import history_input_names
    from onetrans_trt.kv import state_arrays

    names = history_input_names(model)
    out.mkdir(parents=True, exist_ok=True)
    user_feeds, scorer_feeds, arrays = [], [], {}
    with torch.no_grad():
        for i, req in enumerate(reqs):
            hist, ns = encode_request(model.cfg.schema, req)
            hist = {**hist, **history_feeds(hist, names, model.cfg.schema)}  # + what the graph reads
            kv = model.encode_user({k: torch.from_numpy(v) for k, v in hist.items()})
            logits = model.score_candidates(kv, {k: torch.from_numpy(v) for k, v in ns.items()})
            kvs = {k: v.numpy() for k, v in state_arrays(kv).items()}
            unified = model({k: torch.from_numpy(v) for k, v in
                             {**{k: np.repeat(v, len(req.candidates), 0) for k, v in hist.items()}, **ns}.items()})
            user_feeds.append({k: np.ascontiguousarray(hist[k]) for k in names})
            scorer_feeds.append({**{k: np.ascontiguousarray(v) for k, v in ns.items()},
                                 "s_length": hist["s_length"].copy(), **kvs})
            for k, v in {**hist, **ns, **kvs}.items():
                arrays[f"{i}/{k}"] = v
            arrays[f"{i}/logits"] = logits.numpy()
            arrays[f"{i}/unified_logits"] = unified.numpy()
            (out / f"request_{i}.json").write_text(json.dumps(req.to_json()) + "\n")
    save_json(user_feeds, str(out / "user_encoder_inputs.json"))
    save_json(scorer_feeds, str(out / "candidate_scorer_inputs.json"))
    np.savez(out / "samples.npz", **arrays)
    return {"count": len(reqs), "files": ["samples.npz", "user_encoder_inputs.json",
                                          "candidate_scorer_inputs.json"]}


def load_splittable(ckpt: str | Path):
    """A checkpoint's model, if it has a user/candidate split (OneTrans, HyFormer)."""
    from onetrans_trt.models.checkpoint import load_checkpoint

    model = load_checkpoint(ckpt)
    if not hasattr(model, "encode_user"):
        raise CheckpointError(f"{ckpt}: export needs a OneTrans or HyFormer checkpoint (this one is "
                              f"'{model.cfg.family}', which has no user/candidate split)")
    return model


@locks_build("export", arg="out")
def export_build(ckpt: str | Path, out: str | Path, *, opset: int = DEFAULT_OPSET, passes: bool = True,
                 fuse_attention: bool = True, force: bool = False, unified: bool = False, n_samples: int = 4,
                 data_dir: str | Path | None = None,
                 progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Export a checkpoint to a build directory; returns the manifest."""
    import onnx_graphsurgeon as gs

    from onetrans_trt.export.serving import ServingGraph, UnifiedGraph
    from onetrans_trt.graphs import run_passes
    from onetrans_trt.graphs.split_kv import candidate_scorer, user_encoder
    from onetrans_trt.models.checkpoint import checkpoint_hash

    say = progress or (lambda msg: None)
    out = Path(out)
    if out.exists() and not force:
        raise BuildError(f"{out} already exists; pass --force to replace it")
    check_opset(opset)  # before any work: a build at an opset nothing here loads is never written
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=out.parent, prefix=".probe-")
        probe.close()
    except OSError as e:
        raise BuildError(f"cannot write to {out.parent} ({e.strerror or e})") from None
    model = load_splittable(ckpt)
    hist, ns = _example(model)
    records: list[dict] = []
    with atomic_directory(out, force=force) as tmp:
        say("trace serving graph")
        serving = ServingGraph(model)
        trace_onnx(serving, {**hist, **ns}, tmp / SERVING, opset)
        from onetrans_trt import onnx_files

        # tensors of ON_DISK_BYTES or more (embedding tables) stay in serving.onnx.data, never read here
        graph = gs.import_onnx(onnx_files.load_model(tmp / SERVING, on_disk_above=onnx_files.ON_DISK_BYTES))
        say("split at K/V")
        ue, cs = user_encoder(graph), candidate_scorer(graph)
        records += [{"pass": "split-kv", "graph": "serving", "nodes_before": len(graph.nodes),
                     "nodes_after": len(ue.nodes) + len(cs.nodes)}]
        if passes:
            say("graph passes")
            user_passes, scorer_passes = default_passes(fuse_attention)
            ue, r1 = run_passes(ue, user_passes, graph_name="user_encoder")
            cs, r2 = run_passes(cs, scorer_passes, graph_name="candidate_scorer")
            records += r1 + r2
        _save_graph(ue, tmp / USER_ENCODER)
        _save_graph(cs, tmp / CANDIDATE_SCORER)
        if unified:
            say("trace unified graph")
            trace_onnx(UnifiedGraph(model), {**{k: np.repeat(v[:1], 3, 0) for k, v in hist.items()}, **ns},
                       tmp / UNIFIED, opset)
        say("samples")
        reqs, source = sample_requests(model, n_samples, data_dir)
        samples = write_samples(model, reqs, tmp / "samples")
        samples["source"] = source
        cfg = model.cfg
        graphs = {}
        for key, fname in (("user_encoder", USER_ENCODER), ("candidate_scorer", CANDIDATE_SCORER),
                           ("serving", SERVING)) + ((("unified", UNIFIED),) if unified else ()):
            graphs[key] = graph_entry(tmp, fname)
        manifest = {
            "format": "onetrans-trt/build/1",
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "checkpoint": {"path": str(Path(ckpt).resolve()), "sha256": checkpoint_hash(ckpt)},
            "versions": _versions(),
            "provenance": _made_by(),
            "opset": opset,
            "model": {"family": cfg.family, "preset": cfg.preset, "d_model": cfg.d_model, "n_heads": cfg.n_heads,
                      "head_dim": cfg.head_dim, "n_layers": cfg.n_layers, "ns_tokens": cfg.num_ns_tokens,
                      "tasks": list(cfg.tasks), "max_history": cfg.schema.max_history,
                      "s_max_len": cfg.schema.s_max_len},
            "pyramid": ({"schedule": cfg.query_schedule(), "mode": cfg.pyramid if isinstance(cfg.pyramid, str)
                         else "explicit"} if cfg.family == "onetrans" else {"schedule": None, "mode": "none"}),
            **({"hyformer": hyformer_manifest(cfg)} if cfg.family == "hyformer" else {}),
            "graphs": graphs,
            "dynamic_dims": _dynamic_dims(model),
            "passes": records,
            "samples": samples,
        }
        (tmp / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        atomic_write_json(tmp / MANIFEST, manifest)
    say("done")
    return manifest


def read_manifest(build: str | Path) -> dict[str, Any]:
    build = Path(build)
    path = build / MANIFEST
    if not build.is_dir():
        raise BuildError(f"{build}: not a build directory (it does not exist)")
    if not path.exists() and not path.is_symlink():
        raise BuildError(f"{build}: missing {MANIFEST}; run `onetrans-trt export CKPT --out {build}`")
    from onetrans_trt.trust import load_manifest

    return load_manifest(path)


@locks_build("graphs")
def rerun_passes(build: str | Path, user_passes: list[str] | None, scorer_passes: list[str] | None) -> dict:
    """Re-split ``serving.onnx`` and apply passes (``None``: the defaults; ``[]``: none).

    The two graphs and the manifest are replaced atomically, one file at a time.
    """
    from onetrans_trt.onnx_files import save_model_atomic

    build = Path(build)
    manifest = read_manifest(build)
    ue, cs, records = split_with_passes(build, user_passes, scorer_passes)

    for key, fname, g in (("user_encoder", USER_ENCODER, ue), ("candidate_scorer", CANDIDATE_SCORER, cs)):
        save_model_atomic(_graph_model(g), build / fname)  # with its <file>.data when large
        manifest["graphs"][key].pop("data", None)
        manifest["graphs"][key].update(graph_entry(build, fname))
    manifest["passes"] = records
    atomic_write_json(build / MANIFEST, manifest)
    return manifest


def split_with_passes(build: str | Path, user_passes: list[str] | None, scorer_passes: list[str] | None):
    """``(user_encoder, candidate_scorer, records)`` graphs cut from ``BUILD/serving.onnx``."""
    import onnx_graphsurgeon as gs

    from onetrans_trt.graphs import run_passes
    from onetrans_trt.graphs.split_kv import candidate_scorer, user_encoder
    from onetrans_trt import onnx_files

    build = Path(build)
    if not (build / SERVING).is_file():
        raise BuildError(f"{build}: missing {SERVING}; re-run `onetrans-trt export`")
    graph = gs.import_onnx(onnx_files.load_model(build / SERVING, on_disk_above=onnx_files.ON_DISK_BYTES))
    ue, cs = user_encoder(graph), candidate_scorer(graph)
    records = [{"pass": "split-kv", "graph": "serving", "nodes_before": len(graph.nodes),
                "nodes_after": len(ue.nodes) + len(cs.nodes)}]
    ue, r1 = run_passes(ue, USER_PASSES if user_passes is None else user_passes, graph_name="user_encoder")
    cs, r2 = run_passes(cs, SCORER_PASSES if scorer_passes is None else scorer_passes, graph_name="candidate_scorer")
    return ue, cs, records + r1 + r2
