"""A real ``tritonserver`` on loopback (issue 17): started on a generated repository, ready
within a bounded wait, always stopped with no process left; raw request JSON over HTTP and
gRPC, and the tensor-level ensemble, score like ``Ranker.load(build, backend="ort")`` within
1e-5.

The fast subset runs in `make test`; tests marked ``serve_full`` (the HyFormer family, FP16
and INT8 variants, limits, concurrency) run in `make serve-test`.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

from onetrans_trt.serving import client
from onetrans_trt.serving.server import ServerError, TritonServer, _session_members

TOL = 1e-5


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] == "Z"
    except (ProcessLookupError, FileNotFoundError):
        return True


def _check_scores(server: TritonServer, build: Path, requests, backend: str = "ort", limits=None) -> float:
    """Every request over HTTP and gRPC (raw JSON) and as tensors (gRPC and HTTP) against the
    Ranker; returns the worst difference."""
    from onetrans_trt.runtime.ranker import Ranker

    from onetrans_trt.export.api import read_manifest

    ranker = Ranker.load(build, backend=backend, **({"limits": limits} if limits else {}))
    per_sequence = read_manifest(build)["model"]["family"] == "hyformer"  # its encoder: each sequence alone
    worst = 0.0
    for req in requests:
        want = ranker.rank(req)
        tensors = client.ensemble_tensors(ranker.schema, req, limits, per_sequence=per_sequence)
        for got in (client.rank_http(server.http_url, req.to_json()),
                    client.rank_grpc(server.grpc_url, json.dumps(req.to_json())),
                    client.infer_grpc(server.grpc_url, "onetrans", tensors),
                    client.infer_http(server.http_url, "onetrans", tensors)):
            assert got["logits"].shape == want.logits.shape
            worst = max(worst, float(np.abs(got["logits"] - want.logits).max(initial=0.0)),
                        float(np.abs(got["probs"] - want.probabilities).max(initial=0.0)))
    assert worst <= TOL, worst
    return worst


# ------------------------------------------------------------------ fast: `make test`

def test_raw_requests_and_tensors_score_like_the_ranker(triton, tiny_build, tiny_repo, movielens):
    reqs = [r for r, _ in movielens.requests(2, n_candidates=6, seed=21)]
    with TritonServer(tiny_repo, install_dir=triton) as server:
        pid = server.pid
        assert len(server.leftovers()) >= 4  # the server and its Python stubs (3 models + preprocess)
        _check_scores(server, tiny_build, reqs)
        with pytest.raises(client.ServingError, match="history"):  # a bad request names its field ...
            client.rank_http(server.http_url, {"user": {}, "history": "x", "candidates": []})
        with pytest.raises(client.ServingError, match="history"):
            client.rank_grpc(server.grpc_url, '{"user": {}, "history": "x", "candidates": []}')
        _check_scores(server, tiny_build, reqs[:1])  # ... and the server goes on serving
        stats = client.model_statistics_http(server.http_url, "user_encoder")
        assert stats["model_stats"][0]["inference_stats"]["success"]["count"] >= 10
    assert server.pid is None and _gone(pid) and _session_members(pid) == []


def _echo_repo(root: Path, body: str = "") -> Path:
    (root / "echo" / "1").mkdir(parents=True)
    (root / "echo" / "config.pbtxt").write_text(
        'name: "echo"\nbackend: "python"\nmax_batch_size: 0\n'
        'input [ { name: "X" data_type: TYPE_FP32 dims: [ -1 ] } ]\n'
        'output [ { name: "Y" data_type: TYPE_FP32 dims: [ -1 ] } ]\n'
        "instance_group [ { count: 1 kind: KIND_CPU } ]\n")
    (root / "echo" / "1" / "model.py").write_text(
        "import triton_python_backend_utils as pb\n"
        "class TritonPythonModel:\n"
        "    def initialize(self, args):\n"
        f"        {body or 'pass'}\n"
        "    def execute(self, requests):\n"
        "        return [pb.InferenceResponse([pb.Tensor('Y', pb.get_input_tensor_by_name(r, 'X').as_numpy() * 2)])"
        " for r in requests]\n")
    return root


def test_stopped_when_the_body_raises_and_tensors_cross_intact(triton, tmp_path):
    """numpy<2 in the stubs' Python: under numpy 2 the wheel's stub reads zeros and returns
    nothing (seen), so this also checks the values cross the process boundary."""
    repo = _echo_repo(tmp_path / "repo")
    with pytest.raises(RuntimeError, match="boom"):
        with TritonServer(repo, install_dir=triton) as server:
            pid = server.pid
            got = client.infer_grpc(server.grpc_url, "echo", {"X": np.array([1.5, -2.0, 3.0], np.float32)},
                                    outputs=("Y",))
            np.testing.assert_array_equal(got["Y"], [3.0, -4.0, 6.0])
            raise RuntimeError("boom")
    assert _gone(pid) and _session_members(pid) == []


def test_a_model_that_cannot_load_is_an_error_with_the_log_and_no_process(triton, tmp_path):
    repo = _echo_repo(tmp_path / "repo", body="raise ValueError('no such weights')")
    server = TritonServer(repo, install_dir=triton, ready_timeout=120)
    with pytest.raises(ServerError, match="no such weights"):
        server.__enter__()
    assert server.proc is None and _gone(server.last_pid) and _session_members(server.last_pid) == []


def test_the_readiness_wait_is_bounded(triton, tmp_path):
    repo = _echo_repo(tmp_path / "repo", body="import time; time.sleep(60)")
    server = TritonServer(repo, install_dir=triton, ready_timeout=3, stop_timeout=5)
    with pytest.raises(ServerError, match="not ready after 3 s"):
        with server:
            pass
    assert _gone(server.last_pid) and _session_members(server.last_pid) == []


# ------------------------------------------------------------------ full: `make serve-test`

@pytest.fixture(scope="session")
def hyformer_build(tmp_path_factory, movielens):
    from click.testing import CliRunner

    from onetrans_trt.cli import cli

    root = tmp_path_factory.mktemp("hyformer")
    for args in (["train", "--model", "hyformer", "--preset", "tiny", "--out", root / "ck", "--epochs", "1",
                  "--limit", "3000"], ["export", root / "ck", "--out", root / "build", "--samples", "2"]):
        r = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
        assert r.exit_code == 0, r.output
    return root / "build"


@pytest.mark.serve_full
def test_hyformer_raw_requests_and_tensors(triton, hyformer_build, movielens, tmp_path):
    from onetrans_trt.serving.repository import write_python_repository

    write_python_repository(hyformer_build, tmp_path / "repo")
    reqs = [r for r, _ in movielens.requests(4, n_candidates=9, seed=22)]
    with TritonServer(tmp_path / "repo", install_dir=triton) as server:
        _check_scores(server, hyformer_build, reqs)


@pytest.mark.serve_full
def test_many_requests_chunks_and_no_candidates(triton, tiny_build, movielens, tmp_path):
    """20 real requests, C from 0 to 1100 across the scorer's 512-candidate chunks."""
    from onetrans_trt.runtime.ranker import Ranker
    from onetrans_trt.serving.repository import write_python_repository

    write_python_repository(tiny_build, tmp_path / "repo")
    reqs = [r for r, _ in movielens.requests(18, n_candidates=11, seed=23)]
    reqs += [r for r, _ in movielens.requests(1, n_candidates=1100, seed=24)]
    empty = json.loads(json.dumps(reqs[0].to_json()))
    empty["candidates"] = []
    with TritonServer(tmp_path / "repo", install_dir=triton) as server:
        _check_scores(server, tiny_build, reqs)
        got = client.rank_http(server.http_url, empty)
        assert got["logits"].shape == (0, 2) and Ranker.load(tiny_build).rank(empty).logits.shape == (0, 2)


