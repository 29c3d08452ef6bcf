"""The candidate scorer keeps its NS stream token-major (``[T, C, d]``): every per-NS-token
projection is one batched product with no transposes around it (issue "CPU serving at the
machine's limit", the scorer layout). It must compute what the candidate-major layer computes:
here the layer as it was written before (NS stream ``[C, T, d]``, each MixedLinear transposing
in and out) is the reference, on random layers with biased FFNs, empty, padded and full
histories."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from onetrans_trt.data.synthetic import synthetic_schema
from onetrans_trt.models.attention import merge_heads, shared_prefix_attention, split_heads
from onetrans_trt.models.config import ModelConfig
from onetrans_trt.models.onetrans import OneTrans


def candidate_major(layer, x_ns, k_s, v_s, length):
    """OneTransLayer.score_ns as it was: ``[C, T, d]`` in and out."""
    h = layer.n_heads
    hns = layer.ns_norm1(x_ns)
    q = split_heads(layer.ns_q(hns), h)
    k, v = split_heads(layer.ns_k(hns), h), split_heads(layer.ns_v(hns), h)
    o = shared_prefix_attention(q, k_s, v_s, length, k, v)
    return layer.ns_update(x_ns, merge_heads(o))


@pytest.mark.parametrize("seed", range(6))
def test_token_major_layer_equals_the_candidate_major_layer(seed):
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    schema = synthetic_schema(max_history=int(rng.integers(1, 30)), n_sequences=int(rng.integers(1, 3)))
    cfg = ModelConfig.from_preset("tiny", schema, n_heads=int(rng.choice([1, 2, 4])))
    model = OneTrans(cfg).eval()
    for p in model.parameters():  # every gain, bias and weight away from its initial value
        torch.nn.init.normal_(p, std=0.3)
    layer = model.layers[0]
    c, t, d, h = int(rng.integers(1, 9)), cfg.num_ns_tokens, cfg.d_model, cfg.n_heads
    n = int(rng.integers(0, 12))
    x = torch.randn(c, t, d)
    k_s, v_s = torch.randn(1, h, n, d // h), torch.randn(1, h, n, d // h)
    for valid in {0, n // 2, n, n + 3}:
        length = torch.tensor([valid])
        with torch.no_grad():
            want = candidate_major(layer, x, k_s, v_s, length)
            got = layer.score_ns(x.transpose(0, 1), k_s, v_s, length).transpose(0, 1)
        assert got.shape == want.shape == (c, t, d)
        assert torch.isfinite(got).all()
        assert (got - want).abs().max() <= 1e-5 * max(1.0, float(want.abs().max()))
