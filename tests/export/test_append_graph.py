"""The exported append graph (export/append.py): ``user_encoder_append.onnx`` run in ONNX
Runtime extends a cached OneTrans user state by k new S-tokens, and the result equals a full
PyTorch ``encode_user`` of the longer history (the real K/V columns, <= 1e-5) and scores
the same through ``score_candidates`` (<= 1e-5), wherever ``can_append`` says the append is
exact. Three models: the trained tiny checkpoint (2 layers, linear pyramid, windows
[50, 4]) in a copy of the session's tiny build (the graph recorded in its manifest), and random
weights with 3 layers / linear pyramid (windows [50, 27, 4]) and 2 layers / pyramid off
(windows [50, 50]). k = 1..32, cached histories 0..50 (and past 50 where the stream slides
but the append stays exact), one user and several at once, an append of an append.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from onetrans_trt.data.requests import encode_events, encode_request, merge_stream, pad_streams
from onetrans_trt.data.synthetic import synthetic_request
from onetrans_trt.export.append import (APPEND_GRAPH, append_feeds, append_input_names, append_output_names,
                                        appended_state, export_append)
from onetrans_trt.kv import UserKV
from onetrans_trt.models.append import append_user, can_append, new_tokens, windows

TOL = 1e-5
EXPORT_SECONDS: dict[str, float] = {}


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny tensors: one thread is ~50x faster


def _t(d):
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in d.items()}


def _request(schema, seed: int, n: int):
    """A random request whose timestamps strictly increase: its first i events are a prefix
    of its stream."""
    rng = np.random.default_rng(seed)
    req = synthetic_request(schema, rng, n_history=n, n_candidates=4)
    t = 1.6e9
    for ev in req.history:
        t += 1.0 + float(rng.exponential(600.0))
        ev["timestamp"] = t
    return req


def _hist(schema, req, n: int):
    return pad_streams(schema, [merge_stream(schema, encode_events(schema, req.history[:n]))])


class Appender:
    """A model, its exported append graph and an ORT session on it."""

    def __init__(self, model, path):
        from onetrans_trt.runtime.ort_backend import graph_session

        self.model, self.cfg, self.path = model, model.cfg, path
        self.sess, note = graph_session(path, threads=1)
        assert note == ""

    def run(self, kv: UserKV, tokens) -> UserKV:
        out = self.sess.run(None, append_feeds(kv, tokens, self.cfg))
        st = appended_state(out, self.cfg)
        return UserKV([torch.from_numpy(a) for a in st.keys], [torch.from_numpy(a) for a in st.values],
                      torch.from_numpy(st.lengths))


def _max_err(a, b) -> float:
    return float((torch.as_tensor(a) - torch.as_tensor(b)).abs().max()) if torch.as_tensor(a).numel() else 0.0


def _user(kv: UserKV, u: int) -> UserKV:
    return UserKV([k[u:u + 1] for k in kv.keys], [v[u:u + 1] for v in kv.values], kv.lengths[u:u + 1])


def assert_matches_full(app: Appender, kv_app: UserKV, kv_static: UserKV, full: list[UserKV], ns: list[dict],
                        k: int) -> float:
    """The ORT-appended state vs PyTorch: the static reference's shapes (and values), each user's
    real K/V columns vs that user's full encode, and its scores; returns the worst error."""
    model, m = app.model, windows(app.cfg)
    worst = 0.0
    assert torch.equal(kv_app.lengths.long(), kv_static.lengths.long())
    for lay in range(app.cfg.n_layers):
        for a, s in ((kv_app.keys[lay], kv_static.keys[lay]), (kv_app.values[lay], kv_static.values[lay])):
            assert a.shape == s.shape, (lay, a.shape, s.shape)
            assert a.shape[2] <= m[lay]
    for u, (kv_full, ns_u) in enumerate(zip(full, ns)):
        n_new = int(kv_full.lengths.reshape(-1)[0])
        assert int(kv_app.lengths[u]) == n_new
        mine = _user(kv_app, u)
        for a, b in zip([*mine.keys, *mine.values], [*kv_full.keys, *kv_full.values]):
            w = min(n_new, b.shape[2])
            assert a.shape[2] >= w
            err = _max_err(a[:, :, a.shape[2] - w:], b[:, :, b.shape[2] - w:])
            assert err <= TOL, err
            worst = max(worst, err)
        with torch.no_grad():
            err = _max_err(model.score_candidates(mine, _t(ns_u)), model.score_candidates(kv_full, _t(ns_u)))
        assert err <= TOL, err
        worst = max(worst, err)
    return worst


