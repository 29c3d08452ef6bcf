"""``make gpu-check`` (``python -m onetrans_trt.gpu_check``): the TensorRT/GPU path on one NVIDIA GPU.

Prints every version first (``onetrans-trt doctor``'s facts), then runs, stopping at the first
failure (exit 1) and skipping each part that cannot run here with its reason:

  (a) kernels: each op's Triton kernel compiled ahead of time (PTX ISA capped to the driver),
      its ``.entry`` checked against TensorRT's launch ABI, then loaded and launched with
      TensorRT's argument layout (input pointers, int32 extras, output pointers, null scratch)
      through cuda-python (or CuPy) on random fp32/fp16 data, head sizes 8 and 64, left padding,
      empty and over-long prefixes, against ``reference.py``; every op, TailCausalAttention in
      both modes (``causal`` 1 and 0: two kernels);
  (b) TensorRT: our plugins registered, a one-node engine built per op (TailCausalAttention per
      ``causal`` mode) and type from an ONNX node as our passes write it (every registered
      attribute on it), a ``PLUGIN_V3`` layer checked, run and compared; the engine
      then run again in a fresh process that never imports ``tensorrt.plugin`` (AOT needs no
      Python at run time);
  (c) the ``tiny`` preset (random weights, synthetic schema) exported, ``build --precision fp32``
      with TF32 off, and ``Ranker`` trt vs ort compared on 10 requests;
  (d) ONNX Runtime's CUDA execution provider vs CPU on the same requests, with the K/V kept on
      the device between the two graphs (io_binding) and that path timed against the host path.

Without a GPU it runs what the CPU can (the compiles and ABI checks of (a), the export and the
ORT CPU run of (c)/(d)) and says what it skipped and why. Written against the APIs in the field
notes and TensorRT's sources (tensorrt.plugin, the ONNX parser's plugin importer); it has not yet
run on a GPU. Budget: under 8 minutes on one GPU.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

TOL = {"float32": (2e-5, 2e-5), "float16": (4e-3, 4e-3)}  # xFormers' fp16 atol/rtol order; fp32 near-exact


class Failed(Exception):
    pass


class Skip(Exception):
    pass


class Check:
    def __init__(self, out=print):
        self.out, self.results = out, []

    def part(self, name: str, fn: Callable[[], str]) -> None:
        t0 = time.time()
        try:
            detail = fn()
            status = "ok"
        except Skip as e:
            status, detail = "skipped", str(e)
        except Failed as e:
            status, detail = "FAILED", str(e)
        except Exception as e:  # noqa: BLE001 - a crash in a part is a failure of that part
            status, detail = "FAILED", f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        self.results.append({"part": name, "status": status, "detail": detail, "seconds": round(time.time() - t0, 1)})
        self.out(f"[{status}] {name}: {detail} ({time.time() - t0:.1f}s)")
        if status == "FAILED":
            raise Failed(name)


def _gpu() -> str | None:
    """Why the GPU parts cannot run, or None."""
    try:
        import torch
    except Exception:  # noqa: BLE001
        return "torch is not importable"
    if not torch.cuda.is_available():
        return "no CUDA GPU visible to torch (a CUDA build of torch and an NVIDIA driver are needed)"
    return None


def _close(got: np.ndarray, ref: np.ndarray, dtype: str, what: str) -> float:
    atol, rtol = TOL[dtype]
    err = float(np.max(np.abs(got.astype(np.float64) - ref.astype(np.float64)))) if got.size else 0.0
    if got.shape != ref.shape or not np.all(np.isfinite(got)) or not np.allclose(got, ref, atol=atol, rtol=rtol):
        raise Failed(f"{what}: max abs error {err:.3g} (atol {atol}, rtol {rtol}), shapes {got.shape} vs {ref.shape}")
    return err


# ---------------------------------------------------------------- (a) kernels

def _cases(op: str, dh: int, rng: np.random.Generator):
    """Inputs with left padding, empty and over-long prefixes (torch CPU tensors, fp32)."""
    import torch

    def t(*shape):
        return torch.from_numpy(rng.standard_normal(shape).astype(np.float32))

    h = 2
    if op == "SharedPrefixAttention":
        for c, tt, n, valid in ((5, 3, 40, 25), (1, 4, 0, 0), (33, 2, 17, 99), (3, 1, 64, 64)):
            yield [t(c, h, tt, dh), t(1, h, n, dh), t(1, h, n, dh), torch.tensor([valid]), t(c, h, tt, dh),
                   t(c, h, tt, dh)]
    elif op == "SegmentedPrefixAttention":
        # users (sorted, then shuffled, one with no candidate) with empty, partial, full and over-long prefixes
        for users, tt, n, valid in (([0, 0, 1, 1, 1, 3, 3], 3, 40, [25, 0, 40, 99]),
                                    ([2, 0, 1, 2, 0, 1, 0, 2, 1, 0, 2], 2, 17, [5, 17, 0]),
                                    ([0, 0], 4, 0, [0]), ([1] * 9, 1, 64, [0, 64])):
            c, u = len(users), len(valid)
            yield [t(c, h, tt, dh), t(u, h, n, dh), t(u, h, n, dh), torch.tensor(valid), torch.tensor(users),
                   t(c, h, tt, dh), t(c, h, tt, dh)]
    elif op == "SharedDecodeAttention":
        # C candidates' N queries over one K/V: partial, empty (n = 0), none real, over-long, full
        for c, nq, n, valid in ((5, 3, 40, 25), (4, 2, 0, 0), (7, 1, 17, 0), (33, 2, 17, 99), (3, 4, 64, 64)):
            yield [t(c, h, nq, dh), t(1, h, n, dh), t(1, h, n, dh), torch.tensor([valid])]
    else:
        for b, lq, lk, valid in ((2, 7, 40, [40, 13]), (3, 20, 20, [0, 5, 99]), (1, 1, 33, [33])):
            yield [t(b, h, lq, dh), t(b, h, lk, dh), t(b, h, lk, dh), torch.tensor(valid)]


def _variants() -> list[tuple[str, dict[str, int]]]:
    """Every op once per value of its attributes besides ``scale``: ``(op, attributes)``."""
    from onetrans_trt.plugins import OPS

    out = []
    for op in OPS:
        out += [(op, {"causal": 1}), (op, {"causal": 0})] if op == "TailCausalAttention" else [(op, {})]
    return out


def _label(op: str, attrs: dict) -> str:
    return op + "".join(f"-{k}={v}" for k, v in attrs.items())


def _geometry(op: str, args) -> tuple[tuple[int, int], list[int]]:
    from onetrans_trt.plugins import OPS

    mod = OPS[op].module("trt_plugin")
    gx, gy, extras = mod.launch_geometry(list(args[0].shape), list(args[1].shape))
    return (gx, gy), extras


def _launcher():
    """A function launching PTX with TensorRT's layout, via cuda-python or CuPy."""
    try:
        from cuda.bindings import driver as cu  # cuda-python >= 12.6
    except Exception:  # noqa: BLE001
        try:
            from cuda import cuda as cu  # older cuda-python
        except Exception:  # noqa: BLE001
            cu = None
    if cu is not None:
        import ctypes

        import torch

        torch.zeros(1, device="cuda")  # make torch's (primary) context current on this thread
        modules = {}

        def launch(kernel, grid, ptrs_in, extras, ptrs_out, n_trailing):
            key = kernel.name + str(hash(kernel.ptx))
            if key not in modules:
                err, mod = cu.cuModuleLoadData(kernel.ptx.encode() + b"\0")
                if int(err) != 0:
                    raise Failed(f"the driver refused the PTX of {kernel.name} (.version "
                                 f"{kernel.ptx_version // 10}.{kernel.ptx_version % 10}): error {err}")
                err, fn = cu.cuModuleGetFunction(mod, kernel.name.encode())
                modules[key] = fn
            values = [*ptrs_in, *extras, *ptrs_out, *([0] * n_trailing)]
            types = ([ctypes.c_void_p] * len(ptrs_in) + [ctypes.c_int32] * len(extras)
                     + [ctypes.c_void_p] * (len(ptrs_out) + n_trailing))
            stream = torch.cuda.current_stream().cuda_stream
            (err,) = cu.cuLaunchKernel(modules[key], grid[0], grid[1], 1, kernel.threads, 1, 1, kernel.shared, stream,
                                       (tuple(values), tuple(types)), 0)
            if int(err) != 0:
                raise Failed(f"launching {kernel.name} failed: {err}")
            torch.cuda.synchronize()

        return launch, "cuda-python"
    try:
        import cupy
    except Exception:  # noqa: BLE001
        raise Skip("neither cuda-python nor CuPy is installed (pip install cuda-python)") from None

    def launch(kernel, grid, ptrs_in, extras, ptrs_out, n_trailing):
        with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
            f.write(kernel.ptx)
        try:
            fn = cupy.RawModule(path=f.name).get_function(kernel.name)  # loads the module: the file is read
        finally:
            os.unlink(f.name)  # one file per launch otherwise left in the temporary directory
        args = ([cupy.uint64(p) for p in ptrs_in] + [np.int32(e) for e in extras]
                + [cupy.uint64(p) for p in ptrs_out] + [cupy.uint64(0)] * n_trailing)
        fn(tuple(grid), (kernel.threads,), tuple(args), shared_mem=kernel.shared)
        cupy.cuda.runtime.deviceSynchronize()

    return launch, "cupy"


