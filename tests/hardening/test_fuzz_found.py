"""Inputs the request fuzz found, kept as regression tests (test_fuzz.py, test_fuzz_cli.py).

- ``validate`` failed (exit 1, "top-10 overlap 0.5 < 0.95") on a request whose candidates are
  one item given many times: the reference scores them all the same, ONNX Runtime's rows
  differ in the last bit (alternate rows), so the top 10 by a stable sort were other rows of
  the same item. ``ranking_agreement`` now counts a candidate the reference ties at its k-th
  score as in its top k.
- ``load_requests`` raised ``ValueError: embedded null byte`` for a path holding a NUL byte
  (only a Python caller can pass one): now our ``RequestError`` ("cannot read").
- ``rank --limits`` with ``max_request_bytes`` of 64 MiB crashed with ``MemoryError`` (the
  request file was read with one ``read(bound + 1)``, which allocates the bound first: 1,024
  requests of 64 MiB, 64 GiB); past ``sys.maxsize`` an ``OverflowError``. The file is now
  read in steps.
- ``validate --inputs /proc/self/mem`` raised ``OSError`` (EIO) while sniffing the file's kind.
- ``validate --inputs`` of graph feeds holding an index outside a table (-1, 2**31) raised
  ``IndexError`` from the PyTorch reference; each index is now checked against its table.
- ``validate --inputs`` of a Polygraphy JSON holding an undecodable array (and ``validate
  --goldens`` of such files) printed Polygraphy's own "[!] Could not decode ..." line on
  stderr (and its "[W] 'colored' module is not installed" on stdout) before our error line;
  Polygraphy's output now goes to the log.
- A path holding a newline breaks the one-line ``error:`` promise of every command: the
  message quoted the path as given. Fixed in the CLI's error line (cli.py): ``\\n`` and ``\\r``
  are escaped as repr would.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from onetrans_trt.calibrate.quality import ranking_agreement
from onetrans_trt.cli import cli
from onetrans_trt.errors import RequestError


def test_exact_ties_of_the_reference_are_all_in_its_top_k():
    ref = np.full(20, -0.85891753, np.float32)
    got = ref.copy()
    got[1::2] = np.nextafter(ref[1::2], np.float32(0))  # alternate rows one ulp higher, as ORT gave
    assert ranking_agreement(got, ref) == (1.0, 1.0)
    # without ties nothing changes: the plain set overlap of the two top-10s
    rng = np.random.default_rng(0)
    for _ in range(200):
        b = rng.normal(size=rng.integers(1, 40))
        a = b + rng.normal(scale=rng.choice([0.0, 0.01, 1.0]), size=b.size)
        k = min(10, b.size)
        want = len(set(np.argsort(-a, kind="stable")[:k]) & set(np.argsort(-b, kind="stable")[:k])) / k
        assert ranking_agreement(a, b)[0] == want
    # a tie below the reference's k-th score is no excuse
    b = np.array([5.0, 4, 3, 2, 2, 1, 1, 1])
    a = np.array([5.0, 4, 3, 2, 1, 9, 1, 1])
    assert ranking_agreement(a, b, k=4)[0] == 0.75  # 5 (ref 1 < its 4th, 2) is in a's top 4
    assert ranking_agreement(np.array([5.0, 4, 3, 1, 2, 1, 1, 1]), b, k=4)[0] == 1.0  # either 2


def test_validate_passes_a_request_of_one_item_many_times(tiny_build, movielens, tmp_path):
    """Fuzz input: user 860's request with one candidate 20 times (the fuzz had 10,001)."""
    reqs = [r.to_json() for r, _ in movielens.requests(5, n_candidates=3, seed=4)]
    req = next(r for r in reqs if r["user"]["user_id"] == "860")
    req["candidates"] = [{"item_id": "347", "release_year": "1997", "genres": ["Comedy", "Drama"]}] * 20
    path = tmp_path / "r.json"
    path.write_text(json.dumps(req))
    r = CliRunner().invoke(cli, ["validate", str(tiny_build), "--requests", str(path), "--backends", "ort",
                                 "--json"])
    assert r.exit_code == 0, r.output[-2000:]
    assert json.loads(r.stdout)["backends"]["ort"]["end_to_end"]["ranking"]["top10_overlap_mean"] == 1.0


