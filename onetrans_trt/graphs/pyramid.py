"""Pyramid truncation (placeholder until the pass lands; see the module docstring below)."""
from onetrans_trt.graphs import register


@register("pyramid")
def pyramid(graph):
    return graph
