"""The Triton Inference Server that ships in the ``nvidia-pytriton`` wheel, on loopback.

    from onetrans_trt.serving.server import TritonServer

    with TritonServer("triton-repo") as server:      # installs on first use, waits for ready
        server.http_url, server.grpc_url              # 127.0.0.1:<free port>
    # stopped here, whatever happened: SIGTERM, then SIGKILL of its whole session

**Install.** ``pip download --no-deps nvidia-pytriton==0.7.0`` gives a wheel holding a real
``tritonserver`` (2.51.0), its libraries (``nvidia_pytriton.libs/``) and the Python backend
with one stub per Python version. :func:`install` unpacks only those into
``~/.cache/onetrans-trt/tritonserver/0.7.0`` (``ONETRANS_TRT_TRITON_HOME`` moves the cache;
``ONETRANS_TRT_PYTRITON_WHEEL`` names a wheel already downloaded), atomically (a crash leaves
no half install; two processes installing at once both end with the same one). The
backend directory for Python X.Y (``backends-pyX.Y/python/``) gets that version's stub
copied in beside ``libtriton_python.so``, as the Python backend expects.

**The Python the models run in.** The stub embeds ``libpython3.X`` and, like ``python``
itself, finds its ``sys.prefix`` by looking up ``python3`` on ``PATH``: with a virtual
environment's ``bin/`` first on the server's ``PATH`` the stub's interpreter *is* that
environment (its site-packages). That environment needs numpy < 2: the wheel's stubs read
numpy 1.x array descriptors, and under numpy 2 every tensor a model reads is zeros and
every tensor it returns is empty (seen; ``nvidia-pytriton`` itself pins ``numpy<2``).
:func:`serving_python` picks it: ``ONETRANS_TRT_TRITON_PYTHON`` if set, this environment
if its numpy is 1.x, else a layered venv made once in the cache (numpy 1.26 only, then this
environment's site-packages for onnxruntime, onnx and the rest). The stub ignores
``PYTHONPATH``; the models :mod:`~onetrans_trt.serving.repository` writes add its entries
to ``sys.path`` themselves (a source checkout run with ``PYTHONPATH=.`` serves its own
code). :func:`server_env` sets ``PATH`` and ``PYTHONPATH``, plus ``LD_LIBRARY_PATH`` for the
wheel's libraries and this interpreter's ``libpython`` (a pyenv or python.org build keeps it
in ``sysconfig``'s ``LIBDIR``). No ``EXECUTION_ENV_PATH`` (a conda-pack archive) is needed.

**Stopping.** The server runs in its own session (``start_new_session``), with the Python
stubs it spawns; :meth:`TritonServer.stop` sends SIGTERM to the session's process group,
waits (bounded), then SIGKILLs the group and any process left in the session, and returns
only when none is left (zombies aside). It also dies with its parent
(``PR_SET_PDEATHSIG``) and at interpreter exit (``atexit``).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path
from typing import Any, Iterator

from onetrans_trt.errors import MissingCapabilityError, OneTransError

PYTRITON_VERSION = "0.7.0"  # ships tritonserver 2.51.0 (r24.10)
HOME_ENV = "ONETRANS_TRT_TRITON_HOME"
WHEEL_ENV = "ONETRANS_TRT_PYTRITON_WHEEL"
_MEMBERS = ("pytriton/tritonserver/", "nvidia_pytriton.libs/")


class ServerError(OneTransError):
    """The server did not start, did not become ready in time, or would not stop."""


def cache_root() -> Path:
    home = os.environ.get(HOME_ENV)
    return Path(home) if home else Path.home() / ".cache" / "onetrans-trt" / "tritonserver"


class TritonInstall:
    """An unpacked wheel: ``root/pytriton/tritonserver/...`` and ``root/nvidia_pytriton.libs``."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.server_dir = self.root / "pytriton" / "tritonserver"
        self.binary = self.server_dir / "bin" / "tritonserver"
        self.libs = self.root / "nvidia_pytriton.libs"

    def ok(self) -> bool:
        return self.binary.is_file() and (self.server_dir / "backends" / "python" / "libtriton_python.so").is_file()

    def stub(self, python: tuple[int, int]) -> Path:
        return self.server_dir / "python_backend_stubs" / f"{python[0]}.{python[1]}" / "triton_python_backend_stub"

    def backend_directory(self, python: tuple[int, int] | None = None) -> Path:
        """``backends-pyX.Y/``: the Python backend with the stub of Python X.Y (default: this
        interpreter's) copied in; made once, atomically. Same depth as the wheel's own
        ``backends/`` so the libraries' ``$ORIGIN`` run paths still resolve."""
        from onetrans_trt.io import atomic_directory

        python = python or sys.version_info[:2]
        out = self.server_dir / f"backends-py{python[0]}.{python[1]}"
        if (out / "python" / "triton_python_backend_stub").is_file():
            return out
        stub = self.stub(python)
        if not stub.is_file():
            have = sorted(p.name for p in (self.server_dir / "python_backend_stubs").iterdir())
            raise MissingCapabilityError(f"the Triton Python backend has no stub for Python {python[0]}.{python[1]} "
                                         f"(it has {', '.join(have)}); run the server from one of those")
        src = self.server_dir / "backends" / "python"
        try:
            with atomic_directory(out) as tmp:
                (tmp / "python").mkdir()
                for f in ("libtriton_python.so", "triton_python_backend_utils.py"):
                    shutil.copy2(src / f, tmp / "python" / f)
                shutil.copy2(stub, tmp / "python" / "triton_python_backend_stub")
                _normal_modes(tmp)
        except FileExistsError:  # another process made it meanwhile
            pass
        return out


