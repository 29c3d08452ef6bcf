"""Trial: ModelOpt AutoCast FP16 against our onnxconverter-common FP16 (``convert --precision fp16``).

Both variants of the same build's two graphs are compared against the float32 graphs on the
same real MovieLens-100K test requests (ONNX Runtime, CPU):

* quality: max |error| of the logits and of the K/V (user encoder outputs), delta AUC per task
  (variant minus FP32 ORT, labelled candidates), top-10 overlap and Kendall tau with FP32
  (``quality.ranking_agreement``);
* FP16 coverage, the honest CPU-side proxy for GPU speed: share of MatMul/Gemm FLOPs whose
  output is float16 (shapes measured on one real request, fused attention bodies inlined so
  their MatMuls count too), MatMul/Gemm nodes in FP16, float compute nodes in FP16, Cast nodes,
  FP32 islands (connected groups of FP32 float compute nodes, Casts not counted).

ORT CPU timing of FP16 graphs says nothing about GPU speed (few FP16 kernels on CPU; casts
dominate), so no timing is reported.

AutoCast cannot take our fused ``onetrans`` nodes as they are: it treats any non-standard op
as a TensorRT plugin (moves it to domain ``trt.plugins``, needs TensorRT to type it and runs
its reference pass on the TensorRT EP). So each graph is inlined first (``int8._inline_fused``),
converted, and the fused nodes put back where each body kept one precision
(:func:`refold_cast_aware`); else the inlined form is measured. Results: see tools/fp16_autocast_trial.md.

    PYTHONPATH=. python tools/fp16_autocast_trial.py BUILD --out OUT [--requests 200] [--calib 32]
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx.inliner

ROLES = (("user_encoder", "user_encoder.onnx", "user"), ("candidate_scorer", "candidate_scorer.onnx", "scorer"))

# AutoCast configurations tried: name -> convert_to_mixed_precision keyword arguments
# (data_max: a node whose input or output exceeds it on the calibration data stays FP32)
AUTOCAST_CONFIGS: dict[str, dict[str, Any]] = {
    "autocast_dm512": {"data_max": 512.0},                      # ModelOpt's default: ranges only
    "autocast_dm512+fused_fp32": {"data_max": 512.0, "fused_fp32": True},  # + attention bodies FP32
    "autocast_dm512+ours_ops": {"data_max": 512.0, "ours_ops": True, "fused_fp32": True},  # + our op list, heads
    "autocast_dm64": {"data_max": 64.0},
}


# ---------------------------------------------------------------- AutoCast conversion
def autocast_graph(model: onnx.ModelProto, feed_list: list[dict[str, np.ndarray]], *, data_max: float,
                   ours_ops: bool = False, fused_fp32: bool = False, head_nodes: list[str] | None = None,
                   refold: bool = True) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """AutoCast FP16 of one graph (fused nodes inlined for it), calibrated on ``feed_list``."""
    from modelopt.onnx.autocast import convert_to_mixed_precision
    from modelopt.onnx.autocast.logging_config import configure_logging

    from onetrans_trt.calibrate.fp16 import DEFAULT_FP32_OPS
    from onetrans_trt.calibrate.int8 import INLINED, _inline_fused, _named
    from onetrans_trt.onnx_files import save_model

    configure_logging(logging.WARNING)
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    inlined, fused = _inline_fused(_named(copy))
    info: dict[str, Any] = {"fused_inlined": len(fused)}
    with tempfile.TemporaryDirectory(prefix="onetrans-autocast-") as tmp:
        src, calib = Path(tmp) / "in.onnx", Path(tmp) / "calib"
        calib.mkdir()
        save_model(inlined, src, check=False)
        names = {i.name for i in inlined.graph.input}
        for i, feed in enumerate(feed_list):
            np.savez(calib / f"{i:05d}.npz", **{k: v for k, v in feed.items() if k in names})
        kw: dict[str, Any] = {"low_precision_type": "fp16", "keep_io_types": True, "data_max": data_max,
                              "calibration_data": str(calib), "providers": ["cpu"]}
        excl = []
        if ours_ops:
            kw["op_types_to_exclude"] = list(DEFAULT_FP32_OPS)
            excl += [f"^{re.escape(n)}$" for n in head_nodes or []]
        if fused_fp32:
            excl.append(f"^{INLINED}")
        if excl:
            kw["nodes_to_exclude"] = excl
        t0 = time.perf_counter()
        out = convert_to_mixed_precision(str(src), **kw)
        info["seconds"] = round(time.perf_counter() - t0, 1)
    info["unk_dims_cleared"] = _clear_unk_dims(out)
    info["refold"] = "not tried"
    if fused and refold:
        try:
            refolded = refold_cast_aware(out, fused)
            info["refold_max_abs_diff"] = _compare(out, refolded, feed_list[0])
            out = refolded
            info["refold"] = "ok"
        except Exception as e:  # noqa: BLE001 - reported, the inlined form is measured instead
            info["refold"] = f"failed: {str(e)[:200]}"
    return out, info


def _clear_unk_dims(model: onnx.ModelProto) -> int:
    """AutoCast writes every dimension it cannot name as ``dim_param: "unk"``; ONNX Runtime
    then takes all of them to be one size (our pyramid's 33- and 50-token tails are not) and
    fails with "Shape mismatch attempting to re-use buffer". Make them plain unknown dims."""
    n = 0
    for vi in [*model.graph.value_info, *model.graph.output]:
        for d in vi.type.tensor_type.shape.dim:
            if d.HasField("dim_param") and d.dim_param == "unk":
                d.ClearField("dim_param")
                n += 1
    return n


def refold_cast_aware(model: onnx.ModelProto, fused: list[onnx.NodeProto]) -> onnx.ModelProto:
    """``int8._refold_fused`` for a mixed-precision graph: AutoCast feeds a body whose nodes
    it kept in another precision through ``<tensor>_cast_to_<type>`` Casts, so each fused
    node takes the tensor its body actually read (one per formal input, else refused) and
    produces the tensors its body produced (in the body's precision)."""
    from onetrans_trt.calibrate.int8 import INLINED, _refold_fused

    body = [n for n in model.graph.node if n.name.startswith(INLINED)]
    read = {t for n in body for t in n.input}
    m = onnx.ModelProto()
    m.CopyFrom(model)
    renamed = []
    for f in fused:
        g = onnx.NodeProto()
        g.CopyFrom(f)
        for i, t in enumerate(f.input):
            if not t:
                continue
            seen = [x for x in read if x == t or x.startswith(f"{t}_cast_to_")]
            if len(seen) > 1:
                raise ValueError(f"{f.name}: its body reads {t} in several precisions {seen}")
            if seen:
                g.input[i] = seen[0]
        renamed.append(g)
    return _refold_fused(m, renamed)


def _compare(a: onnx.ModelProto, b: onnx.ModelProto, feed: dict[str, np.ndarray]) -> float:
    import onnxruntime as ort

    outs = []
    for m in (a, b):
        opts = ort.SessionOptions()
        opts.log_severity_level = 4
        sess = ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        outs.append(sess.run(None, {i.name: feed[i.name] for i in sess.get_inputs()}))
    return max(float(np.abs(x.astype(np.float32) - y.astype(np.float32)).max()) for x, y in zip(*outs))


# ---------------------------------------------------------------- graph statistics
FLOAT_TYPES = {onnx.TensorProto.FLOAT: "fp32", onnx.TensorProto.FLOAT16: "fp16"}


def _inline_all(model: onnx.ModelProto) -> onnx.ModelProto:
    return onnx.inliner.inline_local_functions(model) if len(model.functions) else model


def _types(model: onnx.ModelProto) -> dict[str, int]:
    m = onnx.shape_inference.infer_shapes(model)
    t = {}
    for vi in [*m.graph.input, *m.graph.output, *m.graph.value_info]:
        t[vi.name] = vi.type.tensor_type.elem_type
    for init in m.graph.initializer:
        t[init.name] = init.data_type
    return t


def _runtime_shapes(model: onnx.ModelProto, tensors: list[str], types: dict[str, int],
                    feed: dict[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
    import onnxruntime as ort

    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    inits = {i.name: tuple(i.dims) for i in m.graph.initializer}
    want = [t for t in dict.fromkeys(tensors) if t not in inits and t not in have and t in types]
    for t in want:
        m.graph.output.append(onnx.helper.make_tensor_value_info(t, types[t], None))
    opts = ort.SessionOptions()
    opts.log_severity_level = 4
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    outs = sess.run(names, {i.name: feed[i.name] for i in sess.get_inputs()})
    shapes = dict(inits)
    shapes.update({n: tuple(o.shape) for n, o in zip(names, outs)})
    shapes.update({k: tuple(v.shape) for k, v in feed.items()})
    return shapes


def _matmul_flops(node: onnx.NodeProto, shapes: dict[str, tuple[int, ...]]) -> float:
    a, b = shapes.get(node.input[0]), shapes.get(node.input[1])
    if a is None or b is None:
        return float("nan")
    if node.op_type == "Gemm":
        ta = next((x.i for x in node.attribute if x.name == "transA"), 0)
        m_, k_ = (a[1], a[0]) if ta else (a[0], a[1])
        tb = next((x.i for x in node.attribute if x.name == "transB"), 0)
        n_ = b[0] if tb else b[1]
        return 2.0 * m_ * k_ * n_
    if len(a) == 1:
        a = (1, *a)
    if len(b) == 1:
        b = (*b, 1)
    batch = np.broadcast_shapes(a[:-2], b[:-2])
    return 2.0 * float(np.prod(batch)) * a[-2] * a[-1] * b[-1]


def graph_stats(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> dict[str, Any]:
    """FP16 coverage of one graph (fused attention bodies inlined, so their math counts)."""
    m = _inline_all(model)
    types = _types(m)
    mm = [n for n in m.graph.node if n.op_type in ("MatMul", "Gemm")]
    shapes = _runtime_shapes(m, [i for n in mm for i in n.input[:2]], types, feed)
    fl = {"fp16": 0.0, "fp32": 0.0}
    cnt = {"fp16": 0, "fp32": 0}
    for n in mm:
        p = FLOAT_TYPES.get(types.get(n.output[0]), "fp32")
        fl[p] += _matmul_flops(n, shapes)
        cnt[p] += 1
    # float compute nodes: a float output, not a Cast/Constant; precision = the output's type
    compute = {}
    for i, n in enumerate(m.graph.node):
        if n.op_type in ("Cast", "Constant", "CastLike"):
            continue
        outs = [types.get(o) for o in n.output if o]
        prec = [FLOAT_TYPES[t] for t in outs if t in FLOAT_TYPES]
        if prec:
            compute[i] = "fp16" if "fp16" in prec else "fp32"
    producer = {o: i for i, n in enumerate(m.graph.node) for o in n.output}
    fp32 = [i for i, p in compute.items() if p == "fp32"]
    parent = {i: i for i in fp32}

    def find(x):
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x
    for i in fp32:
        for t in m.graph.node[i].input:
            j = producer.get(t)
            if j is not None and j in parent:
                parent[find(i)] = find(j)
    islands = len({find(i) for i in fp32})
    total = fl["fp16"] + fl["fp32"]
    return {
        "matmul_flops_fp16_share": fl["fp16"] / total if total else float("nan"),
        "matmul_mflops": round(total / 1e6, 3),
        "matmul_nodes_fp16": cnt["fp16"], "matmul_nodes": cnt["fp16"] + cnt["fp32"],
        "float_nodes_fp16": sum(1 for p in compute.values() if p == "fp16"), "float_nodes": len(compute),
        "casts": sum(1 for n in m.graph.node if n.op_type == "Cast"),
        "fp32_islands": islands,
        "fp32_ops": sorted({m.graph.node[i].op_type for i in fp32}),
    }


# ---------------------------------------------------------------- quality
def evaluate(build: Path, variants: dict[str, tuple[Path, Path]], n_requests: int, n_candidates: int = 50,
             data_dir=None) -> dict[str, dict[str, Any]]:
    from onetrans_trt.calibrate.quality import ranking_agreement
    from onetrans_trt.data.movielens import MovieLens
    from onetrans_trt.data.requests import encode_request
    from onetrans_trt.kv import state_arrays
    from onetrans_trt.models.config import read_config
    from onetrans_trt.models.training import binary_metrics
    from onetrans_trt.runtime.ort_backend import OrtSplitBackend

    cfg = read_config(build)
    schema, tasks = cfg.schema, list(cfg.tasks)
    ref = OrtSplitBackend(build, name="fp32", device=None)
    backends = {name: OrtSplitBackend(build, name=name, user_graph=str(u), scorer_graph=str(s), device=None)
                for name, (u, s) in variants.items()}
    ml = MovieLens(data_dir, max_history=schema.max_history, merge_mode=schema.merge_mode)
    reqs = ml.requests(n_requests, n_candidates=n_candidates, seed=2024)
    acc = {n: {"logit": 0.0, "kv": 0.0, "kv_rel": 0.0, "ov": [], "tau": [], "pred": []} for n in backends}
    ys, pref = [], []
    for req, labels in reqs:
        hist, ns = encode_request(schema, req)
        kv_ref = ref.encode_user(hist)
        st_ref = state_arrays(kv_ref)
        lr = ref.score(kv_ref, ns)
        lab = [j for j, y in enumerate(labels) if y is not None]
        ys += [labels[j] for j in lab]
        pref.append(lr[lab])
        for name, b in backends.items():
            kv = b.encode_user(hist)
            st = state_arrays(kv)
            lv = b.score(kv, ns).astype(np.float32)
            a = acc[name]
            a["logit"] = max(a["logit"], float(np.abs(lv - lr).max()))
            for k, v in st_ref.items():
                d = float(np.abs(np.asarray(st[k], np.float32) - v).max())
                a["kv"] = max(a["kv"], d)
                a["kv_rel"] = max(a["kv_rel"], d / max(1e-12, float(np.abs(v).max())))
            o, t = ranking_agreement(lv[:, 0], lr[:, 0])
            a["ov"].append(o)
            a["tau"].append(t)
            a["pred"].append(lv[lab])
    y = np.asarray(ys, np.float32)
    mref = binary_metrics(y, np.concatenate(pref), tasks)
    out = {"fp32": {"requests": len(reqs), "labelled": int(len(y)),
                    "auc": {t: mref[t]["auc"] for t in tasks}}}
    for name, a in acc.items():
        mv = binary_metrics(y, np.concatenate(a["pred"]), tasks)
        out[name] = {"max_abs_logit_error": a["logit"], "max_abs_kv_error": a["kv"],
                     "max_rel_kv_error": a["kv_rel"],
                     "delta_auc": {t: mv[t]["auc"] - mref[t]["auc"] for t in tasks},
                     "top10_overlap_mean": float(np.mean(a["ov"])), "top10_overlap_min": float(np.min(a["ov"])),
                     "kendall_tau_mean": float(np.mean(a["tau"])), "kendall_tau_min": float(np.min(a["tau"]))}
    return out


def table(result: dict[str, Any]) -> str:
    """The results as a markdown table (one row per variant)."""
    q, st = result["quality"], result["graph_stats"]
    tasks = list(q["fp32"]["auc"])
    head = ["variant", "MatMul FLOPs FP16 (enc / scorer)", "MatMul nodes FP16", "Casts", "FP32 islands",
            "max abs logit err", "max abs K/V err", *[f"dAUC {t}" for t in tasks], "top-10 mean (min)",
            "Kendall tau mean (min)"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in [n for n in q if n != "fp32"]:
        e, c, r = st[name]["user_encoder"], st[name]["candidate_scorer"], q[name]
        rows.append("| " + " | ".join([
            name, f"{e['matmul_flops_fp16_share']:.1%} / {c['matmul_flops_fp16_share']:.1%}",
            f"{e['matmul_nodes_fp16']}/{e['matmul_nodes']} + {c['matmul_nodes_fp16']}/{c['matmul_nodes']}",
            f"{e['casts']} + {c['casts']}", f"{e['fp32_islands']} + {c['fp32_islands']}",
            f"{r['max_abs_logit_error']:.2e}", f"{r['max_abs_kv_error']:.2e}",
            *[f"{r['delta_auc'][t]:+.6f}" for t in tasks],
            f"{r['top10_overlap_mean']:.4f} ({r['top10_overlap_min']:.2f})",
            f"{r['kendall_tau_mean']:.4f} ({r['kendall_tau_min']:.4f})"]) + " |")
    return "\n".join(rows)


# ---------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("build", type=Path)
    ap.add_argument("--out", type=Path, required=True, help="directory for the AutoCast graphs and results.json")
    ap.add_argument("--requests", type=int, default=200, help="test requests for the quality comparison")
    ap.add_argument("--calib", type=int, default=32, help="training-period requests AutoCast measures ranges on")
    ap.add_argument("--configs", default=",".join(AUTOCAST_CONFIGS), help="AutoCast configurations to try")
    ap.add_argument("--no-refold", action="store_true", help="measure the inlined AutoCast graphs")
    ap.add_argument("--table", action="store_true", help="print OUT/results.json as a markdown table and stop")
    args = ap.parse_args(argv)
    if args.table:
        print(table(json.loads((args.out / "results.json").read_text())))
        return 0

    from onetrans_trt.calibrate.data import build_calibration_set, feeds
    from onetrans_trt.calibrate.fp16 import _head_nodes, convert_build
    from onetrans_trt.calibrate.int8 import _named
    from onetrans_trt.onnx_files import load_model, save_model

    build, out = args.build.resolve(), args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    if not (build / "fp16" / "candidate_scorer.onnx").is_file():
        convert_build(build)
    arrays = build_calibration_set(build, args.calib)
    feed = {key: feeds(arrays, key) for _, _, key in ROLES}
    variants = {"ours_onnxconverter": (build / "fp16" / "user_encoder.onnx", build / "fp16" / "candidate_scorer.onnx")}
    conv: dict[str, Any] = {}
    for cname in args.configs.split(","):
        cfg = dict(AUTOCAST_CONFIGS[cname])
        d = out / cname
        d.mkdir(exist_ok=True)
        conv[cname] = {}
        for role, fname, key in ROLES:
            src = _named(load_model(build / fname))
            heads = _head_nodes(src) if role == "candidate_scorer" else []
            m, info = autocast_graph(src, feed[key], head_nodes=heads, refold=not args.no_refold, **cfg)
            save_model(m, d / fname, check=False)
            conv[cname][role] = info
            print(f"{cname} {role}: {info}", file=sys.stderr)
        variants[cname] = (d / "user_encoder.onnx", d / "candidate_scorer.onnx")
    stats = {}
    for name, (u, s) in variants.items():
        stats[name] = {"user_encoder": graph_stats(load_model(u), feed["user"][0]),
                       "candidate_scorer": graph_stats(load_model(s), feed["scorer"][0])}
    stats["fp32"] = {"user_encoder": graph_stats(load_model(build / "user_encoder.onnx"), feed["user"][0]),
                     "candidate_scorer": graph_stats(load_model(build / "candidate_scorer.onnx"), feed["scorer"][0])}
    quality = evaluate(build, variants, args.requests)
    result = {"build": str(build), "calibration_requests": args.calib, "configs": AUTOCAST_CONFIGS,
              "conversion": conv, "graph_stats": stats, "quality": quality}
    (out / "results.json").write_text(json.dumps(result, indent=1, default=float))
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
