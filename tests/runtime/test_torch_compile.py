"""The torch.compile peer (``torch-compile``, ``torch-compile-static``): the same split as
``torch-split`` through inductor, so ``bench`` can put what a PyTorch user would try first next
to ours. Its scores must be the eager split's (<= 1e-4) on real requests of different sizes."""

from __future__ import annotations

import numpy as np
import pytest

from onetrans_trt.runtime.ranker import Ranker

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.heavy  # inductor compiles (dynamic shapes: ~70 s on the 2 cores)
def test_torch_compile_scores_equal_the_eager_split(movielens, tiny_ckpt):
    eager = Ranker.load(tiny_ckpt, backend="torch-split")
    compiled = Ranker.load(tiny_ckpt, backend="torch-compile")
    assert compiled.backend_name == "torch-compile" and compiled.backend.dynamic
    # several C and history lengths through one dynamic compile; the first request has a long history
    reqs = movielens.requests(4, n_candidates=64, seed=11)
    assert len({len(r.history) for r, _ in reqs}) > 1  # histories of different lengths
    for (req, _), c in zip(reqs, (23, 5, 64, 1)):
        req.candidates = req.candidates[:c]
        a, b = eager.rank(req).logits, compiled.rank(req).logits
        assert a.shape == b.shape and np.isfinite(b).all()
        assert np.abs(a - b).max() <= 1e-4


@pytest.mark.heavy  # an inductor compile, ~20 s
def test_torch_compile_static_is_the_per_shape_variant(movielens, tiny_ckpt):
    req, _ = movielens.requests(1, n_candidates=9, seed=12)[0]
    static = Ranker.load(tiny_ckpt, backend="torch-compile-static")
    assert static.backend_name == "torch-compile-static" and not static.backend.dynamic
    want = Ranker.load(tiny_ckpt, backend="torch-split").rank(req).logits
    assert np.abs(static.rank(req).logits - want).max() <= 1e-4


def test_an_unknown_checkpoint_backend_names_the_compile_ones(tiny_ckpt):
    from onetrans_trt.errors import InputError

    with pytest.raises(InputError, match="torch-compile"):
        Ranker.load(tiny_ckpt, backend="torch-jit")
