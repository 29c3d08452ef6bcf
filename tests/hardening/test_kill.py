"""Kill tests: SIGKILL `export`, `calibrate` and `build` inside their atomic writes;
afterwards the build must be whole: the previous artifacts or the new ones, never a
partial file under its final name, every graph loadable, the manifest valid and matching
its graphs, no temporary file left under an artifact's name, and the build directory's
lock free again.

The kills are aimed, not timed: ``ONETRANS_TRT_PAUSE_IN_WRITE`` (see ``onetrans_trt/io.py``)
makes the command stop at each atomic write's window (temporary complete, not yet renamed;
for a replaced directory also the moment between moving the old one aside and renaming the
new one in) and wait for the test, which releases the pauses one by one and SIGKILLs the
process at the chosen one. A first, unkilled run counts the windows; the trials pick among
them with a seed that is a stable hash of the command.

``KILL_TRIALS`` sets the trials per command (``make test``: 3; ``make fuzz``: 20, which
covers every window of these commands).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import stable_seed

TRIALS = int(os.environ.get("KILL_TRIALS", "3"))
ROOT = Path(__file__).resolve().parents[2]
# what a killed atomic write may leave behind: a hidden temporary (file or directory), an old
# directory moved aside, the lock file; never anything under an artifact's own name
LITTER = re.compile(r"^\.(.+\.[A-Za-z0-9_]{6,}\.tmp|.+\.old-\d+|.+\.lock|probe-.*)$")


def _cmd(kind: str, ckpt: Path, build: Path) -> list[str]:
    base = [sys.executable, "-m", "onetrans_trt.cli"]
    if kind == "export":
        return base + ["export", str(ckpt), "--out", str(build), "--force", "--samples", "1"]
    if kind == "calibrate":
        return base + ["calibrate", str(build), "--samples", "4", "--quality-requests", "5"]
    return base + ["build", str(build), "--precision", "fp32"]


def verify_build(build: Path) -> None:
    """The build is whole (raises AssertionError naming what is not)."""
    from onetrans_trt.export.api import read_manifest, sha256_file
    from onetrans_trt.io import build_lock
    from onetrans_trt.runtime.ort_backend import ort_session

    m = read_manifest(build)  # valid JSON, valid schema
    for key, g in m["graphs"].items():
        path = build / g["file"]
        assert sha256_file(path) == g["sha256"], f"{path} does not match the manifest"
    for prec, info in m.get("precisions", {}).items():  # a variant's files: whole, or absent altogether
        for role, g in info["graphs"].items():
            path = build / g["file"]
            if path.exists():
                assert sha256_file(path) == g["sha256"], f"{path} ({prec}) does not match the manifest"
    for path in [*build.glob("*.onnx"), *build.glob("fp16/*.onnx"), *build.glob("int8/*.onnx")]:
        if path.name in ("user_encoder.onnx", "candidate_scorer.onnx"):
            ort_session(path)  # complete and loadable
    for path in [*build.rglob("*.json")]:
        if not path.name.startswith("."):
            json.loads(path.read_text())
    for sub in ("fp16", "int8"):
        d = build / sub
        if d.is_dir():
            names = {p.name for p in d.glob("*.onnx")}
            assert names in (set(), {"user_encoder.onnx", "candidate_scorer.onnx"}), f"{d}: {names}"
    with build_lock(build):  # the killed process's lock died with it
        pass


def _digest(path: Path) -> str | None:
    """The state of a file or directory: None if absent, else a hash of its bytes (and names)."""
    if not path.exists():
        return None
    h = hashlib.sha256()
    for p in sorted([path] if path.is_file() else path.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(path)).encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


def _drive(cmd: list[str], env: dict, hooks: Path, kill_at: int | None) -> tuple[list[dict], int | None]:
    """Run ``cmd`` with the write-pause hook in ``hooks``: release every pause, or SIGKILL the
    process at pause number ``kill_at``. Returns the pauses seen and the exit code."""
    hooks.mkdir(parents=True)
    err_file = open(hooks.parent / f"{hooks.name}.stderr", "w+")  # a file, not a pipe: never fills up
    proc = subprocess.Popen(cmd, env={**env, "ONETRANS_TRT_PAUSE_IN_WRITE": str(hooks)},
                            stdout=subprocess.DEVNULL, stderr=err_file, text=True)
    seen: list[dict] = []
    deadline = time.monotonic() + 600  # a hang guard, not a measurement
    try:
        while time.monotonic() < deadline:
            note = hooks / f"{len(seen) + 1}.paused"
            if note.exists():
                rec = json.loads(note.read_text())
                seen.append(rec)
                if len(seen) == kill_at:
                    rec["before_kill_tmp_exists"] = Path(rec["tmp"]).exists()
                    proc.send_signal(signal.SIGKILL)
                    proc.wait(timeout=60)
                    return seen, None
                (hooks / f"{len(seen)}.go").touch()
                continue
            if proc.poll() is not None:
                if (hooks / f"{len(seen) + 1}.paused").exists():
                    continue
                err_file.seek(0)
                assert proc.returncode in (0, 3), err_file.read()[-2000:]  # build: 3 without TensorRT
                return seen, proc.returncode
            time.sleep(0.002)  # polling the hook directory
        raise AssertionError(f"{cmd[3]} did not finish or pause within 600 s")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        err_file.close()


def _shape(path: str, build: Path) -> str:
    """A window's target with the build's directory and the temporaries' random names taken out."""
    return re.sub(r"\.[^/]+?\.[A-Za-z0-9_]{6,}\.tmp", "<tmp>", path.replace(str(build.parent), "<dir>"))


