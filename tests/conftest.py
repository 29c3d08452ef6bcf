"""Shared fixtures: the real MovieLens-100K data and a quickly trained tiny checkpoint."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")
# Triton kernels run on the CPU through Triton's interpreter, chosen before triton is
# imported (ahead-of-time compilation runs in a subprocess without it).
os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def movielens():
    from onetrans_trt.data.movielens import MovieLens

    return MovieLens()  # fetches into the data cache if missing (make test fetches first)


@pytest.fixture(scope="session")
def tiny_ckpt(movielens, tmp_path_factory):
    """A tiny OneTrans trained briefly on real data (weights are not random)."""
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
    out = tmp_path_factory.mktemp("ckpt") / "tiny"
    save_checkpoint(model, out, metrics={"test_mean": metrics["test"], "runs": [metrics]})
    return out


@pytest.fixture(scope="session")
def tiny_build(tiny_ckpt, tmp_path_factory):
    """The trained tiny checkpoint exported (with unified.onnx)."""
    from onetrans_trt.export.api import export_build

    out = tmp_path_factory.mktemp("build") / "tiny"
    export_build(tiny_ckpt, out, unified=True)
    return out


@pytest.fixture(scope="session")
def tiny_int8_build(tiny_build, tmp_path_factory):
    """A copy of ``tiny_build`` with its INT8 variant (64 calibration requests)."""
    import shutil
    import warnings

    from onetrans_trt.calibrate.int8 import calibrate_build

    out = tmp_path_factory.mktemp("int8") / "tiny"
    shutil.copytree(tiny_build, out)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        calibrate_build(out, n_samples=64)
    return out


@pytest.fixture(scope="session")
def serving_graphs(tmp_path_factory):
    """Serving graphs of a random synthetic model, slice-first and compute-then-slice."""
    import onnx
    import onnx_graphsurgeon as gs

    from onetrans_trt.data.synthetic import synthetic_schema
    from onetrans_trt.export.api import _example, trace_onnx
    from onetrans_trt.export.serving import ServingGraph
    from onetrans_trt.models.config import ModelConfig
    from onetrans_trt.models.onetrans import OneTrans
    from tests.helpers import randomize

    schema = synthetic_schema(max_history=12)
    out = {}
    d = tmp_path_factory.mktemp("serving")
    for impl in ("slice_first", "compute_then_slice"):
        cfg = ModelConfig.from_preset("tiny", schema, n_layers=3, pyramid_impl=impl)
        model = randomize(OneTrans(cfg), seed=1)
        hist, ns = _example(model)
        path = d / f"{impl}.onnx"
        trace_onnx(ServingGraph(model), {**hist, **ns}, path, 23)
        out[impl] = (model, gs.import_onnx(onnx.load(str(path))), hist, ns)
    return out


@pytest.fixture(scope="session")
def small_build(movielens, tmp_path_factory):
    """A `small` OneTrans trained briefly on real data (1 epoch on 20k samples), exported,
    with FP16 and INT8 variants and their quality reports."""
    import warnings

    from onetrans_trt.calibrate.fp16 import convert_build
    from onetrans_trt.calibrate.int8 import calibrate_build
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
    root = tmp_path_factory.mktemp("small")
    ckpt = save_checkpoint(model, root / "ckpt")
    build = root / "build"
    export_build(ckpt, build, n_samples=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        convert_build(build)
        calibrate_build(build, n_samples=64)
        reports = {v: write_quality(build, v, n_requests=200) for v in ("fp16", "int8")}
    return build, reports


# ---- a real redis-server (store tests: tests/runtime, tests/serving): Debian's redis-server
# (`make redis`) on a free loopback port with no persistence, waited for (PING, bounded), always
# terminated; tests that need it skip, with the reason, when the server or the client is missing
import shutil
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
