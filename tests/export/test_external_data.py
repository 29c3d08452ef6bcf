"""Builds whose graphs keep their weights in external data (``<file>.data`` beside each graph).

``ONETRANS_TRT_EXTERNAL_DATA_BYTES=0`` sends small models down the path a > 2 GiB model takes:
an example module build (``export --module``) and one of our tiny checkpoints export with
external data, validate, and run on ONNX Runtime from another working directory; a build
whose graph points its external data outside the build (absolute path, ``..``, a symbolic
link out) is refused with one line, by ``check_onnx``/``ort_session`` and by the CLI (exit 2).
The > 2 GiB model itself: ``test_large_model.py`` (heavy).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from onetrans_trt import onnx_files
from onetrans_trt.cli import cli
from onetrans_trt.errors import BuildError
from onetrans_trt.onnx_files import THRESHOLD_ENV, data_file
from onetrans_trt.trust import check_onnx

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "fused_qkv_cls.py"
SPEC = ROOT / "examples" / "fused_qkv_cls.spec.json"
MODULE_GRAPHS = ("user_encoder.onnx", "candidate_scorer.onnx", "unified.onnx")


def _cli(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=True)


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def _locations(path: Path) -> set[str]:
    m = onnx.load(str(path), load_external_data=False)
    return {e.value for t in m.graph.initializer for e in t.external_data if e.key == "location"}


def _assert_external_build(build: Path, graphs) -> None:
    """Every graph has its weights in <file>.data beside it, named relatively, recorded in the manifest."""
    manifest = json.loads((build / "manifest.json").read_text())
    for fname in graphs:
        side = data_file(build / fname)
        raw = onnx.load(str(build / fname), load_external_data=False)
        inline = [t.name for t in raw.graph.initializer if len(t.raw_data) >= 1024]
        assert side.is_file() and inline == [], (fname, inline)  # every weight of 1 KiB or more is in the data file
        assert _locations(build / fname) == {side.name}
        entry = next(g for g in manifest["graphs"].values() if g["file"] == fname)
        assert entry["sha256"] == _sha256(build / fname) and entry["bytes"] == (build / fname).stat().st_size
        assert entry["data"] == {"file": side.name, "sha256": _sha256(side), "bytes": side.stat().st_size}


@pytest.fixture(scope="module")
def module_build(tmp_path_factory):
    """examples/fused_qkv_cls.py (its factory and spec file, as ``export --module`` loads them) exported
    with every graph's weights external (the protocol checks are tests/export/test_module_export.py's)."""
    from onetrans_trt.export.module import export_module, load_user_module

    root = tmp_path_factory.mktemp("external-module")
    build = root / "build"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(THRESHOLD_ENV, "0")
        mp.setattr(onnx_files, "ON_DISK_BYTES", 1024)  # the weights stay in their files through the passes
        mp.chdir(root)
        left = _record_on_disk(mp)
        module, spec, source = load_user_module(f"{EXAMPLE}:factory", spec_path=SPEC)
        export_module(module, spec, None, build, unified=True, check=False, source=source)
    assert "model.item.weight" in left  # the passes ran on graphs whose weights stayed in their files
    return build


def _record_on_disk(mp) -> list[str]:
    """Names of the tensors export's load_model calls left on disk (what the passes never read)."""
    left: list[str] = []
    real = onnx_files.load_model

    def recording(*args, **kwargs):
        m = real(*args, **kwargs)
        left.extend(onnx_files.on_disk(m))
        return m

    mp.setattr(onnx_files, "load_model", recording)
    return left


def test_a_module_build_exports_with_external_data(module_build):
    _assert_external_build(module_build, MODULE_GRAPHS)


def test_a_module_build_validates_from_another_directory(module_build, tmp_path, monkeypatch):
    from tests.protocol.test_protocol import example

    from onetrans_trt.validate.module import validate_module_build

    monkeypatch.chdir(tmp_path)  # neither the build nor the repository
    rep = validate_module_build(module_build, example("fused_qkv_cls").factory(), count=8)
    assert rep["cases"] >= 8 and rep["max_abs"] <= 1e-4
    r = _cli("validate", module_build, "--count", "8")
    assert r.exit_code == 0, r.output[-2000:]
    assert "verdict: PASS (8 cases" in r.stdout


