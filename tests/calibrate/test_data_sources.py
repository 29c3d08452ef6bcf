"""Calibration uses exactly the data it is given, and never switches to synthetic data on its own."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from onetrans_trt.errors import DataError


def test_unreadable_movielens_is_an_error_not_synthetic_data(tiny_build):
    from onetrans_trt.export.api import load_onetrans_config, sample_requests

    cfg = load_onetrans_config(tiny_build)
    with pytest.raises(DataError, match="--synthetic"):
        sample_requests(cfg, 4, "/proc/nope")  # the old code quietly returned synthetic requests here
    reqs, source = sample_requests(cfg, 4, "/proc/nope", synthetic=True)
    assert len(reqs) == 4 and source == "synthetic (asked for)"


def test_calibrate_without_data_fails_in_one_line_and_writes_nothing(tiny_build, tmp_path):
    b = tmp_path / "b"
    shutil.copytree(tiny_build, b)
    shutil.rmtree(b / "int8", ignore_errors=True)
    p = subprocess.run([sys.executable, "-m", "onetrans_trt.cli", "calibrate", str(b), "--data-dir", "/proc/nope",
                        "--quality-requests", "0"], capture_output=True, text=True)
    assert p.returncode == 2, p.stderr
    lines = [l for l in p.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and "MovieLens-100K cannot be read" in lines[0] and "Traceback" not in p.stderr
    assert not (b / "int8").exists()


def test_calibrate_uses_exactly_the_given_requests(tiny_build, tmp_path, movielens):
    from onetrans_trt.calibrate.int8 import calibrate_build

    b = tmp_path / "b"
    shutil.copytree(tiny_build, b)
    reqs = [r for r, _ in movielens.requests(5, n_candidates=3, seed=99)]
    f = tmp_path / "calib.jsonl"
    f.write_text("".join(json.dumps(r.to_json()) + "\n" for r in reqs))
    info = calibrate_build(b, n_samples=64, inputs=f, data_dir="/proc/nope")  # no MovieLens needed
    assert info["calibration"]["requests"] == 5 and info["calibration"]["source"].startswith(f"--inputs {f}")
    with np.load(b / "int8" / "calibration.npz") as z:
        assert int(z["count"]) == 5
        n_cands = sorted({z[k].shape[0] for k in z.files if k.startswith("scorer/") and k.endswith("/ns_item_id")})
        assert n_cands == [3]  # the file's candidates, not 16 sampled ones
