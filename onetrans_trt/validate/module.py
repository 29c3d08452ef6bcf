"""Validate a build exported from a user's module (``export --module``): ONNX Runtime's split
path (user encoder, then the scorer over one user's state) against the module's own unified
forward, on the user's inputs or on random ones drawn from the spec."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np

from onetrans_trt.errors import BuildError, ValidationFailed
from onetrans_trt.protocol import SplitSpec, random_inputs, unified_inputs

ATOL = 1e-4  # fp32, the bar: ORT scores equal the module's unified forward within 1e-4


def read_spec(build: str | Path) -> SplitSpec:
    from onetrans_trt.export.api import read_manifest

    m = read_manifest(build)
    if "protocol" not in m:
        raise BuildError(f"{build}: not exported from a module (no protocol in the manifest)")
    return SplitSpec.parse(m["protocol"]["spec"], f"{build}/manifest.json protocol.spec")


def cases(spec: SplitSpec, count: int, *, seed: int = 0, max_candidates: int = 300) -> list[tuple[str, dict, dict]]:
    """``count`` single-user cases: histories 0, 1, full and over-long in turn, candidate counts
    spread over 1..max_candidates."""
    rng = np.random.default_rng(seed)
    hmax = spec.history.max
    lengths = [0, 1, hmax, hmax + 7]
    out = []
    for i in range(count):
        n = lengths[i % 4] if i < 8 else int(rng.integers(0, hmax + 8))
        c = [1, 2, max_candidates][i % 3] if i < 3 else int(rng.integers(1, max_candidates + 1))
        user, cand = random_inputs(spec, users=1, candidates=c, lengths=[n], rng=rng)
        out.append((f"history {n}, {c} candidates", user, cand))
    return out


def validate_module_build(build: str | Path, module, *, count: int = 50, inputs: tuple[dict, dict] | None = None,
                          seed: int = 0, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """ORT split vs ``module``'s unified forward; raises :class:`ValidationFailed` past ``ATOL``."""
    import torch

    from onetrans_trt.kv import from_state, state_arrays
    from onetrans_trt.runtime.ort_backend import OrtSplitBackend

    say = progress or (lambda msg: None)
    spec = read_spec(build)
    be = OrtSplitBackend(build)
    module = module.float().eval()
    todo = [("given inputs", *inputs)] if inputs is not None else cases(spec, count, seed=seed)
    rows, worst = [], 0.0
    for k, (name, user, cand) in enumerate(todo):
        users = next(iter(user.values())).shape[0]
        full = state_arrays(be.encode_user({n: v.numpy() for n, v in user.items()}))
        for u in range(users):
            one = from_state({n: np.asarray(v)[u:u + 1] for n, v in full.items()}, None)
            got = be.score(one, {n: v.numpy() for n, v in cand.items()})
            with torch.no_grad():
                want = module(unified_inputs(user, cand, u)).numpy()
            err = float(np.abs(got - want).max()) if want.size else 0.0
            worst = max(worst, err)
            rows.append({"case": name, "user": u, "candidates": int(want.shape[0]), "max_abs": err})
            if err > ATOL * max(1.0, float(np.abs(want).max())):
                raise ValidationFailed(f"{build}: ORT split differs from the module's unified forward by {err:.3g} "
                                       f"on {name} (user {u}); tolerance {ATOL:g}")
        if (k + 1) % 10 == 0:
            say(f"{k + 1}/{len(todo)} cases, worst {worst:.2e}")
    from onetrans_trt.export.api import read_manifest
    from onetrans_trt.provenance import graph_hashes, provenance

    return {"build": str(build), "data": "given inputs" if inputs is not None else f"random from the spec ({len(todo)} cases)",
            "cases": len(rows), "max_abs": worst, "tolerance": ATOL, "rows": rows, "ok": True,
            "provenance": provenance(graph_hashes(read_manifest(build)))}
