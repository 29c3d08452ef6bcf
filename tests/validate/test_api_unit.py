"""validate/api.py on a tiny random-weight build (exported once, cached on disk: see
tests/mutation_kills/validate_fixture.py): the report's every field from a few requests, the
error paths, the divergence search, goldens written and read back. A second or so per test."""

from __future__ import annotations

import datetime
import json
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from onetrans_trt.errors import InputError, MissingCapabilityError
from onetrans_trt.validate import api
from onetrans_trt.validate.policy import DEFAULT_POLICY
from tests.mutation_kills.validate_fixture import tiny_random_build


@pytest.fixture(scope="module")
def fx() -> Path:
    return tiny_random_build()


@pytest.fixture(scope="module")
def model(fx):
    from onetrans_trt.models.checkpoint import load_checkpoint

    return load_checkpoint(fx / "ckpt")


def _reqs(fx):
    return json.loads((fx / "requests.json").read_text())


# ------------------------------------------------------------------ small helpers

def test_available_backends(tmp_path, monkeypatch):
    b = tmp_path
    assert api.available_backends(b) == ["torch-split", "ort"]
    (b / "fp16").mkdir()
    (b / "fp16" / "user_encoder.onnx").write_text("x")
    assert api.available_backends(b) == ["torch-split", "ort"]  # a variant needs its scorer
    (b / "fp16" / "candidate_scorer.onnx").write_text("x")
    (b / "int8").mkdir()
    (b / "int8" / "candidate_scorer.onnx").write_text("x")
    assert api.available_backends(b) == ["torch-split", "ort", "ort-fp16", "ort-int8"]
    for p in ("fp32", "int8"):
        (b / "engines" / p).mkdir(parents=True)
        (b / "engines" / p / "candidate_scorer.engine").write_text("x")
    (b / "engines" / "fp16").mkdir()
    (b / "engines" / "fp16" / "user_encoder.engine").write_text("x")  # no scorer engine: not listed
    import torch

    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert api.available_backends(b) == ["torch-split", "ort", "ort-fp16", "ort-int8", "trt", "trt-int8"]
    (b / "engines" / "fp16" / "candidate_scorer.engine").write_text("x")
    assert api.available_backends(b)[-3:] == ["trt", "trt-fp16", "trt-int8"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert api.available_backends(b)[-1] == "ort-int8"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import fails
    assert api.available_backends(b)[-1] == "ort-int8"


def test_backend_status_says_why(tmp_path, monkeypatch):
    import torch

    b = tmp_path
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # not installed
    st = api.backend_status(b)
    assert list(st) == ["torch-split", "ort", "ort-fp16", "ort-int8", "ort-int8-qdq", "ort-int8-cpu", "trt",
                        "trt-fp16", "trt-int8"]
    assert st["torch-split"] is None and st["ort"] is None
    assert st["ort-fp16"] == (f"no fp16/candidate_scorer.onnx; run `onetrans-trt convert {b} --precision fp16`", False)
    assert st["ort-int8"] == st["ort-int8-qdq"] == (f"no int8/candidate_scorer.onnx; run `onetrans-trt calibrate {b}`",
                                                    False)
    assert st["ort-int8-cpu"] == (f"no int8-cpu/candidate_scorer.onnx; run `onetrans-trt calibrate {b} --target cpu`",
                                  False)
    why, capability = st["trt"]
    assert capability is True and st["trt-fp16"] == st["trt-int8"] == st["trt"]
    assert why.startswith("TensorRT is not usable here (ModuleNotFoundError: ") and why.endswith(
        "); install the 'trt' extra (tensorrt>=11) on a machine with an NVIDIA GPU")
    from onetrans_trt.plugins._trt import require_tensorrt

    with pytest.raises(MissingCapabilityError) as e:  # the words of `rank --backend trt`
        require_tensorrt()
    assert str(e.value) == why
    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert api.backend_status(b)["trt-fp16"] == ("TensorRT backends need a CUDA GPU and none is visible", True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    (b / "engines" / "fp16").mkdir(parents=True)
    (b / "engines" / "fp16" / "candidate_scorer.engine").write_text("x")
    st = api.backend_status(b)
    assert st["trt-fp16"] is None
    assert st["trt-int8"] == (f"no engines/int8/candidate_scorer.engine; run `onetrans-trt build {b} --precision int8`",
                              False)
    assert api.choose_backends(b, None) == (["torch-split", "ort", "trt-fp16"], {  # one name per variant
        k: v[0] for k, v in st.items() if v is not None and k not in ("ort-int8-qdq", "ort-int8-cpu")})
    assert api.choose_backends(b, ["trt-fp16", "ort"]) == (["trt-fp16", "ort"], {})


def test_graph_paths(tmp_path):
    assert api._graph_paths(tmp_path, "ort") == {"user_encoder": tmp_path / "user_encoder.onnx",
                                                 "candidate_scorer": tmp_path / "candidate_scorer.onnx"}
    assert api._graph_paths(tmp_path, "ort-fp16") == {"user_encoder": tmp_path / "fp16" / "user_encoder.onnx",
                                                      "candidate_scorer": tmp_path / "fp16" / "candidate_scorer.onnx"}
    assert api._graph_paths(tmp_path, "ort-int8")["candidate_scorer"] == tmp_path / "int8" / "candidate_scorer.onnx"
    assert api._graph_paths(tmp_path, "trt") is None and api._graph_paths(tmp_path, "torch-split") is None


def test_backend_by_name(fx, model):
    from onetrans_trt.runtime.backends import TorchSplitBackend

    b = api._backend(fx / "build", "torch-split", model)
    assert isinstance(b, TorchSplitBackend) and b.model is model
    ort = api._backend(fx / "build", "ort", None)
    fp16 = api._backend(fx / "build", "ort-fp16", None)
    assert type(ort).__name__ == type(fp16).__name__ != "TorchSplitBackend"
    assert (ort.name, fp16.name) == ("ort", "ort-fp16")


def test_load_requests_for_a_file_and_the_refusals(fx, tmp_path):
    path = fx / "requests.json"
    reqs, labels, source = api.load_requests_for(None, None, "ml-100k", path, 2)
    assert [r.to_json() for r in reqs] == _reqs(fx)[:2] and labels == [None, None]
    assert source == f"--requests {path} (2 requests)"
    with pytest.raises(InputError) as e:
        api.load_requests_for(None, None, None, None, 2)
    assert str(e.value) == "give --data ml-100k or --requests FILE"
    cfg = types.SimpleNamespace(schema=types.SimpleNamespace(sequences=[types.SimpleNamespace(name="clicks")]))
    with pytest.raises(InputError) as e:
        api.load_requests_for(None, cfg, "ml-100k", None, 2)
    assert str(e.value) == "--data ml-100k needs a build trained on MovieLens-100K; pass --requests FILE"


def test_load_requests_for_movielens(model):
    from onetrans_trt.data.movielens import MovieLens

    reqs, labels, source = api.load_requests_for(None, model.cfg, "ml-100k", None, 2)
    assert source == "ml-100k test requests (2 requests, 50 labelled candidates each, seed 31)"
    assert len(reqs) == 2 and all(len(r.candidates) == 50 for r in reqs)
    ml = MovieLens(max_history=model.cfg.schema.max_history, merge_mode=model.cfg.schema.merge_mode)
    want = ml.requests(2, n_candidates=50, seed=31)
    assert [r.to_json() for r in reqs] == [r.to_json() for r, _ in want]
    assert labels == [lab for _, lab in want]


# ------------------------------------------------------------------ validate_build

def test_validate_build_report(fx, model):
    from onetrans_trt.data.requests import encode_request, load_requests
    from onetrans_trt.export.serving import state_output_names

    calls = []
    r = api.validate_build(fx / "build", backends=["torch-split", "ort"], data=None, requests_file=fx / "requests.json",
                           n_requests=10, ckpt=fx / "ckpt", progress=lambda *a: calls.append(a))
    assert r["format"] == "onetrans-trt/validate/1" and r["build"] == str(fx / "build")
    assert r["checkpoint"] == str(fx / "ckpt") and r["policy"] == DEFAULT_POLICY
    created = datetime.datetime.fromisoformat(r["created"])
    assert created.tzinfo is not None and created.utcoffset() == datetime.timedelta(0)
    assert abs((datetime.datetime.now(datetime.timezone.utc) - created).total_seconds()) < 3600
    assert r["requests"] == {"source": f"--requests {fx / 'requests.json'} (5 requests)", "count": 5, "labelled": 0}
    assert list(r["backends"]) == ["torch-split", "ort"] and r["verdict"] == "pass"
    assert r["skipped"] == {}  # backends named: nothing skipped
    with_cands = [i + 1 for i, q in enumerate(_reqs(fx)) if q["candidates"]]
    assert calls == [("reference", i, 5) for i in range(1, 6)] + [(n, i, 5) for n in ("torch-split", "ort")
                                                                   for i in with_cands]
    names = state_output_names(model.cfg)
    for name, b in r["backends"].items():
        assert b["verdict"] == "pass" and b["precision"] == "fp32" and b["tolerance"] == DEFAULT_POLICY["fp32"]
        assert b["divergence"] is None and b["error"] is None
        assert list(b["graphs"]["user_encoder"]) == names
        for k, s in b["graphs"]["user_encoder"].items():
            assert s["pass"] is True and s["max_abs"] <= 1e-4 and s["name"] == k
        assert b["graphs"]["candidate_scorer"]["logits"]["name"] == "logits"
        assert b["end_to_end"]["logits"]["name"] == "end_to_end_logits"
        lg = b["graphs"]["candidate_scorer"]["logits"]
        assert lg["pass"] is True and lg["count"] == 4 * 6 * 2 if "count" in lg else lg["pass"] is True
        e2e = b["end_to_end"]
        assert e2e["logits"]["pass"] is True and "metrics" not in e2e
        assert e2e["ranking"]["top10_overlap_mean"] == 1.0 and e2e["ranking"]["kendall_tau_mean"] > 0.99
        c = {x["name"]: x for x in b["checks"]}
        assert [x["name"] for x in b["checks"]] == ["nan_inf", "max_error", "cosine", "delta_auc", "top10_overlap",
                                                   "kendall_tau"]
        assert all(x["passed"] is True for x in b["checks"] if x["name"] not in ("delta_auc", "kendall_tau"))
        assert c["delta_auc"]["passed"] is None and c["delta_auc"]["reason"].endswith("carry no labels")
        outs = {**{f"{g}.{k}": v for g, o in b["graphs"].items() for k, v in o.items()},
                "end_to_end.logits": e2e["logits"]}
        m = c["max_error"]
        assert m["value"] == outs[m["output"]]["max_abs"] <= m["limit"]
        assert m["limit"] == pytest.approx(1e-4 + 1e-4 * outs[m["output"]]["ref_max_abs"])
        assert c["top10_overlap"]["value"] == 1.0 and c["top10_overlap"]["reason"].endswith("(mean over 4 requests)")
        assert c["kendall_tau"]["value"] == e2e["ranking"]["kendall_tau_mean"] and c["kendall_tau"]["limit"] is None
    assert r["backends"]["torch-split"]["note"] == ""
    assert r["backends"]["ort"]["note"] == api._backend(fx / "build", "ort", None).__dict__.get(
        "note", getattr(api._backend(fx / "build", "ort", None), "note", ""))
    # the plots: reference vs backend logits of every candidate, in request order
    reqs = load_requests(fx / "requests.json")
    import torch

    want = []
    with torch.no_grad():
        for q in reqs:
            hist, ns = encode_request(model.cfg.schema, q)
            t = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in hist.items()}
            kv = model.encode_user(t)
            want.append(model.score_candidates(kv, {k: torch.from_numpy(np.ascontiguousarray(v))
                                                    for k, v in ns.items()}).numpy().reshape(-1))
    want = np.concatenate(want)
    for name in ("torch-split", "ort"):
        ref, got = r["plots"][name]["scatter"]
        assert len(ref) == len(got) == len(want) == 4 * 6 * len(model.cfg.tasks)
        np.testing.assert_allclose(ref, want, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
        h = r["plots"][name]["histogram"]
        assert sum(h["counts"]) == len(want)


def test_validate_build_with_labels_reports_metrics(fx, model, monkeypatch):
    from onetrans_trt.data.requests import load_requests
    from onetrans_trt.models.training import binary_metrics

    reqs = load_requests(fx / "requests.json")
    labels = json.loads((fx / "labels.json").read_text())
    seen = []

    def fake(build, cfg, data, requests_file, n, data_dir=None):
        seen.append((Path(build), cfg is model.cfg or cfg.tasks == model.cfg.tasks, data, requests_file, n, data_dir))
        return reqs, labels, "fake"

    monkeypatch.setattr(api, "load_requests_for", fake)
    r = api.validate_build(fx / "build", backends=["ort"], data="ml-100k", requests_file="R", n_requests=7,
                           ckpt=fx / "ckpt", data_dir="D")
    assert seen == [(fx / "build", True, "ml-100k", "R", 7, "D")]
    n_labelled = sum(lab is not None for ls in labels for lab in ls)
    assert r["requests"] == {"source": "fake", "count": 5, "labelled": n_labelled} and n_labelled == 24
    m = r["backends"]["ort"]["end_to_end"]["metrics"]
    assert list(m) == list(model.cfg.tasks)
    ys = np.asarray([lab for ls in labels for lab in ls if lab is not None], np.float32)
    ref = np.asarray(r["plots"]["ort"]["scatter"][0], np.float32).reshape(-1, len(model.cfg.tasks))
    torch_m = binary_metrics(ys, ref, list(model.cfg.tasks))  # the unified forward equals the split one here
    for tk, v in m.items():
        assert v["torch_auc"] == pytest.approx(torch_m[tk]["auc"], abs=1e-6)
        assert v["delta_auc"] == pytest.approx(v["auc"] - v["torch_auc"], abs=1e-12)
        assert v["delta_logloss"] == pytest.approx(v["logloss"] - torch_m[tk]["logloss"], abs=1e-5)
        assert abs(v["delta_auc"]) <= DEFAULT_POLICY["fp32"]["max_delta_auc"]
    assert r["backends"]["ort"]["verdict"] == "pass"
    # 24 labels are far from the 20,000 positive-negative pairs a 0.0005 limit needs: not judged, and said so
    aucs = [c for c in r["backends"]["ort"]["checks"] if c["name"] == "delta_auc"]
    assert [c["task"] for c in aucs] == list(model.cfg.tasks)
    for c, tk in zip(aucs, model.cfg.tasks):
        pos = int((ys[:, list(model.cfg.tasks).index(tk)] > 0.5).sum())
        assert c["pairs"] == pos * (24 - pos) and c["min_pairs"] == 20_000 and c["passed"] is None
        assert "not judged" in c["reason"] and f"24 labels ({pos} positives x {24 - pos} negatives" in c["reason"]
    # a limit that 24 labels can resolve (10 / 1.0 = 10 pairs) is judged
    policy = json.loads(json.dumps(DEFAULT_POLICY))
    policy["fp32"]["max_delta_auc"] = 1.0
    loose = api.validate_build(fx / "build", backends=["ort"], ckpt=fx / "ckpt", policy=policy)
    judged = [c for c in loose["backends"]["ort"]["checks"] if c["name"] == "delta_auc"]
    assert [c["passed"] for c in judged if c["pairs"] >= 10] == [True] * sum(c["pairs"] >= 10 for c in judged) != []


def test_an_auc_change_fails_the_backend(fx, model, monkeypatch):
    from onetrans_trt.data.requests import load_requests

    reqs = load_requests(fx / "requests.json")
    labels = json.loads((fx / "labels.json").read_text())
    monkeypatch.setattr(api, "load_requests_for", lambda *a, **k: (reqs, labels, "fake"))
    policy = json.loads(json.dumps(DEFAULT_POLICY))
    policy["fp16"]["max_delta_auc"] = -1.0  # no AUC change is small enough
    r = api.validate_build(fx / "build", backends=["torch-split", "ort-fp16"], ckpt=fx / "ckpt", policy=policy)
    b = r["backends"]["ort-fp16"]
    assert b["precision"] == "fp16" and b["tolerance"] == policy["fp16"]
    assert all(v["pass"] for g in b["graphs"].values() for v in g.values())
    assert b["verdict"] == "fail" and r["verdict"] == "fail" and r["backends"]["torch-split"]["verdict"] == "pass"
    bad = [c for c in b["checks"] if c["passed"] is False]
    assert {c["name"] for c in bad} == {"delta_auc"} and all(c["limit"] == -1.0 for c in bad)
    assert all(c["reason"].startswith(f"delta AUC {c['task']} ") and "> -1" in c["reason"] for c in bad)


def test_a_ranking_change_fails_the_backend(fx):
    policy = json.loads(json.dumps(DEFAULT_POLICY))
    policy["fp32"]["min_top10_overlap"] = 1.5
    r = api.validate_build(fx / "build", backends=["torch-split"], data=None, requests_file=fx / "requests.json",
                           ckpt=fx / "ckpt", policy=policy)
    b = r["backends"]["torch-split"]
    assert b["end_to_end"]["logits"]["pass"] and b["verdict"] == "fail"
    assert [(c["name"], c["value"], c["limit"]) for c in b["checks"] if c["passed"] is False] == [
        ("top10_overlap", 1.0, 1.5)]
    assert b["divergence"] == {"note": "divergence search needs ONNX graphs; torch-split has none"}


def test_a_graph_past_tolerance_fails_and_is_localized(fx):
    policy = json.loads(json.dumps(DEFAULT_POLICY))
    policy["fp32"].update(atol=0.0, rtol=0.0)
    r = api.validate_build(fx / "build", backends=["ort"], data=None, requests_file=fx / "requests.json",
                           ckpt=fx / "ckpt", policy=policy)
    b = r["backends"]["ort"]
    assert b["verdict"] == "fail" and r["verdict"] == "fail"
    bad = {c["name"]: c for c in b["checks"] if c["passed"] is False}
    assert set(bad) == {"max_error"} and bad["max_error"]["limit"] == 0.0 and bad["max_error"]["value"] > 0
    d = b["divergence"]
    assert d["role"] == "user_encoder" and d["tensor"] and d["node"] and d["max_abs"] > 0
    assert set(d) == {"layer", "module", "node", "tensor", "role", "max_abs", "cosine", "shape_mismatch", "nan", "inf"}


def test_a_broken_scorer_is_localized_to_the_scorer(fx, tmp_path):
    import onnx
    from onnx import numpy_helper

    b = tmp_path / "b"
    shutil.copytree(fx / "build", b)
    m = onnx.load(str(b / "candidate_scorer.onnx"))
    inits = {i.name: i for i in m.graph.initializer}
    users = [n for n in m.graph.node if n.op_type == "MatMul" and any(x in inits for x in n.input)]
    w = inits[next(x for x in users[-1].input if x in inits)]
    w.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w) * 3.0, w.name))
    onnx.save(m, str(b / "candidate_scorer.onnx"))
    r = api.validate_build(b, backends=["ort"], data=None, requests_file=fx / "requests.json", ckpt=fx / "ckpt")
    e = r["backends"]["ort"]
    assert e["verdict"] == "fail"
    assert all(s["pass"] for s in e["graphs"]["user_encoder"].values())
    assert not e["graphs"]["candidate_scorer"]["logits"]["pass"]
    d = e["divergence"]
    assert d["role"] == "candidate_scorer" and 1e-4 < d["max_abs"] < float("inf") and "error" not in d
    assert d["tensor"] and d["module"]