@pytest.mark.parametrize("tail", ["\x00", "\x00.json", "/\x00"])
def test_a_nul_byte_in_a_request_path_is_our_error(tmp_path, tail):
    from onetrans_trt.data.requests import RequestLimits, load_requests

    good = tmp_path / "r.json"
    good.write_text('{"candidates": []}')
    for fn in (load_requests, RequestLimits.load):
        with pytest.raises(RequestError) as e:
            fn(str(good) + tail)
        assert "embedded null byte" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("command", ["rank", "validate"])
def test_a_newline_in_a_request_path_is_still_one_line(command, tiny_ckpt, tiny_build, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a\nb.json").write_text("{")
    argv = (["rank", str(tiny_ckpt), "--request"] if command == "rank" else
            ["validate", str(tiny_build), "--backends", "ort", "--requests"])
    r = CliRunner().invoke(cli, argv + ["a\nb.json"])
    assert r.exit_code == 2
    assert len(r.stderr.splitlines()) == 1 and "a\\nb.json" in r.stderr, r.stderr


@pytest.mark.parametrize("max_bytes", [64 << 20, 1 << 40, 10 ** 130])
def test_a_large_request_byte_limit_reads_the_file(tmp_path, max_bytes):
    from onetrans_trt.data.requests import RequestLimits, load_requests

    p = tmp_path / "r.json"
    p.write_text('{"candidates": []}')
    assert [r.candidates for r in load_requests(p, RequestLimits(max_request_bytes=max_bytes))] == [[]]


def test_rank_with_a_64_mib_request_limit(tiny_ckpt, tmp_path):
    (tmp_path / "r.json").write_text('{"candidates": []}')
    (tmp_path / "limits.json").write_text('{"max_request_bytes": 67108864}')
    r = CliRunner().invoke(cli, ["rank", str(tiny_ckpt), "--request", str(tmp_path / "r.json"), "--limits",
                                 str(tmp_path / "limits.json")])
    assert r.exit_code == 0 and r.exception is None, (r.exception, r.output[-1000:])
    assert json.loads(r.stdout)["order"] == []


def _one_line_exit_2(r) -> str:
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    assert r.exit_code == 2 and r.stdout == "", r.output[-1000:]
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    return lines[0]


def test_validate_inputs_that_cannot_be_read(tiny_build):
    r = CliRunner().invoke(cli, ["validate", str(tiny_build), "--inputs", "/proc/self/mem", "--backends", "ort"])
    assert _one_line_exit_2(r) == "error: --inputs /proc/self/mem: cannot read (Input/output error)"


@pytest.mark.parametrize("name, value", [("ns_item_id", -1), ("s_item_id", 2 ** 31), ("ns_genres", 10 ** 6),
                                         ("s_type", 7), ("s_length", 10 ** 4)])
def test_validate_inputs_with_an_index_outside_its_table(tiny_build, tmp_path, name, value):
    from tests.hardening.fuzz_requests import valid_feeds

    feeds = valid_feeds(tiny_build)
    feeds[1][name] = np.full_like(feeds[1][name], value)
    p = tmp_path / "feeds.npz"
    np.savez(p, **{f"{i}/{k}": v for i, f in enumerate(feeds) for k, v in f.items()})
    r = CliRunner().invoke(cli, ["validate", str(tiny_build), "--inputs", str(p), "--backends", "ort"])
    line = _one_line_exit_2(r)
    assert line.startswith(f"error: --inputs {p}: request 1 {name} holds ") and "its values must be in 0.." in line


BAD_POLYGRAPHY = '[{"s_type": {"array": "xx", "polygraphy_class": "nfarray"}}]'


def test_validate_inputs_of_undecodable_polygraphy_json(tiny_build, tmp_path):
    p = tmp_path / "feeds.json"
    p.write_text(BAD_POLYGRAPHY)
    r = CliRunner().invoke(cli, ["validate", str(tiny_build), "--inputs", str(p), "--backends", "ort"])
    assert _one_line_exit_2(r) == f"error: --inputs {p}: not readable as Polygraphy JSON (PolygraphyException)"


def test_validate_goldens_of_undecodable_polygraphy_json(tiny_build, tmp_path):
    g = tmp_path / "goldens"
    g.mkdir()
    (g / "meta.json").write_text("{}")
    for name in ("user_encoder_inputs", "user_encoder_outputs", "candidate_scorer_inputs", "candidate_scorer_outputs"):
        (g / f"{name}.json").write_text(BAD_POLYGRAPHY)
    r = CliRunner().invoke(cli, ["validate", str(tiny_build), "--goldens", str(g)])
    assert _one_line_exit_2(r) == f"error: {g}: unreadable goldens (PolygraphyException)"
