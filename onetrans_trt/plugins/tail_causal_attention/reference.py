"""The PyTorch reference: the model's own definition (``models/attention.py``)."""

from onetrans_trt.models.attention import tail_causal_attention as reference  # noqa: F401
