"""``validate``: every available backend against the float32 PyTorch model.

Per graph (each fed the reference's inputs, so errors are not mixed across graphs): the
user encoder's K/V per layer and the scorer's logits (fed the reference K/V). End to end
(each backend's own K/V): AUC/logloss per task against the labels and their deltas from
PyTorch, per-request top-10 overlap and Kendall tau. Tolerances per precision come from
the policy. Each backend's verdict is the list of its checks, each with value, limit and
reason (:mod:`onetrans_trt.validate.checks`); backends not run are listed as skipped with
the reason. A failing backend gets a first-divergence finding.
"""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any, Callable

import numpy as np

from onetrans_trt.errors import BuildError, InputError, MissingCapabilityError
from onetrans_trt.kv import from_state, state_arrays
from onetrans_trt.provenance import graph_hashes, provenance
from onetrans_trt.validate import checks as ck
from onetrans_trt.validate.compare import ErrorStats
from onetrans_trt.validate.policy import precision_of, within

FORMAT = "onetrans-trt/validate/1"


def _trt_problem() -> str | None:
    """Why TensorRT backends cannot run on this machine (``None``: they can); the same words
    as ``rank --backend trt``."""
    try:
        import tensorrt  # noqa: F401
    except Exception:  # noqa: BLE001 - placeholder wheels raise at import
        from onetrans_trt.plugins._trt import require_tensorrt

        try:
            require_tensorrt()
        except MissingCapabilityError as e:
            return str(e)
    import torch

    return None if torch.cuda.is_available() else "TensorRT backends need a CUDA GPU and none is visible"


def backend_status(build: Path) -> dict[str, tuple[str, bool] | None]:
    """Every backend -> ``None`` when it can run on ``build`` here, else ``(reason, capability)``:
    ``capability`` is true when this machine lacks something (TensorRT, a GPU: exit 3), false
    when the build lacks an artifact (exit 2)."""
    from onetrans_trt.variants import ORT_BACKENDS, SUBDIR, has_variant, make_command, variant_of

    out: dict[str, tuple[str, bool] | None] = {"torch-split": None}
    for name in ORT_BACKENDS:
        v = variant_of(build, name)
        if v == "fp32":  # the build's own graphs
            out[name] = None
            continue
        out[name] = None if has_variant(build, v) else (
            f"no {SUBDIR[v]}/candidate_scorer.onnx; run `{make_command(v).replace(' BUILD', f' {build}')}`", False)
    problem = _trt_problem()
    for p in ("fp32", "fp16", "int8"):
        name = "trt" if p == "fp32" else f"trt-{p}"
        if problem:
            out[name] = (problem, True)
        elif not (build / "engines" / p / "candidate_scorer.engine").is_file():
            out[name] = (f"no engines/{p}/candidate_scorer.engine; run `onetrans-trt build {build} --precision {p}`",
                         False)
        else:
            out[name] = None
    return out


def available_backends(build: Path) -> list[str]:
    """The backends that can run on ``build`` here, as a listing shows them (one name per
    variant: see :func:`_other_names`)."""
    other = _other_names(build)
    return [n for n, s in backend_status(build).items() if s is None and n not in other]


def choose_backends(build: Path, backends: list[str] | None) -> tuple[list[str], dict[str, str]]:
    """The backends to run and the ones skipped with their reason. Default: every available
    one, the others skipped. Asked for by name: each must run here, else a one-line error
    naming why: :class:`MissingCapabilityError` (exit 3) when the machine lacks TensorRT or a
    GPU, as ``rank --backend trt``; :class:`InputError` (exit 2) for an unknown name or a
    build without the backend's files."""
    status = backend_status(build)
    avail = [n for n, s in status.items() if s is None]
    if backends is None:
        other = _other_names(build)
        return [n for n in avail if n not in other], {n: s[0] for n, s in status.items()
                                                      if s is not None and n not in other}
    cannot = [b for b in backends if status.get(b) and status[b][1]]
    if cannot:
        names = ", ".join(repr(b) for b in cannot)
        raise MissingCapabilityError(f"backend{'s' if len(cannot) > 1 else ''} {names} cannot run here: "
                                     f"{status[cannot[0]][0]}")
    missing = [b for b in backends if b not in avail]
    if missing:
        why = "; ".join(f"{b}: {status[b][0]}" if b in status else f"{b}: unknown (choose from {', '.join(status)})"
                        for b in missing)
        raise InputError(f"backends {missing} are not available for {build}; available: {avail}; {why}")
    return list(backends), {}


