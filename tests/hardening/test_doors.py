"""One guarded door: every command that reads a build, a checkpoint or an input file is fed
hostile artifacts and must exit 2 with one line, no traceback, and write nothing.

The commands come from the CLI's own click tree: a command that takes a BUILD or CKPT (or
one of the file options) and has no entry here fails the coverage test, so a new command
cannot skip the door. Hostile builds: external data pointing out of the build (from the
graphs the command reads and from ``serving.onnx``), a graph that is a symbolic link out, a
variant directory linked out, the manifest as a link to ``/dev/zero``, a FIFO, nested
100,000 deep, holding an integer of 5,000 digits, with wrong types, or 3 GB (sparse).
Hostile checkpoints: ``config.json`` linked to ``/dev/zero``, a FIFO, nested deep, a giant
integer; the weights linked out. Hostile files for every file option: ``/dev/zero``, a FIFO.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import click
import onnx
import pytest
from click.testing import CliRunner

from onetrans_trt.cli import _DOOR_FILES, cli

# the arguments each command needs to reach its door (click's own required options)
ARGS = {
    "graphs": ["--passes", "cleanup"],
    "inspect": [],
    "convert": ["--quality-requests", "0"],
    "calibrate": ["--data", "ml-100k", "--samples", "2", "--quality-requests", "0"],
    "build": [],
    "validate": ["--data", "ml-100k", "--count", "1"],
    "serve-repo": ["--out", "{ROOT}/repo"],
    "rank": ["--request", "{REQUEST}"],
    "bench": ["--quick", "--rounds", "1"],
    "info": [],
    "export": ["--out", "{ROOT}/out"],
}
CKPT_COMMANDS = ("info", "export", "rank")


def _takes(cmd: click.Command) -> set[str]:
    return {p.name for p in cmd.params}


def test_every_command_that_reads_an_artifact_is_covered():
    readers = {name for name, cmd in cli.commands.items()
               if _takes(cmd) & ({"build", "ckpt", "goldens"} | set(_DOOR_FILES))}
    assert readers - {"train"} <= set(ARGS), sorted(readers - set(ARGS))
    positional = {n for n in readers for q in cli.commands[n].params if isinstance(q, click.Argument) and q.name == "ckpt"}
    assert set(CKPT_COMMANDS) == positional
    assert {n for n in readers if "ckpt" in _takes(cli.commands[n])} - positional == {"validate"}  # --ckpt: below


def _snapshot(root: Path) -> dict[str, tuple]:
    out = {}
    for dirpath, dirs, files in os.walk(root, followlinks=False):
        for name in dirs + files:
            p = Path(dirpath) / name
            st = os.lstat(p)
            out[str(p)] = (st.st_size, st.st_mtime_ns, st.st_mode)
    return out


def _run(root: Path, argv: list[str]) -> tuple[int, str]:
    before = _snapshot(root)
    r = CliRunner().invoke(cli, argv)
    after = _snapshot(root)
    assert r.exception is None or isinstance(r.exception, SystemExit), \
        f"{argv}: traceback {type(r.exception).__name__}: {r.exception}"
    assert after == before, f"{argv}: wrote {sorted(set(after) - set(before))[:5]} / changed files"
    lines = r.stderr.strip().splitlines()
    assert r.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (argv, r.exit_code, r.stderr[-600:])
    return r.exit_code, lines[0]


def _escape(graph: Path) -> None:
    m = onnx.load(str(graph))
    t = max(m.graph.initializer, key=lambda t: len(t.raw_data))
    (graph.parent.parent / "outside.bin").write_bytes(t.raw_data)
    t.ClearField("raw_data")
    t.data_location = onnx.TensorProto.EXTERNAL
    t.external_data.add(key="location", value="../outside.bin")
    onnx.save(m, str(graph))


def _manifest(text: str):
    def plant(b: Path) -> None:
        (b / "manifest.json").write_text(text.replace("{M}", (b / "manifest.json").read_text()))
    return plant


def _mutate_manifest(fn):
    def plant(b: Path) -> None:
        m = json.loads((b / "manifest.json").read_text())
        fn(m)
        (b / "manifest.json").write_text(json.dumps(m))
    return plant


def _link_out(rel: str):
    def plant(b: Path) -> None:
        src = b / rel
        dst = b.parent / ("moved-" + src.name)
        shutil.move(src, dst)
        os.symlink(dst, src)
    return plant


def _device(rel: str, target: str = "/dev/zero"):
    def plant(b: Path) -> None:
        (b / rel).unlink()
        os.symlink(target, b / rel)
    return plant


def _fifo(rel: str):
    def plant(b: Path) -> None:
        (b / rel).unlink()
        os.mkfifo(b / rel)
    return plant


def _sparse(rel: str, size: int = 3 << 30):
    def plant(b: Path) -> None:
        with open(b / rel, "r+b") as f:
            f.truncate(size)
    return plant


BUILD_PLANTS = {
    "escaping external data": lambda b: _escape(b / "candidate_scorer.onnx"),
    "escaping serving.onnx": lambda b: _escape(b / "serving.onnx"),
    "graph linked out": _link_out("candidate_scorer.onnx"),
    "variant dir linked out": lambda b: (b / "fp16").mkdir() or _link_out("fp16")(b),
    "manifest is /dev/zero": _device("manifest.json"),
    "manifest is a FIFO": _fifo("manifest.json"),
    "manifest nested deep": _manifest("[" * 100_000 + "]" * 100_000),
    "manifest giant integer": lambda b: (b / "manifest.json").write_text(
        (b / "manifest.json").read_text().replace('"opset": 23', '"opset": ' + "9" * 5000)),
    "manifest wrong types": _mutate_manifest(lambda m: m.update(graphs=["candidate_scorer.onnx"])),
    "manifest 3 GB": _sparse("manifest.json"),
}

CKPT_PLANTS = {
    "config is /dev/zero": _device("config.json"),
    "config is a FIFO": _fifo("config.json"),
    "config nested deep": lambda c: (c / "config.json").write_text("[" * 100_000 + "]" * 100_000),
    "config giant integer": lambda c: (c / "config.json").write_text(
        (c / "config.json").read_text().replace('"d_model": ', '"d_model": ' + "9" * 5000 + ", \"x\": ", 1)),
    "weights linked out": _link_out("model.safetensors"),
}


@pytest.fixture(scope="module")
def request_file(tiny_build, tmp_path_factory):
    p = tmp_path_factory.mktemp("req") / "req.json"
    shutil.copy(tiny_build / "samples" / "request_0.json", p)
    return p


def _argv(cmd: str, target: Path, root: Path, request_file: Path) -> list[str]:
    fill = {"{ROOT}": str(root), "{REQUEST}": str(request_file)}
    rest = [fill.get(a, a).replace("{ROOT}", str(root)) for a in ARGS[cmd]]
    return [cmd, str(target), *rest]


@pytest.mark.parametrize("plant", list(BUILD_PLANTS))
def test_every_build_command_refuses_a_hostile_build(plant, tiny_build, tmp_path, request_file):
    root = tmp_path / "w"
    b = root / "build"
    shutil.copytree(tiny_build, b)
    BUILD_PLANTS[plant](b)
    seen = {}
    for cmd in ARGS:
        if cmd == "export" or cmd == "info":
            continue  # they take a checkpoint: below
        _, line = _run(root, _argv(cmd, b, root, request_file))
        seen[cmd] = line
    assert len(seen) == len(ARGS) - 2


@pytest.mark.parametrize("plant", list(CKPT_PLANTS))
def test_every_checkpoint_command_refuses_a_hostile_checkpoint(plant, tiny_ckpt, tiny_build, tmp_path, request_file):
    root = tmp_path / "w"
    c = root / "ckpt"
    shutil.copytree(tiny_ckpt, c)
    CKPT_PLANTS[plant](c)
    for cmd in CKPT_COMMANDS:
        _run(root, _argv(cmd, c, root, request_file))
    b = root / "build"
    shutil.copytree(tiny_build, b)
    _run(root, ["validate", str(b), "--ckpt", str(c), "--data", "ml-100k", "--count", "1"])


def test_every_file_option_refuses_devices_and_fifos(tiny_build, tmp_path, request_file):
    """Each command's file options (requests, inputs, policy, limits, spec, weights) given
    /dev/zero or a FIFO: refused at the door, never read (reading either would not end)."""
    root = tmp_path / "w"
    b = root / "build"
    shutil.copytree(tiny_build, b)
    fifo = root / "f.json"
    os.mkfifo(fifo)
    tried = 0
    for name, cmd in sorted(cli.commands.items()):
        for p in cmd.params:
            if p.name not in _DOOR_FILES or name not in ARGS:
                continue
            flag = next(o for o in p.opts if o.startswith("--"))
            for bad in ("/dev/zero", str(fifo)):
                argv = _argv(name, b, root, request_file)
                if flag in argv:  # replace the required value (rank --request)
                    argv[argv.index(flag) + 1] = bad
                else:
                    argv += [flag, bad]
                _, line = _run(root, argv)
                assert "not a regular file" in line, (argv, line)
                tried += 1
    assert tried >= 14, tried
