"""No option is accepted and then ignored: each one that a model family, a kind of build or
another option makes meaningless is refused before any work (exit 2, one line naming the
option and what applies instead, nothing written).

REFUSED lists the cases; APPLIES names, with a reason, every option of train / export /
inspect / convert / calibrate / build / bench that is read wherever it is accepted. The two
together must cover every option of those commands (``test_every_option_is_accounted_for``),
so a new option is either given its refused cases or said to apply everywhere.
"""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

from onetrans_trt.cli import cli

COMMANDS = ("train", "export", "inspect", "convert", "calibrate", "build", "bench")

# options read wherever they are accepted (command, parameter) -> why
APPLIES = {
    **{("train", p): "every family" for p in ("family", "preset", "data", "out", "epochs", "batch_size", "lr", "seed",
                                              "seeds", "max_history", "merge", "limit", "force", "data_dir",
                                              "as_json")},
    ("export", "ckpt"): "the checkpoint exported", ("export", "module_ref"): "the module exported",
    ("export", "as_json"): "output",
    ("inspect", "build"): "the build", ("inspect", "candidates"): "C of the FLOP count",
    ("inspect", "history"): "clamped to the model's S-tokens, with a note (test_inspect_clamps_history)",
    ("inspect", "as_json"): "output",
    **{("convert", p): "every build" for p in ("build", "precision", "kv_fp16", "keep_fp32", "as_json")},
    **{("calibrate", p): "every build" for p in ("build", "target", "as_json")},
    ("calibrate", "inputs_path"): "the calibration requests of either kind of build",
    ("calibrate", "synthetic"): "the calibration requests of either kind of build",
    **{("build", p): "every build and precision (--tf32: the FP32 layers every variant keeps)"
       for p in ("build", "precision", "profile_specs", "workspace_mb", "tf32", "as_json")},
    ("bench", "suite"): "picks the suite", ("bench", "rounds"): "every suite", ("bench", "out"): "every suite",
    ("bench", "as_json"): "every suite",
}