def check_case(app: Appender, reqs: list, n_olds: list[int] | int, k: int) -> float:
    """Append events ``n_old .. n_old + k`` of each request to the state of its first n_old
    (one user's n_old per request), all users in one call."""
    schema, model = app.cfg.schema, app.model
    n_olds = [n_olds] * len(reqs) if isinstance(n_olds, int) else n_olds
    h_olds = [_hist(schema, r, n) for r, n in zip(reqs, n_olds)]
    ok, why = can_append(app.cfg, [int(h["s_length"][0]) for h in h_olds], k)
    assert ok, why  # the cases are chosen exact
    toks, full, ns = [], [], []
    with torch.no_grad():
        for r, n, h_old in zip(reqs, n_olds, h_olds):
            h_new, ns_r = encode_request(schema, _upto(r, n + k))
            kk, tokens, said = new_tokens(schema, h_old, h_new, k=k)
            assert kk == k, said
            toks.append(tokens)
            full.append(model.encode_user(_t(h_new)))
            ns.append(ns_r)
        tokens = {key: np.concatenate([t[key] for t in toks]) for key in toks[0] if key != "s_length"}
        kv_old = model.encode_user(_t(pad_streams(schema, [
            merge_stream(schema, encode_events(schema, r.history[:n])) for r, n in zip(reqs, n_olds)])))
        kv_static = append_user(model, kv_old, tokens, widths="static")
    return assert_matches_full(app, app.run(kv_old, tokens), kv_static, full, ns, k)


def _upto(req, n):
    import copy

    r = copy.copy(req)
    r.history = req.history[:n]
    return r


def _cases(cfg, n: int, seed: int) -> list[tuple[int, int]]:
    """``n`` exact (n_old, k) pairs over k = 1..32: the edges (empty cache, at the limit) and
    random ones in between; n_old counts events (one S-token each, timestamp-aware)."""
    rng = np.random.default_rng(seed)
    lmax = cfg.schema.s_max_len

    def cap(k):  # the most cached tokens an append of k stays exact for (INF: any)
        return max((n_old for n_old in range(0, lmax + 33) if can_append(cfg, n_old, k)[0]), default=0)

    out = []
    ks = [1, 2, 3, 4, 5, 7, 8, 13, 26, 27, 32] + [int(x) for x in rng.integers(1, 33, n)]
    for i, k in enumerate(ks[:n]):
        top = min(cap(k), lmax + 32 - k)
        n_old = [0, top][i % 2] if i < 8 else int(rng.integers(0, top + 1))
        out.append((n_old, k))
    return out


# ---- the models ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tiny_build, tmp_path_factory):
    """A copy of the session's tiny build (the trained tiny checkpoint exported), then its
    append graph (recorded in the copy's manifest; the shared build is left alone)."""
    import shutil

    from onetrans_trt.export.api import read_manifest
    from onetrans_trt.models.checkpoint import load_checkpoint

    build = tmp_path_factory.mktemp("append") / "tiny"
    shutil.copytree(tiny_build, build)
    ckpt = read_manifest(build)["checkpoint"]["path"]
    t0 = time.perf_counter()
    path = export_append(ckpt, build)
    EXPORT_SECONDS["trained tiny (2 layers, linear)"] = time.perf_counter() - t0
    return Appender(load_checkpoint(ckpt).eval(), path)