def _other_names(build: Path) -> set[str]:
    """ONNX Runtime backends left out of the default list because another name runs the same
    graphs: a build with ``int8-cpu/`` is validated as ``ort-int8-qdq`` (TensorRT's Q/DQ graphs)
    and ``ort-int8-cpu``; one without it as ``ort-int8`` (what it names there, as before)."""
    from onetrans_trt.variants import int8_backends

    return {"ort-int8", "ort-int8-qdq", "ort-int8-cpu"} - set(int8_backends(build))


def check_lineage(build: Path, manifest: dict, backends: list[str]) -> None:
    """Refuse (StaleArtifact, exit 2) a backend whose variant or engines were made from graphs
    the build no longer has, before any work; warn about ones without a record."""
    from onetrans_trt import lineage

    from onetrans_trt.variants import ORT_BACKENDS, variant_of

    for name in backends:
        if name in ORT_BACKENDS and name != "ort":
            lineage.check_variant(build, manifest, variant_of(build, name))
        elif name.startswith("trt"):
            lineage.check_engines(build, manifest, name[4:] if "-" in name else "fp32")


def _backend(build: Path, name: str, model):
    from onetrans_trt.runtime.backends import TorchSplitBackend
    from onetrans_trt.runtime.ranker import Ranker

    if name == "torch-split":
        return TorchSplitBackend(model)
    return Ranker.load(build, backend=name).backend


def _graph_paths(build: Path, backend: str) -> dict[str, Path] | None:
    if not backend.startswith("ort"):
        return None
    from onetrans_trt.variants import graph_path, variant_of

    if backend == "ort-unified":
        return None
    v = variant_of(build, backend)
    return {role: graph_path(build, v, role) for role in ("user_encoder", "candidate_scorer")}


def _index_ranges(schema, width: int) -> dict[str, tuple[int, int]]:
    """The values each index input of our graphs may hold, ``[low, high]``: a table's rows
    (0 PAD, 1 OOV, then its values), ``s_type`` 0..2K, ``s_length`` 0..the history's width."""
    k = schema.num_sequences
    out = {"s_type": (0, 2 * k), "s_length": (0, width)}
    for f in schema.features:
        if f.kind in ("categorical", "multihot"):
            out[f"ns_{f.name}"] = (0, schema.tables[f.table].rows - 1)
    for field, table in schema.seq_fields.items():
        out[f"s_{field}"] = (0, schema.tables[table].rows - 1)
    for j, seq in enumerate(schema.sequences):  # HyFormer's graphs: each sequence on its own
        for field, table in seq.fields.items():
            out[f"s{j}_{field}"] = (0, schema.tables[table].rows - 1)
    return out