def test_a_module_build_runs_on_ort_from_another_directory(module_build, tmp_path, monkeypatch):
    from onetrans_trt.kv import from_state, state_arrays
    from onetrans_trt.runtime.ort_backend import OrtSplitBackend, OrtUnifiedBackend

    monkeypatch.chdir(tmp_path)
    with np.load(module_build / "samples" / "samples.npz") as z:
        arrays = {k: z[k] for k in z.files}
    spec = json.loads((module_build / "spec.json").read_text())
    user = {i["name"]: arrays[f"inputs/{i['name']}"] for i in spec["inputs"] if i["side"] == "user"}
    cand = {i["name"]: arrays[f"inputs/{i['name']}"] for i in spec["inputs"] if i["side"] == "candidate"}
    be = OrtSplitBackend(module_build, device=None)
    full = state_arrays(be.encode_user(user))
    got = be.score(from_state({n: np.asarray(v)[:1] for n, v in full.items()}, None), cand)
    np.testing.assert_allclose(got, arrays["unified_logits"], atol=1e-4)
    uni = OrtUnifiedBackend(module_build).score_unified({k: v[:1] for k, v in user.items()}, cand)
    np.testing.assert_allclose(uni, arrays["unified_logits"], atol=1e-4)


def test_inspect_reads_a_build_with_external_data(module_build, tmp_path, monkeypatch):
    from onetrans_trt.export.inspect import inspect_build

    monkeypatch.chdir(tmp_path)
    rep = inspect_build(module_build, candidates=8, history=20)
    for key in ("user_encoder", "candidate_scorer"):
        g = rep["graphs"][key]
        assert g["data_bytes"] == data_file(module_build / g["file"]).stat().st_size and g["flops"] > 0


# ---- our own checkpoints -------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_external(tiny_ckpt, tmp_path_factory):
    from onetrans_trt.export.api import export_build

    build = tmp_path_factory.mktemp("external-ckpt") / "tiny"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(THRESHOLD_ENV, "0")
        mp.setattr(onnx_files, "ON_DISK_BYTES", 1024)  # the weights stay in their files through the passes
        left = _record_on_disk(mp)
        export_build(tiny_ckpt, build, unified=True, n_samples=2)
    assert left  # the split and the passes ran on a graph whose weights stayed in serving.onnx.data
    return build


def _tiny_scores(build: Path) -> tuple[np.ndarray, np.ndarray]:
    """ORT split scores of the first saved request and PyTorch's, from the build's samples."""
    from onetrans_trt.runtime.ort_backend import OrtSplitBackend

    with np.load(build / "samples" / "samples.npz") as z:
        arrays = {k: z[k] for k in z.files}
    manifest = json.loads((build / "manifest.json").read_text())
    user_names = [i["name"] for i in manifest["graphs"]["user_encoder"]["inputs"]]
    hist = {n: arrays[f"0/{n}"] for n in user_names}
    ns = {k[2:]: v for k, v in arrays.items() if k.startswith("0/ns_")}
    be = OrtSplitBackend(build, device=None)
    return be.score(be.encode_user(hist), ns), arrays["0/logits"]


@pytest.mark.heavy  # the tiny checkpoint exported again with external data (~70 s)
def test_our_checkpoint_exports_with_external_data_and_runs_from_another_directory(tiny_external, tmp_path,
                                                                                   monkeypatch):
    _assert_external_build(tiny_external, ("user_encoder.onnx", "candidate_scorer.onnx", "serving.onnx",
                                           "unified.onnx"))
    monkeypatch.chdir(tmp_path)
    got, want = _tiny_scores(tiny_external)
    np.testing.assert_allclose(got, want, atol=1e-4)


