"""Backends: interchangeable engines behind the Ranker.

A split backend has ``encode_user(history) -> UserKV`` and ``score(user_kv, ns) ->
logits [C, tasks]``; a unified backend (the naive path) has ``score_unified(history, ns)``
which runs the whole model once per candidate. Inputs and outputs are numpy arrays.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import nn

from onetrans_trt.data.requests import repeat_history
from onetrans_trt.errors import InputError
from onetrans_trt.kv import UserKV


def _torch(batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in batch.items()}


class TorchUnifiedBackend:
    """The naive path: the full model, history repeated for every candidate."""

    name = "torch-unified"
    split = False

    def __init__(self, model: nn.Module):
        self.model = model.eval()

    @torch.no_grad()
    def score_unified(self, hist: dict[str, np.ndarray], ns: dict[str, np.ndarray]) -> np.ndarray:
        c = next(iter(ns.values())).shape[0]
        return self.model(_torch({**repeat_history(hist, c), **ns})).numpy()


class TorchSplitBackend:
    """Eager PyTorch: the user encoder once, then the candidate scorer."""

    name = "torch-split"
    split = True

    def __init__(self, model: nn.Module):
        if not hasattr(model, "encode_user"):
            raise InputError(f"backend 'torch-split' needs a model with a user/candidate split; "
                             f"'{model.cfg.family}' has none (use 'torch-unified')")
        self.model = model.eval()

    @torch.no_grad()
    def encode_user(self, hist: dict[str, np.ndarray]) -> UserKV:
        kv = self.model.encode_user(_torch(hist))
        return UserKV([k.numpy() for k in kv.keys], [v.numpy() for v in kv.values], kv.lengths.numpy(),
                      {k: v.numpy() for k, v in kv.extras.items()})

    @torch.no_grad()
    def score(self, kv: UserKV, ns: dict[str, np.ndarray]) -> np.ndarray:
        tkv = UserKV([torch.from_numpy(k) for k in kv.keys], [torch.from_numpy(v) for v in kv.values],
                     torch.from_numpy(np.asarray(kv.lengths)), {k: torch.from_numpy(np.asarray(v))
                                                                for k, v in kv.extras.items()})
        return self.model.score_candidates(tkv, _torch(ns)).numpy()


TORCH_BACKENDS: dict[str, Callable[[nn.Module], object]] = {
    "torch-unified": TorchUnifiedBackend,
    "torch-split": TorchSplitBackend,
}
