"""``UserKV``: the only thing that crosses from the user side to the candidate side.

Kept free of torch so deployment code (ORT, goldens) can use it without PyTorch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class UserKV:
    """``keys[l]`` / ``values[l]``: ``[U, H, n_l, dh]`` (torch tensors or numpy arrays),
    left-padded; ``lengths``: ``[U]`` real S-tokens in the stream (clamped per layer to
    ``n_l``)."""

    keys: list[Any]
    values: list[Any]
    lengths: Any

    @property
    def n_layers(self) -> int:
        return len(self.keys)

    def nbytes(self) -> int:
        return int(sum(k.nbytes if hasattr(k, "nbytes") else k.numel() * k.element_size()
                       for k in [*self.keys, *self.values]))
