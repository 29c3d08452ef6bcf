"""A tiny random-weight build for the validate/ unit tests, exported once and cached on disk.

``tiny_random_build()`` returns a directory with ``ckpt/`` (the tiny preset, random weights,
seed 0), ``build/`` (exported, plus the FP16 variant), ``requests.json`` (a few MovieLens
requests with few candidates, one with no history and one with no candidates) and
``labels.json`` (their labels). The cache sits under ``runs/test-cache/`` of the tree the tests
run from, keyed by a hash of the package's sources outside ``validate/`` (what the build depends
on) and the torch version: ``make test`` builds it once (~40 s) and mutation runs reuse it in
every mutant (validate/ is what they mutate, and it is not part of the key).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("ONETRANS_TRT_TEST_CACHE") or ROOT / "runs" / "test-cache")  # tools/mutation.py
# points its scratch copies at the working tree's cache (the key says which sources a build is of)


def _key() -> str:
    import torch

    import onetrans_trt

    pkg = Path(onetrans_trt.__file__).resolve().parent
    h = hashlib.sha256(torch.__version__.encode())
    for f in sorted(pkg.rglob("*.py")):
        rel = f.relative_to(pkg).as_posix()
        if rel.startswith("validate/"):
            continue
        h.update(rel.encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def _make(dest: Path) -> None:
    import warnings

    import torch

    from onetrans_trt.calibrate.fp16 import convert_build
    from onetrans_trt.data.movielens import TASKS, MovieLens
    from onetrans_trt.export.api import export_build
    from onetrans_trt.models.checkpoint import build_model, save_checkpoint
    from onetrans_trt.models.config import ModelConfig

    ml = MovieLens()
    cfg = ModelConfig.from_preset("tiny", ml.schema, tasks=list(TASKS))
    torch.manual_seed(0)
    save_checkpoint(build_model(cfg).eval(), dest / "ckpt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_build(dest / "ckpt", dest / "build")
        convert_build(dest / "build")
    pairs = ml.requests(5, n_candidates=6, seed=5)
    reqs = [r.to_json() for r, _ in pairs]
    labels = [[None if x is None else [float(v) for v in np.asarray(x).reshape(-1)] for x in lab]
              for _, lab in pairs]
    reqs[1]["history"] = []  # a new user
    reqs[2]["candidates"] = []  # nothing to score
    labels[2] = []
    (dest / "requests.json").write_text(json.dumps(reqs))
    (dest / "labels.json").write_text(json.dumps(labels))


def _cached(prefix: str, key: str, make) -> Path:
    d = CACHE / f"{prefix}-{key}"
    if (d / "done").is_file():
        return d
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / f"{prefix}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (d / "done").is_file():
            tmp = CACHE / f".tmp-{prefix}-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            make(tmp)
            (tmp / "done").write_text("ok\n")
            shutil.rmtree(d, ignore_errors=True)
            os.replace(tmp, d)  # builds of other sources stay (a mutation run may be using one); make clean
    return d


def tiny_random_build() -> Path:
    return _cached("validate", _key(), _make)


EXAMPLE = ROOT / "examples" / "fused_qkv_cls.py"


def example_module():
    """``examples/fused_qkv_cls.py`` imported (its ``factory()`` gives the same weights every time)."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("ex_fused_qkv_cls_unit", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def _make_module(dest: Path) -> None:
    import warnings

    from onetrans_trt.export.module import export_module

    mod = example_module()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_module(mod.factory(), mod.SPEC, mod.example_inputs(), dest / "build")


def module_build() -> Path:
    """``examples/fused_qkv_cls.py`` exported with ``export --module`` (cached like the above)."""
    key = hashlib.sha256((_key() + EXAMPLE.read_text()).encode()).hexdigest()[:16]
    return _cached("module", key, _make_module) / "build"


import numpy as np  # noqa: E402  (used by _make; imported last to keep the module's top light)
