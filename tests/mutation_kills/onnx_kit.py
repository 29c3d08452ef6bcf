"""A few lines of ONNX by hand: small graphs for the per-pass unit tests (milliseconds each).

``G`` collects nodes, inputs, outputs and initializers; every op output may carry a shape
(symbolic dims as strings) so that passes reading ``tensor.shape`` see what an exporter writes.
``run`` runs a model or a graphsurgeon graph in ONNX Runtime (op functions attached).
"""

from __future__ import annotations

import itertools

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

F32, I64, BOOL = TensorProto.FLOAT, TensorProto.INT64, TensorProto.BOOL


class G:
    def __init__(self, opset: int = 17):
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.infos: list[onnx.ValueInfoProto] = []
        self._n = itertools.count()

    def input(self, name: str, shape, dtype=F32) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, dtype, shape))
        return name

    def const(self, value, dtype=np.float32, name: str | None = None) -> str:
        name = name or f"c{next(self._n)}"
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def op(self, op_type: str, *inputs: str, shape=None, dtype=F32, name: str | None = None, out: str | None = None,
           outputs: int = 1, domain: str | None = None, **attrs) -> str:
        i = next(self._n)
        outs = [out or f"{op_type.lower()}{i}"] + [f"{op_type.lower()}{i}_{k}" for k in range(1, outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=name or f"{op_type}_{i}",
                                           domain=domain, **attrs))
        if shape is not None:
            self.infos.append(helper.make_tensor_value_info(outs[0], dtype, shape))
        return outs[0]

    def output(self, name: str, shape=None, dtype=F32) -> str:
        self.outputs.append(helper.make_tensor_value_info(name, dtype, shape))
        return name

    def model(self) -> onnx.ModelProto:
        g = helper.make_graph(self.nodes, "g", self.inputs, self.outputs, self.inits, value_info=self.infos)
        domains = sorted({n.domain for n in self.nodes if n.domain and n.domain != "onetrans"})
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", self.opset)] +
                              [helper.make_opsetid(d, 1) for d in domains])
        m.ir_version = 10
        return m

    def gs(self):
        import onnx_graphsurgeon as gs

        return gs.import_onnx(self.model())


def as_model(graph_or_model) -> onnx.ModelProto:
    if isinstance(graph_or_model, onnx.ModelProto):
        return graph_or_model
    import onnx_graphsurgeon as gs

    return gs.export_onnx(graph_or_model)


def run(graph_or_model, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    from onetrans_trt.plugins import attach_op_functions

    model = attach_op_functions(as_model(graph_or_model))
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), sess_options=opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {i.name: feeds[i.name] for i in sess.get_inputs()})


def ops(graph) -> list[str]:
    return [n.op for n in graph.nodes]


def rand(rng, *shape) -> np.ndarray:
    return rng.standard_normal(shape).astype(np.float32)
