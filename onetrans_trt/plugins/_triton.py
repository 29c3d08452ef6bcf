"""Shared plumbing for our Triton kernels: interpreter runs and ahead-of-time compiles.

Each kernel is written once as a plain Python function and wrapped two ways, without
depending on ``TRITON_INTERPRET`` at import time: a ``JITFunction`` for ahead-of-time
compilation to PTX/cubin (no GPU needed) and an ``InterpretedFunction`` that runs on the
CPU (the test path here). Kernel parameters follow the TensorRT AOT plugin convention:
input pointers, then int32 scalars, then output pointers, then constexprs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from onetrans_trt.errors import MissingCapabilityError


def require_triton():
    try:
        import triton  # noqa: F401
    except ImportError:
        raise MissingCapabilityError("Triton is not installed; install the 'kernels' extra "
                                     "(pip install 'onetrans-trt[kernels]')") from None
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
    import os

    if os.environ.get("TRITON_INTERPRET") != "1":
        raise MissingCapabilityError("running a Triton kernel on the CPU needs TRITON_INTERPRET=1 set "
                                     "before triton is imported (the test suite sets it)")


@dataclass
class CompiledKernel:
    name: str
    ptx: str
    cubin: bytes
    num_warps: int
    shared: int
    arch: int

    @property
    def threads(self) -> int:
        return self.num_warps * 32


def compile_aot(fn: Callable, signature: dict[str, str], constexprs: dict[str, object], *, arch: int = 90,
                num_warps: int = 4) -> CompiledKernel:
    """Compile ahead of time for ``sm_<arch>``; no GPU is needed."""
    require_triton()
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn=jit(fn), signature=signature, constexprs=constexprs)
    k = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps, "enable_fp_fusion": True})
    scratch = getattr(k.metadata, "global_scratch_size", 0) or 0
    if scratch:
        raise RuntimeError(f"{k.metadata.name} needs {scratch} bytes of global scratch; TensorRT cannot provide it")
    return CompiledKernel(name=k.metadata.name, ptx=k.asm["ptx"], cubin=k.asm.get("cubin", b""),
                          num_warps=k.metadata.num_warps, shared=k.metadata.shared, arch=arch)


def dtype_code(dtype) -> str:
    """Triton's pointer type code for a torch/numpy dtype name."""
    name = str(dtype).replace("torch.", "")
    return {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}[name]
