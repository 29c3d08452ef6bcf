"""``validate``: every available backend against the float32 PyTorch model.

Per graph (each fed the reference's inputs, so errors are not mixed across graphs): the
user encoder's K/V per layer and the scorer's logits (fed the reference K/V). End to end
(each backend's own K/V): AUC/logloss per task against the labels and their deltas from
PyTorch, per-request top-10 overlap and Kendall tau. Tolerances per precision come from
the policy. A failing backend gets a first-divergence finding.
"""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any, Callable

import numpy as np

from onetrans_trt.errors import BuildError, InputError
from onetrans_trt.kv import from_state, state_arrays
from onetrans_trt.validate.compare import ErrorStats
from onetrans_trt.validate.policy import precision_of, within

FORMAT = "onetrans-trt/validate/1"


def available_backends(build: Path) -> list[str]:
    out = ["torch-split", "ort"]
    for p in ("fp16", "int8"):
        if (build / p / "candidate_scorer.onnx").is_file():
            out.append(f"ort-{p}")
    try:
        import tensorrt  # noqa: F401
        import torch

        if torch.cuda.is_available():
            out += [f"trt-{p}" if p != "fp32" else "trt" for p in ("fp32", "fp16", "int8")
                    if (build / "engines" / p / "candidate_scorer.engine").is_file()]
    except Exception:  # noqa: BLE001
        pass
    return out


def _backend(build: Path, name: str, model):
    from onetrans_trt.runtime.backends import TorchSplitBackend
    from onetrans_trt.runtime.ranker import Ranker

    if name == "torch-split":
        return TorchSplitBackend(model)
    return Ranker.load(build, backend=name).backend


def _graph_paths(build: Path, backend: str) -> dict[str, Path] | None:
    if not backend.startswith("ort"):
        return None
    sub = {"ort": "", "ort-fp16": "fp16", "ort-int8": "int8"}[backend]
    d = build / sub if sub else build
    return {"user_encoder": d / "user_encoder.onnx", "candidate_scorer": d / "candidate_scorer.onnx"}


