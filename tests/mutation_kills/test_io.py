"""Atomic writes and the build lock, tested directly (mutation testing found that only the
slow SIGKILL tests reached ``onetrans_trt.io``, and they do not pin its details)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from onetrans_trt.errors import BuildError
from onetrans_trt.io import (
    atomic_directory,
    atomic_path,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    build_lock,
    locks_build,
)


def _siblings(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


def test_atomic_path_renames_the_temp_file_over_the_final_name(tmp_path):
    final = tmp_path / "sub" / "sub2" / "a.bin"  # missing parents are created
    with atomic_path(final) as tmp:
        assert tmp.parent == final.parent and tmp.name.startswith(".a.bin.") and tmp.name.endswith(".tmp")
        assert not final.exists()
        tmp.write_bytes(b"xyz")
    assert final.read_bytes() == b"xyz"
    assert _siblings(final.parent) == ["a.bin"]  # no temp file left


def test_atomic_path_on_error_keeps_the_old_file_and_removes_the_temp(tmp_path):
    final = tmp_path / "a.bin"
    final.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_path(final) as tmp:
            tmp.write_bytes(b"new")
            raise RuntimeError("boom")
    assert final.read_bytes() == b"old"
    assert _siblings(tmp_path) == ["a.bin"]


def test_atomic_write_helpers_write_exact_bytes_text_and_json(tmp_path):
    p = atomic_write_bytes(tmp_path / "b", b"\x00\x01")
    assert p == tmp_path / "b" and isinstance(p, Path) and p.read_bytes() == b"\x00\x01"
    p = atomic_write_text(tmp_path / "t", "héllo")
    assert p == tmp_path / "t" and p.read_bytes() == "héllo".encode("utf-8")
    obj = {"z": 1, "a": [1, 2]}
    p = atomic_write_json(tmp_path / "j.json", obj)
    assert p == tmp_path / "j.json"
    text = p.read_text()
    assert text == json.dumps(obj, indent=2) + "\n"  # key order kept, two-space indent, final newline
    assert json.loads(text) == obj
    assert _siblings(tmp_path) == ["b", "j.json", "t"]


def test_atomic_directory_moves_a_complete_directory_into_place(tmp_path):
    final = tmp_path / "p" / "q" / "d"  # missing parents are created
    with atomic_directory(final) as tmp:
        assert tmp.parent == final.parent and tmp.name.startswith(".d.") and tmp.name.endswith(".tmp")
        (tmp / "f").write_text("1")
        assert not final.exists()
    assert (final / "f").read_text() == "1"
    assert _siblings(final.parent) == ["d"]


def test_atomic_directory_refuses_an_existing_directory_without_force(tmp_path):
    final = tmp_path / "d"
    final.mkdir()
    (final / "old").write_text("old")
    with pytest.raises(FileExistsError) as e:
        with atomic_directory(final) as tmp:
            (tmp / "new").write_text("new")
    assert str(final) in str(e.value)
    assert _siblings(final) == ["old"]
    assert _siblings(tmp_path) == ["d"]  # the temp directory is gone


def test_atomic_directory_with_force_replaces_the_old_directory_whole(tmp_path):
    final = tmp_path / "d"
    final.mkdir()
    (final / "old").write_text("old")
    with atomic_directory(final, force=True) as tmp:
        (tmp / "new").write_text("new")
        assert _siblings(final) == ["old"]  # untouched until the new one is complete
    assert _siblings(final) == ["new"]
    assert _siblings(tmp_path) == ["d"]  # neither the old copy nor the temp is left


def test_atomic_directory_on_error_leaves_nothing(tmp_path):
    final = tmp_path / "d"
    with pytest.raises(RuntimeError):
        with atomic_directory(final) as tmp:
            (tmp / "x").write_text("x")
            raise RuntimeError
    assert _siblings(tmp_path) == []


def test_build_lock_writes_the_holder_and_removes_the_lock_file(tmp_path):
    build = tmp_path / "nested" / "deeper" / "b"  # missing parents are created
    lock = build.parent / ".b.lock"
    with build_lock(build, "export"):
        assert lock.read_text() == f"pid {os.getpid()}: export\n"
    assert not lock.exists()
    with build_lock(build):
        assert lock.read_text() == f"pid {os.getpid()}\n"
    assert not lock.exists()


def test_build_lock_refuses_a_second_writer_naming_the_holder(tmp_path):
    build = tmp_path / "b"
    with build_lock(build, "export"):
        with pytest.raises(BuildError) as e:
            with build_lock(build, "convert"):
                pass  # pragma: no cover
        msg = str(e.value)
        assert msg == (f"{build}: another onetrans-trt command is writing it (pid {os.getpid()}: export); "
                       f"wait for it to finish")
        # the refused writer did not truncate or rewrite the holder's line
        assert (tmp_path / ".b.lock").read_text() == f"pid {os.getpid()}: export\n"
    with build_lock(build, "again"):  # released: a new writer gets it
        pass


def test_build_lock_refuses_when_the_lock_file_was_replaced(tmp_path, monkeypatch):
    """The holder re-checks, after locking, that the file it locked is the one at the path."""
    import fcntl

    build = tmp_path / "b"
    lock = tmp_path / ".b.lock"
    real_flock = fcntl.flock

    def flock_then_replace(fd, op):
        real_flock(fd, op)
        if op & fcntl.LOCK_EX:  # another holder removes the file right after we locked it
            os.unlink(lock)
            lock.write_text("pid 1: other\n")

    monkeypatch.setattr(fcntl, "flock", flock_then_replace)
    with pytest.raises(BuildError, match=r"another onetrans-trt command is writing it \(another process\)"):
        with build_lock(build, "x"):
            pass  # pragma: no cover


def test_build_lock_released_on_error_in_the_body(tmp_path):
    build = tmp_path / "b"
    with pytest.raises(ValueError):
        with build_lock(build, "w"):
            raise ValueError
    assert not (tmp_path / ".b.lock").exists()
    with build_lock(build, "w"):
        pass


def test_build_lock_on_an_unwritable_parent_is_a_build_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(BuildError) as e:
        with build_lock(blocker / "b"):
            pass  # pragma: no cover
    assert str(e.value) == f"cannot write to {blocker} (File exists)"  # the strerror, not the repr


def test_locks_build_holds_the_lock_on_the_named_argument(tmp_path):
    seen = []

    @locks_build("convert")
    def convert(build, precision="fp16"):
        seen.append((build, precision, (Path(build).parent / f".{Path(build).name}.lock").read_text()))
        return "done"

    @locks_build("calibrate", arg="target")
    def calibrate(data, target=None):
        seen.append((target, (Path(target).parent / f".{Path(target).name}.lock").read_text()))
        return 7

    b = tmp_path / "b"
    assert convert(b, precision="int8") == "done"
    assert convert(build=b) == "done"
    assert calibrate("d", target=tmp_path / "c") == 7
    pid = os.getpid()
    assert seen == [(b, "int8", f"pid {pid}: convert\n"), (b, "fp16", f"pid {pid}: convert\n"),
                    (tmp_path / "c", f"pid {pid}: calibrate\n")]
    assert convert.__name__ == "convert"  # functools.wraps
    with build_lock(b, "held"):
        with pytest.raises(BuildError, match="held"):
            convert(b)


def test_build_lock_file_mode_is_0644(tmp_path):
    old = os.umask(0)
    try:
        with build_lock(tmp_path / "b"):
            assert (tmp_path / ".b.lock").stat().st_mode & 0o777 == 0o644
    finally:
        os.umask(old)


def test_build_lock_names_at_most_200_bytes_of_a_holder_and_survives_bad_utf8(tmp_path):
    import fcntl

    build = tmp_path / "b"
    lock = tmp_path / ".b.lock"
    for content, shown in [(b"x" * 300, "x" * 200), (b"pid 9 \xff\xfe", "pid 9 \ufffd\ufffd")]:
        lock.write_bytes(content)
        fd = os.open(lock, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # a foreign holder
            with pytest.raises(BuildError) as e:
                with build_lock(build, "w"):
                    pass  # pragma: no cover
            assert f"is writing it ({shown}); wait" in str(e.value)
        finally:
            os.close(fd)


def test_build_lock_release_tolerates_a_lock_file_already_gone(tmp_path):
    with build_lock(tmp_path / "b"):
        os.unlink(tmp_path / ".b.lock")
    with build_lock(tmp_path / "b"):  # and the lock is free
        pass


def _rmtree_failing_unless_ignored(real):
    def rmtree(path, ignore_errors=False, **kw):
        if not ignore_errors:
            raise OSError(f"cannot remove {path}")
        real(path, ignore_errors=True, **kw)

    return rmtree


def test_atomic_directory_a_failed_removal_of_the_old_copy_does_not_fail_the_write(tmp_path, monkeypatch):
    import shutil

    import onetrans_trt.io as io_mod

    monkeypatch.setattr(io_mod.shutil, "rmtree", _rmtree_failing_unless_ignored(shutil.rmtree))
    final = tmp_path / "d"
    final.mkdir()
    (final / "old").write_text("old")
    with atomic_directory(final, force=True) as tmp:
        (tmp / "new").write_text("new")
    assert _siblings(final) == ["new"]
    with pytest.raises(RuntimeError, match="body"):  # the body's error, not the cleanup's
        with atomic_directory(tmp_path / "e") as tmp:
            raise RuntimeError("body")
