"""ONNX files of any size: one place that saves, loads, checks and opens them.

A protobuf message cannot exceed 2 GiB, and a production ranker's embedding tables do.
Every stage that writes a graph calls :func:`save_model` (or :func:`save_model_atomic` to
replace a graph in place): under :func:`threshold` bytes of weights the graph is one
self-contained file, above it every initializer of at least 1 KiB goes to ``<file>.data``
beside it (ONNX external data, one file, a plain relative location, offsets aligned to
4 KiB), the layout ONNX Runtime, ModelOpt, Polygraphy, trtexec and Triton all read when
given the path. Readers call :func:`load_model` (external data resolved against the file's
own directory, never the working directory, and confined to it) and
:func:`session_source` to hand ONNX Runtime either bytes or a path.

``ONETRANS_TRT_EXTERNAL_DATA_BYTES`` lowers the threshold (tests push small models through
the external-data path of every stage without writing gigabytes).

Memory: :func:`save_model` writes each large tensor's bytes straight to the data file and
serializes a skeleton of the graph that refers to them: one tensor's bytes at a time are
copied, never the whole model (``onnx.save_model(save_as_external_data=True)`` would need a
whole copy to leave the caller's model unchanged).
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from onetrans_trt import interrupts

THRESHOLD_ENV = "ONETRANS_TRT_EXTERNAL_DATA_BYTES"
PROTOBUF_LIMIT = 2 << 30
DEFAULT_THRESHOLD = 1536 << 20  # leave room under 2 GiB for the graph itself and the functions
MIN_EXTERNAL_TENSOR = 1024  # smaller tensors stay in the graph file (shapes, scalars, small biases)
ALIGN = 4096  # each tensor starts on a page: ONNX Runtime can map it without copying
ON_DISK_BYTES = 256 << 20  # load_model(on_disk_above=...) in export: tensors this large stay in their file
ON_DISK_KEY = "basepath"  # the external-data entry (one ONNX knows) naming a left-on-disk tensor's directory
_ON_DISK_MARK = f"onetrans-{secrets.token_hex(8)}:"  # per process: a graph file cannot forge a left-on-disk tensor


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


# ---------------------------------------------------------------- tensors of a model

def _graph_tensors(graph) -> Iterator:
    yield from graph.initializer
    for n in graph.node:
        yield from _node_tensors(n)


def _node_tensors(node) -> Iterator:
    from onnx import AttributeProto

    for a in node.attribute:
        if a.HasField("t"):
            yield a.t
        yield from a.tensors
        if a.type == AttributeProto.GRAPH:
            yield from _graph_tensors(a.g)
        for g in a.graphs:
            yield from _graph_tensors(g)


def all_tensors(model) -> Iterator:
    """Every TensorProto of ``model``: initializers, node attributes (Constant values),
    subgraphs (If/Loop bodies) and the nodes of model-local functions."""
    yield from _graph_tensors(model.graph)
    for f in model.functions:
        for n in f.node:
            yield from _node_tensors(n)


def external_info(tensor) -> dict[str, str]:
    """A tensor's external-data entries (``location``, ``offset``, ``length``...)."""
    return {e.key: e.value for e in tensor.external_data}


def is_external(tensor) -> bool:
    import onnx

    return tensor.data_location == onnx.TensorProto.EXTERNAL


def has_external(model) -> bool:
    """True when some tensor of ``model`` refers to external data (not loaded)."""
    return any(is_external(t) for t in all_tensors(model))


def weights_bytes(model) -> int:
    """The initializers' size in bytes: inline ones as serialized, external ones by their length."""
    n = 0
    for t in model.graph.initializer:
        if is_external(t):
            n += int(external_info(t).get("length", 0) or 0)
        else:
            n += t.ByteSize()  # no copy of raw_data (reading t.raw_data would copy it)
    return n


def needs_external(model) -> bool:
    """True when ``model`` must (or, by the threshold, should) keep its weights outside."""
    return weights_bytes(model) > threshold()


def _fits_one_protobuf(model) -> bool:
    return model.ByteSize() < PROTOBUF_LIMIT - (64 << 20)


# ---------------------------------------------------------------- saving

def _copy_fields(src, dst, skip: tuple[str, ...] = ()) -> None:
    """Copy every set field of ``src`` into ``dst`` except those named in ``skip``."""
    for fd, value in src.ListFields():
        if fd.name in skip:
            continue
        if fd.label == fd.LABEL_REPEATED:
            getattr(dst, fd.name).extend(value)
        elif fd.type == fd.TYPE_MESSAGE:
            getattr(dst, fd.name).CopyFrom(value)
        else:
            setattr(dst, fd.name, value)


def _on_disk_source(tensor) -> tuple[Path, int, int] | None:
    """``(file, offset, length)`` of a tensor :func:`load_model` left on disk, else None."""
    info = external_info(tensor)
    mark = info.get(ON_DISK_KEY, "")
    if not mark.startswith(_ON_DISK_MARK) or not is_external(tensor):
        return None
    return Path(mark[len(_ON_DISK_MARK):]) / info["location"], int(info.get("offset") or 0), int(info["length"])


