"""Graph passes over onnx-graphsurgeon graphs, one module per pass.

Each pass is a function ``Graph -> Graph``. :func:`run_passes` applies a list of them by
name and returns the record that goes into the build manifest (pass, order, node counts
before and after).
"""

from __future__ import annotations

from typing import Callable

PASSES: dict[str, Callable] = {}


def register(name: str):
    def deco(fn: Callable) -> Callable:
        PASSES[name] = fn
        fn.pass_name = name
        return fn

    return deco


def _load_all() -> None:
    from onetrans_trt.graphs import cleanup, fuse_attention, no_broadcast, pyramid, shared_prefix  # noqa: F401


def available_passes() -> list[str]:
    _load_all()
    return list(PASSES)


def describe_passes() -> dict[str, str]:
    """Every registered pass with one line on what it does (its module's summary line,
    ``"Title: what it does."`` -> ``"what it does."``)."""
    import sys

    _load_all()
    out = {}
    for name, fn in PASSES.items():
        doc = (sys.modules[fn.__module__].__doc__ or fn.__doc__ or "").strip()
        first = doc.splitlines()[0] if doc else ""
        out[name] = first.split(": ", 1)[1] if ": " in first else first
    return out


def run_passes(graph, names: list[str], *, graph_name: str = "graph"):
    """Apply passes in order; return ``(graph, records)``."""
    _load_all()
    records = []
    for name in names:
        if name not in PASSES:
            from onetrans_trt.errors import InputError

            raise InputError(f"unknown graph pass {name!r}; available: {', '.join(PASSES)}")
        before = len(graph.nodes)
        graph = PASSES[name](graph)
        rec = {"pass": name, "graph": graph_name, "nodes_before": before, "nodes_after": len(graph.nodes)}
        if "fused_attention" in graph.__dict__:
            rec["fused"] = graph.__dict__["fused_attention"]
        records.append(rec)
        from onetrans_trt.log import get_logger

        get_logger("graphs").info("pass %s on %s: %d -> %d nodes%s", name, graph_name, before, len(graph.nodes),
                                  f" ({rec['fused']} attention fused)" if "fused" in rec else "")
    return graph, records
