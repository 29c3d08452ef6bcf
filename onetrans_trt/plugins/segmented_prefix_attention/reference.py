"""The PyTorch reference: the model's own definition (``models/attention.py``)."""

from onetrans_trt.models.attention import segmented_prefix_attention as reference  # noqa: F401
