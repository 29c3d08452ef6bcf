"""The serving split must equal the unified model: the property everything rests on.

A seeded sweep over >= 100 random configurations (layers, width, heads, NS-token counts
and tokenizers, pyramid on/off/explicit, merge modes, 1-3 sequences, history lengths 0,
short, full and over the maximum, extra left padding on the unified side).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from onetrans_trt.data.requests import encode_request, pad_streams, repeat_history
from onetrans_trt.data.synthetic import synthetic_request, synthetic_schema
from onetrans_trt.models.config import ModelConfig
from onetrans_trt.models.onetrans import OneTrans

N_CONFIGS = 120


def _t(d):
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in d.items()}


def _randomize(model: torch.nn.Module, gen: torch.Generator, std: float = 0.25) -> None:  # noqa: D401
    """Random weights far from init (gains included), so masks and merges are exercised."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            base = 1.0 if name.endswith("norm1.weight") or name.endswith("norm2.weight") else 0.0
            p.copy_(base + std * torch.randn(p.shape, generator=gen))


def assert_split_equals_unified(model, cfg, req, extra_pad: int):
    """Split (encoder once, scorer over C) vs unified (history with ``extra_pad`` more left
    padding, repeated per candidate) <= 1e-5; returns the history tensors and the K/V."""
    hist, ns = encode_request(cfg.schema, req)
    c = len(req.candidates)
    width = hist["s_type"].shape[1] + extra_pad
    stream = {k: v[0, v.shape[1] - int(hist["s_length"][0]):] for k, v in hist.items() if k != "s_length"}
    padded = pad_streams(cfg.schema, [stream], length=width)
    with torch.no_grad():
        unified = model(_t({**repeat_history(padded, c), **ns}))
        kv = model.encode_user(_t(hist))
        split = model.score_candidates(kv, _t(ns))
    assert torch.isfinite(unified).all() and torch.isfinite(split).all()
    assert unified.shape == split.shape == (c, len(cfg.tasks))
    assert (unified - split).abs().max().item() <= 1e-5
    return hist, kv


def edge_request(schema, rng: np.random.Generator, max_history: int):
    """A request whose history is empty, one event, partial, full or over-long, with 1-6
    candidates, and 0-5 extra padding slots: the edges every split sweep covers."""
    n_hist = int(rng.choice([0, 1, int(rng.integers(0, max_history + 1)), max_history, max_history + 7]))
    req = synthetic_request(schema, rng, n_history=n_hist, n_candidates=int(rng.integers(1, 7)))
    return req, int(rng.integers(0, 6))


def random_case(seed: int):
    rng = np.random.default_rng(seed)
    max_history = int(rng.integers(1, 24))
    schema = synthetic_schema(max_history=max_history, n_sequences=int(rng.integers(1, 4)),
                              merge_mode=str(rng.choice(["timestamp_aware", "timestamp_agnostic"])),
                              emb_dim=int(rng.choice([2, 4, 8])), dense=bool(rng.integers(2)),
                              context=bool(rng.integers(2)))
    n_layers = int(rng.integers(1, 5))
    heads = int(rng.choice([1, 2, 4]))
    d = heads * int(rng.choice([2, 4, 8]))
    pyramid_kind = rng.choice(["off", "linear", "list"])
    if pyramid_kind == "list":
        counts = sorted(rng.integers(1, schema.s_max_len + 4, size=max(n_layers - 1, 0)).tolist(), reverse=True)
        pyramid: str | list[int] = [int(x) for x in counts]
    else:
        pyramid = str(pyramid_kind)
    tok = str(rng.choice(["auto_split", "group"]))
    cfg = ModelConfig(schema=schema, d_model=d, n_heads=heads, n_layers=n_layers,
                      ffn_mult=int(rng.integers(1, 3)), ns_tokenizer=tok, ns_tokens=int(rng.integers(1, 5)),
                      pyramid=pyramid, final_queries=int(rng.integers(1, 8)),
                      tasks=["a", "b"][: int(rng.integers(1, 3))])
    return (cfg, *edge_request(schema, rng, max_history))


@pytest.mark.parametrize("seed", range(N_CONFIGS))
def test_split_equals_unified(seed):
    cfg, req, extra_pad = random_case(seed)
    gen = torch.Generator().manual_seed(seed)
    model = OneTrans(cfg).eval()
    _randomize(model, gen)
    hist, kv = assert_split_equals_unified(model, cfg, req, extra_pad)
    # the K/V follow the pyramid: layer l holds what layer l-1 kept
    n = hist["s_type"].shape[1]
    sizes = [n]
    for q in cfg.query_schedule()[:-1]:
        sizes.append(sizes[-1] if q is None else min(q, sizes[-1]))
    assert [k.shape[2] for k in kv.keys] == sizes


def test_scores_depend_on_history_and_each_candidate_alone():
    schema = synthetic_schema(max_history=12)
    cfg = ModelConfig.from_preset("tiny", schema)
    model = OneTrans(cfg).eval()
    _randomize(model, torch.Generator().manual_seed(0))
    rng = np.random.default_rng(1)
    req = synthetic_request(schema, rng, n_history=8, n_candidates=4)
    hist, ns = encode_request(schema, req)
    with torch.no_grad():
        base = model.score_candidates(model.encode_user(_t(hist)), _t(ns))
        # changing the newest event changes every score
        req.history[-1]["item_id"] = (req.history[-1]["item_id"] + 1) % 500
        hist2, _ = encode_request(schema, req)
        moved = model.score_candidates(model.encode_user(_t(hist2)), _t(ns))
        assert ((moved - base).abs() > 1e-6).all()
        # changing candidate 2 changes only candidate 2
        ns2 = {k: v.copy() for k, v in ns.items()}
        ns2["ns_item_id"][2] = (ns2["ns_item_id"][2] + 3) % 500
        one = model.score_candidates(model.encode_user(_t(hist)), _t(ns2))
    diff = (one - base).abs().amax(dim=1)
    assert diff[2] > 1e-6 and diff[[0, 1, 3]].max() == 0


def test_sweep_covers_the_edges():
    """The random sweep really visits the cases the issue names."""
    seen = set()
    for seed in range(N_CONFIGS):
        cfg, req, _ = random_case(seed)
        n, mx = len(req.history), cfg.schema.max_history
        seen.add(("empty" if n == 0 else "over" if n > mx else "full" if n == mx else "part"))
        seen.add(("pyramid", cfg.pyramid if isinstance(cfg.pyramid, str) else "list"))
        seen.add((cfg.ns_tokenizer, cfg.schema.merge_mode))
        seen.add(("seqs", cfg.schema.num_sequences))
    for want in ["empty", "over", "full", "part", ("pyramid", "off"), ("pyramid", "linear"),
                 ("pyramid", "list"), ("seqs", 1), ("seqs", 3),
                 ("auto_split", "timestamp_aware"), ("group", "timestamp_agnostic")]:
        assert want in seen, want