def _litter(root: Path) -> list[str]:
    """Hidden names under ``root`` (and beside it) that are not a recognised temporary."""
    names = [p for p in [*root.rglob(".*"), *root.parent.glob(".*")] if p.name not in (".", "..")]
    return [str(p) for p in names if not LITTER.match(p.name)]


@pytest.mark.parametrize("kind", [pytest.param("export", marks=pytest.mark.heavy),
                                  pytest.param("calibrate", marks=pytest.mark.heavy), "build"])
def test_sigkill_inside_an_atomic_write_leaves_whole_artifacts(kind, tiny_ckpt, tiny_build, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    base = tmp_path / "base" / "b"
    shutil.copytree(tiny_build, base)
    # an unkilled run counts the write windows; its result is each trial's start. If it
    # created a directory (no old one to swap out), a second run counts those of a run that
    # replaces it (`calibrate`'s int8/: the riskiest case, the old directory moved aside)
    windows, _ = _drive(_cmd(kind, tiny_ckpt, base), env, tmp_path / "hooks-a", kill_at=None)
    swapped = {w["final"] for w in windows if w["point"] == "directory-swap"}
    if any(w["point"] == "directory" and w["final"] not in swapped for w in windows):
        windows, _ = _drive(_cmd(kind, tiny_ckpt, base), env, tmp_path / "hooks-b", kill_at=None)
    verify_build(base)
    assert windows, f"{kind} made no atomic write"
    seed = stable_seed("kill", kind)
    order = list(range(1, len(windows) + 1))
    chosen = order if TRIALS >= len(order) else sorted(random.Random(seed).sample(order, TRIALS))
    for trial, k in enumerate(chosen):
        build = tmp_path / f"t{trial}" / "b"
        shutil.copytree(base, build)
        where = windows[k - 1]
        before = _digest(Path(where["final"].replace(str(base.parent), str(build.parent))))
        seen, rc = _drive(_cmd(kind, tiny_ckpt, build), env, tmp_path / f"hooks-{trial + 1}", kill_at=k)
        ctx = (f"{kind} (seed {seed}) trial {trial}: killed at window {k} of {len(windows)} "
               f"({where['point']} {where['final']})")
        assert rc is None, f"{ctx}: the run ended before that window"
        rec = seen[-1]
        final = Path(rec["final"])
        assert (rec["point"], _shape(rec["final"], build)) == (where["point"], _shape(where["final"], base)), \
            f"{ctx}: the windows moved: {rec}"
        assert rec["before_kill_tmp_exists"], f"{ctx}: not inside the write (no temporary)"
        # the write in flight never shows under its final name: the old artifact is untouched,
        # or (a directory moved aside for its replacement) absent
        after = _digest(final)
        if rec["point"] == "directory-swap":
            assert after is None, ctx
        else:
            assert after == before, f"{ctx}: {final} changed although its write never finished"
        assert not _litter(build), f"{ctx}: unexpected hidden files {_litter(build)}"
        if build.is_dir():
            try:
                verify_build(build)
            except Exception as e:  # noqa: BLE001
                pytest.fail(f"{ctx}: build not whole after SIGKILL: {type(e).__name__}: {e}")
    if TRIALS > 3:  # at `make fuzz` strength: after the last kill, the next run completes, whole
        _drive(_cmd(kind, tiny_ckpt, build), env, tmp_path / "hooks-last", kill_at=None)
        verify_build(build)


def test_the_write_pause_hook_is_off_unless_set(tmp_path, monkeypatch):
    """Without the variable an atomic write never looks for, or writes, a hook file."""
    from onetrans_trt import io

    monkeypatch.delenv(io.PAUSE_ENV, raising=False)
    before = io._pauses
    io.atomic_write_text(tmp_path / "a.txt", "x")
    assert io._pauses == before and (tmp_path / "a.txt").read_text() == "x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_a_second_writer_is_refused_while_the_build_is_locked(tiny_build, tmp_path):
    from onetrans_trt.io import build_lock

    build = tmp_path / "b"
    shutil.copytree(tiny_build, build)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with build_lock(build, "export"):
        r = subprocess.run([sys.executable, "-m", "onetrans_trt.cli", "convert", str(build)], env=env,
                           capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "another onetrans-trt command is writing it" in r.stderr, r.stderr
    assert f"pid {os.getpid()}: export" in r.stderr and "Traceback" not in r.stderr
    assert not (build / "fp16").exists()
