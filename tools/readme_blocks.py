"""The README's code blocks, parsed and run: what keeps README.md and the code in step.

Every fenced block of README.md is one :class:`Block`. A block may carry directives in an
HTML comment on the line right above its opening fence::

    <!-- readme-test: skip (runs the whole demo: 20 minutes) -->
    <!-- readme-test: tiny; exit 3 (needs TensorRT and a GPU) -->

Directives (several are separated by ``;``; a reason in parentheses where noted):

``skip (REASON)``
    not run; the reason is required.
``exit N (REASON)``
    run; the block must end with exit status N (the reason is required).
``gpu (REASON)``
    run; it must exit 3 ("TensorRT/GPU unavailable") where no TensorRT engine can be built
    and 0 where one can.
``tiny``
    run with the substitutions in :data:`TINY` (smaller presets, fewer epochs, seeds and
    requests); a ``tiny`` block the table does not change is an error.
``file NAME``
    (``json``, ``python`` or ``text`` blocks) written to NAME in the working directory; a
    ``json`` one is parsed first.
``output``
    (an output block: no language or ``text``) must equal, line for line with trailing blanks
    removed, the standard output of the block run last.
``any-sha256 (REASON)``
    (with ``output``) each ``sha256 <64 hex digits>`` in the block stands for any digest: the
    lines must match with the digests left out. For digests of trained weights, whose last
    bits depend on the CPU's vector instructions (AVX2, AVX-512, AMX give different sums); the
    reason is required.

Without a directive a ``bash`` block runs with ``bash -e -o pipefail`` (exit 0 expected),
a ``python`` block with the running interpreter, a ``json`` block is parsed, and an output
block (no language, ``text``) is shown only. Any other language or directive is an error.
Blocks run in README order in one working directory, so later blocks use what earlier ones
wrote (``runs/``, ``builds/``); ``examples/`` is linked in from the repository.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"

RUN_LANGS = {"bash", "python"}
SHOWN_LANGS = {"", "text", "json"}
KINDS = {"skip", "exit", "gpu", "tiny", "file", "output", "any-sha256"}
NEEDS_REASON = {"skip", "exit", "gpu", "any-sha256"}

# `tiny`: (pattern, replacement) applied in order to a block's text
TINY: list[tuple[str, str]] = [
    (r"--preset (small|onetrans-s|onetrans-l|hyformer-paper)\b", "--preset tiny"),
    (r"--epochs \d+", "--epochs 1"),
    (r"--seeds \d+", "--seeds 1"),
    (r"(onetrans-trt train (?:(?!--limit)[^\n#])*?)(\s*(?:#|$))", r"\1 --limit 2000\2"),
    (r"--count \d+", "--count 5"),
    (r"--samples \d+", "--samples 8"),
    (r"--quality-requests ([1-9]\d*)", "--quality-requests 10"),
    (r"--candidates \d+", "--candidates 16"),
    (r"--history \d+", "--history 16"),
]

_FENCE = re.compile(r"^```(\S*)\s*$")
_DIRECTIVE = re.compile(r"^<!--\s*readme-test:(.*?)-->\s*$")
_ONE = re.compile(r"^([\w-]+)(?:\s+([^\s(]+))?\s*(?:\((.+)\))?$")


class ReadmeError(Exception):
    """A README block that cannot be run, or that ran and did not do what it says."""


@dataclass
class Directive:
    kind: str
    arg: str | None = None
    reason: str | None = None


@dataclass
class Block:
    lang: str
    text: str
    line: int  # 1-based line of the opening fence
    section: str  # the nearest heading above
    directives: list[Directive] = field(default_factory=list)

    def get(self, kind: str) -> Directive | None:
        return next((d for d in self.directives if d.kind == kind), None)

    @property
    def where(self) -> str:
        return f"README.md:{self.line} ({self.section})"


def _split(text: str) -> list[str]:
    """``a; b (x; y)`` -> ``["a", "b (x; y)"]``: ``;`` separates directives outside parentheses."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        depth += (ch == "(") - (ch == ")")
        if ch == ";" and depth == 0:
            parts.append(cur.strip())
            cur = ""
        else:
            cur += ch
    return parts + [cur.strip()]


