"""The benchmarks' scratch directory: removed when the run ends, however it ends."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

from onetrans_trt import interrupts

PREFIX = "onetrans-bench-"


@contextlib.contextmanager
def scratch_dir(work: str | Path | None = None) -> Iterator[Path]:
    """``work`` as given (the caller's directory, kept), else a fresh ``onetrans-bench-*``
    directory under the temporary directory, removed on exit: a return, an error, Ctrl-C or
    SIGTERM, and by the watchdog of :mod:`onetrans_trt.interrupts` if unwinding is swallowed."""
    if work is not None:
        yield Path(work)
        return
    with interrupts.temporary_directory(prefix=PREFIX) as tmp:
        yield tmp
