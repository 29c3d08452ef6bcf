"""``build``: TensorRT 11 engines for a build's graphs, one precision at a time.

TensorRT 11 builds are strongly typed: the precision is the ONNX variant's (fp32: the
build's graphs, fp16: ``fp16/``, int8: ``int8/``); no precision flags are set. Everything
that does not need TensorRT is written first (optimization profiles from the manifest's
dynamic-dimension ranges, the equivalent command lines), so a machine without TensorRT
still gets them and a clear exit code 3.

TensorRT API used (checked against the TensorRT 11 Python API docs,
https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/): ``Builder``,
``create_network()`` (default flags: strongly typed), ``OnnxParser.parse``,
``create_builder_config``, ``set_memory_pool_limit(MemoryPoolType.WORKSPACE, n)``,
``create_optimization_profile`` / ``set_shape`` / ``add_optimization_profile``, timing cache
(``create_timing_cache``, ``set_timing_cache``), ``build_serialized_network``; through
polygraphy's ``NetworkFromOnnxBytes``, ``CreateConfig(profiles=, load_timing_cache=, tf32=,
memory_pool_limits=)``, ``EngineBytesFromNetwork`` (polygraphy 0.53 knows TensorRT 11; we
never pass its removed fp16/int8 flags and set TF32 explicitly).
"""

from __future__ import annotations

import shlex
import time
from pathlib import Path
from typing import Any, Callable

import onnx

from onetrans_trt import lineage
from onetrans_trt.errors import BuildError, InputError, MissingCapabilityError
from onetrans_trt.export.api import CANDIDATE_SCORER, USER_ENCODER, read_manifest
from onetrans_trt.io import atomic_path, atomic_write_json, atomic_write_text, locks_build
from onetrans_trt.trust import check_onnx

GRAPHS = {"user_encoder": USER_ENCODER, "candidate_scorer": CANDIDATE_SCORER}
SUBDIR = {"fp32": "", "fp16": "fp16", "int8": "int8"}


def graph_path(build: Path, precision: str, role: str) -> Path:
    sub = SUBDIR[precision]
    p = build / sub / GRAPHS[role] if sub else build / GRAPHS[role]
    if not p.is_file():
        how = {"fp16": "onetrans-trt convert BUILD --precision fp16", "int8": "onetrans-trt calibrate BUILD"}
        raise BuildError(f"{p}: missing" + (f"; run `{how[precision]}` first" if precision in how else ""))
    return p


def parse_overrides(specs: list[str]) -> dict[str, tuple[int, int, int]]:
    """``--profile candidates=1,256,2048`` -> {"candidates": (1, 256, 2048)}."""
    out = {}
    for spec in specs:
        try:
            name, vals = spec.split("=", 1)
            lo, opt, hi = (int(v) for v in vals.split(","))
        except ValueError:
            raise InputError(f"--profile {spec!r}: expected NAME=MIN,OPT,MAX (e.g. candidates=1,128,1024)") from None
        if not 1 <= lo <= opt <= hi:
            raise InputError(f"--profile {spec!r}: need 1 <= MIN <= OPT <= MAX")
        out[name.strip()] = (lo, opt, hi)
    return out


def _input_dims(model: onnx.ModelProto) -> dict[str, list]:
    """Each graph input's dims: an int where static, the dimension's name where dynamic, None
    where the graph gives neither."""
    return {v.name: [d.dim_param or (d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None)
                     for d in v.type.tensor_type.shape.dim] for v in model.graph.input}


def dim_ranges(manifest: dict, names: set[str] | None = None) -> dict[str, tuple[int, int, int]]:
    """(min, opt, max) of every dynamic dimension: the manifest's ``dynamic_dims``; for a build
    from ``export --module`` also any other named dimension in ``names`` (a dynamic axis of a
    graph input the spec names), from the spec's ``dims`` (or its defaults)."""
    dims = {k: (v["min"], v["typical"], v["max"]) for k, v in manifest["dynamic_dims"].items()}
    if "protocol" in manifest and names:
        from onetrans_trt.protocol import SplitSpec

        spec = SplitSpec.parse(manifest["protocol"]["spec"], "manifest.json protocol.spec")
        for name in sorted(names - set(dims)):
            dims[name] = tuple(spec.dim_range(name))
    return dims


