"""Per-sequence caps from the data (``MovieLens.sequence_caps``, ``train --seq-max-len``)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from onetrans_trt.cli import cli
from onetrans_trt.data.movielens import Split


def _counts(movielens, split, j, sample=5000, seed=0):
    idx = np.random.default_rng(seed).choice(len(split), min(sample, len(split)), replace=False)
    return (movielens.batch(split, idx)["s_type"] == j + 1).sum(axis=1)


def test_caps_are_the_smallest_multiple_of_8_covering_97_percent(movielens):
    caps = movielens.sequence_caps(movielens.train)
    assert caps is not None and len(caps) == movielens.schema.num_sequences
    for j, cap in enumerate(caps):
        counts = _counts(movielens, movielens.train, j)
        assert cap % 8 == 0 or cap == movielens.schema.max_history
        assert (counts <= cap).mean() >= 0.97
        if 8 < cap < movielens.schema.max_history:  # one step less would not cover
            assert (counts <= cap - 8).mean() < 0.97, (j, cap)
    # full coverage: no sampled sequence loses an event
    full = movielens.sequence_caps(movielens.train, coverage=1.0) or [movielens.schema.max_history] * 3
    assert all(c >= int(_counts(movielens, movielens.train, j).max()) for j, c in enumerate(full))


def test_an_empty_split_and_a_split_with_no_long_sequence(movielens):
    empty = Split(movielens.train.users[:0], movielens.train.positions[:0], movielens.train.labels[:0])
    assert movielens.sequence_caps(empty) is None  # nothing to learn from: no cap
    # first events of users: short histories, every cap at the smallest step
    first = np.flatnonzero(movielens.train.positions < 3)[:200]
    short = Split(movielens.train.users[first], movielens.train.positions[first], movielens.train.labels[first])
    assert movielens.sequence_caps(short) == [8] * movielens.schema.num_sequences


@pytest.mark.parametrize("value,want", [(None, "auto"), pytest.param("off", None, marks=pytest.mark.heavy),
                                        pytest.param("40,16,8", [40, 16, 8], marks=pytest.mark.heavy)])
def test_train_writes_the_caps_it_was_given(value, want, tmp_path, movielens):
    out = tmp_path / "ck"
    args = ["train", "--model", "hyformer", "--preset", "tiny", "--epochs", "1", "--limit", "64", "--out", str(out)]
    r = CliRunner().invoke(cli, args + ([] if value is None else ["--seq-max-len", value]))
    assert r.exit_code == 0, r.output
    cfg = json.loads((out / "config.json").read_text())
    if want == "auto":  # from the training samples it used (the first 64)
        tr = movielens.train
        want = movielens.sequence_caps(Split(tr.users[:64], tr.positions[:64], tr.labels[:64]))
    assert cfg["seq_max_len"] == want
    info = CliRunner().invoke(cli, ["info", str(out)])
    assert info.exit_code == 0, info.output
    line = next(x for x in info.output.splitlines() if x.strip().startswith("HyFormer:"))
    if want:
        assert line.endswith("; newest events kept: " + ", ".join(
            f"{q.name} {c}" for q, c in zip(movielens.schema.sequences, want))), line
    else:
        assert "newest" not in line, line
    assert "1 global query," in line, line
