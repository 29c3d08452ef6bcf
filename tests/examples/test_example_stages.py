"""A build from `export --module` through every later stage: convert (fp16), calibrate (int8),
serve-repo, build (profiles and command lines; exit 3 without TensorRT) and bench, on the
user's data or on synthetic data only when asked, and with graphs saved as external data.

One example (fused_qkv_cls) is exported once for the fast tests; the heavy test runs all
three examples through the CLI end to end.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

from onetrans_trt.cli import cli
from onetrans_trt.errors import InputError
from tests.protocol.test_protocol import EXAMPLES, example

GOOD = ["fused_qkv_cls", "sep_pyramid", "hyformer_style"]


def _export(name: str, out: Path) -> Path:
    from onetrans_trt.export.module import export_module

    mod = example(name)
    export_module(mod.factory(), mod.SPEC, None, out, check=False,
                  source={"module": f"{EXAMPLES / name}.py:factory", "weights": None})
    return out


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """fused_qkv_cls exported once (no protocol checks: tests/export proves them)."""
    return _export("fused_qkv_cls", tmp_path_factory.mktemp("stages") / "fused_qkv_cls")


@pytest.fixture
def build(exported, tmp_path):
    b = tmp_path / "b"
    shutil.copytree(exported, b)
    return b


def run(*args: str):
    res = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    return res


def _one_line_error(res, *words: str) -> str:
    assert res.exit_code == 2, (res.exit_code, res.stdout, res.stderr)
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in res.stderr, res.stderr
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


def _manifest(b: Path) -> dict:
    return json.loads((b / "manifest.json").read_text())


# ------------------------------------------------------------------ convert (fp16)

def test_fp16_recasts_the_state_the_spec_calls_kv_not_a_name_prefix():
    """A state tensor that is not K/V but whose graph name starts like one (``user_k_extra``)
    stays float32 under --kv-fp16; the spec's K/V is recast."""
    from onnx import TensorProto, helper

    from onetrans_trt.calibrate.fp16 import to_fp16

    nodes = [helper.make_node("MatMul", ["x", "w"], ["user_k_0"]), helper.make_node("Relu", ["x"], ["user_k_extra"])]
    g = helper.make_graph(nodes, "enc", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["users", 4])],
                          [helper.make_tensor_value_info("user_k_0", TensorProto.FLOAT, ["users", 4]),
                           helper.make_tensor_value_info("user_k_extra", TensorProto.FLOAT, ["users", 4])],
                          [helper.make_tensor("w", TensorProto.FLOAT, [4, 4], np.eye(4, dtype=np.float32).ravel())])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    out = to_fp16(model, kv_fp16=True, kv_names={"user_k_0"})
    types = {o.name: o.type.tensor_type.elem_type for o in out.graph.output}
    assert types == {"user_k_0": TensorProto.FLOAT16, "user_k_extra": TensorProto.FLOAT}
    # our own builds keep their naming rule (every user_k_/user_v_ output)
    ours = to_fp16(model, kv_fp16=True)
    assert {o.type.tensor_type.elem_type for o in ours.graph.output} == {TensorProto.FLOAT16}


def test_convert_needs_a_data_source_for_its_quality_report(build):
    res = run("convert", build)
    _one_line_error(res, "--inputs", "--synthetic", "--quality-requests 0")
    assert not (build / "fp16").exists() and "fp16" not in (_manifest(build).get("precisions") or {})
    res = run("calibrate", build, "--quality-requests", "0")
    _one_line_error(res, "--inputs", "--synthetic")
    assert not (build / "int8").exists()
    _one_line_error(run("calibrate", build, "--data", "ml-100k", "--synthetic"), "--data")


