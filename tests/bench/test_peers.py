"""`bench` (peers suite) on the trained tiny build: every section measured and consistent.

Speed is never asserted here (machines are noisy; figures live in README from `bench`);
what is asserted is what could be wrong in the harness: which peers ran, the FLOP
bookkeeping, the cache counters and that cached scores equal recomputed ones.
"""

from __future__ import annotations

import json
import math

import pytest
from click.testing import CliRunner

from onetrans_trt.cli import cli


def _numbers(tree, path: str = "") -> list[tuple[str, float]]:
    """Every number in the report, with its key path."""
    if isinstance(tree, dict):
        return [x for k, v in tree.items() for x in _numbers(v, f"{path}.{k}")]
    if isinstance(tree, list):
        return [x for i, v in enumerate(tree) for x in _numbers(v, f"{path}[{i}]")]
    return [(path, float(tree))] if isinstance(tree, (int, float)) and not isinstance(tree, bool) else []


@pytest.mark.heavy  # ~65 s; make test: tests/bench/test_kv_copy.py checks the peers' logits on the same build
def test_bench_peers_on_a_build(tiny_build, tmp_path):
    out = tmp_path / "bench.json"
    r = CliRunner().invoke(cli, ["bench", str(tiny_build), "--quick", "--history", "30", "--candidates", "8",
                                 "--scorer-candidates", "32", "--cache-history", "30", "--rounds", "2",
                                 "--out", str(out), "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())
    assert json.loads(r.stdout) == res
    peers = res["peers"]["backends"]
    assert set(peers) == {"torch-unified", "torch-split", "ort-unified", "ort", "ort-kv-copy"}
    assert set(res["peers"]["skipped"]) == {"ort-fp16", "ort-int8"}  # not converted/calibrated
    assert peers["ort-unified"]["speedup_vs_ort_unified"] == 1.0
    f = res["peers"]["flops"]
    assert f["split_total"] == f["user_encoder_once"] + f["candidate_scorer"]
    assert res["peers"]["theoretical_flop_ratio"] == f["unified"] / f["split_total"] > 1
    for name, st in peers.items():
        assert st["runs"] >= 2 and 0 < st["p50_ms"] <= st["p99_ms"]
        want = f["unified"] if name.endswith("unified") else f["split_total"]
        assert st["flops"] == want and st["gflops_per_s"] > 0
    assert res["machine"]["matmul_gflops_per_s"] > 0
    assert res["scorer"]["fraction_of_machine_matmul"] > 0  # a ratio of two speeds: bench reports it, no bound here
    timed = _numbers(res)
    assert all(math.isfinite(v) for _, v in timed), [k for k, v in timed if not math.isfinite(v)]
    assert all(v > 0 for k, v in timed if k.endswith(("_ms", "_per_s"))), [(k, v) for k, v in timed if v <= 0]
    cache = res["cache"]
    assert cache["identical_scores"]
    assert cache["theoretical_hit_speedup"] == pytest.approx(
        (cache["flops"]["user_encoder"] + cache["flops"]["candidate_scorer"]) / cache["flops"]["candidate_scorer"])
    misses = cache["miss"]["runs"] + 1  # + the warm-up round
    assert cache["encoder_calls"] == misses  # hits never ran the encoder
    assert cache["hit_counters"]["hits"] == cache["hit"]["runs"] + 1  # + the warm-up round
    # the scorer alone on the same K/V and candidates: the floor of a hit, measured alongside
    assert cache["scorer_alone"]["runs"] == cache["hit"]["runs"]
    assert cache["hit_over_scorer_alone"] == pytest.approx(cache["hit"]["p50_ms"] / cache["scorer_alone"]["p50_ms"])
    assert cache["measured_hit_bound"] == pytest.approx(cache["miss"]["p50_ms"] / cache["scorer_alone"]["p50_ms"])
    py = res["pyramid"]
    assert py["flop_ratio"] > 1 and py["on"]["flops"] < py["off"]["flops"]
    human = CliRunner().invoke(cli, ["bench", str(tiny_build), "--quick", "--history", "10", "--candidates", "4",
                                     "--scorer-candidates", "8", "--cache-history", "10", "--rounds", "1",
                                     "--no-pyramid", "--backends", "ort,ort-unified"])
    assert human.exit_code == 0, human.output
    assert "vs ort-unified" in human.output and "% of machine MatMul" in human.output
    assert "pyramid on vs off" not in human.output


def test_bench_rejects_a_build_for_the_random_suites(tiny_build):
    r = CliRunner().invoke(cli, ["bench", str(tiny_build), "--suite", "fused"])
    assert r.exit_code == 2 and "takes no BUILD" in r.output
