"""-v / -q / --log-file on the root command: what reaches the console and what the log file keeps.

The CLI runs in a child process (stderr is not a terminal: plain ``LEVEL name: message``
lines), as a user's shell or CI would run it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest


def _cli(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "onetrans_trt.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=600, cwd=cwd)


@pytest.mark.slow
def test_verbose_export_shows_the_passes_and_the_libraries_warnings_and_the_file_keeps_all(tiny_ckpt, tmp_path):
    log = tmp_path / "export.log"
    out = _cli("-v", "--log-file", log, "export", tiny_ckpt, "--out", tmp_path / "b")
    assert out.returncode == 0, out.stderr[-3000:]
    err = out.stderr.splitlines()
    passes = [ln for ln in err if ln.startswith("INFO onetrans_trt.graphs: pass ")]
    assert any("fuse-attention on candidate_scorer" in ln and "attention fused" in ln for ln in passes), err
    # the exporter's Python warnings and torch's own logger come through our handler, by name
    assert any(ln.startswith("WARNING py.warnings: ") for ln in err), err
    assert any(ln.startswith("WARNING torch.") for ln in err), err
    assert not any(ln[:1] in "WEI" and ln[1:5].isdigit() for ln in err), "torch's glog-style lines leaked"
    # the libraries' INFO chatter stays out of -v, and is all in the file
    assert not any(ln.startswith("INFO onnxscript") for ln in err)
    text = log.read_text()
    assert "INFO onnxscript" in text and "INFO onetrans_trt.graphs: pass fuse-attention" in text
    assert "WARNING py.warnings" in text
    # provenance (tests/test_provenance.py covers the parts; one export serves both): the manifest
    # records the command line as run, the host and every tool that rewrites graphs
    m = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert m["provenance"]["command"] == f"onetrans-trt -v --log-file {log} export {tiny_ckpt} --out {tmp_path / 'b'}"
    assert m["provenance"]["host"]["cores"] >= 1
    for key in ("onnxscript", "onnxslim", "onnx_graphsurgeon", "modelopt", "onnxconverter_common", "polygraphy",
                "torch", "onnx", "onnxruntime", "onetrans_trt", "python"):
        assert key in m["versions"], key


@pytest.fixture()
def build_copy(tiny_build, tmp_path):
    b = tmp_path / "b"
    shutil.copytree(tiny_build, b)
    return b


def test_default_graphs_prints_the_summary_without_notes(build_copy):
    out = _cli("graphs", build_copy, "--passes", "pyramid,cleanup")
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip()
    assert "INFO" not in out.stderr and "pass pyramid" not in out.stderr


def test_verbose_graphs_names_every_pass(build_copy):
    out = _cli("-v", "graphs", build_copy, "--passes", "pyramid,cleanup")
    assert out.returncode == 0, out.stderr[-3000:]
    for name in ("pyramid", "cleanup"):
        for graph in ("user_encoder", "candidate_scorer"):
            assert f"INFO onetrans_trt.graphs: pass {name} on {graph}: " in out.stderr, out.stderr


def test_quiet_prints_nothing_but_errors(build_copy, tmp_path):
    out = _cli("-q", "graphs", build_copy, "--passes", "pyramid,cleanup")
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout == "" and out.stderr == ""
    # --json output was asked for: still printed under -q
    out = _cli("-q", "graphs", build_copy, "--passes", "pyramid,cleanup", "--json")
    assert out.returncode == 0 and json.loads(out.stdout) and out.stderr == ""
    bad = _cli("-q", "graphs", tmp_path / "missing")
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.startswith("error: ") and len(bad.stderr.strip().splitlines()) == 1


def test_verbose_and_quiet_exclude_each_other_and_a_bad_log_file_is_refused(tmp_path):
    out = _cli("-v", "-q", "plugins")
    assert out.returncode == 2 and "-v and -q exclude each other" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    out = _cli("--log-file", tmp_path, "plugins")
    assert out.returncode == 2 and "is a directory" in out.stderr and len(out.stderr.strip().splitlines()) == 1
    out = _cli("--log-file", tmp_path / "no" / "such" / "x.log", "plugins")
    assert out.returncode == 2 and "does not exist" in out.stderr
    assert not (tmp_path / "no").exists()


def test_the_python_api_installs_no_handler():
    code = ("import logging, onetrans_trt.log as L; from onetrans_trt.runtime import ranker; "
            "print(len(logging.getLogger().handlers), L.configured(), L.ort_severity())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["0", "False", "4"], out.stderr[-2000:]


def test_a_library_error_log_that_is_not_a_failure_stays_out_of_the_default_console(build_copy):
    """ModelOpt logs "Failed to get GPU count" at ERROR on a CPU host and goes on: by default the
    console (and `--json` on stdout) shows none of it; -v shows it, named by its logger."""
    args = ("calibrate", build_copy, "--samples", "4", "--quality-requests", "0", "--json")
    out = _cli(*args)
    assert out.returncode == 0, out.stderr[-3000:]
    json.loads(out.stdout)
    assert "modelopt" not in out.stderr, out.stderr
    loud = _cli("-v", *args)
    assert loud.returncode == 0, loud.stderr[-3000:]
    import ctypes.util

    if ctypes.util.find_library("nvidia-ml"):  # a GPU host: ModelOpt finds NVML and has nothing to say
        return
    assert any(ln.startswith("ERROR modelopt") for ln in loud.stderr.splitlines()), loud.stderr[-3000:]
