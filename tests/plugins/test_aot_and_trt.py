"""Ahead-of-time kernels (PTX/cubin, no GPU) and the TensorRT plugin code paths."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from onetrans_trt.errors import MissingCapabilityError
from onetrans_trt.plugins.segmented_prefix_attention import trt_plugin as seg_trt
from onetrans_trt.plugins.shared_decode_attention import trt_plugin as sda_trt
from onetrans_trt.plugins.shared_prefix_attention import trt_plugin as spa_trt
from onetrans_trt.plugins.tail_causal_attention import trt_plugin as tca_trt

PLUGINS = [spa_trt, tca_trt, seg_trt, sda_trt]
KERNEL_NAMES = ["segmented_prefix_attention_kernel", "shared_decode_attention_kernel",
                "shared_prefix_attention_kernel", "tail_causal_attention_kernel"]

AOT_SCRIPT = r"""
import hashlib, json
from onetrans_trt.plugins.shared_prefix_attention import triton_kernel as spa
from onetrans_trt.plugins.tail_causal_attention import triton_kernel as tca
from onetrans_trt.plugins.segmented_prefix_attention import triton_kernel as seg
from onetrans_trt.plugins.shared_decode_attention import triton_kernel as sda
out = []
for mod, extra in ((spa, {}), (tca, {"causal": 1}), (tca, {"causal": 0}), (seg, {}), (sda, {})):
    for arch in (80, 90):
        for dtype in ("float32", "float16"):
            k = mod.compile(dtype, head_dim=64, arch=arch, **extra)
            out.append({"op": mod.__name__, "extra": extra, "arch": arch, "dtype": dtype, "name": k.name,
                        "target": [l for l in k.ptx.splitlines() if l.startswith(".target")],
                        "entry": f".visible .entry {k.name}(" in k.ptx, "cubin": len(k.cubin),
                        "threads": k.threads, "shared": k.shared,
                        "ptx_sha": hashlib.sha256(k.ptx.encode()).hexdigest()})