def test_convert_kv_fp16_and_quality_on_synthetic_data(build):
    res = run("convert", build, "--kv-fp16", "--synthetic", "--quality-requests", "4", "--json")
    assert res.exit_code == 0, res.stderr
    out = json.loads(res.stdout)
    spec = example("fused_qkv_cls").SPEC
    kv = {f"user_{'k' if s['kind'] == 'key' else 'v'}_{s['layer']}" for s in spec["state"] if s["kind"] != "other"}
    ue = onnx.load(str(build / "fp16" / "user_encoder.onnx"))
    types = {o.name: o.type.tensor_type.elem_type for o in ue.graph.output}
    assert {n for n, t in types.items() if t == onnx.TensorProto.FLOAT16} == kv
    assert types["user_user_tok"] == onnx.TensorProto.FLOAT
    q = json.loads((build / "fp16" / "quality.json").read_text())
    assert q == out["quality"] and q["data"].startswith("synthetic (asked for): 4 random cases")
    assert set(q["tasks"]) == {"click", "like"} and q["users"] == 4 and q["labelled"] == 0
    for t in q["tasks"].values():  # fp16 against the module's own fp32 forward: close, same ranking
        assert 0 < t["max_abs_logit_error"] < 1e-2 and t["top10_overlap_min"] >= 0.9 and t["kendall_tau_min"] > 0.95
    assert _manifest(build)["precisions"]["fp16"]["kv_tensors"] == sorted(kv)


def _requests_npz(path: Path, spec: dict, n: int, seed: int = 3) -> list[dict[str, np.ndarray]]:
    """``n`` requests (one user, a few candidates each) as '<i>/<name>' npz keys."""
    from onetrans_trt.protocol import SplitSpec, random_inputs

    sp = SplitSpec.parse(spec)
    rng = np.random.default_rng(seed)
    reqs = []
    for i in range(n):
        user, cand = random_inputs(sp, users=1, candidates=3 + i, lengths=[[0, 5, 20, 27][i % 4]], rng=rng)
        reqs.append({k: v.numpy() for k, v in {**user, **cand}.items()})
    np.savez(path, **{f"{i}/{k}": v for i, r in enumerate(reqs) for k, v in r.items()})
    return reqs


def test_convert_quality_on_exactly_the_given_inputs(build, tmp_path):
    reqs = _requests_npz(tmp_path / "mine.npz", example("fused_qkv_cls").SPEC, 3)
    res = run("convert", build, "--inputs", tmp_path / "mine.npz", "--json")
    assert res.exit_code == 0, res.stderr
    q = json.loads(res.stdout)["quality"]
    assert str(tmp_path / "mine.npz") in q["data"] and q["requests"] == 3 and q["users"] == 3
    assert "synthetic" not in q["data"]
    assert len(reqs) == 3


# ------------------------------------------------------------------ calibrate (int8)

def test_calibrate_on_exactly_the_given_inputs(build, tmp_path):
    reqs = _requests_npz(tmp_path / "calib.npz", example("fused_qkv_cls").SPEC, 3)
    res = run("calibrate", build, "--inputs", tmp_path / "calib.npz", "--quality-requests", "0", "--json")
    assert res.exit_code == 0, res.stderr
    info = json.loads(res.stdout)["int8"]
    assert info["calibration"]["requests"] == 3 and str(tmp_path / "calib.npz") in info["calibration"]["source"]
    assert _manifest(build)["precisions"]["int8"]["calibration"]["source"] == info["calibration"]["source"]
    from onetrans_trt.calibrate.data import feeds
    from onetrans_trt.runtime.ort_backend import ort_session

    with np.load(build / "int8" / "calibration.npz") as z:
        arrays = {k: z[k] for k in z.files}
    user, scorer = feeds(arrays, "user"), feeds(arrays, "scorer")
    assert len(user) == len(scorer) == 3
    enc = ort_session(build / "user_encoder.onnx")
    names = [o.name for o in enc.get_outputs()]
    for r, u, s in zip(reqs, user, scorer):
        for k, v in u.items():  # the file's user inputs, unchanged
            np.testing.assert_array_equal(v, r[k])
        assert s["cand_item"].shape[0] == r["cand_item"].shape[0]  # the file's candidates, not sampled ones
        # the scorer is calibrated on the state the fp32 encoder produced for that user
        state = dict(zip(names, enc.run(names, u)))
        for k in ("user_k_0", "user_v_1", "user_user_tok"):
            np.testing.assert_array_equal(s[k], state[k])
    for role in ("user_encoder", "candidate_scorer"):
        assert info["graphs"][role]["qdq"]["QuantizeLinear"] > 0