# (command, parameter refused, arguments, words the one-line error must hold)
# {CKPT} trained tiny OneTrans, {HYCKPT} tiny HyFormer, {BUILD} its build, {MODBUILD} a build from
# `export --module`, {OUT} a new path, {DIR} an empty directory, {FILE} a file, {REQ} a request file
M = "--module", "{DIR}/mine.py:make"  # never loaded: the refusal comes first
REFUSED = [
    ("train", "seq_encoder", ["--model", "onetrans", "--seq-encoder", "longer"], ["--seq-encoder", "--pyramid"]),
    ("train", "seq_encoder", ["--seq-encoder", "transformer"], ["--seq-encoder"]),  # the default, given: still
    ("train", "pyramid", ["--model", "hyformer", "--pyramid", "off"], ["--pyramid", "--seq-encoder"]),
    ("train", "pyramid", ["--model", "baseline", "--pyramid", "off"], ["--pyramid", "baseline"]),
    ("train", "seq_encoder", ["--model", "baseline", "--seq-encoder", "swiglu"], ["--seq-encoder", "baseline"]),
    ("train", "ns_tokenizer", ["--model", "baseline", "--ns-tokenizer", "group"], ["--ns-tokenizer", "baseline"]),
    ("train", "hy_form", ["--model", "onetrans", "--hy-form", "wave1"], ["--hy-form", "--pyramid"]),
    ("train", "hy_form", ["--model", "baseline", "--hy-form", "paper"], ["--hy-form", "baseline"]),
    ("train", "seq_attention", ["--seq-attention", "causal"], ["--seq-attention", "--model onetrans"]),
    ("train", "seq_max_len", ["--seq-max-len", "auto"], ["--seq-max-len", "--model onetrans"]),
    ("train", "seq_max_len", ["--model", "baseline", "--seq-max-len", "off"], ["--seq-max-len", "baseline"]),
    ("train", "seq_attention", ["--model", "hyformer", "--seq-encoder", "swiglu", "--seq-attention", "causal"],
     ["--seq-attention", "swiglu", "no self-attention"]),
    ("export", "opset", ["{CKPT}", "--out", "{OUT}", "--opset", "24"], ["--opset", "24", "18..23"]),
    ("export", "fuse_attention", ["{CKPT}", "--out", "{OUT}", "--no-passes", "--no-fuse-attention"],
     ["--no-fuse-attention", "--no-passes"]),
    ("export", "no_passes", [*M, "--out", "{OUT}", "--no-passes"], ["--no-passes", "--module"]),
    ("export", "fuse_attention", [*M, "--out", "{OUT}", "--no-fuse-attention"], ["--no-fuse-attention"]),
    ("export", "n_samples", [*M, "--out", "{OUT}", "--samples", "2"], ["--samples", "--module"]),
    ("export", "data_dir", [*M, "--out", "{OUT}", "--data-dir", "{DIR}"], ["--data-dir", "--module"]),
    ("export", "out", [*M, "--check-only", "--out", "{OUT}"], ["--out", "--check-only"]),
    ("export", "opset", [*M, "--check-only", "--opset", "20"], ["--opset", "--check-only"]),
    ("export", "unified", [*M, "--check-only", "--unified"], ["--unified", "--check-only"]),
    ("export", "force", [*M, "--check-only", "--force"], ["--force", "--check-only"]),
    ("export", "weights", ["{CKPT}", "--out", "{OUT}", "--weights", "{FILE}"], ["--weights", "--module"]),
    ("export", "spec_path", ["{CKPT}", "--out", "{OUT}", "--spec", "{FILE}"], ["--spec", "--module"]),
    ("export", "inputs_path", ["{CKPT}", "--out", "{OUT}", "--inputs", "{FILE}"], ["--inputs", "--module"]),
    ("export", "check_only", ["{CKPT}", "--check-only"], ["--check-only", "--module"]),
    ("convert", "data_dir", ["{BUILD}", "--quality-requests", "0", "--data-dir", "{DIR}"],
     ["--data-dir", "--quality-requests 0"]),
    ("convert", "data_dir", ["{MODBUILD}", "--synthetic", "--data-dir", "{DIR}"], ["--data-dir", "export --module"]),
    ("convert", "synthetic", ["{MODBUILD}", "--quality-requests", "0", "--synthetic"], ["--synthetic"]),
    ("convert", "inputs_path", ["{MODBUILD}", "--quality-requests", "0", "--inputs", "{FILE}"], ["--inputs"]),
    ("convert", "module_ref", ["{MODBUILD}", "--quality-requests", "0", *M], ["--module"]),
    ("convert", "weights", ["{MODBUILD}", "--quality-requests", "0", "--weights", "{FILE}"], ["--weights"]),
    ("convert", "quality_requests", ["{MODBUILD}", "--inputs", "{FILE}", "--quality-requests", "5"],
     ["--quality-requests", "--inputs"]),
    ("convert", "synthetic", ["{BUILD}", "--synthetic"], ["--synthetic", "export --module"]),
    ("convert", "inputs_path", ["{BUILD}", "--inputs", "{FILE}"], ["--inputs", "export --module"]),
    ("convert", "module_ref", ["{BUILD}", *M], ["--module", "export --module"]),
    ("convert", "weights", ["{BUILD}", "--weights", "{FILE}"], ["--weights", "export --module"]),
    ("calibrate", "keep_float", ["{BUILD}", "--target", "cpu", "--keep-float", "Softmax"], ["--keep-float", "--target cpu"]),
    ("calibrate", "data", ["{BUILD}", "--synthetic", "--data", "ml-100k"], ["--data", "--synthetic"]),
    ("calibrate", "data", ["{BUILD}", "--inputs", "{REQ}", "--data", "ml-100k"], ["--data", "--inputs"]),
    ("calibrate", "data", ["{MODBUILD}", "--data", "ml-100k"], ["--data", "module build"]),
    ("calibrate", "samples", ["{BUILD}", "--inputs", "{REQ}", "--samples", "4"], ["--samples", "--inputs"]),
    ("calibrate", "data_dir", ["{BUILD}", "--synthetic", "--quality-requests", "0", "--data-dir", "{DIR}"],
     ["--data-dir"]),
    ("calibrate", "data_dir", ["{MODBUILD}", "--synthetic", "--data-dir", "{DIR}"], ["--data-dir"]),
    ("calibrate", "module_ref", ["{MODBUILD}", "--synthetic", "--quality-requests", "0", *M], ["--module"]),
    ("calibrate", "weights", ["{MODBUILD}", "--synthetic", "--quality-requests", "0", "--weights", "{FILE}"],
     ["--weights"]),
    ("calibrate", "quality_requests", ["{MODBUILD}", "--inputs", "{FILE}", "--quality-requests", "5"],
     ["--quality-requests"]),
    ("calibrate", "module_ref", ["{BUILD}", *M], ["--module", "export --module"]),
    ("calibrate", "weights", ["{BUILD}", "--weights", "{FILE}"], ["--weights", "export --module"]),
    ("bench", "preset", ["{BUILD}", "--preset", "tiny"], ["--preset", "BUILD"]),
    ("bench", "preset", ["{MODBUILD}", "--preset", "tiny"], ["--preset", "export --module"]),
    ("bench", "build", ["{BUILD}", "--suite", "int8"], ["takes no BUILD"]),
    ("bench", "history", ["{BUILD}", "--suite", "server", "--history", "8"], ["--history", "--suite server"]),
    ("bench", "concurrency", ["{BUILD}", "--concurrency", "4"], ["--concurrency", "--suite peers"]),
    ("bench", "n_requests", ["--suite", "fused", "--requests", "4"], ["--requests", "--suite fused"]),
    ("bench", "store_url", ["--suite", "int8", "--store", "memory://"], ["--store", "--suite int8"]),
    ("bench", "store_url", ["{BUILD}", "--suite", "server", "--store", "nope://x"], ["store URL", "nope://x"]),
    ("bench", "module_ref", [*M], ["--module", "export --module"]),
    ("bench", "weights", ["--weights", "{FILE}"], ["--weights", "export --module"]),
    *[("bench", p, ["--suite", "fused", *a], [a[0], "--suite peers"]) for p, a in (
        ("quick", ["--quick"]), ("scorer_candidates", ["--scorer-candidates", "8"]),
        ("cache_history", ["--cache-history", "8"]), ("cache_candidates", ["--cache-candidates", "8"]),
        ("backends", ["--backends", "ort"]), ("no_pyramid", ["--no-pyramid"]), ("threads", ["--threads", "1"]))],
    ("bench", "scorer_candidates", ["{MODBUILD}", "--scorer-candidates", "8"], ["--scorer-candidates"]),
    ("bench", "cache_history", ["{MODBUILD}", "--cache-history", "8"], ["--cache-history"]),
    ("bench", "cache_candidates", ["{MODBUILD}", "--cache-candidates", "8"], ["--cache-candidates"]),
    ("bench", "no_pyramid", ["{MODBUILD}", "--no-pyramid"], ["--no-pyramid"]),
    ("export", "append_graph", [*M, "--out", "{OUT}", "--append"], ["--append", "--module"]),
    ("bench", "candidates", ["--suite", "cache", "--candidates", "8"], ["--candidates", "--suite cache"]),
    ("bench", "build", ["{BUILD}", "--suite", "cache"], ["user_encoder_append.onnx", "export", "--append"]),
    ("bench", "preset", ["{BUILD}", "--suite", "cache", "--preset", "tiny"], ["--preset", "BUILD"]),
    *[("bench", p, ["--suite", "cache", *a], [a[0], "--suite cache"]) for p, a in (
        ("quick", ["--quick"]), ("threads", ["--threads", "1"]), ("no_pyramid", ["--no-pyramid"]),
        ("cache_history", ["--cache-history", "8"]), ("backends", ["--backends", "ort"]),
        ("module_ref", list(M)))],
]
TRAIN_BASE = ["--out", "{OUT}", "--preset", "tiny", "--epochs", "1", "--limit", "50"]