print(json.dumps(out))
"""


def test_every_kernel_compiles_ahead_of_time_for_sm80_and_sm90():
    pytest.importorskip("triton", reason="the 'kernels' extra (triton) is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    p = subprocess.run([sys.executable, "-c", AOT_SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    results = json.loads(p.stdout.strip().splitlines()[-1])
    assert len(results) == 20  # 4 ops (TailCausalAttention twice: causal 1 and 0) x 2 archs x 2 dtypes
    assert sorted({r["name"] for r in results}) == KERNEL_NAMES
    for r in results:
        assert r["target"] in ([f".target sm_{r['arch']}"], [f".target sm_{r['arch']}a"]), r
        assert r["entry"] and r["cubin"] > 1000 and r["threads"] >= 32, r
    # the two TailCausalAttention modes are two kernels for every arch and dtype
    tca = {(r["extra"]["causal"], r["arch"], r["dtype"]): r["ptx_sha"] for r in results if "causal" in r["extra"]}
    assert len(tca) == 8 and all(tca[(1, a, d)] != tca[(0, a, d)] for _, a, d in tca)


def test_launch_geometry_on_ints_and_symbols():
    """On ints, and on TensorRT-like symbolic sizes (the conformance stand-in's ShapeExpr: arithmetic
    only, never a bool, no reflected operators), evaluated for concrete sizes afterwards."""
    from tests.plugins.trt_standin import ShapeExpr, evaluate

    gx, gy, extras = spa_trt.launch_geometry([5, 4, 3, 64], [1, 4, 100, 64])
    assert (gx, gy, extras) == (1, 4, [5, 4, 3, 100])  # ceil(15 / 16) row blocks
    gx, gy, extras = spa_trt.launch_geometry([100, 4, 3, 64], [1, 4, 7, 64])
    assert gx == 19
    c, h, t, n = (ShapeExpr(("sym", x)) for x in "CHTL")
    gx, gy, extras = spa_trt.launch_geometry([c, h, t, 64], [1, h, n, 64])
    env = {"C": 37, "H": 4, "T": 3, "L": 300}
    assert not gx.is_constant and evaluate(gx, env) == (37 * 3 + 15) // 16 and gy is h
    assert [evaluate(e, env) for e in extras] == [37, 4, 3, 300]
    gx, gy, extras = tca_trt.launch_geometry([2, 4, 33, 64], [2, 4, 50, 64])
    assert (gx, gy, extras) == (3, 8, [2, 4, 33, 50])
    b, lq, lk = (ShapeExpr(("sym", x)) for x in ("B", "Lq", "Lk"))
    gx, gy, _ = tca_trt.launch_geometry([b, h, lq, 64], [b, h, lk, 64])
    env = {"B": 3, "H": 4, "Lq": 33, "Lk": 50}
    assert evaluate(gx, env) == 3 and evaluate(gy, env) == 12
    # segmented: the grid of SharedPrefixAttention; extras C, H, T, L and U (the packed users)
    gx, gy, extras = seg_trt.launch_geometry([5, 4, 3, 64], [3, 4, 100, 64])
    assert (gx, gy, extras) == (1, 4, [5, 4, 3, 100, 3])
    assert seg_trt.launch_geometry([100, 4, 3, 64], [7, 4, 7, 64])[0] == 19
    u = ShapeExpr(("sym", "U"))
    gx, gy, extras = seg_trt.launch_geometry([c, h, t, 64], [u, h, n, 64])
    env = {"C": 37, "H": 4, "T": 3, "L": 300, "U": 5}
    assert not gx.is_constant and evaluate(gx, env) == (37 * 3 + 15) // 16 and gy is h
    assert [evaluate(e, env) for e in extras] == [37, 4, 3, 300, 5]
    # shared decode: row blocks over C*N, heads; extras C, H, N, n (n = 0 is legal: no key)
    assert sda_trt.launch_geometry([5, 4, 3, 64], [1, 4, 100, 64]) == (1, 4, [5, 4, 3, 100])
    assert sda_trt.launch_geometry([33, 2, 1, 8], [1, 2, 0, 8]) == (3, 2, [33, 2, 1, 0])
    nq = ShapeExpr(("sym", "N"))
    gx, gy, extras = sda_trt.launch_geometry([c, h, nq, 64], [1, h, n, 64])
    env = {"C": 37, "H": 4, "N": 3, "L": 300}
    assert not gx.is_constant and evaluate(gx, env) == (37 * 3 + 15) // 16 and gy is h
    assert [evaluate(e, env) for e in extras] == [37, 4, 3, 300]


def test_block_sizes_match_the_kernels():
    pytest.importorskip("triton", reason="the 'kernels' extra (triton) is not installed")
    from onetrans_trt.plugins.shared_prefix_attention import triton_kernel as spa
    from onetrans_trt.plugins.tail_causal_attention import triton_kernel as tca

    from onetrans_trt.plugins.segmented_prefix_attention import triton_kernel as seg
    from onetrans_trt.plugins.shared_decode_attention import triton_kernel as sda

    assert spa_trt.BLOCK_M == spa.BLOCK_M and tca_trt.BLOCK_M == tca.BLOCK_M and seg_trt.BLOCK_M == seg.BLOCK_M
    assert sda_trt.BLOCK_M == sda.BLOCK_M
    # the grid TensorRT launches is the one the interpreter runs (first three q dims: C|B, H, T|N|Lq)
    for plugin, kernel in ((spa_trt, spa), (tca_trt, tca), (seg_trt, seg), (sda_trt, sda)):
        for q in ([7, 2, 5, 8], [40, 4, 1, 64], [1, 1, 33, 16]):
            assert plugin.launch_geometry(q, [q[0], q[1], 9, q[3]])[:2] == kernel.grid(*q[:3]), plugin.PLUGIN_ID


def test_launch_extras_follow_the_kernel_signature():
    """The extras launch_geometry returns are the kernel's int32 parameters, one for one and in
    order (TensorRT passes input pointers, extras, output pointers)."""
    pytest.importorskip("triton", reason="the 'kernels' extra (triton) is not installed")
    from onetrans_trt.plugins.segmented_prefix_attention import triton_kernel as seg

    sig = seg.signature("float32")
    assert [n for n, k in sig.items() if k == "i32"] == ["C", "H", "T", "L", "U"]
    assert [n for n, k in sig.items() if k.startswith("*")] == ["Q", "KP", "VP", "VALID", "USER", "KO", "VO", "OUT"]
    _, _, extras = seg_trt.launch_geometry([5, 4, 3, 64], [3, 4, 100, 64])
    assert dict(zip(["C", "H", "T", "L", "U"], extras)) == {"C": 5, "H": 4, "T": 3, "L": 100, "U": 3}
    from onetrans_trt.plugins.shared_decode_attention import triton_kernel as sda

    sig = sda.signature("float16")
    assert [n for n, k in sig.items() if k == "i32"] == ["C", "H", "NQ", "LK"]
    assert [n for n, k in sig.items() if k.startswith("*")] == ["Q", "K", "V", "VALID", "OUT"]
    assert sig["Q"] == "*fp16" and sig["VALID"] == "*i64"
    _, _, extras = sda_trt.launch_geometry([5, 4, 3, 64], [1, 4, 100, 64])
    assert dict(zip(["C", "H", "NQ", "LK"], extras)) == {"C": 5, "H": 4, "NQ": 3, "LK": 100}
    from onetrans_trt.plugins.tail_causal_attention import triton_kernel as tca

    sig = tca.signature("float32")  # CAUSAL is a constexpr: no launch parameter of its own
    assert [n for n, k in sig.items() if k == "i32"] == ["B", "H", "LQ", "LK"] and sig["CAUSAL"] == "constexpr"


def test_io_types_and_output_desc():
    assert spa_trt.IO_TYPES.split(", ") == ["FP32|FP16"] * 3 + ["INT64|INT64"] + ["FP32|FP16"] * 3
    assert tca_trt.IO_TYPES.split(", ") == ["FP32|FP16"] * 3 + ["INT64|INT64", "FP32|FP16"]
    # q, k_prefix, v_prefix, prefix_valid, cand_user, k_own, v_own -> out
    assert seg_trt.IO_TYPES.split(", ") == ["FP32|FP16"] * 3 + ["INT64|INT64"] * 2 + ["FP32|FP16"] * 3

    class Desc:
        def like(self):
            return "same shape and dtype"

    assert spa_trt.output_desc(Desc()) == tca_trt.output_desc(Desc()) == "same shape and dtype"
    assert seg_trt.output_desc(Desc()) == sda_trt.output_desc(Desc()) == "same shape and dtype"
    # q, k, v, valid (INT64) -> out
    assert sda_trt.IO_TYPES.split(", ") == ["FP32|FP16"] * 3 + ["INT64|INT64", "FP32|FP16"]


def test_fused_nodes_carry_exactly_the_plugin_attributes(tiny_build):
    import onnx

    for graph in ("user_encoder", "candidate_scorer"):
        m = onnx.load(str(tiny_build / f"{graph}.onnx"))
        nodes = [n for n in m.graph.node if n.domain == "onetrans"]
        assert nodes
        for n in nodes:
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
            assert attrs["plugin_namespace"] == b"onetrans" and attrs["aot"] == 1
            # every attribute the plugin registers (TensorRT has no defaults), nothing else
            registered = __import__(f"onetrans_trt.plugins.{_package(n.op_type)}", fromlist=["x"]).PLUGIN_ATTRIBUTES
            assert set(attrs) == {*registered, "plugin_namespace", "aot"}, (n.op_type, sorted(attrs))
            if n.op_type == "TailCausalAttention":
                assert attrs["causal"] == 1  # OneTrans's user encoder is causal


def _package(op: str) -> str:
    from onetrans_trt.plugins import OPS

    return OPS[op].package.rsplit(".", 1)[1]


def test_registered_attributes_per_op():
    from onetrans_trt.plugins import OPS

    want = {"SharedPrefixAttention": ["scale"], "TailCausalAttention": ["scale", "causal"],
            "SegmentedPrefixAttention": ["scale"], "SharedDecodeAttention": ["scale"]}
    assert {op: __import__(info.package, fromlist=["x"]).PLUGIN_ATTRIBUTES for op, info in OPS.items()} == want
    assert {p.PLUGIN_ID.split("::")[1] for p in PLUGINS} == set(OPS)


@pytest.mark.parametrize("plugin", PLUGINS, ids=lambda m: m.PLUGIN_ID)
def test_registration_without_tensorrt_is_a_clear_error(plugin):
    try:
        import tensorrt  # noqa: F401
    except Exception:  # noqa: BLE001
        with pytest.raises(MissingCapabilityError, match="install the 'trt' extra"):
            plugin.register()
        return
    pytest.skip("tensorrt is importable here; the GPU test below covers registration")


def test_plugins_build_an_engine_on_a_gpu(tiny_build):
    trt = pytest.importorskip("tensorrt", reason="TensorRT is not installed (needs the 'trt' extra and a GPU)")
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU: TensorRT engines cannot be built here")
    import onnx

    from onetrans_trt.plugins import register_trt_plugins, strip_functions

    register_trt_plugins()
    model = strip_functions(onnx.load(str(tiny_build / "candidate_scorer.onnx")))
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network()
    parser = trt.OnnxParser(network, logger)
    assert parser.parse(model.SerializeToString()), [str(parser.get_error(i)) for i in range(parser.num_errors)]
    assert any(network.get_layer(i).type == trt.LayerType.PLUGIN_V3 for i in range(network.num_layers))