def _plant_after_the_last_module(graph_path):
    """logits * 1.01 after every module: only the graph's output shows it."""
    import onnx
    from onnx import helper, numpy_helper

    m = onnx.load(str(graph_path))
    prod = next(n for n in m.graph.node if "logits" in n.output)
    prod.output[list(prod.output).index("logits")] = "logits_pre"
    m.graph.initializer.append(numpy_helper.from_array(np.array(1.01, np.float32), "planted_gain"))
    at = list(m.graph.node).index(prod) + 1
    m.graph.node.insert(at, helper.make_node("Mul", ["logits_pre", "planted_gain"], ["logits"], name="planted_mul"))
    onnx.save(m, str(graph_path))


def test_a_defect_after_the_last_module_is_found_at_the_logits(fx, tmp_path):
    b = tmp_path / "b"
    shutil.copytree(fx / "build", b)
    _plant_after_the_last_module(b / "candidate_scorer.onnx")
    r = api.validate_build(b, backends=["ort"], data=None, requests_file=fx / "requests.json", n_requests=2,
                           ckpt=fx / "ckpt")
    d = r["backends"]["ort"]["divergence"]
    assert d["tensor"] == "logits" and d["node"] == "logits" and d["role"] == "candidate_scorer"
    assert d["max_abs"] < float("inf")


