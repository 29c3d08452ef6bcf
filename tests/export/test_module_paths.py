"""A module build records where its code and weights are, absolutely: later stages (validate,
convert, calibrate, bench) run from any working directory without --module."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[2]


def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "onetrans_trt.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd)


def test_relative_module_and_weights_are_recorded_absolutely(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(ROOT / "examples" / "fused_qkv_cls.py", work / "ranker.py")
    shutil.copy(ROOT / "examples" / "fused_qkv_cls.spec.json", work / "ranker.spec.json")
    sys.path.insert(0, str(work))
    try:
        import ranker  # the user's file, imported to save its weights

        torch.manual_seed(1)
        save_file(ranker.factory().state_dict(), str(work / "w.safetensors"))
    finally:
        sys.path.remove(str(work))
        sys.modules.pop("ranker", None)
    p = _cli("export", "--module", "ranker.py:factory", "--weights", "w.safetensors", "--spec", "ranker.spec.json",
             "--out", "build", cwd=work)
    assert p.returncode == 0, p.stderr[-2000:]
    m = json.loads((work / "build" / "manifest.json").read_text())
    assert m["checkpoint"]["module"] == f"{work / 'ranker.py'}:factory"
    assert m["checkpoint"]["weights"]["path"] == str(work / "w.safetensors")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    p = _cli("validate", work / "build", "--count", 4, cwd=elsewhere)
    assert p.returncode == 0 and "verdict: PASS" in p.stdout, p.stderr[-2000:]
