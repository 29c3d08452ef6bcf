"""Lineage: which graphs each derived artifact of a build was made from.

Every artifact derived from a build's graphs records the sha256 of the files it was read
from (the manifest's ``graphs`` entries at the time):

- ``fp16/`` and ``int8/``: ``manifest.json`` ``precisions.<variant>.lineage`` =
  ``{"graphs": {name: sha256}, "command": [...]}``: every graph file the variant was made
  from (``convert`` and a module build's ``calibrate``: ``user_encoder``/``candidate_scorer``;
  a checkpoint build's ``calibrate`` re-cuts ``serving.onnx`` and runs ``user_encoder.onnx``
  for the scorer's calibration K/V: all three) and the command that makes it again.
- ``engines/<precision>/lineage.json``: the sha256 of the ONNX files the engines were built
  from (the build's graphs for fp32, the variant's for fp16/int8), written with the engines.
- goldens (``meta.json``): the sha256 of every graph of the build they were saved from and
  of its checkpoint; they are checked by the checkpoint's (see :func:`check_goldens`).
- a ``serve-repo`` repository: ``lineage.json`` at its top (Triton only reads directories).

Commands that use an artifact check it first: a record that no longer matches the build's
graphs is a :class:`~onetrans_trt.errors.StaleArtifact` (exit 2, one line naming the
command that remakes it); nothing is rebuilt behind the user's back. An artifact without a
record (written before lineage existed) is *unknown*, not stale: it is used, with one
warning (logger ``onetrans_trt.lineage``) saying how to record it. Goldens are the
reference outputs of a checkpoint, so they are tied to its sha256, not to the passes:
they stay valid after ``graphs`` (checking rewritten graphs is their use), and goldens of another
build (another checkpoint) are refused by that hash.

Low in the layering: this module reads manifests given to it and JSON files, nothing more.
"""

from __future__ import annotations

import json
import logging
import shlex
from pathlib import Path
from typing import Any, Iterable

from onetrans_trt.errors import BuildError, StaleArtifact
from onetrans_trt.variants import MADE_BY as VARIANTS  # variant -> the command that makes it
from onetrans_trt.variants import has_variant

FORMAT = "onetrans-trt/lineage/1"
ROLES = ("user_encoder", "candidate_scorer")
ENGINE_LINEAGE = "lineage.json"
log = logging.getLogger("onetrans_trt.lineage")
_warned: set[tuple[str, str]] = set()


def _short(sha: str | None) -> str:
    return str(sha)[:12] if sha else "none"


def _file(manifest: dict, name: str) -> str:
    g = manifest.get("graphs", {}).get(name)
    return g.get("file", f"{name}.onnx") if isinstance(g, dict) else f"{name}.onnx"


def graph_shas(manifest: dict, names: Iterable[str] = ROLES) -> dict[str, str]:
    """The manifest's sha256 of each named graph."""
    out = {}
    for name in names:
        g = manifest["graphs"].get(name)
        if not isinstance(g, dict) or "sha256" not in g:
            raise BuildError(f"manifest.json lists no sha256 for graph {name!r}; re-run `onetrans-trt export`")
        out[name] = g["sha256"]
    return out


def record(manifest: dict, names: Iterable[str] = ROLES, command: list[str] | None = None) -> dict[str, Any]:
    """The lineage record of an artifact made now from the manifest's graphs ``names``;
    ``command``: the command that makes it again (its arguments after ``onetrans-trt``, the
    build as ``BUILD``)."""
    rec: dict[str, Any] = {"graphs": graph_shas(manifest, names)}
    if command:
        rec["command"] = list(command)
    return rec


def command_line(build: str | Path, command: list[str] | None, default: list[str]) -> str:
    """``onetrans-trt <command>`` with ``BUILD`` replaced by the build's path."""
    args = [str(build) if a == "BUILD" else a for a in (command or default)]
    return "onetrans-trt " + " ".join(shlex.quote(a) for a in args)


