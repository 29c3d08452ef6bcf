"""``UserKV``: the only thing that crosses from the user side to the candidate side.

Kept free of torch so deployment code (ORT, goldens) can use it without PyTorch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class UserKV:
    """``keys[l]`` / ``values[l]``: ``[U, H, n_l, dh]`` (torch tensors or numpy arrays),
    left-padded; ``lengths``: ``[U]`` real S-tokens in the stream (clamped per layer to
    ``n_l``).

    ``extras``: any further per-user state the candidate side reads (HyFormer: each
    sequence's real length and mean-pooled tokens), named as the graph outputs
    ``user_<name>``; each is ``[U, ...]``.
    """

    keys: list[Any]
    values: list[Any]
    lengths: Any
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def n_layers(self) -> int:
        return len(self.keys)

    def nbytes(self) -> int:
        return int(sum(_nbytes(k) for k in [*self.keys, *self.values, *self.extras.values()]))


def _nbytes(t: Any) -> int:
    """Bytes of a numpy array, a torch tensor or an ONNX Runtime ``OrtValue`` (device state)."""
    if hasattr(t, "nbytes"):
        return int(t.nbytes)
    if hasattr(t, "tensor_size_in_bytes"):
        return int(t.tensor_size_in_bytes())
    return int(t.numel() * t.element_size())


def kv_names(n_slots: int) -> list[str]:
    """Graph names of the K/V: ``user_k_<i>``, ``user_v_<i>`` per slot (OneTrans: one slot
    per layer; HyFormer: ``layer * sequences + sequence``)."""
    return [name for i in range(n_slots) for name in (f"user_k_{i}", f"user_v_{i}")]


def state_arrays(kv: UserKV) -> dict[str, Any]:
    """The user state by graph name: the K/V, then ``user_<extra>`` for each extra."""
    out = dict(zip(kv_names(kv.n_layers), [t for pair in zip(kv.keys, kv.values) for t in pair]))
    out.update({f"user_{k}": v for k, v in kv.extras.items()})
    return out


def from_state(named: dict[str, Any], lengths: Any) -> UserKV:
    """Inverse of :func:`state_arrays` (``named`` may hold other entries too)."""
    n = sum(1 for k in named if k.startswith("user_k_"))
    kv_set = set(kv_names(n))
    extras = {k[len("user_"):]: v for k, v in named.items() if k.startswith("user_") and k not in kv_set}
    return UserKV([named[f"user_k_{i}"] for i in range(n)], [named[f"user_v_{i}"] for i in range(n)], lengths,
                  extras)
