"""The PyTorch reference: the model's own definitions (``models/attention.py``)."""

from torch import Tensor

from onetrans_trt.models.attention import bidirectional_attention, tail_causal_attention


def reference(q: Tensor, k: Tensor, v: Tensor, valid: Tensor, causal: int = 1) -> Tensor:
    """TailCausalAttention: ``causal=1`` bottom-right causal, ``causal=0`` bidirectional."""
    if int(causal) not in (0, 1):
        raise ValueError(f"causal must be 0 or 1, got {causal!r}")
    return (tail_causal_attention if int(causal) else bidirectional_attention)(q, k, v, valid)