def _random(movielens, tmp_path_factory, name, **over):
    from onetrans_trt.models.config import ModelConfig
    from onetrans_trt.models.onetrans import OneTrans
    from tests.helpers import randomize

    model = randomize(OneTrans(ModelConfig.from_preset("tiny", movielens.schema, **over)), seed=3).eval()
    t0 = time.perf_counter()
    path = export_append(model, tmp_path_factory.mktemp(name))
    EXPORT_SECONDS[name] = time.perf_counter() - t0
    return Appender(model, path)


@pytest.fixture(scope="module")
def linear3(movielens, tmp_path_factory):
    return _random(movielens, tmp_path_factory, "random 3 layers, linear", n_layers=3)


@pytest.fixture(scope="module")
def off2(movielens, tmp_path_factory):
    return _random(movielens, tmp_path_factory, "random 2 layers, pyramid off", pyramid="off")


@pytest.fixture(scope="module", autouse=True)
def _report_export_time():
    yield
    if EXPORT_SECONDS:
        print("\nappend graph export: " + ", ".join(f"{k} {v:.1f} s" for k, v in EXPORT_SECONDS.items()))


# ---- the graph's interface ----------------------------------------------------------------------
def test_graph_io_names_shapes_and_manifest(trained):
    import onnx

    from onetrans_trt.export.api import read_manifest
    from onetrans_trt.trust import check_build

    cfg = trained.cfg
    m = onnx.load(str(trained.path))
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in m.graph.input}
    outs = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in m.graph.output}
    assert list(dims) == append_input_names(cfg) == ["s_type", "s_item_id", "s_release_year", "s_genre", "s_length",
                                                      "user_k_0", "user_v_0", "user_k_1", "user_v_1"]
    assert list(outs) == append_output_names(cfg) == ["user_k_0_new", "user_v_0_new", "user_k_1_new",
                                                      "user_v_1_new", "s_length_new"]
    h, dh = cfg.n_heads, cfg.d_model // cfg.n_heads
    assert dims["s_type"] == ["users", "new_tokens"] and dims["s_length"] == ["users"]
    assert dims["user_k_1"] == ["users", h, "kv_len_1", dh]
    assert outs["user_v_0_new"] == ["users", h, "kv_len_0_new", dh] and outs["s_length_new"] == ["users"]
    assert {(n.domain, n.op_type) for n in m.graph.node if n.domain} == {("onetrans", "TailCausalAttention")}
    assert any(f.name == "TailCausalAttention" for f in m.functions)  # ORT runs it through its function
    manifest = check_build(trained.path.parent)  # every graph passes the build's door, the manifest its schema
    entry = read_manifest(trained.path.parent)["graphs"]["user_encoder_append"]
    assert manifest["graphs"]["user_encoder_append"] == entry
    assert entry["file"] == APPEND_GRAPH and entry["windows"] == [50, 4] and entry["export_seconds"] > 0
    assert [i["name"] for i in entry["inputs"]] == append_input_names(cfg)
    assert {i["dtype"] for i in entry["inputs"] if i["name"].startswith("s_")} == {"int64"}
    assert {o["dtype"] for o in entry["outputs"] if o["name"].startswith("user_")} == {"float32"}


# ---- ORT append == PyTorch full encode ---------------------------------------------------------
@pytest.mark.parametrize("which, n_cases", [("trained", 24), ("linear3", 16), ("off2", 12)])
def test_ort_append_equals_full_encode(which, n_cases, request):
    app = request.getfixturevalue(which)
    cases = _cases(app.cfg, n_cases, seed=len(which))
    assert {k for _, k in cases} >= {1, 2, 3, 4, 5, 8}
    worst = 0.0
    for i, (n_old, k) in enumerate(cases):
        req = _request(app.cfg.schema, 1000 + i, n_old + k)
        worst = max(worst, check_case(app, [req], n_old, k))
    print(f"\n{which}: {len(cases)} appends, worst |ORT append - PyTorch full| {worst:.2e}")


