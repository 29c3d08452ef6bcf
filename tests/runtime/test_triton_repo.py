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