def _feeds_as_encoded(build: Path, manifest: dict, path: Path, n: int) -> tuple[list, str]:
    """``--inputs`` of graph feeds (npz / Polygraphy JSON) for one of our builds: each request
    is one user's encoder inputs (batch 1) and its candidates' scorer inputs, checked against
    the graphs' declared names, dtypes and ranks."""
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
    model = load_checkpoint(ckpt)
    avail = available_backends(build)
    chosen = backends or avail
    missing = [b for b in chosen if b not in avail]
    if missing:
        raise InputError(f"backends {missing} are not available for {build}; available: {avail}")
    if inputs is not None:
        from onetrans_trt.data.feeds import input_kind

        if input_kind(inputs) == "requests":
            requests_file, data = inputs, None
    if inputs is not None and requests_file is None:
        encoded, source = _feeds_as_encoded(build, manifest, Path(inputs), n_requests)
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
    with torch.no_grad():
        for i, (hist, ns) in enumerate(encoded):
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
        "backends": {},
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
        ok_rank = end["ranking"]["top10_overlap_mean"] >= tol["min_top10_overlap"]
        ok_auc = True
        if ys:
            y = np.asarray(ys, np.float32)
            mv, mr = binary_metrics(y, np.asarray(pv), tasks), binary_metrics(y, np.asarray(pr), tasks)
            end["metrics"] = {tk: {"auc": mv[tk]["auc"], "torch_auc": mr[tk]["auc"],
                                   "delta_auc": mv[tk]["auc"] - mr[tk]["auc"], "logloss": mv[tk]["logloss"],
                                   "delta_logloss": mv[tk]["logloss"] - mr[tk]["logloss"]} for tk in tasks}
            ok_auc = all(abs(m["delta_auc"]) <= tol["max_delta_auc"] for m in end["metrics"].values())
        ok_graphs = all(v["pass"] for g in graphs.values() for v in g.values()) and error is None
        verdict = "pass" if ok_graphs and ok_auc and ok_rank and e2e_sum["pass"] else "fail"
        entry = {"precision": precision_of(name), "verdict": verdict, "tolerance": tol, "graphs": graphs,
                 "end_to_end": end, "divergence": None, "note": getattr(backend, "note", ""), "error": error}
        if verdict == "fail":
            entry["divergence"] = _find_divergence(build, name, model, refs[first_fail or 0], tol, localize)
        report["backends"][name] = entry
        pairs = logit_stats.pairs
        sel = np.concatenate([p[0] for p in pairs])[:600] if pairs else np.zeros(0)
        ref_sel = np.concatenate([p[1] for p in pairs])[:600] if pairs else np.zeros(0)
        plots[name] = {"histogram": logit_stats.histogram(), "scatter": [ref_sel.tolist(), sel.tolist()]}
    report["verdict"] = "pass" if all(b["verdict"] == "pass" for b in report["backends"].values()) else "fail"
    report["plots"] = plots
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

    from onetrans_trt.calibrate.quality import ranking_agreement
    from onetrans_trt.export.api import read_manifest
    from onetrans_trt.runtime.ranker import Ranker
    from onetrans_trt.validate.policy import DEFAULT_POLICY

    build, goldens = Path(build), Path(goldens)
    read_manifest(build)
    if not (goldens / "meta.json").is_file():
        raise InputError(f"{goldens}: not a goldens directory (no meta.json); create one with --save-goldens")
    policy = policy or DEFAULT_POLICY
    try:
        ue_in = load_json(str(goldens / "user_encoder_inputs.json"))
        ue_out = load_json(str(goldens / "user_encoder_outputs.json"))
        cs_in = load_json(str(goldens / "candidate_scorer_inputs.json"))
        cs_out = load_json(str(goldens / "candidate_scorer_outputs.json"))
    except Exception as e:  # noqa: BLE001 - polygraphy raises various errors on bad JSON
        raise InputError(f"{goldens}: unreadable goldens ({type(e).__name__})") from None
    chosen = backends or [b for b in ("ort", "ort-fp16", "ort-int8") if b == "ort" or (build / b[4:]).is_dir()]
    report: dict[str, Any] = {"format": FORMAT, "build": str(build), "goldens": str(goldens), "policy": policy,
                              "requests": {"source": "goldens", "count": len(ue_in)}, "backends": {}}
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
            ref_kv = from_state(feeds, feeds.get("s_length", hist["s_length"]))
            ns = {k: v for k, v in feeds.items() if k.startswith("ns_")}
            if not next(iter(ns.values())).shape[0]:
                continue  # a request without candidates: its K/V is compared above, nothing to score
            got = backend.score(ref_kv, ns)
            logit_stats.add(got, out["logits"])
            overlaps.append(ranking_agreement(got[:, 0], out["logits"][:, 0])[0])
        graphs = {"user_encoder": {k: {**s.summary(), "pass": within(s.summary(), tol)} for k, s in kv_stats.items()},
                  "candidate_scorer": {"logits": {**logit_stats.summary(), "pass": within(logit_stats.summary(), tol)}}}
        ok = all(v["pass"] for g in graphs.values() for v in g.values()) and (not overlaps or np.mean(overlaps) >= tol["min_top10_overlap"])
        report["backends"][name] = {"precision": precision_of(name), "verdict": "pass" if ok else "fail",
                                    "tolerance": tol, "graphs": graphs,
                                    "end_to_end": {"ranking": {"top10_overlap_mean": float(np.mean(overlaps)) if overlaps
                                                                           else 1.0}},
                                    "divergence": None, "note": getattr(backend, "note", "")}
    report["verdict"] = "pass" if all(b["verdict"] == "pass" for b in report["backends"].values()) else "fail"
    meta = json.loads((goldens / "meta.json").read_text())
    report["goldens_meta"] = meta
    return report


__all__ = ["validate_build", "validate_goldens", "available_backends", "write_goldens", "BuildError"]