def _normal_modes(root: Path) -> None:
    """The wheel's files are 0666/0777: make them what the umask gives (never world-writable)."""
    from onetrans_trt.io import current_umask

    mask = current_umask()
    for p in [root, *root.rglob("*")]:
        if p.is_symlink():
            continue
        mode = stat.S_IMODE(p.stat().st_mode)
        execute = p.is_dir() or mode & 0o100
        os.chmod(p, (0o777 if execute else 0o666) & ~mask)


@contextlib.contextmanager
def _cache_lock(timeout: float = 1800.0) -> Iterator[None]:
    """One process at a time fills the cache (two test workers, two users' first runs); the
    OS drops the lock when its holder dies."""
    import fcntl

    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    fd = os.open(root / ".install.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise MissingCapabilityError(f"{root}: another process has been installing the Triton "
                                                 f"server for {timeout:.0f} s; remove {root} and retry") from None
                time.sleep(0.2)
        yield
    finally:
        os.close(fd)


def install(version: str = PYTRITON_VERSION, *, wheel: str | os.PathLike | None = None,
            download_timeout: float = 900.0) -> TritonInstall:
    """The unpacked server for ``version``, unpacking (and first downloading, with ``pip
    download --no-deps``) the wheel if the cache does not hold it yet."""
    root = cache_root() / version
    inst = TritonInstall(root)
    if inst.ok():
        return inst
    with _cache_lock():
        if inst.ok():  # another process installed it meanwhile
            return inst
        return _install(version, wheel, download_timeout, root, inst)


