"""Write the README's figures from the code (``make readme-figures``).

A figure is the text between ``<!-- figures:NAME -->`` and ``<!-- /figures:NAME -->`` in
README.md; each is produced by a function here, from a run of the code, never typed by hand:

``test-counts``   how many tests ``make test`` and ``make test-heavy`` run (pytest collection)
``info-tiny``     what ``onetrans-trt info`` prints for the Quickstart's tiny checkpoint
``nodes-tiny``    the graph passes and node counts of the Quickstart's tiny build
``quality-small`` FP16 / INT8 quality on the demo's checkpoint (``make demo``'s ``small``
                  OneTrans, seed 0, 2 epochs; minutes: ``--heavy``)

The tiny figures and the quality figure are deterministic on one machine (training runs on
fixed seeds; measured: the same weights, byte for byte, run to run); floating-point rounding
may differ between CPUs, so the quality deltas are printed to a fixed number of digits.
``tests/test_readme.py`` recomputes them and fails when the README differs (the quality
figure in ``make test-heavy``).

    python tools/readme_figures.py              # rewrite the cheap figures in README.md
    python tools/readme_figures.py --heavy      # ... and the quality table (about 5 minutes)
    python tools/readme_figures.py --check      # print what differs, exit 1 if anything does
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
sys.path.insert(0, str(ROOT))

from tools.readme_blocks import block_env  # noqa: E402

CHEAP = ("test-counts", "info-tiny", "nodes-tiny")
HEAVY = ("quality-small",)

# the Quickstart's commands (the README test checks the Quickstart runs them as written)
TINY_TRAIN = ["train", "--model", "onetrans", "--preset", "tiny", "--epochs", "1", "--limit", "2000",
              "--out", "runs/tiny"]
TINY_EXPORT = ["export", "runs/tiny", "--out", "builds/tiny", "--unified"]


def _cli(workdir: Path, *args: str, timeout: float = 7200) -> str:
    p = subprocess.run([sys.executable, "-m", "onetrans_trt.cli", *args], cwd=workdir, env=block_env(ROOT),
                       capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(f"onetrans-trt {' '.join(args)}: exit {p.returncode}\n{p.stderr[-3000:]}")
    return p.stdout


def markers(name: str) -> tuple[str, str]:
    return f"<!-- figures:{name} -->", f"<!-- /figures:{name} -->"


def read_figure(text: str, name: str) -> str:
    start, end = markers(name)
    m = re.search(re.escape(start) + r"\n(.*?)" + re.escape(end), text, re.S)
    if not m:
        raise KeyError(f"README.md has no figure {name!r} ({start} ... {end})")
    return m.group(1)


def write_figure(text: str, name: str, body: str) -> str:
    start, end = markers(name)
    read_figure(text, name)
    body = body if body.endswith("\n") else body + "\n"
    return re.sub(re.escape(start) + r"\n.*?" + re.escape(end), lambda _: f"{start}\n{body}{end}", text,
                  count=1, flags=re.S)


# ---- the figures ------------------------------------------------------------------------
def test_counts(root: Path = ROOT) -> dict[str, int]:
    """``{"test": N, "heavy": M, "serve_full": K}``: the tests ``make test`` (-m "not heavy and
    not serve_full"), ``make test-heavy`` (-m heavy) and only ``make serve-test`` collect."""
    p = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "tools.marker_counts", "-p",
                        "no:cacheprovider"], cwd=root, env=block_env(root), capture_output=True, text=True, timeout=600)
    m = re.search(r"^marker-counts: (\{.*\})$", p.stdout, re.M)
    if not m:
        raise RuntimeError(f"pytest --collect-only printed no count:\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
    return json.loads(m.group(1))


def fig_test_counts(counts: dict[str, int]) -> str:
    return (f"`make test` runs {counts['test']:,} tests; `make test-heavy` runs the {counts['heavy']:,} that "
            f"take minutes each; `make serve-test` runs the Triton server suite, with the "
            f"{counts.get('serve_full', 0):,} slower server tests that only it runs.")


INFO_DIRECTIVE = ("<!-- readme-test: output; any-sha256 (the weights' last bits, so their digest, depend on the "
                  "CPU's vector instructions) -->")


def fig_info_tiny(info_stdout: str) -> str:
    return INFO_DIRECTIVE + "\n```\n" + info_stdout.rstrip() + "\n```"


def fig_nodes(manifest: dict) -> str:
    rows = ["| pass | graph | nodes before | nodes after |", "|---|---|---:|---:|"]
    for r in manifest["passes"]:
        fused = f" ({r['fused']} fused)" if r.get("fused") else ""
        rows.append(f"| `{r['pass']}` | {r['graph']} | {r['nodes_before']} | {r['nodes_after']}{fused} |")
    return "\n".join(rows)


def fig_quality(fp16: dict, int8: dict, samples: int) -> str:
    rows = ["| variant | like AUC | delta vs PyTorch fp32 | love delta | top-10 overlap | Kendall tau |",
            "|---|---|---|---|---|---|"]
    for name, q in (("fp16", fp16), (f"int8 ({samples} calibration requests)", int8)):
        m, r = q["metrics"], q["ranking"]
        rows.append(f"| {name} | {m['like']['auc']:.4f} | {m['like']['delta_auc']:+.6f} | "
                    f"{m['love']['delta_auc']:+.6f} | {r['top10_overlap_mean']:.4f} | {r['kendall_tau_mean']:.4f} |")
    return "\n".join(rows)


# How far the quality table may move between CPUs (the weights' last bits follow the vector
# instructions, and INT8 calibration ranges follow the weights): AUC and its deltas in absolute
# terms, top-10 overlap and Kendall tau in absolute terms. Everything else must match exactly.
QUALITY_TOL = (5e-4, 1e-4, 1e-4, 0.005, 0.005)


def quality_differences(shown: str, computed: str) -> list[str]:
    """Where the README's quality table and a fresh one differ by more than :data:`QUALITY_TOL`
    (or in anything but the five numbers of a row); empty when they agree."""
    a, b = shown.strip().splitlines(), computed.strip().splitlines()
    if len(a) != len(b) or a[:2] != b[:2]:
        return [f"the table's shape differs:\n{shown}\nvs\n{computed}"]
    out = []
    for ra, rb in zip(a[2:], b[2:]):
        ca, cb = [c.strip() for c in ra.strip("|").split("|")], [c.strip() for c in rb.strip("|").split("|")]
        if len(ca) != 6 or len(cb) != 6 or ca[0] != cb[0]:
            out.append(f"row {ra!r} vs {rb!r}")
            continue
        for col, x, y, tol in zip(a[0].strip("|").split("|")[1:], ca[1:], cb[1:], QUALITY_TOL):
            if abs(float(x) - float(y)) > tol:
                out.append(f"{ca[0]}, {col.strip()}: README {x}, computed {y} (tolerance {tol})")
    return out


def tiny_workdir(workdir: Path) -> Path:
    """The Quickstart's checkpoint and build in ``workdir`` (made when missing)."""
    workdir.mkdir(parents=True, exist_ok=True)
    if not (workdir / "runs/tiny/model.safetensors").is_file():
        _cli(workdir, *TINY_TRAIN, "--force")
    if not (workdir / "builds/tiny/manifest.json").is_file():
        _cli(workdir, *TINY_EXPORT, "--force")
    return workdir


def quality_small(workdir: Path, samples: int = 128) -> str:
    """The demo's checkpoint (seed 0 of ``make demo``'s three: the one it saves), its FP16
    and INT8 variants and their quality reports (200 MovieLens test requests)."""
    workdir.mkdir(parents=True, exist_ok=True)
    _cli(workdir, "train", "--model", "onetrans", "--preset", "small", "--epochs", "2", "--seeds", "1",
         "--out", "runs/onetrans-small", "--force")
    _cli(workdir, "export", "runs/onetrans-small", "--out", "runs/build-small", "--unified", "--force")
    _cli(workdir, "convert", "runs/build-small", "--precision", "fp16")
    _cli(workdir, "calibrate", "runs/build-small", "--data", "ml-100k", "--samples", str(samples))
    read = lambda v: json.loads((workdir / "runs/build-small" / v / "quality.json").read_text())  # noqa: E731
    return fig_quality(read("fp16"), read("int8"), samples)


def compute(names: tuple[str, ...], workdir: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    if "test-counts" in names:
        out["test-counts"] = fig_test_counts(test_counts())
    if {"info-tiny", "nodes-tiny"} & set(names):
        tiny_workdir(workdir)
        if "info-tiny" in names:
            out["info-tiny"] = fig_info_tiny(_cli(workdir, "info", "runs/tiny"))
        if "nodes-tiny" in names:
            out["nodes-tiny"] = fig_nodes(json.loads((workdir / "builds/tiny/manifest.json").read_text()))
    if "quality-small" in names:
        out["quality-small"] = quality_small(workdir)
    return out


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--heavy", action="store_true", help="also the quality table (trains the demo model)")
    ap.add_argument("--check", action="store_true", help="only compare; exit 1 when the README differs")
    ap.add_argument("--only", action="append", default=None, help="one figure by name (repeatable)")
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args(argv)
    names = tuple(args.only) if args.only else CHEAP + (HEAVY if args.heavy else ())
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="readme-figures-"))
    workdir.mkdir(parents=True, exist_ok=True)
    bodies = compute(names, workdir)
    text = README.read_text()  # read after the runs: the README may have been edited meanwhile
    new = text
    differ = []
    for name, body in bodies.items():
        if read_figure(text, name).rstrip("\n") != body.rstrip("\n"):
            differ.append(name)
            print(f"--- {name}: README\n{read_figure(text, name)}+++ {name}: now\n{body}\n")
        new = write_figure(new, name, body)
    if args.check:
        return 1 if differ else 0
    if new != text:
        README.write_text(new)
    print(f"figures {', '.join(names)}: {'updated ' + ', '.join(differ) if differ else 'unchanged'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
