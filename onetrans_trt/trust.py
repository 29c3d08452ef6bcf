"""Artifacts coming in: checks before anything in them is used.

- :func:`check_onnx`: an ONNX file of a build: a regular file inside the build directory
  (no symlink out of it), at most ``MAX_ONNX_BYTES`` (the graph file; its external data,
  ``<file>.data``, may be larger), parsed without loading external data, every
  external-data location a relative path confined to the graph's own directory (no
  absolute path, no ``..`` out, no symbolic link out) naming a regular file that holds the
  tensor's byte range, opsets and domains ones we produce, and ``onnx.checker`` passing on
  the file (by path: external data is checked beside the graph, whatever the working
  directory, and never loaded). Only then does ONNX Runtime see it.
- :func:`check_manifest`: ``manifest.json`` against its model (:mod:`onetrans_trt.manifest`:
  required keys and types; unknown keys are reported, not ignored; a variant's lineage
  record, where it has one, maps graph names to sha256).

Each failure is a :class:`~onetrans_trt.errors.BuildError` naming the file and what to do.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from onetrans_trt.errors import BuildError, InputError

MAX_ONNX_BYTES = 2 << 30  # protobuf's own limit, for the graph file; its external data may be larger
# The default-domain opsets a build may carry: the one range both `export` (refused before the
# trace) and every load (``check_onnx``) read. 18: the oldest the exporter's ops and our ONNX
# functions need. 23: the newest the whole chain is tested at (SDPA exports to Attention-23,
# which the fuse-attention pass matches and onnxruntime>=1.23 runs; TensorRT's ONNX parser).
# ``export_opsets`` caps it further by what the installed onnx knows and ONNX Runtime loads.
OPSETS = (18, 23)
DEFAULT_OPSET = 23
SUPPORTED_DOMAINS = {"": OPSETS, "ai.onnx": OPSETS, "onetrans": (1, 1)}


def _ort_loads(opset: int) -> bool:
    """Whether the installed ONNX Runtime loads a one-node model stamped with ``opset``."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from onetrans_trt.ort_options import session_options

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    model = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "probe", [x], [y]),
                              opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = min(model.ir_version, 10)  # what every supported ONNX Runtime reads
    try:
        ort.InferenceSession(model.SerializeToString(), sess_options=session_options(severity=4),
                             providers=["CPUExecutionProvider"])
        return True
    except Exception:  # noqa: BLE001 - ORT raises its own untyped errors for an unknown opset
        return False


def export_opsets() -> tuple[int, int, str]:
    """``(lowest, highest, why)``: the opsets `export` writes here, ``OPSETS`` capped by the
    newest the installed onnx knows and the newest the installed ONNX Runtime loads; ``why``
    names what sets the highest."""
    import onnx

    lo, hi = OPSETS
    why = "the newest every stage of this toolkit is tested at"
    newest = onnx.defs.onnx_opset_version()
    if newest < hi:
        hi, why = newest, f"the newest the installed onnx {onnx.__version__} knows"
    try:
        import onnxruntime as ort
    except ImportError:
        return lo, hi, why  # the missing runtime is reported where it is needed
    top = hi
    while hi >= lo and not _ort_loads(hi):
        hi -= 1
    if hi < top:
        why = f"the newest the installed onnxruntime {ort.__version__} loads"
    return lo, hi, why


def check_opset(opset: int) -> int:
    """``opset`` if `export` can write it here (see :func:`export_opsets`); else an InputError
    before any work."""
    lo, hi, why = export_opsets()
    if isinstance(opset, bool) or not isinstance(opset, int) or not lo <= opset <= hi:
        raise InputError(f"--opset {opset} is outside {lo}..{hi}, the opsets a build loads with here "
                         f"({hi}: {why})")
    return opset


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

    model = check_graph_file(path, root)
    try:
        onnx.checker.check_model(str(path))  # by path: external data is checked where it lies, not loaded
    except Exception as e:  # noqa: BLE001 - the checker raises its own ValidationError and others
        raise BuildError(f"{path}: fails the ONNX checker ({str(e).splitlines()[0][:200]})") from None
    return model


def check_graph_file(path: str | os.PathLike, root: str | os.PathLike | None = None):
    """:func:`check_onnx` without ``onnx.checker`` (the cheap part every command's door runs
    on every graph of a build): where it lies, its size, that it parses, where its external
    data points, its opsets and domains. Returns the parsed ``ModelProto``."""
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
    return model


# ---- the door: every command's artifact directories --------------------------------------
MAX_MANIFEST_BYTES = 16 << 20
MAX_CONFIG_BYTES = 16 << 20


def load_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """``manifest.json`` read (a regular file of at most ``MAX_MANIFEST_BYTES``, never a device),
    parsed (deep nesting, integers of thousands of digits: refused) and checked."""
    import json

    from onetrans_trt.io import NotRegular, TooBig, read_regular_file

    path = Path(path)
    try:
        text = read_regular_file(path, MAX_MANIFEST_BYTES).decode("utf-8")
    except TooBig:
        raise BuildError(f"{path}: over {MAX_MANIFEST_BYTES} bytes; not a manifest this toolkit wrote") from None
    except NotRegular:
        raise BuildError(f"{path}: not a regular file (a device, pipe or socket); re-run `onetrans-trt export`") \
            from None
    except (OSError, UnicodeDecodeError) as e:
        raise BuildError(f"{path}: cannot read ({str(e)[:120]})") from None
    try:
        m = json.loads(text)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, the int/str digit limit, deep nesting
        raise BuildError(f"{path}: not valid JSON ({str(e)[:120]})") from None
    return check_manifest(m, path)


