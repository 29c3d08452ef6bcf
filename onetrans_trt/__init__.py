"""onetrans-trt: OneTrans / HyFormer rankers to fast, numerically trusted inference.

The package follows the pipeline: ``models`` (PyTorch reference models), ``data``
(feature schema, MovieLens-100K, requests), ``export`` (ONNX), ``graphs`` (graph passes),
``runtime`` (the Ranker and its backends), ``validate`` and ``bench``.
"""

__version__ = "0.1.0"

from onetrans_trt.errors import OneTransError  # noqa: E402,F401
