"""First divergence: where a graph starts to differ from the PyTorch model.

The graph is re-run with intermediate tensors marked as outputs: the output of every
leaf module (each Linear, per-token MixedLinear, RMSNorm, embedding; found through the
module scopes the dynamo exporter recorded on ``serving.onnx``'s nodes, whose names the
build's graphs keep) and each layer's K/V. PyTorch runs the same inputs with forward
hooks on those modules. Walking the graph in topological order, the first tensor whose
error exceeds the tolerance (or whose shape differs) names the layer, module and node.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onetrans_trt.validate.compare import ErrorStats
from onetrans_trt.validate.policy import within

LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def module_scopes(serving: str | Path) -> dict[str, str]:
    """Node name -> innermost module path (``layers.0.ns_o``) from the exporter's metadata."""
    out = {}
    from onetrans_trt.onnx_files import load_model

    for n in load_model(serving, external=False).graph.node:  # node metadata only, never the weights
        meta = {p.key: p.value for p in n.metadata_props}
        try:
            scopes = ast.literal_eval(meta.get("pkg.torch.onnx.name_scopes", "[]"))
        except (ValueError, SyntaxError):
            continue
        mods = [s for s in scopes if s.startswith("model.")]
        if mods:
            out[n.name] = mods[-1][len("model."):]
    return out


def layer_of(name: str) -> int | None:
    m = LAYER.search(name + ".")
    if m:
        return int(m.group(1))
    m = re.match(r"user_[kv]_(\d+)$", name)
    return int(m.group(1)) if m else None


def failing_node(message: str, scopes: dict[str, str], role: str, model: onnx.ModelProto | None = None
                 ) -> dict[str, Any]:
    """A finding for a graph that raises at run time, from ORT's ``Name:'<node>'``; a node
    outside any module takes the scope of the nearest module upstream of it."""
    m = re.search(r"Name:'([^']+)'", message)
    node = m.group(1) if m else None
    scope = scopes.get(node or "", "")
    if not scope and node and model is not None:
        producers = {o: n for n in model.graph.node for o in n.output}
        frontier = [n for n in model.graph.node if n.name == node]
        seen: set[str] = set()
        while frontier and not scope:
            nxt = []
            for n in frontier:
                for i in n.input:
                    p = producers.get(i)
                    if p is not None and p.name not in seen:
                        seen.add(p.name)
                        if scopes.get(p.name):
                            scope = scopes[p.name]
                            break
                        nxt.append(p)
                if scope:
                    break
            frontier = nxt
    return {"layer": layer_of(scope) if scope else None, "module": scope or None, "node": node, "tensor": None,
            "role": role, "max_abs": float("inf"), "cosine": 0.0, "shape_mismatch": None, "nan": 0, "inf": 0,
            "error": message.split("Status Message:")[-1].strip()[:300]}


def _leaf_modules(model) -> set[str]:
    return {name for name, mod in model.named_modules() if name and not list(mod.children())}


def localize(graph_path: Path, role: str, feeds: dict[str, np.ndarray], torch_model, torch_run, tol: dict,
             serving: Path, *, simulate_qdq: bool = False) -> dict[str, Any] | None:
    """``torch_run()`` runs the PyTorch side of ``role`` (hooks capture activations) and
    returns the named graph outputs' reference values."""
    import onnxruntime as ort
    from onetrans_trt.ort_options import session_options
    import torch

    from onetrans_trt.onnx_files import ON_DISK_BYTES, load_model, session_source

    scopes = module_scopes(serving)
    leaves = _leaf_modules(torch_model)
    model = load_model(graph_path, on_disk_above=ON_DISK_BYTES)  # tables of 256 MiB+ stay in their file
    checkpoints: list[tuple[int, str, str, str]] = []  # (node index, tensor, module, node)
    last: dict[str, tuple[int, str, str]] = {}
    for i, n in enumerate(model.graph.node):
        s = scopes.get(n.name)
        if s in leaves and n.output:
            last[s] = (i, n.output[0], n.name)
    for s, (i, t, node) in last.items():
        checkpoints.append((i, t, s, node))
    produced = {o: i for i, n in enumerate(model.graph.node) for o in n.output}
    for o in model.graph.output:
        if re.match(r"user_[kv]_\d+$", o.name) or o.name == "logits":
            checkpoints.append((produced.get(o.name, len(model.graph.node)), o.name, o.name, o.name))
    checkpoints.sort()
    have = {o.name for o in model.graph.output}
    for _, t, _, _ in checkpoints:
        if t not in have:
            model.graph.output.append(onnx.helper.make_empty_tensor_value_info(t))
            have.add(t)
    opts = session_options(simulate_qdq=simulate_qdq)
    with session_source(model) as source:  # bytes, or a temporary file with external data when large
        sess = ort.InferenceSession(source, sess_options=opts, providers=["CPUExecutionProvider"])
    from onetrans_trt.data.requests import history_feeds

    names = [i.name for i in sess.get_inputs()]
    wanted = [t for _, t, _, _ in checkpoints]
    try:
        got = dict(zip(wanted, sess.run(wanted, history_feeds(feeds, names))))  # (HyFormer: split sequences)
    except Exception as e:  # noqa: BLE001 - the graph itself fails: name the node that did
        return failing_node(str(e), scopes, role, model)
    captured: dict[str, np.ndarray] = {}
    hooks = []
    for s in {c[2] for c in checkpoints if c[2] in leaves}:
        def hook(mod, inp, out, s=s):
            captured.setdefault(s, out.detach().float().numpy())
        hooks.append(torch_model.get_submodule(s).register_forward_hook(hook))
    try:
        with torch.no_grad():
            ref_outputs = torch_run()
    finally:
        for h in hooks:
            h.remove()
    captured.update(ref_outputs)
    for _, t, s, node in checkpoints:
        if s not in captured:
            continue
        st = ErrorStats(s)
        st.add(got[t], captured[s])
        summ = st.summary()
        if not within(summ, tol):
            return {"layer": layer_of(s), "module": s, "node": node, "tensor": t, "role": role,
                    "max_abs": summ["max_abs"], "cosine": summ["cosine"], "shape_mismatch": summ["shape_mismatch"],
                    "nan": summ["nan"], "inf": summ["inf"]}
    return None
