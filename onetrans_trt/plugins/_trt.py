"""Shared pieces of our TensorRT 11 plugins (``tensorrt.plugin``, Quick Deployable Plugins).

Written against the TensorRT 11 Python API documentation:
- tensorrt.plugin.register / autotune / aot_impl:
  https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/tensorrt.plugin/
- AutoTuneCombination (``"FP32|FP16, ..."``, ``|`` = dependent alternatives):
  .../tensorrt.plugin/trt_plugin_autotune/AutoTuneCombination.html
- KernelLaunchParams (grid_x/y/z, block_x/y/z, shared_mem):
  .../tensorrt.plugin/trt_plugin_aot_impl/KernelLaunchParams.html
The aot_impl returns ``(kernel_name, ptx, KernelLaunchParams, SymIntExprs)``; the kernel's
parameters are the input pointers, then the int32 extras, then the output pointers.
``tensorrt`` is imported lazily: nothing here is needed to export or run graphs on ORT.

Facts from TensorRT's own Python sources (``python/packaging/frontend_sources/plugin/``)
that the plugin modules must respect (each broke the first GPU run once):
- the ``trt_plugin.py`` modules define QDP functions, so they must NOT use
  ``from __future__ import annotations``: ``@trtp.register`` checks
  ``issubclass(param.annotation, TensorDesc)`` on live annotations (``_validate.py``);
- ``ShapeExpr.is_constant`` is a property, ``ShapeExpr.constant_value()`` a method (``_tensor.py``);
- a float ONNX attribute reaches the plugin as a 1-element FLOAT32 ``PluginField``; an attribute
  annotated ``float`` is read with ``float(f.data)``, which numpy >= 2.4 refuses for a 1-D array,
  so ours are declared ``numpy.typing.NDArray[numpy.float32]`` and read with :func:`attr_float`;
  an INT ONNX attribute arrives as a 1-element INT32 field (the ONNX parser's ``loadFields``),
  so int attributes are declared ``numpy.typing.NDArray[numpy.int32]`` and read with :func:`attr_int`;
- every attribute is passed to ``autotune``/``aot_impl`` positionally, in registration order;
- an attribute the ONNX node lacks is NOT defaulted: the parser's ``loadFields`` only warns
  ("Attribute X not found in plugin node! Ensure that the plugin creator has a default value
  defined or the engine may fail to build") and skips the field; ``create_plugin`` (``_lib.py``
  256-279) builds the attributes from the fields it got; ``register`` functions may not have
  defaults (``_validate.py`` 108-111), so ``register_function(*descs, **attrs)``
  (``_plugin_class.py`` 69, 131) raises TypeError for the missing keyword and the node fails
  to build. Every node handed to TensorRT must carry every registered attribute.
"""

from __future__ import annotations

import os

import numpy as np

from onetrans_trt.errors import MissingCapabilityError


def require_tensorrt():
    try:
        import tensorrt as trt
        import tensorrt.plugin as trtp
    except Exception as e:  # noqa: BLE001 - placeholder wheels raise at import
        raise MissingCapabilityError(
            f"TensorRT is not usable here ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}); "
            "install the 'trt' extra (tensorrt>=11) on a machine with an NVIDIA GPU") from None
    return trt, trtp


def target_sm() -> int:
    """The SM version kernels are compiled for: $ONETRANS_TRT_SM, else the visible GPU, else 90."""
    if os.environ.get("ONETRANS_TRT_SM"):
        return int(os.environ["ONETRANS_TRT_SM"])
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability(0)
            return major * 10 + minor
    except Exception:  # noqa: BLE001
        pass
    return 90


def attr_float(value) -> float:
    """A float attribute as TensorRT delivers it (a 1-element array; a plain number also works)."""
    arr = np.asarray(value, dtype=np.float64).reshape(-1)
    if arr.size != 1:
        raise ValueError(f"expected one float attribute value, got {arr.size}")
    return float(arr[0])


def attr_int(value) -> int:
    """An int attribute as TensorRT delivers it (a 1-element INT32 array; a plain int also works)."""
    arr = np.asarray(value).reshape(-1)
    if arr.size != 1:
        raise ValueError(f"expected one int attribute value, got {arr.size}")
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.bool_)):
        raise ValueError(f"expected an int attribute, got dtype {arr.dtype}")
    return int(arr[0])


def cdiv(a, b):
    """Ceiling division on ints or on TensorRT symbolic expressions (no bool branching)."""
    return (a + b - 1) // b


def io_types(float_positions: list[bool]) -> str:
    """A dependent FP32|FP16 combination; integer positions are INT64 in both."""
    return ", ".join("FP32|FP16" if f else "INT64|INT64" for f in float_positions)


_registered: set[str] = set()


def register_once(name: str, fn) -> None:
    """Register a plugin with TensorRT's registry at most once per process."""
    if name not in _registered:
        fn()
        _registered.add(name)


def aot_kernel(trt, trtp, plugin_id: str, kernel_module, q, scale: float, geometry, **compile_kwargs):
    """The ``aot_impl`` return value: compile ``kernel_module``'s Triton kernel for ``q``'s
    dtype and (static) head size, and launch it on ``geometry = (grid_x, grid_y, extras)``.
    ``compile_kwargs`` (plain Python values, e.g. ``causal=1``) go to the kernel module's
    ``compile`` as they are: the constexprs an attribute selects."""
    head_dim = q.shape_expr[3]
    if not head_dim.is_constant:  # a property
        raise ValueError(f"{plugin_id}: the head dimension must be static")
    dtype = "float16" if q.dtype == trt.float16 else "float32"
    kernel = kernel_module.compile(dtype, head_dim=int(head_dim.constant_value()), scale=attr_float(scale),
                                   arch=target_sm(), **compile_kwargs)
    grid_x, grid_y, extras = geometry
    params = trtp.KernelLaunchParams()
    params.grid_x, params.grid_y = grid_x, grid_y
    params.block_x = kernel.threads
    params.shared_mem = kernel.shared
    return (kernel.name.encode(), kernel.ptx.encode(), params,
            trtp.SymIntExprs.from_tuple([trtp.SymInt32(e) for e in extras]))
