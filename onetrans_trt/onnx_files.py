"""ONNX files of any size: one place that saves, loads, checks and opens them.

A protobuf message cannot exceed 2 GiB, and a production ranker's embedding tables do.
Every stage that writes a graph calls :func:`save_model`: under :data:`threshold()` bytes
the graph is one self-contained file, above it the weights go to ``<file>.data`` beside it
(ONNX external data, one file, relative location), the layout ONNX Runtime, ModelOpt,
Polygraphy, trtexec and Triton all read when given the path. Readers call
:func:`load_model` (external data resolved against the file's own directory, never the
working directory) and :func:`session_source` to hand ONNX Runtime either bytes or a path.

``ONETRANS_TRT_EXTERNAL_DATA_BYTES`` lowers the threshold (tests push small models through
the external-data path of every stage without writing gigabytes).
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

THRESHOLD_ENV = "ONETRANS_TRT_EXTERNAL_DATA_BYTES"
PROTOBUF_LIMIT = 2 << 30
DEFAULT_THRESHOLD = 1536 << 20  # leave room under 2 GiB for the graph itself and the functions


def threshold() -> int:
    """Bytes above which a model's weights go to external data."""
    raw = os.environ.get(THRESHOLD_ENV)
    if raw is None or raw == "":
        return DEFAULT_THRESHOLD
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"${THRESHOLD_ENV}={raw!r}: give a byte count (an integer)") from None
    if value < 0:
        raise ValueError(f"${THRESHOLD_ENV}={raw!r}: give a byte count >= 0")
    return min(value, DEFAULT_THRESHOLD)


def data_file(path: str | os.PathLike) -> Path:
    """The external-data file that belongs to ``path``: ``<name>.data`` beside it."""
    path = Path(path)
    return path.with_name(path.name + ".data")


def _weights_bytes(model) -> int:
    n = 0
    for t in model.graph.initializer:
        n += len(t.raw_data) or t.ByteSize()
    return n


def needs_external(model) -> bool:
    """True when ``model`` must (or, by the threshold, should) keep its weights outside."""
    return _weights_bytes(model) > threshold()


def save_model(model, path: str | os.PathLike, *, check: bool = True) -> list[Path]:
    """Write ``model`` to ``path`` (plus ``<name>.data`` when large); return the files written.

    The caller owns atomicity (write into an ``atomic_directory`` or an ``atomic_path``
    directory): the data file's location recorded in the graph is the final name. A stale
    data file from an earlier, larger save is removed. ``check`` runs the ONNX checker on
    the written file (by path, so external data is read where it lies). The in-memory
    ``model`` is not changed.
    """
    import onnx

    path = Path(path)
    side = data_file(path)
    if needs_external(model):
        copy = onnx.ModelProto()
        copy.CopyFrom(model)  # convert_model_to_external_data rewrites the tensors in place
        if side.exists():
            side.unlink()
        onnx.save_model(copy, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=side.name, size_threshold=1024, convert_attribute=False)
        written = [path, side]
    else:
        if side.exists():
            side.unlink()
        onnx.save_model(model, str(path))
        written = [path]
    if check:
        onnx.checker.check_model(str(path))
    return written


def load_model(path: str | os.PathLike, *, external: bool = True):
    """Load ``path`` with its external data read from the file's own directory."""
    import onnx

    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    if external and has_external(model):
        from onnx.external_data_helper import load_external_data_for_model

        load_external_data_for_model(model, str(path.parent))
    return model


def has_external(model) -> bool:
    import onnx

    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)


def check_model(model) -> None:
    """The ONNX checker on an in-memory model of any size (large ones via a temporary file)."""
    import onnx

    if model.ByteSize() < PROTOBUF_LIMIT - (64 << 20) and not has_external(model):
        onnx.checker.check_model(model)
        return
    with tempfile.TemporaryDirectory(prefix="onetrans-check-") as tmp:
        save_model(model, Path(tmp) / "model.onnx", check=True)


@contextmanager
def session_source(model) -> Iterator[bytes | str]:
    """What ``ort.InferenceSession`` should be given for an in-memory ``model``: its bytes
    when it fits in one protobuf, else the path of a temporary copy with external data."""
    if model.ByteSize() < PROTOBUF_LIMIT - (64 << 20) and not has_external(model):
        yield model.SerializeToString()
        return
    with tempfile.TemporaryDirectory(prefix="onetrans-session-") as tmp:
        path = Path(tmp) / "model.onnx"
        save_model(model, path, check=False)
        yield str(path)
