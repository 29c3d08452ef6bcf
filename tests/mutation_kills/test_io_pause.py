"""The atomic-write pause hook (``ONETRANS_TRT_PAUSE_IN_WRITE``) that the kill tests use to
SIGKILL a process inside the write window, tested in-process: a writer thread pauses, the
test reads the note, checks the window, and lets it go."""

from __future__ import annotations

import json
import os
import threading
import time

import pytest

import onetrans_trt.io as io_mod
from onetrans_trt.io import PAUSE_ENV, atomic_directory, atomic_write_bytes


def _wait_for(path, timeout=10.0):
    end = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < end, f"{path} never appeared"
        time.sleep(0.002)


def test_the_hook_is_off_without_the_variable(tmp_path, monkeypatch):
    monkeypatch.delenv(PAUSE_ENV, raising=False)
    before = io_mod._pauses
    atomic_write_bytes(tmp_path / "f", b"1")
    assert io_mod._pauses == before and (tmp_path / "f").read_bytes() == b"1"
    monkeypatch.setenv(PAUSE_ENV, "")  # empty: off too
    atomic_write_bytes(tmp_path / "f", b"2")
    assert io_mod._pauses == before


@pytest.mark.parametrize("force", [False, True])
def test_the_hook_pauses_inside_the_write_window_and_goes_on(tmp_path, monkeypatch, force):
    hook = tmp_path / "hook"
    hook.mkdir()
    monkeypatch.setenv(PAUSE_ENV, str(hook))
    final = tmp_path / "out" / "f.bin"
    d = tmp_path / "out" / "dir"
    if force:
        d.mkdir(parents=True)
        (d / "old").write_text("old")
    errors = []

    def writer():
        try:
            atomic_write_bytes(final, b"new")
            with atomic_directory(d, force=force) as tmp:
                (tmp / "new").write_text("new")
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    n0 = io_mod._pauses
    t = threading.Thread(target=writer, daemon=True)
    t.start()
    points = ["file", "directory"] + (["directory-swap"] if force else [])
    for i, point in enumerate(points, start=n0 + 1):
        note = hook / f"{i}.paused"
        _wait_for(note)
        rec = json.loads(note.read_text())
        assert set(rec) == {"pid", "point", "final", "tmp"}
        assert rec["pid"] == os.getpid() and rec["point"] == point
        assert not list(hook.glob(".*.part"))  # the note was renamed into place whole
        if point == "file":
            assert rec["final"] == str(final) and not final.exists()  # paused before the rename
            assert open(rec["tmp"], "rb").read() == b"new"  # the temp file is complete
        else:
            assert rec["final"] == str(d)
            assert sorted(os.listdir(rec["tmp"])) == ["new"]  # the new directory is complete
            if point == "directory":  # nothing moved yet: the old directory (or none) in place
                assert sorted(os.listdir(d)) == ["old"] if force else not d.exists()
            else:  # directory-swap: the old directory moved aside, the new one not yet in
                assert not d.exists()
        time.sleep(0.01)
        assert t.is_alive() and io_mod._pauses == i  # still waiting for its go file
        (hook / f"{i}.go").write_text("")
    t.join(10)
    assert not t.is_alive() and not errors, errors
    assert final.read_bytes() == b"new" and sorted(p.name for p in d.iterdir()) == ["new"]