def test_calibrate_synthetic_is_asked_for_and_said(build):
    res = run("calibrate", build, "--synthetic", "--samples", "8", "--quality-requests", "3")
    assert res.exit_code == 0, res.stderr
    assert "8 calibration requests from synthetic (asked for)" in res.stdout
    q = json.loads((build / "int8" / "quality.json").read_text())
    assert q["variant"] == "int8" and q["data"].startswith("synthetic (asked for)")
    with np.load(build / "int8" / "calibration.npz") as z:
        lengths = sorted({int(z[f"user/{i}/hist_len"][0]) for i in range(int(z["count"]))})
    assert lengths[0] == 0 and lengths[-1] > 20  # empty to over-long histories (history max 20)


def _fused_graph(tmp_path: Path) -> onnx.ModelProto:
    """A small scorer-like graph: a projection, our SharedPrefixAttention (via onetrans_trt.ops),
    then two projections on its output (quantizable MatMuls after the fused node)."""
    from onetrans_trt.ops import shared_prefix_attention
    from onetrans_trt.plugins import attach_op_functions

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.q, self.o, self.h = torch.nn.Linear(64, 64), torch.nn.Linear(64, 64), torch.nn.Linear(64, 32)

        def forward(self, x, k, v, n):
            c = x.shape[0]
            q = self.q(x).reshape(c, 2, 4, 16).transpose(1, 2)
            out = shared_prefix_attention(q, k, v, n, q, q).transpose(1, 2).reshape(c, 2, 64)
            return self.h(torch.relu(self.o(out))).sum(1)

    from torch.export import Dim

    cd, ld = Dim("candidates", min=1, max=1024), Dim("kv_len", min=1, max=4096)
    prog = torch.onnx.export(M().eval(), (torch.randn(16, 2, 64), torch.randn(1, 4, 10, 16), torch.randn(1, 4, 10, 16),
                                          torch.tensor([7])), dynamo=True, opset_version=23,
                             input_names=["x", "k", "v", "n"], output_names=["y"],
                             dynamic_shapes=({0: cd}, {2: ld}, {2: ld}, None), external_data=False)
    prog.save(str(tmp_path / "fused.onnx"))
    return attach_op_functions(onnx.load(str(tmp_path / "fused.onnx")))


def test_int8_never_hands_modelopt_our_fused_nodes_and_keeps_them(tmp_path, monkeypatch):
    """With TensorRT installed ModelOpt sends graphs with custom ops to the TensorRT EP, which
    does not know our plugins: it gets the function body inlined; the Q/DQ graph then has the
    fused node back, and runs like the float graph within int8 error."""
    import modelopt.onnx.quantization as mq

    from onetrans_trt.calibrate.int8 import INLINED, quantize_graph
    from onetrans_trt.runtime.ort_backend import ort_session

    model = _fused_graph(tmp_path)
    seen = []
    real = mq.quantize

    def spy(onnx_path, *a, **kw):
        seen.append({n.domain for n in onnx.load(onnx_path).graph.node})
        return real(onnx_path, *a, **kw)

    monkeypatch.setattr(mq, "quantize", spy)
    rng = np.random.default_rng(0)

    def feed(n, c=16, L=10):
        return {"x": rng.standard_normal((c, 2, 64)).astype(np.float32),
                "k": rng.standard_normal((1, 4, L, 16)).astype(np.float32),
                "v": rng.standard_normal((1, 4, L, 16)).astype(np.float32), "n": np.array([n], np.int64)}

    q = quantize_graph(model, [feed(n) for n in (0, 3, 10, 12)])
    assert seen == [{""}]  # ModelOpt saw standard ops only
    assert [n.op_type for n in q.graph.node if n.domain == "onetrans"] == ["SharedPrefixAttention"]
    assert not [n.name for n in q.graph.node if n.name.startswith(INLINED)]
    assert sum(n.op_type == "QuantizeLinear" for n in q.graph.node) >= 4  # the projections after it too
    test = feed(5, c=7, L=9)
    want = ort_session(model).run(None, test)[0]
    got = ort_session(q, simulate_qdq=True).run(None, test)[0]
    err = np.abs(got - want).max() / np.abs(want).max()
    assert 0 < err < 0.05


# ------------------------------------------------------------------ serve-repo

TRITON_NP = {"TYPE_FP32": np.float32, "TYPE_FP16": np.float16, "TYPE_INT64": np.int64, "TYPE_INT32": np.int32,
             "TYPE_BOOL": np.bool_}


