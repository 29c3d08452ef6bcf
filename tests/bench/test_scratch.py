"""`bench` leaves nothing in the temporary directory: on success, on an error and on Ctrl-C.

Every bench suite writes its scratch builds under one ``onetrans-bench-*`` directory
(``bench/scratch.py``) that is removed however the run ends. In-process cases point
``tempfile`` at a fresh directory; the real-process cases set ``TMPDIR`` and send SIGINT
(or SIGTERM) to a running ``onetrans-trt bench``.

Two entries that are not ours may appear in a fresh temporary directory and are allowed by
name (both are caches meant to persist, not leftovers of a run): ``.ses``, the telemetry
session file that ``import onnxruntime`` itself writes (a few dozen bytes), and
``torchinductor_<user>``, PyTorch's compile cache directory.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from onetrans_trt.cli import cli
from onetrans_trt.errors import InputError

THIRD_PARTY = (".ses", "torchinductor_")
TINY = ["--preset", "tiny", "--quick", "--rounds", "1", "--history", "8", "--candidates", "4",
        "--scorer-candidates", "4", "--cache-history", "8", "--cache-candidates", "4"]


def ours(tmp: Path) -> list[str]:
    """What is left in ``tmp`` that is not a third-party cache."""
    return sorted(p.name for p in tmp.iterdir() if not p.name.startswith(THIRD_PARTY))


@pytest.fixture
def fresh_tmp(tmp_path, monkeypatch):
    d = tmp_path / "tmpdir"
    d.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(d))
    return d


def _fake_build(out: Path, **kw) -> Path:
    """Stands in for random_build: writes into the scratch directory, as the real one does."""
    out.mkdir(parents=True)
    (out / "user_encoder.onnx").write_bytes(b"x" * 1024)
    return out


@pytest.mark.parametrize("suite", ["peers", "fused", "int8"])
@pytest.mark.parametrize("fails_with,code,line", [(InputError("bad thing"), 2, "error: bad thing"),
                                                 (KeyboardInterrupt(), 130, "interrupted")])
def test_an_error_or_ctrl_c_inside_a_suite_removes_its_scratch_directory(suite, fails_with, code, line, fresh_tmp,
                                                                          monkeypatch):
    import onetrans_trt.bench.fused as fused

    seen = []

    def build_then_fail(out: Path, **kw):
        _fake_build(out)
        seen.append(out.parent)
        assert out.parent.parent == fresh_tmp and out.parent.name.startswith("onetrans-bench-")
        raise fails_with

    monkeypatch.setattr(fused, "random_build", build_then_fail)
    args = ["bench", "--suite", suite, "--preset", "tiny", "--history", "8", "--candidates", "4", "--rounds", "1"]
    r = CliRunner().invoke(cli, args)
    assert seen, r.output  # the failure happened inside the suite, with its scratch directory in place
    assert r.exit_code == code, r.output
    assert [x for x in r.stderr.splitlines() if x.strip()][-1] == line
    assert ours(fresh_tmp) == [], ours(fresh_tmp)


@pytest.mark.heavy  # a whole bench on a build (~45 s); the signal tests below stay in make test
def test_a_successful_run_on_a_build_removes_its_scratch_directory(tiny_build, fresh_tmp, monkeypatch):
    """On a build, the scratch directory holds the pyramid-off twin; gone after the run."""
    import onetrans_trt.bench.peers as peers

    twins = []
    real = peers.pyramid_off_twin

    def spy(build, out, **kw):
        twins.append(out)
        return real(build, out, **kw)

    monkeypatch.setattr(peers, "pyramid_off_twin", spy)
    r = CliRunner().invoke(cli, ["bench", str(tiny_build), "--quick", "--rounds", "1", "--history", "8",
                                 "--candidates", "4", "--scorer-candidates", "4", "--cache-history", "8",
                                 "--cache-candidates", "4", "--backends", "ort", "--json"])
    assert r.exit_code == 0, r.output
    assert twins and twins[0].parent.parent == fresh_tmp  # it did write there
    assert ours(fresh_tmp) == [], ours(fresh_tmp)


def test_work_given_is_kept(tmp_path):
    """A caller's own work directory is the caller's: used, not removed."""
    from onetrans_trt.bench.scratch import scratch_dir

    with scratch_dir(tmp_path / "w") as d:
        assert d == tmp_path / "w"
    with pytest.raises(KeyboardInterrupt):
        with scratch_dir() as d:
            (d / "f").write_text("x")
            raise KeyboardInterrupt
    assert not d.exists()


def _start_bench(tmpdir: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "TMPDIR": str(tmpdir), "PYTHONUNBUFFERED": "1"}
    # as from a terminal: a test runner started in the background inherits SIGINT ignored, and
    # Python then never turns Ctrl-C into KeyboardInterrupt
    return subprocess.Popen([sys.executable, "-m", "onetrans_trt.cli", "bench", *TINY, *extra], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _wait_for_scratch(proc: subprocess.Popen, tmpdir: Path, timeout: float = 120.0) -> Path:
    """The process's ``onetrans-bench-*`` directory once something is written in it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        dirs = [p for p in tmpdir.glob("onetrans-bench-*") if p.is_dir()]
        if dirs and any(dirs[0].iterdir()):
            return dirs[0]
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.kill()
    out, err = proc.communicate(timeout=30)
    pytest.fail(f"no scratch directory appeared within {timeout:.0f} s (exit {proc.returncode}): {err[-800:]}")


