"""A synthetic schema and request generator of any size (tests and benchmarks).

Every feature kind appears (categorical, multi-hot, dense; user / item / context) and
there are several behaviour sequences with overlapping fields.
"""

from __future__ import annotations

import numpy as np

from onetrans_trt.data.requests import Request
from onetrans_trt.data.schema import Feature, FeatureSchema, Sequence, Table


def synthetic_schema(*, max_history: int = 32, n_items: int = 500, n_sequences: int = 3,
                     emb_dim: int = 8, merge_mode: str = "timestamp_aware",
                     dense: bool = True, context: bool = True) -> FeatureSchema:
    tables = {
        "user": Table("user", 200, emb_dim),
        "item": Table("item", n_items, emb_dim),
        "category": Table("category", 20, emb_dim),
        "tag": Table("tag", 30, emb_dim),
        "device": Table("device", 4, emb_dim),
        "action": Table("action", 5, emb_dim),
    }
    features = [
        Feature("user_id", "categorical", "user", table="user"),
        Feature("user_tags", "multihot", "user", table="tag", max_len=4),
        Feature("item_id", "categorical", "item", table="item"),
        Feature("item_category", "categorical", "item", table="category"),
    ]
    if dense:
        features.append(Feature("item_stats", "dense", "item", dim=3))
    if context:
        features.append(Feature("device", "categorical", "context", table="device"))
    seqs = []
    for k in range(n_sequences):
        fields = {"item_id": "item", "category": "category"}
        if k % 2 == 1:
            fields["action"] = "action"
        seqs.append(Sequence(f"seq{k}", fields))
    return FeatureSchema(tables, features, seqs, max_history=max_history, merge_mode=merge_mode)


def synthetic_request(schema: FeatureSchema, rng: np.random.Generator, *, n_history: int,
                      n_candidates: int, user_key: str | None = None) -> Request:
    """A random request for any schema; raw values include a few unknown ids (OOV)."""

    def raw(table: str):
        t = schema.tables[table]
        i = int(rng.integers(0, t.size + max(1, t.size // 50)))  # ~2% out of vocabulary
        if t.tokens is None:
            return i
        return t.tokens[i] if i < t.size else f"unknown-{i}"

    def feature_value(f):
        if f.kind == "categorical":
            return raw(f.table)
        if f.kind == "multihot":
            return [raw(f.table) for _ in range(int(rng.integers(0, f.max_len + 2)))]
        return [float(x) for x in rng.normal(size=f.dim)]

    user = {f.name: feature_value(f) for f in schema.features_in("user")}
    context = {f.name: feature_value(f) for f in schema.features_in("context")}
    cands = [{f.name: feature_value(f) for f in schema.features_in("item")} for _ in range(n_candidates)]
    history = []
    t = 1.6e9
    for _ in range(n_history):
        s = schema.sequences[int(rng.integers(0, schema.num_sequences))]
        t += float(rng.choice([0.0, rng.exponential(3600.0)]))  # ties happen, as in real logs
        ev = {"sequence": s.name, "timestamp": t}
        ev.update({f: raw(tbl) for f, tbl in s.fields.items()})
        history.append(ev)
    return Request(user=user, context=context, history=history, candidates=cands, user_key=user_key)