def test_a_broken_fp16_scorer_is_localized(fx, tmp_path):
    import onnx
    from onnx import numpy_helper

    b = tmp_path / "b"
    shutil.copytree(fx / "build", b)
    path = b / "fp16" / "candidate_scorer.onnx"
    m = onnx.load(str(path))
    inits = {i.name: i for i in m.graph.initializer}
    users = [n for n in m.graph.node if n.op_type == "MatMul" and any(x in inits for x in n.input)]
    w = inits[next(x for x in users[-1].input if x in inits)]
    w.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w) * 3, w.name))
    onnx.save(m, str(path))
    r = api.validate_build(b, backends=["ort-fp16"], data=None, requests_file=fx / "requests.json", n_requests=2,
                           ckpt=fx / "ckpt")
    d = r["backends"]["ort-fp16"]["divergence"]
    assert d["role"] == "candidate_scorer" and d["max_abs"] < float("inf") and "error" not in d and d["tensor"]


def test_a_backend_that_raises_fails_with_its_error(fx, model, monkeypatch):
    class Broken:
        note = "broken on purpose"

        def encode_user(self, hist):
            raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(api, "_backend", lambda build, name, m: Broken())
    r = api.validate_build(fx / "build", backends=["torch-split"], data=None, requests_file=fx / "requests.json",
                           ckpt=fx / "ckpt")
    b = r["backends"]["torch-split"]
    assert b["error"] == "RuntimeError: boom" and b["verdict"] == "fail" and b["note"] == "broken on purpose"
    assert b["checks"][0] == {"name": "error", "value": None, "limit": None, "passed": False,
                              "reason": "the backend raised RuntimeError: boom"}
    assert [c["name"] for c in b["checks"] if c["passed"] is False] == ["error"]
    assert b["end_to_end"]["ranking"] == {"top10_overlap_mean": 1.0, "kendall_tau_mean": 1.0}
    assert r["plots"]["torch-split"]["scatter"] == [[], []]


