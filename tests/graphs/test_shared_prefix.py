"""shared-prefix: a naive scorer's per-candidate K/V copy becomes SharedPrefixAttention, proven.

The naive scorers below are small PyTorch modules written the way users write them: the
user's K/V (state inputs ``user_k_<l>``/``user_v_<l>``, BHLD or BLHD) expanded or tiled to
the C candidates, concatenated with the candidates' own K/V on the key axis, attention by
hand (MatMul / additive mask or Where / Softmax / MatMul) or through SDPA (exported at opset
23 as the ONNX ``Attention`` op), the user's left padding masked from ``user_hist_len``.
Each is exported with the dynamo exporter (dims ``candidates``/``kv_len_<l>``), the pass
runs, and the graphs before and after are run in ONNX Runtime on inputs the pass's own
proof never saw (other sizes, other seeds).
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
import torch
from torch import nn
from torch.export import Dim

from onetrans_trt.errors import BuildError
from onetrans_trt.graphs import run_passes
from onetrans_trt.graphs import shared_prefix as sp
from onetrans_trt.graphs.no_broadcast import kv_broadcasts
from onetrans_trt.plugins import attach_op_functions
from tests.helpers import ort_run, stable_seed

D, H = 32, 4
DH = D // H


class NaiveScorer(nn.Module):
    """C candidates of T NS-tokens each attend the user's K/V copied once per candidate."""

    def __init__(self, layout="bhld", attn="matmul_add", copy="expand", own="causal", padding="left",
                 layers=1, t=3):
        super().__init__()
        self.layout, self.attn, self.copy, self.own, self.padding = layout, attn, copy, own, padding
        self.layers, self.t = layers, t
        self.inp = nn.Linear(D, D)
        self.qkv = nn.ModuleList(nn.Linear(D, 3 * D) for _ in range(layers))
        self.o = nn.ModuleList(nn.Linear(D, D) for _ in range(layers))
        self.head = nn.Linear(D, 1)

    def forward(self, cand_x, hist_len, user_k_0, user_v_0, user_k_1=None, user_v_1=None):
        kv = (user_k_0, user_v_0, user_k_1, user_v_1)
        c, t = cand_x.shape[0], self.t
        x = self.inp(cand_x)  # [C, T, D]
        for l in range(self.layers):
            uk, uv = kv[2 * l], kv[2 * l + 1]
            q, k, v = self.qkv[l](x).reshape(c, t, 3, H, DH).unbind(2)  # [C, T, H, dh]
            if self.copy == "mul_expand":  # a scale on the user's K before the copy
                uk = uk * 0.5
            if self.copy == "tile":
                kb, vb = uk.repeat(c, 1, 1, 1), uv.repeat(c, 1, 1, 1)
            else:
                kb, vb = uk.expand(c, -1, -1, -1), uv.expand(c, -1, -1, -1)
            q = q.transpose(1, 2)
            if self.layout == "bhld":
                n = uk.shape[2]
                K, V = torch.cat([kb, k.transpose(1, 2)], 2), torch.cat([vb, v.transpose(1, 2)], 2)
            else:  # [1, L, H, dh]: concatenated on axis 1, then to heads-first
                n = uk.shape[1]
                K, V = torch.cat([kb, k], 1).transpose(1, 2), torch.cat([vb, v], 1).transpose(1, 2)
            j = torch.arange(n)
            real = j >= (n - hist_len) if self.padding == "left" else j < hist_len  # [n]
            i = torch.arange(t)
            own = i.unsqueeze(1) >= i.unsqueeze(0) if self.own == "causal" else torch.ones(t, t, dtype=torch.bool)
            mask = torch.cat([real.unsqueeze(0).expand(t, n), own], 1)  # [T, n + T]
            additive = torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))
            if self.attn == "sdpa_bool":
                a = torch.nn.functional.scaled_dot_product_attention(q, K, V, attn_mask=mask)
            elif self.attn == "sdpa_float":
                a = torch.nn.functional.scaled_dot_product_attention(q, K, V, attn_mask=additive)
            else:
                s = q @ K.transpose(-1, -2) / math.sqrt(DH)
                s = s + additive if self.attn == "matmul_add" else s.masked_fill(~mask, float("-inf"))
                a = torch.softmax(s, -1) @ V
            x = x + self.o[l](a.transpose(1, 2).reshape(c, t, D))
        return self.head(x.mean(1))


def _kv_shape(module: NaiveScorer, n: int) -> tuple[int, ...]:
    return (1, H, n, DH) if module.layout == "bhld" else (1, n, H, DH)