def _changed(manifest: dict, graphs: dict[str, str]) -> list[str]:
    """``file sha256 old.. -> new..`` for every recorded graph whose sha256 differs now."""
    out = []
    for name, old in graphs.items():
        g = manifest.get("graphs", {}).get(name)
        new = g.get("sha256") if isinstance(g, dict) else None
        if new != old:
            out.append(f"{_file(manifest, name)} sha256 {_short(old)}.. -> {_short(new)}..")
    return out


def warn_once(key: tuple[str, str], msg: str) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning("%s", msg)


# ---- fp16/ and int8/ ----------------------------------------------------------------------
def variant_state(build: str | Path, manifest: dict, variant: str) -> tuple[str, str]:
    """``(state, message)`` of a precision variant: ``current``, ``stale`` (recorded and
    mismatched: the message names the command to re-run), ``unknown`` (no record) or
    ``absent`` (the manifest lists no such variant)."""
    info = (manifest.get("precisions") or {}).get(variant)
    default = list(VARIANTS[variant])
    if not isinstance(info, dict):
        return "absent", f"{build} has no {variant} variant; run `{command_line(build, None, default)}`"
    lin = info.get("lineage")
    if not isinstance(lin, dict):
        return "unknown", (f"{build}/{variant}/ records no lineage (made before lineage was recorded): it cannot "
                           f"be checked against the current graphs; re-run `{command_line(build, None, default)}` "
                           "to record it")
    changed = _changed(manifest, lin.get("graphs", {}))
    if changed:
        return "stale", (f"{build}/{variant}/ was made from graphs that have since been rewritten "
                         f"({'; '.join(changed)}); re-run `{command_line(build, lin.get('command'), default)}`")
    return "current", ""


def check_variant(build: str | Path, manifest: dict, variant: str) -> None:
    """Refuse a stale ``fp16``/``int8`` variant (:class:`StaleArtifact`); warn once about one
    without a record; nothing for a current one or one the manifest does not list (the
    caller reports a missing variant in its own words)."""
    state, msg = variant_state(build, manifest, variant)
    if state == "stale":
        raise StaleArtifact(msg)
    if state == "absent" and has_variant(build, variant):
        state, msg = "unknown", (f"{build}/{variant}/ is not listed in the manifest (its command did not finish): it "
                                 f"cannot be checked against the current graphs; re-run "
                                 f"`{command_line(build, None, list(VARIANTS[variant]))}`")
    if state == "unknown":
        warn_once((str(Path(build).resolve()), variant), msg)


# ---- engines ------------------------------------------------------------------------------
def engine_sources(manifest: dict, precision: str) -> dict[str, str]:
    """The sha256 of the ONNX files engines of ``precision`` are built from now."""
    if precision == "fp32":
        return graph_shas(manifest)
    info = (manifest.get("precisions") or {}).get(precision) or {}
    return {role: (info.get("graphs", {}).get(role) or {}).get("sha256") for role in ROLES}


def engine_record(manifest: dict, precision: str, command: list[str],
                  compute_capability: str | None = None) -> dict[str, Any]:
    """``compute_capability``: the GPU's (``"9.0"``) the engines were built on: TensorRT plans run
    only there; Triton's ``cc_model_filenames`` is written from it."""
    rec = {"format": FORMAT, "precision": precision, "graphs": engine_sources(manifest, precision),
           "command": command}
    if compute_capability is not None:
        rec["compute_capability"] = compute_capability
    if precision != "fp32":
        lin = ((manifest.get("precisions") or {}).get(precision) or {}).get("lineage")
        if lin:
            rec["variant_lineage"] = lin
    return rec


def engine_lineage(build: str | Path, precision: str) -> dict[str, Any] | None:
    """The record ``build`` wrote beside the engines of ``precision`` (None: there is none)."""
    path = Path(build) / "engines" / precision / ENGINE_LINEAGE
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError):
        return None


