"""Ctrl-C and SIGTERM for the command line: unwind, and clean up even when unwinding fails.

:func:`install` (``onetrans-trt``'s ``main``) turns SIGINT into ``KeyboardInterrupt`` and
SIGTERM into ``SystemExit(143)``, so every ``finally`` runs: scratch directories are removed,
half-written outputs discarded. Some third-party code swallows an exception raised inside it
(a Python callback under C++ that catches everything, as PyTorch's exporter can, then tries
another strategy); the run would then go on. So the first signal also starts a watchdog: if
the process is still alive ``GRACE_S`` seconds later (or at a second signal), it removes the
directories and files registered with :func:`register` and exits at once with the same code; :func:`check`, after a call known
to swallow (the exporter), stops the run sooner and cleanly. A signal the parent ignores (a
background job of a non-interactive shell ignores SIGINT) stays ignored.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import threading
from pathlib import Path
from typing import Any, Iterator

GRACE_S = 5.0  # a normal unwind (removing even a large scratch build) takes well under a second
WORDS = {signal.SIGINT: "interrupted", signal.SIGTERM: "terminated"}
_registered: list[Path] = []
_received: list[int] = []


def register(path: str | os.PathLike) -> None:
    """Remove ``path`` (a directory or a file) if the watchdog has to end the process."""
    _registered.append(Path(path))


def unregister(path: str | os.PathLike) -> None:
    p = Path(path)
    if p in _registered:
        _registered.remove(p)


@contextlib.contextmanager
def temporary_directory(prefix: str = "onetrans-", dir: str | os.PathLike | None = None) -> Iterator[Path]:
    """A fresh directory (under ``dir``, default the temporary directory) removed on exit: a
    return, an error, Ctrl-C (a second Ctrl-C during the removal does not stop it), SIGTERM,
    and by the watchdog if the unwinding is swallowed."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=dir))
    register(tmp)
    try:
        yield tmp
    finally:
        try:
            shutil.rmtree(tmp, ignore_errors=True)
        except KeyboardInterrupt:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        finally:
            unregister(tmp)


def check() -> None:
    """Raise again a signal whose exception a library swallowed (call after such a library
    returns: PyTorch's exporter): the run stops here, unwinding normally, instead of going on
    until the watchdog ends it."""
    if _received:
        signum = _received[-1]
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(128 + signum)


def _hard_exit(signum: int) -> None:
    for p in list(_registered):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    # to the process's stderr itself: sys.stderr may be redirected into a buffer at this moment
    # (log.captured_output around the exporter), which os._exit would throw away
    msg = f"{WORDS.get(signum, 'terminated')} (forced: the run had not stopped; scratch files removed)\n"
    with contextlib.suppress(OSError):
        os.write(2, msg.encode())
    os._exit(128 + signum)


def _handler(signum: int, frame: Any) -> None:
    if _received:  # a second Ctrl-C (or SIGTERM) while the first is still unwinding: stop now
        _hard_exit(signum)
    watchdog = threading.Timer(GRACE_S, _hard_exit, args=(signum,))
    watchdog.daemon = True
    watchdog.start()
    _received.append(signum)
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    with contextlib.suppress(OSError):  # not sys.stderr: it may be redirected into a buffer now
        os.write(2, (WORDS.get(signum, "terminated") + "\n").encode())
    raise SystemExit(128 + signum)


def install() -> None:
    """Our handlers for SIGINT (unless ignored, or replaced by the embedding program) and
    SIGTERM (unless ignored or handled already). Main thread only."""
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _handler)
    if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _handler)
