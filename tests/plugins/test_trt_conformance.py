"""Our TensorRT plugins driven end to end through a faithful stand-in of ``tensorrt.plugin``
(``trt_standin.py``, each behaviour cited from TensorRT's sources): registration, autotune
and ``aot_impl`` with a real (subprocess, non-interpreted) Triton compile, for fp32 and fp16
and head sizes 8/16/64; the launch ABI of every compiled PTX checked against what TensorRT
passes. Where the real ``tensorrt`` is importable with a GPU, ``make gpu-check`` builds real
one-node engines instead (``onetrans_trt.gpu_check``)."""

import re
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import helper

from onetrans_trt.plugins import OPS, PLUGIN_NAMESPACE
from tests.plugins import trt_standin

pytest.importorskip("triton", reason="the 'kernels' extra (triton) is not installed")

HEAD_SIZES = (8, 16, 64, 96)  # tiny, small, onetrans-s, onetrans-l (d=384, H=4: 96, padded to 128)


def _real_tensorrt() -> bool:
    try:
        import tensorrt  # noqa: F401

        return True
    except Exception:  # noqa: BLE001 - placeholder wheels raise at import
        return False


@pytest.fixture
def standin(monkeypatch):
    """``tensorrt`` / ``tensorrt.plugin`` replaced by the stand-in; our one-time registration reset."""
    if _real_tensorrt():
        pytest.skip("the real tensorrt is importable: make gpu-check builds real one-node engines instead")
    from onetrans_trt.plugins import _trt

    mods = trt_standin.modules()
    for name, mod in mods.items():
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.setattr(_trt, "_registered", set())
    monkeypatch.setenv("ONETRANS_TRT_SM", "90")
    return mods


# the attributes each plugin registers, in registration order (TensorRT passes them in this order)
PLUGIN_ATTRS = {"SharedPrefixAttention": ["scale"], "TailCausalAttention": ["scale", "causal"],
                "SegmentedPrefixAttention": ["scale"], "SharedDecodeAttention": ["scale"]}
# what fuse-attention writes besides scale: TailCausalAttention always carries causal (1 or 0)
NODE_ATTRS = {"TailCausalAttention": {"causal": 1}}


def _node(op: str, head_dim: int, **attrs) -> onnx.NodeProto:
    """The node our fuse-attention pass writes (see test_fused_nodes_carry_exactly_the_plugin_attributes);
    ``attrs`` override (or, as None, drop) the op's attributes besides scale."""
    inputs = __import__(OPS[op].package, fromlist=["INPUTS"]).INPUTS
    extra = {k: v for k, v in {**NODE_ATTRS.get(op, {}), **attrs}.items() if v is not None}
    return helper.make_node(op, list(inputs), ["out"], domain="onetrans", scale=float(1.0 / np.sqrt(head_dim)),
                            plugin_namespace=PLUGIN_NAMESPACE, aot=1, **extra)


# per op: input dims (None = dynamic), concrete shapes for a geometry check, expected (grid, extras)
def _spa(h, dh):
    dims = [[None, h, None, dh], [1, h, None, dh], [1, h, None, dh], [1], [None, h, None, dh], [None, h, None, dh]]
    c, t, n = 37, 3, 300
    shapes = [(c, h, t, dh), (1, h, n, dh), (1, h, n, dh), (1,), (c, h, t, dh), (c, h, t, dh)]
    from onetrans_trt.plugins.shared_prefix_attention import triton_kernel

    return dims, shapes, (triton_kernel.grid(c, h, t), [c, h, t, n]), 6


def _tca(h, dh):
    dims = [[None, h, None, dh], [None, h, None, dh], [None, h, None, dh], [None]]
    b, lq, lk = 3, 20, 50
    shapes = [(b, h, lq, dh), (b, h, lk, dh), (b, h, lk, dh), (b,)]
    from onetrans_trt.plugins.tail_causal_attention import triton_kernel

    return dims, shapes, (triton_kernel.grid(b, h, lq), [b, h, lq, lk]), 4


def _seg(h, dh):
    dims = [[None, h, None, dh], [None, h, None, dh], [None, h, None, dh], [None], [None], [None, h, None, dh],
            [None, h, None, dh]]
    c, t, n, u = 37, 3, 300, 5
    shapes = [(c, h, t, dh), (u, h, n, dh), (u, h, n, dh), (u,), (c,), (c, h, t, dh), (c, h, t, dh)]
    from onetrans_trt.plugins.segmented_prefix_attention import triton_kernel

    return dims, shapes, (triton_kernel.grid(c, h, t), [c, h, t, n, u]), 7