def _no_link_out(root: Path) -> None:
    """No symbolic link anywhere under ``root`` may point outside it (a graph, its data, a
    variant directory...): what a command reads through the build is the build's."""
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            if p.is_symlink() and not _inside(p, root):
                raise BuildError(f"{p}: a symbolic link out of {root} (to {os.readlink(p)}); refusing to use it")


def check_build(build: str | os.PathLike) -> dict[str, Any]:
    """The door every command that takes a build goes through before it reads anything in
    it: the manifest (:func:`load_manifest`), no symbolic link out of the build, and every
    ONNX graph under it (the graphs, the fp16/int8 variants, unified and serving graphs)
    passing :func:`check_graph_file` confined to its own directory. Returns the manifest."""
    build = Path(build)
    if not build.is_dir():
        raise BuildError(f"{build}: not a build directory (it does not exist)")
    if not (build / "manifest.json").exists() and not (build / "manifest.json").is_symlink():
        raise BuildError(f"{build}: missing manifest.json; run `onetrans-trt export CKPT --out {build}`")
    _no_link_out(build)
    manifest = load_manifest(build / "manifest.json")
    for dirpath, _dirs, files in os.walk(build, followlinks=False):
        for name in sorted(files):
            if name.endswith(".onnx"):
                check_graph_file(Path(dirpath) / name)
    return manifest


def check_checkpoint(ckpt: str | os.PathLike) -> None:
    """The door for a checkpoint directory: no symbolic link out of it; ``config.json`` a
    regular file of sane size (the weights are checked by the loader, header first)."""
    from onetrans_trt.errors import CheckpointError

    ckpt = Path(ckpt)
    if not ckpt.is_dir():
        return  # the loader says what is missing
    try:
        _no_link_out(ckpt)
    except BuildError as e:
        raise CheckpointError(str(e)) from None
    cfg = ckpt / "config.json"
    if cfg.exists() or cfg.is_symlink():
        from onetrans_trt.io import NotRegular, TooBig, read_regular_file

        try:
            read_regular_file(cfg, MAX_CONFIG_BYTES)
        except TooBig as e:
            raise CheckpointError(f"{cfg}: {e.size} bytes is too big for a config") from None
        except NotRegular:
            raise CheckpointError(f"{cfg}: not a regular file (a device, pipe or socket)") from None
        except OSError as e:
            raise CheckpointError(f"{cfg}: cannot read ({str(e)[:120]})") from None


def check_artifact_dir(path: str | os.PathLike) -> None:
    """A directory a command was given as CKPT or BUILD: a build (it has a manifest) through
    :func:`check_build`, anything else through :func:`check_checkpoint`."""
    path = Path(path)
    m = path / "manifest.json"
    if m.exists() or m.is_symlink():
        check_build(path)
    else:
        check_checkpoint(path)


def check_goldens_dir(goldens: str | os.PathLike) -> None:
    """``validate --goldens DIR``: no symbolic link out of it, every file in it regular (a
    device named like a goldens file would never finish reading)."""
    from onetrans_trt.errors import InputError

    goldens = Path(goldens)
    if not goldens.is_dir():
        return  # validate says it is missing
    try:
        _no_link_out(goldens)
    except BuildError as e:
        raise InputError(str(e)) from None
    for p in sorted(goldens.iterdir()):
        check_input_file(p, "--goldens")


def check_input_file(path: str | os.PathLike, what: str, max_bytes: int = 4 << 30) -> None:
    """A file a command reads (requests, inputs, policy, limits, spec, weights): a regular file
    (never a device, a pipe or a socket, which could block or never end) of at most
    ``max_bytes``. Missing files are left to the reader, which says what was expected."""
    import stat

    from onetrans_trt.errors import InputError

    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return
    except OSError as e:
        raise InputError(f"{what} {path}: cannot read ({str(e)[:120]})") from None
    if stat.S_ISDIR(st.st_mode):
        return  # options that take directories say so themselves
    if not stat.S_ISREG(st.st_mode):
        raise InputError(f"{what} {path}: not a regular file (a device, pipe or socket); give a file")
    if st.st_size > max_bytes:
        raise InputError(f"{what} {path}: {st.st_size} bytes is over the {max_bytes} byte limit")


# ---- manifest ---------------------------------------------------------------------------
def check_manifest(m: Any, path: Path) -> dict[str, Any]:
    """Validate a parsed ``manifest.json`` against :class:`onetrans_trt.manifest.Manifest`;
    returns it. A variant's bad lineage names the command that records it again."""
    from onetrans_trt.contracts import refused
    from onetrans_trt.manifest import FORMAT, Manifest, Variant
    from onetrans_trt.variants import MADE_BY

    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise BuildError(f"{path}: not an onetrans-trt build manifest")
    variants = m["precisions"] if isinstance(m.get("precisions"), dict) else {}
    for v, info in variants.items():
        how = " ".join(a for a in MADE_BY.get(v, ["export"]) if a != "BUILD")
        with refused(BuildError, info, f"precisions.{v}", prefix=f"{path}: ", suffix=f"; re-run `onetrans-trt {how}`"):
            Variant.model_validate(info)
    with refused(BuildError, m, "", prefix=f"{path}: ", suffix="; re-run `onetrans-trt export`"):
        Manifest.model_validate(m)
    return m