@pytest.mark.serve_full
def test_limits_refuse_or_truncate_like_rank(triton, tiny_build, movielens, tmp_path):
    from onetrans_trt.data.requests import RequestLimits
    from onetrans_trt.serving.repository import write_python_repository

    reqs = [r for r, _ in movielens.requests(2, n_candidates=8, seed=25)]
    write_python_repository(tiny_build, tmp_path / "refuse", limits={"max_candidates": 5})
    with TritonServer(tmp_path / "refuse", install_dir=triton) as server:
        with pytest.raises(client.ServingError, match="max_candidates"):
            client.rank_http(server.http_url, reqs[0].to_json())
    lim = {"max_candidates": 5, "max_history": 7, "over_limit": "truncate"}
    write_python_repository(tiny_build, tmp_path / "truncate", limits=lim)
    with TritonServer(tmp_path / "truncate", install_dir=triton) as server:
        for req in reqs:
            got = client.rank_grpc(server.grpc_url, req.to_json())
            assert got["logits"].shape == (5, 2)
        _check_scores(server, tiny_build, reqs, limits=RequestLimits(**lim))


@pytest.mark.serve_full
@pytest.mark.parametrize("precision", ["fp16", "int8", "int8-cpu"])
def test_precision_variants_score_like_their_ranker(triton, tiny_build, movielens, tmp_path, precision):
    import warnings

    from onetrans_trt.serving.repository import write_python_repository

    build = tmp_path / "build"
    shutil.copytree(tiny_build, build)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if precision == "fp16":
            from onetrans_trt.calibrate.fp16 import convert_build

            convert_build(build)
        elif precision == "int8":
            from onetrans_trt.calibrate.int8 import calibrate_build

            calibrate_build(build, n_samples=8)
        else:
            from onetrans_trt.calibrate.int8_cpu import calibrate_int8_cpu

            calibrate_int8_cpu(build, n_samples=8)
    write_python_repository(build, tmp_path / "repo", precision=precision)
    reqs = [r for r, _ in movielens.requests(3, n_candidates=7, seed=26)]
    with TritonServer(tmp_path / "repo", install_dir=triton) as server:
        _check_scores(server, build, reqs, backend=f"ort-{precision}")


