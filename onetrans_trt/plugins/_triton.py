"""Shared plumbing for our Triton kernels: interpreter runs and ahead-of-time compiles.

Each kernel is written once as a plain Python function and wrapped two ways, without
depending on ``TRITON_INTERPRET`` at import time: a ``JITFunction`` for ahead-of-time
compilation to PTX/cubin (no GPU needed) and an ``InterpretedFunction`` that runs on the
CPU (the test path here). Kernel parameters follow the TensorRT AOT plugin convention:
input pointers, then int32 scalars, then output pointers, then constexprs.

Ahead-of-time compiles never run under the interpreter: with ``TRITON_INTERPRET=1`` set
(our test suite sets it for the whole process) ``tl.*`` become interpreter functions and
``triton.compile`` fails, so the compile then runs in a subprocess without it.

The PTX ``.version`` is capped to what the target driver accepts (Triton otherwise writes
its bundled ptxas's, 9.4 for Triton 3.9, which a CUDA driver older than 13.4 rejects when
the engine runs): ``$ONETRANS_TRT_PTX_VERSION`` (e.g. ``8.4``), else the visible driver's
maximum, else :data:`DEFAULT_PTX_VERSION`. The cap is recorded on every compiled kernel.
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from typing import Callable

from onetrans_trt.errors import BuildError, MissingCapabilityError

MIN_TRITON = (3, 5)  # the ASTSource(fn, signature, constexprs) form we compile with and test
# PTX ISA 8.4 is accepted by every CUDA 12.4+ driver; TensorRT 10.9+ needs a CUDA 12 driver anyway.
DEFAULT_PTX_VERSION = 84
# The lowest PTX ISA that can target an architecture (NVIDIA's PTX ISA notes, "Target ISA notes":
# sm_90a needs PTX 8.0, sm_100a 8.6, sm_120a 8.7; Triton targets the "a" variants from sm_90 on).
MIN_PTX_FOR_ARCH = {75: 63, 80: 70, 86: 71, 89: 78, 90: 80, 100: 86, 103: 88, 120: 87}


def _version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", v)[:3])


def require_triton():
    try:
        import triton  # noqa: F401
    except ImportError:
        raise MissingCapabilityError("Triton is not installed; install the 'kernels' extra "
                                     "(pip install 'onetrans-trt[kernels]')") from None
    if _version_tuple(triton.__version__)[:2] < MIN_TRITON:
        raise MissingCapabilityError(f"Triton {triton.__version__} is too old: our kernels are compiled and tested "
                                     f"with Triton >= {'.'.join(map(str, MIN_TRITON))} (pip install -U 'triton>=3.5')")
    return triton


def jit(fn: Callable):
    require_triton()
    from triton.runtime.jit import JITFunction

    return JITFunction(fn)


def interpreted(fn: Callable):
    require_triton()
    from triton.runtime.interpreter import InterpretedFunction

    return InterpretedFunction(fn)


def require_interpreter() -> None:
    """Triton's CPU interpreter must be chosen before triton is first imported."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise MissingCapabilityError("running a Triton kernel on the CPU needs TRITON_INTERPRET=1 set "
                                     "before triton is imported (the test suite sets it)")


def max_ptx_for_cuda(version: str) -> int:
    """The highest PTX ISA (as 10*major+minor) a CUDA driver of ``version`` (e.g. "12.8") loads.
    The same table as Triton's ``ptx_get_version`` (triton/backends/nvidia/compiler.py):
    12.0-12.5 -> 8.0-8.5, 12.6+ -> minor-1 (12.8 -> 8.7), 13.x -> 9.x."""
    major, minor = _version_tuple(version)[:2]
    if major >= 13:
        return 90 + (major - 13) * 10 + minor
    if major == 12:
        return 80 + minor if minor < 6 else 80 + minor - 1
    if major == 11:
        return 70 + minor
    raise MissingCapabilityError(f"CUDA driver {version} is too old for our kernels (need a CUDA 12 driver)")