def part_kernels_compile(head_sizes=(8, 64)) -> str:
    from onetrans_trt.plugins import OPS
    from onetrans_trt.plugins._triton import ptx_cap, ptx_entry_params
    from onetrans_trt.plugins._trt import target_sm

    arch = target_sm()
    cap, why = ptx_cap(arch)
    n = 0
    for op, attrs in _variants():
        mod = OPS[op].module("triton_kernel")
        n_in = len(_inputs(op))
        n_extras = sum(kind == "i32" for kind in mod.signature("float32").values())
        for dtype in ("float32", "float16"):
            for dh in head_sizes:
                k = mod.compile(dtype, head_dim=dh, arch=arch, **attrs)
                kinds = [p.kind for p in ptx_entry_params(k.ptx, k.name)]
                want = ["ptr"] * n_in + ["u32"] * n_extras + ["ptr"]
                if kinds[:len(want)] != want or any(x != "ptr" for x in kinds[len(want):]):
                    raise Failed(f"{k.name} {dtype} dh={dh}: parameters {kinds}, TensorRT passes {want} (+ null scratch)")
                if k.ptx_version > cap:
                    raise Failed(f"{k.name}: PTX {k.ptx_version} above the cap {cap}")
                n += 1
    return f"{n} kernels for sm_{arch}, PTX ISA {cap // 10}.{cap % 10} ({why}), launch ABI as TensorRT passes it"


