"""`validate --inputs`: exactly the user's requests (npz, Polygraphy JSON, request JSONL for our
own builds), the report says which data it used, and bad files are one clear error."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from onetrans_trt.data.feeds import input_kind, load_feed_list, split_feeds
from onetrans_trt.errors import InputError


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "onetrans_trt.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd)


# ---- the file formats ---------------------------------------------------------------------
def test_npz_indexed_and_bare_and_polygraphy_json_read_the_same_requests(tmp_path):
    from polygraphy.json import save_json

    rng = np.random.default_rng(0)
    reqs = [{"a": rng.normal(size=(1, 3)).astype(np.float32), "b": np.arange(i + 1, dtype=np.int64)}
            for i in range(3)]
    np.savez(tmp_path / "many.npz", **{f"{i}/{k}": v for i, r in enumerate(reqs) for k, v in r.items()})
    np.savez(tmp_path / "one.npz", **reqs[1])
    save_json(reqs, str(tmp_path / "many.json"))
    save_json(reqs[2], str(tmp_path / "one.json"))
    for name, want in (("many.npz", reqs), ("one.npz", [reqs[1]]), ("many.json", reqs), ("one.json", [reqs[2]])):
        got, source = load_feed_list(tmp_path / name)
        assert len(got) == len(want) and name in source and f"{len(want)} request" in source
        for g, w in zip(got, want):
            assert sorted(g) == sorted(w)
            for k in w:
                np.testing.assert_array_equal(g[k], w[k])
                assert g[k].dtype == w[k].dtype
    assert input_kind(tmp_path / "many.json") == "polygraphy"
    (tmp_path / "r.jsonl").write_text('{"history": [], "candidates": []}\n')
    assert input_kind(tmp_path / "r.jsonl") == "requests"


@pytest.mark.parametrize("make,msg", [
    (lambda p: np.savez(p, **{"0/a": np.zeros(2), "b": np.zeros(2)}), "mixes"),
    (lambda p: np.savez(p, **{"0/a": np.zeros(2), "2/a": np.zeros(2)}), "without gaps"),
    (lambda p: np.savez(p, **{"x/a": np.zeros(2)}), "not '<request index>/<input name>'"),
    (lambda p: np.savez(p, a=np.array(["s"])), "dtype"),
    (lambda p: np.savez(p, a=np.array([1.0, np.nan])), "NaN"),
    (lambda p: np.savez(p, a=np.array([{"x": 1}], dtype=object)), "not a readable .npz"),
    (lambda p: p.write_bytes(b"PK\x03\x04garbage"), "not a readable .npz"),
    (lambda p: p.write_text("hello"), "neither"),
    (lambda p: p.write_text('{"__polygraphy_encoded_x": 1'), "not readable as Polygraphy JSON"),
])
def test_bad_input_files_are_one_clear_error(tmp_path, make, msg):
    p = tmp_path / "in.npz"
    make(p)
    with pytest.raises(InputError, match=msg):
        load_feed_list(p)


def test_object_arrays_are_never_unpickled(tmp_path):
    """A pickled object array in an npz would run code on load: it is refused, not loaded."""
    import pickle

    class Boom:
        def __reduce__(self):
            return (Path(tmp_path / "ran").touch, ())

    np.savez(tmp_path / "evil.npz", a=np.array([Boom()], dtype=object))
    with pytest.raises(InputError):
        load_feed_list(tmp_path / "evil.npz")
    assert not (tmp_path / "ran").exists()
    assert pickle  # the payload above is a pickle; nothing of it ran


def test_split_feeds_names_what_is_missing_or_unknown(tmp_path):
    f = [{"u": np.zeros(1), "c": np.zeros(2)}]
    assert split_feeds("x", f, ["u"], ["c"])[0][1]["c"].shape == (2,)
    with pytest.raises(InputError, match=r"lacks \['c'\]"):
        split_feeds("x", [{"u": np.zeros(1)}], ["u"], ["c"])
    with pytest.raises(InputError, match=r"has \['typo'\]"):
        split_feeds("x", [{**f[0], "typo": np.zeros(1)}], ["u"], ["c"])


# ---- our own builds -------------------------------------------------------------------------
def _our_requests(build: Path, n: int):
    from onetrans_trt.data.movielens import MovieLens
    from onetrans_trt.export.api import load_onetrans_config

    cfg = load_onetrans_config(build)
    ml = MovieLens(max_history=cfg.schema.max_history, merge_mode=cfg.schema.merge_mode)
    return cfg, [r for r, _ in ml.requests(n, n_candidates=7, seed=5)]


def _as_feeds(cfg, reqs):
    from onetrans_trt.data.requests import encode_request

    return [{**h, **ns} for h, ns in (encode_request(cfg.schema, r) for r in reqs)]


def test_our_build_validates_on_exactly_the_given_npz_and_polygraphy_json(tiny_build, tmp_path):
    from polygraphy.json import save_json

    cfg, reqs = _our_requests(tiny_build, 5)
    feeds = _as_feeds(cfg, reqs)
    np.savez(tmp_path / "in.npz", **{f"{i}/{k}": v for i, f in enumerate(feeds) for k, v in f.items()})
    save_json(feeds, str(tmp_path / "in.json"))
    for name in ("in.npz", "in.json"):
        p = _cli("validate", tiny_build, "--inputs", tmp_path / name, "--backends", "ort",
                 "--json-out", tmp_path / f"{name}.report.json", "--count", 100)
        assert p.returncode == 0, p.stderr[-2000:]
        rep = json.loads((tmp_path / f"{name}.report.json").read_text())
        assert rep["requests"]["count"] == 5  # exactly the file's requests, not --count
        assert str(tmp_path / name) in rep["requests"]["source"] and "data: --inputs" in p.stdout
        assert rep["requests"]["labelled"] == 0 and "metrics" not in rep["backends"]["ort"]["end_to_end"]


def test_our_build_takes_request_jsonl_through_inputs(tiny_build, tmp_path):
    _, reqs = _our_requests(tiny_build, 3)
    lines = [json.dumps({"user": r.user, "context": r.context, "history": [dict(e) for e in r.history],
                         "candidates": r.candidates}) for r in reqs]
    (tmp_path / "r.jsonl").write_text("\n".join(lines) + "\n")
    p = _cli("validate", tiny_build, "--inputs", tmp_path / "r.jsonl", "--backends", "ort",
             "--json-out", tmp_path / "rep.json")
    assert p.returncode == 0, p.stderr[-2000:]
    rep = json.loads((tmp_path / "rep.json").read_text())
    assert rep["requests"]["count"] == 3 and "r.jsonl" in rep["requests"]["source"]


def test_our_build_refuses_feeds_that_do_not_fit_the_graphs(tiny_build, tmp_path):
    cfg, reqs = _our_requests(tiny_build, 2)
    feeds = _as_feeds(cfg, reqs)
    name = next(k for k in feeds[0] if k.startswith("s_") and k != "s_length")
    cases = {
        "missing": [{k: v for k, v in f.items() if k != name} for f in feeds],
        "typo": [{**f, "ns_bogus": np.zeros(3, np.int64)} for f in feeds],
        "dtype": [{**f, name: f[name].astype(np.float64)} for f in feeds],
        "two users": [{**f, **{k: np.concatenate([v, v]) for k, v in f.items() if k.startswith("s_")}}
                      for f in feeds],
    }
    for label, bad in cases.items():
        path = tmp_path / f"{label.replace(' ', '_')}.npz"
        np.savez(path, **{f"{i}/{k}": v for i, f in enumerate(bad) for k, v in f.items()})
        p = _cli("validate", tiny_build, "--inputs", path, "--backends", "ort", "--json-out", tmp_path / f"{label}.json")
        assert p.returncode == 2, (label, p.stderr[-1500:])
        assert len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr, p.stderr
        assert not (tmp_path / f"{label}.json").exists()


def test_one_source_at_a_time_and_none_is_an_error(tiny_build, tmp_path):
    np.savez(tmp_path / "x.npz", a=np.zeros(1))
    p = _cli("validate", tiny_build, "--inputs", tmp_path / "x.npz", "--data", "ml-100k")
    assert p.returncode == 2 and "exclude each other" in p.stderr
    p = _cli("validate", tiny_build)
    assert p.returncode == 2 and "never picks its data" in p.stderr



# ---- module builds --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def module_build(tmp_path_factory):
    import torch

    from onetrans_trt.export.module import export_module
    from tests.protocol.test_protocol import example

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    mod = example("fused_qkv_cls")
    out = tmp_path_factory.mktemp("module") / "b"
    export_module(mod.factory(), mod.SPEC, None, out, check=False)
    torch.set_num_threads(before)
    return mod, out


def _module_requests(mod, n: int):
    from onetrans_trt.protocol import SplitSpec, random_inputs

    spec = SplitSpec.parse(mod.SPEC)
    rng = np.random.default_rng(3)
    out = []
    for i in range(n):
        u, c = random_inputs(spec, users=1 + i % 2, candidates=1 + 3 * i, lengths=[0, spec.history.max][:1 + i % 2],
                             rng=rng)
        out.append({k: v.numpy() for k, v in {**u, **c}.items()})
    return out


def test_module_build_validates_on_exactly_the_given_requests(module_build, tmp_path):
    from polygraphy.json import save_json

    mod, build = module_build
    reqs = _module_requests(mod, 3)
    np.savez(tmp_path / "in.npz", **{f"{i}/{k}": v for i, r in enumerate(reqs) for k, v in r.items()})
    save_json(reqs, str(tmp_path / "in.json"))
    ref = f"{Path(mod.__file__)}:factory"
    for name in ("in.npz", "in.json"):
        p = _cli("validate", build, "--module", ref, "--inputs", tmp_path / name, "--json-out", tmp_path / "r.json")
        assert p.returncode == 0, p.stderr[-2000:]
        rep = json.loads((tmp_path / "r.json").read_text())
        # one row per user of each request: 1 + 2 + 1
        assert rep["cases"] == 4 and sorted({r["request"] for r in rep["rows"]}) == [0, 1, 2]
        assert [r["candidates"] for r in rep["rows"]] == [1, 4, 4, 7]
        assert str(tmp_path / name) in rep["data"] and f"data: --inputs {tmp_path / name}" in p.stdout
        assert rep["max_abs"] <= 1e-4


def test_module_build_refuses_inputs_that_do_not_fit_the_spec(module_build, tmp_path):
    mod, build = module_build
    reqs = _module_requests(mod, 1)
    name = next(iter(reqs[0]))
    ref = f"{Path(mod.__file__)}:factory"
    bads = {"missing": [{k: v for k, v in reqs[0].items() if k != name}],
            "dtype": [{**reqs[0], name: reqs[0][name].astype(np.float64 if reqs[0][name].dtype.kind != "f"
                                                                 else np.int64)}],
            "rank": [{**reqs[0], name: reqs[0][name][..., None]}]}
    for label, bad in bads.items():
        np.savez(tmp_path / f"{label}.npz", **{f"{i}/{k}": v for i, r in enumerate(bad) for k, v in r.items()})
        p = _cli("validate", build, "--module", ref, "--inputs", tmp_path / f"{label}.npz")
        assert p.returncode == 2, (label, p.stderr[-1500:])
        assert len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr, p.stderr
