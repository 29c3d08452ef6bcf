"""A small CPU stand-in for the parts of ``tensorrt`` / ``tensorrt.plugin`` our plugins touch.

Written from TensorRT's open sources: NVIDIA/TensorRT tag v11.1 (commit 82d1dca8),
``python/packaging/bindings_wheel/tensorrt/plugin/`` (``P/`` below), and the ONNX parser's
plugin importer (onnx-tensorrt ``onnxOpImporters.cpp`` FallbackPluginImporter / loadFields,
``importerUtils.cpp`` createPlugin). Each behaviour names its source:

- ``register`` (P/_validate.py 75-201): ``inspect.signature``; every parameter annotated, no
  defaults; ``issubclass(param.annotation, TensorDesc)`` on the *live* annotation (a string
  annotation, as ``from __future__ import annotations`` makes, raises TypeError there);
  tensors before attributes; attributes ``int/float/bytes/bool/str`` or
  ``numpy.typing.NDArray[dtype]``; return ``TensorDesc`` or ``Tuple[TensorDesc, ...]``.
- ``autotune`` (P/_validate.py 397-475): parameters = all tensors, a subset of the attributes in
  registration order, ``outputs``; called positionally with only the declared attributes
  (P/_plugin_class.py 156-176).
- ``aot_impl`` (P/_validate.py 282-394): parameters = tensors, attributes, ``outputs``,
  ``tactic``; mandatory return annotation ``Tuple[str|bytes, str|bytes, KernelLaunchParams,
  SymExprs]``; called positionally with EVERY attribute in the order the plugin fields
  arrived (P/_plugin_class.py 374-403); the results type-checked (TypeError, 406-434): each
  extra argument must be a ``SymInt32``.
- Attribute delivery (P/_lib.py 256-279 + pyPlugin.cpp 3541-3566): a field's ``data`` is a 1-D
  numpy array; an attribute annotated ``float`` is read as ``float(f.data)`` (numpy >= 2.4
  refuses that for a 1-D array), ``NDArray[dt]`` as ``f.data.astype(dt)``, ``str`` by decoding.
  The ONNX parser passes only the creator's field names (``plugin_namespace``/``aot`` are
  consumed by the parser): FLOAT -> FLOAT32 length 1, INT -> INT32, STRING -> CHAR + NUL.
- A registered attribute the ONNX node lacks (onnx-tensorrt ``onnxOpImporters.cpp`` loadFields:
  10.1-GA 96e78110 lines 6112-6125, unchanged in the later 0137504e whose FallbackPluginImporter
  has the ``kV3QUICK`` creator path QDPs take; the TensorRT 11.1 submodule commit 7c51a63a was not
  available to read): the parser logs the warning "Attribute <name> not found in plugin node!
  Ensure that the plugin creator has a default value defined or the engine may fail to build."
  and skips the field. A QDP creator has no defaults: ``register`` functions may not declare any (P/_validate.py 108-111),
  ``create_plugin`` builds the attributes from the fields it got (P/_lib.py 256-279) and the
  register function is called as ``register_function(*descs, **attrs)`` (P/_plugin_class.py 69,
  131): a TypeError for the missing keyword, so the node does not build.
- Symbolic sizes (P/_tensor.py 80-320): ``+ - * // == <`` only (no reflected operators),
  ``is_constant`` a property, ``constant_value()`` a method, ``bool()`` of a non-constant raises
  (10.16+); ``SymIntExprs.from_tuple`` wraps plain values as ``SymIntExpr`` (not ``SymInt32``).
- ``KernelLaunchParams`` (P/_tensor.py 1140-1175): exactly grid_x/y/z, block_x/y/z, shared_mem.

Expressions here are small trees evaluated against concrete input shapes, so a test can
check the launch geometry a real build would get. This is a conformance harness, not a
TensorRT: it never claims an engine was built or a kernel ran.
"""

import inspect
import sys
import types
import typing

import numpy as np

# ---------------------------------------------------------------- tensorrt (the parts we use)