def parse_directives(text: str, line: int) -> list[Directive]:
    out = []
    for part in _split(text):
        m = _ONE.match(part)
        if not m or m.group(1) not in KINDS:
            raise ReadmeError(f"README.md:{line}: unknown readme-test directive {part!r}; known: {sorted(KINDS)}")
        d = Directive(m.group(1), m.group(2), m.group(3))
        if d.kind in NEEDS_REASON and not d.reason:
            raise ReadmeError(f"README.md:{line}: directive {d.kind!r} needs a reason in parentheses")
        if d.kind == "exit" and (d.arg is None or not d.arg.isdigit()):
            raise ReadmeError(f"README.md:{line}: 'exit' needs a status: exit N (reason)")
        if d.kind == "file" and not d.arg:
            raise ReadmeError(f"README.md:{line}: 'file' needs a name: file NAME")
        if d.kind not in ("exit", "file") and d.arg is not None:
            raise ReadmeError(f"README.md:{line}: directive {d.kind!r} takes no argument ({d.arg!r})")
        out.append(d)
    return out


def parse(text: str) -> list[Block]:
    """Every fenced block, with its directives and section; indented code blocks are refused
    (they could not carry a language or directives)."""
    lines = text.splitlines()
    blocks: list[Block] = []
    section = "(top)"
    i = 0
    while i < len(lines):
        ln = lines[i]
        if ln.startswith("#"):
            section = ln.lstrip("#").strip()
        m = _FENCE.match(ln)
        if m:
            lang = m.group(1)
            if lang not in RUN_LANGS | SHOWN_LANGS:
                raise ReadmeError(f"README.md:{i + 1}: code block language {lang!r} is not one the README test "
                                  f"knows ({sorted(RUN_LANGS | SHOWN_LANGS)})")
            j = i + 1
            while j < len(lines) and lines[j].rstrip() != "```":
                j += 1
            if j == len(lines):
                raise ReadmeError(f"README.md:{i + 1}: code block never closed")
            directives: list[Directive] = []
            if i > 0:
                d = _DIRECTIVE.match(lines[i - 1])
                if d:
                    directives = parse_directives(d.group(1).strip(), i)
            blocks.append(Block(lang, "\n".join(lines[i + 1:j]) + "\n", i + 1, section, directives))
            i = j + 1
            continue
        if _DIRECTIVE.match(ln) and not (i + 1 < len(lines) and _FENCE.match(lines[i + 1])):
            raise ReadmeError(f"README.md:{i + 1}: a readme-test directive must be on the line right above a "
                              "code block")
        if ln.startswith("    ") and ln.strip() and i > 1 and not lines[i - 1].strip() \
                and not _in_list(lines, i - 1):
            raise ReadmeError(f"README.md:{i + 1}: indented code block; use a fenced block with a language")
        i += 1
    for b in blocks:
        kinds = [d.kind for d in b.directives]
        if b.lang in ("", "text") and set(kinds) - {"output", "file", "skip", "any-sha256"}:
            raise ReadmeError(f"{b.where}: an output block takes only 'output', 'file', 'skip' or 'any-sha256'")
        if "any-sha256" in kinds and "output" not in kinds:
            raise ReadmeError(f"{b.where}: 'any-sha256' goes with 'output'")
        if "output" in kinds and b.lang not in ("", "text"):
            raise ReadmeError(f"{b.where}: 'output' is for output blocks (no language or text)")
        if "file" in kinds and b.lang == "bash":
            raise ReadmeError(f"{b.where}: 'file' is for json, python or text blocks")
        if b.get("tiny") and b.lang != "bash":
            raise ReadmeError(f"{b.where}: 'tiny' is for bash blocks")
    return blocks


_SHA256 = re.compile(r"\bsha256 [0-9a-f]{64}\b")


def mask_sha256(lines: list[str]) -> list[str]:
    """``lines`` with every ``sha256 <64 hex digits>`` replaced by ``sha256 <any>``."""
    return [_SHA256.sub("sha256 <any>", ln) for ln in lines]


def _in_list(lines: list[str], i: int) -> bool:
    """Whether the paragraph above blank line ``i`` is a list item (its indented text continues it)."""
    j = i - 1
    while j >= 0 and lines[j].strip():
        if re.match(r"^\s*([-*]|\d+\.)\s", lines[j]):
            return True
        j -= 1
    return False


def tiny(text: str) -> str:
    """A block's text with the :data:`TINY` substitutions applied (line by line)."""
    out = []
    for ln in text.splitlines():
        for pat, rep in TINY:
            ln = re.sub(pat, rep, ln)
        out.append(ln)
    return "\n".join(out) + "\n"


def block_env(root: Path = ROOT) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(root) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("OMP_NUM_THREADS", "2")
    return env


@dataclass
class Ran:
    block: Block
    status: int | None  # None: not run
    seconds: float = 0.0
    stdout: str = ""


