"""Helpers to write ONNX function bodies compactly (standard ops only)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

DOMAIN = "onetrans"
PLUGIN_NAMESPACE = "onetrans"
FUNCTION_OPSET = 18  # ReduceMax/ReduceSum take axes as inputs from 18 on


class Body:
    """Accumulates nodes of a function body; every value name is unique."""

    def __init__(self, prefix: str):
        self.nodes: list[onnx.NodeProto] = []
        self.prefix = prefix
        self.n = 0

    def _name(self, hint: str) -> str:
        self.n += 1
        return f"{hint}_{self.n}"

    def op(self, op_type: str, *inputs: str, hint: str | None = None, **attrs) -> str:
        out = self._name(hint or op_type.lower())
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], **attrs))
        return out

    def const(self, value, dtype=np.int64, hint: str = "c") -> str:
        out = self._name(hint)
        arr = np.asarray(value, dtype=dtype)
        self.nodes.append(helper.make_node("Constant", [], [out], value=onnx.numpy_helper.from_array(arr)))
        return out

    def attr_const(self, attr: str, hint: str = "attr", kind: str = "float") -> str:
        """A Constant whose value is the function's attribute ``attr``: a float scalar
        (``kind="float"``, ``value_float``) or an int64 scalar (``kind="int"``, ``value_int``)."""
        field, typ = {"float": ("value_float", onnx.AttributeProto.FLOAT),
                      "int": ("value_int", onnx.AttributeProto.INT)}[kind]
        out = self._name(hint)
        node = helper.make_node("Constant", [], [out])
        a = onnx.AttributeProto()
        a.name, a.ref_attr_name, a.type = field, attr, typ
        node.attribute.append(a)
        self.nodes.append(node)
        return out

    def dim(self, tensor: str, axis: int) -> str:
        """``[1]`` int64 holding ``shape(tensor)[axis]``."""
        return self.op("Shape", tensor, start=axis, end=axis + 1, hint="dim")

    def scalar(self, one_elem: str) -> str:
        return self.op("Squeeze", one_elem, self.const([0]), hint="scalar")

    def arange(self, n_1: str) -> str:
        return self.op("Range", self.const(0), self.scalar(n_1), self.const(1), hint="range")


def own_causal_merged(b: Body, q: str, k_own: str, v_own: str, scale: str, zero: str, ninf: str, last: str,
                      prefix: tuple[str, str, str], out: str) -> None:
    """The candidates' own NS-tokens part of the shared-prefix ops (token i sees own tokens
    <= i), merged with the prefix part ``(m1, l1, o1)`` through their running max and sums
    into ``out``: an online softmax over the two blocks (m2 is finite: i sees itself, so an
    empty prefix gives exp(-inf) = 0 for its weight)."""
    m1, l1, o1 = prefix
    s2 = b.op("Mul", b.op("MatMul", q, b.op("Transpose", k_own, perm=[0, 1, 3, 2])), scale)
    i = b.arange(b.dim(q, 2))
    causal = b.op("LessOrEqual", b.op("Unsqueeze", i, b.const([0])), b.op("Unsqueeze", i, b.const([1])))
    s2 = b.op("Add", s2, b.op("Where", causal, zero, ninf))
    m2 = b.op("ReduceMax", s2, last, keepdims=1)
    p2 = b.op("Exp", b.op("Sub", s2, m2))
    l2 = b.op("ReduceSum", p2, last, keepdims=1)
    o2 = b.op("MatMul", p2, v_own)
    m = b.op("Max", m1, m2)
    a1, a2 = b.op("Exp", b.op("Sub", m1, m)), b.op("Exp", b.op("Sub", m2, m))
    num = b.op("Add", b.op("Mul", a1, o1), b.op("Mul", a2, o2))
    den = b.op("Add", b.op("Mul", a1, l1), b.op("Mul", a2, l2))
    b.nodes.append(helper.make_node("Div", [num, den], [out]))


def make_function(name: str, inputs: list[str], outputs: list[str], body: Body,
                  attributes: list[str], opset: int = FUNCTION_OPSET,
                  defaults: dict[str, object] | None = None) -> onnx.FunctionProto:
    """A model-local function; ``opset`` must equal the model's default-domain opset (>= 18).

    ``defaults`` maps an attribute to the value a calling node that lacks it gets (the
    FunctionProto's ``attribute_proto``; an attribute is either in ``attributes``, without a
    default, or in ``defaults``, never both): nodes written before an attribute existed
    keep their meaning."""
    defaults = dict(defaults or {})
    both = set(defaults) & set(attributes)
    if both:
        raise ValueError(f"{name}: attributes {sorted(both)} are listed both with and without a default")
    return helper.make_function(
        DOMAIN, name, inputs, outputs, body.nodes,
        opset_imports=[helper.make_opsetid("", max(opset, FUNCTION_OPSET))], attributes=attributes,
        attribute_protos=[helper.make_attribute(k, v) for k, v in defaults.items()] or None,
    )


def attach_functions(model: onnx.ModelProto, functions: list[onnx.FunctionProto]) -> onnx.ModelProto:
    """Add model-local functions (ORT inlines them) and the ``onetrans`` opset import."""
    have = {(f.domain, f.name) for f in model.functions}
    for f in functions:
        if (f.domain, f.name) not in have:
            model.functions.append(f)
    if not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    return model


def strip_functions(model: onnx.ModelProto) -> onnx.ModelProto:
    """The graph for TensorRT: drop our local functions so the plugin resolves the nodes."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    keep = [f for f in out.functions if f.domain != DOMAIN]
    del out.functions[:]
    out.functions.extend(keep)
    return out