def _feeds_as_encoded(build: Path, manifest: dict, path: Path, n: int, schema=None) -> tuple[list, str]:
    """``--inputs`` of graph feeds (npz / Polygraphy JSON) for one of our builds: each request
    is one user's encoder inputs (batch 1) and its candidates' scorer inputs, checked against
    the graphs' declared names, dtypes and ranks, and (given the ``schema``) every index
    against its table: an index outside it is refused here, not met as an error of the
    PyTorch reference or a failure of the backends."""
    from onetrans_trt.data.feeds import load_feed_list, split_feeds

    feeds, source = load_feed_list(path)
    ue = {i["name"]: i for i in manifest["graphs"]["user_encoder"]["inputs"]}
    state = set(kv_out["name"] for kv_out in manifest["graphs"]["user_encoder"]["outputs"])
    cs = {i["name"]: i for i in manifest["graphs"]["candidate_scorer"]["inputs"]
          if i["name"] not in state and i["name"] not in ue}
    pairs = split_feeds(path, feeds[:n], list(ue), list(cs))
    for i, (hist, ns) in enumerate(pairs):
        for name, a in {**hist, **ns}.items():
            want = (ue.get(name) or cs[name])
            if str(a.dtype) != want["dtype"] or a.ndim != len(want["shape"]):
                raise InputError(f"--inputs {path}: request {i} {name} is {a.dtype} {list(a.shape)}; the graph takes "
                                 f"{want['dtype']} {want['shape']}")
        if any(a.shape[0] != 1 for a in hist.values()):
            raise InputError(f"--inputs {path}: request {i} has user inputs for more than one user; one user per "
                             "request (batch dimension 1)")
        counts = {a.shape[0] for a in ns.values()}
        if len(counts) > 1:
            raise InputError(f"--inputs {path}: request {i}'s candidate inputs disagree on the number of "
                             f"candidates ({sorted(counts)})")
        if schema is None:
            continue
        width = hist["s_type"].shape[1] if "s_type" in hist and hist["s_type"].ndim == 2 else 0
        ranges = _index_ranges(schema, width)
        for j, seq in enumerate(schema.sequences):  # sequence j's length: 0..its own inputs' width
            own = [hist[f"s{j}_{f}"] for f in seq.fields if f"s{j}_{f}" in hist and hist[f"s{j}_{f}"].ndim == 2]
            ranges[f"s{j}_length"] = (0, own[0].shape[1] if own else 0)
        for name, (low, high) in ranges.items():
            a = hist.get(name, ns.get(name))
            if a is not None and a.size and a.dtype.kind in "iub" and (a.min() < low or a.max() > high):
                raise InputError(f"--inputs {path}: request {i} {name} holds {int(a.min())}..{int(a.max())}; "
                                 f"its values must be in {low}..{high}")
    return pairs, source


def load_requests_for(build: Path, cfg, data: str | None, requests_file: str | Path | None, n: int,
                      data_dir=None) -> tuple[list, list, str]:
    from onetrans_trt.data.requests import load_requests

    if requests_file is not None:
        reqs = load_requests(requests_file)[:n]
        return reqs, [None] * len(reqs), f"--requests {requests_file} ({len(reqs)} requests)"
    if data == "ml-100k":
        from onetrans_trt.data.movielens import SEQUENCES, MovieLens

        if [s.name for s in cfg.schema.sequences] != SEQUENCES:
            raise InputError("--data ml-100k needs a build trained on MovieLens-100K; pass --requests FILE")
        ml = MovieLens(data_dir, max_history=cfg.schema.max_history, merge_mode=cfg.schema.merge_mode)
        pairs = ml.requests(n, n_candidates=50, seed=31)
        return ([r for r, _ in pairs], [lab for _, lab in pairs],
                f"ml-100k test requests ({len(pairs)} requests, 50 labelled candidates each, seed 31)")
    raise InputError("give --data ml-100k or --requests FILE")


