"""Serving in a real Triton Inference Server.

Above :mod:`onetrans_trt.runtime` in the layering (lower stages never import this package):

- :mod:`~onetrans_trt.serving.server`: locate (or install from the ``nvidia-pytriton`` wheel)
  the bundled ``tritonserver``, start it on loopback ports on a model repository, wait for
  readiness, always stop it (a context manager; bounded waits; no leftover process).
- :mod:`~onetrans_trt.serving.repository`: ``serve-repo --backend python``, a repository of
  Python-backend models that run the build's ONNX graphs with ONNX Runtime, plus the
  ``preprocess`` model and ``rank`` ensemble that take the raw request JSON.
- :mod:`~onetrans_trt.serving.python_models`: the code those models run inside Triton's
  Python backend stub.
"""
