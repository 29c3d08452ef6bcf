"""Two rankers that break the split protocol, for the refusal tests. Do not export these.

- ``leaky_factory()``: fused_qkv_cls.py with one change in the UNIFIED forward: the S-tokens
  may attend the NS and CLS tokens (a non-causal mask). Its ``encode_user`` still computes the
  state from the user's inputs alone, so the split no longer equals the unified forward, and
  the state the unified forward computes for layers >= 1 (``k1``, ``v1``) differs from one
  candidate row to the next (layer 0's K/V come straight from the embeddings and do not).
- ``interacting_factory()``: fused_qkv_cls.py whose head subtracts the mean over the batch of
  the CLS state before the task layers (a "batch centering" left in a serving path). Both the
  unified forward and ``score_candidates`` do it over the rows they are given, so for one user
  split == unified and the user state is clean: only the independence check catches it
  (changing candidate j moves candidate i's score).

``SPEC`` / ``LEAKY_SPEC`` / ``INTERACTING_SPEC``: the fused_qkv_cls spec under other names.
"""

from __future__ import annotations

import copy
import importlib.util
import sys
from pathlib import Path

from torch import Tensor, nn


def _sibling(name: str):
    """Load examples/<name>.py by path (examples/ is not a package)."""
    key = f"_onetrans_examples_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, Path(__file__).with_name(f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        spec.loader.exec_module(module)
    return sys.modules[key]


_base = _sibling("fused_qkv_cls")
example_inputs = _base.example_inputs

LEAKY_SPEC: dict = {**copy.deepcopy(_base.SPEC), "name": "leaky-fused-qkv-cls"}
INTERACTING_SPEC: dict = {**copy.deepcopy(_base.SPEC), "name": "interacting-fused-qkv-cls"}
SPEC = LEAKY_SPEC


class LeakyRanker(_base.FusedQKVRanker):
    def full_mask(self, n: int, t: int, n_real: Tensor) -> Tensor:
        mask = super().full_mask(n, t, n_real).clone()
        mask[:, :, :n, n:] = True  # S-tokens see the NS and CLS tokens: the user side reads the candidate
        return mask


class _CenteredHead(nn.Module):
    """The task layers applied to the CLS state minus its mean over the batch's rows."""

    def __init__(self, head: nn.Module):
        super().__init__()
        self.head = head

    def forward(self, cls_state: Tensor) -> Tensor:
        return self.head(cls_state - cls_state.mean(dim=0, keepdim=True))


def leaky_factory() -> nn.Module:
    model = LeakyRanker()
    model.load_state_dict(_base.factory().state_dict())  # the good model's weights
    return model.eval()


def interacting_factory() -> nn.Module:
    model = _base.factory()  # the good model's weights, then the centering head around its head
    model.head = _CenteredHead(model.head)
    return model.eval()


factory = leaky_factory


if __name__ == "__main__":  # python examples/bad_models.py: rewrites the two spec files next to this one
    import json

    for stem, spec in (("leaky", LEAKY_SPEC), ("interacting", INTERACTING_SPEC)):
        Path(__file__).with_name(f"bad_models.{stem}.spec.json").write_text(json.dumps(spec, indent=2) + "\n")
