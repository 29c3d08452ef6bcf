"""The CLI: commands run end to end; bad input is one line and exit code 2."""

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from onetrans_trt.cli import cli


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def test_help_lists_commands():
    r = run("--help")
    assert r.exit_code == 0
    for cmd in ("train", "info", "rank", "fetch-data"):
        assert cmd in r.output


def test_train_info_rank(tmp_path, movielens):
    out = tmp_path / "ck"
    r = run("train", "--preset", "tiny", "--out", out, "--epochs", "1", "--limit", "1500", "--json")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)  # stderr may carry progress lines
    assert set(summary["test_mean"]) == {"like", "love"}
    assert (out / "model.safetensors").is_file() and (out / "metrics.json").is_file()
    r = run("info", out, "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["family"] == "onetrans"
    req, _ = movielens.requests(1, n_candidates=4, seed=5)[0]
    (tmp_path / "req.json").write_text(json.dumps(req.to_json()))
    for backend in ("torch-split", "torch-unified"):
        r = run("rank", out, "--request", tmp_path / "req.json", "--backend", backend)
        assert r.exit_code == 0, r.output
        assert len(json.loads(r.stdout)["scores"]["like"]) == 4
    r = run("train", "--preset", "tiny", "--out", out, "--epochs", "1", "--limit", "100")
    assert r.exit_code == 2 and "already exists" in r.output


def test_baseline_trains_and_ranks_unified_only(tmp_path, movielens):
    out = tmp_path / "bl"
    assert run("train", "--model", "baseline", "--preset", "tiny", "--out", out, "--epochs", "1",
               "--limit", "1000").exit_code == 0
    req, _ = movielens.requests(1, n_candidates=3, seed=6)[0]
    (tmp_path / "req.json").write_text(json.dumps(req.to_json()))
    assert run("rank", out, "--request", tmp_path / "req.json", "--backend", "torch-unified").exit_code == 0
    r = run("rank", out, "--request", tmp_path / "req.json", "--backend", "torch-split")
    assert r.exit_code == 2 and "user/candidate split" in r.output


@pytest.mark.parametrize("setup,needle", [
    (lambda d, ck: (d / "r.json").write_text('{"user": {}, "candidates": [{}]}'), "missing"),
    (lambda d, ck: (d / "r.json").write_text("[1, 2"), "not JSON"),
    (lambda d, ck: (ck / "model.safetensors").write_bytes(b"\x00" * 20), "safetensors"),
])
def test_errors_are_one_line_exit_2_no_traceback(tmp_path, tiny_ckpt, setup, needle):
    import shutil

    ck = tmp_path / "ck"
    shutil.copytree(tiny_ckpt, ck)
    (tmp_path / "r.json").write_text("{}")
    setup(tmp_path, ck)
    p = subprocess.run([sys.executable, "-m", "onetrans_trt.cli", "rank", str(ck), "--request",
                        str(tmp_path / "r.json")], capture_output=True, text=True)
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr
    lines = [x for x in p.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0]


def test_export_graphs_inspect_rank_on_a_build(tmp_path, tiny_build, movielens):
    import shutil

    build = tmp_path / "b"
    shutil.copytree(tiny_build, build)
    r = run("inspect", build, "--candidates", "32", "--json")
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    assert info["flops"]["unified"] > info["flops"]["split_total"] > 0
    assert "FLOPs per request" in run("inspect", build).output
    r = run("graphs", build, "--no-passes", "--json")
    assert r.exit_code == 0 and [p["pass"] for p in json.loads(r.stdout)["passes"]] == ["split-kv"]
    r = run("graphs", build, "--passes", "pyramid,cleanup", "--json")
    assert [(p["pass"], p["graph"]) for p in json.loads(r.stdout)["passes"]][1:] == [
        ("pyramid", "user_encoder"), ("cleanup", "user_encoder"),
        ("pyramid", "candidate_scorer"), ("cleanup", "candidate_scorer")]
    assert run("graphs", build, "--passes", "nonsense").exit_code == 2
    assert "pyramid" in run("graphs", build, "--list").output
    req, _ = movielens.requests(1, n_candidates=4, seed=8)[0]
    (tmp_path / "req.json").write_text(json.dumps(req.to_json()))
    a = json.loads(run("rank", build, "--request", tmp_path / "req.json").output)
    b = json.loads(run("rank", build, "--request", tmp_path / "req.json", "--backend", "ort-unified").output)
    assert max(abs(x - y) for x, y in zip(a["logits"]["like"], b["logits"]["like"])) <= 1e-4
    assert run("rank", build, "--request", tmp_path / "req.json", "--backend", "torch-split").exit_code == 2


def test_plugins_lists_ops_and_backends():
    r = run("plugins", "--json")
    assert r.exit_code == 0
    data = json.loads(r.stdout)
    assert set(data) == {"SharedPrefixAttention", "TailCausalAttention", "SegmentedPrefixAttention", "SharedDecodeAttention"}
    for op in data.values():
        assert set(op["backends"]) == {"reference", "onnx_function", "triton", "tensorrt_plugin"}
        assert op["backends"]["onnx_function"].startswith("available")
    assert "tensorrt_plugin" in run("plugins").output


def _one_line_exit_2(*args, cwd=None):
    """Run the CLI in a fresh process; assert exit 2, one stderr line, no traceback."""
    p = subprocess.run([sys.executable, "-m", "onetrans_trt.cli", *[str(a) for a in args]],
                       capture_output=True, text=True, cwd=cwd)
    assert p.returncode == 2, (p.returncode, p.stderr[-2000:])
    assert "Traceback" not in p.stderr
    lines = [x for x in p.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), p.stderr[-2000:]
    return lines[0]


def test_serve_repo_without_the_precision_variant_is_one_line(tiny_build, tmp_path):
    for precision, how in (("int8", "calibrate"), ("fp16", "convert")):
        out = tmp_path / f"repo-{precision}"
        line = _one_line_exit_2("serve-repo", tiny_build, "--out", out, "--precision", precision)
        assert precision in line and how in line
        assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no temporary directory left behind either


def test_fetch_data_into_an_unusable_directory_is_one_line(tmp_path):
    line = _one_line_exit_2("fetch-data", "--data-dir", "/proc/nope")
    assert "/proc/nope" in line
    (tmp_path / "file").write_text("x")
    line = _one_line_exit_2("fetch-data", "--data-dir", tmp_path / "file" / "sub")
    assert "file" in line


def _tree(root):
    return sorted((str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*"))


@pytest.mark.parametrize("cmd,opt", [("convert", "--keep-fp32"), ("calibrate", "--keep-float")])
def test_unknown_keep_names_are_refused_naming_what_is_valid(tiny_build, tmp_path, cmd, opt):
    import shutil

    build = tmp_path / "b"
    shutil.copytree(tiny_build, build)
    before = _tree(tmp_path)
    line = _one_line_exit_2(cmd, build, opt, "MatMul,NoSuchOp", "--quality-requests", "0")
    assert "NoSuchOp" in line and "MatMul" not in line.split("NoSuchOp")[0]  # names only the unknown one
    assert "MatMul" in line and "Add" in line  # lists the op types present
    assert _tree(tmp_path) == before  # nothing written: no fp16/ or int8/, manifest untouched


def _input_types(path):
    """node name -> the element types of its inputs (after ONNX shape inference)."""
    import onnx

    m = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    t = {v.name: v.type.tensor_type.elem_type for v in [*m.graph.value_info, *m.graph.input, *m.graph.output]}
    t.update({i.name: i.data_type for i in m.graph.initializer})
    return {n.name: (n.op_type, {t.get(i) for i in n.input if i}) for n in m.graph.node}


def test_keep_fp32_keeps_those_ops_and_nodes_in_fp32(tiny_build, tmp_path):
    import shutil

    from onnx import TensorProto

    build = tmp_path / "b"
    shutil.copytree(tiny_build, build)
    scorer = build / "fp16" / "candidate_scorer.onnx"
    assert run("convert", build, "--quality-requests", "0").exit_code == 0
    default = _input_types(scorer)
    matmuls = [k for k, (op, _) in default.items() if op == "MatMul"]
    adds = sorted(k for k, (op, ty) in default.items() if op == "Add" and TensorProto.FLOAT16 in ty)
    assert matmuls and adds  # without --keep-fp32 both compute in FP16
    assert all(default[k][1] == {TensorProto.FLOAT16} for k in matmuls)
    r = run("convert", build, "--quality-requests", "0", "--keep-fp32", f"MatMul,{adds[0]}", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["fp16"]["fp32_nodes"] == [adds[0]]
    kept = _input_types(scorer)
    assert all(kept[k][1] == {TensorProto.FLOAT} for k in matmuls)  # every MatMul (an op type)
    assert kept[adds[0]][1] == {TensorProto.FLOAT}  # the one Add named
    assert any(TensorProto.FLOAT16 in kept[k][1] for k in adds[1:])  # the other Adds still FP16


def _fed_by_dq(path):
    import onnx

    m = onnx.load(str(path))
    prod = {o: n for n in m.graph.node for o in n.output}
    return {n.name: n.op_type for n in m.graph.node
            if any(i in prod and prod[i].op_type == "DequantizeLinear" for i in n.input)}


def test_keep_float_leaves_those_ops_and_nodes_unquantized(tiny_build, tmp_path):
    import shutil

    build = tmp_path / "b"
    shutil.copytree(tiny_build, build)
    scorer, user = build / "int8" / "candidate_scorer.onnx", build / "int8" / "user_encoder.onnx"
    args = ("calibrate", build, "--samples", "8", "--quality-requests", "0")
    assert run(*args).exit_code == 0
    default = {**_fed_by_dq(scorer), **_fed_by_dq(user)}
    gemms = sorted(k for k, op in default.items() if op == "Gemm")
    assert "MatMul" in default.values() and len(gemms) >= 2  # quantized without --keep-float
    r = run(*args, "--keep-float", f"MatMul,{gemms[0]}", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["int8"]["float_nodes"] == [gemms[0]]
    kept = {**_fed_by_dq(scorer), **_fed_by_dq(user)}
    assert "MatMul" not in kept.values()  # no MatMul takes a dequantized input
    assert gemms[0] not in kept and set(gemms[1:]) <= set(kept)  # only the named Gemm left in float


@pytest.mark.heavy
def test_export_opset_and_no_fuse_attention_then_validate_requests_and_ckpt(tiny_ckpt, tmp_path, movielens):
    """export --opset 20 --no-fuse-attention, then validate --requests FILE --ckpt CKPT on it."""
    import onnx

    build = tmp_path / "b"
    r = run("export", tiny_ckpt, "--out", build, "--opset", "20", "--no-fuse-attention", "--samples", "1", "--json")
    assert r.exit_code == 0, r.output
    manifest = json.loads(r.stdout)["manifest"]
    assert manifest["opset"] == 20 and "fuse-attention" not in [p["pass"] for p in manifest["passes"]]
    for name in ("user_encoder.onnx", "candidate_scorer.onnx"):
        m = onnx.load(str(build / name))
        assert {o.version for o in m.opset_import if o.domain in ("", "ai.onnx")} == {20}
        assert not {n.op_type for n in m.graph.node} & {"SharedPrefixAttention", "TailCausalAttention"}
    reqs = [movielens.requests(1, n_candidates=5, seed=s)[0][0].to_json() for s in (21, 22)]
    (tmp_path / "reqs.jsonl").write_text("\n".join(json.dumps(q) for q in reqs) + "\n")
    # the manifest's checkpoint moved away: validate must use --ckpt
    manifest_path = build / "manifest.json"
    m = json.loads(manifest_path.read_text())
    m["checkpoint"]["path"] = str(tmp_path / "gone")
    manifest_path.write_text(json.dumps(m))
    args = ("validate", build, "--requests", tmp_path / "reqs.jsonl", "--backends", "torch-split,ort",
            "--json-out", tmp_path / "report.json")
    r = run(*args)
    assert r.exit_code == 2 and "--ckpt" in r.stderr
    r = run(*args, "--ckpt", tiny_ckpt)
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "report.json").read_text())
    assert rep["verdict"] == "pass" and rep["requests"]["count"] == 2 and rep["checkpoint"] == str(tiny_ckpt)
    assert set(rep["backends"]) == {"torch-split", "ort"}


def test_train_two_seeds(tmp_path):
    out = tmp_path / "ck"
    r = run("train", "--preset", "tiny", "--out", out, "--epochs", "1", "--limit", "300", "--seed", "7",
            "--seeds", "2", "--json")
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    assert s["seeds"] == [7, 8] and [x["seed"] for x in s["runs"]] == [7, 8]
    for t, v in s["test_mean"].items():
        assert v["auc"] == pytest.approx(sum(x["test"][t]["auc"] for x in s["runs"]) / 2, abs=1e-12)
    assert s["runs"][0]["test"] != s["runs"][1]["test"]  # two different seeds, two different models
    assert json.loads((out / "metrics.json").read_text())["seeds"] == [7, 8]


@pytest.mark.heavy
@pytest.mark.parametrize("suite", ["fused", "int8"])
def test_bench_fused_and_int8_suites_at_the_smallest_sizes(suite, tmp_path):
    out = tmp_path / "bench.json"
    r = run("bench", "--suite", suite, "--preset", "tiny", "--candidates", "8", "--history", "16",
            "--rounds", "1", "--out", out, "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert json.loads(out.read_text()) == res
    assert (res["preset"], res["candidates"], res["history"]) == ("tiny", 8, 16)
    names = ("fused", "unfused") if suite == "fused" else ("int8", "fp32")
    for name in names:
        assert res["latency"][name]["runs"] == 1 and res["latency"][name]["p50_ms"] > 0


def test_info_puts_paper_presets_next_to_the_papers_figures(tmp_path, movielens):
    """``info`` counts dense parameters (embedding tables excluded, as the papers do) and, for a
    paper preset, prints the paper's figure beside them; a tiny model has no paper figure."""
    import torch

    from onetrans_trt.models.checkpoint import save_checkpoint
    from onetrans_trt.models.config import ModelConfig
    from onetrans_trt.models.onetrans import OneTrans

    torch.manual_seed(0)
    for preset, paper in (("onetrans-s", 91_000_000), ("tiny", None)):
        model = OneTrans(ModelConfig.from_preset(preset, movielens.schema))
        out = tmp_path / preset
        save_checkpoint(model, out)
        r = CliRunner().invoke(cli, ["info", str(out), "--json"])
        assert r.exit_code == 0, r.output[-2000:]
        d = json.loads(r.stdout)
        emb = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding))
        assert emb > 0 and d["dense_parameters"] == d["parameters"] - emb
        assert (d["paper"] or {}).get("dense_parameters") == paper
        human = CliRunner().invoke(cli, ["info", str(out)]).stdout
        assert f"dense parameters (embedding tables excluded, as the papers count): {d['dense_parameters']:,}" in human
        assert ("arXiv 2510.26104" in human) == (paper is not None)


def test_train_progress_is_plain_lines_when_stderr_is_not_a_terminal(tmp_path, movielens, monkeypatch):
    """CliRunner's stderr is no terminal: training reports itself as plain lines (every tenth and
    done, once past 2 s), not a rich bar (which would be disabled there and print nothing); -q
    silences it. The timing is forced with after_s=0 so the test does not depend on speed."""
    import onetrans_trt.cli as cli_mod

    class Eager(cli_mod.PlainProgress):
        def __init__(self, **kw):
            super().__init__(**{**kw, "after_s": 0.0})

    monkeypatch.setattr(cli_mod, "PlainProgress", Eager)
    args = ["train", "--model", "onetrans", "--preset", "tiny", "--out", str(tmp_path / "ck"), "--epochs", "1",
            "--limit", "640", "--batch-size", "16"]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output[-2000:]
    lines = [x for x in r.stderr.splitlines() if x.startswith("train onetrans/tiny seed 0:")]
    assert "40/40 done in" in lines[-1], r.stderr
    tenths = [x for x in lines if "% ), " in x.replace("%)", "% )")]
    assert 5 <= len(tenths) <= 12, lines  # 40 steps: a line per tenth, not per step
    assert all("\x1b[" not in x for x in r.stderr.splitlines())  # no terminal codes in a log
    q = CliRunner().invoke(cli, ["-q", *args[:5], "--out", str(tmp_path / "q"), "--epochs", "1", "--limit", "256"])
    assert q.exit_code == 0 and "seed 0:" not in q.stderr