def test_find_divergence_notes(fx, model, tmp_path):
    assert api._find_divergence(tmp_path, "trt", model, {}, {}, None) == {
        "note": "divergence search needs ONNX graphs; trt has none"}
    assert api._find_divergence(tmp_path, "ort", model, {}, {}, None) == {
        "note": "serving.onnx is missing: module scopes unknown"}


def test_validate_build_refusals(fx, tmp_path, monkeypatch):
    with pytest.raises(InputError) as e:  # the manifest's checkpoint path is gone (built elsewhere)
        api.validate_build(fx / "build", requests_file=fx / "requests.json")
    assert str(e.value).startswith("validation needs the source checkpoint (") and str(e.value).endswith(
        "); pass --ckpt, or use --goldens")
    monkeypatch.setattr(api, "_trt_problem", lambda: None)  # TensorRT and a GPU here, but no engines built
    with pytest.raises(InputError) as e:
        api.validate_build(fx / "build", backends=["ort", "ort-int8", "trt"], requests_file=fx / "requests.json",
                           ckpt=fx / "ckpt")
    b = fx / "build"
    assert str(e.value) == (f"backends ['ort-int8', 'trt'] are not available for {b}; "
                            "available: ['torch-split', 'ort', 'ort-fp16']; "
                            f"ort-int8: no int8/candidate_scorer.onnx; run `onetrans-trt calibrate {b}`; "
                            f"trt: no engines/fp32/candidate_scorer.engine; run `onetrans-trt build {b} --precision fp32`")
    with pytest.raises(InputError) as e:
        api.validate_build(b, backends=["ort", "trt-bf16"], requests_file=fx / "requests.json", ckpt=fx / "ckpt")
    assert str(e.value).endswith("; trt-bf16: unknown (choose from torch-split, ort, ort-fp16, ort-int8, ort-int8-qdq, "
                                 "ort-int8-cpu, trt, trt-fp16, trt-int8)")
    # this machine lacks TensorRT: exit 3 (as `rank --backend trt`), before any artifact is looked for
    monkeypatch.setattr(api, "_trt_problem", lambda: "TensorRT is not usable here (X)")
    for asked, names in ((["ort-int8", "trt-fp16"], "backend 'trt-fp16'"),
                         (["trt", "trt-int8"], "backends 'trt', 'trt-int8'")):
        with pytest.raises(MissingCapabilityError) as e:
            api.validate_build(b, backends=asked, requests_file=fx / "requests.json", ckpt=fx / "ckpt")
        assert str(e.value) == f"{names} cannot run here: TensorRT is not usable here (X)"
    empty = tmp_path / "none.json"
    empty.write_text("[]")
    with pytest.raises(InputError) as e:
        api.validate_build(fx / "build", data=None, requests_file=empty, ckpt=fx / "ckpt")
    assert str(e.value) == "no requests to validate on"


