"""Helpers shared by tests."""

from __future__ import annotations

import functools
import zlib

import numpy as np


def stable_seed(*parts, modulo: int = 2**31 - 1) -> int:
    """A seed from the parameters that is the same in every process and on every run.

    Python's ``hash()`` of a string is salted per process (PYTHONHASHSEED), so a seed taken
    from it cannot be replayed; CRC-32 of the parameters' ``repr`` can. Put the seed in the
    failure message so a failing case can be rerun.
    """
    return zlib.crc32(repr(parts).encode("utf-8")) % modulo


@functools.lru_cache(maxsize=None)
def trt_gpu_missing() -> str | None:
    """What stops a TensorRT engine build here, or None where one can run: the one
    capability probe for tests that split on it. Independent of the code under test (it does
    not call the build's own checks), it asks what the build needs: ``tensorrt`` and
    ``tensorrt.plugin`` importable (placeholder wheels raise at import), and a CUDA GPU.
    The answer starts with ``tensorrt:`` or ``gpu:``."""
    try:
        import tensorrt  # noqa: F401
        import tensorrt.plugin  # noqa: F401
    except Exception as e:  # noqa: BLE001
        return f"tensorrt: not importable ({type(e).__name__}); the 'trt' extra needs NVIDIA's index and a GPU host"
    try:
        import torch

        if torch.cuda.is_available():
            return None
    except Exception:  # noqa: BLE001
        pass
    return "gpu: no CUDA GPU visible"


def randomize(model: torch.nn.Module, seed: int = 0, std: float = 0.25) -> torch.nn.Module:
    """Random weights far from init (norm gains around 1), so masks and merges matter."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            base = 1.0 if "norm" in name and name.endswith("weight") else 0.0
            p.copy_(base + std * torch.randn(p.shape, generator=gen))
    return model.eval()


def ort_run(model_or_path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnx
    import onnxruntime as ort

    data = model_or_path.SerializeToString() if isinstance(model_or_path, onnx.ModelProto) else str(model_or_path)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(data, sess_options=opts, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    return sess.run(None, {n: feeds[n] for n in names})