def check_engines(build: str | Path, manifest: dict, precision: str) -> None:
    """Refuse engines built from ONNX files that have changed since (or from a stale
    variant); warn once about engines without a record."""
    build = Path(build)
    d = build / "engines" / precision
    if precision != "fp32":
        check_variant(build, manifest, precision)
    how = command_line(build, None, ["build", "BUILD", "--precision", precision])
    path = d / ENGINE_LINEAGE
    if not path.is_file():
        if any(d.glob("*.engine")):
            warn_once((str(build.resolve()), f"engines/{precision}"),
                      f"{d}/ records no lineage (built before lineage was recorded): it cannot be checked against "
                      f"the current graphs; re-run `{how}` to record it")
        return
    try:
        rec = json.loads(path.read_text())
        recorded = rec["graphs"]
        if not isinstance(recorded, dict):
            raise TypeError
    except (OSError, ValueError, KeyError, TypeError):
        raise StaleArtifact(f"{path}: unreadable lineage record; re-run `{how}`") from None
    now = engine_sources(manifest, precision)
    where = "" if precision == "fp32" else f"{precision}/"
    changed = [f"{where}{role}.onnx sha256 {_short(old)}.. -> {_short(now.get(role))}.."
               for role, old in recorded.items() if now.get(role) != old]
    if changed:
        raise StaleArtifact(f"{d}/ engines were built from ONNX graphs that have since changed ({'; '.join(changed)}); "
                            f"re-run `{command_line(build, rec.get('command'), ['build', 'BUILD', '--precision', precision])}`")


# ---- what `graphs` reports ------------------------------------------------------------------
def survey(build: str | Path, manifest: dict) -> dict[str, dict[str, str]]:
    """Every derived artifact of ``build`` checked against its graphs: ``{"stale": {"fp16/":
    message, "engines/fp32/": message, ...}, "unknown": {...}}`` (``unknown``: present
    without a record, so it cannot be told)."""
    build = Path(build)
    out: dict[str, dict[str, str]] = {"stale": {}, "unknown": {}}
    for variant in VARIANTS:
        state, msg = variant_state(build, manifest, variant)
        if state in out:
            out[state][f"{variant}/"] = msg
    for precision in ("fp32", "fp16", "int8"):
        d = build / "engines" / precision
        if (d / ENGINE_LINEAGE).is_file():
            try:
                check_engines(build, manifest, precision)
            except StaleArtifact as e:
                out["stale"][f"engines/{precision}/"] = str(e)
        elif any(d.glob("*.engine")):
            out["unknown"][f"engines/{precision}/"] = (f"{d}/ records no lineage (built before lineage was "
                                                       "recorded): it cannot be checked against the current graphs")
    return out


# ---- goldens ------------------------------------------------------------------------------
def check_goldens(goldens: str | Path, meta: Any, build: str | Path, manifest: dict) -> None:
    """Goldens are the PyTorch reference outputs of one checkpoint: they hold for every build
    of it (whatever its passes: checking rewritten graphs is what they are for) and for no
    other. The checkpoint's sha256 in ``meta.json`` must be the build's; goldens of another
    build are a :class:`StaleArtifact` naming how to save this build's. (``serving.onnx``'s
    own sha256 is not reproducible across exports of one checkpoint: the exporter's node
    metadata holds function addresses.)"""
    redo = (f"save this build's with `onetrans-trt validate {build} --data ml-100k --save-goldens DIR` "
            "(on a host with PyTorch)")
    if not isinstance(meta, dict) or meta.get("format") != "onetrans-trt/goldens/1":
        raise StaleArtifact(f"{goldens}/meta.json: not goldens this toolkit wrote; {redo}")
    then = meta["checkpoint"].get("sha256") if isinstance(meta.get("checkpoint"), dict) else None
    now = (manifest.get("checkpoint") or {}).get("sha256")
    if not then:
        raise StaleArtifact(f"{goldens}/meta.json records no checkpoint sha256: the build they belong to cannot be "
                            f"told; {redo}")
    if then != now:
        graphs = meta.get("graphs") if isinstance(meta.get("graphs"), dict) else {}
        differ = [f"{_file(manifest, k)} {_short(graphs[k])}.. there, {_short(g.get('sha256'))}.. here"
                  for k, g in manifest["graphs"].items() if k in ROLES and k in graphs and isinstance(g, dict)]
        raise StaleArtifact(f"{goldens} were saved from another build (checkpoint sha256 {_short(then)}.. there, "
                            f"{_short(now)}.. here{'; ' + '; '.join(differ) if differ else ''}); {redo}")