def driver_cuda_version() -> str | None:
    """The CUDA version the installed NVIDIA driver supports (``nvidia-smi``'s "CUDA Version"),
    through NVML; None without a driver."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            v = pynvml.nvmlSystemGetCudaDriverVersion()
        finally:
            pynvml.nvmlShutdown()
        return f"{v // 1000}.{(v % 1000) // 10}"
    except Exception:  # noqa: BLE001 - no driver, no NVML, no GPU: all mean "unknown"
        return None


def _parse_ptx_version(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+)\.(\d)\s*", str(text)) or re.fullmatch(r"\s*(\d)(\d)\s*", str(text))
    if not m:
        raise MissingCapabilityError(f"ONETRANS_TRT_PTX_VERSION={text!r}: expected a PTX ISA version like 8.4")
    return int(m.group(1)) * 10 + int(m.group(2))


def ptx_cap(arch: int = 90) -> tuple[int, str]:
    """``(ptx_version, why)``: the PTX ISA our kernels are written in for ``sm_<arch>``."""
    if os.environ.get("ONETRANS_TRT_PTX_VERSION"):
        cap, why = _parse_ptx_version(os.environ["ONETRANS_TRT_PTX_VERSION"]), "$ONETRANS_TRT_PTX_VERSION"
    elif (cuda := driver_cuda_version()) is not None:
        cap, why = max_ptx_for_cuda(cuda), f"driver supports CUDA {cuda}"
    else:
        cap, why = DEFAULT_PTX_VERSION, "no driver visible: default for CUDA 12.4+ drivers"
    need = MIN_PTX_FOR_ARCH.get(arch, max(v for a, v in MIN_PTX_FOR_ARCH.items() if a <= arch))
    if cap < need:
        raise MissingCapabilityError(f"PTX ISA {cap // 10}.{cap % 10} ({why}) cannot target sm_{arch}, which needs "
                                     f"{need // 10}.{need % 10}: update the NVIDIA driver")
    return cap, why


@dataclass
class PtxParam:
    kind: str  # "ptr" (.u64 .ptr) or the scalar type ("u32", "f32", ...)
    name: str


def ptx_entry_params(ptx: str, name: str | None = None) -> list[PtxParam]:
    """The parameter list of the ``.entry`` in ``ptx`` (the launch ABI): pointers and scalars."""
    m = re.search(r"\.entry\s+(\w+)\s*\((.*?)\)", ptx, flags=re.S)
    if not m or (name is not None and m.group(1) != name):
        raise BuildError(f"no .entry {name or ''} in the PTX")
    params = []
    for part in m.group(2).split(","):
        part = part.strip()
        if not part:
            continue
        toks = part.split()
        kind = "ptr" if ".ptr" in toks else toks[1].lstrip(".")
        params.append(PtxParam(kind, toks[-1]))
    return params


def ptx_isa(ptx: str) -> int:
    """The ``.version`` of a PTX text as 10*major+minor."""
    m = re.search(r"^\.version (\d+)\.(\d+)", ptx, flags=re.M)
    if not m:
        raise BuildError("the PTX has no .version line")
    return int(m.group(1)) * 10 + int(m.group(2))


@dataclass
class CompiledKernel:
    name: str
    ptx: str
    cubin: bytes
    num_warps: int
    shared: int
    arch: int
    ptx_version: int = 0  # the PTX ISA written in ``.version`` (10*major+minor)
    ptx_cap_reason: str = ""

    @property
    def threads(self) -> int:
        return self.num_warps * 32

    def params(self) -> list[PtxParam]:
        return ptx_entry_params(self.ptx, self.name)


def check_launchable(meta) -> None:
    """A kernel TensorRT can launch: one CTA per program, no cooperative launch, no scratch
    buffers (TensorRT allocates none for AOT plugins and passes null for Triton's trailing
    scratch pointers)."""
    problems = []
    for attr in ("global_scratch_size", "profile_scratch_size"):
        if getattr(meta, attr, 0) or 0:
            problems.append(f"needs {getattr(meta, attr)} bytes of {attr.replace('_size', '').replace('_', ' ')}")
    if (getattr(meta, "num_ctas", 1) or 1) != 1:
        problems.append(f"num_ctas={meta.num_ctas} (thread-block clusters)")
    if getattr(meta, "launch_cooperative_grid", False):
        problems.append("needs a cooperative launch")
    if problems:
        raise BuildError(f"kernel {getattr(meta, 'name', '?')} cannot run as a TensorRT AOT plugin: {'; '.join(problems)}")


_CACHE: dict[tuple, CompiledKernel] = {}


def compile_aot(fn: Callable, signature: dict[str, str], constexprs: dict[str, object], *, arch: int = 90,
                num_warps: int = 4, ptx_version: int | None = None) -> CompiledKernel:
    """Compile ahead of time for ``sm_<arch>``; no GPU is needed. Runs in a subprocess when
    this process has Triton's interpreter switched on."""
    require_triton()
    if ptx_version is None:
        ptx_version, why = ptx_cap(arch)
    else:
        why = "requested"
    key = (fn.__module__, fn.__qualname__, json.dumps(signature, sort_keys=True),
           json.dumps(constexprs, sort_keys=True), arch, num_warps, ptx_version)
    if key not in _CACHE:
        if os.environ.get("TRITON_INTERPRET") == "1":
            k = _compile_in_subprocess(fn, signature, constexprs, arch, num_warps, ptx_version)
        else:
            k = _compile_here(fn, signature, constexprs, arch, num_warps, ptx_version)
        k.ptx_cap_reason = why
        _CACHE[key] = k
    return _CACHE[key]


