"""Fuzzing request files through the command line: every input ends in exit 0 (a result) or
exit 2 (one line, ``error: ...``), never a traceback, never another exit code, never a file
written.

The commands that read request files: ``rank CKPT --request F`` (torch, with and without a
``--limits`` file, itself fuzzed now and then), ``rank BUILD --request F`` (ONNX Runtime),
``validate BUILD --requests F`` and ``validate BUILD --inputs F`` (which first sniffs the
file's kind). The files come from :mod:`tests.hardening.fuzz_requests` (mutated JSON, number
tokens, deep nesting, wrong types, huge strings and lists, truncated and bit-flipped bytes,
path tricks). Each input runs in this process through click (``CliRunner``), the way
``onetrans-trt`` runs it; the model and the ONNX Runtime sessions, which do not depend on the
request file, are built once per checkpoint/graph and reused (the door, the manifest and
lineage checks, reading, validating, encoding and scoring run for every input). A few inputs
of each outcome also run in a real ``python -m onetrans_trt.cli`` process, which must
agree exactly.

Counts at ``FUZZ_SCALE=1``: 300 command lines, 2 of them again in real processes; ``make fuzz``
(``FUZZ_SCALE=10``) runs 3,000, and every command's kept refusal and result (10) in real
processes. The same files through the Python API: ``test_fuzz.py``.
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from click.testing import CliRunner

from onetrans_trt.cli import cli
from tests.hardening import fuzz_requests as fr
from tests.hardening.test_fuzz import SEED, n

# (command, share): where the inputs go
COMMANDS = {"rank-ckpt": 45, "rank-ckpt-limits": 12, "rank-build": 15, "validate-requests": 16, "validate-inputs": 12}
# the kept inputs run again in a real process, in this order (two at scale 1)
CROSS_CHECK = [("validate-requests", "refused"), ("rank-ckpt", "ok"), ("rank-build", "refused"),
               ("validate-inputs", "ok"), ("rank-ckpt-limits", "refused"), ("rank-ckpt", "refused"),
               ("rank-build", "ok"), ("validate-requests", "ok"), ("validate-inputs", "refused"),
               ("rank-ckpt-limits", "ok")]


def _snapshot(*roots: Path) -> dict[str, tuple]:
    """Every entry under ``roots`` (not following links): size, mtime, mode."""
    out: dict[str, tuple] = {}
    todo = [str(r) for r in roots]
    while todo:
        with os.scandir(todo.pop()) as it:
            for e in it:
                st = e.stat(follow_symlinks=False)
                out[e.path] = (st.st_size, st.st_mtime_ns, st.st_mode)
                if e.is_dir(follow_symlinks=False):
                    todo.append(e.path)
    return out


@pytest.fixture
def built_once(monkeypatch):
    """The checkpoint's model and the graphs' ORT sessions made once per path (they do not
    depend on the request file); everything else runs per input. Restores the process's
    logging afterwards (each CLI call installs its stderr handler)."""
    import logging

    from onetrans_trt import log
    from onetrans_trt.models import checkpoint
    from onetrans_trt.runtime.ort_backend import OrtSplitBackend

    models: dict = {}
    sessions: dict = {}
    real_load, real_session = checkpoint.load_checkpoint, OrtSplitBackend._session

    def load_checkpoint(ckpt_dir):
        key = str(Path(ckpt_dir).resolve())
        if key not in models:
            models[key] = real_load(ckpt_dir)
        return models[key]

    def session(self, path, providers, threads):
        key = (str(Path(path).resolve()), tuple(providers or ()), threads)
        if key not in sessions:
            sessions[key] = real_session(self, path, providers, threads)
        return sessions[key]

    monkeypatch.setattr(checkpoint, "load_checkpoint", load_checkpoint)
    monkeypatch.setattr(OrtSplitBackend, "_session", session)
    yield
    for h in list(log._handlers):
        logging.getLogger().removeHandler(h)
    log._handlers.clear()
    log._state.update(verbosity=0, configured=False)
    logging.captureWarnings(False)


def _argv(command: str, case: fr.Case, ckpt: Path, build: Path, limits: Path | None) -> list[str]:
    if command.startswith("rank"):
        target = build if command == "rank-build" else ckpt
        argv = ["rank", str(target), "--request", case.path]
        return argv + ["--limits", str(limits)] if limits is not None else argv
    flag = "--requests" if command == "validate-requests" else "--inputs"
    return ["validate", str(build), flag, case.path, "--backends", "ort", "--count", "2"]


# the lines ``cli.PlainProgress`` prints on stderr once work has run a couple of seconds (a slow
# machine validating a huge request): "<task>: 1/1 done in 3 s[, status]", "<task>: 1/2 (50%),
# 3 s elapsed, ~3 s left[, status]" and "<task>: <status> (12 s)"; a successful run may print
# those and nothing else
_PROGRESS = re.compile(r"[^:\n]+: (?:[\d.]+/[\d.]+ (?:done in \d+ s|\(\d+%\), \d+ s elapsed, ~(?:\d+|nan) s left)"
                       r"(?:, [^\n]*)?|[^\n]* \(\d+ s\))")


def _not_progress(err: str) -> list[str]:
    """The stderr lines that are not progress lines."""
    return [line for line in err.splitlines() if not _PROGRESS.fullmatch(line)]


def _judge(r, argv: list[str], what: str) -> str:
    """One input's outcome, asserted: ``"ok"`` or ``"refused"``."""
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        import traceback

        tb = "".join(traceback.format_exception(r.exception))[-1500:]
        pytest.fail(f"{what}\n{argv}: unhandled {type(r.exception).__name__}\n{tb}")
    out, err = r.stdout, r.stderr
    assert "Traceback" not in out + err, (what, argv, err[-1500:])
    assert r.exit_code in (0, 2), (what, argv, r.exit_code, err[-1500:], out[-500:])
    if r.exit_code == 2:
        lines = err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), (what, argv, err[-1500:])
        assert out == "", (what, argv, out[-500:])
        return "refused"
    assert not _not_progress(err), (what, argv, err[-1500:])
    if argv[0] == "rank":
        res = fr.no_nan(out)  # strict JSON: no NaN/Infinity in what we print
        for one in res if isinstance(res, list) else [res]:
            assert set(one) >= {"order", "scores", "logits"}, (what, sorted(one))
    else:
        assert out.startswith("verdict: PASS"), (what, out[-800:])
    return "ok"