def _copy_range(src: Path, offset: int, length: int, fh) -> None:
    with open(src, "rb") as f:
        f.seek(offset)
        left = length
        while left:
            chunk = f.read(min(left, 64 << 20))
            if not chunk:
                raise ValueError(f"{src}: shorter than the {offset}+{length} bytes a tensor names")
            fh.write(chunk)
            left -= len(chunk)


def _prepared(model, path: Path, external: bool):
    """A copy of ``model`` to serialize: with ``external``, its initializers of at least
    MIN_EXTERNAL_TENSOR bytes point at ``<path>.data`` (written here, under a temporary name
    that the caller renames); tensors left on disk by :func:`load_model` are copied from their
    file in chunks (into the data file, or inline without ``external``). The weights are never
    held twice (one tensor at a time is, while it is written); ``model`` is not changed."""
    import onnx

    side = data_file(path)
    out = onnx.ModelProto()
    _copy_fields(model, out, skip=("graph",))
    _copy_fields(model.graph, out.graph, skip=("initializer",))
    offset = 0
    fh = open(side.with_name(side.name + ".part"), "wb") if external else None
    try:
        for t in model.graph.initializer:
            nt = out.graph.initializer.add()
            source = _on_disk_source(t)
            if source is None and (not external or is_external(t) or not t.HasField("raw_data")
                                   or t.ByteSize() < MIN_EXTERNAL_TENSOR):
                nt.CopyFrom(t)
                continue
            _copy_fields(t, nt, skip=("raw_data", "external_data", "data_location"))
            if fh is None:  # a tensor left on disk, saved inline
                with open(source[0], "rb") as f:
                    f.seek(source[1])
                    nt.raw_data = f.read(source[2])
                continue
            pad = (-offset) % ALIGN
            if pad:
                fh.write(b"\0" * pad)
                offset += pad
            if source is not None:
                _copy_range(*source, fh)
                length = source[2]
            else:
                raw = t.raw_data  # one tensor's bytes, released after the write
                fh.write(raw)
                length = len(raw)
                del raw
            for key, value in (("location", side.name), ("offset", str(offset)), ("length", str(length))):
                e = nt.external_data.add()
                e.key, e.value = key, value
            nt.data_location = onnx.TensorProto.EXTERNAL
            offset += length
        if fh is not None:
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        if fh is not None:
            fh.close()
            Path(fh.name).unlink(missing_ok=True)
        raise
    if fh is not None:
        fh.close()
    return out


def save_model(model, path: str | os.PathLike, *, check: bool = True) -> list[Path]:
    """Write ``model`` to ``path`` (plus ``<name>.data`` when large); return the files written.

    The caller owns atomicity (write into an ``atomic_directory``, or use
    :func:`save_model_atomic`): the data file's location recorded in the graph is the final
    name. A stale data file from an earlier, larger save is removed. ``check`` runs the ONNX
    checker on the written file (by path, so external data is checked where it lies, never
    loaded). ``model`` is not changed, and its weights are never copied whole. Tensors that
    :func:`load_model` left on disk are copied from their file (after which, if that file was
    this ``path``'s own data file, the in-memory ``model`` no longer matches it: reload).
    Any other external reference is refused (load the model with :func:`load_model`).
    """
    import onnx

    path = Path(path)
    side = data_file(path)
    loose = [t.name for t in all_tensors(model) if is_external(t) and _on_disk_source(t) is None]
    if loose:
        raise ValueError(f"{path}: the model still refers to external data ({loose[0]!r}); load it with "
                         f"load_model() first")
    on_disk = any(_on_disk_source(t) is not None for t in model.graph.initializer)
    if needs_external(model):
        skeleton = _prepared(model, path, external=True)
        os.replace(side.with_name(side.name + ".part"), side)
        with open(path, "wb") as fh:
            fh.write(skeleton.SerializeToString())
            fh.flush()
            os.fsync(fh.fileno())
        del skeleton
        written = [path, side]
    else:
        onnx.save_model(_prepared(model, path, external=False) if on_disk else model, str(path))
        if side.exists() or side.is_symlink():
            side.unlink()
        written = [path]
    if check:
        onnx.checker.check_model(str(path))
    return written


def save_model_atomic(model, final: str | os.PathLike, *, check: bool = True) -> list[Path]:
    """:func:`save_model` over an existing graph: written in a temporary sibling directory,
    then renamed into place (the data file first, then the graph; a stale data file of the
    old graph is removed after). On an exception nothing at ``final`` changes."""
    from onetrans_trt.io import _fsync_dir

    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    interrupts.register(tmp)  # removed also if a Ctrl-C's unwinding is swallowed
    try:
        written = save_model(model, tmp / final.name, check=check)
        if len(written) == 2:
            os.replace(written[1], data_file(final))
        os.replace(written[0], final)
        if len(written) == 1 and data_file(final).exists():
            data_file(final).unlink()
        _fsync_dir(final.parent)
        return [final] + ([data_file(final)] if len(written) == 2 else [])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        interrupts.unregister(tmp)