@pytest.mark.parametrize("sig,code,word", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")])
def test_a_signal_to_a_real_bench_process_leaves_nothing(sig, code, word, tmp_path):
    tmpdir = tmp_path / "tmpdir"
    tmpdir.mkdir()
    proc = _start_bench(tmpdir)
    scratch = _wait_for_scratch(proc, tmpdir)
    proc.send_signal(sig)
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate(timeout=30)
        pytest.fail(f"bench did not stop within 60 s of {sig.name}")
    assert proc.returncode == code, err[-1500:]
    lines = [x for x in err.splitlines() if x.strip()]
    # unwound (every finally ran), or ended by the watchdog where third-party code swallowed it
    assert lines and lines[-1].startswith(word) and "Traceback" not in err, err[-1500:]
    assert not scratch.exists()
    assert ours(tmpdir) == [], (ours(tmpdir), err[-600:])


@pytest.mark.heavy
def test_a_real_bench_process_that_finishes_leaves_nothing(tmp_path):
    """The whole --quick run on a random tiny model (about a minute on 2 busy cores)."""
    tmpdir = tmp_path / "tmpdir"
    tmpdir.mkdir()
    proc = _start_bench(tmpdir)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-1500:]
    assert "per request" in out
    assert ours(tmpdir) == [], (ours(tmpdir), err[-600:])


SWALLOWER = """
import pathlib, sys, tempfile, time
from onetrans_trt import interrupts
interrupts.GRACE_S = 1.0
interrupts.install()
d = pathlib.Path(tempfile.mkdtemp(prefix="onetrans-bench-"))
interrupts.register(d)
(d / "f").write_text("x")
deadline, ready = time.monotonic() + 60, False
while time.monotonic() < deadline:
    try:
        if not ready:
            print(d, flush=True)
            ready = True
        time.sleep(0.05)
    except BaseException:  # swallows the KeyboardInterrupt / SystemExit, as some third-party code does
        pass
"""


@pytest.mark.parametrize("sig,code,word,times", [(signal.SIGINT, 130, "interrupted", 1),
                                                (signal.SIGTERM, 143, "terminated", 1),
                                                (signal.SIGINT, 130, "interrupted", 2)])
def test_the_watchdog_cleans_up_and_exits_when_unwinding_is_swallowed(sig, code, word, times, tmp_path):
    """Unwinding swallowed: the watchdog ends the run after the grace period, or a second
    Ctrl-C at once; either way the registered scratch directory is removed."""
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    proc = subprocess.Popen([sys.executable, "-c", SWALLOWER], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    scratch = Path(proc.stdout.readline().strip())
    assert scratch.is_dir() and scratch.parent == tmp_path
    t0 = time.monotonic()
    proc.send_signal(sig)
    if times == 2:
        time.sleep(0.3)
        proc.send_signal(sig)
    try:
        _, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate(timeout=30)
        pytest.fail("the watchdog did not end the process")
    assert proc.returncode == code, err
    took = time.monotonic() - t0
    assert (0.9 < took < 20) if times == 1 else took < 0.9, took  # the grace period, or at the second signal
    assert err.strip().splitlines()[-1].startswith(f"{word} (forced"), err
    assert not scratch.exists() and ours(tmp_path) == []