def _subprocess(argv: list[str], cwd: Path):
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "onetrans_trt.cli", *argv], capture_output=True, text=True,
                       cwd=cwd, timeout=300)
    return p, time.perf_counter() - t


def test_fuzz_request_files_through_the_cli(tiny_ckpt, tiny_build, movielens, tmp_path, monkeypatch, built_once):
    base = [r.to_json() for r, _ in movielens.requests(5, n_candidates=3, seed=4)]
    work = tmp_path / "cwd"  # the working directory: must stay empty
    work.mkdir()
    monkeypatch.chdir(work)
    places = fr.Places(tmp_path / "in", fr.valid_text(random.Random(1), base))
    feeds = fr.valid_feeds(tiny_build)
    rng = random.Random(10 + 1000 * SEED)
    stats: dict[str, dict[str, int]] = {}
    kept: dict[tuple[str, str], tuple[list[str], object]] = {}  # for the real-process cross-check
    count = n(300)
    cpu: dict[str, float] = {}
    t0 = time.perf_counter()
    for i in range(count):
        case = fr.make_case(rng, base, places.root, i, places)
        command = rng.choices(list(COMMANDS), weights=list(COMMANDS.values()))[0]
        if command == "validate-inputs" and rng.random() < 0.4:  # graph feeds: .npz or Polygraphy JSON
            case = fr.feeds_case(rng, feeds, places.root, i)
        limits, lnote = fr.limits_case(rng, places.root, i) if command == "rank-ckpt-limits" else (None, "")
        argv = _argv(command, case, tiny_ckpt, tiny_build, limits)
        what = f"input #{i} ({case.kind}, {command}): {case.note}{' limits ' + lnote if lnote else ''}"
        before = _snapshot(work, places.root, tiny_ckpt, tiny_build)
        c0 = time.process_time()
        r = CliRunner().invoke(cli, argv, catch_exceptions=True)
        cpu[command] = cpu.get(command, 0.0) + time.process_time() - c0
        outcome = _judge(r, argv, what)
        after = _snapshot(work, places.root, tiny_ckpt, tiny_build)
        assert after == before, (what, argv, "wrote or changed:",
                                 sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))[:5])
        s = stats.setdefault(f"{command}/{case.kind}", {"ok": 0, "refused": 0})
        s[outcome] += 1
        if (command, outcome) not in kept and case.kind != "path":
            saved = places.root / f"kept-{command}-{outcome}.json"
            saved.write_bytes(Path(case.path).read_bytes())
            if limits is not None:
                kept_limits = places.root / f"kept-{command}-{outcome}-limits.json"
                kept_limits.write_bytes(limits.read_bytes())
                argv = argv[:-1] + [str(kept_limits)]
            argv = [str(saved) if a == case.path else a for a in argv]
            again = CliRunner().invoke(cli, argv, catch_exceptions=True)  # its messages name the kept file
            assert _judge(again, argv, what) == outcome, (what, again.stderr[-500:])
            kept[(command, outcome)] = (argv, again)
    took = time.perf_counter() - t0
    ok = sum(s["ok"] for s in stats.values())
    refused = sum(s["refused"] for s in stats.values())
    print(f"\nCLI request fuzz: {count} inputs in {took:.1f} s ({1000 * took / count:.0f} ms each): "
          f"{ok} ranked/validated, {refused} refused")
    for command in COMMANDS:
        k = sum(v["ok"] + v["refused"] for key, v in stats.items() if key.startswith(command + "/"))
        print(f"  {command}: {k} inputs, {1000 * cpu.get(command, 0) / max(k, 1):.0f} ms CPU each")
    for command in COMMANDS:
        assert sum(v["ok"] + v["refused"] for k, v in stats.items() if k.startswith(command + "/")) > count // 20, stats
    assert ok > count // 10 and refused > count // 2, stats  # both paths really exercised
    assert {c for c, _ in kept} == set(COMMANDS), sorted(kept)

    # the same promise in real processes (sys.stderr unredirected, warnings not captured by
    # pytest): two kept inputs at scale 1, every command's refusal and result at full scale
    picks = [k for k in CROSS_CHECK if k in kept][: max(2, n(1))]
    with ThreadPoolExecutor(max_workers=2) as pool:  # two at a time: each is mostly its imports
        t1 = time.perf_counter()
        runs = list(pool.map(lambda key: _subprocess([str(a) for a in kept[key][0]], work), picks))
    print(f"  {len(picks)} real processes in {time.perf_counter() - t1:.1f} s "
          f"({', '.join(f'{s:.1f}' for _, s in runs)} s each)")
    for key, (p, _) in zip(picks, runs):
        argv, r = kept[key]
        assert p.returncode == r.exit_code, (key, argv, p.returncode, p.stderr[-1500:])
        assert "Traceback" not in p.stdout + p.stderr
        if p.returncode == 2:
            assert p.stderr == r.stderr and p.stdout == "", (key, p.stderr[-1500:], r.stderr[-500:])
        else:
            assert p.stderr == "", (key, p.stderr[-1500:])
            if argv[0] == "rank":
                assert json.loads(p.stdout) == json.loads(r.stdout), key
        assert list(work.iterdir()) == [], key