def profiles(manifest: dict, model: onnx.ModelProto, overrides: dict[str, tuple[int, int, int]],
             graph_dims: set[str] | None = None) -> dict[str, Any]:
    """Min/opt/max shape of every input, from the manifest's dynamic dimensions. Every dynamic
    axis needs a range: one the manifest (or a module build's spec) lacks is named with the
    ``--profile`` that gives it. ``graph_dims``: the dimension names of every graph of the
    build (an override may name any of them)."""
    shapes = _input_dims(model)
    names = set(graph_dims or set()) | {d for shape in shapes.values() for d in shape if isinstance(d, str)}
    dims = dim_ranges(manifest, names)
    unknown = set(overrides) - set(dims) - names
    if unknown:
        raise InputError(f"--profile names unknown dimensions {sorted(unknown)}; known: {sorted(set(dims) | names)}")
    dims.update(overrides)
    out = {}
    for name, shape in shapes.items():
        for axis, d in enumerate(shape):
            if d is None:
                raise InputError(f"input {name}: axis {axis} has neither a size nor a name in the graph; TensorRT "
                                 "needs a range for it (re-export with a named dynamic dimension)")
            if isinstance(d, str) and d not in dims:
                raise InputError(f"input {name}: dynamic axis {d!r} has no range in the manifest; give "
                                 f"--profile {d}=MIN,OPT,MAX")
        triple = []
        for i in range(3):
            triple.append([dims[d][i] if isinstance(d, str) else d for d in shape])
        out[name] = {"min": triple[0], "opt": triple[1], "max": triple[2]}
    return out


def _shape_arg(prof: dict, which: str) -> str:
    return ",".join(f"{name}:{'x'.join(str(d) for d in p[which])}" for name, p in prof.items())


def _poly_shapes(prof: dict, which: str) -> list[str]:
    """Polygraphy's ``NAME:[d0,d1,...]`` per input, shell-quoted (``[`` globs, spaces split)."""
    return [shlex.quote(f"{name}:[{','.join(str(d) for d in p[which])}]") for name, p in prof.items()]


def command_lines(engine_dir: Path, role: str, onnx_path: Path, prof: dict, has_plugins: bool,
                  tf32: bool = False) -> list[str]:
    engine = engine_dir / f"{role}.engine"
    lines = [f"# {role}"]
    if has_plugins:
        lines.append("# our plugins are Python (tensorrt.plugin): the build runs in Python, e.g.")
        lines.append(f"onetrans-trt build {shlex.quote(str(engine_dir.parent.parent))} --precision {engine_dir.name}")
    else:
        lines.append(" ".join(["trtexec", f"--onnx={shlex.quote(str(onnx_path))}", f"--saveEngine={shlex.quote(str(engine))}",
                               shlex.quote(f"--minShapes={_shape_arg(prof, 'min')}"),
                               shlex.quote(f"--optShapes={_shape_arg(prof, 'opt')}"),
                               shlex.quote(f"--maxShapes={_shape_arg(prof, 'max')}"), *([] if tf32 else ["--noTF32"])]))
        lines.append(" ".join(["polygraphy", "convert", shlex.quote(str(onnx_path)), "--convert-to", "trt", "-o",
                               shlex.quote(str(engine)), *(["--tf32"] if tf32 else []),
                               "--trt-min-shapes", *_poly_shapes(prof, "min"),
                               "--trt-opt-shapes", *_poly_shapes(prof, "opt"),
                               "--trt-max-shapes", *_poly_shapes(prof, "max")]))
    lines.append("# benchmark the built engine (AOT plugins need no Python at run time):")
    lines.append(f"trtexec --loadEngine={shlex.quote(str(engine))} {shlex.quote('--shapes=' + _shape_arg(prof, 'opt'))}")
    return lines


@locks_build("build")
def build_engines(build: str | Path, precision: str = "fp32", *, overrides: dict | None = None,
                  workspace_mb: int = 2048, tf32: bool = False,
                  progress: Callable[[str], None] | None = None,
                  before_tensorrt: Callable[[], None] | None = None) -> dict[str, Any]:
    """``before_tensorrt``: called once the inputs are checked and the profiles written, before
    TensorRT is looked for (the CLI prints the machine's facts there)."""
    say = progress or (lambda msg: None)
    build = Path(build)
    manifest = read_manifest(build)
    if precision not in SUBDIR:
        raise InputError(f"--precision {precision!r}: choose fp32, fp16 or int8")
    if precision != "fp32":  # a variant made from graphs `graphs` has since rewritten: refused before any write
        lineage.check_variant(build, manifest, precision)
    engine_dir = build / "engines" / precision
    engine_dir.mkdir(parents=True, exist_ok=True)
    plan: dict[str, Any] = {"precision": precision, "workspace_mb": workspace_mb, "tf32": tf32, "graphs": {}}
    lines = ["#!/usr/bin/env bash", "# Equivalent command lines for these engines (written by onetrans-trt build)"]
    models = {}
    for role in GRAPHS:
        path = graph_path(build, precision, role)
        models[role] = (path, check_onnx(path))  # confined, known ops, checker-clean (our trust boundary)
    graph_dims = {d for _, m in models.values() for shape in _input_dims(m).values() for d in shape
                  if isinstance(d, str)}
    for role, (path, model) in models.items():
        prof = profiles(manifest, model, overrides or {}, graph_dims)
        has_plugins = any(n.domain == "onetrans" for n in model.graph.node)
        plan["graphs"][role] = {"onnx": str(path.relative_to(build)), "profile": prof, "plugins": has_plugins,
                                "engine": f"engines/{precision}/{role}.engine"}
        lines += command_lines(engine_dir, role, path, prof, has_plugins, tf32)
    atomic_write_json(engine_dir / "profiles.json", plan)
    atomic_write_text(engine_dir / "commands.sh", "\n".join(lines) + "\n")
    log = [f"{time.strftime('%Y-%m-%dT%H:%M:%S')} build {precision}: profiles and command lines written"]
    if before_tensorrt is not None:
        before_tensorrt()
    try:
        from onetrans_trt.plugins._trt import require_tensorrt

        trt, _ = require_tensorrt()
        require_aot_plugins(trt)
        _require_gpu()
    except MissingCapabilityError as e:
        log.append(f"not built: {e}")
        atomic_write_text(engine_dir / "build_log.txt", "\n".join(log) + "\n")
        raise MissingCapabilityError(f"{e}. Profiles and command lines are in {engine_dir}") from None
    from onetrans_trt.plugins import register_trt_plugins, strip_functions

    register_trt_plugins()
    cache_path = engine_dir / "timing.cache"
    # the old engines' record goes before any engine is replaced: never a record of other engines
    (engine_dir / lineage.ENGINE_LINEAGE).unlink(missing_ok=True)
    for role, (path, model) in models.items():
        say(f"build {role}")
        t0 = time.time()
        from onetrans_trt.onnx_files import load_model

        full = load_model(path)  # with its external data (check_onnx parsed the graph without it)
        data = _build_one(trt, strip_functions(full), plan["graphs"][role]["profile"], cache_path, workspace_mb, tf32)
        with atomic_path(engine_dir / f"{role}.engine") as tmp:
            tmp.write_bytes(data)
        log.append(f"built {role}.engine ({len(data)} bytes) in {time.time() - t0:.1f}s")
    atomic_write_text(engine_dir / "build_log.txt", "\n".join(log) + "\n")
    # lineage: the ONNX files these engines were built from (checked by serve-repo and the trt backends)
    atomic_write_json(engine_dir / lineage.ENGINE_LINEAGE,
                      lineage.engine_record(manifest, precision, ["build", "BUILD", "--precision", precision],
                                            compute_capability()))
    plan["built"] = True
    atomic_write_json(engine_dir / "profiles.json", plan)
    return plan