@pytest.mark.heavy  # the tiny checkpoint exported again with external data (~70 s)
def test_rerunning_passes_replaces_graph_and_data_together(tiny_external, tmp_path, monkeypatch):
    from onetrans_trt.export.api import read_manifest, rerun_passes

    build = tmp_path / "tiny"
    shutil.copytree(tiny_external, build)
    monkeypatch.chdir(tmp_path / "..")
    monkeypatch.setenv(THRESHOLD_ENV, "0")
    manifest = rerun_passes(build, [], [])  # no passes: different graphs, still external
    assert [r["pass"] for r in manifest["passes"]] == ["split-kv"]
    _assert_external_build(build, ("user_encoder.onnx", "candidate_scorer.onnx"))
    got, want = _tiny_scores(build)
    np.testing.assert_allclose(got, want, atol=1e-4)
    monkeypatch.delenv(THRESHOLD_ENV)
    rerun_passes(build, None, None)  # under the default threshold: one file each, the data files gone
    for fname in ("user_encoder.onnx", "candidate_scorer.onnx"):
        assert not data_file(build / fname).exists() and _locations(build / fname) == set()
        assert "data" not in read_manifest(build)["graphs"][fname[:-5]]
    assert sorted(p.name for p in build.iterdir() if p.name.startswith(".")) == []  # no temporaries left
    got, want = _tiny_scores(build)
    np.testing.assert_allclose(got, want, atol=1e-4)


# ---- external data pointing outside the build --------------------------------------------

def _tamper(build: Path, how: str, tmp_path: Path) -> tuple[Path, str]:
    """A copy of ``build`` whose candidate scorer points its external data outside it."""
    bad = tmp_path / f"bad-{how}"
    shutil.copytree(build, bad)
    stolen = tmp_path / f"stolen-{how}.data"
    shutil.move(data_file(bad / "candidate_scorer.onnx"), stolen)  # the real bytes, outside the build
    if how == "absolute":
        loc = str(stolen)
    elif how == "dotdot":
        loc = f"../{stolen.name}"
    else:
        (bad / "candidate_scorer.onnx.data").symlink_to(stolen)
        return bad, "candidate_scorer.onnx.data"
    m = onnx.load(str(bad / "candidate_scorer.onnx"), load_external_data=False)
    for t in m.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = loc
    (bad / "candidate_scorer.onnx").write_bytes(m.SerializeToString())
    return bad, loc


@pytest.mark.parametrize("how", ["absolute", "dotdot", "symlink"])
def test_external_data_outside_the_build_is_refused(module_build, tmp_path, monkeypatch, how):
    from onetrans_trt.runtime.ort_backend import OrtSplitBackend, ort_session

    bad, loc = _tamper(module_build, how, tmp_path)
    graph = bad / "candidate_scorer.onnx"
    want = f"{graph}: tensor "
    for call in (lambda: check_onnx(graph), lambda: ort_session(graph), lambda: OrtSplitBackend(bad)):
        with pytest.raises(BuildError) as e:
            call()
        msg = str(e.value)
        assert msg.startswith(want) and msg.endswith(f"points its external data at {loc!r}, outside {bad}; "
                                                     "refusing to load it") and "\n" not in msg
    monkeypatch.chdir(tmp_path)
    r = _cli("validate", bad, "--count", "2")
    assert r.exit_code == 2, r.output[-2000:]
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "outside" in lines[0] and loc in lines[0], lines


def test_the_cli_refusal_is_one_line_in_a_fresh_process(module_build, tmp_path):
    bad, loc = _tamper(module_build, "dotdot", tmp_path)
    p = subprocess.run([sys.executable, "-m", "onetrans_trt.cli", "validate", str(bad), "--count", "2"],
                       capture_output=True, text=True, cwd=tmp_path)
    assert p.returncode == 2, p.stderr[-2000:]
    lines = [x for x in p.stderr.splitlines() if x.strip()]
    assert lines == [f"error: {bad / 'candidate_scorer.onnx'}: tensor {lines[0].split('tensor ')[1].split(' ')[0]} "
                     f"points its external data at {loc!r}, outside {bad}; refusing to load it"], lines
    assert "Traceback" not in p.stderr