# ---------------------------------------------------------------- reading

def load_model(path: str | os.PathLike, *, external: bool = True, on_disk_above: int | None = None):
    """Load ``path``; its external data (``external``) is read from the file's own directory
    (never the working directory), and ONNX's own loader refuses a location outside it.

    ``on_disk_above``: initializers of at least this many bytes are NOT read; they stay
    references to their file (recorded with its directory) that :func:`save_model`,
    :func:`session_source` and :func:`check_model` resolve. Graph passes and graphsurgeon
    carry them along untouched (graphsurgeon cannot even copy a tensor over 2 GiB in memory),
    and the weights never enter this process. A pass that reads such a tensor's values fails
    (it is not there): only an embedding table or a weight matrix is ever that large.
    """
    import onnx
    from onnx.external_data_helper import load_external_data_for_tensor

    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    if not external:
        return model
    base = str(path.parent)
    for t in all_tensors(model):
        if not is_external(t):
            continue
        if on_disk_above is not None and int(external_info(t).get("length") or 0) >= on_disk_above:
            from onnx.external_data_helper import _open_external_data_fd

            # confined like a load (ONNX's own check: relative, inside the directory, no symlink)
            os.close(_open_external_data_fd(base, external_info(t)["location"], t.name, True))
            e = t.external_data.add()
            e.key, e.value = ON_DISK_KEY, _ON_DISK_MARK + str(path.parent.resolve())
        else:
            load_external_data_for_tensor(t, base)
    return model


def on_disk(model) -> list[str]:
    """Names of the tensors :func:`load_model` left on disk."""
    return [t.name for t in model.graph.initializer if _on_disk_source(t) is not None]


def graph_files(path: str | os.PathLike) -> list[Path]:
    """The files a saved graph consists of: ``path`` and the data files its tensors name
    (relative to its directory, in first-use order)."""
    import onnx

    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    seen: list[Path] = []
    for t in all_tensors(model):
        if is_external(t):
            f = path.parent / external_info(t).get("location", "")
            if f not in seen:
                seen.append(f)
    return [path] + seen


def check_model(model) -> None:
    """The ONNX checker on an in-memory model of any size (large ones via a temporary file)."""
    import onnx

    if _fits_one_protobuf(model) and not has_external(model):  # (tensors left on disk are external)
        onnx.checker.check_model(model)
        return
    with interrupts.temporary_directory(prefix="onetrans-check-") as tmp:
        save_model(model, Path(tmp) / "model.onnx", check=True)


@contextmanager
def session_source(model) -> Iterator[bytes | str]:
    """What ``ort.InferenceSession`` should be given for an in-memory ``model``: its bytes
    when it fits in one protobuf and is under :func:`threshold`, else the path of a temporary
    copy with external data (removed on exit; create the session inside the ``with``)."""
    if _fits_one_protobuf(model) and not needs_external(model) and not has_external(model):
        yield model.SerializeToString()
        return
    with interrupts.temporary_directory(prefix="onetrans-session-") as tmp:
        path = Path(tmp) / "model.onnx"
        save_model(model, path, check=False)
        yield str(path)


def tensor_bytes(tensor) -> int:
    """A tensor's size from its dims and data type (no data read)."""
    import numpy as np
    import onnx

    n = 1
    for d in tensor.dims:
        n *= int(d)
    try:
        item = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
    except Exception:  # noqa: BLE001 - string or unknown types: count their stored bytes
        return len(tensor.raw_data)
    return n * item


def tensors_over(path: str | os.PathLike, limit: int = PROTOBUF_LIMIT) -> list[tuple[str, int]]:
    """``(name, bytes)`` of the tensors of the graph at ``path`` holding ``limit`` bytes or more,
    read from the graph alone (external data is not loaded)."""
    model = load_model(path, external=False)
    return [(t.name, tensor_bytes(t)) for t in all_tensors(model) if tensor_bytes(t) >= limit]


def refuse_tensors_over_2gib(paths, command: str) -> None:
    """Stages that still carry whole graphs through onnx-graphsurgeon (``convert``,
    ``calibrate``) cannot hold one tensor of 2 GiB or more: say so before any work."""
    from onetrans_trt.errors import MissingCapabilityError

    for path in paths:
        big = tensors_over(path)
        if big:
            name, size = max(big, key=lambda x: x[1])
            raise MissingCapabilityError(
                f"{path}: tensor {name!r} holds {size / 2**30:.2f} GiB; `{command}` handles tensors under 2 GiB "
                "only (export, validate, serve-repo and build handle any size): shard that table into "
                "several smaller ones")