@pytest.mark.parametrize("which", ["trained", "linear3", "off2"])
def test_several_users_at_once(which, request):
    """U = 3 users in one call, the same k new events each: the same cached length, then
    different ones (a left-padded cached state), then a user with an empty cache among others."""
    app = request.getfixturevalue(which)
    schema = app.cfg.schema
    for i, (n_olds, k) in enumerate([([20, 20, 20], 2), ([5, 12, 20], 3), ([0, 9, 17], 6), ([30, 2, 11], 27)]):
        if not can_append(app.cfg, max(n_olds), k)[0]:
            n_olds = [min(n, 4) for n in n_olds]
        reqs = [_request(schema, 300 + 10 * i + j, n + k) for j, n in enumerate(n_olds)]
        check_case(app, reqs, n_olds, k)


def test_append_of_an_append(trained, linear3):
    """The graph's own outputs (their widths included) are a cached state it appends to again."""
    for app in (trained, linear3):
        schema, model = app.cfg.schema, app.model
        req = _request(schema, 99, 50)
        n, state = 0, None
        with torch.no_grad():
            for k in (3, 1, 4, 2, 9, 1):
                if not can_append(app.cfg, n, k)[0]:
                    continue
                kv = model.encode_user(_t(_hist(schema, req, n))) if state is None else state
                h_old, h_new = _hist(schema, req, n), _hist(schema, req, n + k)
                _, tokens, _ = new_tokens(schema, h_old, h_new, k=k)
                tokens = {key: v for key, v in tokens.items() if key != "s_length"}
                state = app.run(kv, tokens)
                full = model.encode_user(_t(h_new))
                static = append_user(model, kv, tokens, widths="static")
                _, ns = encode_request(schema, _upto(req, n + k))
                assert_matches_full(app, state, static, [full], [ns], k)
                n += k
        assert n >= 10


def test_refused_where_no_append_exists(trained, tmp_path):
    """Timestamp-agnostic streams have no append graph, HyFormer not this one (its own:
    export/append_hyformer.py); another checkpoint's graph is
    never recorded in a build; nothing is written either way."""
    from onetrans_trt.data.synthetic import synthetic_schema
    from onetrans_trt.errors import BuildError, InputError
    from onetrans_trt.export.append import AppendGraph
    from onetrans_trt.export.api import sha256_file
    from onetrans_trt.models.checkpoint import save_checkpoint
    from onetrans_trt.models.config import ModelConfig
    from onetrans_trt.models.hyformer import HyFormer
    from onetrans_trt.models.onetrans import OneTrans

    agnostic = OneTrans(ModelConfig.from_preset("tiny", synthetic_schema(merge_mode="timestamp_agnostic")))
    with pytest.raises(InputError, match="timestamp_agnostic"):
        export_append(agnostic, tmp_path / "a")
    with pytest.raises(InputError, match="covers OneTrans, not family 'hyformer' .HyFormer: models.append_hyformer"):
        AppendGraph(HyFormer(ModelConfig.from_preset("tiny", trained.cfg.schema, family="hyformer")))
    bidi = HyFormer(ModelConfig.from_preset("tiny", trained.cfg.schema, family="hyformer", seq_attention="bidirectional"))
    with pytest.raises(InputError, match="bidirectionally"):
        export_append(bidi, tmp_path / "a")
    assert not (tmp_path / "a").exists()
    other = save_checkpoint(OneTrans(ModelConfig.from_preset("tiny", trained.cfg.schema)), tmp_path / "other")
    build = trained.path.parent
    before = sha256_file(build / "manifest.json"), sha256_file(trained.path)
    with pytest.raises(BuildError, match="not the checkpoint"):
        export_append(other, build)
    assert (sha256_file(build / "manifest.json"), sha256_file(trained.path)) == before


def test_zero_width_cache(trained, off2):
    """A user with no cached state at all: K/V of width 0 (kv_len_<l> = 0) and s_length 0."""
    for app in (trained, off2):
        schema, model = app.cfg.schema, app.model
        req = _request(schema, 5, 6)
        h_new, ns = encode_request(schema, req)
        _, tokens, _ = new_tokens(schema, _hist(schema, req, 0), h_new, k=6)
        tokens = {key: v for key, v in tokens.items() if key != "s_length"}
        h, dh = app.cfg.n_heads, app.cfg.d_model // app.cfg.n_heads
        empty = [torch.zeros(1, h, 0, dh) for _ in range(app.cfg.n_layers)]
        kv = UserKV(empty, empty, torch.zeros(1, dtype=torch.int64))
        with torch.no_grad():
            assert_matches_full(app, app.run(kv, tokens), append_user(model, kv, tokens, widths="static"),
                                [model.encode_user(_t(h_new))], [ns], 6)