def validate_build(build: str | Path, *, backends: list[str] | None = None, data: str | None = "ml-100k",
                   requests_file=None, inputs=None, n_requests: int = 100, policy: dict | None = None, ckpt=None,
                   data_dir=None, save_goldens: str | Path | None = None,
                   progress: Callable[[str, int, int], None] | None = None) -> dict[str, Any]:
    """Compare every backend of ``build`` (``backends``: default every one available) with the
    float32 PyTorch model on ``n_requests`` requests from one source (``data="ml-100k"``,
    ``requests_file`` or ``inputs``); returns the report (``report["verdict"]`` is ``"pass"``
    or ``"fail"``; keys documented in :mod:`onetrans_trt.validate.report`). What ``onetrans-trt
    validate`` runs."""
    import torch

    from onetrans_trt.calibrate.quality import ranking_agreement
    from onetrans_trt.data.requests import encode_request, repeat_history
    from onetrans_trt.export.api import read_manifest
    from onetrans_trt.export.serving import state_output_names
    from onetrans_trt.models.checkpoint import load_checkpoint
    from onetrans_trt.models.training import binary_metrics
    from onetrans_trt.validate.diverge import localize
    from onetrans_trt.validate.policy import DEFAULT_POLICY

    say = progress or (lambda s, i, n: None)
    build = Path(build)
    manifest = read_manifest(build)
    policy = policy or DEFAULT_POLICY
    ckpt = Path(ckpt or manifest["checkpoint"]["path"])
    if not (ckpt / "model.safetensors").is_file():
        raise InputError(f"validation needs the source checkpoint ({ckpt}); pass --ckpt, or use --goldens")
    chosen, skipped = choose_backends(build, backends or None)
    check_lineage(build, manifest, chosen)  # before the reference is computed or goldens written
    model = load_checkpoint(ckpt)
    if inputs is not None:
        from onetrans_trt.data.feeds import input_kind

        if input_kind(inputs) == "requests":
            requests_file, data = inputs, None
    if inputs is not None and requests_file is None:
        encoded, source = _feeds_as_encoded(build, manifest, Path(inputs), n_requests, model.cfg.schema)
        labels: list = [None] * len(encoded)
    else:
        reqs, labels, source = load_requests_for(build, model.cfg, data, requests_file, n_requests, data_dir)
        encoded = [encode_request(model.cfg.schema, r) for r in reqs]
    if not encoded:
        raise InputError("no requests to validate on")
    tasks = list(model.cfg.tasks)
    t = lambda d: {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in d.items()}  # noqa: E731
    # the reference, once per request
    refs = []
    from onetrans_trt.data.requests import history_feeds

    ue_names = [i["name"] for i in manifest["graphs"]["user_encoder"]["inputs"]]
    with torch.no_grad():
        for i, (hist, ns) in enumerate(encoded):
            # what the user encoder graph reads (HyFormer: each sequence on its own), so the reference
            # state has the graph's layout; the model reads either form
            hist = {**hist, **history_feeds(hist, ue_names, model.cfg.schema)}
            kv = model.encode_user(t(hist))
            state = {k: v.numpy() for k, v in state_arrays(kv).items()}
            scored = model.score_candidates(kv, t(ns)).numpy()
            c = int(scored.shape[0])
            unified = model(t({**repeat_history(hist, c), **ns})).numpy() if c else scored
            refs.append({"hist": hist, "ns": ns, "kv": kv, "state": state, "logits": scored, "unified": unified,
                         "c": c})
            say("reference", i + 1, len(encoded))
    if save_goldens:
        write_goldens(save_goldens, manifest, refs)
    kv_names = state_output_names(model.cfg)
    report: dict[str, Any] = {
        "format": FORMAT, "build": str(build),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "checkpoint": str(ckpt), "policy": policy,
        "requests": {"source": source, "count": len(encoded), "labelled": int(sum(l is not None for ls in labels
                                                                             for l in (ls or [])))},
        "backends": {}, "skipped": skipped,
    }
    plots: dict[str, Any] = {}
    for name in chosen:
        tol = policy[precision_of(name)]
        backend = _backend(build, name, model)
        stats = {k: ErrorStats(k) for k in kv_names}
        logit_stats = ErrorStats("logits")
        e2e = ErrorStats("end_to_end_logits")
        first_fail: int | None = None
        ys, pv, pr, overlaps, taus = [], [], [], [], []
        error = None
        for i, ref in enumerate(refs):
            try:
                kv = backend.encode_user(ref["hist"])
                if ref["c"]:
                    backend.score(kv, ref["ns"])
            except Exception as e:  # noqa: BLE001 - a broken graph fails validation, it is not a crash
                error = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
                first_fail = i
                break
            got = state_arrays(kv)
            for k in kv_names:
                stats[k].add(np.asarray(_host(got[k])), ref["state"][k])
            ref_kv = from_state(ref["state"], ref["hist"]["s_length"])
            if not ref["c"]:
                continue
            logit_stats.add(backend.score(ref_kv, ref["ns"]), ref["logits"], keep_pairs=True)
            own = backend.score(kv, ref["ns"])
            e2e.add(own, ref["unified"])
            o, tau = ranking_agreement(own[:, 0], ref["unified"][:, 0])
            overlaps.append(o)
            taus.append(tau)
            for j, lab in enumerate(labels[i] or []):
                if lab is not None:
                    ys.append(lab)
                    pv.append(own[j])
                    pr.append(ref["unified"][j])
            if first_fail is None and not all(within(s.summary(), tol) for s in [*stats.values(), logit_stats]):
                first_fail = i
            say(name, i + 1, len(refs))
        graphs = {"user_encoder": {k: {**s.summary(), "pass": within(s.summary(), tol)} for k, s in stats.items()},
                  "candidate_scorer": {"logits": {**logit_stats.summary(), "pass": within(logit_stats.summary(), tol)}}}
        e2e_sum = {**e2e.summary(), "pass": within(e2e.summary(), tol)}
        end = {"logits": e2e_sum, "ranking": {"top10_overlap_mean": float(np.mean(overlaps)) if overlaps else 1.0,
                                              "kendall_tau_mean": float(np.mean(taus)) if taus else 1.0}}
        checks = [ck.error_check(error)] if error is not None else []
        checks += ck.graph_checks({**{f"{g}.{k}": v for g, outs in graphs.items() for k, v in outs.items()},
                                   "end_to_end.logits": e2e_sum}, tol)
        if ys:
            y = np.asarray(ys, np.float32)
            mv, mr = binary_metrics(y, np.asarray(pv), tasks), binary_metrics(y, np.asarray(pr), tasks)
            end["metrics"] = {tk: {"auc": mv[tk]["auc"], "torch_auc": mr[tk]["auc"],
                                   "delta_auc": mv[tk]["auc"] - mr[tk]["auc"], "logloss": mv[tk]["logloss"],
                                   "delta_logloss": mv[tk]["logloss"] - mr[tk]["logloss"]} for tk in tasks}
            for j, tk in enumerate(tasks):
                pos = int((y[:, j] > 0.5).sum())
                checks.append(ck.auc_check(tk, end["metrics"][tk]["delta_auc"], pos, len(y) - pos,
                                           tol["max_delta_auc"]))
        else:
            checks.append(ck.no_labels_check(tol["max_delta_auc"]))
        checks += ck.ranking_checks(float(np.mean(overlaps)) if overlaps else None,
                                    float(np.mean(taus)) if taus else None, len(overlaps), tol)
        verdict = ck.verdict_of(checks)
        entry = {"precision": precision_of(name), "verdict": verdict, "tolerance": tol, "graphs": graphs,
                 "end_to_end": end, "checks": checks, "divergence": None, "note": getattr(backend, "note", ""),
                 "error": error}
        if verdict == "fail":
            entry["divergence"] = _find_divergence(build, name, model, refs[first_fail or 0], tol, localize)
        report["backends"][name] = entry
        pairs = logit_stats.pairs
        sel = np.concatenate([p[0] for p in pairs])[:600] if pairs else np.zeros(0)
        ref_sel = np.concatenate([p[1] for p in pairs])[:600] if pairs else np.zeros(0)
        plots[name] = {"histogram": logit_stats.histogram(), "scatter": [ref_sel.tolist(), sel.tolist()]}
    report["verdict"] = "pass" if all(b["verdict"] == "pass" for b in report["backends"].values()) else "fail"
    report["plots"] = plots
    report["provenance"] = provenance(graph_hashes(manifest))
    return report


