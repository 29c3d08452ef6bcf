"""Atomic writes: a crash never leaves a partial artifact under its final name.

Every artifact goes through these helpers: the bytes are written to a temporary file in
the destination's own directory, flushed and fsynced, then renamed over the final name
(``os.replace`` is atomic on POSIX within one file system). The temporary files and
directories get the modes a plain ``open``/``mkdir`` would give under the process umask
(0644/0755 under umask 022), not mkstemp's 0600 or mkdtemp's 0700: artifacts are read by
other users (a Triton container running as another user reads a model repository).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from onetrans_trt import interrupts


class TooBig(Exception):
    """A file over the bound :func:`read_regular_file` was given (``size``: what was seen)."""

    def __init__(self, size: int):
        super().__init__(size)
        self.size = size


class NotRegular(OSError):
    """A device, pipe or socket where a file was expected."""


def read_regular_file(path: str | os.PathLike, bound: int) -> bytes:
    """The bytes of a regular file of at most ``bound`` bytes. A device, pipe or socket raises
    :class:`NotRegular` without blocking (O_NONBLOCK: a FIFO with no writer included); a larger
    file (or one that grows while read, or a /proc file that reports size 0) raises
    :class:`TooBig` with the size seen; the rest is the OSError of the open (a path holding a NUL
    byte included: EINVAL, not the ValueError ``os.open`` raises)."""
    import errno
    import stat

    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except ValueError as e:  # a NUL byte in the path (no file has that name): an OSError like the rest
        raise OSError(errno.EINVAL, str(e), str(path)) from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
        if not stat.S_ISREG(st.st_mode):
            raise NotRegular(f"{path}: not a regular file (a device, pipe or socket)")
        if st.st_size > bound:
            raise TooBig(st.st_size)
        # in steps of the size the file reports (at least 1 MiB), never one read of bound + 1
        # bytes: read(n) allocates n bytes first (a MemoryError for a bound of 64 GiB, a
        # 64 MiB request limit times 1024 requests; an OverflowError past sys.maxsize)
        want, step = bound + 1, max(st.st_size + 1, 1 << 20)
        parts, got = [], 0
        with os.fdopen(os.dup(fd), "rb", buffering=0) as f:
            while got < want:
                chunk = f.read(min(step, want - got))
                if not chunk:
                    break
                parts.append(chunk)
                got += len(chunk)
        if got > bound:
            raise TooBig(got)
        return b"".join(parts)
    finally:
        os.close(fd)


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


def current_umask() -> int:
    """The process umask, read without changing it where Linux reports it
    (``/proc/self/status``); elsewhere set and restored at once."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def readable_mkdtemp(prefix: str, suffix: str, dir: str | os.PathLike) -> Path:
    """``tempfile.mkdtemp`` with the mode ``mkdir`` would give (0755 under umask 022), not
    0700: for a directory that becomes an artifact (renamed into place)."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix, suffix=suffix, dir=dir))
    os.chmod(tmp, 0o777 & ~current_umask())
    return tmp


def make_readable(path: str | os.PathLike) -> None:
    """Give ``path`` (and, for a directory, everything under it) the read bits (and for
    directories and owner-executable files the search/execute bits) that the umask allows:
    a library that writes 0600 (safetensors) leaves 0644 under umask 022, a 0700 script
    0755. Write bits stay as they are; symbolic links are not followed."""
    import stat

    mask = current_umask()
    path = Path(path)
    todo = [path]
    if path.is_dir() and not path.is_symlink():
        todo += list(path.rglob("*"))
    for p in todo:
        st = os.lstat(p)
        if stat.S_ISLNK(st.st_mode):
            continue
        mode = stat.S_IMODE(st.st_mode)
        add = (0o555 if stat.S_ISDIR(st.st_mode) or mode & 0o100 else 0o444) & ~mask
        if mode & add != add:
            os.chmod(p, mode | add)


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
    try:
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp's 0600 -> what open() would give
    finally:
        os.close(fd)
    tmp_path = Path(tmp)
    interrupts.register(tmp_path)  # removed also if a Ctrl-C's unwinding is swallowed
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        make_readable(tmp_path)  # the writer may have replaced the file with a 0600 one
        _pause_in_write("file", final, tmp_path)
        os.replace(tmp_path, final)
        _fsync_dir(final.parent)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()
        interrupts.unregister(tmp_path)


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
    tmp = readable_mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    interrupts.register(tmp)  # removed also if a Ctrl-C's unwinding is swallowed
    try:
        yield tmp
        make_readable(tmp)  # what a library wrote 0600 (safetensors) is readable too
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
        interrupts.unregister(tmp)


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
