"""Pyramid truncation: compute queries only for the S-tokens each layer keeps.

PyTorch code often computes a whole layer for every S-token and slices the kept tail
afterwards (``z[:, -q:]``). In the graph that is a ``Slice`` on the token axis at the end of
the layer. This pass pushes each such slice up, through the ops that act on every token
separately (residual adds, FFN matmuls and activations, norms, the attention's P@V and
Q@K^T on the query axis, head split/merge reshapes and transposes, the mask), until it
reaches a tensor that something else also needs in full: there it stops, because going
further would compute the tail twice. In a OneTrans layer that is the normalized input
(the K/V need every token) and the residual input, which is exactly what a slice-first
implementation slices. Nodes left without consumers (the layer's work on dropped tokens,
and any S-token work of the top layer, whose outputs nothing reads) are removed.

Rules push a slice of axis ``a`` of a node's output to its inputs:

- elementwise ops (with numpy broadcasting: an input that broadcasts on ``a`` is kept);
- normalizations and Softmax whose reduced axis is not ``a``;
- MatMul on a batch axis or the row axis (the first operand's rows);
- Transpose (the axis is permuted), Unsqueeze (the axis is shifted);
- Reshape when the dimensions up to ``a`` are unchanged (head split/merge): the new
  target shape is the sliced input's leading dims followed by the old trailing dims.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onetrans_trt.graphs import register

ELEMENTWISE = {
    "Add", "Sub", "Mul", "Div", "Pow", "Where", "And", "Or", "Xor", "Not", "Equal", "Less", "LessOrEqual",
    "Greater", "GreaterOrEqual", "Max", "Min", "Cast", "Gelu", "Erf", "Relu", "Sigmoid", "Tanh", "Exp", "Log",
    "Sqrt", "Reciprocal", "Neg", "Abs", "Identity", "IsInf", "IsNaN", "Clip",
}
NORMS = {"RMSNormalization", "LayerNormalization", "SimplifiedLayerNormalization"}
_MAX = np.iinfo(np.int64).max


def _const(node: gs.Node, i: int) -> np.ndarray | None:
    if i >= len(node.inputs):
        return None
    t = node.inputs[i]
    if isinstance(t, gs.Constant):
        return np.asarray(t.values)
    if t.inputs and t.inputs[0].op == "Constant":
        return np.asarray(t.inputs[0].attrs["value"].values)
    return None


def _tail_slice(node: gs.Node) -> tuple[int, int, int] | None:
    """``(axis, start, end)`` when ``node`` is a one-axis, step-1 Slice with constant bounds."""
    if node.op != "Slice" or not isinstance(node.inputs[0], gs.Variable) or node.inputs[0].shape is None:
        return None
    starts, ends, axes = _const(node, 1), _const(node, 2), _const(node, 3)
    steps = _const(node, 4) if len(node.inputs) > 4 else np.array([1])
    if starts is None or ends is None or axes is None or steps is None:
        return None
    if starts.size != 1 or ends.size != 1 or axes.size != 1 or int(steps.reshape(-1)[0]) != 1:
        return None
    rank = len(node.inputs[0].shape)
    axis = int(axes.reshape(-1)[0])
    return (axis + rank if axis < 0 else axis), int(starts.reshape(-1)[0]), int(ends.reshape(-1)[0])


class _Pusher:
    def __init__(self, graph: gs.Graph):
        self.graph = graph
        self.count = 0
        self.cache: dict[tuple, gs.Variable] = {}

    def slice_of(self, t: gs.Tensor, axis: int, start: int, end: int, dim) -> gs.Variable:
        key = (t.name, axis, start, end)
        if key in self.cache:
            return self.cache[key]
        self.count += 1
        shape = None
        if t.shape is not None:
            shape = list(t.shape)
            shape[axis] = dim
        out = gs.Variable(f"{t.name}__tail{self.count}", dtype=t.dtype, shape=shape)
        c = lambda v, n: gs.Constant(f"{out.name}_{n}", np.array([v], dtype=np.int64))  # noqa: E731
        self.graph.nodes.append(gs.Node("Slice", name=f"{out.name}_slice",
                                        inputs=[t, c(start, "starts"), c(end, "ends"), c(axis, "axes"), c(1, "steps")],
                                        outputs=[out]))
        self.cache[key] = out
        return out

    def push(self, sl: gs.Node) -> bool:
        spec = _tail_slice(sl)
        if spec is None:
            return False
        axis, start, end = spec
        x = sl.inputs[0]
        if len(x.outputs) != 1 or not x.inputs or x in self.graph.outputs:
            return False  # needed in full elsewhere (or an input): the slice stays here
        p = x.inputs[0]
        if len(p.outputs) != 1:
            return False
        out = sl.outputs[0]
        dim = out.shape[axis] if out.shape is not None else None
        new_inputs = self.rule(p, axis, start, end, dim, out)
        if new_inputs is None:
            return False
        p.outputs.clear()  # p's output only fed the slice; the new node writes the slice's output
        sl.outputs.clear()
        self.graph.nodes.append(gs.Node(p.op, name=f"{p.name}__tail", attrs=dict(p.attrs), inputs=new_inputs,
                                        outputs=[out], domain=p.domain))
        return True

    def _broadcast_input(self, t: gs.Tensor, out_rank: int, axis: int, start: int, end: int, dim):
        if isinstance(t, gs.Constant) and len(t.shape) == 0:
            return t
        shape = t.shape if t.shape is not None else None
        if shape is None:
            raise _Stop
        a = axis - (out_rank - len(shape))
        if a < 0 or shape[a] == 1:
            return t  # broadcasts along the sliced axis
        return self.slice_of(t, a, start, end, dim)

    def rule(self, p: gs.Node, axis: int, start: int, end: int, dim, out: gs.Variable):
        rank = len(out.shape) if out.shape is not None else None
        if rank is None:
            return None
        try:
            if p.op in ELEMENTWISE:
                if p.op == "Clip":
                    return [self._broadcast_input(p.inputs[0], rank, axis, start, end, dim), *p.inputs[1:]]
                return [self._broadcast_input(t, rank, axis, start, end, dim) for t in p.inputs]
            if p.op in NORMS or p.op == "Softmax":
                red = int(p.attrs.get("axis", -1))
                red = red + rank if red < 0 else red
                if axis >= red:
                    return None
                return [self.slice_of(p.inputs[0], axis, start, end, dim), *p.inputs[1:]]
            if p.op == "MatMul":
                a, b = p.inputs
                if a.shape is None or b.shape is None or axis == rank - 1:
                    return None
                if axis == rank - 2:
                    return [self.slice_of(a, len(a.shape) - 2, start, end, dim), b]
                return [self._broadcast_input(a, rank, axis, start, end, dim),
                        self._broadcast_input(b, rank, axis, start, end, dim)]
            if p.op == "Transpose":
                perm = p.attrs.get("perm")
                if perm is None:
                    return None
                return [self.slice_of(p.inputs[0], int(perm[axis]), start, end, dim)]
            if p.op == "Unsqueeze":
                axes = _const(p, 1)
                if axes is None:
                    return None
                axes = sorted(int(x) + rank if int(x) < 0 else int(x) for x in axes.reshape(-1))
                if axis in axes:
                    return None
                return [self.slice_of(p.inputs[0], axis - sum(1 for x in axes if x < axis), start, end, dim),
                        p.inputs[1]]
            if p.op == "Reshape":
                return self._reshape(p, axis, start, end, dim, out)
        except _Stop:
            return None
        return None

    def _reshape(self, p: gs.Node, axis: int, start: int, end: int, dim, out: gs.Variable):
        x, target = p.inputs[0], p.inputs[1]
        if x.shape is None or out.shape is None or len(x.shape) <= axis:
            return None
        src = x.inputs[0].outputs[0] if x.inputs else x
        orig_out = p.outputs[0]
        if orig_out.shape is None or list(x.shape[:axis + 1]) != list(orig_out.shape[:axis + 1]):
            return None  # the reshape mixes the sliced axis with others
        if any(d is None for d in orig_out.shape[:axis + 1]):
            return None
        del src
        xs = self.slice_of(x, axis, start, end, dim)
        self.count += 1
        tag = f"{xs.name}_shape{self.count}"
        lead = gs.Variable(f"{tag}_lead", dtype=np.int64, shape=[axis + 1])
        trail = gs.Variable(f"{tag}_trail", dtype=np.int64, shape=[len(out.shape) - axis - 1])
        new = gs.Variable(tag, dtype=np.int64, shape=[len(out.shape)])
        self.graph.nodes += [
            gs.Node("Shape", name=f"{tag}_lead_node", attrs={"start": 0, "end": axis + 1}, inputs=[xs], outputs=[lead]),
            gs.Node("Slice", name=f"{tag}_trail_node",
                    inputs=[target, gs.Constant(f"{tag}_s", np.array([axis + 1], np.int64)),
                            gs.Constant(f"{tag}_e", np.array([_MAX], np.int64))], outputs=[trail]),
            gs.Node("Concat", name=f"{tag}_node", attrs={"axis": 0}, inputs=[lead, trail], outputs=[new]),
        ]
        return [xs, new]


class _Stop(Exception):
    pass


@register("pyramid")
def pyramid(graph: gs.Graph) -> gs.Graph:
    """Push token-axis tail slices up to where the full tensor is needed anyway."""
    graph = graph.copy()
    pusher = _Pusher(graph)
    for _ in range(10_000):
        moved = False
        for node in list(graph.nodes):
            if node.op == "Slice" and node.outputs and pusher.push(node):
                moved = True
        graph.cleanup().toposort()
        if not moved:
            break
    return graph
