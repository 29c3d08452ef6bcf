"""Issue 14 acceptance: the example written the naive way (examples/sep_pyramid.py copies the
user's K/V per candidate with ``expand`` then ``cat``) comes out of ``export`` with no broadcast
left, and its ORT peak memory at C=1024, L=512 stays below 2x that at C=128 plus the expected
per-candidate growth; the same bound fails the graph as the user wrote it.

Peak memory: ``bench.memory.peak_growth`` (the kernel's high-water mark of one ORT run, in a
fresh process, arena off). Expected per-candidate growth, from the sizes of the rewritten
scorer's candidate-side tensors (fp32): per layer, SharedPrefixAttention's function keeps a few
[H, T, Lk + T] score/probability rows per candidate (at most 4 alive at once), and the model's
per-candidate activations are T x D each (fewer than 16 alive: inputs, Q/K/V, attention out,
projection, residual, norm, FFN). A per-candidate copy of the user's K and V is Lk x D each per
layer, which is what the naive graph adds.
"""

from __future__ import annotations

import onnx
import onnx_graphsurgeon as gs
import pytest
import torch

from onetrans_trt.bench.memory import peak_growth
from onetrans_trt.graphs.no_broadcast import kv_broadcasts
from tests.protocol.test_protocol import example


@pytest.mark.heavy  # an export and two memory measurements (~50 s)
def test_naive_example_exports_without_kv_copies_and_its_memory_grows_like_ours(tmp_path):
    import numpy as np

    from onetrans_trt.export.api import read_manifest, trace_onnx
    from onetrans_trt.export.module import _scorer_graph, _state_dims, _dynamic, export_module
    from onetrans_trt.protocol import SplitSpec, random_inputs
    from onetrans_trt.protocol.checks import user_slice

    mod = example("sep_pyramid")
    spec = SplitSpec.parse(mod.SPEC)
    L = spec.history.max
    assert L == 512
    torch.manual_seed(0)
    module = mod.factory().eval()
    build = tmp_path / "build"
    export_module(module, spec, None, build, check=False)
    fused = build / "candidate_scorer.onnx"
    g = gs.import_onnx(onnx.load(str(fused)))
    assert kv_broadcasts(g) == [] and sum(n.op == "SharedPrefixAttention" for n in g.nodes) >= 1

    # the scorer exactly as the user wrote it: traced, no passes
    naive = tmp_path / "naive.onnx"
    tu, tc = random_inputs(spec, users=2, candidates=3, lengths=L, rng=np.random.default_rng(0))
    with torch.no_grad():
        one = user_slice(module.encode_user(tu), 0)
    trace_onnx(_scorer_graph(module, spec), {**tc, **{spec.graph_name(k): v for k, v in one.items()}}, naive, 23,
               {**_dynamic(spec, "candidate"), **_state_dims(spec)})
    assert kv_broadcasts(gs.import_onnx(onnx.load(str(naive))))  # the copy is there before the pass

    m = read_manifest(build)
    facts = m["model"]
    D, H = facts["d_model"], facts["n_heads"]
    kv_lens = {k: v["max"] for k, v in m["dynamic_dims"].items() if k.startswith("kv_len_")}
    assert kv_lens and min(kv_lens.values()) >= 1
    T = mod.N_NS  # tokens per candidate
    per_candidate = 4 * max(4 * H * T * (lk + T) + 16 * T * D for lk in kv_lens.values())
    copy_per_candidate = 4 * 2 * sum(kv_lens.values()) * D  # K and V of every layer, once per candidate
    dims = {"history": L, "users": 1, **kv_lens}
    peak = {(p.name, c): peak_growth(str(p), {**dims, "candidates": c}) for p in (naive, fused) for c in (128, 1024)}

    def bound(name: str) -> int:
        return 2 * peak[(name, 128)] + (1024 - 128) * per_candidate

    assert 0 < peak[(fused.name, 1024)] < bound(fused.name), (peak, per_candidate)
    # the same bound fails the scorer as written: it grows by the K/V copies
    assert peak[(naive.name, 1024)] > bound(naive.name), (peak, per_candidate)
    assert peak[(naive.name, 1024)] - peak[(naive.name, 128)] >= (1024 - 128) * copy_per_candidate // 2, peak
    print({k: f"{v / 2**20:.1f} MiB" for k, v in peak.items()}, f"per-candidate bound {per_candidate} B")
