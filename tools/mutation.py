#!/usr/bin/env python3
"""Mutation testing as a measurement: ``make mutation``.

Runs mutmut 3 on each listed module with only the tests that cover it, in a scratch copy of
the tree under ``runs/mutation/work/<module>/`` (mutmut itself mutates a further copy,
``mutants/``, inside that): the working tree is never modified. Collects killed / survived /
timeout per module, drops the equivalent mutants listed (each with its reason) in
``tools/mutation_equivalent.toml``, and writes ``runs/mutation/report.json`` and
``runs/mutation/report.md`` (kill rate per module and overall, every surviving mutant with its
line and diff).

mutmut 3 does not mutate decorated functions (it wraps every function in a trampoline, and a
decorator would run on the wrong thing). This script removes top-level decorators in the copy
and re-applies them at the end of the module (``f = deco(f)``; decorator lines become blank
lines, so line numbers do not move): ``@contextlib.contextmanager`` in ``io.py``, the
``@register(...)`` graph passes and ``@property`` get mutated too. Decorators of nested
functions are left alone (their functions are not mutated; the report lists them).

    python tools/mutation.py                      # every module
    python tools/mutation.py --module io.py       # modules whose path contains "io.py"
    python tools/mutation.py --max-minutes 30     # stop (and report what finished) after 30 min
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "runs" / "mutation"
EXCLUSIONS = ROOT / "tools" / "mutation_equivalent.toml"
REQUIREMENT = "mutmut==3.8.1"  # installed by `make mutation` (not part of the dev extra)

# module (or package folder) -> the test files that cover it (found with coverage + grep)
MODULES: dict[str, list[str]] = {
    "onetrans_trt/io.py": ["tests/mutation_kills/test_io.py", "tests/mutation_kills/test_io_pause.py"],
    "onetrans_trt/trust.py": ["tests/mutation_kills/test_trust.py", "tests/mutation_kills/test_trust_external.py"],
    "onetrans_trt/runtime/cache.py": ["tests/mutation_kills/test_cache.py"],  # tests/runtime/test_cache.py: 150 s (trains a model)
    "onetrans_trt/data/requests.py": ["tests/data/test_requests.py", "tests/data/test_limits.py",
                                      "tests/mutation_kills/test_requests.py"],
    # graphs/: per-pass unit tests on hand-made ONNX graphs (milliseconds each); tests/graphs/test_*.py
    # (the others) trace whole models per run (10-40 s), too slow to repeat per mutant
    "onetrans_trt/graphs/": ["tests/graphs/test_passes_unit.py", "tests/graphs/test_split_kv_unit.py",
                             "tests/graphs/test_no_broadcast_unit.py", "tests/graphs/test_flops_unit.py",
                             "tests/graphs/test_pyramid_unit.py", "tests/graphs/test_fuse_attention_unit.py",
                             "tests/graphs/test_shared_prefix_unit.py"],
    # validate/: unit tests of the helpers, and validate_build/validate_goldens/validate_module_build/
    # localize on a tiny random-weight build exported once and cached on disk (tests/validate/
    # validates whole trained builds: minutes per run)
    "onetrans_trt/validate/": ["tests/mutation_kills/test_validate.py", "tests/mutation_kills/test_validate_more.py",
                               "tests/validate/test_compare_empty.py",
                               "tests/validate/test_api_unit.py", "tests/validate/test_checks_unit.py",
                               "tests/validate/test_module_unit.py",
                               "tests/validate/test_diverge_unit.py"],
}

# per-module pytest arguments: leave out tests that are slow and reach the module only through
# layers that other tests of the selection already pin (a trained model per run, minutes)
EXTRA_ARGS: dict[str, list[str]] = {
    "onetrans_trt/data/requests.py": ["-k", "not test_ranker_truncates and not test_rank_limits_file"],
}

PYTEST_ARGS = ["-x", "-q", "-p", "no:cacheprovider"]

STATUS = {1: "killed", 3: "killed", 0: "survived", 5: "no tests", 33: "no tests", 34: "skipped",
          35: "suspicious", 36: "timeout", 24: "timeout", -24: "timeout", 152: "timeout",
          255: "timeout", -11: "killed", -9: "killed"}


def log(msg: str) -> None:
    print(f"[mutation {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------- the scratch copy

def tree_files() -> list[str]:
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT,
                         capture_output=True, check=True).stdout.decode()
    return [f for f in out.split("\0") if f and (f.startswith(("onetrans_trt/", "tests/", "examples/")) or f == "pyproject.toml")]


def make_copy(dest: Path) -> None:
    if dest.exists():
        shutil.rmtree(dest)
    for f in tree_files():
        src = ROOT / f
        if src.is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / f)


def undecorate(path: Path) -> list[str]:
    """Move top-level (and class-level, in a top-level class) decorators to the end of the
    module. Returns the nested decorated functions left as they are."""
    src = path.read_text()
    tree = ast.parse(src)
    lines = src.split("\n")
    tail: list[str] = []
    skipped: list[str] = []

    def strip(fn: ast.FunctionDef | ast.AsyncFunctionDef, owner: str | None) -> None:
        decos = fn.decorator_list
        if not decos or (owner and len(decos) == 1 and isinstance(decos[0], ast.Name)
                         and decos[0].id in ("staticmethod", "classmethod")):
            return
        if owner is None and any(isinstance(d, ast.Name) and d.id in ("staticmethod", "classmethod") for d in decos):
            return
        target = f"{owner}.{fn.name}" if owner else fn.name
        expr = target
        for d in reversed(decos):
            expr = f"({ast.get_source_segment(src, d)})({expr})"
        first = min(d.lineno for d in decos)
        for i in range(first - 1, fn.lineno - 1):  # decorator lines -> blank (lines do not move)
            lines[i] = ""
        tail.append(f"{target} = {expr}")

    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            strip(node, None)
            for sub in ast.walk(node):
                if sub is not node and isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef)) and sub.decorator_list:
                    skipped.append(f"{node.name}.{sub.name}")
        elif isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    strip(item, node.name)
    if tail:
        text = "\n".join(lines).rstrip("\n") + "\n\n\n# re-applied by tools/mutation.py (mutmut skips decorated functions)\n"
        path.write_text(text + "\n".join(tail) + "\n")
    return skipped


def module_files(mod: str, root: Path) -> list[Path]:
    p = root / mod
    return sorted(p.rglob("*.py")) if p.is_dir() else [p]


# --------------------------------------------------------------------------- results

def mutant_function(key: str, dotted: str) -> str:
    """'onetrans_trt.io.x_atomic_path__mutmut_3' -> 'atomic_path';
    '...xǁUserKVCacheǁget_or_compute__mutmut_1' -> 'UserKVCache.get_or_compute'."""
    name = key[len(dotted) + 1:] if key.startswith(dotted + ".") else key.rsplit(".", 1)[-1]
    name = re.sub(r"__mutmut_\d+$", "", name)
    if name.startswith("xǁ"):
        return ".".join(name[2:].split("ǁ"))
    return name[2:] if name.startswith("x_") else name


def function_lines(path: Path) -> dict[str, int]:
    """Function name (Class.method for methods) -> line of its ``def``."""
    tree = ast.parse(path.read_text())
    out: dict[str, int] = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            out[node.name] = node.lineno
        elif isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    out[f"{node.name}.{item.name}"] = item.lineno
    return out


def parse_diff(text: str, def_line: int | None) -> tuple[int | None, str, str, str]:
    """A `mutmut show` diff -> (line in the source file, original, mutated, the diff)."""
    body = text.split("\n", 1)[1] if text.startswith("#") else text
    old, new, line = [], [], None
    cur = None
    for ln in body.splitlines():
        m = re.match(r"@@ -(\d+)", ln)
        if m:
            cur = int(m.group(1))
            continue
        if ln.startswith(("---", "+++")) or cur is None:
            continue
        if ln.startswith("-"):
            if line is None and def_line is not None:
                line = def_line + cur - 1
            old.append(ln[1:].strip())
            cur += 1
        elif ln.startswith("+"):
            new.append(ln[1:].strip())
        else:
            cur += 1
    return line, " ".join(old), " ".join(new), body.strip()


def norm(s: str) -> str:
    return re.sub(r"\s+", " ", s).strip()


def load_exclusions() -> list[dict]:
    if not EXCLUSIONS.exists():
        return []
    data = tomllib.loads(EXCLUSIONS.read_text())
    out = data.get("equivalent", [])
    for e in out:
        missing = {"module", "function", "original", "mutated", "reason"} - set(e)
        if missing or not str(e.get("reason", "")).strip():
            raise SystemExit(f"{EXCLUSIONS}: entry {e} lacks {sorted(missing) or ['a reason']}")
    return out


def find_exclusion(excl: list[dict], module: str, function: str, original: str, mutated: str) -> dict | None:
    for e in excl:
        if (e["module"] == module and e["function"] == function and norm(e["original"]) == norm(original)
                and norm(e["mutated"]) == norm(mutated)):
            return e
    return None


_DIFFS = r"""
import json, sys
from mutmut.__main__ import find_mutant, get_diff_for_mutant
keys = json.load(sys.stdin)
paths = {}
out = {}
for k in keys:
    try:
        out[k] = get_diff_for_mutant(k, path=find_mutant(k).path)
    except Exception as e:  # noqa: BLE001
        out[k] = f"(no diff: {type(e).__name__}: {e})"
