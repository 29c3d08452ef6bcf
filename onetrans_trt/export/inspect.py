"""``inspect``: a build in words, node counts, sizes and theoretical FLOPs per request."""

from __future__ import annotations

import collections
from pathlib import Path
from typing import Any

from onetrans_trt.export.api import CANDIDATE_SCORER, UNIFIED, USER_ENCODER, read_manifest
from onetrans_trt.graphs.flops import graph_flops
from onetrans_trt.onnx_files import data_file, load_model


def kv_lengths(schedule: list[int | None], history: int) -> list[int]:
    """K/V tokens per layer for a history of ``history`` S-tokens."""
    out, n = [], history
    for q in schedule:
        out.append(n)
        if q is not None:
            n = min(q, n)
    return out


def _per_sequence(hy: dict) -> str:
    per = hy.get("per_sequence")
    if not per:
        return f"{hy['queries_per_sequence']} global queries each, {hy['seq_encoder']} encoders"
    return "; ".join(f"{p['queries']} queries, {p['encoder']}" + (f" w{p['window']}" if p["encoder"] == "longer" else "")
                     + (f", newest {p['max_len']}" if p["max_len"] else "") for p in per)


def hyformer_slot_lengths(hy: dict, history: int) -> list[int]:
    """K/V tokens of each HyFormer state slot (``l * J + j``) for a stream of ``history`` events:
    sequence j is laid out at the stream's length, or at its ``max_len`` when that is shorter;
    LONGER keeps its window. (A manifest from before per-sequence settings: one for all.)"""
    per = hy.get("per_sequence") or [{"encoder": hy["seq_encoder"], "window": hy["longer_window"], "max_len": None}
                                     ] * hy["sequences"]
    widths = []
    for spec in per:
        n = history if spec["max_len"] is None else min(history, spec["max_len"])
        widths.append(min(spec["window"], n) if spec["encoder"] == "longer" else n)
    return widths * (hy["state_slots"] // len(per))


def state_lengths(manifest: dict, history: int) -> list[int]:
    """K/V tokens per state slot for a history of ``history`` S-tokens (either family)."""
    if manifest["model"]["family"] == "module":  # a user's module: the K/V lengths it was traced with
        dims = manifest["dynamic_dims"]
        n = len([k for k in dims if k.startswith("kv_len_")])
        return [min(history, dims[f"kv_len_{i}"]["max"]) for i in range(n)]
    hy = manifest.get("hyformer")
    if hy:
        return hyformer_slot_lengths(hy, history)
    return kv_lengths(manifest["pyramid"]["schedule"], history)


def request_dims(manifest: dict, candidates: int, history: int) -> dict[str, int]:
    dims = {"users": 1, "candidates": candidates, "history": history}
    hy = manifest.get("hyformer")
    if hy:  # each sequence's own length axis: the most a stream of `history` events gives it (its cap)
        per = hy.get("per_sequence") or [{"max_len": None}] * hy["sequences"]
        for j, spec in enumerate(per):
            dims[f"history{j}"] = history if spec["max_len"] is None else min(history, spec["max_len"])
    for l, n in enumerate(state_lengths(manifest, history)):
        dims[f"kv_len_{l}"] = n
    return dims


def inspect_build(build: str | Path, *, candidates: int = 128, history: int | None = None) -> dict[str, Any]:
    build = Path(build)
    m = read_manifest(build)
    s_max = m["model"]["s_max_len"]
    notes = []
    if history is not None and history > s_max:  # the graphs hold no more: count what a request can be
        notes.append(f"history {history} > the model's {s_max} S-tokens: using {s_max}")
    history = min(history or s_max, s_max)
    dims = request_dims(m, candidates, history)
    graphs = {}
    for key, fname in (("user_encoder", USER_ENCODER), ("candidate_scorer", CANDIDATE_SCORER)):
        model = load_model(build / fname, external=False)  # the nodes; graph_flops reads the weights itself
        ops = collections.Counter(n.op_type for n in model.graph.node)
        side = data_file(build / fname)
        graphs[key] = {"file": fname, "bytes": (build / fname).stat().st_size, "nodes": len(model.graph.node),
                       **({"data_bytes": side.stat().st_size} if side.is_file() else {}),
                       "ops": dict(ops.most_common()), "flops": graph_flops(build / fname, dims)["flops"]}
        del model
    split = graphs["user_encoder"]["flops"] + graphs["candidate_scorer"]["flops"]
    if (build / UNIFIED).is_file():
        # counted at 1 and 2 rows and extended linearly to C (every row of the unified graph is one
        # (history, candidate) pair: its work is affine in the rows): running it at C rows with every
        # matmul operand kept as an output needs C times the memory (24 GB and more at C=1024, L=512)
        f1, f2 = (graph_flops(build / UNIFIED, {**dims, "users": u})["flops"] for u in (1, 2))
        unified = f1 + (candidates - 1) * (f2 - f1)
        how = "unified.onnx at the same sizes (counted at 1 and 2 rows, linear in the rows)"
    else:
        one = graph_flops(build / CANDIDATE_SCORER, {**dims, "candidates": 1})["flops"]
        unified = candidates * (graphs["user_encoder"]["flops"] + one)
        how = "C x (user encoder + scorer for one candidate); export --unified to measure it"
    return {
        "build": str(build), "manifest": m, "request": {"candidates": candidates, "history": history},
        "notes": notes,
        "dims": dims, "graphs": graphs,
        "flops": {"user_encoder_once": graphs["user_encoder"]["flops"],
                  "candidate_scorer": graphs["candidate_scorer"]["flops"], "split_total": split,
                  "unified": unified, "unified_how": how, "ratio": unified / split if split else None},
    }


def _fmt_flops(x: float) -> str:
    for unit, scale in (("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6), ("kFLOP", 1e3)):
        if x >= scale:
            return f"{x / scale:.2f} {unit}"
    return f"{x:.0f} FLOP"


def describe(info: dict[str, Any]) -> str:
    m = info["manifest"]
    mod = m["model"]
    lines = [
        f"{info['build']}: {mod['family']} ({mod.get('preset') or 'custom'}), {mod['n_layers']} layers, "
        f"d_model {mod['d_model']}, {mod['n_heads']} heads, {mod['ns_tokens']} NS-tokens, tasks {', '.join(mod['tasks'])}",
        f"  from {m['checkpoint']['path']} (sha256 {m['checkpoint']['sha256'][:12]}), opset {m['opset']}, "
        f"torch {m['versions']['torch']}, onnx {m['versions']['onnx']}",
        (f"  HyFormer: {m['hyformer']['sequences']} sequences ({_per_sequence(m['hyformer'])}), "
         f"{m['hyformer']['state_slots']} K/V slots"
         if m.get("hyformer") else
         f"  pyramid S-queries per layer: {m['pyramid']['schedule']} ({m['pyramid']['mode']})"),
        "  passes: " + (", ".join(f"{r['pass']}[{r['graph']}] {r['nodes_before']}->{r['nodes_after']}"
                                  for r in m["passes"]) or "none"),
        "  dynamic dims: " + ", ".join(f"{k} {v['min']}..{v['max']} (typ {v['typical']})"
                                       for k, v in m["dynamic_dims"].items()),
    ]
    for key, g in info["graphs"].items():
        top = ", ".join(f"{op} {n}" for op, n in list(g["ops"].items())[:6])
        lines.append(f"  {key}: {g['nodes']} nodes ({top}), {g['bytes'] / 1e6:.2f} MB")
    f = info["flops"]
    r = info["request"]
    lines += [
        f"  FLOPs per request (C={r['candidates']}, history {r['history']}):",
        f"    user encoder (once)   {_fmt_flops(f['user_encoder_once'])}",
        f"    candidate scorer      {_fmt_flops(f['candidate_scorer'])}",
        f"    split total           {_fmt_flops(f['split_total'])}",
        f"    unified (naive)       {_fmt_flops(f['unified'])}   [{f['unified_how']}]",
        f"    unified / split       {f['ratio']:.1f}x",
    ]
    return "\n".join(lines)
