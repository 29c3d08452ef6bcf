"""Atomic writes: a crash never leaves a partial artifact under its final name.

Every artifact goes through these helpers: the bytes are written to a temporary file in
the destination's own directory, flushed and fsynced, then renamed over the final name
(``os.replace`` is atomic on POSIX within one file system).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator


PAUSE_ENV = "ONETRANS_TRT_PAUSE_IN_WRITE"
_pauses = 0


def _pause_in_write(point: str, final: Path, tmp: Path) -> None:
    """Test hook: stop inside an atomic write so a test can SIGKILL the process there.

    Off (one dictionary look-up) unless ``ONETRANS_TRT_PAUSE_IN_WRITE`` names a directory.
    Then, at each pause point (a temporary file or directory complete, not yet renamed;
    an old directory moved aside, the new one not yet renamed in), the process writes
    ``<dir>/<n>.paused`` (one JSON line: pid, point, final and temporary path; ``n`` counts
    the pauses of this process from 1) and waits until ``<dir>/<n>.go`` exists.
    """
    hook = os.environ.get(PAUSE_ENV)
    if not hook:
        return
    import time

    global _pauses
    _pauses += 1
    d = Path(hook)
    note = d / f"{_pauses}.paused"
    part = d / f".{_pauses}.paused.part"
    part.write_text(json.dumps({"pid": os.getpid(), "point": point, "final": str(final), "tmp": str(tmp)}) + "\n")
    os.replace(part, note)  # the waiting test never reads a half-written note
    go = d / f"{_pauses}.go"
    deadline = time.monotonic() + 600
    while not go.exists() and time.monotonic() < deadline:
        time.sleep(0.002)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``final``; rename it over ``final`` on success.

    The caller writes the file at the yielded path by any means (a library's ``save``).
    On an exception the temporary file is removed and ``final`` is untouched.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        _pause_in_write("file", final, tmp_path)
        os.replace(tmp_path, final)
        _fsync_dir(final.parent)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_bytes(final: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(final) as tmp:
        tmp.write_bytes(data)
    return Path(final)


def atomic_write_text(final: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(final, text.encode("utf-8"))


def atomic_write_json(final: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(final, json.dumps(obj, indent=2, sort_keys=False) + "\n")


@contextlib.contextmanager
def atomic_directory(final: str | os.PathLike, *, force: bool = False) -> Iterator[Path]:
    """Build a whole directory in a temporary sibling, then move it into place.

    If ``final`` exists and ``force`` is set, it is replaced only after the new directory
    is complete (the old one is moved aside, the new one renamed in, the old one removed).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        yield tmp
        _pause_in_write("directory", final, tmp)
        if final.exists():
            if not force:
                raise FileExistsError(final)
            old = final.parent / f".{final.name}.old-{os.getpid()}"
            os.replace(final, old)
            _pause_in_write("directory-swap", final, tmp)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(final.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def build_lock(build: str | os.PathLike, what: str = "") -> Iterator[None]:
    """An exclusive lock on a build directory (``.<name>.lock`` beside it), held while a
    command writes into it: two ``export``/``convert``/``calibrate``/``build`` runs on one
    build never interleave. The OS drops the lock when its process dies (even SIGKILL), so
    no stale lock survives a crash; a second writer is refused at once, naming the holder.
    The lock file is removed on release (the holder re-checks, after locking, that the file
    it locked is still the one at the path, so removal never lets two writers in).
    """
    import fcntl

    from onetrans_trt.errors import BuildError

    build = Path(build)
    lock = build.parent / f".{build.name}.lock"
    try:
        build.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise BuildError(f"cannot write to {build.parent} ({e.strerror or e})") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.fstat(fd).st_ino != os.stat(lock).st_ino:  # removed by its previous holder
                raise BlockingIOError
        except (BlockingIOError, FileNotFoundError):
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "another process"
            raise BuildError(f"{build}: another onetrans-trt command is writing it ({holder}); "
                             f"wait for it to finish") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}{': ' + what if what else ''}\n".encode(), 0)
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                os.unlink(lock)  # still holding it: a newcomer sees a new file, or none
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def locks_build(what: str, arg: str = "build"):
    """Decorator: hold :func:`build_lock` on the function's ``arg`` (first positional or
    keyword) while it runs."""
    import functools
    import inspect

    def wrap(fn):
        sig = inspect.signature(fn)

        @functools.wraps(fn)
        def inner(*args, **kwargs):
            target = sig.bind(*args, **kwargs).arguments[arg]
            with build_lock(target, what):
                return fn(*args, **kwargs)

        return inner

    return wrap