def test_all_available_backends_by_default(fx, monkeypatch):
    monkeypatch.setattr(api, "_trt_problem", lambda: "TensorRT is not usable here (X)")
    r = api.validate_build(fx / "build", data=None, requests_file=fx / "requests.json", n_requests=2,
                           ckpt=fx / "ckpt")
    assert list(r["backends"]) == ["torch-split", "ort", "ort-fp16"] and r["requests"]["count"] == 2
    assert r["backends"]["ort-fp16"]["precision"] == "fp16"
    assert r["backends"]["ort-fp16"]["tolerance"] == DEFAULT_POLICY["fp16"]
    b = fx / "build"
    assert r["skipped"] == {"ort-int8": f"no int8/candidate_scorer.onnx; run `onetrans-trt calibrate {b}`",
                            "trt": "TensorRT is not usable here (X)", "trt-fp16": "TensorRT is not usable here (X)",
                            "trt-int8": "TensorRT is not usable here (X)"}


# ------------------------------------------------------------------ goldens

def test_goldens_round_trip(fx, tmp_path):
    from polygraphy.json import load_json

    g = tmp_path / "goldens"
    reqs = tmp_path / "r.json"  # (a request without candidates: see the xfail below)
    reqs.write_text(json.dumps([q for q in _reqs(fx) if q["candidates"]] + [_reqs(fx)[0]]))
    r = api.validate_build(fx / "build", backends=["torch-split"], data=None, requests_file=reqs,
                           ckpt=fx / "ckpt", save_goldens=g)
    assert r["verdict"] == "pass"
    manifest = json.loads((fx / "build" / "manifest.json").read_text())
    meta = json.loads((g / "meta.json").read_text())
    assert meta == {"format": "onetrans-trt/goldens/1", "requests": 5,
                    "graphs": {k: v["sha256"] for k, v in manifest["graphs"].items()},
                    "checkpoint": manifest["checkpoint"]}
    ue_in = load_json(str(g / "user_encoder_inputs.json"))
    cs_in = load_json(str(g / "candidate_scorer_inputs.json"))
    cs_out = load_json(str(g / "candidate_scorer_outputs.json"))
    assert len(ue_in) == len(cs_in) == len(cs_out) == 5
    scorer_inputs = {i["name"] for i in manifest["graphs"]["candidate_scorer"]["inputs"]}
    assert set(cs_in[0]) == scorer_inputs and "s_length" in cs_in[0]
    assert cs_out[0]["logits"].shape == (6, 2)
    np.testing.assert_array_equal(cs_in[0]["s_length"], ue_in[0]["s_length"])
    np.testing.assert_array_equal(cs_out[4]["logits"], cs_out[0]["logits"])  # the same request twice

    again = api.validate_build(fx / "build", backends=["torch-split"], data=None, requests_file=reqs, n_requests=2,
                               ckpt=fx / "ckpt", save_goldens=g)  # an existing goldens directory is replaced
    assert again["verdict"] == "pass" and json.loads((g / "meta.json").read_text())["requests"] == 2
    api.validate_build(fx / "build", backends=["torch-split"], data=None, requests_file=reqs, ckpt=fx / "ckpt",
                       save_goldens=g)
    rep = api.validate_goldens(fx / "build", g)
    assert rep["skipped"] == {"ort-int8": f"no int8/candidate_scorer.onnx; run `onetrans-trt calibrate {fx / 'build'}`"}
    assert api.validate_goldens(fx / "build", g, backends=["ort"])["skipped"] == {}
    for b in rep["backends"].values():
        assert [c["name"] for c in b["checks"]] == ["nan_inf", "max_error", "cosine", "top10_overlap"]
        assert all(c["passed"] is True for c in b["checks"])
    assert list(rep["backends"]) == ["ort", "ort-fp16"] and rep["verdict"] == "pass"
    assert (g / "meta.json").read_text() == json.dumps(meta, indent=2)
    assert rep["backends"]["ort"]["note"] == "" and rep["backends"]["ort-fp16"]["note"] == ""
    tight = json.loads(json.dumps(DEFAULT_POLICY))
    tight["fp16"].update(atol=1e-5, rtol=1e-5)  # FP32 arithmetic would pass this; FP16's does not
    fp16 = api.validate_goldens(fx / "build", g, backends=["ort-fp16"], policy=tight)
    assert fp16["verdict"] == "fail"
    assert {c["name"] for c in fp16["backends"]["ort-fp16"]["checks"] if c["passed"] is False} == {"max_error"}
    assert rep["format"] == "onetrans-trt/validate/1" and rep["build"] == str(fx / "build")
    assert rep["goldens"] == str(g) and rep["policy"] == DEFAULT_POLICY and rep["goldens_meta"] == meta
    assert rep["requests"] == {"source": "goldens", "count": 5}
    for name, b in rep["backends"].items():
        assert b["precision"] == ("fp16" if name == "ort-fp16" else "fp32") and b["divergence"] is None
        assert b["tolerance"] == DEFAULT_POLICY[b["precision"]] and b["verdict"] == "pass"
        assert b["end_to_end"]["ranking"]["top10_overlap_mean"] == 1.0
        assert all(v["pass"] for gr in b["graphs"].values() for v in gr.values())
        assert set(b["graphs"]["user_encoder"]) == {k for k in ue_in and load_json(
            str(g / "user_encoder_outputs.json"))[0]}
        assert all(v["name"] == k for k, v in b["graphs"]["user_encoder"].items())
        assert b["graphs"]["candidate_scorer"]["logits"]["name"] == "logits"
    only = api.validate_goldens(fx / "build", g, backends=["ort-fp16"])
    assert list(only["backends"]) == ["ort-fp16"]

    # a wrong golden fails the backend
    bad = load_json(str(g / "candidate_scorer_outputs.json"))
    bad[0]["logits"] = bad[0]["logits"] + 1.0
    from polygraphy.json import save_json

    save_json(bad, str(g / "candidate_scorer_outputs.json"))
    rep = api.validate_goldens(fx / "build", g, backends=["ort"])
    assert rep["verdict"] == "fail" and not rep["backends"]["ort"]["graphs"]["candidate_scorer"]["logits"]["pass"]
    assert rep["backends"]["ort"]["verdict"] == "fail"
    policy = json.loads(json.dumps(DEFAULT_POLICY))
    policy["fp32"]["min_top10_overlap"] = 1.5
    shutil.copy(g / "candidate_scorer_outputs.json", tmp_path / "bad.json")
    save_json(cs_out, str(g / "candidate_scorer_outputs.json"))
    rep = api.validate_goldens(fx / "build", g, backends=["ort"], policy=policy)
    assert rep["policy"] == policy and rep["verdict"] == "fail"
    assert all(v["pass"] for gr in rep["backends"]["ort"]["graphs"].values() for v in gr.values())