def test_every_option_is_accounted_for():
    have = {(c, p.name) for c in COMMANDS for p in cli.commands[c].params}
    refused = {(c, p) for c, p, _, _ in REFUSED}
    missing = sorted(have - refused - set(APPLIES))
    assert not missing, f"say in APPLIES why these apply everywhere, or add their refused cases: {missing}"
    assert not (refused | set(APPLIES)) - have, sorted((refused | set(APPLIES)) - have)
    assert not refused & set(APPLIES), sorted(refused & set(APPLIES))


@pytest.fixture(scope="module")
def places(tiny_ckpt, tiny_build, movielens, tmp_path_factory):
    from onetrans_trt.data.movielens import TASKS
    from onetrans_trt.models.checkpoint import save_checkpoint
    from onetrans_trt.models.config import ModelConfig
    from onetrans_trt.models.hyformer import HyFormer

    root = tmp_path_factory.mktemp("applies")
    hy = ModelConfig.from_preset("tiny", movielens.schema, family="hyformer", tasks=list(TASKS))
    save_checkpoint(HyFormer(hy), root / "hy")  # random weights: the refusal reads only its config
    # a module build as the commands tell one apart: its manifest has a "protocol" entry
    mod = root / "modbuild"
    shutil.copytree(tiny_build, mod)
    m = json.loads((mod / "manifest.json").read_text())
    m["protocol"] = {"checks": {}}
    (mod / "manifest.json").write_text(json.dumps(m))
    req, _ = movielens.requests(1, n_candidates=3, seed=2)[0]
    (root / "req.json").write_text(json.dumps(req.to_json()))
    return {"CKPT": str(tiny_ckpt), "HYCKPT": str(root / "hy"), "BUILD": str(tiny_build), "MODBUILD": str(mod),
            "REQ": str(root / "req.json")}