def _host(x):
    return x.detach().float().cpu().numpy() if hasattr(x, "detach") else x


def _find_divergence(build: Path, name: str, model, ref: dict, tol: dict, localize) -> dict | None:
    import torch

    from onetrans_trt.export.serving import state_output_names

    paths = _graph_paths(build, name)
    if paths is None:
        return {"note": f"divergence search needs ONNX graphs; {name} has none"}
    serving = build / "serving.onnx"
    if not serving.is_file():
        return {"note": "serving.onnx is missing: module scopes unknown"}
    t = lambda d: {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in d.items()}  # noqa: E731
    sim = name.endswith("int8")
    kv_names = state_output_names(model.cfg)
    user_feeds = ref["hist"]
    found = localize(paths["user_encoder"], "user_encoder", user_feeds, model,
                     lambda: {k: v.numpy() for k, v in state_arrays(model.encode_user(t(user_feeds))).items()},
                     tol, serving, simulate_qdq=sim)
    if found:
        return found
    import onnx

    from onetrans_trt.onnx_files import load_model

    dtypes = {i.name: i.type.tensor_type.elem_type for i in load_model(paths["candidate_scorer"], external=False).graph.input}
    scorer_feeds = {k: v for k, v in {**ref["ns"], "s_length": ref["hist"]["s_length"], **ref["state"]}.items()
                    if k in dtypes}
    for k in kv_names:
        if dtypes.get(k) == onnx.TensorProto.FLOAT16:
            scorer_feeds[k] = scorer_feeds[k].astype(np.float16)
    return localize(paths["candidate_scorer"], "candidate_scorer", scorer_feeds, model,
                    lambda: {"logits": model.score_candidates(ref["kv"], t(ref["ns"])).numpy()}, tol, serving,
                    simulate_qdq=sim)