def test_goldens_refusals(fx, tmp_path):
    with pytest.raises(InputError) as e:
        api.validate_goldens(fx / "build", tmp_path)
    assert str(e.value) == f"{tmp_path}: not a goldens directory (no meta.json); create one with --save-goldens"
    (tmp_path / "meta.json").write_text("{}")
    for f in ("user_encoder_inputs", "user_encoder_outputs", "candidate_scorer_inputs", "candidate_scorer_outputs"):
        (tmp_path / f"{f}.json").write_text("[]")
    (tmp_path / "candidate_scorer_outputs.json").write_text("{not json")
    with pytest.raises(InputError) as e:
        api.validate_goldens(fx / "build", tmp_path)
    assert str(e.value) == f"{tmp_path}: unreadable goldens (JSONDecodeError)"
    (tmp_path / "candidate_scorer_outputs.json").write_text("[]")
    for name in ("torch-split", "trt-fp16"):
        with pytest.raises(InputError) as e:
            api.validate_goldens(fx / "build", tmp_path, backends=["ort", name])
        assert str(e.value) == f"--goldens validates ONNX Runtime backends; {name!r} is not one"


def test_goldens_with_a_request_without_candidates(fx, tmp_path):
    g = tmp_path / "goldens"
    api.validate_build(fx / "build", backends=["torch-split"], data=None, requests_file=fx / "requests.json",
                       ckpt=fx / "ckpt", save_goldens=g)
    assert api.validate_goldens(fx / "build", g, backends=["ort"])["verdict"] == "pass"