@pytest.mark.serve_full
def test_concurrent_users_get_their_serial_scores(triton, tiny_build, tiny_repo, movielens):
    """16 different users sent from 8 threads at once (dynamic batching on the encoder) get
    exactly the scores each gets alone."""
    reqs = [r for r, _ in movielens.requests(16, n_candidates=10, seed=27)]
    with TritonServer(tiny_repo, install_dir=triton) as server:
        serial = [client.rank_grpc(server.grpc_url, r.to_json())["logits"] for r in reqs]
        got: dict[int, np.ndarray] = {}
        errors: list[BaseException] = []

        def work(idx: list[int]) -> None:
            try:
                for i in idx:
                    got[i] = client.rank_grpc(server.grpc_url, reqs[i].to_json())["logits"]
            except BaseException as e:  # noqa: BLE001
                errors.append(e)

        threads = [threading.Thread(target=work, args=([i, i + 8],)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not errors and not any(t.is_alive() for t in threads)
        for i, want in enumerate(serial):
            np.testing.assert_allclose(got[i], want, atol=TOL)


def test_serve_module_runs_until_sigterm_and_leaves_nothing(triton, tmp_path):
    """``python -m onetrans_trt.serving.server REPO``: prints the URLs when ready, serves,
    and on SIGTERM stops the server and its stubs."""
    import signal
    import subprocess
    import sys
    import time

    repo = _echo_repo(tmp_path / "repo")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[2]),
                                                        os.environ.get("PYTHONPATH", "")])}
    p = subprocess.Popen([sys.executable, "-m", "onetrans_trt.serving.server", str(repo)], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = p.stdout.readline()  # bounded by the server's own ready timeout
        assert line.startswith("ready: HTTP 127.0.0.1:"), (line, p.stderr.read() if p.poll() is not None else "")
        grpc = line.split("gRPC ")[1].split()[0]
        got = client.infer_grpc(grpc, "echo", {"X": np.array([2.0], np.float32)}, outputs=("Y",))
        assert got["Y"].tolist() == [4.0]
        servers = [int(d.name) for d in Path("/proc").iterdir() if d.name.isdigit() and
                   str(repo).encode() in (d / "cmdline").read_bytes()]
        assert servers
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=60) == 0
        deadline = time.monotonic() + 10
        while not all(_gone(s) for s in servers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert all(_gone(s) and _session_members(s) == [] for s in servers)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(timeout=30)
    shown = subprocess.run([sys.executable, "-m", "onetrans_trt.serving.server", str(repo), "--print-command"],
                           env=env, capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0 and "bin/tritonserver --model-repository" in shown.stdout
    assert "backends-py" in shown.stdout and shown.stdout.startswith("PATH=")


@pytest.mark.serve_full
def test_warmup_runs_at_load_on_the_builds_sample(triton, tiny_build, tmp_path):
    """The repositories' model_warmup is real: one element short in a warmup file and the
    server refuses to load the model (so a model that cannot run fails at load, not on the
    first request)."""
    from onetrans_trt.serving.repository import write_python_repository

    repo = tmp_path / "repo"
    write_python_repository(tiny_build, repo)
    f = repo / "user_encoder" / "warmup" / "s_type"
    f.write_bytes(f.read_bytes()[:-8])
    with pytest.raises(ServerError, match="warmup"):
        with TritonServer(repo, install_dir=triton, ready_timeout=90):
            pass