class DataType:
    def __init__(self, name: str, np_dtype):
        self.name, self.np_dtype = name, np_dtype

    def __repr__(self):
        return f"DataType.{self.name}"


float32, float16, int64, int32 = (DataType("FLOAT", np.float32), DataType("HALF", np.float16),
                                  DataType("INT64", np.int64), DataType("INT32", np.int32))
TYPE_NAMES = {"FP32": float32, "FP16": float16, "INT64": int64, "INT32": int32}

# ---------------------------------------------------------------- symbolic sizes


class SymExpr:
    """Base of every symbolic expression (P/_tensor.py 25-73)."""


class SymIntExpr(SymExpr):
    def __init__(self, value=None):
        if isinstance(value, SymIntExpr):
            self._e = value._e
        elif type(value) is int:  # noqa: E721 - P/_tensor.py 87-101: other types leave no expression
            self._e = ("const", value)
        elif isinstance(value, tuple):
            self._e = value
        else:
            self._e = None

    def _op(self, op, other):
        if isinstance(other, int) and not isinstance(other, bool):
            other = SymIntExpr(other)
        if not isinstance(other, SymIntExpr):
            return NotImplemented
        return type(self)((op, self._e, other._e))

    def __add__(self, o):
        return self._op("+", o)

    def __sub__(self, o):
        return self._op("-", o)

    def __mul__(self, o):
        return self._op("*", o)

    def __floordiv__(self, o):
        return self._op("//", o)

    def __eq__(self, o):  # an expression, not a bool (P/_tensor.py 103-126)
        return self._op("==", o)

    def __lt__(self, o):
        return self._op("<", o)

    __hash__ = None

    def __bool__(self):  # P/_tensor.py 128-134 (10.16+)
        if not self.is_constant:
            raise RuntimeError("Cannot evaluate symbolic expression as boolean. Use is_constant and "
                               "constant_value() for conditional checks.")
        return bool(self.constant_value())

    @property
    def is_constant(self) -> bool:
        return self._e is not None and _free(self._e) == set()

    def constant_value(self) -> int:
        if not self.is_constant:
            raise RuntimeError("The expression is not constant")
        return evaluate(self, {})


class SymInt32(SymIntExpr):
    """The only scalar kind TensorRT accepts as an AOT extra argument."""


class ShapeExpr(SymInt32):
    pass


def _free(e) -> set:
    if e is None:
        return {"<none>"}
    if e[0] == "const":
        return set()
    if e[0] == "sym":
        return {e[1]}
    return _free(e[1]) | _free(e[2])