# ------------------------------------------------------------------ --inputs (graph feeds)

def _npz(fx, model, tmp_path, mutate=None, name="in.npz"):
    from onetrans_trt.data.requests import encode_request, load_requests

    arrays = {}
    for i, q in enumerate(r for r in load_requests(fx / "requests.json") if r.candidates):
        hist, ns = encode_request(model.cfg.schema, q)
        for k, v in {**hist, **ns}.items():
            arrays[f"{i}/{k}"] = v
    if mutate:
        mutate(arrays)
    path = tmp_path / name
    np.savez(path, **arrays)
    return path


def test_inputs_as_graph_feeds(fx, model, tmp_path):
    path = _npz(fx, model, tmp_path)
    r = api.validate_build(fx / "build", backends=["torch-split", "ort"], inputs=path, n_requests=3, ckpt=fx / "ckpt")
    assert r["verdict"] == "pass" and r["requests"]["count"] == 3 and r["requests"]["labelled"] == 0
    assert r["requests"]["source"] == f"--inputs {path} (4 requests, npz)"
    ref = api.validate_build(fx / "build", backends=["torch-split"], data=None, requests_file=fx / "requests.json",
                             n_requests=2, ckpt=fx / "ckpt")  # requests 0 and 1 (1: no history) are the npz's 0, 1
    np.testing.assert_allclose(r["plots"]["torch-split"]["scatter"][0][:24], ref["plots"]["torch-split"]["scatter"][0],
                               rtol=1e-6, atol=1e-6)
    # request JSON given as --inputs is read as requests
    r = api.validate_build(fx / "build", backends=["ort"], inputs=fx / "requests.json", n_requests=2, ckpt=fx / "ckpt")
    assert r["requests"]["source"] == f"--requests {fx / 'requests.json'} (2 requests)"


