"""Checkpoints: ``config.json`` + ``model.safetensors`` (+ ``metrics.json``).

Loading never unpickles: safetensors is a JSON header plus raw little-endian bytes. The
header is checked before any tensor is read (size bounds, names, shapes and dtypes must
match what the config builds), so a truncated, corrupted or mismatched checkpoint fails
with a one-line :class:`~onetrans_trt.errors.CheckpointError` that names the problem.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any

import torch
from torch import nn

from onetrans_trt.errors import CheckpointError, ConfigError
from onetrans_trt.io import atomic_directory
from onetrans_trt.models.config import ModelConfig, read_config  # noqa: F401

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
METRICS = "metrics.json"
MAX_HEADER_BYTES = 100 * 1024 * 1024
_DTYPES = {"F32": torch.float32}


def build_model(cfg: ModelConfig) -> nn.Module:
    if cfg.family == "onetrans":
        from onetrans_trt.models.onetrans import OneTrans

        return OneTrans(cfg)
    if cfg.family == "hyformer":
        from onetrans_trt.models.hyformer import HyFormer

        return HyFormer(cfg)
    if cfg.family == "baseline":
        from onetrans_trt.models.baseline import Baseline

        return Baseline(cfg)
    raise ConfigError(f"unknown model family {cfg.family!r}")


def save_checkpoint(model: nn.Module, out_dir: str | Path, *, metrics: dict | None = None,
                    force: bool = False) -> Path:
    """Write the checkpoint directory atomically (built aside, then renamed in place)."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    if out_dir.exists() and not force:
        raise CheckpointError(f"{out_dir} already exists; pass --force to replace it")
    state = {k: v.detach().contiguous().float() for k, v in model.state_dict().items()}
    with atomic_directory(out_dir, force=force) as tmp:
        (tmp / CONFIG).write_text(json.dumps(model.cfg.to_dict(), indent=2) + "\n")
        save_file(state, str(tmp / WEIGHTS), metadata={"format": "onetrans-trt/1"})
        if metrics is not None:
            (tmp / METRICS).write_text(json.dumps(metrics, indent=2) + "\n")
    return out_dir


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """Parse and bounds-check a safetensors header without reading tensors."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: truncated (no safetensors header)")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, MAX_HEADER_BYTES):
            raise CheckpointError(f"{path}: not a safetensors file (header length {n} "
                                  f"does not fit in a {size}-byte file); pickled .pt files are refused")
        try:
            header = json.loads(fh.read(n).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise CheckpointError(f"{path}: corrupt safetensors header") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header")
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            if not isinstance(info, dict) or not isinstance(info["dtype"], str) or \
                    not all(isinstance(x, int) and not isinstance(x, bool) for x in [*info["data_offsets"], *info["shape"]]):
                raise TypeError
            start, stop = (int(x) for x in info["data_offsets"])
            dtype, shape = info["dtype"], [int(s) for s in info["shape"]]
            if any(x < 0 for x in shape):
                raise ValueError
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt entry for tensor {str(name)[:60]!r}") from None
        if dtype not in _DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has dtype {dtype}; only float32 is allowed")
        numel = 1
        for s in shape:
            numel *= s
        if stop - start != numel * 4 or start < 0:
            raise CheckpointError(f"{path}: tensor {name!r} byte range does not match its shape")
        end = max(end, stop)
    if 8 + n + end > size:
        raise CheckpointError(f"{path}: truncated ({size} bytes, header promises {8 + n + end})")
    return header


def load_checkpoint(ckpt_dir: str | Path) -> nn.Module:
    """Load a checkpoint directory into an eval-mode model."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    ckpt_dir = Path(ckpt_dir)
    cfg = read_config(ckpt_dir)
    wpath = ckpt_dir / WEIGHTS
    if not wpath.is_file():
        raise CheckpointError(f"{ckpt_dir}: missing {WEIGHTS}")
    header = read_safetensors_header(wpath)
    # shapes first, on the meta device (no memory): a config implying more parameters than
    # the weights file holds is refused before anything is allocated
    try:
        with torch.device("meta"):
            shell = build_model(cfg)
    except ConfigError as e:
        raise CheckpointError(f"{ckpt_dir}: {e}") from None
    except (TypeError, ValueError, RuntimeError, OverflowError, IndexError, KeyError) as e:
        raise CheckpointError(f"{ckpt_dir}: config.json does not describe a buildable model "
                              f"({type(e).__name__}: {str(e)[:120]})") from None
    expected = {k: tuple(v.shape) for k, v in shell.state_dict().items()}
    found = {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}
    missing, extra = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    if missing or extra:
        raise CheckpointError(f"{wpath}: weights do not match config.json "
                              f"(missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
                              f"unexpected {extra[:3]}{'...' if len(extra) > 3 else ''})")
    for k, shape in expected.items():
        if found[k] != shape:
            raise CheckpointError(f"{wpath}: tensor {k!r} has shape {list(found[k])}, "
                                  f"config.json implies {list(shape)}")
    try:
        state = load_file(str(wpath))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{wpath}: cannot read weights ({e})") from None
    bad = [k for k, v in state.items() if not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"{wpath}: tensor {bad[0]!r} has NaN/Inf values")
    model = build_model(cfg)  # the shapes matched the weights above, so its size is bounded
    model.load_state_dict(state)
    return model.eval()


def checkpoint_hash(ckpt_dir: str | Path) -> str:
    """sha256 over config.json and model.safetensors (identifies a checkpoint in manifests)."""
    h = hashlib.sha256()
    for name in (CONFIG, WEIGHTS):
        with open(Path(ckpt_dir) / name, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def read_metrics(ckpt_dir: str | Path) -> dict | None:
    p = Path(ckpt_dir) / METRICS
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError:
        return None
