"""The PyTorch reference: the model's own definition (``models/attention.py``)."""

from onetrans_trt.models.attention import shared_decode_attention as reference  # noqa: F401