def evaluate(x, env: dict) -> int:
    """The value of an expression (or int) for concrete dimension values ``env``."""
    if isinstance(x, int):
        return x
    e = x._e if isinstance(x, SymIntExpr) else x
    if e is None:
        raise TypeError("an expression built from a non-int value (TensorRT silently drops those)")
    if e[0] == "const":
        return e[1]
    if e[0] == "sym":
        return env[e[1]]
    a, b = evaluate(e[1], env), evaluate(e[2], env)
    return {"+": a + b, "-": a - b, "*": a * b, "//": a // b if b else 0, "==": int(a == b), "<": int(a < b)}[e[0]]


class SymExprs:
    def __init__(self, length: int):
        self._items = [None] * length

    @classmethod
    def from_tuple(cls, values):
        out = cls(len(values))
        for i, v in enumerate(values):
            if isinstance(v, float):
                raise ValueError("Float symbolic expressions are not supported")
            out._items[i] = v if isinstance(v, SymIntExpr) else SymIntExpr(v)  # P/_tensor.py 501
        return out

    def __len__(self):
        return len(self._items)

    def __iter__(self):
        return iter(self._items)

    def __getitem__(self, i):
        return self._items[i]


class SymIntExprs(SymExprs):
    pass


class ShapeExprs(SymExprs):
    pass


class TensorDesc:
    """``shape_expr``, ``dtype``; ``like()`` a mutable copy; inputs are immutable (P/_tensor.py 639-880)."""

    def __init__(self, shape_expr=None, dtype=None):
        object.__setattr__(self, "_immutable", False)
        self.shape_expr, self.dtype = shape_expr, dtype

    def like(self):
        return TensorDesc(self.shape_expr, self.dtype)

    def __setattr__(self, name, value):
        if self._immutable:
            raise ValueError("Cannot modify immutable TensorDesc properties")
        object.__setattr__(self, name, value)

    def freeze(self):
        object.__setattr__(self, "_immutable", True)
        return self


def from_shape_expr(shape, dtype):
    return TensorDesc(shape if isinstance(shape, ShapeExprs) else ShapeExprs.from_tuple(shape), dtype)


class KernelLaunchParams:
    NAMES = ("grid_x", "grid_y", "grid_z", "block_x", "block_y", "block_z", "shared_mem")

    def __init__(self, grid_x=1, grid_y=1, grid_z=1, block_x=1, block_y=1, block_z=1, shared_mem=0):
        for n, v in zip(self.NAMES, (grid_x, grid_y, grid_z, block_x, block_y, block_z, shared_mem)):
            setattr(self, n, v)

    def __setattr__(self, name, value):
        if name not in self.NAMES:
            raise AttributeError(f"KernelLaunchParams has no attribute {name!r}")
        object.__setattr__(self, name, SymInt32(value))


class AutoTuneCombination:
    def __init__(self, io_types: str = None, layouts: str = None, tactics=None):
        self.io_types, self.layouts, self.tactics = io_types, layouts, tactics

    def type_choices(self, n_io: int) -> list[list[DataType]]:
        """Each dependent alternative as one list of I/O types (``FP32|FP16`` per position)."""
        pos = [p.strip().split("|") for p in self.io_types.split(",")]
        if len(pos) != n_io:
            raise ValueError(f"AutoTuneCombination has {len(pos)} positions for {n_io} inputs and outputs")
        n = {len(p) for p in pos} - {1}
        if len(n) > 1:
            raise ValueError("dependent alternatives must have the same count at every position")
        k = n.pop() if n else 1
        return [[TYPE_NAMES[p[i] if len(p) > 1 else p[0]] for p in pos] for i in range(k)]


# ---------------------------------------------------------------- registration and validation

SERIALIZABLE = (int, float, bytes, bool, str)
NP_DTYPES = (np.int8, np.int16, np.int32, np.int64, np.float16, np.float32, np.float64, np.bool_)
REGISTRY: dict[str, "PluginDef"] = {}


class PluginDef:
    def __init__(self, name):
        self.name = name
        self.tensors: list[str] = []
        self.attrs: dict[str, object] = {}  # name -> annotation, registration order
        self.num_outputs = 0
        self.register_fn = self.autotune_fn = self.aot_fn = None
        self.autotune_attrs: list[str] = []


def _is_ndarray(annotation) -> bool:
    return annotation is np.ndarray or typing.get_origin(annotation) is np.ndarray


def _ndarray_dtype(annotation):
    return typing.get_args(typing.get_args(annotation)[1])[0]


def register(plugin_id: str):
    ns, name = plugin_id.split("::")  # a bare name cannot unpack (P/_lib.py 411)
    if not ns or ns in ("trt", "tensorrt", "std") or "." in ns + name:
        raise ValueError(f"invalid plugin namespace/name {plugin_id!r}")

    def deco(fn):
        if plugin_id in REGISTRY:
            raise ValueError(f"{plugin_id} already has a definition")
        d = PluginDef(plugin_id)
        for i, p in enumerate(inspect.signature(fn).parameters.values()):
            if p.kind not in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
                raise ValueError(f"{p.name}: only positional-or-keyword or keyword-only arguments")
            if p.annotation is inspect.Parameter.empty:
                raise ValueError(f"Argument {p.name} does not have a type annotation")
            if p.default is not inspect.Parameter.empty:
                raise ValueError(f"Argument {p.name} has a default value. Default values are not supported yet.")
            if issubclass(p.annotation, TensorDesc):  # live annotations only (P/_validate.py 114)
                if d.attrs:
                    raise ValueError("TensorDescs args and attribute args cannot be interspersed")
                d.tensors.append(p.name)
                continue
            if i == 0 or p.name in ("outputs", "stream", "tactic"):
                raise ValueError(f"{p.name}: not allowed as an attribute")
            if _is_ndarray(p.annotation):
                if p.annotation is np.ndarray or _ndarray_dtype(p.annotation) not in NP_DTYPES:
                    raise ValueError(f"{p.name}: annotate numpy attributes as numpy.typing.NDArray[dtype]")
            elif p.annotation not in SERIALIZABLE:
                raise ValueError(f"{p.name}: {p.annotation} is not a supported serializable type")
            d.attrs[p.name] = p.annotation
        ret = inspect.signature(fn).return_annotation
        if ret is inspect.Signature.empty:
            raise ValueError("No return annotation found for register function")
        if typing.get_origin(ret) is tuple:
            if not all(issubclass(a, TensorDesc) for a in typing.get_args(ret)):
                raise ValueError("Return types can only be TensorDesc or Tuple[TensorDesc].")
            d.num_outputs = len(typing.get_args(ret))
        else:
            if not (inspect.isclass(ret) and issubclass(ret, TensorDesc)):
                raise ValueError("Return types can only be TensorDesc or Tuple[TensorDesc].")
            d.num_outputs = 1
        d.register_fn = fn
        REGISTRY[plugin_id] = d
        return fn

    return deco


def _check_outputs_param(p):
    if p.annotation is not inspect.Parameter.empty:
        if typing.get_origin(p.annotation) is not tuple or not all(
                issubclass(a, TensorDesc) for a in typing.get_args(p.annotation)):
            raise ValueError("'outputs' must be annotated Tuple[TensorDesc]")


def _declared_attrs(d: PluginDef, params, kind: str) -> list[str]:
    names = []
    for p in params:
        if p.name in d.tensors:
            if p.annotation is not inspect.Parameter.empty and not issubclass(p.annotation, TensorDesc):
                raise ValueError(f"{p.name}: a tensor argument must be annotated TensorDesc")
        elif p.name in d.attrs:
            if p.annotation is not inspect.Parameter.empty and p.annotation != d.attrs[p.name]:
                raise ValueError(f"{kind}: attribute {p.name} is annotated {p.annotation}, registered "
                                 f"{d.attrs[p.name]}")
            names.append(p.name)
    return names


def autotune(plugin_id: str):
    def deco(fn):
        d = REGISTRY[plugin_id]
        params = list(inspect.signature(fn).parameters.values())
        _check_outputs_param(params[-1])
        attrs = _declared_attrs(d, params, "autotune")
        expected = "(" + ", ".join(d.tensors + [a for a in d.attrs if a in attrs] + ["outputs"]) + ")"
        got = "(" + ", ".join(p.name for p in params) + ")"
        if got != expected:
            raise ValueError(f"Specified autotune function signature {got} is not consistent with {expected}")
        d.autotune_fn, d.autotune_attrs = fn, attrs
        return fn

    return deco


def aot_impl(plugin_id: str):
    def deco(fn):
        d = REGISTRY[plugin_id]
        sig = inspect.signature(fn)
        params = list(sig.parameters.values())
        attrs = _declared_attrs(d, params, "aot_impl")
        expected = "(" + ", ".join(d.tensors + [a for a in d.attrs if a in attrs] + ["outputs", "tactic"]) + ")"
        got = "(" + ", ".join(p.name for p in params) + ")"
        if got != expected:
            raise ValueError(f"Signature of the aot_impl function {got} does not match the expected input arg "
                             f"schema {expected}")
        _check_outputs_param(params[-2])
        if params[-1].annotation is not inspect.Parameter.empty and not issubclass(params[-1].annotation, int):
            raise ValueError("'tactic' must be annotated int")
        ret = sig.return_annotation
        if ret is inspect.Signature.empty:
            raise ValueError("No return annotation found for aot_impl function")
        args = typing.get_args(ret)
        if typing.get_origin(ret) is not tuple or len(args) != 4:
            raise ValueError("aot_impl must return tuple[str | bytes, str | bytes, KernelLaunchParams, SymIntExprs]")
        for a in args[:2]:
            members = typing.get_args(a) if typing.get_origin(a) in (typing.Union, types.UnionType) else (a,)
            if not all(m in (str, bytes) for m in members):
                raise ValueError("the kernel name and the kernel must be annotated str or bytes")
        if not issubclass(args[2], KernelLaunchParams) or not issubclass(args[3], SymExprs):
            raise ValueError("aot_impl must return tuple[..., KernelLaunchParams, SymExprs]")
        d.aot_fn = fn
        return fn

    return deco


# ---------------------------------------------------------------- a build, as TensorRT drives a node


class PluginField:
    """A field as ``PluginField.data`` shows it to Python: always a 1-D numpy array."""

    def __init__(self, name: str, data: np.ndarray):
        self.name, self.data = name, np.asarray(data).reshape(-1)


def fields_from_onnx_node(node, d: PluginDef) -> list[PluginField]:
    """The ONNX parser's loadFields: the creator's field names in creator (registration) order,
    FLOAT -> FLOAT32[1], INT -> INT32[1], STRING -> CHAR with a trailing NUL; every other node
    attribute (plugin_namespace, plugin_version, aot) is not passed."""
    import warnings

    import onnx

    attrs = {a.name: a for a in node.attribute}
    out = []
    for name in d.attrs:
        a = attrs.get(name)
        if a is None:  # loadFields: warn and skip; register() then misses a keyword (module docstring)
            warnings.warn(f"Attribute {name} not found in plugin node! Ensure that the plugin creator has a default "
                          "value defined or the engine may fail to build.", UserWarning, stacklevel=2)
            continue
        if a.type == onnx.AttributeProto.FLOAT:
            out.append(PluginField(name, np.array([a.f], np.float32)))
        elif a.type == onnx.AttributeProto.INT:
            out.append(PluginField(name, np.array([a.i], np.int32)))
        elif a.type == onnx.AttributeProto.STRING:
            out.append(PluginField(name, np.frombuffer(a.s + b"\0", np.int8)))
        else:
            raise ValueError(f"attribute {name}: type {a.type} not handled by this stand-in")
    return out


def create_plugin_attrs(d: PluginDef, fields: list[PluginField]) -> dict:
    """P/_lib.py 256-279, verbatim in behaviour."""
    attrs = {}
    for f in fields:
        if f.name not in d.attrs:
            raise AssertionError(f"Unexpected attribute {f.name} provided to create_plugin.")
        annot = d.attrs[f.name]
        if _is_ndarray(annot):
            dt = _ndarray_dtype(annot)
            attrs[f.name] = np.frombuffer(f.data.tobytes(), dtype=np.float16) if dt == np.float16 else f.data.astype(dt)
        elif issubclass(annot, str):
            attrs[f.name] = f.data.tobytes().decode("utf-8")
        else:
            attrs[f.name] = annot(f.data)  # float(array([x])): a TypeError on numpy >= 2.4
    return attrs


class NodeBuild:
    """What TensorRT's builder does with one plugin node, for one set of I/O types."""

    def __init__(self, d, attrs, input_descs, outputs, io_types, kernel_name, ptx, launch, extras):
        self.d, self.attrs, self.input_descs, self.outputs = d, attrs, input_descs, outputs
        self.io_types, self.kernel_name, self.ptx, self.launch, self.extras = io_types, kernel_name, ptx, launch, extras

    def geometry(self, shapes: list[tuple[int, ...]]) -> dict:
        """Launch parameters and extra arguments for concrete input shapes."""
        env = {f"in{i}.{j}": v for i, s in enumerate(shapes) for j, v in enumerate(s)}
        return {"launch": {n: evaluate(getattr(self.launch, n), env) for n in KernelLaunchParams.NAMES},
                "extras": [evaluate(e, env) for e in self.extras],
                "outputs": [[evaluate(x, env) for x in o.shape_expr] for o in self.outputs]}


def build_node(plugin_id: str, input_dims: list[list], fields: list[PluginField], tactic: int = 0) -> list[NodeBuild]:
    """Drive a registered plugin as TensorRT's build does: create the plugin from its fields,
    describe the outputs, autotune, then ``aot_impl`` once per type combination. ``input_dims``:
    per input, ints (static) or None (dynamic: symbol ``in<i>.<j>``)."""
    d = REGISTRY[plugin_id]
    if d.aot_fn is None:
        raise ValueError(f"{plugin_id}: no aot_impl registered")
    attrs = create_plugin_attrs(d, fields)

    def descs(types_):
        return [TensorDesc(ShapeExprs.from_tuple([ShapeExpr(v) if v is not None else ShapeExpr(("sym", f"in{i}.{j}"))
                                                  for j, v in enumerate(dims)]), t).freeze()
                for i, (dims, t) in enumerate(zip(input_dims, types_))]

    base = descs([float32] * len(input_dims))
    outs = d.register_fn(*base, **attrs)  # keyword attributes (P/_plugin_class.py 69, 131)
    outs = tuple(outs) if isinstance(outs, (tuple, list)) else (outs,)
    if len(outs) != d.num_outputs:
        raise ValueError(f"register returned {len(outs)} outputs, annotated {d.num_outputs}")
    combos = d.autotune_fn(*base, *[attrs[k] for k in d.autotune_attrs], outs)
    builds = []
    for combo in combos:
        for types_ in combo.type_choices(len(input_dims) + len(outs)):
            ins = descs(types_[:len(input_dims)])
            o = tuple(TensorDesc(x.shape_expr, t) for x, t in zip(outs, types_[len(input_dims):]))
            res = d.aot_fn(*ins, *attrs.values(), o, tactic)  # every attribute, field order (P/_plugin_class.py 374-403)
            if not isinstance(res, tuple) or len(res) != 4:
                raise TypeError("aot_impl must return a 4-tuple")
            name, ptx, launch, extras = res
            if not isinstance(name, (str, bytes)) or not isinstance(ptx, (str, bytes)):
                raise TypeError("kernel name and PTX must be str or bytes")
            if not isinstance(launch, KernelLaunchParams):
                raise TypeError("launch params must be a KernelLaunchParams")
            if not isinstance(extras, SymExprs):
                raise TypeError("extra args must be SymExprs")
            for e in extras:
                if not isinstance(e, SymInt32):
                    raise TypeError(f"extra argument {e!r} is not a SymInt32")
            builds.append(NodeBuild(d, attrs, ins, o, types_, name if isinstance(name, str) else name.decode(),
                                    ptx if isinstance(ptx, str) else ptx.decode(), launch, list(extras)))
    return builds


# ---------------------------------------------------------------- installing it as ``tensorrt``


def modules(version: str = "11.1.0") -> dict[str, types.ModuleType]:
    """Fresh ``tensorrt`` and ``tensorrt.plugin`` modules backed by this stand-in (empty registry)."""
    REGISTRY.clear()
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.float32, trt.float16, trt.int64, trt.int32 = float32, float16, int64, int32
    trt.QuickPluginCreationRequest = object  # AOT QDPs exist (P/_export.py 39)
    trtp = types.ModuleType("tensorrt.plugin")
    for n in ("register", "autotune", "aot_impl", "TensorDesc", "ShapeExpr", "ShapeExprs", "SymExpr", "SymExprs",
              "SymIntExpr", "SymIntExprs", "SymInt32", "KernelLaunchParams", "AutoTuneCombination", "from_shape_expr"):
        setattr(trtp, n, getattr(sys.modules[__name__], n))
    trt.plugin = trtp
    return {"tensorrt": trt, "tensorrt.plugin": trtp}