def _install(version: str, wheel, download_timeout: float, root: Path, inst: TritonInstall) -> TritonInstall:
    from onetrans_trt import interrupts
    from onetrans_trt.io import atomic_directory

    wheel = wheel or os.environ.get(WHEEL_ENV)
    with interrupts.temporary_directory(prefix="onetrans-pytriton-") as scratch:
        if wheel is None:
            wheel = _download(version, scratch, download_timeout)
        wheel = Path(wheel)
        if not wheel.is_file():
            raise MissingCapabilityError(f"{wheel}: no such wheel (nvidia-pytriton {version})")
        try:
            with atomic_directory(root) as tmp:
                with zipfile.ZipFile(wheel) as zf:
                    names = [n for n in zf.namelist() if n.startswith(_MEMBERS)]
                    if not any(n.endswith("bin/tritonserver") for n in names):
                        raise MissingCapabilityError(f"{wheel}: holds no tritonserver binary")
                    for info in zf.infolist():
                        if info.filename not in names or info.is_dir():
                            continue
                        target = tmp / info.filename
                        if not target.resolve().is_relative_to(tmp.resolve()):
                            raise MissingCapabilityError(f"{wheel}: member {info.filename} escapes the directory")
                        target.parent.mkdir(parents=True, exist_ok=True)
                        with zf.open(info) as src, open(target, "wb") as dst:
                            shutil.copyfileobj(src, dst)
                        if (info.external_attr >> 16) & 0o100:
                            os.chmod(target, 0o755)
                _normal_modes(tmp)
                (tmp / "install.json").write_text(json.dumps({"nvidia-pytriton": version, "wheel": wheel.name}) + "\n")
        except FileExistsError:  # another process installed it meanwhile
            pass
    if not inst.ok():
        raise MissingCapabilityError(f"{root}: the unpacked nvidia-pytriton {version} has no tritonserver")
    return inst


def _download(version: str, where: Path, timeout: float) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "-q", f"nvidia-pytriton=={version}", "-d", str(where)]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise MissingCapabilityError(f"`pip download nvidia-pytriton=={version}` took over {timeout:.0f} s") from None
    wheels = sorted(where.glob("nvidia_pytriton-*.whl"))
    if p.returncode != 0 or not wheels:
        raise MissingCapabilityError(f"cannot download nvidia-pytriton=={version} (it ships tritonserver): "
                                     f"{(p.stderr or p.stdout).strip()[-400:]}; or set {WHEEL_ENV} to the wheel")
    return wheels[0]


PYTHON_ENV = "ONETRANS_TRT_TRITON_PYTHON"
NUMPY_SPEC = "numpy>=1.23.3,<2"  # the stub's pybind11 reads numpy 1.x array descriptors (nvidia-pytriton: numpy<2)


def serving_python(install_timeout: float = 600.0) -> Path:
    """The ``bin/`` directory of the Python environment the Python backend stubs run in.

    The wheel's stubs were built with a pybind11 that reads numpy 1.x array descriptors:
    under numpy 2 every tensor a model reads is zeros and every tensor it returns is empty
    (seen; ``nvidia-pytriton`` itself requires ``numpy<2``). So: ``ONETRANS_TRT_TRITON_PYTHON``
    (a ``python`` whose environment has numpy < 2, onnxruntime and onetrans-trt) if set; else
    this interpreter's environment if its numpy is 1.x; else a small layered environment made
    once in the cache: a venv of this interpreter holding only numpy 1.x, which then adds this
    environment's site-packages (onnxruntime, onnx, ...; their wheels work with numpy 1.x and 2.x)."""
    import hashlib
    import site

    import numpy

    from onetrans_trt import interrupts
    from onetrans_trt.io import atomic_directory

    given = os.environ.get(PYTHON_ENV)
    if given:
        exe = Path(given)
        if not exe.is_file():
            raise MissingCapabilityError(f"{PYTHON_ENV}={given}: no such python")
        return exe.parent
    if int(numpy.__version__.split(".")[0]) < 2:
        return Path(sys.executable).parent
    sites = [p for p in site.getsitepackages() if Path(p).is_dir()]
    key = hashlib.sha256("\n".join([sys.prefix, *sites]).encode()).hexdigest()[:10]
    py = f"{sys.version_info[0]}.{sys.version_info[1]}"
    root = cache_root() / f"python-{py}-numpy1-{key}"
    if (root / "bin" / "python").exists() and (root / "ready").is_file():
        return root / "bin"
    with _cache_lock():
        if (root / "bin" / "python").exists() and (root / "ready").is_file():
            return root / "bin"
        return _layered_python(root, py, sites, install_timeout)


