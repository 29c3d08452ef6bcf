"""Precision variants of a build, all in the ONNX graph (TensorRT 11 builds are strongly
typed): FP16 casts (``fp16.py``), INT8 Q/DQ from real calibration data (``int8.py``), and
their ranking-quality report against the float32 PyTorch model (``quality.py``)."""
