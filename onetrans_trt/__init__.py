"""onetrans-trt: OneTrans / HyFormer rankers to fast, numerically trusted inference.

The package follows the pipeline: ``models`` (PyTorch reference models), ``data``
(feature schema, MovieLens-100K, requests), ``export`` (ONNX), ``graphs`` (graph passes),
``runtime`` (the Ranker and its backends), ``validate`` and ``bench``.

The public Python API is the names in ``__all__``, importable from here::

    from onetrans_trt import Ranker, UserKVCache

    ranker = Ranker.load("builds/tiny", cache=UserKVCache(64 << 20))   # a build: ONNX Runtime
    result = ranker.rank(request)              # a request dict (README, "rank") or a Request
    result.scores["like"]                      # probabilities, one per candidate

- :class:`Ranker` -- requests in, per-task scores out; ``Ranker.load(path, backend=None)``
  takes a checkpoint directory (PyTorch backends) or a build directory (ONNX Runtime /
  TensorRT backends) and picks a backend that works for it when none is given.
- :class:`RankResult` -- what ``Ranker.rank`` returns (``scores``, ``logits``, ``to_json()``).
- :class:`UserKVCache` -- users' K/V shared across requests, LRU bounded in bytes.
- :class:`LocalStore`, :class:`RedisStore`, :func:`store_from_url` -- users' states in a store
  (``Ranker.load(path, store="redis://host:6379/0")``): in-process, or shared by processes.
- :class:`Request`, :class:`RequestLimits` -- a parsed serving request; what one may hold.
- :func:`load_checkpoint` -- a checkpoint directory as an eval-mode PyTorch model.
- :func:`export_build` -- checkpoint -> build directory (``onetrans-trt export``).
- :func:`validate_build` -- every backend of a build against PyTorch (``onetrans-trt validate``).
- the errors: :class:`OneTransError` and its subclasses (``onetrans_trt.errors``).

``export_build`` and ``validate_build`` keep their ``_build`` suffix because ``export`` and
``validate`` are this package's subpackages (an attribute of that name would be replaced by
the module as soon as the subpackage is imported).

Names load lazily (PEP 562): ``import onetrans_trt`` imports neither torch nor ONNX Runtime,
so hosts without torch (validating against goldens) can import the package.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

from onetrans_trt.errors import (  # noqa: E402,F401
    BuildError,
    CheckpointError,
    InputError,
    MissingCapabilityError,
    OneTransError,
    RequestError,
    ValidationFailed,
)

# public name -> (module, attribute); loaded on first access
_LAZY: dict[str, tuple[str, str]] = {
    "Ranker": ("onetrans_trt.runtime.ranker", "Ranker"),
    "RankResult": ("onetrans_trt.runtime.ranker", "RankResult"),
    "UserKVCache": ("onetrans_trt.runtime.cache", "UserKVCache"),
    "LocalStore": ("onetrans_trt.runtime.store", "LocalStore"),
    "RedisStore": ("onetrans_trt.runtime.store", "RedisStore"),
    "store_from_url": ("onetrans_trt.runtime.store", "store_from_url"),
    "Request": ("onetrans_trt.data.requests", "Request"),
    "RequestLimits": ("onetrans_trt.data.requests", "RequestLimits"),
    "load_checkpoint": ("onetrans_trt.models.checkpoint", "load_checkpoint"),
    "export_build": ("onetrans_trt.export.api", "export_build"),
    "validate_build": ("onetrans_trt.validate.api", "validate_build"),
}

__all__ = [
    "Ranker", "RankResult", "UserKVCache", "LocalStore", "RedisStore", "store_from_url", "Request", "RequestLimits",
    "load_checkpoint", "export_build", "validate_build",
    "OneTransError", "InputError", "CheckpointError", "RequestError", "BuildError",
    "MissingCapabilityError", "ValidationFailed", "__version__",
]

if TYPE_CHECKING:  # for type checkers and IDEs; at run time these load lazily
    from onetrans_trt.data.requests import Request, RequestLimits
    from onetrans_trt.export.api import export_build
    from onetrans_trt.models.checkpoint import load_checkpoint
    from onetrans_trt.runtime.cache import UserKVCache
    from onetrans_trt.runtime.ranker import Ranker, RankResult
    from onetrans_trt.validate.api import validate_build


def __getattr__(name: str) -> Any:
    try:
        module, attr = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'onetrans_trt' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
