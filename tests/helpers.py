"""Helpers shared by tests."""

from __future__ import annotations

import zlib

import numpy as np


def stable_seed(*parts, modulo: int = 2**31 - 1) -> int:
    """A seed from the parameters that is the same in every process and on every run.

    Python's ``hash()`` of a string is salted per process (PYTHONHASHSEED), so a seed taken
    from it cannot be replayed; CRC-32 of the parameters' ``repr`` can. Put the seed in the
    failure message so a failing case can be rerun.
    """
    return zlib.crc32(repr(parts).encode("utf-8")) % modulo


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