# ---- goldens ---------------------------------------------------------------------------
def write_goldens(out: str | Path, manifest: dict, refs: list[dict]) -> Path:
    """Inputs and reference outputs in polygraphy's JSON format (no torch needed to use)."""
    from polygraphy.json import save_json

    from onetrans_trt.io import atomic_directory

    scorer_inputs = {i["name"] for i in manifest["graphs"]["candidate_scorer"]["inputs"]}
    out = Path(out)
    with atomic_directory(out, force=True) as tmp:
        save_json([r["hist"] for r in refs], str(tmp / "user_encoder_inputs.json"))
        save_json([r["state"] for r in refs], str(tmp / "user_encoder_outputs.json"))
        save_json([{k: v for k, v in {**r["ns"], "s_length": r["hist"]["s_length"], **r["state"]}.items()
                    if k in scorer_inputs} for r in refs], str(tmp / "candidate_scorer_inputs.json"))
        save_json([{"logits": r["logits"]} for r in refs], str(tmp / "candidate_scorer_outputs.json"))
        import json

        (tmp / "meta.json").write_text(json.dumps({"format": "onetrans-trt/goldens/1", "requests": len(refs),
                                                   "graphs": {k: v["sha256"] for k, v in manifest["graphs"].items()},
                                                   "checkpoint": manifest["checkpoint"]}, indent=2))
    return out