def part_kernels_launch(head_sizes=(8, 64)) -> str:
    reason = _gpu()
    if reason:
        raise Skip(reason)
    import torch

    from onetrans_trt.plugins import OPS
    from onetrans_trt.plugins._trt import target_sm

    launch, how = _launcher()
    rng = np.random.default_rng(0)
    worst, n = 0.0, 0
    for op, attrs in _variants():
        info = OPS[op]
        kmod, ref = info.module("triton_kernel"), info.module("reference").reference
        for dtype in ("float32", "float16"):
            tdt = getattr(torch, dtype)
            for dh in head_sizes:
                kernel = kmod.compile(dtype, head_dim=dh, arch=target_sm(), **attrs)
                for args in _cases(op, dh, rng):
                    dev = [a.to("cuda", tdt if a.is_floating_point() else torch.int64).contiguous() for a in args]
                    out = torch.empty_like(dev[0])
                    grid, extras = _geometry(op, args)
                    n_trailing = len(kernel.params()) - (len(_inputs(op)) + len(extras) + 1)  # Triton's scratch: null
                    launch(kernel, grid, [a.data_ptr() for a in dev], extras, [out.data_ptr()], n_trailing)
                    want = ref(*[a.to(torch.float32) if a.is_floating_point() else a for a in
                                 [d.cpu() for d in dev]], **attrs).numpy()
                    worst = max(worst, _close(out.float().cpu().numpy(), want, dtype,
                                              f"{_label(op, attrs)} {dtype} dh={dh}"))
                    n += 1
    return f"{n} launches via {how} match reference.py (worst abs error {worst:.2e})"


