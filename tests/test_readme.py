"""The README is tested: its code blocks run, its options and figures match the code.

``make test`` runs the Quickstart's blocks (tiny preset, a temporary directory), the parser's
own checks, a proof that a broken README line fails the runner, the option coverage and the
cheap figures; ``make test-heavy`` runs every block of the README and recomputes the
FP16/INT8 quality table. See README "The README is tested" and ``tools/readme_blocks.py``.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import click
import pytest

from tools import readme_blocks as rb
from tools import readme_figures as rf

ROOT = Path(__file__).resolve().parent.parent
QUICKSTART = "Quickstart: one minute on the `tiny` preset"


@pytest.fixture(scope="module")
def blocks():
    return rb.parse(rb.README.read_text())


@pytest.fixture(scope="module")
def quickstart(blocks, tmp_path_factory):
    """The Quickstart's blocks run as written, in order, in a fresh directory."""
    qs = rb.section_blocks(blocks, QUICKSTART)
    wd = tmp_path_factory.mktemp("readme-quickstart")
    t0 = time.perf_counter()
    ran = rb.run_blocks(qs, wd, log=print)
    print(f"quickstart: {len(qs)} blocks in {time.perf_counter() - t0:.1f} s")
    return wd, qs, ran


# ---- the parser --------------------------------------------------------------------------
def test_every_block_is_known(blocks):
    langs = {b.lang for b in blocks}
    assert langs <= rb.RUN_LANGS | rb.SHOWN_LANGS
    runnable = [b for b in blocks if b.lang in rb.RUN_LANGS and not b.get("skip")]
    assert len(runnable) >= 25  # the README shows its commands as blocks that run
    for b in blocks:
        if b.get("skip"):
            assert b.get("skip").reason
    # every python block that is not skipped imports only the public surface from onetrans_trt
    for b in runnable:
        if b.lang == "python":
            for line in b.text.splitlines():
                if line.startswith("from onetrans_trt"):
                    assert line.startswith("from onetrans_trt import "), (b.where, line)


@pytest.mark.parametrize("text, what", [
    ("<!-- readme-test: skp (typo) -->\n```bash\ntrue\n```\n", "unknown readme-test directive"),
    ("<!-- readme-test: skip -->\n```bash\ntrue\n```\n", "needs a reason"),
    ("<!-- readme-test: exit (x) -->\n```bash\ntrue\n```\n", "needs a status"),
    ("<!-- readme-test: file -->\n```json\n{}\n```\n", "needs a name"),
    ("```sh\ntrue\n```\n", "language 'sh'"),
    ("<!-- readme-test: skip (x) -->\n\n```bash\ntrue\n```\n", "right above a code block"),
    ("text\n\n    indented code\n", "indented code block"),
    ("```bash\ntrue\n", "never closed"),
    ("<!-- readme-test: tiny -->\n```python\npass\n```\n", "'tiny' is for bash"),
    ("<!-- readme-test: output; tiny -->\n```\nx\n```\n", "output block takes only"),
])
def test_parser_refuses(text, what):
    with pytest.raises(rb.ReadmeError, match=what.replace("(", r"\(")):
        rb.parse(text)


def test_directives_and_tiny():
    [b] = rb.parse("## S\n<!-- readme-test: tiny; exit 3 (needs TensorRT; and a GPU) -->\n```bash\n"
                   "onetrans-trt train --preset small --epochs 2 --seeds 3 --out r  # note\n```\n")
    assert b.section == "S" and b.get("exit").arg == "3" and b.get("exit").reason == "needs TensorRT; and a GPU"
    assert rb.tiny(b.text) == "onetrans-trt train --preset tiny --epochs 1 --seeds 1 --out r --limit 2000  # note\n"
    assert rb.tiny("onetrans-trt train --preset tiny --limit 10 --out r\n") == \
        "onetrans-trt train --preset tiny --limit 10 --out r\n"


def test_runner_semantics(tmp_path):
    """Exit statuses, files, output blocks and no-op tiny directives are checked."""
    ok = rb.parse("<!-- readme-test: file a.json -->\n```json\n{\"x\": 1}\n```\n"
                  "```python\nimport json; print(json.load(open('a.json'))['x'])\n```\n"
                  "<!-- readme-test: output -->\n```\n1\n```\n"
                  "<!-- readme-test: exit 3 (planted) -->\n```bash\nexit 3\n```\n"
                  "<!-- readme-test: gpu (planted) -->\n```bash\nexit 3\n```\n")
    rb.run_blocks(ok, tmp_path)
    for bad, what in [
        ("```bash\nexit 3\n```\n", "exit status 3, the README says 0"),
        ("<!-- readme-test: exit 3 (x) -->\n```bash\ntrue\n```\n", "exit status 0, the README says 3"),
        ("```bash\nfalse\ntrue\n```\n", "exit status 1"),  # -e: a failing line fails the block
        ("```bash\nfalse | true\n```\n", "exit status 1"),  # pipefail
        ("```python\nprint(2)\n```\n<!-- readme-test: output -->\n```\n1\n```\n", "the README shows"),
        ("```json\n{\"x\": 1,}\n```\n", "does not parse"),
        ("<!-- readme-test: tiny -->\n```bash\ntrue\n```\n", "changes nothing"),
        ("<!-- readme-test: gpu (x) -->\n```bash\ntrue\n```\n", "the README says 3"),
    ]:
        with pytest.raises(rb.ReadmeError, match=what):
            rb.run_blocks(rb.parse(bad), tmp_path / "bad")