def _snapshot(*roots):
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) if p.is_file() else "dir"
            for r in roots for p in [r, *r.rglob("*")]}


@pytest.mark.parametrize("command,param,args,words", REFUSED,
                         ids=[f"{c}:{' '.join(a).replace('{', '').replace('}', '')}" for c, _, a, _ in REFUSED])
def test_an_option_that_would_be_ignored_is_refused(command, param, args, words, places, tmp_path, monkeypatch):
    work = tmp_path / "work"
    (work / "adir").mkdir(parents=True)
    (work / "afile").write_text("x\n")
    fill = {**places, "OUT": str(work / "out"), "DIR": str(work / "adir"), "FILE": str(work / "afile")}
    argv = [command, *(a.format(**fill) for a in args)]
    if command == "train":
        argv += [a.format(**fill) for a in TRAIN_BASE]
    monkeypatch.chdir(work)
    watched = [work] + [p for p in map(__import__("pathlib").Path, (places["BUILD"], places["MODBUILD"],
                                                                      places["CKPT"], places["HYCKPT"]))]
    before = _snapshot(*watched)
    r = CliRunner().invoke(cli, argv)
    assert r.exit_code == 2, (argv, r.exit_code, r.output[-1500:])
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.output, (argv, r.stderr)
    for w in words:
        assert w.format(**fill) in lines[0], (w, lines[0])
    assert r.stdout == ""
    assert _snapshot(*watched) == before, f"{argv} wrote something"


def test_inspect_clamps_history_and_says_so(tiny_build):
    s_max = json.loads((tiny_build / "manifest.json").read_text())["model"]["s_max_len"]
    over = CliRunner().invoke(cli, ["inspect", str(tiny_build), "--history", str(s_max * 10), "--json"])
    at = CliRunner().invoke(cli, ["inspect", str(tiny_build), "--history", str(s_max), "--json"])
    assert over.exit_code == 0 and at.exit_code == 0, over.output
    o, a = json.loads(over.stdout), json.loads(at.stdout)
    assert o["request"]["history"] == s_max and o["flops"] == a["flops"]  # the FLOPs of what a request can be
    assert over.stderr.strip() == f"note: history {s_max * 10} > the model's {s_max} S-tokens: using {s_max}"
    assert o["notes"] and not a["notes"] and at.stderr == ""
    human = CliRunner().invoke(cli, ["inspect", str(tiny_build), "--history", str(s_max * 10)])
    assert f"history {s_max}):" in human.stdout and f"history {s_max * 10}" not in human.stdout


def test_opset_range_is_one_place_capped_by_the_runtime(monkeypatch):
    """export and every load read trust.OPSETS; the installed ONNX Runtime caps it further."""
    from onetrans_trt import trust
    from onetrans_trt.errors import InputError

    assert trust.SUPPORTED_DOMAINS[""] == trust.SUPPORTED_DOMAINS["ai.onnx"] == trust.OPSETS
    assert trust.OPSETS[0] <= trust.DEFAULT_OPSET <= trust.OPSETS[1]
    lo, hi, _ = trust.export_opsets()
    assert (lo, hi) == trust.OPSETS  # this environment loads the whole range
    with pytest.raises(InputError, match=r"outside 18\.\.23"):
        trust.check_opset(trust.OPSETS[1] + 1)
    monkeypatch.setattr(trust, "_ort_loads", lambda v: v <= 21)  # an older runtime
    lo, hi, why = trust.export_opsets()
    assert (lo, hi) == (18, 21) and "onnxruntime" in why
    r = CliRunner().invoke(cli, ["export", "nowhere", "--out", "nowhere-out", "--opset", "22"])
    assert r.exit_code == 2 and "outside 18..21" in r.stderr and "onnxruntime" in r.stderr, r.stderr


def test_export_build_refuses_an_opset_before_any_work(tiny_ckpt, tmp_path):
    from onetrans_trt.errors import InputError
    from onetrans_trt.export.api import export_build

    with pytest.raises(InputError, match="--opset 24"):
        export_build(tiny_ckpt, tmp_path / "b", opset=24)
    assert list(tmp_path.iterdir()) == []