def _layered_python(root: Path, py: str, sites: list[str], install_timeout: float) -> Path:
    from onetrans_trt import interrupts
    from onetrans_trt.io import atomic_directory

    try:
        with atomic_directory(root) as tmp:
            p = subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp)], capture_output=True,
                               text=True, timeout=120)
            if p.returncode != 0:
                raise MissingCapabilityError(f"cannot make the Triton Python environment: {p.stderr.strip()[-300:]}")
            lib = tmp / "lib" / f"python{py}" / "site-packages"
            with interrupts.temporary_directory(prefix="onetrans-pip-"):
                p = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check",
                                    "--no-deps", "--only-binary=:all:", "--target", str(lib), NUMPY_SPEC],
                                   capture_output=True, text=True, timeout=install_timeout)
            if p.returncode != 0:
                raise MissingCapabilityError(
                    f"cannot install {NUMPY_SPEC} for the Triton Python backend: {(p.stderr or p.stdout).strip()[-300:]}"
                    f"; or set {PYTHON_ENV} to a python with numpy<2, onnxruntime and onetrans-trt")
            # after its own numpy: this environment's packages (and their .pth files: editable installs)
            (lib / "zz-onetrans-trt-base.pth").write_text(
                "import site; " + "; ".join(f"site.addsitedir({s!r})" for s in sites) + "\n")
            (tmp / "ready").write_text(json.dumps({"numpy": NUMPY_SPEC, "base": sites}) + "\n")
    except FileExistsError:  # another process made it meanwhile
        pass
    return root / "bin"


def libpython_dir() -> Path | None:
    """The directory of this interpreter's ``libpython3.X.so.1.0``, if it has one."""
    libdir, soname = sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("INSTSONAME")
    if libdir and soname and (Path(libdir) / soname).is_file():
        return Path(libdir)
    return None


def package_root() -> Path:
    """The directory holding the ``onetrans_trt`` package this process imported."""
    import onetrans_trt

    return Path(onetrans_trt.__file__).resolve().parents[1]


