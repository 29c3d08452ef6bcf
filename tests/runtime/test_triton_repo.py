"""serve-repo: every config.pbtxt parses with Triton's ModelConfig protobuf and matches the
build's graphs; the ensemble wires the user encoder's K/V into the scorer."""

from __future__ import annotations

import json
import subprocess
import sys

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2


def _parse(path):
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def test_repository_configs_parse_and_match_the_build(tiny_build, tmp_path):
    repo = tmp_path / "repo"
    p = subprocess.run([sys.executable, "-m", "onetrans_trt.cli", "serve-repo", str(tiny_build), "--out", str(repo),
                        "--json"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-1500:]
    assert json.loads(p.stdout)["models"] == ["candidate_scorer", "onetrans", "user_encoder"]
    manifest = json.loads((tiny_build / "manifest.json").read_text())
    ue = _parse(repo / "user_encoder" / "config.pbtxt")
    assert ue.platform == "onnxruntime_onnx" and ue.max_batch_size == 64 and ue.HasField("dynamic_batching")
    assert [i.name for i in ue.input] == [s["name"] for s in manifest["graphs"]["user_encoder"]["inputs"]]
    cs = _parse(repo / "candidate_scorer" / "config.pbtxt")
    assert cs.max_batch_size == 0 and {o.name for o in cs.output} == {"logits", "probs"}
    k0 = next(i for i in cs.input if i.name == "user_k_0")
    assert list(k0.dims) == [1, 2, -1, 8] and k0.data_type == model_config_pb2.TYPE_FP32
    ens = _parse(repo / "onetrans" / "config.pbtxt")
    steps = ens.ensemble_scheduling.step
    assert [s.model_name for s in steps] == ["user_encoder", "candidate_scorer"]
    assert set(steps[0].output_map) == set(steps[1].input_map) - {n for n in steps[1].input_map if n.startswith("ns_")} - {"s_length"}
    assert (repo / "candidate_scorer" / "1" / "model.onnx").read_bytes() == (tiny_build / "candidate_scorer.onnx").read_bytes()


def test_tensorrt_repository_needs_engines(tiny_build, tmp_path):
    p = subprocess.run([sys.executable, "-m", "onetrans_trt.cli", "serve-repo", str(tiny_build), "--out",
                        str(tmp_path / "r"), "--backend", "tensorrt"], capture_output=True, text=True)
    assert p.returncode == 2 and "onetrans-trt build" in p.stderr and not (tmp_path / "r").exists()


def test_configs_are_messages_with_instances_batch_sizes_versions_and_warmup_from_real_samples(tiny_build, tmp_path):
    """Instance count, preferred batch sizes, the latest version only, and a warmup whose raw
    files hold the build's first sample exactly (the config's dtype and dims, row-major)."""
    import numpy as np

    from onetrans_trt.runtime.triton_repo import model_config, render

    repo = tmp_path / "repo"
    p = subprocess.run([sys.executable, "-m", "onetrans_trt.cli", "serve-repo", str(tiny_build), "--out", str(repo),
                        "--instances", "3", "--preferred-batch-sizes", "4,8"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-1500:]
    sample = np.load(tiny_build / "samples" / "samples.npz")
    for role in ("user_encoder", "candidate_scorer"):
        cfg = _parse(repo / role / "config.pbtxt")
        assert [(g.count, g.kind) for g in cfg.instance_group] == [(3, model_config_pb2.ModelInstanceGroup.KIND_AUTO)]
        assert cfg.version_policy.latest.num_versions == 1
        [w] = cfg.model_warmup
        assert w.batch_size == (1 if role == "user_encoder" else 0) and set(w.inputs) == {i.name for i in cfg.input}
        for name, inp in w.inputs.items():
            want = sample[f"0/{name}"]
            got = np.fromfile(repo / role / "warmup" / inp.input_data_file, dtype=want.dtype)
            assert got.size == int(np.prod(list(inp.dims))) * (1 if role == "candidate_scorer" else 1)
            assert np.array_equal(got, want.reshape(-1)), name
            conf = next(i for i in cfg.input if i.name == name)
            assert inp.data_type == conf.data_type and len(inp.dims) == len(conf.dims)
            assert all(d == c for d, c in zip(inp.dims, conf.dims) if c > 0)
    ue = _parse(repo / "user_encoder" / "config.pbtxt")
    assert list(ue.dynamic_batching.preferred_batch_size) == [4, 8]
    assert not _parse(repo / "candidate_scorer" / "config.pbtxt").HasField("dynamic_batching")
    # the text is what text_format writes for the message, and parses back to it
    m = model_config("m", "onnxruntime_onnx", [{"name": "a", "type": "TYPE_INT64", "dims": [1], "reshape": []}],
                     [{"name": "y", "type": "TYPE_FP32", "dims": [-1], "reshape": None}], 4, True, parameters={"k": "v"})
    assert text_format.Parse(render(m, "two\nlines"), model_config_pb2.ModelConfig()) == m
    assert render(m, "two\nlines").startswith("# two\n# lines\n")
    assert m.input[0].HasField("reshape") and list(m.input[0].reshape.shape) == []


def test_config_options_are_refused_before_anything_is_written(tiny_build, tmp_path):
    for args, what in ((["--preferred-batch-sizes", "0,8"], "user_encoder batches 1..64"),
                       (["--preferred-batch-sizes", "65"], "user_encoder batches 1..64"),
                       (["--preferred-batch-sizes", "4,x"], "comma-separated integers"),
                       (["--instances", "0"], "--instances")):
        p = subprocess.run([sys.executable, "-m", "onetrans_trt.cli", "serve-repo", str(tiny_build), "--out",
                            str(tmp_path / "r"), *args], capture_output=True, text=True)
        assert p.returncode == 2 and what in p.stderr and "Traceback" not in p.stderr, p.stderr
        assert not (tmp_path / "r").exists()


def test_ort_accelerator_is_the_onnxruntime_backends_tensorrt_provider(tiny_build, tmp_path):
    """Written as the onnxruntime backend reads it (parsed here; no GPU to serve it on)."""
    p = subprocess.run([sys.executable, "-m", "onetrans_trt.cli", "serve-repo", str(tiny_build), "--out",
                        str(tmp_path / "r"), "--ort-accelerator", "tensorrt-fp16"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-1500:]
    for role in ("user_encoder", "candidate_scorer"):
        [acc] = _parse(tmp_path / "r" / role / "config.pbtxt").optimization.execution_accelerators \
            .gpu_execution_accelerator
        assert acc.name == "tensorrt" and dict(acc.parameters) == {"precision_mode": "FP16",
                                                                    "max_workspace_size_bytes": str(1 << 30)}
    assert not _parse(tmp_path / "r" / "onetrans" / "config.pbtxt").HasField("optimization")
    p = subprocess.run([sys.executable, "-m", "onetrans_trt.cli", "serve-repo", str(tiny_build), "--out",
                        str(tmp_path / "r2"), "--backend", "python", "--ort-accelerator", "tensorrt"],
                       capture_output=True, text=True)
    assert p.returncode == 2 and "--ort-accelerator does not apply to --backend python" in p.stderr
    assert not (tmp_path / "r2").exists()
