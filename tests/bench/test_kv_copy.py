"""The ``ort-kv-copy`` bench peer: the straightforward K/V-copy export of the split.

The session's trained tiny OneTrans build (MovieLens schema) and `bench`'s peers section run once
on it (quick, tiny sizes, its scratch files kept), so the graph checked here is the one bench
measured. Asserted: its logits equal the split's (eager and ORT) within 1e-4 for partial,
full and empty histories at C = 1, 3, 17; the graph really copies the user's K/V per
candidate; bench reports the peer and its "ort split Nx faster" line. No timing is asserted.
"""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from onetrans_trt.errors import InputError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny(tiny_build, tmp_path_factory, one_torch_thread):
    """``(model, build, kv-copy graph, bench result)``: the session's trained tiny build (real
    MovieLens schema) and its checkpoint's model, and ``bench_peers(quick=True)`` on it with its
    own default peers, no pyramid twin (a second export), scratch kept in ``work``."""
    from onetrans_trt.bench.kv_copy import GRAPH, NAME
    from onetrans_trt.bench.peers import bench_peers
    from onetrans_trt.export.api import read_manifest
    from onetrans_trt.models.checkpoint import load_checkpoint

    model = load_checkpoint(read_manifest(tiny_build)["checkpoint"]["path"]).eval()
    work = tmp_path_factory.mktemp("kv-copy") / "work"
    res = bench_peers(tiny_build, quick=True, history=12, candidates=5, scorer_candidates=8, cache_history=12,
                      cache_candidates=4, rounds=1, threads=1, pyramid=False, work=work)
    return model, tiny_build, work / NAME / GRAPH, res


@pytest.mark.parametrize("events", [5, "full", 0], ids=["partial", "full", "empty"])
@pytest.mark.parametrize("candidates", [1, 3, 17])
def test_kv_copy_logits_equal_the_split(tiny, events, candidates):
    import torch

    from onetrans_trt.data.requests import encode_request
    from onetrans_trt.data.synthetic import synthetic_request
    from onetrans_trt.runtime.ort_backend import OrtSplitBackend

    model, build, graph, _ = tiny
    schema = model.cfg.schema
    events = schema.max_history if events == "full" else events
    req = synthetic_request(schema, np.random.default_rng(events * 100 + candidates), n_history=events,
                            n_candidates=candidates)
    hist, ns = encode_request(schema, req)
    assert int(hist["s_length"][0]) == events
    with torch.no_grad():
        kv = model.encode_user({k: torch.from_numpy(v) for k, v in hist.items()})
        eager = model.score_candidates(kv, {k: torch.from_numpy(v) for k, v in ns.items()}).numpy()
    copy = OrtSplitBackend(build, name="ort-kv-copy", scorer_graph=str(graph), threads=1, device=None)
    split = OrtSplitBackend(build, threads=1, device=None)
    got = copy.score(copy.encode_user(hist), ns)  # the build's own user encoder gives the K/V
    ours = split.score(split.encode_user(hist), ns)
    assert got.shape == eager.shape == (candidates, len(model.cfg.tasks))
    assert np.isfinite(got).all()
    assert np.abs(got - eager).max() <= 1e-4
    assert np.abs(got - ours).max() <= 1e-4


def test_the_graph_copies_every_layers_kv_per_candidate(tiny):
    import onnx

    from onetrans_trt.bench.kv_copy import kv_copies

    model, _, graph, _ = tiny
    m = onnx.load(str(graph))
    copies = kv_copies(m)
    n = model.cfg.n_layers
    # one copy of K and one of V per layer, each [candidates, H, kv_len_l, dh] out of the [1, ...] input
    assert sorted(c["input"] for c in copies) == sorted(f"user_{kv}_{i}" for i in range(n) for kv in "kv")
    for c in copies:
        assert c["op"] in ("Expand", "Tile")
        assert c["shape"][0] == "candidates"
        assert c["shape"][2] == f"kv_len_{c['input'].rsplit('_', 1)[1]}"
    inputs = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in m.graph.input}
    assert inputs["user_k_0"][0] == 1 and inputs["ns_item_id"] == ["candidates"]  # one user's K/V, C candidates
    # dynamic in candidates and in every layer's K/V length (the history), like the build's scorer
    assert all(inputs[f"user_k_{i}"][2] == f"kv_len_{i}" for i in range(n))


def test_bench_quick_runs_the_kv_copy_peer(tiny):
    from onetrans_trt.bench.peers import table

    _, _, _, res = tiny
    pe = res["peers"]
    assert "ort-kv-copy" in pe["backends"], pe["skipped"]
    st = pe["backends"]["ort-kv-copy"]
    assert math.isfinite(st["p50_ms"]) and st["p50_ms"] > 0 and st["runs"] >= 1
    assert st["path"] == "split" and st["flops"] == pe["flops"]["split_total"]  # the same FLOPs; the copy is memory
    # checked against the eager split before it was timed, like every peer here
    assert st["max_abs_vs_torch_split"] <= 1e-4
    assert all(b["max_abs_vs_torch_split"] <= 1e-4 for b in pe["backends"].values())
    ratio = pe["ort_over_ort_kv_copy"]
    assert math.isfinite(ratio) and ratio > 0
    assert ratio == pytest.approx(st["p50_ms"] / pe["backends"]["ort"]["p50_ms"])
    text = table(res)
    assert f"ort split {ratio:.2f}x faster than ort-kv-copy" in text
    rows = [line for line in text.splitlines() if line[2:23].strip() in pe["backends"]]  # the 21-wide name column
    header = next(line for line in text.splitlines() if line.lstrip().startswith("backend"))
    assert len(rows) == len(pe["backends"]) and {len(r) for r in rows} == {len(header)}  # columns aligned


def test_hyformer_gets_the_peer_skipped_with_a_reason(monkeypatch, tmp_path):
    import onetrans_trt.export.api as api
    from onetrans_trt.bench.kv_copy import kv_copy_backend, kv_copy_module

    with pytest.raises(InputError, match="OneTrans only"):
        kv_copy_module(SimpleNamespace(cfg=SimpleNamespace(family="hyformer")))
    monkeypatch.setattr(api, "read_manifest", lambda build: {"model": {"family": "hyformer"},
                                                             "checkpoint": {"path": str(tmp_path)}})
    with pytest.raises(InputError, match="OneTrans only.*'hyformer'"):
        kv_copy_backend(Path(tmp_path), tmp_path / "work")
