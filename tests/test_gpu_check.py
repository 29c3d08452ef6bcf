"""``make gpu-check`` runs here too: its CPU parts pass, every GPU part is skipped with its
reason (or, on a GPU host, passes)."""

import json
import os
import subprocess
import sys

import pytest


@pytest.mark.heavy  # the whole CPU part of make gpu-check (~45 s)
def test_gpu_check_runs_its_cpu_parts_and_says_what_it_skipped(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    p = subprocess.run([sys.executable, "-m", "onetrans_trt.gpu_check", "--json", str(tmp_path / "r.json")],
                       capture_output=True, text=True, env=env, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    lines = p.stdout.splitlines()
    assert lines[0] == "== onetrans-trt gpu-check: versions =="
    assert any(line.strip().startswith("torch") for line in lines[:15])  # versions come first
    assert any(line.strip().startswith("tensorrt") for line in lines[:15])
    res = json.loads((tmp_path / "r.json").read_text())
    assert len(res["parts"]) == 6 and res["ok"]
    by = {r["part"]: r for r in res["parts"]}
    assert by["(a) kernels: AOT compile, PTX ISA cap, launch ABI"]["status"] == "ok"
    # every op, TailCausalAttention in both modes: 5 variants x fp32/fp16 x head sizes 8 and 64
    assert by["(a) kernels: AOT compile, PTX ISA cap, launch ABI"]["detail"].startswith("20 kernels for sm_"), by
    assert by["(c) tiny preset: export, ORT CPU vs PyTorch"]["status"] == "ok"
    import torch

    for r in res["parts"]:
        if r["status"] == "skipped":
            assert r["detail"], r  # a reason, always
            if not torch.cuda.is_available():
                assert "GPU" in r["detail"] or "tensorrt" in r["detail"] or "CUDA" in r["detail"], r
        assert f"[{r['status']}] {r['part']}: " in p.stdout
    assert f"== gpu-check: {res['counts']['ok']} ok, {res['counts']['skipped']} skipped, 0 failed ==" in p.stdout


def test_every_op_and_mode_gets_a_one_node_engine_as_fuse_attention_writes_it(tmp_path):
    """The variants (b) builds engines for: every op, TailCausalAttention with causal 1 and 0; each
    node carries every attribute its plugin registers (TensorRT has no defaults) and the inputs
    (b) feeds it are the op's, with the shapes the reference accepts."""
    import math

    import numpy as np
    import onnx

    from onetrans_trt import gpu_check
    from onetrans_trt.plugins import OPS

    variants = gpu_check._variants()
    assert sorted((op, tuple(sorted(a.items()))) for op, a in variants) == sorted(
        [(op, ()) for op in OPS if op != "TailCausalAttention"]
        + [("TailCausalAttention", (("causal", 0),)), ("TailCausalAttention", (("causal", 1),))])
    rng = np.random.default_rng(0)
    for op, attrs in variants:
        args = next(iter(gpu_check._cases(op, 16, rng)))
        path = tmp_path / f"{gpu_check._label(op, attrs)}.onnx"
        gpu_check._one_node_onnx(op, args, "float32", path, attrs)
        node = onnx.load(str(path)).graph.node[0]
        got = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        registered = __import__(OPS[op].package, fromlist=["x"]).PLUGIN_ATTRIBUTES
        assert set(got) == {*registered, "plugin_namespace", "aot"}, (op, got)
        assert got["scale"] == np.float32(1 / math.sqrt(16)) and got.get("causal", 1) == attrs.get("causal", 1)
        assert list(node.input) == gpu_check._inputs(op)
        out = OPS[op].module("reference").reference(*args, **attrs)
        assert out.shape == args[0].shape and bool(out.isfinite().all())