def test_any_sha256_stands_for_a_digest_and_nothing_else(tmp_path):
    """`any-sha256`: another digest passes; a digest of other length, another word or another
    line still fails; the directive needs `output` and a reason."""
    a, b = "a" * 64, "0123456789abcdef" * 4
    head = "<!-- readme-test: output; any-sha256 (weights follow the CPU) -->\n```\n"
    rb.run_blocks(rb.parse(f"```bash\necho 'x sha256 {b} (w)'\n```\n{head}x sha256 {a} (w)\n```\n"), tmp_path)
    for printed, what in [(f"x sha256 {b[:63]} (w)", "the README shows"), (f"x sha-256 {b} (w)", "the README shows"),
                          (f"y sha256 {b} (w)", "the README shows")]:
        with pytest.raises(rb.ReadmeError, match=what):
            rb.run_blocks(rb.parse(f"```bash\necho '{printed}'\n```\n{head}x sha256 {a} (w)\n```\n"), tmp_path)
    with pytest.raises(rb.ReadmeError, match="the README shows"):  # without the directive: exact
        rb.run_blocks(rb.parse(f"```bash\necho 'sha256 {b}'\n```\n<!-- readme-test: output -->\n```\n"
                               f"sha256 {a}\n```\n"), tmp_path)
    with pytest.raises(rb.ReadmeError, match="goes with 'output'"):
        rb.parse("<!-- readme-test: any-sha256 (x) -->\n```\nsha256 1\n```\n")
    with pytest.raises(rb.ReadmeError, match="needs a reason"):
        rb.parse("<!-- readme-test: output; any-sha256 -->\n```\nsha256 1\n```\n")


# ---- the Quickstart runs as written --------------------------------------------------------
def test_quickstart_runs(quickstart):
    wd, qs, ran = quickstart
    langs = [r.block.lang for r in ran if r.status is not None]
    assert langs.count("bash") >= 4 and langs.count("python") >= 1
    assert all(r.status == 0 for r in ran if r.status is not None)
    assert (wd / "builds/tiny/manifest.json").is_file() and (wd / "request.json").is_file()
    # the output blocks were compared (info's text and the Python snippet's)
    assert sum(1 for b in qs if b.get("output")) >= 2
    print("quickstart block times:", [(r.block.line, round(r.seconds, 1)) for r in ran if r.status is not None])


def _rerun(quickstart, edit, tmp_path):
    """The Quickstart's blocks after ``edit(text) -> text``, run from the Quickstart's results
    (only blocks from the first edited one on are run)."""
    import shutil

    wd, _, _ = quickstart
    text = edit(rb.README.read_text())
    qs = rb.section_blocks(rb.parse(text), QUICKSTART)
    orig = rb.section_blocks(rb.parse(rb.README.read_text()), QUICKSTART)
    first = next(i for i, (a, b) in enumerate(zip(qs, orig)) if a.text != b.text or a.directives != b.directives)
    start = max(i for i in range(first + 1) if qs[i].lang in rb.RUN_LANGS)
    work = tmp_path / "w"
    shutil.copytree(wd, work, symlinks=True)
    return rb.run_blocks(qs[start:], work)


@pytest.mark.parametrize("old, new, what", [
    ("--limit 2000 --out runs/tiny", "--limitt 2000 --out runs/tiny", "No such option"),  # a renamed option
    ('result.scores["like"]', 'result.score["like"]', "has no attribute 'score'"),  # a wrong snippet attribute
    ("ort 2 candidates", "ort 3 candidates", "the README shows"),  # a wrong output line
    ("  sha256 ", "  sha-256 ", "the README shows"),  # info's text as shown
])
def test_breaking_a_readme_line_fails(quickstart, tmp_path, old, new, what):
    with pytest.raises(rb.ReadmeError, match=what):
        _rerun(quickstart, lambda t: t.replace(old, new, 1), tmp_path)


