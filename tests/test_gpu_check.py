"""``make gpu-check`` runs here too: its CPU parts pass, every GPU part is skipped with its
reason (or, on a GPU host, passes)."""

import json
import os
import subprocess
import sys


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
    assert by["(c) tiny preset: export, ORT CPU vs PyTorch"]["status"] == "ok"
    import torch

    for r in res["parts"]:
        if r["status"] == "skipped":
            assert r["detail"], r  # a reason, always
            if not torch.cuda.is_available():
                assert "GPU" in r["detail"] or "tensorrt" in r["detail"] or "CUDA" in r["detail"], r
        assert f"[{r['status']}] {r['part']}: " in p.stdout
    assert f"== gpu-check: {res['counts']['ok']} ok, {res['counts']['skipped']} skipped, 0 failed ==" in p.stdout
