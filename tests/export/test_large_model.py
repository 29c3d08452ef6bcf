"""A ranker whose embedding table alone exceeds 2 GiB: export, validate, run on ONNX Runtime.

The model is examples/fused_qkv_cls.py with its item table widened to ``ROWS`` rows (fp32,
``ROWS * 32 * 4`` bytes > 2 GiB); the spec draws item ids over the whole table. Each graph that
reads the table (the user encoder: history items; the candidate scorer: candidate items) is
over protobuf's 2 GiB limit, so ``export`` writes it as ``<file>.onnx`` + ``<file>.onnx.data``.
The work runs in a fresh process (its peak RSS is this model's, not the test session's) that
prints one JSON line of sizes, per-phase peak RSS and times; its build directory is removed
at the end, whatever happens.

Run: ``pytest -m heavy tests/export/test_large_model.py -s`` (a few minutes; ~7 GB of disk,
~8 GB of memory at the peak).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.heavy

ROWS = 17_700_000  # x 32 floats x 4 bytes = 2.11 GiB
D = 32
GIB = 1 << 30
ROOT = Path(__file__).resolve().parents[2]


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _reset_peak() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux)
    except OSError:
        pass


def _large_model():
    """The example module with a ``ROWS x D`` item table, and its spec drawing ids over all of it."""
    import copy
    import importlib.util

    import torch

    spec_ = importlib.util.spec_from_file_location("fused_qkv_cls_large", ROOT / "examples" / "fused_qkv_cls.py")
    mod = importlib.util.module_from_spec(spec_)
    sys.modules[spec_.name] = mod
    spec_.loader.exec_module(mod)
    torch.manual_seed(0)
    model = mod.factory()
    table = torch.nn.Embedding(ROWS, D, _weight=torch.empty(ROWS, D))
    with torch.no_grad():
        table.weight.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(1))
    model.item = table
    spec = copy.deepcopy(mod.SPEC)
    for i in spec["inputs"]:
        if i["name"] in ("hist_item", "cand_item"):
            i["high"] = ROWS
    return model.eval(), spec


def main(work: Path) -> dict:
    """Export, validate and run the > 2 GiB model under ``work``; returns the figures."""
    import numpy as np
    import torch

    from onetrans_trt.errors import BuildError
    from onetrans_trt.export.module import export_module
    from onetrans_trt.kv import from_state, state_arrays
    from onetrans_trt.onnx_files import data_file
    from onetrans_trt.protocol import SplitSpec, random_inputs, unified_inputs
    from onetrans_trt.runtime.ort_backend import OrtSplitBackend
    from onetrans_trt.trust import check_onnx
    from onetrans_trt.validate.module import validate_module_build

    torch.set_num_threads(2)
    out: dict = {"rows": ROWS, "table_bytes": ROWS * D * 4, "phases": {}}

    def phase(name, fn):
        _reset_peak()
        t = time.monotonic()
        r = fn()
        out["phases"][name] = {"seconds": round(time.monotonic() - t, 1), "peak_rss_bytes": _status("VmHWM"),
                               "rss_after_bytes": _status("VmRSS")}
        return r

    model, spec = phase("build model", _large_model)
    build = work / "build"
    phase("export", lambda: export_module(model, spec, None, build, check=True))
    out["files"] = {p.name: p.stat().st_size for p in sorted(build.iterdir()) if p.is_file()}
    other = work / "elsewhere"
    other.mkdir()
    os.chdir(other)  # validation and serving never rely on the working directory
    rep = phase("validate", lambda: validate_module_build(build, model, count=6))
    out["validate"] = {"cases": rep["cases"], "max_abs": rep["max_abs"],
                       "histories": sorted({int(r["case"].split(",")[0].split()[1]) for r in rep["rows"]}),
                       "candidates": sorted({r["candidates"] for r in rep["rows"]})}

    def run():
        be = OrtSplitBackend(build, device=None)
        s = SplitSpec.parse(spec)
        user, cand = random_inputs(s, users=1, candidates=64, lengths=[s.history.max], rng=np.random.default_rng(7))
        cand["cand_item"][:2] = torch.tensor([ROWS - 1, 0])  # the table's last and first rows
        state = state_arrays(be.encode_user({k: v.numpy() for k, v in user.items()}))
        got = be.score(from_state({k: np.asarray(v) for k, v in state.items()}, None),
                       {k: v.numpy() for k, v in cand.items()})
        with torch.no_grad():
            want = model(unified_inputs(user, cand, 0)).numpy()
        return float(np.abs(got - want).max())

    out["ort_run_max_abs"] = phase("ort run", run)
    # external data moved out of the build and linked back in: refused before ORT reads a byte
    scorer = build / "candidate_scorer.onnx"
    moved = work / "moved.data"
    os.replace(data_file(scorer), moved)
    data_file(scorer).symlink_to(moved)
    try:
        check_onnx(scorer)
        out["symlink_out"] = "accepted"
    except BuildError as e:
        out["symlink_out"] = str(e)
    return out


def test_a_model_over_2_gib_exports_validates_and_runs_on_ort():
    free = shutil.disk_usage(tempfile.gettempdir()).free
    if free < 12 * GIB:
        pytest.skip(f"needs ~12 GiB of free disk in {tempfile.gettempdir()} (has {free / GIB:.1f})")
    work = Path(tempfile.mkdtemp(prefix="onetrans-large-"))
    try:
        t = time.monotonic()
        p = subprocess.run([sys.executable, "-m", "tests.export.test_large_model", str(work)], cwd=ROOT,
                           capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
        wall = time.monotonic() - t
        assert p.returncode == 0, p.stderr[-3000:]
        figures = json.loads(p.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    figures["wall_seconds"] = round(wall, 1)
    print("\nlarge model:", json.dumps(figures, indent=1))
    files = figures["files"]
    for g in ("user_encoder.onnx", "candidate_scorer.onnx"):
        # the graph's weights are over protobuf's limit; the graph file itself is small
        assert files[g + ".data"] >= figures["table_bytes"] > 2 * GIB
        assert files[g] < 16 << 20
    v = figures["validate"]
    assert v["cases"] == 6 and v["max_abs"] <= 1e-4
    assert {0, 20} <= set(v["histories"]) and {1, 300} <= set(v["candidates"])
    assert figures["ort_run_max_abs"] <= 1e-4
    assert "outside" in figures["symlink_out"] and "refusing to load it" in figures["symlink_out"]
    assert not work.exists()


if __name__ == "__main__":
    result = main(Path(sys.argv[1]))
    print(json.dumps(result))
