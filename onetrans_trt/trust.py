"""Artifacts coming in: checks before anything in them is used.

- :func:`check_onnx`: an ONNX file of a build: a regular file inside the build directory
  (no symlink out of it), at most ``MAX_ONNX_BYTES`` (the graph file; its external data,
  ``<file>.data``, may be larger), parsed without loading external data, every
  external-data location a relative path confined to the graph's own directory (no
  absolute path, no ``..`` out, no symbolic link out) naming a regular file that holds the
  tensor's byte range, opsets and domains ones we produce, and ``onnx.checker`` passing on
  the file (by path: external data is checked beside the graph, whatever the working
  directory, and never loaded). Only then does ONNX Runtime see it.
- :func:`check_manifest`: ``manifest.json`` against its schema (required keys and types;
  unknown keys are reported, not ignored).

Each failure is a :class:`~onetrans_trt.errors.BuildError` naming the file and what to do.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from onetrans_trt.errors import BuildError

MAX_ONNX_BYTES = 2 << 30  # protobuf's own limit, for the graph file; its external data may be larger
SUPPORTED_DOMAINS = {"": (18, 23), "ai.onnx": (18, 23), "onetrans": (1, 1)}


def _inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
        return True
    except ValueError:
        return False


def _check_external(path: Path, model) -> None:
    """Every tensor's external data: a relative location inside the graph's own directory
    (symbolic links resolved), a regular file holding the byte range the tensor names."""
    from onetrans_trt.onnx_files import all_tensors, external_info, is_external

    sizes: dict[Path, int] = {}
    for t in all_tensors(model):
        if not is_external(t):
            continue
        info = external_info(t)
        where = info.get("location", "")
        target = path.parent / where
        if not where or os.path.isabs(where) or not _inside(target, path.parent):
            raise BuildError(f"{path}: tensor {t.name!r} points its external data at {where!r}, outside "
                             f"{path.parent}; refusing to load it")
        if target not in sizes:
            if not target.is_file():
                raise BuildError(f"{path}: tensor {t.name!r} points its external data at {where!r}, which is "
                                 f"missing or not a regular file; re-export it")
            sizes[target] = target.stat().st_size
        try:
            offset, length = int(info.get("offset") or 0), int(info["length"]) if "length" in info else None
        except ValueError:
            raise BuildError(f"{path}: tensor {t.name!r} has a malformed external data offset or length; "
                             f"re-export it") from None
        end = sizes[target] if length is None else offset + length
        if offset < 0 or end < offset or end > sizes[target]:
            raise BuildError(f"{path}: tensor {t.name!r} needs bytes {offset}..{end} of {where!r}, which has "
                             f"{sizes[target]}; re-export it")


def check_onnx(path: str | os.PathLike, root: str | os.PathLike | None = None):
    """Check ``path`` (see the module docstring) and return the parsed ``ModelProto``
    (without external data); ``root`` is the directory it must stay inside (default: its
    own directory)."""
    import onnx

    path = Path(path)
    root = Path(root) if root is not None else path.parent
    if path.is_symlink() and not _inside(path, root):
        raise BuildError(f"{path}: a symbolic link out of {root}; refusing to load it")
    if not path.is_file():
        raise BuildError(f"{path}: missing or not a regular file; re-run `onetrans-trt export`")
    size = path.stat().st_size
    if size > MAX_ONNX_BYTES:
        raise BuildError(f"{path}: {size} bytes is over the {MAX_ONNX_BYTES} byte limit")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - protobuf raises several untyped errors
        raise BuildError(f"{path}: not a readable ONNX model ({type(e).__name__}); re-export it") from None
    _check_external(path, model)
    for op in model.opset_import:
        rng = SUPPORTED_DOMAINS.get(op.domain)
        if rng is None:
            raise BuildError(f"{path}: operator domain {op.domain!r} is not one this toolkit produces "
                             f"({sorted(d for d in SUPPORTED_DOMAINS if d)} and the default)")
        if not rng[0] <= op.version <= rng[1]:
            raise BuildError(f"{path}: opset {op.version} of domain {op.domain or 'ai.onnx'!r} is outside "
                             f"the supported {rng[0]}..{rng[1]}")
    known = {"", "ai.onnx"} | {f.domain for f in model.functions}
    for node in model.graph.node:
        if node.domain not in known and node.domain not in SUPPORTED_DOMAINS:
            raise BuildError(f"{path}: node {node.name!r} uses domain {node.domain!r}, which is not supported")
    try:
        onnx.checker.check_model(str(path))  # by path: external data is checked where it lies, not loaded
    except Exception as e:  # noqa: BLE001 - the checker raises its own ValidationError and others
        raise BuildError(f"{path}: fails the ONNX checker ({str(e).splitlines()[0][:200]})") from None
    return model


# ---- manifest ---------------------------------------------------------------------------
_MANIFEST_KEYS: dict[str, type | tuple[type, ...]] = {
    "format": str, "created": str, "checkpoint": dict, "versions": dict, "opset": int, "model": dict,
    "pyramid": dict, "graphs": dict, "dynamic_dims": dict, "passes": list, "samples": dict,
}
_OPTIONAL_KEYS: dict[str, type | tuple[type, ...]] = {"hyformer": dict, "precisions": dict, "engines": dict,
                                                     "protocol": dict}
_MODEL_KEYS: dict[str, type | tuple[type, ...]] = {
    "family": str, "d_model": int, "n_heads": int, "n_layers": int, "tasks": list, "s_max_len": int,
}
_GRAPH_FILES = {"user_encoder", "candidate_scorer"}


def _is_sha256(x: Any) -> bool:
    return isinstance(x, str) and len(x) == 64 and all(c in "0123456789abcdef" for c in x)


def check_manifest(m: Any, path: Path) -> dict[str, Any]:
    """Validate a parsed ``manifest.json``; returns it."""
    def bad(msg: str) -> BuildError:
        return BuildError(f"{path}: {msg}; re-run `onetrans-trt export`")

    if not isinstance(m, dict) or m.get("format") != "onetrans-trt/build/1":
        raise BuildError(f"{path}: not an onetrans-trt build manifest")
    unknown = sorted(set(m) - set(_MANIFEST_KEYS) - set(_OPTIONAL_KEYS))
    if unknown:
        raise bad(f"unknown keys {unknown}")
    for key, typ in _MANIFEST_KEYS.items():
        if key not in m:
            raise bad(f"missing key {key!r}")
        if isinstance(m[key], bool) or not isinstance(m[key], typ):
            raise bad(f"{key!r} must be a {getattr(typ, '__name__', typ)}, got {type(m[key]).__name__}")
    for key, typ in _OPTIONAL_KEYS.items():
        if key in m and not isinstance(m[key], typ):
            raise bad(f"{key!r} must be a {typ.__name__}")
    for key, typ in _MODEL_KEYS.items():
        v = m["model"].get(key)
        if isinstance(v, bool) or not isinstance(v, typ):
            raise bad(f"model.{key} must be a {typ.__name__}, got {v!r}")
    for key in ("d_model", "n_heads", "n_layers", "s_max_len"):
        if not 0 < m["model"][key] <= 1 << 20:
            raise bad(f"model.{key} = {m['model'][key]} is out of range")
    missing = _GRAPH_FILES - set(m["graphs"])
    if missing:
        raise bad(f"graphs {sorted(missing)} are not listed")
    for key, g in m["graphs"].items():
        if not isinstance(g, dict) or not isinstance(g.get("file"), str):
            raise bad(f"graphs.{key} must name its file")
        f = g["file"]
        if "/" in f or "\\" in f or f.startswith(".") or not f.endswith(".onnx"):
            raise bad(f"graphs.{key}.file {f!r} is not a plain .onnx file name in the build directory")
        if "data" in g:  # the graph's external data (a model over the threshold): <file>.data beside it
            d = g["data"]
            if not (isinstance(d, dict) and isinstance(d.get("file"), str) and _is_sha256(d.get("sha256"))
                    and isinstance(d.get("bytes"), int) and not isinstance(d.get("bytes"), bool) and d["bytes"] >= 0):
                raise bad(f"graphs.{key}.data must give the file, its sha256 and its bytes")
            if d["file"] != f + ".data":
                raise bad(f"graphs.{key}.data.file {d['file']!r} is not {f + '.data'!r}")
    sched = m["pyramid"].get("schedule")
    if m["model"]["family"] == "onetrans" and not (isinstance(sched, list) and
                                                    all(x is None or (isinstance(x, int) and x >= 0) for x in sched)):
        raise bad("pyramid.schedule must be a list of non-negative counts")
    hy = m.get("hyformer")
    if m["model"]["family"] == "hyformer":
        if not isinstance(hy, dict) or not all(isinstance(hy.get(k), int) and hy[k] > 0 for k in
                                               ("sequences", "state_slots", "longer_window")):
            raise bad("a HyFormer manifest needs hyformer.sequences/state_slots/longer_window")
    return m