def validate_goldens(build: str | Path, goldens: str | Path, *, backends: list[str] | None = None,
                     policy: dict | None = None) -> dict[str, Any]:
    """Validate ORT backends against saved goldens (no PyTorch involved)."""
    import json

    from polygraphy.json import load_json

    from onetrans_trt import lineage
    from onetrans_trt.calibrate.quality import ranking_agreement
    from onetrans_trt.export.api import read_manifest
    from onetrans_trt.runtime.ranker import Ranker
    from onetrans_trt.validate.policy import DEFAULT_POLICY

    build, goldens = Path(build), Path(goldens)
    manifest = read_manifest(build)
    if not (goldens / "meta.json").is_file():
        raise InputError(f"{goldens}: not a goldens directory (no meta.json); create one with --save-goldens")
    policy = policy or DEFAULT_POLICY
    from onetrans_trt.log import captured_output

    try:
        with captured_output("polygraphy"):  # it prints its "[!] Could not decode ..." before raising
            ue_in = load_json(str(goldens / "user_encoder_inputs.json"))
            ue_out = load_json(str(goldens / "user_encoder_outputs.json"))
            cs_in = load_json(str(goldens / "candidate_scorer_inputs.json"))
            cs_out = load_json(str(goldens / "candidate_scorer_outputs.json"))
    except Exception as e:  # noqa: BLE001 - polygraphy raises various errors on bad JSON
        raise InputError(f"{goldens}: unreadable goldens ({type(e).__name__})") from None
    if backends:
        chosen, skipped = list(backends), {}
    else:
        chosen, skipped = choose_backends(build, None)
        chosen = [b for b in chosen if b.startswith("ort") and b != "ort-unified"]
        skipped = {b: why for b, why in skipped.items() if b.startswith("ort") and b != "ort-unified"}
    for name in chosen:
        if name.startswith("torch") or name.startswith("trt"):
            raise InputError(f"--goldens validates ONNX Runtime backends; {name!r} is not one")
    try:
        meta = json.loads((goldens / "meta.json").read_text())
    except (OSError, ValueError, RecursionError) as e:
        raise InputError(f"{goldens}/meta.json: not valid JSON ({str(e)[:120]})") from None
    lineage.check_goldens(goldens, meta, build, manifest)  # goldens of another build: refused by hash
    check_lineage(build, manifest, chosen)
    report: dict[str, Any] = {"format": FORMAT, "build": str(build), "goldens": str(goldens), "policy": policy,
                              "requests": {"source": "goldens", "count": len(ue_in)}, "backends": {},
                              "skipped": skipped}
    for name in chosen:
        if name.startswith("torch") or name.startswith("trt"):
            raise InputError(f"--goldens validates ONNX Runtime backends; {name!r} is not one")
        backend = Ranker.load(build, backend=name).backend
        tol = policy[precision_of(name)]
        kv_stats: dict[str, ErrorStats] = {}
        logit_stats = ErrorStats("logits")
        overlaps = []
        for hist, kv_ref, feeds, out in zip(ue_in, ue_out, cs_in, cs_out):
            kv = backend.encode_user(hist)
            for key, a in state_arrays(kv).items():
                kv_stats.setdefault(key, ErrorStats(key)).add(a, kv_ref[key])
            ref_kv = from_state(feeds, feeds["s_length"] if "s_length" in feeds else hist.get("s_length"))
            ns = {k: v for k, v in feeds.items() if k.startswith("ns_")}
            if not next(iter(ns.values())).shape[0]:
                continue  # a request without candidates: its K/V is compared above, nothing to score
            got = backend.score(ref_kv, ns)
            logit_stats.add(got, out["logits"])
            overlaps.append(ranking_agreement(got[:, 0], out["logits"][:, 0])[0])
        graphs = {"user_encoder": {k: {**s.summary(), "pass": within(s.summary(), tol)} for k, s in kv_stats.items()},
                  "candidate_scorer": {"logits": {**logit_stats.summary(), "pass": within(logit_stats.summary(), tol)}}}
        checks = ck.graph_checks({f"{g}.{k}": v for g, outs in graphs.items() for k, v in outs.items()}, tol)
        checks += ck.ranking_checks(float(np.mean(overlaps)) if overlaps else None, None, len(overlaps), tol)
        report["backends"][name] = {"precision": precision_of(name), "verdict": ck.verdict_of(checks),
                                    "tolerance": tol, "graphs": graphs,
                                    "end_to_end": {"ranking": {"top10_overlap_mean": float(np.mean(overlaps)) if overlaps
                                                                           else 1.0}},
                                    "checks": checks, "divergence": None, "note": getattr(backend, "note", "")}
    report["verdict"] = "pass" if all(b["verdict"] == "pass" for b in report["backends"].values()) else "fail"
    report["goldens_meta"] = meta
    report["provenance"] = provenance(graph_hashes(read_manifest(build)))
    return report


__all__ = ["validate_build", "validate_goldens", "available_backends", "backend_status", "choose_backends",
           "write_goldens", "BuildError"]