def _sda(h, dh):
    dims = [[None, h, None, dh], [1, h, None, dh], [1, h, None, dh], [1]]
    c, nq, n = 37, 3, 300
    shapes = [(c, h, nq, dh), (1, h, n, dh), (1, h, n, dh), (1,)]
    from onetrans_trt.plugins.shared_decode_attention import triton_kernel

    return dims, shapes, (triton_kernel.grid(c, h, nq), [c, h, nq, n]), 4


CASES = {"SharedPrefixAttention": _spa, "TailCausalAttention": _tca, "SegmentedPrefixAttention": _seg,
         "SharedDecodeAttention": _sda}


def entry_params(ptx: str, name: str) -> list[str]:
    """The kinds of the ``.entry name(...)`` parameters, parsed here independently of our code:
    ``ptr`` for ``.u64 .ptr`` params, else the scalar type (``u32``...)."""
    m = re.search(r"\.entry\s+" + re.escape(name) + r"\s*\((.*?)\)", ptx, flags=re.S)
    assert m, f"no .entry {name}"
    return ["ptr" if ".ptr" in p.split() else p.split()[1].lstrip(".") for p in m.group(1).split(",") if p.strip()]


def check_abi(ptx: str, name: str, n_inputs: int, n_extras: int, n_outputs: int) -> None:
    """TensorRT launches an AOT kernel with (input pointers, int32 extras, output pointers)
    (tensorrt.plugin aot_impl docstring; NVIDIA's AOT sample kernels). Triton >= 3.3 appends
    global/profile scratch pointers; they are legal only because our kernels need no scratch
    (checked at compile time), so TensorRT's null there is never dereferenced."""
    kinds = entry_params(ptx, name)
    want = ["ptr"] * n_inputs + ["u32"] * n_extras + ["ptr"] * n_outputs
    assert kinds[:len(want)] == want, kinds
    trailing = kinds[len(want):]
    assert len(trailing) <= 2 and all(k == "ptr" for k in trailing), trailing


# every op, TailCausalAttention once per mode: (op, the node's attributes besides scale)
VARIANTS = [("SharedPrefixAttention", {}), ("TailCausalAttention", {"causal": 1}),
            ("TailCausalAttention", {"causal": 0}), ("SegmentedPrefixAttention", {}), ("SharedDecodeAttention", {})]


@pytest.mark.parametrize("head_dim", HEAD_SIZES)
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v[0] + "".join(f"-{k}={x}" for k, x in v[1].items()))
def test_register_autotune_aot_impl_end_to_end(standin, variant, head_dim):
    from onetrans_trt.plugins import register_trt_plugins

    op, node_attrs = variant
    register_trt_plugins()
    plugin_id = f"{PLUGIN_NAMESPACE}::{op}"
    d = trt_standin.REGISTRY[plugin_id]
    assert list(d.attrs) == PLUGIN_ATTRS[op] and d.num_outputs == 1
    assert list(d.attrs) == __import__(OPS[op].package, fromlist=["PLUGIN_ATTRIBUTES"]).PLUGIN_ATTRIBUTES
    dims, shapes, (grid, extras), n_in = CASES[op](2, head_dim)
    fields = trt_standin.fields_from_onnx_node(_node(op, head_dim, **node_attrs), d)
    assert [f.name for f in fields] == PLUGIN_ATTRS[op]  # the parser passes every registered field, in order
    builds = trt_standin.build_node(plugin_id, dims, fields)
    assert [b.io_types[0].name for b in builds] == ["FLOAT", "HALF"]  # one kernel per autotuned type
    from onetrans_trt.plugins._triton import ptx_cap

    cap, _ = ptx_cap(90)
    for b in builds:
        assert isinstance(b.attrs["scale"], np.ndarray) and b.attrs["scale"].dtype == np.float32
        for name, value in node_attrs.items():  # an INT attribute arrives as a 1-element INT32 array
            got = b.attrs[name]
            assert isinstance(got, np.ndarray) and got.dtype == np.int32 and got.shape == (1,) and got[0] == value
        check_abi(b.ptx, b.kernel_name, n_in, len(b.extras), 1)
        assert f".visible .entry {b.kernel_name}(" in b.ptx
        isa = re.search(r"^\.version (\d+)\.(\d+)", b.ptx, re.M)
        assert int(isa.group(1)) * 10 + int(isa.group(2)) <= cap
        assert re.search(r"^\.target sm_90a?$", b.ptx, re.M)
        assert (".f16" in b.ptx) == (b.io_types[0].name == "HALF")  # the kernel really is typed
        g = b.geometry(shapes)
        assert (g["launch"]["grid_x"], g["launch"]["grid_y"], g["launch"]["grid_z"]) == (*grid, 1)
        assert g["extras"] == extras and g["outputs"] == [list(shapes[0])]
        assert g["launch"]["block_x"] >= 32 and g["launch"]["block_x"] % 32 == 0
        assert 0 < g["launch"]["shared_mem"] < 228 * 1024  # what an sm_90 block may have