def server_env(install: TritonInstall, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for ``tritonserver`` whose Python models run in this interpreter's
    environment (see the module docstring)."""
    env = dict(os.environ if base is None else base)
    bin_dir = str(serving_python())  # a venv's bin/: not resolved (its pyvenv.cfg is beside it)
    env["PATH"] = os.pathsep.join([bin_dir, *[p for p in env.get("PATH", "").split(os.pathsep) if p and p != bin_dir]])
    libs = [str(install.libs)]
    lp = libpython_dir()
    if lp is not None:
        libs.append(str(lp))
    env["LD_LIBRARY_PATH"] = os.pathsep.join(libs + [p for p in env.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p])
    root = str(package_root())
    env["PYTHONPATH"] = os.pathsep.join([root, *[p for p in env.get("PYTHONPATH", "").split(os.pathsep)
                                                 if p and p != root]])
    return env


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports free on 127.0.0.1 right now (bound at once, then released)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _session_members(sid: int) -> list[int]:
    """Live (not zombie) processes of session ``sid``."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            raw = (d / "stat").read_text()
        except OSError:
            continue
        fields = raw[raw.rindex(")") + 2:].split()  # after "pid (comm) "
        state, session = fields[0], int(fields[3])
        if session == sid and state not in ("Z", "X"):
            out.append(int(d.name))
    return out


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - best effort: the context manager and atexit stop it too
        pass


_running: list["TritonServer"] = []


@atexit.register
def _stop_all() -> None:  # pragma: no cover - exercised at interpreter exit
    for server in list(_running):
        with contextlib.suppress(Exception):
            server.stop()


class TritonServer:
    """``tritonserver`` on ``repository``, HTTP and gRPC on free loopback ports; a context
    manager that waits for readiness on entry and always stops the server on exit.

    ``ready_timeout``: seconds for every model to load (a Python model imports onnxruntime
    and our package, ~2 s each on 2 cores); ``stop_timeout``: seconds of graceful shutdown
    before SIGKILL; ``log``: where the server writes its log (default: a temporary file,
    removed on a clean stop); ``args``: more ``tritonserver`` options."""

    def __init__(self, repository: str | os.PathLike, *, install_dir: TritonInstall | None = None,
                 ready_timeout: float = 180.0, stop_timeout: float = 15.0, log: str | os.PathLike | None = None,
                 args: list[str] | tuple[str, ...] = (), env: dict[str, str] | None = None):
        self.repository = Path(repository).resolve()
        self.install = install_dir
        self.ready_timeout, self.stop_timeout = ready_timeout, stop_timeout
        self.args = list(args)
        self.base_env = env
        self.log_path: Path | None = Path(log) if log else None
        self._own_log = log is None
        self.proc: subprocess.Popen | None = None
        self.http_port = self.grpc_port = 0

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> "TritonServer":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def command(self) -> list[str]:
        inst = self.install
        assert inst is not None
        return [str(inst.binary), "--model-repository", str(self.repository),
                "--backend-directory", str(inst.backend_directory()),
                "--http-address", "127.0.0.1", "--http-port", str(self.http_port),
                "--grpc-address", "127.0.0.1", "--grpc-port", str(self.grpc_port),
                "--allow-metrics", "false", "--exit-timeout-secs", str(max(1, int(self.stop_timeout) - 2)),
                *self.args]

    def start(self) -> None:
        """Start the server and wait until it is ready (3 tries if a port was taken meanwhile)."""
        if self.proc is not None:
            raise ServerError("this server is already started")
        self.install = self.install or install()
        if libpython_dir() is None:
            import ctypes.util

            if ctypes.util.find_library(f"python{sys.version_info[0]}.{sys.version_info[1]}") is None:
                raise MissingCapabilityError(
                    f"no libpython{sys.version_info[0]}.{sys.version_info[1]}.so here: the Triton Python backend "
                    "embeds it; use a Python built with --enable-shared (pyenv: "
                    "PYTHON_CONFIGURE_OPTS=--enable-shared)")
        if self.log_path is None:
            fd, name = tempfile.mkstemp(prefix="tritonserver-", suffix=".log")
            os.close(fd)
            self.log_path = Path(name)
        env = server_env(self.install, self.base_env)
        for attempt in range(3):
            self.http_port, self.grpc_port = free_ports(2)
            with open(self.log_path, "ab") as log:
                self.proc = subprocess.Popen(self.command(), env=env, stdin=subprocess.DEVNULL, stdout=log,
                                             stderr=subprocess.STDOUT, start_new_session=True,
                                             preexec_fn=_die_with_parent, cwd=str(self.repository))
            _running.append(self)
            try:
                self.wait_ready()
                return
            except ServerError as e:
                port_taken = "already in use" in self.log_tail(4000).lower()
                self.stop(keep_log=True)
                if not port_taken or attempt == 2:
                    raise ServerError(f"{e}") from None

    def wait_ready(self, timeout: float | None = None) -> None:
        """Poll ``/v2/health/ready`` until 200 (bounded); the server exiting ends the wait."""
        deadline = time.monotonic() + (self.ready_timeout if timeout is None else timeout)
        url = f"http://{self.http_url}/v2/health/ready"
        while True:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise ServerError(f"tritonserver exited with status {self.proc.returncode} before it was ready (log: "
                                  f"{self.log_path}):\n"
                                  f"{self.log_errors()}")
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise ServerError(f"tritonserver was not ready after {self.ready_timeout:.0f} s (log: "
                                  f"{self.log_path}):\n{self.log_errors()}")
            time.sleep(0.2)

    def leftovers(self) -> list[int]:
        """Live processes of the server's session (the server and its Python stubs)."""
        return _session_members(self.proc.pid) if self.proc is not None else []

    def stop(self, keep_log: bool = False) -> None:
        """SIGTERM the server's process group, wait up to ``stop_timeout``, then SIGKILL the
        group and every process left in its session; returns when none is left (bounded)."""
        proc = self.proc
        if proc is None:
            return
        sid = proc.pid
        try:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(sid, signal.SIGTERM)
                try:
                    proc.wait(timeout=self.stop_timeout)
                except subprocess.TimeoutExpired:
                    pass
            deadline = time.monotonic() + 10
            while True:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(sid, signal.SIGKILL)
                for pid in _session_members(sid):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=1)
                if proc.poll() is not None and not _session_members(sid):
                    break
                if time.monotonic() > deadline:
                    raise ServerError(f"tritonserver (session {sid}) left processes "
                                      f"{_session_members(sid)} after SIGKILL")
                time.sleep(0.1)
        finally:
            if self in _running:
                _running.remove(self)
            self.proc = None
            self.last_pid = sid
            if self._own_log and not keep_log and self.log_path is not None and proc.returncode in (0, -15, -9):
                with contextlib.suppress(OSError):
                    self.log_path.unlink()
                self.log_path = None

    def log_errors(self, lines: int = 12) -> str:
        """The log's error lines (Triton's ``E<date>`` lines and its final ``error:``), else its tail."""
        import re

        text = self.log_tail(200_000)
        errs = [ln for ln in text.splitlines() if re.match(r"E\d{4} ", ln) or ln.startswith("error:")]
        return "\n".join(errs[-lines:]) if errs else text[-2000:]

    def log_tail(self, chars: int = 3000) -> str:
        if self.log_path is None or not self.log_path.is_file():
            return ""
        with open(self.log_path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - chars))
            return f.read().decode("utf-8", "replace")


