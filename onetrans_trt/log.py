"""Logging for the CLI and the libraries it drives: one place that sets the levels.

``configure(verbosity, log_file)`` (the root command's ``-v/-q/--log-file``) installs two
handlers on the root logger:

- the console (stderr): a rich handler on a terminal, plain ``LEVEL name: message`` lines
  elsewhere (our own warnings as ``warning: message``, like the CLI's ``error:`` lines).
  Default: our own warnings and errors; ``-v``: also our progress notes (INFO) and the warnings
  and errors the libraries we drive log (their loggers and their Python warnings); ``-vv``:
  everything at DEBUG, the libraries' chatter included; ``-q``: our errors only. A library's
  failure that matters raises, and reaches the console as our one-line ``error:``; what the
  libraries log at ERROR without failing (ModelOpt's "Failed to get GPU count" on a CPU host)
  is a diagnostic, for -v and the log file.
- ``--log-file PATH``: everything at DEBUG, ours and the libraries', whatever the console shows.

Python warnings (the exporter's FutureWarning/UserWarning...) are captured into the log
(``logging.captureWarnings``) instead of being printed to stderr. The same verbosity is mapped
onto ONNX Runtime's default logger severity (:func:`ort_severity`), TensorRT's logger
(:func:`trt_severity`) and ModelOpt's ``log_level`` (:func:`modelopt_level`). Output that a
library prints instead of logging goes through :func:`captured_output`.

Without ``configure`` (the Python API) nothing is installed: the application's own logging
setup applies, and the libraries stay at their quiet defaults here.
"""

from __future__ import annotations

import contextlib
import io
import logging
import sys
from pathlib import Path
from typing import Iterator

ROOT = "onetrans_trt"
_state = {"verbosity": 0, "configured": False}
_handlers: list[logging.Handler] = []


def get_logger(name: str) -> logging.Logger:
    """Our logger for a module (``onetrans_trt.<...>``)."""
    return logging.getLogger(name if name.startswith(ROOT) else f"{ROOT}.{name}")


def verbosity() -> int:
    """-1 quiet, 0 default, 1 -v, 2 -vv."""
    return int(_state["verbosity"])


def quiet() -> bool:
    return verbosity() < 0


def console_level(v: int | None = None) -> int:
    v = verbosity() if v is None else v
    return logging.ERROR if v < 0 else logging.WARNING if v == 0 else logging.INFO if v == 1 else logging.DEBUG


class _ConsoleFilter(logging.Filter):
    """Ours at the console level. The libraries' records (and captured Python warnings): their
    warnings and errors with -v, everything they log with -vv."""

    def filter(self, record: logging.LogRecord) -> bool:
        ours = record.name == ROOT or record.name.startswith(ROOT + ".")
        if ours:
            return record.levelno >= console_level()
        if record.levelno >= logging.WARNING:
            return verbosity() >= 1
        return verbosity() >= 2


class _PlainFormatter(logging.Formatter):
    """``LEVEL name: message``; our own warnings and errors read like the CLI's error lines:
    ``warning: message``."""

    def format(self, record: logging.LogRecord) -> str:
        if record.levelno >= logging.WARNING and (record.name == ROOT or record.name.startswith(ROOT + ".")):
            return f"{record.levelname.lower()}: {record.getMessage()}"
        return super().format(record)


def adopt_library_loggers() -> None:
    """torch installs its own stderr handlers (glog-style ``W1201 ...`` lines) with propagation
    off; once we are configured its records go through our handlers instead."""
    if not configured():
        return
    for name, lg in list(logging.root.manager.loggerDict.items()):
        if isinstance(lg, logging.Logger) and (name == "torch" or name.startswith("torch.")) and lg.handlers:
            for h in list(lg.handlers):
                lg.removeHandler(h)
            lg.propagate = True


def configure(verbosity_: int = 0, log_file: str | Path | None = None, *, stream=None) -> None:
    """Install the console handler (and the file handler) for this process; idempotent."""
    stream = stream or sys.stderr
    _state["verbosity"] = max(-1, min(2, int(verbosity_)))
    root = logging.getLogger()
    for h in _handlers:
        root.removeHandler(h)
        h.close()
    _handlers.clear()
    if stream.isatty():
        from rich.console import Console
        from rich.logging import RichHandler

        console: logging.Handler = RichHandler(console=Console(file=stream), show_time=False, show_path=False,
                                               markup=False, rich_tracebacks=False)
    else:
        console = logging.StreamHandler(stream)
        console.setFormatter(_PlainFormatter("%(levelname)s %(name)s: %(message)s"))
    console.addFilter(_ConsoleFilter())
    _handlers.append(console)
    if log_file is not None:
        fh = logging.FileHandler(log_file, encoding="utf-8")
        fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        fh.setLevel(logging.DEBUG)
        _handlers.append(fh)
    for h in _handlers:
        root.addHandler(h)
    root.setLevel(logging.DEBUG if log_file is not None else min(console_level(), logging.INFO))
    logging.getLogger(ROOT).setLevel(logging.DEBUG)
    logging.captureWarnings(True)
    _state["configured"] = True
    adopt_library_loggers()


def configured() -> bool:
    return bool(_state["configured"])


def ort_severity() -> int:
    """ONNX Runtime's default logger severity (0 verbose .. 4 fatal) for the verbosity; errors
    surface as exceptions, so the default keeps ORT's own printing to fatal."""
    return {-1: 4, 0: 4, 1: 2, 2: 1}[verbosity()] if configured() else 4


def trt_severity_name() -> str:
    """The ``tensorrt.Logger.Severity`` member name for the verbosity."""
    return {-1: "ERROR", 0: "WARNING", 1: "INFO", 2: "VERBOSE"}[verbosity()]


def modelopt_level() -> str:
    """ModelOpt's ``log_level`` for the verbosity."""
    return {-1: "ERROR", 0: "ERROR", 1: "INFO", 2: "DEBUG"}[verbosity()]


@contextlib.contextmanager
def captured_output(library: str) -> Iterator[io.StringIO]:
    """Whatever ``library`` prints to stdout/stderr inside the block goes into the log (INFO, on
    the logger named ``library``: shown with -vv, always in --log-file) instead of the terminal;
    yields the buffer."""
    buf = io.StringIO()
    adopt_library_loggers()
    try:
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            yield buf
    finally:
        lines = [ln for ln in buf.getvalue().splitlines() if ln.strip()]
        if lines:
            lg = logging.getLogger(library)
            for ln in lines:
                lg.info(ln)