@pytest.mark.parametrize("op", list(CASES))
def test_the_fp16_and_fp32_kernels_differ_and_assemble_with_ptxas(standin, op):
    """The PTX each type combination yields is valid for sm_90 (ptxas from the CUDA toolkit,
    when present) and really typed: the fp16 kernel is not the fp32 one."""
    from onetrans_trt.plugins import register_trt_plugins

    register_trt_plugins()
    plugin_id = f"{PLUGIN_NAMESPACE}::{op}"
    dims, _, _, _ = CASES[op](4, 16)
    fields = trt_standin.fields_from_onnx_node(_node(op, 16), trt_standin.REGISTRY[plugin_id])
    fp32, fp16 = trt_standin.build_node(plugin_id, dims, fields)
    assert fp32.ptx != fp16.ptx
    ptxas = shutil.which("ptxas") or ("/usr/local/cuda/bin/ptxas" if shutil.os.path.exists("/usr/local/cuda/bin/ptxas") else None)
    if ptxas is None:
        pytest.skip("no ptxas (CUDA toolkit) here to assemble the PTX")
    for b in (fp32, fp16):
        p = subprocess.run([ptxas, "-arch=sm_90a", "-o", "/dev/null", "-"], input=b.ptx, capture_output=True, text=True)
        if p.returncode != 0 and "Unknown option" in p.stderr:  # older ptxas cannot read stdin
            pytest.skip("this ptxas cannot read PTX from stdin")
        assert p.returncode == 0, p.stderr[-2000:]


def test_float_attribute_declared_float_is_what_breaks_on_numpy_2_4(standin):
    """Why ``scale`` is declared ``NDArray[np.float32]``: TensorRT reads a ``float`` attribute
    with ``float(f.data)`` on a 1-element array (P/_lib.py 279)."""
    trtp = standin["tensorrt.plugin"]

    @trtp.register("probe::FloatAttr")
    def _desc(x: trtp.TensorDesc, scale: float) -> trtp.TensorDesc:
        return x.like()

    field = trt_standin.PluginField("scale", np.array([0.125], np.float32))
    if tuple(int(v) for v in np.__version__.split(".")[:2]) >= (2, 4):
        with pytest.raises(TypeError, match="0-dimensional"):
            trt_standin.create_plugin_attrs(trt_standin.REGISTRY["probe::FloatAttr"], [field])


def test_string_annotations_are_refused_at_registration(standin):
    """``from __future__ import annotations`` turns annotations into strings; TensorRT's
    ``issubclass(param.annotation, TensorDesc)`` then raises TypeError (P/_validate.py 114)."""
    trtp = standin["tensorrt.plugin"]

    def _desc(x: "trtp.TensorDesc") -> "trtp.TensorDesc":
        return x.like()

    with pytest.raises(TypeError, match="must be a class"):
        trtp.register("probe::Stringly")(_desc)


def test_every_op_is_covered_here():
    assert set(CASES) == set(OPS)


def test_our_plugin_modules_keep_live_annotations():
    for op in OPS.values():
        src = open(op.module("trt_plugin").__file__).read()
        assert not re.search(r"^from __future__ import annotations", src, re.M), op.name


def test_aot_impl_must_declare_every_attribute(standin):
    """TensorRT's signature check lets aot_impl declare a subset of the attributes (P/_validate.py
    327-341) but calls it with every one (P/_plugin_class.py 374-403): the build then fails."""
    trtp = standin["tensorrt.plugin"]
    from typing import Tuple, Union

    @trtp.register("probe::Two")
    def _desc(x: trtp.TensorDesc, a: int, b: int) -> trtp.TensorDesc:
        return x.like()

    @trtp.autotune("probe::Two")
    def _tune(x: trtp.TensorDesc, outputs: Tuple[trtp.TensorDesc]):
        return [trtp.AutoTuneCombination("FP32, FP32", "LINEAR")]

    @trtp.aot_impl("probe::Two")
    def _aot(x: trtp.TensorDesc, a: int, outputs: Tuple[trtp.TensorDesc], tactic: int
             ) -> Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams, trtp.SymExprs]:
        return "k", ".entry k()", trtp.KernelLaunchParams(), trtp.SymIntExprs.from_tuple([])

    fields = [trt_standin.PluginField("a", np.array([1], np.int32)), trt_standin.PluginField("b", np.array([2], np.int32))]
    with pytest.raises(TypeError):
        trt_standin.build_node("probe::Two", [[None, 4]], fields)