# ---------------------------------------------------------------- (b) TensorRT one-node engines

def _inputs(op: str) -> list[str]:
    import importlib

    from onetrans_trt.plugins import OPS

    return list(importlib.import_module(OPS[op].package).INPUTS)


def _one_node_onnx(op: str, args, dtype: str, path: Path, attrs: dict | None = None) -> None:
    """The node as fuse-attention writes it: ``scale``, the op's other attributes (``attrs``:
    TailCausalAttention's ``causal``, always written: TensorRT has no attribute defaults),
    ``plugin_namespace`` and ``aot=1``."""
    import onnx
    from onnx import TensorProto, helper

    from onetrans_trt.plugins import PLUGIN_NAMESPACE

    names = _inputs(op)
    ft = TensorProto.FLOAT16 if dtype == "float16" else TensorProto.FLOAT
    ins = [helper.make_tensor_value_info(n, TensorProto.INT64 if not a.is_floating_point() else ft, list(a.shape))
           for n, a in zip(names, args)]
    out = helper.make_tensor_value_info("out", ft, list(args[0].shape))
    node = helper.make_node(op, names, ["out"], domain="onetrans", scale=1.0 / math.sqrt(args[0].shape[-1]),
                            **(attrs or {}), plugin_namespace=PLUGIN_NAMESPACE, aot=1)
    model = helper.make_model(helper.make_graph([node], op, ins, [out]),
                              opset_imports=[helper.make_opsetid("", 23), helper.make_opsetid("onetrans", 1)])
    onnx.save(model, str(path))


def _build_engine(trt, onnx_path: Path) -> bytes:
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network()
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        raise Failed("; ".join(str(parser.get_error(i)) for i in range(parser.num_errors)))
    kinds = [network.get_layer(i).type for i in range(network.num_layers)]
    if trt.LayerType.PLUGIN_V3 not in kinds:
        raise Failed(f"no PLUGIN_V3 layer in the parsed network (layers: {kinds})")
    config = builder.create_builder_config()
    if hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)  # fp32 means fp32 here
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise Failed("build_serialized_network returned None (see the TensorRT log above)")
    return bytes(plan)


_RUN_ENGINE = r"""
import json, sys
import numpy as np, tensorrt as trt, torch
assert "tensorrt.plugin" not in sys.modules
a = json.loads(sys.stdin.read())
engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(open(a["engine"], "rb").read())
assert engine is not None, "deserialize_cuda_engine failed without the Python plugin"
ctx = engine.create_execution_context()
data = np.load(a["inputs"])
keep = {}
for name in data.files:
    t = torch.from_numpy(data[name]).cuda().contiguous(); keep[name] = t
    assert ctx.set_input_shape(name, tuple(t.shape)); ctx.set_tensor_address(name, t.data_ptr())
out = torch.empty(tuple(ctx.get_tensor_shape("out")), dtype=keep[data.files[0]].dtype, device="cuda")
ctx.set_tensor_address("out", out.data_ptr())
assert ctx.execute_async_v3(torch.cuda.current_stream().cuda_stream)
torch.cuda.synchronize()
np.save(a["out"], out.float().cpu().numpy())
assert "tensorrt.plugin" not in sys.modules
print("ok")
"""


