"""TailCausalAttention as a TensorRT 11 plugin (ahead-of-time Triton kernel).

The ONNX node ``TailCausalAttention`` with ``plugin_namespace="onetrans"`` (and ``aot=1``)
resolves to this plugin. Pure functions are unit-tested without TensorRT.

Attributes, in registration order (TensorRT passes them to ``autotune``/``aot_impl``
positionally in this order): ``scale`` (FLOAT, a 1-element float32 array) and ``causal``
(INT, a 1-element int32 array: the ONNX parser turns an INT attribute into a kINT32 field;
declared ``NDArray[np.int32]``, not ``int``, for the reason ``scale`` is not ``float``). The
kernel is compiled for the node's mode (``CAUSAL`` constexpr: 1 bottom-right causal, 0
bidirectional); any other value is refused at build time.

The node must carry ``causal``: TensorRT has no attribute defaults. The ONNX parser only
warns about a registered field the node lacks and skips it (onnx-tensorrt
``onnxOpImporters.cpp`` ``loadFields``: "Attribute ... not found in plugin node! Ensure that
the plugin creator has a default value defined or the engine may fail to build"), a QDP
``register`` function may not declare a default (tensorrt/plugin ``_validate.py`` 108-111),
and ``create_plugin`` hands ``register`` only the fields it got (``_lib.py`` 256-279,
``_plugin_class.py`` 69/131): the build fails with a TypeError for the missing keyword. Our
fuse-attention pass always writes ``causal`` explicitly; only the ONNX function (ONNX Runtime)
defaults it to 1 for nodes written before it existed.
"""

# No ``from __future__ import annotations`` here: TensorRT inspects the live annotations.
import numpy as np
import numpy.typing as npt

from onetrans_trt.plugins._onnx import PLUGIN_NAMESPACE
from onetrans_trt.plugins._trt import aot_kernel, attr_int, cdiv, io_types, register_once, require_tensorrt
from onetrans_trt.plugins.tail_causal_attention import OP

PLUGIN_ID = f"{PLUGIN_NAMESPACE}::{OP}"
IO_TYPES = io_types([True, True, True, False, True])  # q, k, v, valid -> out
BLOCK_M = 16  # must equal triton_kernel.BLOCK_M


def output_desc(q):
    return q.like()


def launch_geometry(q_shape, k_shape):
    """``(grid_x, grid_y, extras)``: query blocks over Lq, users x heads; extras B, H, Lq, Lk."""
    b, h, lq = q_shape[0], q_shape[1], q_shape[2]
    return cdiv(lq, BLOCK_M), b * h, [b, h, lq, k_shape[2]]


def causal_mode(causal) -> int:
    """The node's ``causal`` attribute as the kernel's ``CAUSAL`` constexpr (1 or 0; else an error)."""
    mode = attr_int(causal)
    if mode not in (0, 1):
        raise ValueError(f"{PLUGIN_ID}: attribute causal must be 0 or 1, got {mode}")
    return mode


def register() -> None:
    register_once(PLUGIN_ID, _register)


def _register() -> None:
    from typing import List, Tuple, Union

    trt, trtp = require_tensorrt()

    @trtp.register(PLUGIN_ID)
    def _desc(q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc, valid: trtp.TensorDesc,
              scale: npt.NDArray[np.float32], causal: npt.NDArray[np.int32]) -> trtp.TensorDesc:
        causal_mode(causal)  # a bad value fails when the network is built, not at run time
        return output_desc(q)

    @trtp.autotune(PLUGIN_ID)
    def _tune(q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc, valid: trtp.TensorDesc,
              scale: npt.NDArray[np.float32], causal: npt.NDArray[np.int32],
              outputs: Tuple[trtp.TensorDesc]) -> List[trtp.AutoTuneCombination]:
        return [trtp.AutoTuneCombination(IO_TYPES, "LINEAR")]

    @trtp.aot_impl(PLUGIN_ID)
    def _aot(q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc, valid: trtp.TensorDesc,
             scale: npt.NDArray[np.float32], causal: npt.NDArray[np.int32],
             outputs: Tuple[trtp.TensorDesc], tactic: int
             ) -> Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams, trtp.SymExprs]:
        from onetrans_trt.plugins.tail_causal_attention import triton_kernel

        return aot_kernel(trt, trtp, PLUGIN_ID, triton_kernel, q, scale, launch_geometry(q.shape_expr, k.shape_expr),
                          causal=causal_mode(causal))