MIN_TENSORRT = (10, 9)  # ahead-of-time Quick Deployable Plugins (trt.QuickPluginCreationRequest) appeared in 10.9


def trt_version(trt) -> tuple[int, ...]:
    import re

    return tuple(int(x) for x in re.findall(r"\d+", str(getattr(trt, "__version__", "0")))[:3])


def require_aot_plugins(trt) -> None:
    """Our plugins are ahead-of-time QDPs: TensorRT >= 10.9."""
    if trt_version(trt)[:2] < MIN_TENSORRT:
        raise MissingCapabilityError(f"TensorRT {trt.__version__} cannot build our ahead-of-time plugins: "
                                     "they need TensorRT >= 10.9 (pip install 'tensorrt>=11')")


def _require_gpu() -> None:
    try:
        import torch

        ok = torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        ok = False
    if not ok:
        raise MissingCapabilityError("no CUDA GPU is visible: TensorRT engines must be built on the GPU they run on")


def compute_capability() -> str | None:
    """The current CUDA device's compute capability as Triton names it (``"9.0"``), or None."""
    try:
        import torch

        major, minor = torch.cuda.get_device_capability()
        return f"{int(major)}.{int(minor)}"
    except Exception:  # noqa: BLE001 - no CUDA torch: the record goes without it
        return None


def _build_one(trt, model: onnx.ModelProto, prof: dict, cache_path: Path, workspace_mb: int, tf32: bool) -> bytes:
    from polygraphy.backend.trt import CreateConfig, EngineBytesFromNetwork, NetworkFromOnnxBytes, Profile
    from polygraphy.exception import PolygraphyException

    p = Profile()
    for name, s in prof.items():
        p.add(name, min=s["min"], opt=s["opt"], max=s["max"])
    config = CreateConfig(profiles=[p], tf32=tf32, load_timing_cache=str(cache_path) if cache_path.exists() else None,
                          memory_pool_limits={trt.MemoryPoolType.WORKSPACE: workspace_mb << 20})
    # TensorRT 11 networks are always strongly typed (the flag is gone); on 10.x Polygraphy builds
    # weakly typed networks unless asked, which would let TensorRT pick precisions the graph did not.
    typed = {"strongly_typed": True} if trt_version(trt)[0] < 11 else {}
    from polygraphy.backend.trt import NetworkFromOnnxPath

    from onetrans_trt.onnx_files import session_source

    # bytes when the graph fits in one protobuf; else a temporary copy with its weights beside it
    with session_source(model) as source:
        network = NetworkFromOnnxBytes(source, **typed) if isinstance(source, bytes) else \
            NetworkFromOnnxPath(source, **typed)
        try:
            engine = EngineBytesFromNetwork(network, config=config, save_timing_cache=str(cache_path))()
        except PolygraphyException as e:  # Polygraphy raises on parse/build failure; it never returns None
            first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
            raise BuildError(f"TensorRT could not build the engine: {first[:300]} (the TensorRT log above has "
                             "details)") from None
    return bytes(engine)
