"""Fusion: every attention of tiny, small and onetrans-s graphs becomes our node, and the
fused graphs (run by ORT through the ops' function bodies) equal the unfused ones."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest

from onetrans_trt.export.api import export_build
from onetrans_trt.graphs.fuse_attention import count_fused, fuse_attention
from onetrans_trt.plugins import attach_op_functions, strip_functions
from tests.helpers import ort_run


def _builds(tmp_path, preset: str):
    """One export (fused), and a copy whose passes are re-run without fusion."""
    import shutil

    from onetrans_trt.export.api import default_passes, rerun_passes

    from onetrans_trt.data.synthetic import synthetic_schema
    from onetrans_trt.models.checkpoint import save_checkpoint
    from onetrans_trt.models.config import ModelConfig
    from onetrans_trt.models.onetrans import OneTrans
    from tests.helpers import randomize

    ck = tmp_path / f"ck-{preset}"
    cfg = ModelConfig.from_preset(preset, synthetic_schema(max_history=40))
    save_checkpoint(randomize(OneTrans(cfg), std=0.1), ck)
    fused, plain = tmp_path / "fused", tmp_path / "plain"
    export_build(ck, fused, n_samples=2)
    shutil.copytree(fused, plain)
    rerun_passes(plain, *default_passes(fuse_attention=False))
    return fused, plain


@pytest.mark.parametrize("preset,layers", [("tiny", 2), pytest.param("small", 3, marks=pytest.mark.heavy),
                                          pytest.param("onetrans-s", 6, marks=pytest.mark.heavy)])
def test_every_attention_is_fused_and_outputs_do_not_change(preset, layers, tmp_path):
    from polygraphy.json import load_json

    fused, plain = _builds(tmp_path, preset)
    ue, cs = onnx.load(str(fused / "user_encoder.onnx")), onnx.load(str(fused / "candidate_scorer.onnx"))
    g_ue, g_cs = gs.import_onnx(ue), gs.import_onnx(cs)
    # the top layer has no S-token queries, so the user encoder has layers - 1 attentions
    assert count_fused(g_ue) == {"TailCausalAttention": layers - 1}
    assert count_fused(g_cs) == {"SharedPrefixAttention": layers}
    assert not [n for n in cs.graph.node if n.op_type in ("Softmax", "Exp")]  # nothing left unfused
    for graph, inputs in (("user_encoder", "user_encoder_inputs"), ("candidate_scorer", "candidate_scorer_inputs")):
        for feed in load_json(str(fused / "samples" / f"{inputs}.json")):
            a = ort_run(fused / f"{graph}.onnx", feed)
            b = ort_run(plain / f"{graph}.onnx", feed)
            for x, y in zip(a, b):
                assert np.abs(x - y).max() <= 1e-5


def test_fusion_pass_on_its_own_graph_before_and_after(serving_graphs):
    from onetrans_trt.graphs.split_kv import candidate_scorer, user_encoder

    model, graph, hist, ns = serving_graphs["slice_first"]
    hist1 = {k: v[:1] for k, v in hist.items()}
    ue = user_encoder(graph)
    kv = ort_run(gs.export_onnx(ue), hist1)
    feeds = {**ns, "s_length": hist1["s_length"], **dict(zip([t.name for t in ue.outputs], kv))}
    cs = candidate_scorer(graph)
    before = ort_run(gs.export_onnx(cs), feeds)
    fused = fuse_attention(cs)
    assert fused.__dict__["fused_attention"] == 3 and len(fused.nodes) < len(cs.nodes)
    after = ort_run(attach_op_functions(gs.export_onnx(fused)), feeds)
    assert np.abs(before[0] - after[0]).max() <= 1e-5
    ue_f = fuse_attention(ue)
    assert ue_f.__dict__["fused_attention"] == 2
    for x, y in zip(kv, ort_run(attach_op_functions(gs.export_onnx(ue_f)), hist1)):
        assert np.abs(x - y).max() <= 1e-5


def test_graph_for_tensorrt_drops_the_functions(tiny_build):
    m = onnx.load(str(tiny_build / "candidate_scorer.onnx"))
    assert {f.name for f in m.functions} == {"SharedPrefixAttention"}
    t = strip_functions(m)
    assert not t.functions and len(t.graph.node) == len(m.graph.node)
    assert any(n.op_type == "SharedPrefixAttention" for n in t.graph.node)
    assert len(m.functions) == 1  # the ORT graph is untouched
