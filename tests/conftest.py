"""Shared fixtures: the real MovieLens-100K data and a quickly trained tiny checkpoint."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")
# Triton kernels run on the CPU through Triton's interpreter, chosen before triton is
# imported (ahead-of-time compilation runs in a subprocess without it).
os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def movielens():
    from onetrans_trt.data.movielens import MovieLens

    return MovieLens()  # fetches into the data cache if missing (make test fetches first)


# ---- artifacts built once per test run: under pytest-xdist both workers would otherwise train
# and export the same checkpoints (minutes each); the first worker to need one builds it in the
# run's shared temporary directory under a file lock, the other waits and reads it. Shared
# artifacts are read-only for tests: a test that changes one fails (copy it first, then change
# the copy), checked after every test that uses one.
SHARED: dict[str, tuple[Path, dict]] = {}  # fixture name -> (directory, its snapshot)


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``root``: (size, mtime_ns)."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            st = os.stat(os.path.join(dirpath, f))
            out[os.path.join(dirpath, f)] = (st.st_size, st.st_mtime_ns)
    return out


def shared_artifact(tmp_path_factory, name: str, make) -> tuple[Path, object]:
    """``make(directory)`` once per test run (across xdist workers); returns the directory and
    what ``make`` returned (JSON)."""
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # the run's directory, above every worker's own
    root = base / "shared"
    root.mkdir(exist_ok=True)
    out, done = root / name, root / f"{name}.json"
    with FileLock(str(root / f"{name}.lock")):
        if not done.is_file():
            if out.exists():  # a worker that died while building it
                shutil.rmtree(out)
            result = make(out)
            done.write_text(json.dumps(result))
    SHARED[name] = (out, _tree(out))
    return out, json.loads(done.read_text())


@pytest.fixture(autouse=True)
def _shared_artifacts_stay_unchanged(request):
    yield
    for name in [n for n in request.fixturenames if n in SHARED]:
        root, before = SHARED[name]
        now = _tree(root)
        if now != before:
            SHARED[name] = (root, now)  # reported once, by the test that changed it
            changed = sorted(set(now) ^ set(before) | {k for k in now if k in before and now[k] != before[k]})
            pytest.fail(f"the test changed the shared fixture {name} ({root}): {changed[:5]}; copy it "
                        f"(shutil.copytree) and change the copy")


@pytest.fixture(scope="session")
def tiny_ckpt(movielens, tmp_path_factory):
    """A tiny OneTrans trained briefly on real data (weights are not random)."""

    def make(out: Path):
        from onetrans_trt.data.movielens import TASKS, Split
        from onetrans_trt.models.checkpoint import save_checkpoint
        from onetrans_trt.models.config import ModelConfig
        from onetrans_trt.models.training import train_model

        class Subset:
            schema = movielens.schema
            batch = staticmethod(movielens.batch)
            train = Split(movielens.train.users[:20000], movielens.train.positions[:20000],
                          movielens.train.labels[:20000])
            test = Split(movielens.test.users[:2000], movielens.test.positions[:2000], movielens.test.labels[:2000])

        cfg = ModelConfig.from_preset("tiny", movielens.schema, tasks=list(TASKS))
        model, metrics = train_model(cfg, Subset, epochs=1, batch_size=256, seed=0)
        save_checkpoint(model, out / "tiny", metrics={"test_mean": metrics["test"], "runs": [metrics]})

    return shared_artifact(tmp_path_factory, "tiny_ckpt", make)[0] / "tiny"


@pytest.fixture(scope="session")
def tiny_build(tiny_ckpt, tmp_path_factory):
    """The trained tiny checkpoint exported (with unified.onnx)."""

    def make(out: Path):
        from onetrans_trt.export.api import export_build

        export_build(tiny_ckpt, out / "tiny", unified=True)

    return shared_artifact(tmp_path_factory, "tiny_build", make)[0] / "tiny"


@pytest.fixture(scope="session")
def tiny_int8_build(tiny_build, tmp_path_factory):
    """A copy of ``tiny_build`` with its INT8 variant (64 calibration requests)."""

    def make(out: Path):
        import warnings

        from onetrans_trt.calibrate.int8 import calibrate_build

        shutil.copytree(tiny_build, out / "tiny")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            calibrate_build(out / "tiny", n_samples=64)

    return shared_artifact(tmp_path_factory, "tiny_int8_build", make)[0] / "tiny"


@pytest.fixture(scope="session")
def serving_graphs(tmp_path_factory):
    """Serving graphs of a random synthetic model, slice-first and compute-then-slice (the
    graphs are exported once per run; the models are rebuilt here from their seed)."""
    import onnx
    import onnx_graphsurgeon as gs

    from onetrans_trt.data.synthetic import synthetic_schema
    from onetrans_trt.export.api import _example, trace_onnx
    from onetrans_trt.export.serving import ServingGraph
    from onetrans_trt.models.config import ModelConfig
    from onetrans_trt.models.onetrans import OneTrans
    from tests.helpers import randomize

    schema = synthetic_schema(max_history=12)
    models = {}
    for impl in ("slice_first", "compute_then_slice"):
        cfg = ModelConfig.from_preset("tiny", schema, n_layers=3, pyramid_impl=impl)
        models[impl] = randomize(OneTrans(cfg), seed=1)

    def make(out: Path):
        out.mkdir()
        for impl, model in models.items():
            hist, ns = _example(model)
            trace_onnx(ServingGraph(model), {**hist, **ns}, out / f"{impl}.onnx", 23)

    d, _ = shared_artifact(tmp_path_factory, "serving_graphs", make)
    return {impl: (model, gs.import_onnx(onnx.load(str(d / f"{impl}.onnx"))), *_example(model))
            for impl, model in models.items()}


@pytest.fixture(scope="session")
def small_build(movielens, tmp_path_factory):
    """A `small` OneTrans trained briefly on real data (1 epoch on 20k samples), exported,
    with FP16, INT8 (Q/DQ) and CPU INT8 variants and their quality reports."""

    def make(root: Path):
        import warnings

        from onetrans_trt.calibrate.fp16 import convert_build
        from onetrans_trt.calibrate.int8 import calibrate_build
        from onetrans_trt.calibrate.int8_cpu import calibrate_int8_cpu
        from onetrans_trt.calibrate.quality import write_quality
        from onetrans_trt.data.movielens import TASKS, Split
        from onetrans_trt.export.api import export_build
        from onetrans_trt.models.checkpoint import save_checkpoint
        from onetrans_trt.models.config import ModelConfig
        from onetrans_trt.models.training import train_model

        n = 20000

        class Subset:
            schema = movielens.schema
            batch = staticmethod(movielens.batch)
            train = Split(movielens.train.users[:n], movielens.train.positions[:n], movielens.train.labels[:n])
            test = Split(movielens.test.users[:1000], movielens.test.positions[:1000], movielens.test.labels[:1000])

        cfg = ModelConfig.from_preset("small", movielens.schema, tasks=list(TASKS))
        model, _ = train_model(cfg, Subset, epochs=1, batch_size=256, seed=0)
        ckpt = save_checkpoint(model, root / "ckpt")
        build = root / "build"
        export_build(ckpt, build, n_samples=2)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            convert_build(build)
            calibrate_build(build, n_samples=64)
            calibrate_int8_cpu(build, n_samples=64)
            return {v: write_quality(build, v, n_requests=200) for v in ("fp16", "int8", "int8-cpu")}

    root, reports = shared_artifact(tmp_path_factory, "small_build", make)
    return root / "build", reports


# ---- a real redis-server (store tests: tests/runtime, tests/serving): Debian's redis-server
# (`make redis`) on a free loopback port with no persistence, waited for (PING, bounded), always
# terminated; tests that need it skip, with the reason, when the server or the client is missing
import socket
import subprocess
import tempfile
import time


class RedisServer:
    def __init__(self) -> None:
        import redis

        exe = shutil.which("redis-server")
        last = ""
        for _ in range(3):  # a free port can be taken between the probe and the server's bind
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                self.port = s.getsockname()[1]
            self.log = tempfile.TemporaryFile()  # not a pipe: a full pipe would stall the server
            self.proc = subprocess.Popen(
                [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                stdout=self.log, stderr=subprocess.STDOUT)
            client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=0.5, socket_connect_timeout=0.5)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and self.proc.poll() is None:
                try:
                    if client.ping():
                        client.close()
                        return
                except redis.RedisError:
                    time.sleep(0.02)
            client.close()
            last = self.stop()
        raise RuntimeError(f"redis-server did not answer PING on a loopback port: {last[-500:]}")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self):
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2)

    def stop(self) -> str:
        """Terminate (then kill) the server; its output (once: a test may stop it before the fixture)."""
        if self.log.closed:
            return ""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log.seek(0)
        out = self.log.read().decode(errors="replace")
        self.log.close()
        return out


@pytest.fixture
def redis_server():
    """A fresh redis-server for one test (127.0.0.1, a free port, no persistence)."""
    pytest.importorskip("redis", reason="the redis client is not installed: pip install 'onetrans-trt[store]'")
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (make redis: Debian's redis-server)")
    server = RedisServer()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op torch thread for a module of tiny tensors (~50x faster than two on a loaded
    2-core box); the count is restored after the module. Use with
    ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