def test_shape_expr_constant_value_is_a_method(standin):
    trtp = standin["tensorrt.plugin"]
    e = trtp.ShapeExpr(64)
    assert e.is_constant is True and e.constant_value() == 64
    sym = trtp.ShapeExpr(("sym", "n"))
    with pytest.raises(RuntimeError):
        bool(sym)
    with pytest.raises(TypeError):
        2 * sym  # no reflected operators in TensorRT's ShapeExpr


def test_plain_ints_as_extra_arguments_are_refused(standin):
    """``SymIntExprs.from_tuple([5])`` holds a SymIntExpr, not the SymInt32 TensorRT requires."""
    trtp = standin["tensorrt.plugin"]
    assert not isinstance(trtp.SymIntExprs.from_tuple([5])[0], trtp.SymInt32)
    from onetrans_trt.plugins.tail_causal_attention import trt_plugin

    _, _, extras = trt_plugin.launch_geometry([trtp.ShapeExpr(2), trtp.ShapeExpr(4), trtp.ShapeExpr(9), 8],
                                              [2, 4, trtp.ShapeExpr(10), 8])
    assert all(isinstance(trtp.SymInt32(e), trtp.SymInt32) for e in extras)


def test_ptx_cap_defaults_and_arch_floor(monkeypatch):
    from onetrans_trt.errors import MissingCapabilityError
    from onetrans_trt.plugins import _triton
    from onetrans_trt.plugins._triton import MIN_PTX_FOR_ARCH, ptx_cap

    monkeypatch.setattr(_triton, "driver_cuda_version", lambda: None)
    monkeypatch.delenv("ONETRANS_TRT_PTX_VERSION", raising=False)
    assert ptx_cap(90)[0] == _triton.DEFAULT_PTX_VERSION >= MIN_PTX_FOR_ARCH[90]
    monkeypatch.setattr(_triton, "driver_cuda_version", lambda: "12.8")
    assert ptx_cap(90) == (87, "driver supports CUDA 12.8")
    monkeypatch.setenv("ONETRANS_TRT_PTX_VERSION", "8.0")
    assert ptx_cap(90)[0] == 80
    with pytest.raises(MissingCapabilityError, match="sm_100"):
        ptx_cap(100)
    for cuda, isa in (("12.0", 80), ("12.4", 84), ("12.6", 85), ("12.9", 88), ("13.0", 90), ("13.4", 94)):
        assert _triton.max_ptx_for_cuda(cuda) == isa


def test_tail_causal_modes_are_two_kernels(standin):
    """The node's ``causal`` selects the kernel compiled by aot_impl: the PTX of mode 0 is not mode 1's."""
    from onetrans_trt.plugins import register_trt_plugins

    register_trt_plugins()
    plugin_id = f"{PLUGIN_NAMESPACE}::TailCausalAttention"
    d = trt_standin.REGISTRY[plugin_id]
    dims, _, _, _ = _tca(2, 16)
    ptx = {}
    for mode in (1, 0):
        fields = trt_standin.fields_from_onnx_node(_node("TailCausalAttention", 16, causal=mode), d)
        ptx[mode] = [b.ptx for b in trt_standin.build_node(plugin_id, dims, fields)]
    assert ptx[0][0] != ptx[1][0] and ptx[0][1] != ptx[1][1]


def test_a_tail_causal_node_without_causal_does_not_build(standin):
    """TensorRT has no attribute defaults: the parser warns and skips the field, and the plugin's
    register function then misses ``causal`` (a TypeError), as in TensorRT. Hence fuse-attention
    always writes ``causal``; ONNX Runtime's function alone defaults it to 1."""
    from onetrans_trt.plugins import register_trt_plugins

    register_trt_plugins()
    plugin_id = f"{PLUGIN_NAMESPACE}::TailCausalAttention"
    d = trt_standin.REGISTRY[plugin_id]
    dims, _, _, _ = _tca(2, 16)
    with pytest.warns(UserWarning, match="Attribute causal not found in plugin node"):
        fields = trt_standin.fields_from_onnx_node(_node("TailCausalAttention", 16, causal=None), d)
    assert [f.name for f in fields] == ["scale"]
    with pytest.raises(TypeError, match="causal"):
        trt_standin.build_node(plugin_id, dims, fields)


def test_a_tail_causal_node_with_another_causal_value_does_not_build(standin):
    from onetrans_trt.plugins import register_trt_plugins

    register_trt_plugins()
    plugin_id = f"{PLUGIN_NAMESPACE}::TailCausalAttention"
    dims, _, _, _ = _tca(2, 16)
    fields = trt_standin.fields_from_onnx_node(_node("TailCausalAttention", 16, causal=2),
                                               trt_standin.REGISTRY[plugin_id])
    with pytest.raises(ValueError, match="causal must be 0 or 1"):
        trt_standin.build_node(plugin_id, dims, fields)
