"""MovieLens-100K: fetched at set-up, never committed (its licence forbids redistribution).

The files come from the ``recbole==1.2.1`` wheel on the package index
(``pip download --no-deps``, then ``recbole/dataset_example/ml-100k/``) and are cached in
the data directory (default ``~/.cache/onetrans-trt``, or ``$ONETRANS_TRT_DATA``).

Samples: every rating event is one sample; the user's earlier events (ordered by
``(timestamp, item_id)``) are its history, newest ``max_history`` kept. Labels:
``like`` = rating >= 4 and ``love`` = rating == 5. Past events go to one of three
behaviour sequences by their rating bucket (``rated_high`` 4-5, ``rated_mid`` 3,
``rated_low`` 1-2), merged by time (timestamp-aware) or by importance (agnostic). The
split is per user in time: each user's last 20% of events are test.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from onetrans_trt import interrupts
from onetrans_trt.data.requests import Events, Request, encode_ns, merge_stream, pad_streams
from onetrans_trt.data.schema import Feature, FeatureSchema, Sequence, Table
from onetrans_trt.errors import DataError

FILES = ("ml-100k.inter", "ml-100k.user", "ml-100k.item")
WHEEL = "recbole==1.2.1"
TASKS = ["like", "love"]
SEQUENCES = ["rated_high", "rated_mid", "rated_low"]  # importance order
AGE_BUCKETS = [(0, 17, "<18"), (18, 24, "18-24"), (25, 34, "25-34"), (35, 44, "35-44"),
               (45, 49, "45-49"), (50, 55, "50-55"), (56, 200, "56+")]
TEST_FRACTION = 0.2


def default_data_dir() -> Path:
    return Path(os.environ.get("ONETRANS_TRT_DATA", Path.home() / ".cache" / "onetrans-trt"))


def dataset_dir(data_dir: str | Path | None = None) -> Path:
    return Path(data_dir or default_data_dir()) / "ml-100k"


def fetch_movielens(data_dir: str | Path | None = None, *, quiet: bool = True) -> Path:
    """Make sure the three MovieLens-100K files are in ``data_dir/ml-100k``; return that dir."""
    target = dataset_dir(data_dir)
    if all((target / f).is_file() for f in FILES):
        return target
    try:
        return _fetch_into(target, quiet)
    except OSError as e:
        raise DataError(f"{target.parent}: cannot write the data cache there ({e.strerror or e}); pass "
                        f"--data-dir DIR (or set ONETRANS_TRT_DATA) to a writable directory") from None


def _fetch_into(target: Path, quiet: bool) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    with interrupts.temporary_directory(dir=target.parent, prefix=".fetch-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "-d", tmp, WHEEL]
        if quiet:
            cmd.insert(4, "-q")
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("recbole-*.whl"))
        if proc.returncode != 0 or not wheels:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            raise DataError(f"could not download {WHEEL} to extract MovieLens-100K "
                            f"({tail[0]}); check network access to the package index")
        staged = Path(tmp) / "ml-100k"
        staged.mkdir()
        try:
            with zipfile.ZipFile(wheels[0]) as zf:
                for f in FILES:
                    with zf.open(f"recbole/dataset_example/ml-100k/{f}") as src, open(staged / f, "wb") as dst:
                        shutil.copyfileobj(src, dst)
        except (KeyError, zipfile.BadZipFile) as e:
            raise DataError(f"{wheels[0].name} does not hold MovieLens-100K as expected ({e})") from None
        if target.exists():
            shutil.rmtree(target)
        os.replace(staged, target)
    return target


def _read_tsv(path: Path) -> list[list[str]]:
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except FileNotFoundError:
        raise DataError(f"{path}: missing; run `onetrans-trt fetch-data` (or `make data`)") from None
    if not lines:
        raise DataError(f"{path}: empty file")
    return [line.split("\t") for line in lines[1:] if line.strip()]


def _age_bucket(age: str) -> str:
    try:
        a = int(age)
    except ValueError:
        return "unknown"
    return next((name for lo, hi, name in AGE_BUCKETS if lo <= a <= hi), "unknown")


def _bucket_sequence(rating: float) -> str:
    return "rated_high" if rating >= 4 else ("rated_mid" if rating >= 3 else "rated_low")


@dataclass
class Split:
    users: np.ndarray  # [N] user row
    positions: np.ndarray  # [N] index of the event in the user's time-ordered events
    labels: np.ndarray  # [N, 2] float32

    def __len__(self) -> int:
        return int(self.users.shape[0])


class MovieLens:
    """MovieLens-100K as samples, requests and a feature schema."""

    def __init__(self, data_dir: str | Path | None = None, *, max_history: int = 50,
                 merge_mode: str = "timestamp_aware", fetch: bool = True):
        d = fetch_movielens(data_dir) if fetch else dataset_dir(data_dir)
        users = _read_tsv(d / "ml-100k.user")
        items = _read_tsv(d / "ml-100k.item")
        inter = _read_tsv(d / "ml-100k.inter")
        try:
            self.user_raw = {r[0]: {"user_id": r[0], "age": _age_bucket(r[1]), "gender": r[2],
                                    "occupation": r[3]} for r in users}
            self.item_raw = {}
            for r in items:
                genres = r[3].split() if len(r) > 3 else []
                year = r[2].strip() if len(r) > 2 and r[2].strip() else "unknown"
                self.item_raw[r[0]] = {"item_id": r[0], "release_year": year, "genres": genres}
            events = [(r[0], r[1], float(r[2]), float(r[3])) for r in inter]
        except (IndexError, ValueError) as e:
            raise DataError(f"{d}: unexpected MovieLens file layout ({e})") from None
        self.schema = self._schema(max_history, merge_mode)
        self._index_events(events)

    # ---- schema --------------------------------------------------------------------
    def _schema(self, max_history: int, merge_mode: str) -> FeatureSchema:
        def table(name: str, tokens, dim: int) -> Table:
            toks = sorted(set(tokens))
            return Table(name, len(toks), dim, tokens=toks)

        tables = {
            "user_id": table("user_id", self.user_raw, 16),
            "age": table("age", [u["age"] for u in self.user_raw.values()], 4),
            "gender": table("gender", [u["gender"] for u in self.user_raw.values()], 2),
            "occupation": table("occupation", [u["occupation"] for u in self.user_raw.values()], 4),
            "item_id": table("item_id", self.item_raw, 16),
            "year": table("year", [i["release_year"] for i in self.item_raw.values()], 4),
            "genre": table("genre", [g for i in self.item_raw.values() for g in i["genres"]], 4),
        }
        features = [
            Feature("user_id", "categorical", "user", table="user_id"),
            Feature("age", "categorical", "user", table="age"),
            Feature("gender", "categorical", "user", table="gender"),
            Feature("occupation", "categorical", "user", table="occupation"),
            Feature("item_id", "categorical", "item", table="item_id"),
            Feature("release_year", "categorical", "item", table="year"),
            Feature("genres", "multihot", "item", table="genre", max_len=6),
        ]
        fields = {"item_id": "item_id", "release_year": "year", "genre": "genre"}
        seqs = [Sequence(name, dict(fields)) for name in SEQUENCES]
        return FeatureSchema(tables, features, seqs, max_history=max_history, merge_mode=merge_mode)

    # ---- events and samples ----------------------------------------------------------
    def _index_events(self, events: list[tuple[str, str, float, float]]) -> None:
        s = self.schema
        by_user: dict[str, list] = {}
        for u, i, r, t in events:
            by_user.setdefault(u, []).append((t, int(i) if i.isdigit() else 0, i, r))
        self.user_ids = sorted(by_user, key=lambda x: int(x) if x.isdigit() else x)
        self.events: list[Events] = []
        self.raw_events: list[list[tuple[float, str, float]]] = []
        self.ratings: list[np.ndarray] = []
        users_s, pos_s, labels_s, test_s = [], [], [], []
        t_year, t_genre, t_item = s.tables["year"], s.tables["genre"], s.tables["item_id"]
        for row, u in enumerate(self.user_ids):
            evs = sorted(by_user[u])
            n = len(evs)
            types = np.array([s.sequence_index(_bucket_sequence(r)) + 1 for _, _, _, r in evs], np.int64)
            ts = np.array([t for t, _, _, _ in evs], np.float64)
            items = [i for _, _, i, _ in evs]
            fields = {
                "item_id": np.array([t_item.index(i) for i in items], np.int64),
                "release_year": np.array([t_year.index(self.item_raw.get(i, {}).get("release_year"))
                                          for i in items], np.int64),
                "genre": np.array([t_genre.index((self.item_raw.get(i, {}).get("genres") or [None])[0])
                                   for i in items], np.int64),
            }
            self.events.append(Events(types, ts, fields))
            self.raw_events.append([(t, i, r) for t, _, i, r in evs])
            ratings = np.array([r for _, _, _, r in evs], np.float32)
            self.ratings.append(ratings)
            n_test = max(1, int(round(n * TEST_FRACTION)))
            users_s.append(np.full(n, row))
            pos_s.append(np.arange(n))
            labels_s.append(np.stack([ratings >= 4, ratings == 5], axis=1).astype(np.float32))
            test_s.append(np.arange(n) >= n - n_test)
        users, pos = np.concatenate(users_s), np.concatenate(pos_s)
        labels, test = np.concatenate(labels_s), np.concatenate(test_s)
        self.train = Split(users[~test], pos[~test], labels[~test])
        self.test = Split(users[test], pos[test], labels[test])
        self.n_train_events = [int((~t).sum()) for t in test_s]

    def _item_dict(self, item: str) -> dict[str, Any]:
        raw = self.item_raw.get(item, {"item_id": item, "release_year": "unknown", "genres": []})
        return dict(raw)

    def batch(self, split: Split, idx: np.ndarray) -> dict[str, np.ndarray]:
        """Tensors for samples ``idx`` of ``split`` (unified-model input, B pairs)."""
        s = self.schema
        streams = []
        for j in idx:
            ev = self.events[split.users[j]]
            p = int(split.positions[j])
            streams.append(merge_stream(s, ev.slice(max(0, p - s.max_history), p)))
        out = pad_streams(s, streams)
        users = [self.user_raw[self.user_ids[split.users[j]]] for j in idx]
        items = [self._item_dict(self.raw_events[split.users[j]][int(split.positions[j])][1]) for j in idx]
        out.update(encode_ns(s, users, {}, items, where="movielens"))
        return out

    def sequence_caps(self, split: Split, *, coverage: float = 0.97, multiple: int = 8, sample: int = 5000,
                      seed: int = 0) -> list[int] | None:
        """Per-sequence event caps from the data (HyFormer's ``seq_max_len``): for each sequence,
        the fewest events, a multiple of ``multiple``, that hold all of sequence j's events in at
        least ``coverage`` of ``split``'s samples (at most ``sample`` of them, drawn with ``seed``),
        never more than ``max_history``. None when no sequence would be capped (or no sample)."""
        s = self.schema
        n = len(split)
        if not n:
            return None
        types = self.batch(split, np.random.default_rng(seed).choice(n, min(sample, n), replace=False))["s_type"]
        caps = []
        for j in range(s.num_sequences):
            counts = (types == j + 1).sum(axis=1)
            need = int(np.ceil(np.quantile(counts, coverage)))
            caps.append(min(s.max_history, max(multiple, -(-need // multiple) * multiple)))
        return None if all(c >= s.max_history for c in caps) else caps

    # ---- serving requests ------------------------------------------------------------
    def history_json(self, user_row: int, upto: int) -> list[dict[str, Any]]:
        out = []
        for t, item, r in self.raw_events[user_row][:upto]:
            raw = self._item_dict(item)
            out.append({"sequence": _bucket_sequence(r), "timestamp": t, "item_id": item,
                        "release_year": raw["release_year"], "genre": (raw["genres"] or [None])[0]})
        return out

    def requests(self, n: int, n_candidates: int = 50, seed: int = 0, period: str = "test") -> list[tuple[Request, list]]:
        """Real requests. ``period="test"``: history = a user's training events, candidates =
        the user's test items (labelled) then unseen items (label ``None``) up to
        ``n_candidates``. ``period="train"`` stays inside the training period (for
        calibration): history = the first 80% of the training events, candidates the rest.
        Returns ``(request, labels)`` pairs, labels per candidate ``[like, love]`` or ``None``."""
        rng = np.random.default_rng(seed)
        all_items = sorted(self.item_raw)
        rows = rng.permutation(len(self.user_ids))[:n]
        out = []
        for row in rows:
            row = int(row)
            end = self.n_train_events[row] if period == "train" else len(self.raw_events[row])
            k = int(self.n_train_events[row] * 0.8) if period == "train" else self.n_train_events[row]
            seen = {i for _, i, _ in self.raw_events[row]}
            test = self.raw_events[row][k:end][:n_candidates]
            cands = [self._item_dict(i) for _, i, _ in test]
            labels: list = [[float(r >= 4), float(r == 5)] for _, _, r in test]
            while len(cands) < n_candidates:
                item = all_items[int(rng.integers(len(all_items)))]
                if item in seen:
                    continue
                seen.add(item)
                cands.append(self._item_dict(item))
                labels.append(None)
            uid = self.user_ids[row]
            req = Request(user=dict(self.user_raw[uid]), context={}, history=self.history_json(row, k),
                          candidates=cands, user_key=uid)
            out.append((req, labels))
        return out
