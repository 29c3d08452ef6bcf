"""validate/diverge.py on a hand-made graph of a two-layer torch model: module scopes read from
the exporter's node metadata, the first diverging module found in graph order, a graph that
fails at run time named by its node, hooks removed afterwards."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper

from onetrans_trt.validate.diverge import _leaf_modules, localize, module_scopes
from onetrans_trt.validate.policy import DEFAULT_POLICY

TOL = DEFAULT_POLICY["fp32"]
D = 4


class Lin(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(D, D)


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layers = torch.nn.ModuleList([Lin(), Lin()])
        self.out = torch.nn.Linear(D, 1)
        self.unused = torch.nn.Linear(D, D)  # a leaf the forward never calls: nothing captured for it

    def forward(self, x):
        for layer in self.layers:
            x = torch.relu(layer.lin(x))
        k = x * 2.0
        return self.out(x), k


def _graph(net: Net, *, break_layer: int | None = None, bad_reshape=False, no_meta=False) -> onnx.ModelProto:
    nodes, inits = [], []
    first = helper.make_node("Identity", ["x"], ["x_id"], name="unused_id")  # scoped to the uncalled leaf
    if not no_meta:
        first.metadata_props.add(key="pkg.torch.onnx.name_scopes", value="['model', 'model.unused']")
    nodes.append(first)
    x = "x"
    for i, layer in enumerate(net.layers):
        w = layer.lin.weight.detach().numpy().T.copy()
        if i == break_layer:
            w = w * 1.5
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(layer.lin.bias.detach().numpy(), f"b{i}")]
        scope = f"['model', 'model.layers.{i}', 'model.layers.{i}.lin']"
        for name, op, ins, out in [(f"mm{i}", "MatMul", [x, f"w{i}"], f"h{i}"), (f"add{i}", "Add", [f"h{i}", f"b{i}"],
                                                                              f"lin{i}")]:
            n = helper.make_node(op, ins, [out], name=name)
            if not no_meta:
                n.metadata_props.add(key="pkg.torch.onnx.name_scopes", value=scope)
            nodes.append(n)
        nodes.append(helper.make_node("Relu", [f"lin{i}"], [f"r{i}"], name=f"relu{i}"))  # outside any module
        x = f"r{i}"
    if bad_reshape:
        inits.append(numpy_helper.from_array(np.array([5, -1], np.int64), "bad_shape"))
        nodes.append(helper.make_node("Reshape", [x, "bad_shape"], ["r_bad"], name="bad_reshape"))
        x = "r_bad"
    nodes.append(helper.make_node("Mul", [x, "two"], ["user_k_0"], name="kmul"))
    inits.append(numpy_helper.from_array(np.array(2.0, np.float32), "two"))
    inits += [numpy_helper.from_array(net.out.weight.detach().numpy().T.copy(), "wo"),
              numpy_helper.from_array(net.out.bias.detach().numpy(), "bo")]
    out_scope = "['model', 'model.out']"
    for name, op, ins, out in [("mmo", "MatMul", [x, "wo"], "ho"), ("addo", "Add", ["ho", "bo"], "logits")]:
        n = helper.make_node(op, ins, [out], name=name)
        if not no_meta:
            n.metadata_props.add(key="pkg.torch.onnx.name_scopes", value=out_scope)
        nodes.append(n)
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["b", D])],
                          [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["b", 1]),
                           helper.make_tensor_value_info("user_k_0", onnx.TensorProto.FLOAT, ["b", D])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 9
    return m


def _run(tmp_path, net, model, x, serving=None):
    gp, sp = tmp_path / "graph.onnx", tmp_path / "serving.onnx"
    onnx.save(model, str(gp))
    onnx.save(serving or _graph(net), str(sp))

    def torch_run():
        logits, k = net(torch.from_numpy(x))
        return {"logits": logits.numpy(), "user_k_0": k.numpy()}

    return localize(gp, "candidate_scorer", {"x": x, "unused": x}, net, torch_run, TOL, sp)


@pytest.fixture
def x():
    return np.random.default_rng(0).standard_normal((3, D)).astype(np.float32)


def test_module_scopes_and_leaves(tmp_path):
    net = Net()
    m = _graph(net)
    m.graph.node[1].metadata_props[0].value = "not python ["  # unreadable: skipped
    m.graph.node[2].metadata_props[0].value = "['other.thing']"  # no model scope: skipped
    onnx.save(m, str(tmp_path / "s.onnx"))
    assert module_scopes(tmp_path / "s.onnx") == {"unused_id": "unused", "mm1": "layers.1.lin", "add1": "layers.1.lin",
                                                  "mmo": "out", "addo": "out"}
    assert _leaf_modules(net) == {"layers.0.lin", "layers.1.lin", "out", "unused"}


def test_a_correct_graph_has_no_divergence(tmp_path, x):
    net = Net()
    assert _run(tmp_path, net, _graph(net), x) is None
    assert all(not m._forward_hooks for m in net.modules())  # hooks removed


@pytest.mark.parametrize("layer", [0, 1])
def test_the_first_diverging_module_is_named(tmp_path, x, layer):
    net = Net()
    got = _run(tmp_path, net, _graph(net, break_layer=layer), x)
    assert got["layer"] == layer and got["module"] == f"layers.{layer}.lin" and got["node"] == f"add{layer}"
    assert got["tensor"] == f"lin{layer}" and got["role"] == "candidate_scorer"
    assert got["max_abs"] > 1e-3 and got["cosine"] < 1.0 and got["shape_mismatch"] is None
    assert got["nan"] == 0 and got["inf"] == 0
    assert all(not m._forward_hooks for m in net.modules())


def test_graph_outputs_are_checkpoints_too(tmp_path, x):
    net = Net()
    m = _graph(net, no_meta=True)  # no scopes at all: only the named outputs are compared
    m.graph.initializer[-3].CopyFrom(numpy_helper.from_array(np.array(3.0, np.float32), "two"))  # K is x*3
    got = _run(tmp_path, net, m, x, serving=_graph(net, no_meta=True))
    assert got["node"] == "user_k_0" and got["tensor"] == "user_k_0" and got["module"] == "user_k_0"
    assert got["layer"] == 0
    m = _graph(net, no_meta=True)
    m.graph.initializer[-1].CopyFrom(numpy_helper.from_array(net.out.bias.detach().numpy() + 1, "bo"))
    got = _run(tmp_path, net, m, x, serving=_graph(net, no_meta=True))
    assert got["tensor"] == "logits" and got["layer"] is None and got["max_abs"] == pytest.approx(1.0, abs=1e-5)


def test_a_graph_that_fails_names_the_node_and_the_module_upstream(tmp_path, x):
    net = Net()
    got = _run(tmp_path, net, _graph(net, bad_reshape=True), x)
    assert got["node"] == "bad_reshape" and got["module"] == "layers.1.lin" and got["layer"] == 1
    assert got["max_abs"] == float("inf") and got["tensor"] is None and got["role"] == "candidate_scorer"
    assert got["error"]