def part_tensorrt(workdir: Path) -> str:
    reason = _gpu()
    if reason:
        raise Skip(reason)
    try:
        import tensorrt as trt
    except Exception as e:  # noqa: BLE001
        raise Skip(f"tensorrt is not importable ({type(e).__name__}); pip install 'onetrans-trt[trt]'") from None
    import torch

    from onetrans_trt.engines.build import require_aot_plugins
    from onetrans_trt.plugins import OPS, register_trt_plugins

    require_aot_plugins(trt)
    register_trt_plugins()
    rng = np.random.default_rng(1)
    n, worst = 0, 0.0
    for op, attrs in _variants():
        ref, label = OPS[op].module("reference").reference, _label(op, attrs)
        for dtype in ("float32", "float16"):
            args = next(iter(_cases(op, 64, rng)))
            tdt = getattr(torch, dtype)
            cast = [a.to(tdt) if a.is_floating_point() else a for a in args]
            onnx_path = workdir / f"{label}-{dtype}.onnx"
            _one_node_onnx(op, cast, dtype, onnx_path, attrs)
            plan = _build_engine(trt, onnx_path)
            engine_path = workdir / f"{label}-{dtype}.engine"
            engine_path.write_bytes(plan)
            names = _inputs(op)
            inputs = workdir / f"{label}-{dtype}-inputs.npz"
            np.savez(inputs, **{nm: a.numpy() for nm, a in zip(names, cast)})
            want = ref(*[a.to(torch.float32) if a.is_floating_point() else a for a in cast], **attrs).numpy()
            # run it in a fresh process that never imports tensorrt.plugin
            out = workdir / f"{label}-{dtype}-out.npy"
            p = subprocess.run([sys.executable, "-c", _RUN_ENGINE], input=json.dumps(
                {"engine": str(engine_path), "inputs": str(inputs), "out": str(out)}), capture_output=True, text=True,
                timeout=300)
            if p.returncode != 0:
                raise Failed(f"{label} {dtype}: the engine did not run without Python plugins: "
                             f"{(p.stderr.strip().splitlines() or ['?'])[-1][:300]}")
            worst = max(worst, _close(np.load(out), want, dtype, f"TensorRT {label} {dtype}"))
            n += 1
    return f"{n} one-node engines (PLUGIN_V3, AOT) built, run without tensorrt.plugin, match reference (worst {worst:.2e})"


# ---------------------------------------------------------------- (c)/(d) the tiny preset end to end

def _tiny_build(workdir: Path):
    import torch

    from onetrans_trt.data.synthetic import synthetic_request, synthetic_schema
    from onetrans_trt.export.api import export_build
    from onetrans_trt.models.checkpoint import save_checkpoint
    from onetrans_trt.models.config import ModelConfig
    from onetrans_trt.models.onetrans import OneTrans

    schema = synthetic_schema(max_history=40)
    model = OneTrans(ModelConfig.from_preset("tiny", schema))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_((1.0 if "norm" in name and name.endswith("weight") else 0.0) + 0.2 * torch.randn(p.shape, generator=gen))
    ckpt = save_checkpoint(model.eval(), workdir / "tiny-ckpt", force=True)
    build = workdir / "tiny-build"
    export_build(ckpt, build, force=True, n_samples=2)
    rng = np.random.default_rng(7)
    reqs = [synthetic_request(schema, rng, n_history=int(h), n_candidates=int(c))
            for h, c in zip([0, 1, 5, 40, 60, 12, 3, 40, 25, 7], [1, 4, 16, 64, 9, 2, 33, 128, 5, 20])]
    return build, reqs


def part_tiny(workdir: Path, state: dict) -> str:
    from onetrans_trt.runtime.ranker import Ranker

    build, reqs = _tiny_build(workdir)
    state["build"], state["reqs"] = build, reqs
    ort = Ranker.load(build, backend="ort", providers=["CPUExecutionProvider"])
    state["cpu"] = [ort.rank(r).logits for r in reqs]
    torch_split = Ranker.load(workdir / "tiny-ckpt", backend="torch-split")
    worst = max(_close(a, torch_split.rank(r).logits, "float32", "ORT CPU vs PyTorch") for a, r in zip(state["cpu"], reqs))
    return f"tiny preset exported; ORT CPU == PyTorch on {len(reqs)} requests (histories 0..60, C 1..128; worst {worst:.1e})"


def part_trt_ranker(state: dict) -> str:
    reason = _gpu()
    if reason:
        raise Skip(reason)
    if "build" not in state:
        raise Skip("the tiny build did not get made")
    try:
        import tensorrt  # noqa: F401
    except Exception as e:  # noqa: BLE001
        raise Skip(f"tensorrt is not importable ({type(e).__name__})") from None
    from onetrans_trt.engines.build import build_engines
    from onetrans_trt.runtime.ranker import Ranker

    build_engines(state["build"], "fp32", tf32=False)
    trt = Ranker.load(state["build"], backend="trt")
    worst = max(_close(trt.rank(r).logits, c, "float32", "TensorRT fp32 vs ORT CPU") for r, c in zip(state["reqs"], state["cpu"]))
    return f"build --precision fp32 (TF32 off); Ranker trt == ort on {len(state['reqs'])} requests (worst {worst:.1e})"