def _compile_here(fn, signature, constexprs, arch, num_warps, ptx_version) -> CompiledKernel:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn=jit(fn), signature=signature, constexprs=constexprs)
    k = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                       options={"num_warps": num_warps, "enable_fp_fusion": True, "ptx_version": ptx_version})
    check_launchable(k.metadata)
    ptx = k.asm["ptx"]
    if ptx_isa(ptx) > ptx_version:
        raise BuildError(f"Triton wrote PTX {ptx_isa(ptx)} above the cap {ptx_version}")
    return CompiledKernel(name=k.metadata.name, ptx=ptx, cubin=k.asm.get("cubin", b""),
                          num_warps=k.metadata.num_warps, shared=k.metadata.shared, arch=arch,
                          ptx_version=ptx_isa(ptx))


_CHILD = r"""
import base64, dataclasses, importlib, json, sys
from onetrans_trt.plugins._triton import _compile_here
a = json.loads(sys.stdin.read())
fn = getattr(importlib.import_module(a["module"]), a["name"])
k = _compile_here(fn, a["signature"], a["constexprs"], a["arch"], a["num_warps"], a["ptx_version"])
d = dataclasses.asdict(k); d["cubin"] = base64.b64encode(k.cubin).decode()
print("@@KERNEL@@" + json.dumps(d))
"""


def _compile_in_subprocess(fn, signature, constexprs, arch, num_warps, ptx_version) -> CompiledKernel:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    args = {"module": fn.__module__, "name": fn.__name__, "signature": signature, "constexprs": constexprs,
            "arch": arch, "num_warps": num_warps, "ptx_version": ptx_version}
    p = subprocess.run([sys.executable, "-c", _CHILD], input=json.dumps(args), capture_output=True, text=True,
                       env=env, timeout=900)
    line = next((l for l in p.stdout.splitlines() if l.startswith("@@KERNEL@@")), None)
    if p.returncode != 0 or line is None:
        tail = (p.stderr.strip().splitlines() or ["no output"])[-1]
        raise BuildError(f"compiling {fn.__name__} for sm_{arch} failed: {tail[:300]}")
    d = json.loads(line[len("@@KERNEL@@"):])
    d["cubin"] = base64.b64decode(d["cubin"])
    return CompiledKernel(**d)


def head_pad(head_dim: int) -> int:
    """The head-dimension lanes a kernel computes on: a power of two, at least 16 (``tl.arange``
    needs a power of two and ``tl.dot`` an inner size >= 16; the tiny preset's heads are 8 wide)."""
    return max(16, 1 << (int(head_dim) - 1).bit_length())


def dtype_code(dtype) -> str:
    """Triton's pointer type code for a torch/numpy dtype name."""
    name = str(dtype).replace("torch.", "")
    return {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}[name]