# ---- the CLI: `export CKPT --out BUILD --append` -------------------------------------------------
def test_cli_export_append_writes_and_records_the_graph(tiny_build, tmp_path, monkeypatch):
    """``--append`` runs ``export_append`` after ``export_build`` (here stood in for by a copy of the
    session's tiny build, so only the append graph is traced) and the build records it."""
    import json
    import shutil

    from click.testing import CliRunner

    import onetrans_trt.export.api as api
    from onetrans_trt.cli import cli
    from onetrans_trt.export.api import read_manifest
    from onetrans_trt.trust import check_build

    out = tmp_path / "b"
    seen = {}

    def fake_export_build(ckpt, out_dir, **kw):
        seen.update(kw, ckpt=str(ckpt))
        shutil.copytree(tiny_build, out_dir)
        return read_manifest(out_dir)

    monkeypatch.setattr(api, "export_build", fake_export_build)
    ckpt = read_manifest(tiny_build)["checkpoint"]["path"]
    r = CliRunner().invoke(cli, ["export", ckpt, "--out", str(out), "--append", "--json"])
    assert r.exit_code == 0, r.output[-2000:]
    assert seen["ckpt"] == ckpt
    assert (out / APPEND_GRAPH).is_file()
    entry = read_manifest(out)["graphs"]["user_encoder_append"]
    assert entry["file"] == APPEND_GRAPH and entry["windows"] == [50, 4]
    assert json.loads(r.stdout)["manifest"]["graphs"]["user_encoder_append"] == entry
    check_build(out)


def test_cli_export_append_refused_before_any_work(movielens, tmp_path, monkeypatch):
    """timestamp_agnostic OneTrans and baseline checkpoints: exit 2, one line naming --append, nothing
    written (export_build is never reached). HyFormer appends (tests/export/test_append_hyformer_graph.py)."""
    from click.testing import CliRunner

    import onetrans_trt.export.api as api
    from onetrans_trt.cli import cli
    from onetrans_trt.data.synthetic import synthetic_schema
    from onetrans_trt.models.checkpoint import save_checkpoint
    from onetrans_trt.models.config import ModelConfig
    from onetrans_trt.models.baseline import Baseline
    from onetrans_trt.models.onetrans import OneTrans

    def boom(*a, **kw):
        raise AssertionError("export_build ran")

    monkeypatch.setattr(api, "export_build", boom)
    agnostic = save_checkpoint(OneTrans(ModelConfig.from_preset(
        "tiny", synthetic_schema(merge_mode="timestamp_agnostic"))), tmp_path / "agnostic")
    base = save_checkpoint(Baseline(ModelConfig.from_preset("tiny", movielens.schema, family="baseline")),
                           tmp_path / "base")
    from onetrans_trt.models.hyformer import HyFormer

    bidi = save_checkpoint(HyFormer(ModelConfig.from_preset("tiny", movielens.schema, family="hyformer")),
                           tmp_path / "bidi")  # the paper's form: bidirectional sequence attention
    for ckpt, words in ((agnostic, ["--append", "timestamp_agnostic", "timestamp_aware"]),
                        (base, ["--append", "baseline", "OneTrans and HyFormer"]),
                        (bidi, ["--append", "bidirectionally", "causal"])):
        out = tmp_path / "out"
        r = CliRunner().invoke(cli, ["export", str(ckpt), "--out", str(out), "--append"])
        assert r.exit_code == 2, r.output[-2000:]
        lines = [x for x in r.stderr.splitlines() if x.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
        assert all(w in lines[0] for w in words), lines[0]
        assert not out.exists()