@contextlib.contextmanager
def serve(repository: str | os.PathLike, **kw: Any) -> Iterator[TritonServer]:
    """``with serve(repo) as server:`` — :class:`TritonServer` as a function."""
    with TritonServer(repository, **kw) as server:
        yield server


def main(argv: list[str] | None = None) -> int:
    """``python -m onetrans_trt.serving.server REPO [--print-command]``: serve ``REPO`` on
    loopback until Ctrl-C (or SIGTERM), or print the shell command that would."""
    import argparse
    import shlex

    ap = argparse.ArgumentParser(prog="python -m onetrans_trt.serving.server",
                                 description="Serve a model repository with the bundled tritonserver on 127.0.0.1.")
    ap.add_argument("repository")
    ap.add_argument("--print-command", action="store_true",
                    help="Print the environment and tritonserver command line (ports 8000/8001) instead.")
    ap.add_argument("--ready-timeout", type=float, default=180.0)
    a = ap.parse_args(argv)
    server = TritonServer(a.repository, ready_timeout=a.ready_timeout)
    if a.print_command:
        server.install = install()
        server.http_port, server.grpc_port = 8000, 8001
        env = server_env(server.install, {})
        lines = [f'PATH={shlex.quote(env["PATH"])}:"$PATH"'] + \
            [f"{k}={shlex.quote(env[k])}" for k in ("LD_LIBRARY_PATH", "PYTHONPATH")] + [shlex.join(server.command())]
        print(" \\\n  ".join(lines))
        return 0
    stop = threading_event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with server:
        print(f"ready: HTTP {server.http_url}  gRPC {server.grpc_url}  (Ctrl-C stops it)", flush=True)
        try:
            while not stop.wait(0.5):
                if server.proc is None or server.proc.poll() is not None:
                    print(server.log_errors(), file=sys.stderr)
                    return 1
        except KeyboardInterrupt:
            pass
    return 0


def threading_event():
    import threading

    return threading.Event()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