json.dump(out, sys.stdout)
"""


def diffs(work: Path, python: str, keys: list[str]) -> dict[str, str]:
    if not keys:
        return {}
    r = subprocess.run([python, "-c", _DIFFS], cwd=work, input=json.dumps(keys), capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"reading mutant diffs failed in {work}:\n{r.stderr[-2000:]}")
    return json.loads(r.stdout)


def collect(mod: str, work: Path, excl: list[dict], python: str) -> dict:
    rows = []
    used: set[int] = set()
    metas = sorted((work / "mutants").rglob("*.py.meta"))
    pending = [k for meta in metas for k, c in json.loads(meta.read_text()).get("exit_code_by_key", {}).items()
               if STATUS.get(c) != "killed"]
    diff_by_key = diffs(work, python, pending)
    for meta in metas:
        rel = meta.relative_to(work / "mutants").as_posix()[: -len(".meta")]
        dotted = rel[:-3].replace("/", ".").removesuffix(".__init__")
        defs = function_lines(ROOT / rel) if (ROOT / rel).exists() else function_lines(work / rel)
        data = json.loads(meta.read_text())
        for key, code in sorted(data.get("exit_code_by_key", {}).items()):
            status = STATUS.get(code, "survived" if code is None else f"exit {code}")
            row = {"module": rel, "id": key, "function": mutant_function(key, dotted), "status": status}
            if status not in ("killed",):
                line, old, new, diff = parse_diff(diff_by_key.get(key, ""), defs.get(row["function"]))
                row.update(line=line, original=old, mutated=new, diff=diff)
                e = find_exclusion(excl, rel, row["function"], old, new)
                if e is not None:
                    row["status"] = "equivalent"
                    row["reason"] = e["reason"]
                    used.add(id(e))
            rows.append(row)
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    killed = counts.get("killed", 0) + counts.get("timeout", 0)  # a timeout is a detected mutant
    scored = len(rows) - counts.get("equivalent", 0) - counts.get("skipped", 0)
    return {"module": mod, "mutants": len(rows), "counts": counts, "killed": killed, "scored": scored,
            "kill_rate": killed / scored if scored else None, "rows": rows,
            "exclusions_used": len(used)}


# --------------------------------------------------------------------------- running

def run_module(mod: str, deadline: float, python: str, jobs: int = 1) -> dict:
    slug = mod.rstrip("/").replace("/", "_")
    work = OUT / "work" / slug
    make_copy(work)
    skipped = []
    for f in module_files(mod, work):
        skipped += [f"{f.relative_to(work)}:{s}" for s in undecorate(f)]
    tests = [t for t in MODULES[mod] if (work / t).exists()]
    missing = [t for t in MODULES[mod] if t not in tests]
    # the whole package is copied (so its other modules import); only `mod` is mutated
    only = f"{mod}*" if mod.endswith("/") else mod
    cfg = ["[mutmut]", "source_paths = onetrans_trt", f"only_mutate = {only}",
           "also_copy =", "    examples",  # tests import the example modules
           "pytest_add_cli_args_test_selection =", *[f"    {t}" for t in tests],
           "pytest_add_cli_args =", *[f"    {a}" for a in PYTEST_ARGS + EXTRA_ARGS.get(mod, [])], ""]
    (work / "setup.cfg").write_text("\n".join(cfg))
    mutmut = [python, "-m", "mutmut"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1",
           # the validate/ tests' cached builds (keyed by the sources outside validate/): shared, not rebuilt
           "ONETRANS_TRT_TEST_CACHE": str(ROOT / "runs" / "test-cache")}
    log(f"{mod}: {len(tests)} test path(s) {tests}" + (f" (missing: {missing})" if missing else ""))
    t0 = time.monotonic()
    budget = deadline - time.monotonic()
    if budget <= 5:
        log(f"{mod}: no time left in the budget; skipped")
        return {"module": mod, "error": "not run: --max-minutes budget spent"}
    logf = OUT / f"{slug}.log"
    timed_out = False
    with open(logf, "w") as fh:
        proc = subprocess.Popen(["nice", "-n", "19", *mutmut, "run", "--max-children", str(jobs)], cwd=work, env=env,
                                stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        last = t0
        while proc.poll() is None:
            time.sleep(2)
            now = time.monotonic()
            if now > deadline:
                os.killpg(proc.pid, 9)
                proc.wait()
                timed_out = True
                break
            if now - last >= 30:
                last = now
                tail = logf.read_text(errors="replace").replace("\r", "\n").strip().splitlines()
                prog = next((ln.strip() for ln in reversed(tail) if re.search(r"\d+/\d+", ln)), "starting")
                log(f"{mod}: {prog} ({now - t0:.0f} s)")
    secs = time.monotonic() - t0
    if proc.returncode not in (0, None) and not timed_out:
        tail = logf.read_text(errors="replace").replace("\r", "\n")[-3000:]
        log(f"{mod}: mutmut failed (exit {proc.returncode}); log {logf}\n{tail}")
        return {"module": mod, "error": f"mutmut exit {proc.returncode}; see {logf}", "seconds": secs}
    res = collect(mod, work, load_exclusions(), python)
    res.update(seconds=round(secs, 1), tests=tests, unmutated_nested_decorated=skipped,
               incomplete=timed_out)
    rate = "n/a" if res["kill_rate"] is None else f"{100 * res['kill_rate']:.1f}%"
    log(f"{mod}: {res['mutants']} mutants, {res['counts']}, kill rate {rate} in {secs:.0f} s"
        + (" (INCOMPLETE: budget spent)" if timed_out else ""))
    return res


def recollect(mod: str, python: str) -> dict:
    """The last run of ``mod`` re-read (its seconds and tests kept from report.json)."""
    work = OUT / "work" / mod.rstrip("/").replace("/", "_")
    if not (work / "mutants").is_dir():
        return {"module": mod, "error": "not run yet"}
    prev = {}
    if (OUT / "report.json").exists():
        prev = next((r for r in json.loads((OUT / "report.json").read_text()).get("modules", [])
                     if r["module"] == mod), {})
    res = collect(mod, work, load_exclusions(), python)
    res.update({k: prev[k] for k in ("seconds", "tests", "unmutated_nested_decorated", "incomplete") if k in prev})
    rate = "n/a" if res["kill_rate"] is None else f"{100 * res['kill_rate']:.1f}%"
    log(f"{mod}: {res['mutants']} mutants, {res['counts']}, kill rate {rate} (re-read)")
    return res


def write_report(results: list[dict], total_s: float) -> dict:
    ok = [r for r in results if "error" not in r]
    killed = sum(r["killed"] for r in ok)
    scored = sum(r["scored"] for r in ok)
    summary = {"tool": REQUIREMENT, "seconds": round(total_s, 1), "killed": killed, "scored": scored,
               "kill_rate": killed / scored if scored else None, "modules": results}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "report.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    md = ["# Mutation testing report", "",
          f"Tool: {REQUIREMENT}; {total_s / 60:.1f} min. Kill rate = (killed + timeout) / "
          "(mutants - equivalent); equivalents are listed in tools/mutation_equivalent.toml with reasons.", "",
          "| module | mutants | killed | timeout | survived | no tests | equivalent | kill rate |",
          "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        if "error" in r:
            md.append(f"| `{r['module']}` | – | – | – | – | – | – | {r['error']} |")
            continue
        c = r["counts"]
        rate = "n/a" if r["kill_rate"] is None else f"{100 * r['kill_rate']:.1f}%"
        md.append(f"| `{r['module']}` | {r['mutants']} | {c.get('killed', 0)} | {c.get('timeout', 0)} | "
                  f"{c.get('survived', 0)} | {c.get('no tests', 0)} | {c.get('equivalent', 0)} | {rate}"
                  f"{' (incomplete)' if r.get('incomplete') else ''} |")
    if scored:
        md.append(f"| **overall** | {sum(r['mutants'] for r in ok)} | | | | | | **{100 * killed / scored:.1f}%** |")
    md += ["", "## Surviving mutants", ""]
    for r in ok:
        surv = [x for x in r["rows"] if x["status"] not in ("killed", "timeout", "equivalent")]
        if not surv:
            continue
        md.append(f"### `{r['module']}` ({len(surv)})")
        md.append("")
        for x in surv:
            md.append(f"- `{x['module']}:{x.get('line')}` in `{x['function']}` ({x['status']}, `{x['id']}`): "
                      f"`{x.get('original', '')}` → `{x.get('mutated', '')}`")
        md.append("")
    (OUT / "report.md").write_text("\n".join(md) + "\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--module", action="append", default=[],
                    help="only modules whose path contains this (repeatable)")
    ap.add_argument("--max-minutes", type=float, default=180.0,
                    help="overall time budget; a module still running when it is spent is reported incomplete")
    ap.add_argument("--jobs", type=int, default=1, help="mutants tested at once (mutmut --max-children)")
    ap.add_argument("--collect-only", action="store_true",
                    help="run nothing: re-read the last run's results in runs/mutation/work/ with the current "
                         "tools/mutation_equivalent.toml and rewrite the report (after adding equivalents)")
    ap.add_argument("--fail-under", type=float, default=None,
                    help="exit 1 if the overall kill rate (percent) is below this")
    args = ap.parse_args(argv)
    python = sys.executable
    try:
        import mutmut  # noqa: F401
    except ImportError:
        log(f"installing {REQUIREMENT}")
        subprocess.run([python, "-m", "pip", "install", "-q", "--disable-pip-version-check", REQUIREMENT], check=True)
    mods = [m for m in MODULES if not args.module or any(s in m for s in args.module)]
    if not mods:
        ap.error(f"--module matches none of {list(MODULES)}")
    t0 = time.monotonic()
    deadline = t0 + 60 * args.max_minutes
    OUT.mkdir(parents=True, exist_ok=True)
    if args.collect_only:
        results = [recollect(mod, python) for mod in mods]
    else:
        results = [run_module(mod, deadline, python, args.jobs) for mod in mods]
    prev = {}
    if (OUT / "report.json").exists() and args.module:  # keep the other modules' last results
        prev = {r["module"]: r for r in json.loads((OUT / "report.json").read_text()).get("modules", [])
                if r["module"] not in mods}
    merged = [prev.get(m) or next(r for r in results if r["module"] == m) for m in MODULES
              if m in prev or any(r["module"] == m for r in results)]
    total = sum(r.get("seconds") or 0 for r in merged) if args.collect_only else time.monotonic() - t0
    summary = write_report(merged, total)
    rate = summary["kill_rate"]
    log(f"overall: {summary['killed']}/{summary['scored']} killed"
        + ("" if rate is None else f" = {100 * rate:.1f}%") + f"; report {OUT / 'report.md'}")
    if args.fail_under is not None and (rate is None or 100 * rate < args.fail_under):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
