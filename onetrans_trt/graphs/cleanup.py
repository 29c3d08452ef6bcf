"""Cleanup: constant folding and simplification (onnxslim), dead-node removal."""

from __future__ import annotations

import onnx_graphsurgeon as gs

from onetrans_trt.graphs import register


@register("cleanup")
def cleanup(graph: gs.Graph) -> gs.Graph:
    import onnxslim

    model = gs.export_onnx(graph.cleanup().toposort())
    slim = onnxslim.slim(model)
    out = gs.import_onnx(slim)
    # onnxslim may drop the symbolic names of inputs/outputs; keep the originals
    for old, new in zip([*graph.inputs, *graph.outputs], [*out.inputs, *out.outputs]):
        if old.name == new.name and old.shape is not None:
            new.shape = old.shape
    return out.cleanup(remove_unused_graph_inputs=False).toposort()
