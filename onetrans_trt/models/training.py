"""Training and evaluation on MovieLens-100K (or any source with ``batch(split, idx)``)."""

from __future__ import annotations

import contextlib
import math
import time
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from onetrans_trt.models.checkpoint import build_model
from onetrans_trt.models.config import ModelConfig


def to_torch(batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in batch.items()}


def binary_metrics(labels: np.ndarray, logits: np.ndarray, tasks: list[str]) -> dict[str, dict[str, float]]:
    """AUC and logloss per task (scikit-learn)."""
    from sklearn.metrics import log_loss, roc_auc_score

    out = {}
    probs = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
    for i, t in enumerate(tasks):
        y = labels[:, i]
        auc = float(roc_auc_score(y, probs[:, i])) if 0 < y.sum() < len(y) else float("nan")
        ll = float(log_loss(y, np.clip(probs[:, i], 1e-7, 1 - 1e-7), labels=[0, 1]))
        out[t] = {"auc": auc, "logloss": ll}
    return out


@torch.no_grad()
def predict(model: nn.Module, source: Any, split: Any, batch_size: int = 1024) -> np.ndarray:
    model.eval()
    outs = []
    for start in range(0, len(split), batch_size):
        idx = np.arange(start, min(start + batch_size, len(split)))
        outs.append(model(to_torch(source.batch(split, idx))).numpy())
    return np.concatenate(outs) if outs else np.zeros((0, len(model.cfg.tasks)), np.float32)


def evaluate(model: nn.Module, source: Any, split: Any, batch_size: int = 1024) -> dict[str, dict[str, float]]:
    return binary_metrics(split.labels, predict(model, source, split, batch_size), model.cfg.tasks)


def train_model(cfg: ModelConfig, source: Any, *, epochs: int = 2, batch_size: int = 256,
                lr: float = 2e-3, weight_decay: float = 1e-5, seed: int = 0,
                progress: Callable[[int, int, float], None] | None = None) -> tuple[nn.Module, dict]:
    """Train with AdamW on the summed per-task BCE; returns the model and its metrics.

    ``progress(step, total_steps, loss)`` is called after every step.
    """
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = build_model(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    n = len(source.train)
    steps_per_epoch = math.ceil(n / batch_size)
    total = epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(total, 1), pct_start=0.1)
    loss_fn = nn.BCEWithLogitsLoss()
    step, t0 = 0, time.time()
    for _ in range(epochs):
        model.train()
        perm = rng.permutation(n)
        for start in range(0, n, batch_size):
            idx = perm[start:start + batch_size]
            batch = to_torch(source.batch(source.train, idx))
            y = torch.from_numpy(source.train.labels[idx])
            loss = loss_fn(model(batch), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            step += 1
            if progress is not None:
                progress(step, total, float(loss.detach()))
    model.eval()
    metrics = {
        "model": cfg.family, "preset": cfg.preset, "seed": seed, "epochs": epochs,
        "batch_size": batch_size, "lr": lr, "train_seconds": round(time.time() - t0, 1),
        "n_train": n, "n_test": len(source.test),
        "test": evaluate(model, source, source.test),
        "parameters": int(sum(p.numel() for p in model.parameters())),
    }
    return model, metrics


@contextlib.contextmanager
def torch_threads(n: int | None):
    """Temporarily set torch's intra-op thread count."""
    if n is None:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)