def test_judge_lets_progress_lines_through_and_nothing_else(monkeypatch):
    """A slow machine prints ``PlainProgress`` lines for a huge request (CI did: "validate: 1/1
    done in 3 s, reference"); those are a success's stderr, a warning is not."""
    import io
    import types

    from onetrans_trt import cli as cli_mod

    clock = iter(range(0, 1000, 7))
    monkeypatch.setattr(time, "monotonic", lambda: float(next(clock)))
    stream = io.StringIO()
    p = cli_mod.PlainProgress(stream=stream)
    a = p.add_task("validate", total=2, status="reference")
    p.update(a, advance=1)
    p.update(a, advance=1, status="ort")
    b = p.add_task("export", status="tracing")
    p.update(b, status="graph passes")
    p.update(b, status="writing")
    lines = stream.getvalue()
    assert len(lines.splitlines()) >= 3, lines
    assert _not_progress(lines) == [], lines
    ok = types.SimpleNamespace(exception=None, stdout="verdict: PASS\n", stderr=lines, exit_code=0)
    assert _judge(ok, ["validate"], "progress") == "ok"
    for extra in ("UserWarning: something", "Traceback (most recent call last):", "validate: oops"):
        bad = types.SimpleNamespace(exception=None, stdout="verdict: PASS\n", stderr=lines + extra + "\n", exit_code=0)
        with pytest.raises(AssertionError):
            _judge(bad, ["validate"], "extra")