def run_ensemble(repo: Path, request: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Triton's ensemble semantics in Python: every tensor checked against the client-facing
    shape (``dims``, plus the batch axis when the model batches) and dtype of each model that
    produces or reads it, reshaped to the model's own shape (``reshape``), run with ONNX Runtime."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    from onetrans_trt.runtime.ort_backend import ort_session

    def cfg(name):
        return text_format.Parse((repo / name / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())

    def typ(t):
        return model_config_pb2.DataType.Name(t.data_type)

    def check(where, t, a, batched):
        want = ([-1] if batched else []) + list(t.dims)
        assert a.ndim == len(want), f"{where} {t.name}: rank {a.ndim} ({a.shape}), config {want}"
        assert all(w in (-1, s) for w, s in zip(want, a.shape)), f"{where} {t.name}: {a.shape} vs {want}"
        assert a.dtype == TRITON_NP[typ(t)], f"{where} {t.name}: {a.dtype} vs {typ(t)}"

    ens = cfg("onetrans")
    tensors = {}
    for t in ens.input:
        check("ensemble input", t, request[t.name], False)
        tensors[t.name] = request[t.name]
    for step in ens.ensemble_scheduling.step:
        m = cfg(step.model_name)
        batched = m.max_batch_size > 0
        specs = {t.name: t for t in m.input}
        feeds = {}
        for key, value in step.input_map.items():
            a, t = tensors[value], specs[key]
            check(step.model_name, t, a, batched)
            if t.HasField("reshape"):
                a = a.reshape(([a.shape[0]] if batched else []) + list(t.reshape.shape))
            feeds[key] = a
        sess = ort_session(repo / step.model_name / "1" / "model.onnx")
        outs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
        ospecs = {t.name: t for t in m.output}
        for key, value in step.output_map.items():
            a, t = outs[key], ospecs[key]
            if t.HasField("reshape") or (batched and a.ndim == 1):
                a = a.reshape(([a.shape[0]] if batched else []) + [d if d > 0 else -1 for d in t.dims])
            check(step.model_name + " output", t, a, batched)
            tensors[value] = a
    return {t.name: tensors[t.name] for t in ens.output}


def _one_request(spec: dict, c: int, length: int, seed: int = 5):
    from onetrans_trt.protocol import SplitSpec, random_inputs

    user, cand = random_inputs(SplitSpec.parse(spec), users=1, candidates=c, lengths=[length],
                               rng=np.random.default_rng(seed))
    return {k: v.numpy() for k, v in user.items()}, {k: v.numpy() for k, v in cand.items()}


def test_serve_repo_ensemble_scores_like_the_module(build, tmp_path):
    """The repository's ensemble, executed with Triton's shape rules, scores a request exactly
    as the build's ORT split path and as the module's own forward, for fp32 and fp16 K/V."""
    from onetrans_trt.protocol import unified_inputs

    mod = example("fused_qkv_cls")
    assert run("convert", build, "--kv-fp16", "--quality-requests", "0").exit_code == 0
    user, cand = _one_request(mod.SPEC, 9, 13)
    with torch.no_grad():
        want = mod.factory()(unified_inputs({k: torch.from_numpy(v) for k, v in user.items()},
                                            {k: torch.from_numpy(v) for k, v in cand.items()}, 0)).numpy()
    for precision, tol in (("fp32", 1e-5), ("fp16", 1e-2)):
        repo = tmp_path / f"repo-{precision}"
        res = run("serve-repo", build, "--out", repo, "--precision", precision, "--json")
        assert res.exit_code == 0, res.stderr
        assert json.loads(res.stdout)["models"] == ["candidate_scorer", "onetrans", "user_encoder"]
        # a per-user scalar travels as [1, 1] through the ensemble (the batching encoder's [B, 1])
        request = {**{k: (v.reshape(1, 1) if v.ndim == 1 else v) for k, v in user.items()}, **cand}
        got = run_ensemble(repo, request)
        assert got["logits"].shape == (9, 2)
        np.testing.assert_allclose(got["logits"], want, atol=tol)
        np.testing.assert_allclose(got["probs"], 1 / (1 + np.exp(-want)), atol=tol)
    # no feature schema, so no raw requests and no rank_cached: its cache size is refused, nothing written
    res = run("serve-repo", build, "--out", tmp_path / "py", "--backend", "python", "--user-cache-mb", "8")
    assert res.exit_code == 2 and "--user-cache-mb does not apply" in res.stderr and not (tmp_path / "py").exists()


def test_serve_repo_refuses_what_an_ensemble_cannot_express(build):
    from onetrans_trt.export.api import read_manifest
    from onetrans_trt.runtime.triton_repo import check_ensemble, module_models

    m = read_manifest(build)
    ios = {r: m["graphs"][r] for r in ("user_encoder", "candidate_scorer")}
    models = module_models(m, ios, 16)
    check_ensemble(models)  # the real repository passes
    # a state tensor whose rank differs between the encoder (batching) and the scorer is caught
    bad = json.loads(json.dumps(models))
    k0 = next(t for t in bad["candidate_scorer"]["inputs"] if t["name"] == "user_k_0")
    k0["dims"] = k0["dims"][1:]
    with pytest.raises(InputError, match="user_k_0.*one dtype and one rank"):
        check_ensemble(bad)
    # a scorer input that is neither a candidate input nor the user's state
    ios2 = json.loads(json.dumps(ios))
    ios2["candidate_scorer"]["inputs"].append({"name": "extra", "dtype": "float32", "shape": [3]})
    with pytest.raises(InputError, match="extra.*cannot"):
        module_models(m, ios2, 16)
    # a dtype Triton has no type for
    ios3 = json.loads(json.dumps(ios))
    ios3["user_encoder"]["inputs"][0]["dtype"] = "complex64"
    with pytest.raises(InputError, match="complex64"):
        module_models(m, ios3, 16)


def test_bool_and_bf16_inputs_get_triton_types(build):
    from onetrans_trt.export.api import read_manifest
    from onetrans_trt.runtime.triton_repo import module_models, parse_config, _config

    m = read_manifest(build)
    ios = json.loads(json.dumps({r: m["graphs"][r] for r in ("user_encoder", "candidate_scorer")}))
    ios["user_encoder"]["inputs"].append({"name": "flags", "dtype": "bool", "shape": ["users", "history"]})
    ios["candidate_scorer"]["inputs"].append({"name": "cand_emb", "dtype": "bfloat16", "shape": ["candidates", 8]})
    models = module_models(m, ios, 16)
    types = {t["name"]: t["type"] for mm in models.values() if isinstance(mm, dict) and "inputs" in mm
             for t in mm["inputs"]}
    assert types["flags"] == "TYPE_BOOL" and types["cand_emb"] == "TYPE_BF16"
    ue = models["user_encoder"]
    parse_config(_config("user_encoder", "onnxruntime_onnx", ue["inputs"], ue["outputs"], 16, True))


# ------------------------------------------------------------------ build (TensorRT plan)

def test_build_profiles_cover_every_dynamic_axis_then_exit_3(build):
    from tests.helpers import trt_gpu_missing

    missing = trt_gpu_missing()
    res = run("build", build)
    if missing is None:
        pytest.skip("TensorRT and a GPU are here: test_build covers engine builds")
    assert res.exit_code == 3, res.stderr
    plan = json.loads((build / "engines" / "fp32" / "profiles.json").read_text())
    dims = _manifest(build)["dynamic_dims"]
    for role in ("user_encoder", "candidate_scorer"):
        model = onnx.load(str(build / f"{role}.onnx"))
        prof = plan["graphs"][role]["profile"]
        assert set(prof) == {i.name for i in model.graph.input}
        for v in model.graph.input:
            for axis, d in enumerate(v.type.tensor_type.shape.dim):
                lo, opt, hi = (prof[v.name][k][axis] for k in ("min", "opt", "max"))
                if d.dim_param:
                    assert (lo, opt, hi) == tuple(dims[d.dim_param][k] for k in ("min", "typical", "max"))
                else:
                    assert lo == opt == hi == d.dim_value
    cmds = (build / "engines" / "fp32" / "commands.sh").read_text()
    assert "--minShapes=hist_item:1x1,hist_action:1x1,hist_len:1,user_dense:1x8" in cmds
    assert "user_k_0:1x4x20x8" in cmds  # kv_len_0 at its max (the history)


def test_profiles_name_a_dynamic_axis_without_a_range():
    from onnx import TensorProto, helper

    from onetrans_trt.engines.build import profiles

    spec = dict(example("fused_qkv_cls").SPEC)
    spec["dims"] = {**spec.get("dims", {}), "tags": [1, 4, 9]}
    manifest = {"dynamic_dims": {"candidates": {"min": 1, "typical": 8, "max": 64}}, "protocol": {"spec": spec}}

    def graph(*inputs):
        return helper.make_model(helper.make_graph([], "g", list(inputs), []))

    # a module build: a named axis the spec gives a range for
    p = profiles(manifest, graph(helper.make_tensor_value_info("t", TensorProto.INT64, ["candidates", "tags"])), {})
    assert p["t"] == {"min": [1, 1], "opt": [8, 4], "max": [64, 9]}
    # our builds: an axis the manifest lacks is named with the option that gives it
    ours = {"dynamic_dims": manifest["dynamic_dims"]}
    g = graph(helper.make_tensor_value_info("t", TensorProto.INT64, ["candidates", "tags"]))
    with pytest.raises(InputError, match="'tags'.*--profile tags=MIN,OPT,MAX"):
        profiles(ours, g, {})
    assert profiles(ours, g, {"tags": (1, 2, 3)})["t"]["max"] == [64, 3]
    # an axis with neither a size nor a name
    unnamed = helper.make_tensor_value_info("u", TensorProto.FLOAT, ["candidates", None])
    with pytest.raises(InputError, match="input u: axis 1"):
        profiles(ours, graph(unnamed), {})


# ------------------------------------------------------------------ bench

def test_bench_a_module_build_side_by_side(build):
    assert run("convert", build, "--quality-requests", "0").exit_code == 0
    res = run("bench", build, "--rounds", "1", "--candidates", "6", "--history", "9", "--json")
    assert res.exit_code == 0, res.stderr
    out = json.loads(res.stdout)
    peers = out["peers"]["backends"]
    assert set(peers) == {"torch-unified", "torch-split", "ort", "ort-fp16"}
    assert "export --module" in out["peers"]["skipped"]["ort-unified"] and "calibrate" in out["peers"]["skipped"]["ort-int8"]
    assert out["peers"]["candidates"] == 6 and out["peers"]["history"] == 9
    for name in ("torch-split", "ort"):
        assert peers[name]["max_abs_vs_torch_unified"] < 1e-4
    assert 0 < peers["ort-fp16"]["max_abs_vs_torch_unified"] < 1e-2
    assert peers["torch-unified"]["speedup_vs_torch_unified"] == 1.0
    _one_line_error(run("bench", build, "--cache-history", "8"), "--cache-history")
    _one_line_error(run("bench", build, "--module", "/nope.py:make"), "--module")


# ------------------------------------------------------------------ external data

def test_external_data_build_through_convert_and_serve_repo(build, tmp_path, monkeypatch):
    """The build's two graphs re-saved with their weights in external data files: convert and
    serve-repo carry the data along, and every graph still scores like the original."""
    from onetrans_trt.export.api import read_manifest, sha256_file
    from onetrans_trt.onnx_files import data_file, load_model, save_model
    from onetrans_trt.runtime.ort_backend import ort_session

    orig = tmp_path / "orig"
    shutil.copytree(build, orig)
    monkeypatch.setenv("ONETRANS_TRT_EXTERNAL_DATA_BYTES", "0")
    m = read_manifest(build)
    for role in ("user_encoder", "candidate_scorer"):
        path = build / f"{role}.onnx"
        save_model(load_model(path), path)
        assert data_file(path).is_file()
        m["graphs"][role]["sha256"] = sha256_file(path)
    (build / "manifest.json").write_text(json.dumps(m, indent=2))
    assert run("convert", build, "--quality-requests", "0").exit_code == 0
    assert data_file(build / "fp16" / "candidate_scorer.onnx").is_file()
    repo = tmp_path / "repo"
    assert run("serve-repo", build, "--out", repo).exit_code == 0
    version = repo / "candidate_scorer" / "1"
    assert sorted(p.name for p in version.iterdir()) == ["candidate_scorer.onnx.data", "model.onnx"]
    user, cand = _one_request(example("fused_qkv_cls").SPEC, 5, 11)
    enc = ort_session(repo / "user_encoder" / "1" / "model.onnx")
    names = [o.name for o in enc.get_outputs()]
    state = dict(zip(names, enc.run(names, user)))
    want_state = dict(zip(names, ort_session(orig / "user_encoder.onnx").run(names, user)))
    for k in names:
        np.testing.assert_array_equal(state[k], want_state[k])
    feeds = {**cand, **{k: v for k, v in state.items()}}
    sc = ort_session(repo / "candidate_scorer" / "1" / "model.onnx")
    feeds = {i.name: feeds[i.name] for i in sc.get_inputs()}
    np.testing.assert_array_equal(sc.run(["logits"], feeds)[0],
                                  ort_session(orig / "candidate_scorer.onnx").run(["logits"], feeds)[0])
    half = ort_session(build / "fp16" / "candidate_scorer.onnx").run(["logits"], feeds)[0]
    np.testing.assert_allclose(half, sc.run(["logits"], feeds)[0], atol=1e-2)
    # calibrate too: ModelOpt reads and writes the external data, the int8 graphs keep it beside them
    assert run("calibrate", build, "--synthetic", "--samples", "4", "--quality-requests", "0").exit_code == 0
    assert data_file(build / "int8" / "candidate_scorer.onnx").is_file()
    assert "data" in _manifest(build)["precisions"]["int8"]["graphs"]["candidate_scorer"]
    q8 = ort_session(build / "int8" / "candidate_scorer.onnx", simulate_qdq=True).run(["logits"], feeds)[0]
    np.testing.assert_allclose(q8, sc.run(["logits"], feeds)[0], atol=0.2)


# ------------------------------------------------------------------ the three examples, end to end

@pytest.mark.heavy
@pytest.mark.parametrize("name", GOOD)
def test_each_example_through_every_stage_on_the_cli(name, tmp_path):
    b = tmp_path / name
    cli_ = [sys.executable, "-m", "onetrans_trt.cli"]

    def sh(*args):
        p = subprocess.run([*cli_, *map(str, args)], capture_output=True, text=True, cwd=tmp_path)
        return p

    p = sh("export", "--module", f"{EXAMPLES / name}.py:factory", "--spec", EXAMPLES / f"{name}.spec.json",
           "--out", b, "--unified")
    assert p.returncode == 0, p.stderr[-2000:]
    p = sh("convert", b, "--synthetic", "--quality-requests", "6")
    assert p.returncode == 0 and "data: synthetic (asked for)" in p.stdout, p.stderr[-2000:]
    p = sh("calibrate", b, "--synthetic", "--samples", "16", "--quality-requests", "6")
    assert p.returncode == 0 and "calibration requests from synthetic (asked for)" in p.stdout, p.stderr[-2000:]
    for precision in ("fp32", "fp16", "int8"):
        repo = tmp_path / f"repo-{precision}"
        p = sh("serve-repo", b, "--out", repo, "--precision", precision)
        assert p.returncode == 0, p.stderr[-2000:]
        mod = example(name)
        user, cand = _one_request(mod.SPEC, 7, 4)
        request = {**{k: (v.reshape(1, 1) if v.ndim == 1 else v) for k, v in user.items()}, **cand}
        from onetrans_trt.protocol import unified_inputs

        with torch.no_grad():
            want = mod.factory()(unified_inputs({k: torch.from_numpy(v) for k, v in user.items()},
                                                {k: torch.from_numpy(v) for k, v in cand.items()}, 0)).numpy()
        got = run_ensemble(repo, request)["logits"]
        np.testing.assert_allclose(got, want, atol={"fp32": 1e-4, "fp16": 2e-2, "int8": 0.5}[precision])
    p = sh("build", b, "--precision", "int8")
    from tests.helpers import trt_gpu_missing

    if trt_gpu_missing() is not None:
        assert p.returncode == 3 and (b / "engines" / "int8" / "profiles.json").is_file(), p.stderr[-2000:]
    p = sh("bench", b, "--quick", "--candidates", "32", "--json")
    assert p.returncode == 0, p.stderr[-2000:]
    peers = json.loads(p.stdout)["peers"]
    assert set(peers["backends"]) == {"torch-unified", "torch-split", "ort-unified", "ort", "ort-fp16", "ort-int8"}
    assert not peers["skipped"]
    assert peers["backends"]["ort"]["max_abs_vs_torch_unified"] < 1e-4
