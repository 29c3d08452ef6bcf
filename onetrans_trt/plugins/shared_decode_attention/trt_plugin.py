"""SharedDecodeAttention as a TensorRT 11 plugin (ahead-of-time Triton kernel).

The ONNX node ``SharedDecodeAttention`` with attribute ``plugin_namespace="onetrans"`` (and
``aot=1``) resolves to this plugin. As for SharedPrefixAttention, the pure functions below
(output description, I/O types, launch geometry) are plain Python over whatever size type
TensorRT hands them and are unit-tested without TensorRT; :func:`register` binds them to
``tensorrt.plugin``. One attribute, ``scale`` (a 1-element float32 array).
"""

# No ``from __future__ import annotations`` here: TensorRT inspects the live annotations.
import numpy as np
import numpy.typing as npt

from onetrans_trt.plugins._onnx import PLUGIN_NAMESPACE
from onetrans_trt.plugins._trt import aot_kernel, cdiv, io_types, register_once, require_tensorrt
from onetrans_trt.plugins.shared_decode_attention import OP

PLUGIN_ID = f"{PLUGIN_NAMESPACE}::{OP}"
IO_TYPES = io_types([True, True, True, False, True])  # q, k, v, valid (INT64) -> out
BLOCK_M = 16  # must equal triton_kernel.BLOCK_M


def output_desc(q):
    """The output has the queries' shape and dtype."""
    return q.like()


def launch_geometry(q_shape, k_shape):
    """``(grid_x, grid_y, extras)``: row blocks over C*N, heads; extras C, H, N, n (the
    kernel's int32 parameters, in its signature's order)."""
    c, h, nq = q_shape[0], q_shape[1], q_shape[2]
    return cdiv(c * nq, BLOCK_M), h, [c, h, nq, k_shape[2]]


def register() -> None:
    register_once(PLUGIN_ID, _register)


def _register() -> None:
    from typing import List, Tuple, Union

    trt, trtp = require_tensorrt()

    @trtp.register(PLUGIN_ID)
    def _desc(q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc, valid: trtp.TensorDesc,
              scale: npt.NDArray[np.float32]) -> trtp.TensorDesc:
        return output_desc(q)

    @trtp.autotune(PLUGIN_ID)
    def _tune(q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc, valid: trtp.TensorDesc,
              scale: npt.NDArray[np.float32],
              outputs: Tuple[trtp.TensorDesc]) -> List[trtp.AutoTuneCombination]:
        return [trtp.AutoTuneCombination(IO_TYPES, "LINEAR")]

    @trtp.aot_impl(PLUGIN_ID)
    def _aot(q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc, valid: trtp.TensorDesc,
             scale: npt.NDArray[np.float32], outputs: Tuple[trtp.TensorDesc], tactic: int
             ) -> Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams, trtp.SymExprs]:
        from onetrans_trt.plugins.shared_decode_attention import triton_kernel

        return aot_kernel(trt, trtp, PLUGIN_ID, triton_kernel, q, scale, launch_geometry(q.shape_expr, k.shape_expr))