def export_naive(module: NaiveScorer, length_name: str = "user_hist_len") -> onnx.ModelProto:
    torch.manual_seed(0)
    module.eval()
    n, layers = 6, module.layers
    args = (torch.randn(3, module.t, D), torch.tensor([n // 2]), *[torch.randn(_kv_shape(module, n))
                                                                  for _ in range(2 * layers)])
    names = ["cand_x", length_name] + [f"user_{kv}_{l}" for l in range(layers) for kv in "kv"]
    axis = 2 if module.layout == "bhld" else 1
    kv_len = [Dim(f"kv_len_{l}", min=1, max=4096) for l in range(layers)]
    shapes = ({0: Dim("candidates", min=1, max=4096)}, None, *[{axis: kv_len[l]} for l in range(layers) for _ in "kv"])
    prog = torch.onnx.export(module, args, dynamo=True, opset_version=23, input_names=names, output_names=["logits"],
                             dynamic_shapes=shapes, external_data=False, verbose=False)
    return prog.model_proto


def _feeds(module: NaiveScorer, c: int, n_kv: int, length: int, seed: int, length_name="user_hist_len"):
    rng = np.random.default_rng(seed)
    feeds = {"cand_x": rng.standard_normal((c, module.t, D)).astype(np.float32),
             length_name: np.array([length], dtype=np.int64)}
    for l in range(module.layers):
        for kv in "kv":
            feeds[f"user_{kv}_{l}"] = rng.standard_normal(_kv_shape(module, n_kv)).astype(np.float32)
    return feeds


def _run(graph_or_model, feeds):
    model = graph_or_model if isinstance(graph_or_model, onnx.ModelProto) else gs.export_onnx(graph_or_model)
    return ort_run(attach_op_functions(model), feeds)[0]


CASES = {
    "bhld_matmul_additive_mask": dict(),
    "blhd_sdpa_bool_mask": dict(layout="blhd", attn="sdpa_bool"),
    "scale_mul_before_expand_sdpa_float_mask": dict(copy="mul_expand", attn="sdpa_float"),
    "tile_matmul_where": dict(copy="tile", attn="matmul_where"),
    "blhd_tile_two_layers": dict(layout="blhd", copy="tile", layers=2),
}


@pytest.mark.parametrize("case", list(CASES))
def test_naive_scorer_is_rewritten_proven_and_broadcast_free(case):
    module = NaiveScorer(**CASES[case])
    model = export_naive(module)
    before = gs.import_onnx(model)
    assert {b.source for b in kv_broadcasts(before)} == {f"user_{kv}_{l}" for l in range(module.layers) for kv in "kv"}
    after, records = run_passes(before, ["shared-prefix"], graph_name="candidate_scorer")
    report = after.__dict__["shared_prefix"]
    assert [r["rewritten"] for r in report] == [True] * module.layers, report
    assert all(r["prefix_valid"] == "user_hist_len" for r in report), report
    assert records[0]["fused"] == module.layers
    # (b) no broadcast left: one fused node per layer, no Expand/Tile/Concat on the K/V path
    ours = [n for n in after.nodes if n.op == "SharedPrefixAttention"]
    assert len(ours) == module.layers and all(n.domain == "onetrans" for n in ours)
    assert all(n.attrs["plugin_namespace"] == "onetrans" and n.attrs["aot"] == 1 for n in ours)
    assert all(n.attrs["scale"] == pytest.approx(1 / math.sqrt(DH), rel=1e-6) for n in ours)
    assert kv_broadcasts(after) == []
    run_passes(after, ["no-broadcast"], graph_name="candidate_scorer")  # does not raise
    # (a) the same outputs, on sizes and seeds the pass's proof did not use
    for c in (1, 5):
        for n_kv in (5, 13):
            for length in (0, 1, n_kv // 2, n_kv, n_kv + 4):
                seed = stable_seed(case, c, n_kv, length)
                feeds = _feeds(module, c, n_kv, length, seed)
                want = _run(model, feeds)
                with torch.no_grad():
                    order = ["cand_x", "user_hist_len"] + [f"user_{kv}_{l}" for l in range(module.layers) for kv in "kv"]
                    torch_out = module(*[torch.from_numpy(feeds[k]) for k in order]).numpy()
                np.testing.assert_allclose(want, torch_out, atol=1e-5)  # the naive graph is the module
                np.testing.assert_allclose(_run(after, feeds), want, atol=1e-5, rtol=0,
                                           err_msg=f"C={c} L={n_kv} length={length} seed={seed}")


@pytest.mark.parametrize("kind", ["own_tokens_see_each_other", "right_padded_prefix"])
def test_a_scorer_the_op_does_not_compute_is_left_alone_and_still_reported(kind):
    """(c) Own NS-tokens attending each other in full (not causal), or a right-padded prefix:
    the structure matches, the proof fails, nothing is rewritten, no-broadcast still refuses."""
    module = NaiveScorer(own="full") if kind == "own_tokens_see_each_other" else NaiveScorer(padding="right")
    model = export_naive(module)
    before = gs.import_onnx(model)
    assert len(sp.find_sites(before)) == 1  # it is the pattern...
    after, _ = run_passes(before, ["shared-prefix"], graph_name="candidate_scorer")
    (rec,) = after.__dict__["shared_prefix"]
    assert rec["rewritten"] is False and "max abs error" in rec["why_not"], rec  # ...but not the op
    assert not [n for n in after.nodes if n.domain == "onetrans"]
    assert {b.source for b in kv_broadcasts(after)} == {"user_k_0", "user_v_0"}
    with pytest.raises(BuildError, match="copies the user's K/V per candidate"):
        run_passes(after, ["no-broadcast"], graph_name="candidate_scorer")
    feeds = _feeds(module, 3, 7, 2, stable_seed(kind))
    np.testing.assert_array_equal(_run(after, feeds), _run(model, feeds))


def test_a_rewrite_that_is_wrong_is_refused_by_the_proof(monkeypatch):
    """The proof is what decides: a rewrite with the wrong scale is not kept."""
    real = sp.find_sites

    def wrong_scale(graph):
        sites = real(graph)
        for s in sites:
            s.scale *= 1.5
        return sites

    monkeypatch.setattr(sp, "find_sites", wrong_scale)
    g = gs.import_onnx(export_naive(NaiveScorer()))
    out, report = sp.rewrite_shared_prefix(g)
    assert [r["rewritten"] for r in report] == [False], report
    assert not [n for n in out.nodes if n.op == "SharedPrefixAttention"] and kv_broadcasts(out)


def test_a_graph_without_the_pattern_is_untouched():
    """Our own scorer graphs (no copy) and non-scorer graphs pass through unchanged."""
    g = gs.import_onnx(export_naive(NaiveScorer()))
    g.inputs = [t for t in g.inputs]  # same graph, but call the pass on a graph without K/V inputs
    for t in g.inputs:
        if t.name.startswith("user_"):
            t.name = "x_" + t.name
    assert sp.shared_prefix(g) is g


class SepPyramidScorer(nn.Module):
    """examples/sep_pyramid.py's score_candidates with its state as named graph inputs."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, cand_item, cand_cat, cand_dense, user_k_0, user_v_0, user_k_1, user_v_1, user_k_2, user_v_2,
                user_n_hist, user_token):
        state = {"k0": user_k_0, "v0": user_v_0, "k1": user_k_1, "v1": user_v_1, "k2": user_k_2, "v2": user_v_2,
                 "n_hist": user_n_hist, "user_token": user_token}
        return self.model.score_candidates(state, {"cand_item": cand_item, "cand_cat": cand_cat,
                                                   "cand_dense": cand_dense})


def test_the_sep_pyramid_examples_naive_scorer_is_rewritten():
    """The example's scorer copies K/V per candidate in each of its 3 layers, and its prefix
    count is ``n_hist + 1`` (the SEP token is real): the pass finds that count in the mask."""
    ex = pytest.importorskip("examples.sep_pyramid")
    model = ex.factory()
    user, cand = ex.example_inputs(n_users=1, n_candidates=3)
    with torch.no_grad():
        state = model.encode_user(user)
    kv = [f"{kv}{l}" for l in range(3) for kv in "kv"]
    names = ["cand_item", "cand_cat", "cand_dense"] + [f"user_{k[0]}_{k[1]}" for k in kv] + ["user_n_hist", "user_token"]
    args = (cand["cand_item"], cand["cand_cat"], cand["cand_dense"], *[state[k] for k in kv], state["n_hist"],
            state["user_token"])
    cands, kv_len = Dim("candidates", min=1, max=4096), [Dim(f"kv_len_{l}", min=1, max=4096) for l in range(3)]
    shapes = ({0: cands}, {0: cands}, {0: cands}, *[{2: kv_len[l]} for l in range(3) for _ in "kv"], None, None)
    scorer = SepPyramidScorer(model).eval()
    onnx_model = torch.onnx.export(scorer, args, dynamo=True, opset_version=23, input_names=names,
                                   output_names=["logits"], dynamic_shapes=shapes, external_data=False,
                                   verbose=False).model_proto
    before = gs.import_onnx(onnx_model)
    assert len(kv_broadcasts(before)) >= 6
    after, _ = run_passes(before, ["shared-prefix"], graph_name="candidate_scorer")
    report = after.__dict__["shared_prefix"]
    assert [r["rewritten"] for r in report] == [True] * 3, report
    assert kv_broadcasts(after) == []
    assert len([n for n in after.nodes if n.op == "SharedPrefixAttention"]) == 3
    # equal outputs on the example's own states: empty, short, full and over-long histories
    for n_hist in (0, 1, 200, ex.HIST_MAX, ex.HIST_MAX + 5):
        user, _ = ex.example_inputs(n_users=1, seed=stable_seed("sep", n_hist))
        user["hist_len"] = torch.tensor([n_hist])
        with torch.no_grad():
            state = model.encode_user(user)
        for c in (1, 4):
            _, cand = ex.example_inputs(n_users=1, n_candidates=c, seed=stable_seed("sep", n_hist, c))
            with torch.no_grad():
                want = model.score_candidates(state, cand).numpy()
            feeds = {"cand_item": cand["cand_item"].numpy(), "cand_cat": cand["cand_cat"].numpy(),
                     "cand_dense": cand["cand_dense"].numpy(), "user_n_hist": state["n_hist"].numpy(),
                     "user_token": state["user_token"].numpy(),
                     **{f"user_{k[0]}_{k[1]}": state[k].numpy() for k in kv}}
            naive = _run(onnx_model, feeds)
            np.testing.assert_allclose(naive, want, atol=1e-4)
            np.testing.assert_allclose(_run(after, feeds), naive, atol=1e-5, rtol=0, err_msg=f"n_hist={n_hist} C={c}")


def test_peak_memory_of_the_rewritten_scorer_grows_like_ours_not_per_candidate_copies(tmp_path):
    """(d) ORT peak memory (bench.memory: the kernel's high-water mark, in a fresh process) of a
    naive scorer before and after the pass, C = 128 and 1024, L = 512.

    Expected per-candidate growth of the rewritten graph, from the sizes of its candidate-side
    tensors (fp32, 4 bytes): SharedPrefixAttention's function holds a few [H, T, L+T] score /
    probability rows per candidate (scores, scaled, exp: at most 4 alive at once), and the
    model's per-candidate activations are T x D each (inputs, Q/K/V, attention out, projection,
    residual: fewer than 16). A per-candidate copy of the user's K (and V) is L x D per layer,
    which is what the naive graph adds, K and V, expanded and concatenated.
    """
    from onetrans_trt.bench.memory import peak_growth

    L, T = 512, 2
    module = NaiveScorer(t=T)  # D=32, H=4, one layer
    model = export_naive(module, length_name="s_length")  # placeholder feeds: s_length = history (all real)
    naive_path, fused_path = tmp_path / "naive.onnx", tmp_path / "fused.onnx"
    onnx.save(model, naive_path)
    after, _ = run_passes(gs.import_onnx(model), ["shared-prefix"], graph_name="candidate_scorer")
    assert after.__dict__["fused_attention"] == 1 and kv_broadcasts(after) == []
    onnx.save(attach_op_functions(gs.export_onnx(after)), fused_path)

    per_candidate = 4 * (4 * H * T * (L + T) + 16 * T * D)
    copy_per_candidate = 4 * L * D  # one layer's K alone
    assert per_candidate < 2 * copy_per_candidate
    dims = {"history": L, "kv_len_0": L}
    peak = {(p.name, c): peak_growth(str(p), {**dims, "candidates": c})
            for p in (naive_path, fused_path) for c in (128, 1024)}

    def bound(name):
        return 2 * peak[(name, 128)] + (1024 - 128) * per_candidate

    assert 0 < peak[("fused.onnx", 1024)] < bound("fused.onnx"), (peak, per_candidate)
    # the same bound fails the naive graph: it grows by the K/V copies, C * L * D * 4 and more
    assert peak[("naive.onnx", 1024)] > bound("naive.onnx"), (peak, per_candidate)
    assert peak[("naive.onnx", 1024)] - peak[("naive.onnx", 128)] >= (1024 - 128) * 2 * copy_per_candidate, peak