def test_inputs_that_do_not_fit_the_graphs(fx, model, tmp_path):
    def run(mutate):
        path = _npz(fx, model, tmp_path, mutate)
        with pytest.raises(InputError) as e:
            api.validate_build(fx / "build", backends=["ort"], inputs=path, ckpt=fx / "ckpt")
        return str(e.value), path

    def retype(a):
        a["1/s_length"] = a["1/s_length"].astype(np.int32)

    msg, path = run(retype)
    assert msg.startswith(f"--inputs {path}: request 1 s_length is int32 [1]; the graph takes int64 ")

    def rerank(a):
        a["0/s_length"] = a["0/s_length"].reshape(1, 1)

    msg, path = run(rerank)
    assert msg.startswith(f"--inputs {path}: request 0 s_length is int64 [1, 1]; the graph takes int64 ")

    def two_users(a):
        for k in [k for k in a if k.startswith("2/") and not k.startswith("2/ns_")]:
            a[k] = np.concatenate([a[k], a[k]])

    msg, path = run(two_users)
    assert msg == (f"--inputs {path}: request 2 has user inputs for more than one user; one user per request "
                   "(batch dimension 1)")

    def disagree(a):
        k = next(k for k in a if k.startswith("3/ns_"))
        a[k] = a[k][:2]

    msg, path = run(disagree)
    assert msg.startswith(f"--inputs {path}: request 3's candidate inputs disagree on the number of candidates (")
    assert msg.endswith("[2, 6])")


def test_movielens_is_the_default_data(fx):
    r = api.validate_build(fx / "build", backends=["torch-split"], n_requests=1, ckpt=fx / "ckpt")
    assert r["requests"]["source"].startswith("ml-100k test requests (1 requests")
    assert r["requests"]["labelled"] >= 1


def test_the_fp16_variant_is_what_runs(fx):
    tight = json.loads(json.dumps(DEFAULT_POLICY))
    tight["fp16"].update(atol=1e-5, rtol=1e-5)  # FP32 arithmetic would pass this; FP16's does not
    r = api.validate_build(fx / "build", backends=["ort-fp16"], data=None, requests_file=fx / "requests.json",
                           n_requests=2, ckpt=fx / "ckpt", policy=tight)
    assert r["backends"]["ort-fp16"]["verdict"] == "fail"
    assert not r["backends"]["ort-fp16"]["graphs"]["candidate_scorer"]["logits"]["pass"]


def test_a_long_error_line_is_cut_at_300(fx, monkeypatch):
    class Broken:
        def encode_user(self, hist):
            raise ValueError("x" * 400 + "\nmore")

    monkeypatch.setattr(api, "_backend", lambda build, name, m: Broken())
    r = api.validate_build(fx / "build", backends=["torch-split"], data=None, requests_file=fx / "requests.json",
                           n_requests=1, ckpt=fx / "ckpt")
    assert r["backends"]["torch-split"]["error"] == "ValueError: " + "x" * 300
    assert r["backends"]["torch-split"]["note"] == ""


def test_the_bars_are_inclusive(fx, model, monkeypatch):
    from onetrans_trt.data.requests import load_requests

    reqs = load_requests(fx / "requests.json")
    labels = json.loads((fx / "labels.json").read_text())
    monkeypatch.setattr(api, "load_requests_for", lambda *a, **k: (reqs, labels, "fake"))
    first = api.validate_build(fx / "build", backends=["ort"], ckpt=fx / "ckpt")
    worst = max(abs(m["delta_auc"]) for m in first["backends"]["ort"]["end_to_end"]["metrics"].values())
    overlap = first["backends"]["ort"]["end_to_end"]["ranking"]["top10_overlap_mean"]
    policy = json.loads(json.dumps(DEFAULT_POLICY))
    policy["fp32"].update(max_delta_auc=worst, min_top10_overlap=overlap)  # exactly at both bars
    again = api.validate_build(fx / "build", backends=["ort"], ckpt=fx / "ckpt", policy=policy)
    assert again["backends"]["ort"]["verdict"] == "pass"


def test_the_scatter_keeps_600_points(fx, tmp_path):
    q = _reqs(fx)[0]
    q["candidates"] = (q["candidates"] * 60)[:310]
    path = tmp_path / "big.json"
    path.write_text(json.dumps([q]))
    r = api.validate_build(fx / "build", backends=["torch-split"], data=None, requests_file=path, ckpt=fx / "ckpt")
    ref, got = r["plots"]["torch-split"]["scatter"]
    assert len(ref) == len(got) == 600 and r["backends"]["torch-split"]["graphs"]["candidate_scorer"]["logits"][
        "count"] == 620


def test_goldens_cover_every_variant_present(fx, tmp_path):
    b = tmp_path / "b"
    shutil.copytree(fx / "build", b)
    shutil.copytree(b / "fp16", b / "int8")  # a stand-in int8 variant (the graphs only need to load)
    g = tmp_path / "g"
    api.validate_build(b, backends=["torch-split"], data=None, requests_file=fx / "requests.json", n_requests=1,
                       ckpt=fx / "ckpt", save_goldens=g)
    rep = api.validate_goldens(b, g)
    assert list(rep["backends"]) == ["ort", "ort-fp16", "ort-int8"]
    assert rep["backends"]["ort-int8"]["precision"] == "int8"


def test_inputs_missing_an_input_name_the_file(fx, model, tmp_path):
    path = _npz(fx, model, tmp_path, lambda a: a.pop("0/s_length"))
    with pytest.raises(InputError) as e:
        api.validate_build(fx / "build", backends=["ort"], inputs=path, ckpt=fx / "ckpt")
    assert str(e.value).startswith(f"--inputs {path}: request 0 lacks ")