def test_breaking_the_code_fails(quickstart, tmp_path, monkeypatch):
    """The same blocks against code that changed under them: a sitecustomize renames
    ``RankResult.scores`` in the block's interpreter."""
    (tmp_path / "patch").mkdir()
    (tmp_path / "patch" / "sitecustomize.py").write_text(
        "import onetrans_trt.runtime.ranker as r\n"
        "r.RankResult.probs_by_task = r.RankResult.scores\n"
        "del r.RankResult.scores\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "patch"))
    with pytest.raises(rb.ReadmeError, match="has no attribute 'scores'"):
        _rerun(quickstart, lambda t: t.replace("ranker = Ranker.load(", "ranker  = Ranker.load(", 1), tmp_path)


# ---- every option of every command is documented ----------------------------------------
COMMON = ("--help", "-h", "--json", "--data-dir")


def _sections(text: str) -> dict[str, str]:
    """``{command: its section's text}`` from the ``### `onetrans-trt CMD ...` `` headings."""
    out, cur = {}, None
    for line in text.splitlines():
        if line.startswith("### `onetrans-trt "):
            cur = line[len("### `onetrans-trt "):].split()[0].rstrip("`")
            out[cur] = ""
        elif line.startswith("## ") or (line.startswith("### ") and cur):
            cur = None
        if cur:
            out[cur] += line + "\n"
    return out


def test_every_cli_option_is_in_the_readme():
    from onetrans_trt.cli import cli

    text = rb.README.read_text()
    sections = _sections(text)
    commands_intro = text.split("## Commands", 1)[1].split("### ", 1)[0]
    for opt in COMMON:
        assert f"`{opt}" in commands_intro, opt
    missing = []
    for name, cmd in cli.commands.items():
        if name not in sections:
            missing.append(f"{name}: no '### `onetrans-trt {name}' section")
            continue
        for p in cmd.params:
            if not isinstance(p, click.Option):
                continue
            for o in p.opts + p.secondary_opts:
                if o in COMMON:
                    continue
                if not re.search(rf"(?<![\w-]){re.escape(o)}(?![\w-])", sections[name]):
                    missing.append(f"{name} {o}")
    assert not missing, "options in --help but not in their README section: " + ", ".join(missing)


def test_option_coverage_catches_a_missing_option():
    text = rb.README.read_text()
    sec = _sections(text)["build"]
    assert "--workspace-mb" in sec and "--workspace-mb" not in _sections(text.replace("--workspace-mb", "--ws"))["build"]


# ---- figures -------------------------------------------------------------------------------
def test_test_counts_figure():
    counts = rf.test_counts()
    assert counts["test"] > 1000 and counts["heavy"] > 10
    assert rf.read_figure(rb.README.read_text(), "test-counts").strip() == rf.fig_test_counts(counts), \
        "README test counts differ from pytest's collection: run `make readme-figures`"


def test_tiny_figures(quickstart):
    wd, _, _ = quickstart
    text = rb.README.read_text()
    manifest = json.loads((wd / "builds/tiny/manifest.json").read_text())
    assert rf.read_figure(text, "nodes-tiny").strip() == rf.fig_nodes(manifest), \
        "README node counts differ from the Quickstart's build: run `make readme-figures`"
    info = subprocess.run([sys.executable, "-m", "onetrans_trt.cli", "info", "runs/tiny"], cwd=wd,
                          env=rb.block_env(), capture_output=True, text=True, check=True).stdout
    # the checkpoint's digest follows the CPU's vector instructions (the block says any-sha256)
    shown = rf.read_figure(text, "info-tiny").strip().splitlines()
    assert rb.mask_sha256(shown) == rb.mask_sha256(rf.fig_info_tiny(info).splitlines())
    # the figure commands are the Quickstart's
    qs = "".join(b.text for b in rb.section_blocks(rb.parse(text), QUICKSTART))
    assert "onetrans-trt " + " ".join(rf.TINY_TRAIN) in qs and "onetrans-trt " + " ".join(rf.TINY_EXPORT) in qs


def test_figure_markers_roundtrip():
    t = "a\n<!-- figures:x -->\nold\n<!-- /figures:x -->\nb\n"
    assert rf.write_figure(t, "x", "new") == "a\n<!-- figures:x -->\nnew\n<!-- /figures:x -->\nb\n"
    with pytest.raises(KeyError):
        rf.read_figure(t, "y")


# ---- the public Python API -----------------------------------------------------------------
def test_public_api_is_light_and_documented():
    code = ("import sys, onetrans_trt\n"
            "assert 'torch' not in sys.modules and 'onnxruntime' not in sys.modules, 'heavy import'\n"
            "from onetrans_trt import Ranker, RankResult, UserKVCache, Request, RequestLimits, "
            "load_checkpoint, export_build, validate_build, OneTransError\n"
            "import onetrans_trt as o\n"
            "missing = [n for n in o.__all__ if not hasattr(o, n)]\n"
            "assert not missing, missing\n"
            "nodoc = [n for n in o.__all__ if n != '__version__' and not (getattr(o, n).__doc__ or '').strip()]\n"
            "assert not nodoc, nodoc\n"
            "assert set(o.__all__) <= set(dir(o))\n"
            "print('ok')\n")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=rb.block_env(), capture_output=True, text=True)
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr[-2000:]
    import onetrans_trt

    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        onetrans_trt.nope  # noqa: B018