def _expected_status(b: Block, gpu_available: bool) -> int:
    if b.get("exit"):
        return int(b.get("exit").arg)
    if b.get("gpu"):
        return 0 if gpu_available else 3
    return 0


def run_blocks(blocks: list[Block], workdir: Path, *, gpu_available: bool = False, timeout: float = 900,
               root: Path = ROOT, log=None) -> list[Ran]:
    """Run ``blocks`` in order in ``workdir``; raise :class:`ReadmeError` at the first block
    that does not do what the README says."""
    workdir.mkdir(parents=True, exist_ok=True)
    if (root / "examples").is_dir() and not (workdir / "examples").exists():
        (workdir / "examples").symlink_to(root / "examples")
    env = block_env(root)
    done: list[Ran] = []
    last: Ran | None = None
    for n, b in enumerate(blocks):
        if b.get("skip"):
            done.append(Ran(b, None))
            continue
        if b.get("file"):
            if b.lang == "json":
                _parse_json(b)
            (workdir / b.get("file").arg).write_text(b.text)
            done.append(Ran(b, None))
            continue
        if b.lang == "json":
            _parse_json(b)
            done.append(Ran(b, None))
            continue
        if b.lang in ("", "text"):
            if b.get("output"):
                if last is None:
                    raise ReadmeError(f"{b.where}: 'output' with no block run before it")
                got = [ln.rstrip() for ln in last.stdout.rstrip().splitlines()]
                want = [ln.rstrip() for ln in b.text.rstrip().splitlines()]
                if b.get("any-sha256"):
                    got, want = mask_sha256(got), mask_sha256(want)
                if got != want:
                    raise ReadmeError(f"{b.where}: the README shows\n" + "\n".join(want) + "\nbut "
                                      f"README.md:{last.block.line} printed\n" + "\n".join(got))
            done.append(Ran(b, None))
            continue
        text = b.text
        if b.get("tiny"):
            text = tiny(b.text)
            if text == b.text:
                raise ReadmeError(f"{b.where}: 'tiny' changes nothing in this block")
        if b.lang == "bash":
            cmd = ["bash", "-e", "-o", "pipefail", "-c", text]
        else:
            script = workdir / f"_readme_block_{n}.py"
            script.write_text(text)
            cmd = [sys.executable, str(script)]
        t0 = time.perf_counter()
        try:
            p = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise ReadmeError(f"{b.where}: still running after {timeout:.0f} s:\n{text}") from None
        ran = Ran(b, p.returncode, time.perf_counter() - t0, p.stdout)
        if log:
            log(f"{b.where}: exit {p.returncode} in {ran.seconds:.1f} s")
        want = _expected_status(b, gpu_available)
        if p.returncode != want:
            raise ReadmeError(f"{b.where}: exit status {p.returncode}, the README says {want}:\n{text}\n"
                              f"--- stdout ---\n{p.stdout[-3000:]}\n--- stderr ---\n{p.stderr[-3000:]}")
        done.append(ran)
        last = ran
    return done


def _parse_json(b: Block) -> None:
    try:
        json.loads(b.text)
    except json.JSONDecodeError as e:
        raise ReadmeError(f"{b.where}: json block does not parse: {e}") from None


def section_blocks(blocks: list[Block], section: str) -> list[Block]:
    return [b for b in blocks if b.section == section]


def main(argv: list[str] | None = None) -> int:
    import argparse
    import tempfile

    ap = argparse.ArgumentParser(description="Run the README's code blocks (see the module docstring).")
    ap.add_argument("--section", default=None, help="only the blocks of this heading (e.g. 'Quickstart')")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--list", action="store_true", help="list the blocks and their directives")
    ap.add_argument("--start-line", type=int, default=0,
                    help="skip the blocks above this README line (resume in --workdir after a failure)")
    args = ap.parse_args(argv)
    blocks = parse(README.read_text())
    if args.section:
        blocks = [b for b in blocks if b.section.startswith(args.section)]
    blocks = [b for b in blocks if b.line >= args.start_line]
    if args.list:
        for b in blocks:
            ds = "; ".join(" ".join(x for x in (d.kind, d.arg, d.reason and f"({d.reason})") if x)
                           for d in b.directives)
            print(f"{b.line:5d} {b.lang or '-':7s} {ds or '(runs as written)' if b.lang in RUN_LANGS else ds}")
        return 0
    wd = args.workdir or Path(tempfile.mkdtemp(prefix="readme-"))
    run_blocks(blocks, wd, log=print)
    print(f"ok: {len(blocks)} blocks in {wd}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
