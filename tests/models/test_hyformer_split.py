"""HyFormer: the split (user encoder once, candidate scorer over C) equals the unified
forward, over >= 100 seeded random configurations: all three sequence encoders, 1-3
sequences, both NS tokenizers, 1-3 queries per sequence, histories empty / partial / full
/ over the maximum, extra left padding on the unified side, sequences left empty; and every HyFormer form option (sink or none, K/V norm or none, causal
or bidirectional sequence attention, query generation over all pools or the own one, heads
over queries and NS tokens or queries only). Each config also runs from each sequence's own
inputs (``s<j>_*``, what the exported graphs read, with extra left padding): the same state
and scores as from the merged stream.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from onetrans_trt.data.requests import encode_request, split_sequences
from onetrans_trt.data.synthetic import synthetic_request, synthetic_schema
from onetrans_trt.errors import ConfigError
from onetrans_trt.models.config import ModelConfig
from onetrans_trt.models.hyformer import SEQ_LENGTH, SEQ_POOL, HyFormer
from tests.models.test_split_exactness import _randomize, _t, assert_split_equals_unified, edge_request

N_CONFIGS = 105


def random_case(seed: int):
    rng = np.random.default_rng(10_000 + seed)
    max_history = int(rng.integers(1, 24))
    n_seq = int(rng.integers(1, 4))
    schema = synthetic_schema(max_history=max_history, n_sequences=n_seq,
                              merge_mode=str(rng.choice(["timestamp_aware", "timestamp_agnostic"])),
                              emb_dim=int(rng.choice([2, 4, 8])), dense=bool(rng.integers(2)),
                              context=bool(rng.integers(2)))
    heads = int(rng.choice([1, 2]))
    n_q = int(rng.integers(1, 4))
    tok = str(rng.choice(["auto_split", "group"]))
    if tok == "group":
        m = len(ModelConfig(schema=schema, d_model=8, n_heads=1, ns_tokenizer="group").resolved_ns_groups())
    else:
        m = int(rng.integers(1, 5))
    per = np.random.default_rng(20_000 + seed)  # per-sequence settings (its own draws: the others stay as they were)
    seq = {}
    if per.integers(2):
        seq["seq_queries"] = [int(x) for x in per.integers(1, 4, size=n_seq)]
    if per.integers(2):
        seq["seq_encoders"] = [str(x) for x in per.choice(["transformer", "longer", "swiglu"], size=n_seq)]
    if per.integers(2):
        seq["seq_windows"] = [int(x) for x in per.integers(1, 8, size=n_seq)]
    if per.integers(2):
        seq["seq_max_len"] = [int(x) for x in per.integers(1, max_history + 4, size=n_seq)]
    t = sum(seq.get("seq_queries", [n_q] * n_seq)) + m
    d = t * heads * int(rng.choice([1, 2]))  # T chunks per token, H heads
    cfg = ModelConfig(schema=schema, family="hyformer", d_model=d, n_heads=heads,
                      n_layers=int(rng.integers(1, 4)), ffn_mult=int(rng.integers(1, 3)), ns_tokenizer=tok,
                      ns_tokens=m, hy_queries=n_q, seq_encoder=str(rng.choice(["transformer", "longer", "swiglu"])),
                      longer_window=int(rng.integers(1, 8)), tasks=["a", "b"][: int(rng.integers(1, 3))],
                      seq_attention=str(rng.choice(["bidirectional", "causal"])), hy_sink=bool(rng.integers(2)),
                      hy_kv_norm=bool(rng.integers(2)), hy_query_gen=str(rng.choice(["all_pools", "own_pool"])),
                      hy_head_input=str(rng.choice(["queries_ns", "queries"])), **seq)
    return (cfg, *edge_request(schema, rng, max_history))


@pytest.mark.parametrize("seed", range(N_CONFIGS))
def test_hyformer_split_equals_unified(seed):
    cfg, req, extra_pad = random_case(seed)
    model = HyFormer(cfg).eval()
    _randomize(model, torch.Generator().manual_seed(seed))
    hist, kv = assert_split_equals_unified(model, cfg, req, extra_pad)
    # each sequence on its own (what the graphs read), with extra left padding: the same state and scores
    own = {k: np.pad(v, ((0, 0), (extra_pad, 0))) if v.ndim == 2 else v
           for k, v in split_sequences(cfg.schema, hist).items()}
    _, ns = encode_request(cfg.schema, req)
    with torch.no_grad():
        kv_own = model.encode_user(_t(own))
        got, want = model.score_candidates(kv_own, _t(ns)), model.score_candidates(kv, _t(ns))
    assert torch.equal(kv_own.extras[SEQ_LENGTH], kv.extras[SEQ_LENGTH])
    assert (kv_own.extras[SEQ_POOL] - kv.extras[SEQ_POOL]).abs().max().item() <= 1e-6
    assert (got - want).abs().max().item() <= 1e-5
    j = cfg.schema.num_sequences
    assert len(kv.keys) == cfg.n_layers * j
    # each sequence's real length is what the request holds (newest s_max_len events kept)
    kept = [ev["sequence"] for ev in sorted(req.history, key=lambda e: e["timestamp"])][-cfg.schema.max_history:]
    want = [min(sum(1 for s in kept if s == seq.name), cfg.hy_seq(j)["max_len"] or cfg.schema.max_history)
            for j, seq in enumerate(cfg.schema.sequences)]
    if len(req.history) <= cfg.schema.max_history:  # ties in time may reorder which are kept
        assert kv.extras[SEQ_LENGTH][0].tolist() == want
    assert kv.extras[SEQ_POOL].shape == (1, j, cfg.d_model)


def test_sweep_covers_the_edges():
    seen = set()
    for seed in range(N_CONFIGS):
        cfg, req, _ = random_case(seed)
        n, mx = len(req.history), cfg.schema.max_history
        seen.add("empty" if n == 0 else "over" if n > mx else "full" if n == mx else "part")
        seen.add(("enc", cfg.seq_encoder))
        seen.add(("seqs", cfg.schema.num_sequences))
        seen.add(cfg.ns_tokenizer)
        seen.add(("queries", cfg.hy_queries))
        for opt in ("seq_attention", "hy_sink", "hy_kv_norm", "hy_query_gen", "hy_head_input"):
            seen.add((opt, getattr(cfg, opt)))
        for opt in ("seq_queries", "seq_encoders", "seq_windows", "seq_max_len"):
            vals = getattr(cfg, opt)
            if vals is not None and len(set(vals)) > 1:
                seen.add((opt, "differ per sequence"))
        caps = cfg.seq_max_len or []
        counts = [sum(1 for ev in req.history[-mx:] if ev["sequence"] == q.name) for q in cfg.schema.sequences]
        if any(c > cap for c, cap in zip(counts, caps)):
            seen.add(("seq_max_len", "drops a sequence's oldest events"))
        kept = {ev["sequence"] for ev in sorted(req.history, key=lambda e: e["timestamp"])[-mx:]}
        if any(seq.name not in kept for seq in cfg.schema.sequences):  # an empty sequence
            seen.add(("empty sequence", "sink" if cfg.hy_sink else "no sink (decodes to nothing)"))
    for want in ["empty", "over", "full", "part", ("enc", "transformer"), ("enc", "longer"), ("enc", "swiglu"),
                 ("seqs", 1), ("seqs", 2), ("seqs", 3), "auto_split", "group", ("queries", 1), ("queries", 3),
                 ("seq_attention", "bidirectional"), ("seq_attention", "causal"), ("hy_sink", True),
                 ("hy_sink", False), ("hy_kv_norm", True), ("hy_kv_norm", False), ("hy_query_gen", "all_pools"),
                 ("hy_query_gen", "own_pool"), ("hy_head_input", "queries_ns"), ("hy_head_input", "queries"),
                 ("empty sequence", "sink"), ("empty sequence", "no sink (decodes to nothing)"),
                 ("seq_queries", "differ per sequence"), ("seq_encoders", "differ per sequence"),
                 ("seq_windows", "differ per sequence"), ("seq_max_len", "differ per sequence"),
                 ("seq_max_len", "drops a sequence's oldest events")]:
        assert want in seen, want


def test_each_sequence_is_kept_apart_and_each_candidate_alone():
    schema = synthetic_schema(max_history=12, n_sequences=2)
    cfg = ModelConfig.from_preset("tiny", schema, family="hyformer")
    model = HyFormer(cfg).eval()
    _randomize(model, torch.Generator().manual_seed(0))
    req = synthetic_request(schema, np.random.default_rng(3), n_history=10, n_candidates=4)
    hist, ns = encode_request(schema, req)
    with torch.no_grad():
        kv = model.encode_user(_t(hist))
        base = model.score_candidates(kv, _t(ns))
        # an event of sequence 0 changes sequence 0's K/V only
        i = next(k for k, ev in enumerate(req.history) if ev["sequence"] == schema.sequences[0].name)
        req.history[i]["item_id"] = (req.history[i]["item_id"] + 1) % 500
        kv2 = model.encode_user(_t(encode_request(schema, req)[0]))
        for l in range(cfg.n_layers):
            assert not torch.equal(kv.keys[2 * l], kv2.keys[2 * l])
            assert torch.equal(kv.keys[2 * l + 1], kv2.keys[2 * l + 1])
        ns2 = {k: v.copy() for k, v in ns.items()}
        ns2["ns_item_id"][2] = (ns2["ns_item_id"][2] + 3) % 500
        one = model.score_candidates(kv, _t(ns2))
    diff = (one - base).abs().amax(dim=1)
    assert diff[2] > 1e-6 and diff[[0, 1, 3]].max() == 0


def test_presets_and_bad_configs():
    from onetrans_trt.data.movielens import SEQUENCES

    schema = synthetic_schema(max_history=8, n_sequences=3)
    for preset in ("tiny", "small", "hyformer-paper"):
        cfg = ModelConfig.from_preset(preset, schema, family="hyformer")
        assert cfg.schema.num_sequences * cfg.hy_queries + cfg.num_ns_tokens == {"hyformer-paper": 16}.get(preset, 8)
    assert len(SEQUENCES) == 3  # MovieLens: 13 NS + 3 global = 16 in the paper preset
    with pytest.raises(ConfigError, match="divisible"):
        ModelConfig(schema=schema, family="hyformer", d_model=16, n_heads=2, ns_tokens=2)  # T = 5
    with pytest.raises(ConfigError, match="seq_encoder"):
        ModelConfig(schema=schema, family="hyformer", d_model=16, n_heads=2, ns_tokens=5, seq_encoder="lstm")
