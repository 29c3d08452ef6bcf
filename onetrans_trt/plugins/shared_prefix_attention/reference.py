"""The PyTorch reference: the model's own definition (``models/attention.py``)."""

from onetrans_trt.models.attention import shared_prefix_attention as reference  # noqa: F401