def test_ranker_load_picks_a_backend_that_works(tiny_ckpt, movielens, tmp_path):
    from onetrans_trt import InputError, Ranker
    from onetrans_trt.data.movielens import TASKS
    from onetrans_trt.models.checkpoint import build_model, save_checkpoint
    from onetrans_trt.models.config import ModelConfig

    cfg = ModelConfig.from_preset("tiny", movielens.schema, family="baseline", tasks=list(TASKS))
    save_checkpoint(build_model(cfg), tmp_path / "baseline")
    req, _ = movielens.requests(1, n_candidates=3, seed=7)[0]
    baseline = Ranker.load(tmp_path / "baseline")
    assert baseline.backend_name == "torch-unified"
    assert len(baseline.rank(req).scores["like"]) == 3
    with pytest.raises(InputError, match="use 'torch-unified'"):
        Ranker.load(tmp_path / "baseline", backend="torch-split")
    assert Ranker.load(tiny_ckpt).backend_name == "torch-split"
    with pytest.raises(InputError, match="unknown backend 'ort' for a checkpoint"):
        Ranker.load(tiny_ckpt, backend="ort")


def test_cli_graphs_list_and_info(tiny_ckpt):
    from click.testing import CliRunner

    from onetrans_trt.cli import cli
    from onetrans_trt.graphs import available_passes

    r = CliRunner().invoke(cli, ["graphs", "--list"])
    assert r.exit_code == 0
    lines = r.output.strip().splitlines()
    assert [ln.split()[0] for ln in lines] == available_passes()
    assert all(len(ln.split(None, 1)[1]) > 20 for ln in lines)  # a description, not a module path
    assert "onetrans_trt." not in r.output
    r = CliRunner().invoke(cli, ["graphs"])
    assert r.exit_code == 2 and "give a BUILD directory" in r.output
    r = CliRunner().invoke(cli, ["info", str(tiny_ckpt)])
    from onetrans_trt.models.checkpoint import checkpoint_hash

    assert f"sha256 {checkpoint_hash(tiny_ckpt)}" in r.output and "None" not in r.output


# ---- heavy: the whole README -------------------------------------------------------------
@pytest.mark.heavy
def test_whole_readme_runs(blocks, tmp_path):
    from tests.helpers import trt_gpu_missing

    t0 = time.perf_counter()
    ran = rb.run_blocks(blocks, tmp_path, gpu_available=trt_gpu_missing() is None, log=print)
    took = time.perf_counter() - t0
    print(f"whole README: {sum(r.status is not None for r in ran)} blocks run in {took:.0f} s")
    for r in sorted((r for r in ran if r.status is not None), key=lambda r: -r.seconds)[:10]:
        print(f"  {r.block.where}: {r.seconds:.1f} s")
    assert (tmp_path / "builds/small/engines/fp32/profiles.json").is_file()  # build wrote its plan
    rep = json.loads((tmp_path / "reports/validate.json").read_text())  # tiny: fp16/int8 fail (README says so)
    assert rep["backends"]["ort"]["verdict"] == "pass" and (tmp_path / "reports/validate.html").is_file()


@pytest.mark.heavy
def test_quality_figure(tmp_path):
    body = rf.quality_small(tmp_path)
    diff = rf.quality_differences(rf.read_figure(rb.README.read_text(), "quality-small"), body)
    assert not diff, ("README quality table differs from convert/calibrate on the demo checkpoint beyond what "
                      "another CPU moves it: run `make readme-figures`\n" + "\n".join(diff))


def test_quality_differences_tolerate_cpu_rounding_and_nothing_more():
    head = "| variant | like AUC | delta vs PyTorch fp32 | love delta | top-10 overlap | Kendall tau |\n|---|---|---|---|---|---|\n"
    row = "| int8 (128 calibration requests) | {} | {} | +0.000092 | 0.9940 | 0.9950 |"
    base = head + row.format("0.7751", "+0.000057")
    assert rf.quality_differences(base, head + row.format("0.7750", "+0.000033")) == []
    assert rf.quality_differences(base, head + row.format("0.7741", "+0.000057"))  # AUC 1e-3 off
    assert rf.quality_differences(base, head + row.format("0.7751", "+0.000257"))  # delta 2e-4 off
    assert rf.quality_differences(base, head + row.format("0.7751", "+0.000057").replace("int8 (128", "int8 (64"))
    assert rf.quality_differences(base, base + "\n" + row.format("0.7751", "+0.000057"))
