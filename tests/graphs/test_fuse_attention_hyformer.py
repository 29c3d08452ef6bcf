"""fuse-attention on HyFormer graphs: every sequence encoder's self-attention becomes
TailCausalAttention with its sequence's real count (computed in the graph) as the valid
length (``causal=0`` for the paper's bidirectional encoders, 1 for causal ones; full and
LONGER encoders), every query decoding becomes SharedDecodeAttention (a learned sink joins
the K/V as one more key, always real); the
fused graphs, run by ORT through the ops' function bodies, equal the unfused ones on users
with full, partial and empty histories and with one sequence empty."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
import torch

from onetrans_trt.data.requests import encode_events, encode_request, merge_stream, pad_streams, sequence_input_names, split_sequences
from onetrans_trt.data.synthetic import synthetic_request, synthetic_schema
from onetrans_trt.export.api import SCORER_PASSES, USER_PASSES, _example, trace_onnx
from onetrans_trt.export.serving import ServingGraph, state_output_names
from onetrans_trt.graphs import run_passes
from onetrans_trt.graphs.fuse_attention import count_fused
from onetrans_trt.graphs.split_kv import candidate_scorer, user_encoder
from onetrans_trt.kv import UserKV
from onetrans_trt.models.config import ModelConfig
from onetrans_trt.models.hyformer import SEQ_LENGTH, SEQ_POOL, HyFormer
from onetrans_trt.plugins import DOMAIN, attach_op_functions
from tests.helpers import ort_run, randomize

LAYERS = 1
FORMS = {  # two sequences: a full-attention encoder and a LONGER one (window 3) in each form
    "paper": dict(seq_attention="bidirectional", hy_sink=False, hy_kv_norm=False, hy_query_gen="all_pools",
                  seq_encoders=["transformer", "longer"]),
    "wave1": dict(seq_attention="causal", hy_sink=True, hy_kv_norm=True, hy_query_gen="own_pool",
                  seq_encoders=["longer", "transformer"]),
}


def _model(form: str) -> HyFormer:
    schema = synthetic_schema(max_history=16, n_sequences=2)
    cfg = ModelConfig(schema=schema, family="hyformer", d_model=24, n_heads=2, n_layers=LAYERS, ns_tokens=2,
                      hy_queries=2, longer_window=3, seq_max_len=[8, 16], **FORMS[form])
    torch.manual_seed(0)
    return randomize(HyFormer(cfg), seed=1, std=0.2).eval()


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    """Per form: the model and its split graphs after the default passes, unfused and fused
    (traced on first use: a tiny HyFormer's trace takes ~30 s here)."""

    class Lazy(dict):
        def __missing__(self, form):
            model = _model(form)
            hist, ns = _example(model)
            path = tmp_path_factory.mktemp(form) / "serving.onnx"
            trace_onnx(ServingGraph(model), {**hist, **ns}, path, 18)
            graph = gs.import_onnx(onnx.load(str(path)))
            out = {"model": model}
            for fused in (False, True):
                keep = (lambda p: True) if fused else (lambda p: p != "fuse-attention")
                ue, _ = run_passes(user_encoder(graph), [p for p in USER_PASSES if keep(p)])
                cs, _ = run_passes(candidate_scorer(graph), [p for p in SCORER_PASSES if keep(p)])
                out[fused] = (attach_op_functions(gs.export_onnx(ue)), attach_op_functions(gs.export_onnx(cs)))
            self[form] = out
            return out

    return Lazy()


def _users(schema):
    """Full, partial and empty histories, and one whose second sequence is empty."""
    rng = np.random.default_rng(7)
    full = synthetic_request(schema, rng, n_history=16, n_candidates=5)
    partial = synthetic_request(schema, rng, n_history=5, n_candidates=5)
    one_seq = [e for e in synthetic_request(schema, rng, n_history=16, n_candidates=1).history
               if e["sequence"] == schema.sequences[0].name]
    histories = [full.history, partial.history, [], one_seq]
    streams = [merge_stream(schema, encode_events(schema, h)) for h in histories]
    _, ns = encode_request(schema, full)
    return pad_streams(schema, streams, length=16), ns


def _ops(model: onnx.ModelProto) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for n in model.graph.node:
        if n.domain == DOMAIN:
            out.setdefault(n.op_type, []).append({a.name: onnx.helper.get_attribute_value(a) for a in n.attribute})
    return out


# the paper form (the default) in make test; the first release's form (sink, causal) in make test-heavy
FORM_PARAMS = ["paper", pytest.param("wave1", marks=pytest.mark.heavy)]


@pytest.mark.parametrize("form", FORM_PARAMS)
def test_every_hyformer_attention_is_fused(graphs, form):
    ue, cs = graphs[form][True]
    tail = _ops(ue).get("TailCausalAttention", [])
    assert len(tail) == LAYERS * 2  # both sequences, every layer (LONGER's window queries included)
    assert {t["causal"] for t in tail} == {0 if form == "paper" else 1}
    assert not [n for n in ue.graph.node if n.op_type == "Softmax"]
    assert len(_ops(cs).get("SharedDecodeAttention", [])) == LAYERS * 2  # with a sink (wave1) or without
    assert not [n for n in cs.graph.node if n.op_type in ("Softmax", "Exp")]  # nothing left unfused
    plain_ue, plain_cs = graphs[form][False]
    assert not [n for n in plain_ue.graph.node if n.domain == DOMAIN]  # (the control really is unfused)
    assert not [n for n in plain_cs.graph.node if n.domain == DOMAIN]


@pytest.mark.parametrize("form", FORM_PARAMS)
def test_fused_graphs_equal_unfused_and_pytorch(graphs, form):
    model = graphs[form]["model"]
    (ue_p, cs_p), (ue_f, cs_f) = graphs[form][False], graphs[form][True]
    hist, ns = _users(model.cfg.schema)
    names = state_output_names(model.cfg)
    own = split_sequences(model.cfg.schema, hist)  # the graphs read each sequence on its own
    plain, fused = ort_run(ue_p, own), ort_run(ue_f, own)
    for a, b in zip(plain, fused):
        assert a.shape == b.shape and np.abs(a - b).max() <= 1e-5
    state = dict(zip([o.name for o in ue_f.graph.output], fused))
    lengths = state[f"user_{SEQ_LENGTH}"]
    assert lengths[2].tolist() == [0, 0] and lengths[3][1] == 0 and lengths[3][0] > 0  # the edges are there
    with torch.no_grad():  # PyTorch from the merged stream
        kv_t = model.encode_user({k: torch.from_numpy(v) for k, v in hist.items()})
    for u in range(len(lengths)):
        feeds = {**ns, **{n: state[n][u:u + 1] for n in names}}
        a, b = ort_run(cs_p, feeds), ort_run(cs_f, feeds)
        assert np.isfinite(b[0]).all() and np.abs(a[0] - b[0]).max() <= 1e-5
        one = UserKV([k[u:u + 1] for k in kv_t.keys], [v[u:u + 1] for v in kv_t.values], kv_t.lengths[u:u + 1],
                     {SEQ_LENGTH: kv_t.extras[SEQ_LENGTH][u:u + 1], SEQ_POOL: kv_t.extras[SEQ_POOL][u:u + 1]})
        with torch.no_grad():
            want = model.score_candidates(one, {k: torch.from_numpy(v) for k, v in ns.items()}).numpy()
        assert np.abs(b[0] - want).max() <= 1e-4


def test_graphs_read_each_sequence_on_its_own(graphs):
    """The user encoder takes each sequence's own inputs with its own length axis, and its
    K/V follow each sequence's real token count (not the merged stream's width); the scorer
    reads no history input."""
    model = graphs["paper"]["model"]
    schema = model.cfg.schema
    ue, cs = graphs["paper"][True]
    assert [i.name for i in ue.graph.input] == sequence_input_names(schema)
    axes = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in ue.graph.input}
    assert axes["s0_item_id"] == ["users", "history0"] and axes["s1_item_id"] == ["users", "history1"]
    assert axes["s0_length"] == ["users"]
    assert not [i.name for i in cs.graph.input if not (i.name.startswith("ns_") or i.name.startswith("user_"))]
    hist, _ = _users(schema)
    merged_width = hist["s_type"].shape[1]
    own = split_sequences(schema, hist)
    widths = [own["s0_item_id"].shape[1], own["s1_item_id"].shape[1]]
    assert max(widths) < merged_width  # (the case tells the layouts apart)
    state = dict(zip([o.name for o in ue.graph.output], ort_run(ue, own)))
    caps = [model.cfg.hy_seq(j)["max_len"] for j in range(2)]
    window = model.cfg.hy_seq(1)["window"]
    # layer 0's K/V: sequence 0 (full encoder) as wide as the sequence (its cap at most); sequence 1
    # (LONGER) its newest `window` tokens of that
    want = [min(widths[0], caps[0]), min(widths[1], caps[1], window)]
    assert [state[f"user_k_{j}"].shape[2] for j in range(2)] == want
    assert [state[f"user_v_{j}"].shape[2] for j in range(2)] == want
    # one user alone: each sequence exactly its real count wide
    one = split_sequences(schema, {k: v[1:2] for k, v in hist.items()})
    n = [max(1, int(one[f"s{j}_length"][0])) for j in range(2)]
    st1 = dict(zip([o.name for o in ue.graph.output], ort_run(ue, one)))
    assert [st1[f"user_k_{j}"].shape[2] for j in range(2)] == [min(n[0], caps[0]), min(n[1], caps[1], window)]
    assert n[0] != n[1] and min(n[0], caps[0]) < widths[0]
