"""Every command, every option that takes a value (and every positional argument), given a
bad value: exit code 2, one line on stderr, no traceback, nothing written.

The table BAD below must name a bad value for each (command, parameter) the click group has:
a new option without one fails ``test_the_table_covers_every_option``, so it gets one.
Bad values are rejected before any heavy work, so the whole sweep takes seconds.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import click
import pytest
from click.testing import CliRunner

from onetrans_trt.cli import cli

# Placeholders, filled in per test under tmp_path:
#   {MISSING} a path that does not exist   {FILE} a regular file   {DIR} an empty directory
#   {BUILD} a copy of the tiny build       {CKPT} the tiny checkpoint  {REQ} a valid request file
#   {OUT} a new path (nothing there)

# command -> (its positional arguments, valid options it always gets): a valid invocation the
# bad value is added to (last, so it wins over a base value of the same option). The base
# keeps the work small should a bad value ever be accepted.
BASE: dict[str, tuple[dict[str, str], list[str]]] = {
    "fetch-data": ({}, []),
    "train": ({}, ["--out", "{OUT}", "--preset", "tiny", "--epochs", "1", "--limit", "50"]),
    "info": ({"ckpt": "{CKPT}"}, []),
    "rank": ({"ckpt": "{CKPT}"}, ["--request", "{REQ}"]),
    "schema": ({"name": "request"}, []),
    "export": ({"ckpt": "{CKPT}"}, ["--out", "{OUT}", "--samples", "1"]),
    "graphs": ({"build": "{BUILD}"}, []),
    "inspect": ({"build": "{BUILD}"}, []),
    "convert": ({"build": "{BUILD}"}, ["--quality-requests", "0"]),
    "calibrate": ({"build": "{BUILD}"}, ["--samples", "4", "--quality-requests", "0"]),
    "build": ({"build": "{BUILD}"}, []),
    "validate": ({"build": "{BUILD}"}, ["--requests", "{REQ}", "--count", "1", "--backends", "ort"]),
    "serve-repo": ({"build": "{BUILD}"}, ["--out", "{OUT}"]),
    "bench": ({}, ["--preset", "tiny", "--quick", "--rounds", "1", "--no-pyramid", "--history", "8",
                   "--candidates", "4", "--scorer-candidates", "4", "--cache-history", "8",
                   "--cache-candidates", "4"]),
}

# (command, parameter name) -> a bad value, and a word the one-line error must contain
BAD: dict[tuple[str, str], tuple[str, str]] = {
    ("fetch-data", "data_dir"): ("/proc/nope", "/proc/nope"),
    ("train", "family"): ("nope", "--model"),
    ("train", "preset"): ("huge", "--preset"),
    ("train", "data"): ("ml-1m", "--data"),
    ("train", "out"): ("{FILE}/ck", "--out"),
    ("train", "epochs"): ("0", "--epochs"),
    ("train", "batch_size"): ("0", "--batch-size"),
    ("train", "lr"): ("0", "--lr"),
    ("train", "seed"): ("abc", "--seed"),
    ("train", "seeds"): ("0", "--seeds"),
    ("train", "max_history"): ("0", "--max-history"),
    ("train", "merge"): ("by_magic", "--merge"),
    ("train", "ns_tokenizer"): ("nope", "--ns-tokenizer"),
    ("train", "pyramid"): ("cubic", "--pyramid"),
    ("train", "seq_encoder"): ("rnn", "--seq-encoder"),
    ("train", "hy_form"): ("paperish", "--hy-form"),
    ("train", "seq_attention"): ("sideways", "--seq-attention"),
    ("train", "seq_max_len"): ("48,,16", "--seq-max-len"),
    ("train", "limit"): ("0", "--limit"),
    ("train", "data_dir"): ("{FILE}", "--data-dir"),
    ("info", "ckpt"): ("{MISSING}", "missing"),
    ("rank", "ckpt"): ("{MISSING}", "missing"),
    ("rank", "request_path"): ("{MISSING}", "missing"),
    ("rank", "backend"): ("gpu", "--backend"),
    ("rank", "limits_path"): ("{MISSING}", "missing"),
    ("schema", "name"): ("requests", "'requests' is not one of 'request', 'limits', 'policy', 'manifest'"),
    ("schema", "out"): ("{DIR}", "--out"),
    ("export", "ckpt"): ("{MISSING}", "missing"),
    ("export", "out"): ("{FILE}/b", "--out"),
    ("export", "opset"): ("17", "--opset"),
    ("export", "n_samples"): ("101", "--samples"),
    ("export", "data_dir"): ("{FILE}", "--data-dir"),
    ("export", "module_ref"): ("{MISSING}.py:make", "--module"),  # with a CKPT too
    ("export", "weights"): ("{MISSING}", "--weights"),  # without --module
    ("export", "spec_path"): ("{MISSING}", "--spec"),
    ("export", "inputs_path"): ("{MISSING}", "--inputs"),
    ("graphs", "build"): ("{MISSING}", "missing"),
    ("graphs", "passes"): ("pyramid,nonsense", "nonsense"),
    ("inspect", "build"): ("{MISSING}", "missing"),
    ("inspect", "candidates"): ("0", "--candidates"),
    ("inspect", "history"): ("0", "--history"),
    ("convert", "build"): ("{MISSING}", "missing"),
    ("convert", "precision"): ("int8", "--precision"),
    ("convert", "keep_fp32"): ("NoSuchOp", "NoSuchOp"),
    ("convert", "quality_requests"): ("-1", "--quality-requests"),
    ("convert", "data_dir"): ("{FILE}", "--data-dir"),
    ("convert", "inputs_path"): ("{MISSING}", "--inputs"),  # on a checkpoint build: for module builds
    ("convert", "module_ref"): ("{MISSING}.py:make", "--module"),
    ("convert", "weights"): ("{MISSING}", "--weights"),
    ("calibrate", "build"): ("{MISSING}", "missing"),
    ("calibrate", "data"): ("ml-1m", "--data"),
    ("calibrate", "samples"): ("0", "--samples"),
    ("calibrate", "keep_float"): ("NoSuchOp", "NoSuchOp"),
    ("calibrate", "target"): ("gpu", "--target"),
    ("calibrate", "quality_requests"): ("-1", "--quality-requests"),
    ("calibrate", "data_dir"): ("{FILE}", "--data-dir"),
    ("calibrate", "inputs_path"): ("{MISSING}", "missing"),
    ("calibrate", "module_ref"): ("{MISSING}.py:make", "--module"),  # on a checkpoint build
    ("calibrate", "weights"): ("{MISSING}", "--weights"),
    ("build", "build"): ("{MISSING}", "missing"),
    ("build", "precision"): ("fp64", "--precision"),
    ("build", "profile_specs"): ("candidates", "--profile"),
    ("build", "workspace_mb"): ("1", "--workspace-mb"),
    ("validate", "build"): ("{MISSING}", "missing"),
    ("validate", "data"): ("ml-1m", "--data"),
    ("validate", "requests_file"): ("{MISSING}", "missing"),
    ("validate", "count"): ("0", "--count"),
    ("validate", "backends"): ("ort,nope", "nope"),
    ("validate", "policy_path"): ("{MISSING}", "missing"),
    ("validate", "ckpt"): ("{MISSING}", "missing"),
    ("validate", "json_path"): ("{DIR}", "--json-out"),
    ("validate", "html_path"): ("{DIR}", "--html"),
    ("validate", "save_goldens"): ("{BUILD}", "--save-goldens"),  # would replace the build
    ("validate", "goldens"): ("{MISSING}", "missing"),
    ("validate", "data_dir"): ("{FILE}", "--data-dir"),
    ("validate", "module_ref"): ("{MISSING}.py:make", "--module"),  # on a checkpoint build
    ("validate", "weights"): ("{MISSING}", "--weights"),
    ("validate", "inputs_path"): ("{MISSING}", "--inputs"),
    ("serve-repo", "build"): ("{MISSING}", "missing"),
    ("serve-repo", "out"): ("{FILE}/repo", "--out"),
    ("serve-repo", "backend"): ("vllm", "--backend"),
    ("serve-repo", "precision"): ("fp64", "--precision"),
    ("serve-repo", "limits_path"): ("{MISSING}", "--limits"),  # refused for --backend onnxruntime
    ("serve-repo", "threads"): ("-1", "--threads"),
    ("serve-repo", "user_cache_mb"): ("-1", "--user-cache-mb"),
    ("serve-repo", "instances"): ("0", "--instances"),
    ("serve-repo", "preferred_batch_sizes"): ("4,x", "--preferred-batch-sizes"),
    ("serve-repo", "ort_accelerator"): ("cuda", "--ort-accelerator"),
    ("rank", "store_url"): ("nope://x", "store URL"),
    ("serve-repo", "batch_users"): ("-1", "--batch-users"),
    ("serve-repo", "store_url"): ("nope://x", "--store"),  # refused for --backend onnxruntime
    ("serve-repo", "batch_delay_us"): ("-5", "--batch-delay-us"),
    ("bench", "build"): ("{MISSING}", "missing"),
    ("bench", "suite"): ("nope", "--suite"),
    ("bench", "preset"): ("huge", "--preset"),
    ("bench", "candidates"): ("0", "--candidates"),
    ("bench", "history"): ("0", "--history"),
    ("bench", "scorer_candidates"): ("0", "--scorer-candidates"),
    ("bench", "cache_history"): ("0", "--cache-history"),
    ("bench", "cache_candidates"): ("0", "--cache-candidates"),
    ("bench", "backends"): ("ort,nope", "nope"),
    ("bench", "threads"): ("0", "--threads"),
    ("bench", "rounds"): ("0", "--rounds"),
    ("bench", "concurrency"): ("0", "--concurrency"),
    ("bench", "n_requests"): ("0", "--requests"),
    ("bench", "store_url"): ("nope://x", "--store"),
    ("bench", "out"): ("{DIR}", "--out"),
    ("bench", "module_ref"): ("{MISSING}.py:make", "--module"),  # without a module build
    ("bench", "weights"): ("{MISSING}", "--weights"),
}

# more than one kind of bad value for some options: (command, parameter, value, word)
MORE_BAD = [
    ("train", "epochs", "two", "--epochs"),
    ("export", "opset", "40", "--opset"),  # was a traceback after the whole trace
    ("train", "lr", "-1e-3", "--lr"),
    ("train", "out", "{CKPT}", "already exists"),
    ("export", "out", "{BUILD}", "already exists"),
    ("serve-repo", "out", "{BUILD}", "already exists"),
    ("serve-repo", "precision", "int8", "calibrate"),  # a build without an int8 variant
    ("convert", "keep_fp32", "MatMul,node_nope", "node_nope"),
    ("calibrate", "keep_float", ",NoSuchOp,", "NoSuchOp"),
    ("build", "profile_specs", "candidates=8,4,2", "--profile"),
    ("validate", "backends", "trt-fp64", "trt-fp64"),
    ("validate", "json_path", "{FILE}/report.json", "--json-out"),
    ("validate", "policy_path", "{FILE}", "{FILE}"),
    ("rank", "limits_path", "{FILE}", "limits"),
    ("rank", "request_path", "{DIR}", "--request"),
    ("bench", "backends", "torch", "torch"),
    ("bench", "out", "{FILE}/x.json", "--out"),
    ("fetch-data", "data_dir", "{FILE}/sub", "--data-dir"),
    ("schema", "out", "{FILE}/request.schema.json", "--out"),
]


def _value_params(cmd: click.Command) -> list[click.Parameter]:
    """The parameters that take a value: arguments, and options other than flags."""
    return [p for p in cmd.params
            if isinstance(p, click.Argument) or (isinstance(p, click.Option) and not p.is_flag and not p.count)]


def _cases():
    return [(name, p.name) for name, cmd in sorted(cli.commands.items()) for p in _value_params(cmd)]


def test_the_table_covers_every_option():
    have = set(_cases())
    missing = sorted(have - set(BAD))
    assert not missing, f"give these options a bad value in BAD (tests/test_cli_options.py): {missing}"
    stale = sorted(set(BAD) - have)
    assert not stale, f"BAD names options that no longer exist: {stale}"
    no_base = sorted({c for c, _ in have} - set(BASE))
    assert not no_base, f"give these commands a valid base invocation in BASE: {no_base}"
    assert {(c, p) for c, p, _, _ in MORE_BAD} <= have


@pytest.fixture(scope="module")
def places(tiny_ckpt, tiny_build, movielens, tmp_path_factory):
    """Read-only inputs shared by every case: the checkpoint, a request file."""
    root = tmp_path_factory.mktemp("cli-options")
    req, _ = movielens.requests(1, n_candidates=3, seed=2)[0]
    (root / "req.json").write_text(json.dumps(req.to_json()))
    return {"CKPT": str(tiny_ckpt), "REQ": str(root / "req.json"), "tiny_build": tiny_build}


def _snapshot(*roots):
    """Every path under the roots, with size and mtime for files (a directory's own mtime
    is left out: a lock file made and removed beside a build is not output)."""
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) if p.is_file() else "dir"
            for r in roots for p in [r, *r.rglob("*")]}


def _invoke(command: str, param: str, value: str, places, tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    (work / "afile").write_text("not a directory\n")
    (work / "adir").mkdir()
    build = work / "build"
    shutil.copytree(places["tiny_build"], build)
    fill = {"MISSING": str(work / "missing"), "FILE": str(work / "afile"), "DIR": str(work / "adir"),
            "BUILD": str(build), "CKPT": places["CKPT"], "REQ": places["REQ"], "OUT": str(work / "out")}
    cmd = cli.commands[command]
    positional, base = BASE[command]
    args = [command]
    for p in cmd.params:
        if isinstance(p, click.Argument):
            if p.name == param:
                args.append(value.format(**fill))
            elif p.name in positional:
                args.append(positional[p.name].format(**fill))
    args += [a.format(**fill) for a in base]
    opt = next(p for p in cmd.params if p.name == param)
    if isinstance(opt, click.Option):
        args += [opt.opts[0], value.format(**fill)]
    monkeypatch.chdir(work)
    before = _snapshot(work, places["tiny_build"].parent)
    r = CliRunner().invoke(cli, args, catch_exceptions=True)
    assert r.exception is None or isinstance(r.exception, SystemExit), (args, repr(r.exception))
    assert r.exit_code == 2, (args, r.exit_code, r.output[-1500:])
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), (args, r.stderr[-1500:])
    assert "Traceback" not in r.output
    assert r.stdout == "", (args, r.stdout[-500:])
    assert _snapshot(work, places["tiny_build"].parent) == before, f"{args} wrote something"
    return lines[0], fill


@pytest.mark.parametrize("command,param", _cases(), ids=[f"{c}:{p}" for c, p in _cases()])
def test_a_bad_value_is_one_line_exit_2_nothing_written(command, param, places, tmp_path, monkeypatch):
    if (command, param) not in BAD:
        pytest.fail(f"no bad value for {command} {param} in BAD")
    value, word = BAD[(command, param)]
    line, fill = _invoke(command, param, value, places, tmp_path, monkeypatch)
    assert word.format(**fill) in line, line


@pytest.mark.parametrize("command,param,value,word", MORE_BAD, ids=[f"{c}:{p}={v}" for c, p, v, _ in MORE_BAD])
def test_more_bad_values(command, param, value, word, places, tmp_path, monkeypatch):
    line, fill = _invoke(command, param, value, places, tmp_path, monkeypatch)
    assert word.format(**fill) in line, line


@pytest.mark.parametrize("args", [
    ["train", "--out", "x", "--epochs", "0"],
    ["nonsense-command"],
    ["--no-such-option"],
    ["bench", "--suite", "fused", "--backends", "ort"],
])
def test_a_real_process_prints_one_line(args, tmp_path):
    """The same promise outside CliRunner: a fresh interpreter's stderr is one line."""
    p = subprocess.run([sys.executable, "-m", "onetrans_trt.cli", *args], capture_output=True, text=True,
                       cwd=tmp_path)
    assert p.returncode == 2, p.stderr[-2000:]
    lines = [x for x in p.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr[-2000:]
    assert p.stdout == "" and list(tmp_path.iterdir()) == []
