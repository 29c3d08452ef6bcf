"""The Ranker: split and unified backends agree on real MovieLens requests."""

import numpy as np
import pytest

from onetrans_trt.errors import InputError
from onetrans_trt.runtime.ranker import Ranker


def test_split_equals_unified_on_100_real_requests(movielens, tiny_ckpt):
    split = Ranker.load(tiny_ckpt, backend="torch-split")
    unified = Ranker.load(tiny_ckpt, backend="torch-unified")
    reqs = movielens.requests(100, n_candidates=50, seed=1)
    assert len(reqs) == 100
    worst = 0.0
    spread = []
    for req, _ in reqs:
        a, b = split.rank(req), unified.rank(req)
        assert a.logits.shape == (50, 2)
        worst = max(worst, float(np.abs(a.logits - b.logits).max()))
        spread.append(float(a.logits[:, 0].std()))
    assert worst <= 1e-5
    assert np.mean(spread) > 1e-3  # a trained model separates candidates


def test_chunking_does_not_change_scores(movielens, tiny_ckpt):
    req, _ = movielens.requests(1, n_candidates=37, seed=2)[0]
    full = Ranker.load(tiny_ckpt).rank(req)
    chunked = Ranker.load(tiny_ckpt, chunk_size=5).rank(req)
    assert np.abs(full.logits - chunked.logits).max() <= 1e-6
    out = full.to_json()
    assert sorted(out["order"]) == list(range(37))
    assert out["scores"]["like"][out["order"][0]] == max(out["scores"]["like"])


def test_empty_history_and_zero_candidates(movielens, tiny_ckpt):
    req, _ = movielens.requests(1, n_candidates=3, seed=3)[0]
    req.history = []
    r = Ranker.load(tiny_ckpt)
    a, b = r.rank(req), Ranker.load(tiny_ckpt, backend="torch-unified").rank(req)
    assert np.isfinite(a.logits).all() and np.abs(a.logits - b.logits).max() <= 1e-5
    req.candidates = []
    assert r.rank(req).logits.shape == (0, 2)


def test_unknown_backend(tiny_ckpt):
    with pytest.raises(InputError, match="unknown backend"):
        Ranker.load(tiny_ckpt, backend="tensorflow")


@pytest.mark.parametrize("backend", ["ort", "ort-int8-qdq"])
def test_a_build_named_by_a_relative_path_loads_every_variant(movielens, tiny_int8_build, monkeypatch, backend):
    """`convert builds/small` (a path relative to the working directory) once looked for
    builds/small/builds/small/fp16/...: a variant's graph path was joined to the build twice."""
    req, _ = movielens.requests(1, n_candidates=9, seed=4)[0]
    want = Ranker.load(tiny_int8_build, backend=backend).rank(req).logits
    monkeypatch.chdir(tiny_int8_build.parent.parent)
    rel = tiny_int8_build.relative_to(tiny_int8_build.parent.parent)
    got = Ranker.load(rel, backend=backend).rank(req).logits
    assert np.array_equal(got, want)