def part_ort_cuda(state: dict) -> str:
    reason = _gpu()
    if reason:
        raise Skip(reason)
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise Skip("onnxruntime has no CUDAExecutionProvider (pip uninstall -y onnxruntime && "
                   "pip install 'onetrans-trt[gpu]': onnxruntime-gpu replaces it)")
    if "build" not in state:
        raise Skip("the tiny build did not get made")
    from onetrans_trt.data.requests import encode_request
    from onetrans_trt.models.config import read_config
    from onetrans_trt.runtime.ort_backend import OrtSplitBackend

    schema = read_config(state["build"]).schema
    bound = OrtSplitBackend(state["build"], providers=["CUDAExecutionProvider"], device="cuda")
    host = OrtSplitBackend(state["build"], providers=["CUDAExecutionProvider"], device=None)
    worst, times = 0.0, {"bound": [], "host": []}
    for r, c in zip(state["reqs"], state["cpu"]):
        hist, ns = encode_request(schema, r)
        for name, be in (("bound", bound), ("host", host)):
            t0 = time.perf_counter()
            got = be.score(be.encode_user(hist), ns)
            times[name].append(time.perf_counter() - t0)
            worst = max(worst, _close(got, c, "float32", f"ORT CUDA ({name}) vs CPU"))
    return (f"ORT CUDA == CPU on {len(state['reqs'])} requests (worst {worst:.1e}); K/V kept on the device: "
            f"median {np.median(times['bound']) * 1e3:.2f} ms vs {np.median(times['host']) * 1e3:.2f} ms with host copies")


def run(out=print, workdir: str | None = None) -> dict[str, Any]:
    from onetrans_trt import doctor

    out("== onetrans-trt gpu-check: versions ==")
    for line in doctor.lines():
        out(line)
    out("== checks (stop at the first failure) ==")
    check = Check(out)
    state: dict = {}
    tmp = tempfile.TemporaryDirectory(prefix="gpu-check-") if workdir is None else None
    wd = Path(workdir or tmp.name)
    wd.mkdir(parents=True, exist_ok=True)
    ok = True
    try:
        check.part("(a) kernels: AOT compile, PTX ISA cap, launch ABI", part_kernels_compile)
        check.part("(a) kernels: launched with TensorRT's layout vs reference", part_kernels_launch)
        check.part("(b) TensorRT one-node plugin engines", lambda: part_tensorrt(wd))
        check.part("(c) tiny preset: export, ORT CPU vs PyTorch", lambda: part_tiny(wd, state))
        check.part("(c) tiny preset: TensorRT fp32 engines vs ORT", lambda: part_trt_ranker(state))
        check.part("(d) ORT CUDA execution provider vs CPU, K/V on the device", lambda: part_ort_cuda(state))
    except Failed:
        ok = False
    finally:
        if tmp is not None:
            tmp.cleanup()
    counts = {s: sum(r["status"] == s for r in check.results) for s in ("ok", "skipped", "FAILED")}
    out(f"== gpu-check: {counts['ok']} ok, {counts['skipped']} skipped, {counts['FAILED']} failed ==")
    return {"ok": ok, "parts": check.results, "counts": counts}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m onetrans_trt.gpu_check", description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", help="also write the results as JSON to this file")
    ap.add_argument("--workdir", help="keep the artifacts here (default: a temporary directory)")
    a = ap.parse_args(argv)
    import warnings

    warnings.simplefilter("ignore")  # the exporter's notes are not this script's findings
    os.environ.pop("TRITON_INTERPRET", None)  # compiles here are for the GPU
    res = run(lambda s: print(s, flush=True), a.workdir)
    if a.json:
        from onetrans_trt.io import atomic_write_json

        atomic_write_json(Path(a.json), res)
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
