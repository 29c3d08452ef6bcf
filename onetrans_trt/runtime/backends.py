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


class TorchCompileBackend(TorchSplitBackend):
    """The same split through ``torch.compile`` (inductor, CPU or GPU): what a PyTorch user
    would try first, so ``bench`` measures us against it. ``dynamic=True`` (``torch-compile``)
    compiles once for every C and L, as a server needs; ``dynamic=False``
    (``torch-compile-static``) specialises to each shape it meets (a recompile per new C or L,
    up to torch's recompile limit). Each graph compiles on its first call."""

    name = "torch-compile"

    def __init__(self, model: nn.Module, dynamic: bool = True):
        super().__init__(model)
        self.dynamic = dynamic
        self.name = "torch-compile" if dynamic else "torch-compile-static"
        m = self.model

        def encode(hist):
            kv = m.encode_user(hist)
            return kv.keys, kv.values, kv.lengths, kv.extras

        def score(keys, values, lengths, extras, ns):
            return m.score_candidates(UserKV(keys, values, lengths, extras), ns)

        self._encode = torch.compile(encode, dynamic=dynamic)
        self._score = torch.compile(score, dynamic=dynamic)

    @torch.no_grad()
    def encode_user(self, hist: dict[str, np.ndarray]) -> UserKV:
        keys, values, lengths, extras = self._encode(_torch(hist))
        return UserKV([k.numpy() for k in keys], [v.numpy() for v in values], lengths.numpy(),
                      {k: v.numpy() for k, v in extras.items()})

    @torch.no_grad()
    def score(self, kv: UserKV, ns: dict[str, np.ndarray]) -> np.ndarray:
        return self._score([torch.from_numpy(k) for k in kv.keys], [torch.from_numpy(v) for v in kv.values],
                           torch.from_numpy(np.asarray(kv.lengths)),
                           {k: torch.from_numpy(np.asarray(v)) for k, v in kv.extras.items()}, _torch(ns)).numpy()


TORCH_BACKENDS: dict[str, Callable[[nn.Module], object]] = {
    "torch-unified": TorchUnifiedBackend,
    "torch-split": TorchSplitBackend,
    "torch-compile": TorchCompileBackend,
    "torch-compile-static": lambda model: TorchCompileBackend(model, dynamic=False),
}
