"""The example rankers under examples/ keep the split protocol (and the bad ones break it).

Plain torch only: nothing here uses onetrans_trt, so these tests say what the examples do,
not what the toolkit's checks think of them.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
GOOD = ["fused_qkv_cls", "sep_pyramid", "hyformer_style"]
ATOL = 1e-5


def load(name: str):
    key = f"_test_examples_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, EXAMPLES / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        spec.loader.exec_module(module)
    return sys.modules[key]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are tiny: a second intra-op thread only spins (100x slower on a busy machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module", params=GOOD)
def example(request):
    m = load(request.param)
    return m, m.factory()


# ---- random inputs from a spec, written here (independent of onetrans_trt.protocol) -----------------

def _size(d, spec, batch):
    if isinstance(d, int):
        return d
    return {"users": batch, "candidates": batch, "history": spec["history"]["max"]}[d]


def make_inputs(spec: dict, side: str, rows: int, g: torch.Generator, lengths: list[int] | None = None,
                history: int | None = None) -> dict:
    hmax = history or spec["history"]["max"]
    out = {}
    for i in spec["inputs"]:
        if i["side"] != side:
            continue
        shape = [hmax if d == "history" else _size(d, spec, rows) for d in i["shape"]]
        if i.get("role") == "history_length":
            x = torch.tensor(lengths, dtype=torch.int64)
        elif i["dtype"] == "int64":
            x = torch.randint(int(i.get("low", 0)), int(i.get("high", 2)), shape, generator=g)
        else:
            x = torch.randn(shape, generator=g)
        if "history" in i["shape"]:  # left padding: zeros before the real events
            real = torch.arange(hmax).unsqueeze(0) >= (hmax - torch.tensor(lengths).clamp(max=hmax)).unsqueeze(1)
            x = x * real.reshape(rows, *[hmax if d == "history" else 1 for d in i["shape"][1:]]).to(x.dtype)
        out[i["name"]] = x
    return out


def repeat_user(user: dict, u: int, c: int) -> dict:
    return {k: v[u:u + 1].expand(c, *v.shape[1:]).contiguous() for k, v in user.items()}


def one_user(state: dict, u: int) -> dict:
    return {k: v[u:u + 1] for k, v in state.items()}


def lengths_for(m) -> list[int]:
    hmax = m.SPEC["history"]["max"]
    return [0, 1, hmax, hmax + 5]


# ---- the good models -----------------------------------------------------------------------

@pytest.mark.parametrize("c", [1, 3, 17])
def test_split_equals_unified(example, c):
    m, model = example
    g = torch.Generator().manual_seed(100 + c)
    lengths = lengths_for(m)
    user = make_inputs(m.SPEC, "user", len(lengths), g, lengths)
    cand = make_inputs(m.SPEC, "candidate", c, g)
    with torch.no_grad():
        state = model.encode_user(user)
        for u, n in enumerate(lengths):
            split = model.score_candidates(one_user(state, u), cand)
            uni = model(repeat_user(user, u, c) | cand)
            assert split.shape == uni.shape == (c, len(m.SPEC["tasks"]))
            assert torch.isfinite(uni).all(), f"history length {n}: non-finite logits"
            err = (split - uni).abs().max().item()
            assert err <= ATOL, f"history length {n}, C={c}: split differs from unified by {err:.3g}"


def test_logits_depend_on_user_and_candidate(example):
    """Guards the test above against a degenerate model (constant logits pass any equality)."""
    m, model = example
    g = torch.Generator().manual_seed(5)
    hmax = m.SPEC["history"]["max"]
    user = make_inputs(m.SPEC, "user", 2, g, [hmax, hmax])
    cand = make_inputs(m.SPEC, "candidate", 8, g)
    with torch.no_grad():
        state = model.encode_user(user)
        a, b = (model.score_candidates(one_user(state, u), cand) for u in (0, 1))
    assert (a - b).abs().max() > 1e-2, "two users get the same scores"
    assert (a - a[:1]).abs().max() > 1e-2, "every candidate gets the same score"


def test_unified_state_equals_encode_user(example):
    m, model = example
    g = torch.Generator().manual_seed(11)
    lengths = lengths_for(m)
    user = make_inputs(m.SPEC, "user", len(lengths), g, lengths)
    cand = make_inputs(m.SPEC, "candidate", 5, g)
    with torch.no_grad():
        state = model.encode_user(user)
        for u in range(len(lengths)):
            rows = model.unified_state(repeat_user(user, u, 5) | cand)
            assert list(rows) == list(state)
            for name, t in rows.items():
                want = state[name][u:u + 1].expand_as(t)
                assert t.shape[0] == 5
                assert (t.double() - want.double()).abs().max() <= ATOL, f"user {u}: {name} moved"


def test_candidates_are_independent(example):
    m, model = example
    g = torch.Generator().manual_seed(12)
    user = make_inputs(m.SPEC, "user", 1, g, [3])
    cand = make_inputs(m.SPEC, "candidate", 6, g)
    other = make_inputs(m.SPEC, "candidate", 6, g)
    cand2 = {k: torch.cat([v[:5], other[k][5:]]) for k, v in cand.items()}
    with torch.no_grad():
        state = model.encode_user(user)
        a, b = model.score_candidates(state, cand), model.score_candidates(state, cand2)
    assert (a[5] - b[5]).abs().max() > 1e-3  # the changed candidate's own score moved
    assert (a[:5] - b[:5]).abs().max() <= ATOL


def test_state_names_order_and_layout(example):
    m, model = example
    g = torch.Generator().manual_seed(13)
    hmax = m.SPEC["history"]["max"]
    shapes = {}
    for axis in (hmax, 5):  # the padded history axis is dynamic
        user = make_inputs(m.SPEC, "user", 3, g, [0, 2, axis], history=axis)
        with torch.no_grad():
            state = model.encode_user(user)
        assert list(state) == [s["name"] for s in m.SPEC["state"]]
        shapes[axis] = {k: tuple(v.shape) for k, v in state.items()}
    pairs: dict[int, dict[str, tuple]] = {}
    moved = 0
    for s in m.SPEC["state"]:
        full, short = shapes[hmax][s["name"]], shapes[5][s["name"]]
        assert full[0] == short[0] == 3, f"{s['name']}: one row per user"
        if s["kind"] == "other":
            assert full == short, f"{s['name']}: other state must have static trailing dims"
            continue
        kv_axis, head_axis = (2, 1) if s["layout"] == "BHLD" else (1, 2)
        for shp in (full, short):
            assert len(shp) == 4
            assert shp[head_axis] == m.N_HEADS and shp[3] == m.D_MODEL // m.N_HEADS, (s["name"], shp)
        assert [d for a, d in enumerate(full) if a != kv_axis] == [d for a, d in enumerate(short) if a != kv_axis]
        moved += full[kv_axis] != short[kv_axis]
        pairs.setdefault(s["layer"], {})[s["kind"]] = full
    assert moved, "no K/V follows the history axis"
    for layer, kv in pairs.items():
        assert kv["key"] == kv["value"], f"layer {layer}: key and value shapes differ"


def test_no_attention_row_is_fully_masked(example, monkeypatch):
    """Backends disagree on a query that sees no key (PyTorch and ORT's CPU kernel give 0, a
    hand-written softmax gives NaN): the brief says every row sees at least itself."""
    m, model = example
    sdpa = torch.nn.functional.scaled_dot_product_attention
    calls = []

    def strict(q, k, v, attn_mask=None, **kw):
        assert attn_mask is not None, "every attention in the examples has an explicit mask"
        visible = attn_mask if attn_mask.dtype == torch.bool else torch.isfinite(attn_mask)
        assert visible.any(dim=-1).all(), "a query row sees no key"
        calls.append(q.shape)
        return sdpa(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", strict)
    g = torch.Generator().manual_seed(16)
    lengths = lengths_for(m)
    user = make_inputs(m.SPEC, "user", len(lengths), g, lengths)
    cand = make_inputs(m.SPEC, "candidate", 2, g)
    if "buy_len" in user:
        user["buy_len"] = torch.tensor([0, 1, m.BUY_WINDOW, 0])
    with torch.no_grad():
        state = model.encode_user(user)
        for u in range(len(lengths)):
            assert torch.isfinite(model.score_candidates(one_user(state, u), cand)).all()
            assert torch.isfinite(model(repeat_user(user, u, 2) | cand)).all()
    assert calls


def test_spec_json_equals_spec(example):
    m, _ = example
    on_disk = json.loads((EXAMPLES / f"{Path(m.__file__).stem}.spec.json").read_text())
    assert on_disk == json.loads(json.dumps(m.SPEC))


def test_example_inputs_follow_the_spec(example):
    m, model = example
    user, cand = m.example_inputs(n_users=3, n_candidates=4, seed=1)
    spec = m.SPEC
    assert list(user) == [i["name"] for i in spec["inputs"] if i["side"] == "user"]
    assert list(cand) == [i["name"] for i in spec["inputs"] if i["side"] == "candidate"]
    hmax = spec["history"]["max"]
    length = next(i["name"] for i in spec["inputs"] if i.get("role") == "history_length")
    n = user[length].clamp(max=hmax)
    assert len(set(n.tolist())) > 1, "example histories should vary in length"
    for i in spec["inputs"]:
        x = (user | cand)[i["name"]]
        assert x.dtype == getattr(torch, i["dtype"])
        assert x.shape[0] == (3 if i["side"] == "user" else 4)
        assert list(x.shape[1:]) == [hmax if d == "history" else d for d in i["shape"][1:]]
        if "history" in i["shape"]:
            pad = torch.arange(hmax).unsqueeze(0) < (hmax - n).unsqueeze(1)
            assert (x[pad] == 0).all(), f"{i['name']}: padding must be on the left and zero"
    with torch.no_grad():
        logits = model.score_candidates(one_user(model.encode_user(user), 0), cand)
    assert logits.shape == (4, len(spec["tasks"]))


def test_hyformer_second_sequence_lengths():
    """buy_len has no history role, so the generic cases above draw it at random: cover it here."""
    m = load("hyformer_style")
    model = m.factory()
    g = torch.Generator().manual_seed(14)
    user = make_inputs(m.SPEC, "user", 4, g, [4, 4, 4, 4])
    user["buy_len"] = torch.tensor([0, 1, m.BUY_WINDOW, m.BUY_WINDOW + 3])
    user["buy_item"] = user["buy_item"] * (torch.arange(m.BUY_WINDOW) >= m.BUY_WINDOW - user["buy_len"].unsqueeze(1))
    cand = make_inputs(m.SPEC, "candidate", 3, g)
    with torch.no_grad():
        state = model.encode_user(user)
        assert state["n_b"].tolist() == [0, 1, m.BUY_WINDOW, m.BUY_WINDOW]
        for u in range(4):
            split = model.score_candidates(one_user(state, u), cand)
            uni = model(repeat_user(user, u, 3) | cand)
            assert (split - uni).abs().max() <= ATOL


def test_pyramid_keeps_sep_in_the_tail():
    """Layer 2's K/V are the newest QUERY_TAIL[1] positions of [S ; SEP]: the last one is SEP's."""
    m = load("sep_pyramid")
    model = m.factory()
    g = torch.Generator().manual_seed(15)
    hmax = m.HIST_MAX
    user = make_inputs(m.SPEC, "user", 2, g, [0, hmax])
    with torch.no_grad():
        state = model.encode_user(user)
    assert state["k0"].shape[2] == hmax + 1 and state["k2"].shape[2] == m.QUERY_TAIL[1]
    # with no history, every kept position but SEP is padding; SEP's layer-1 output differs from theirs
    k2 = state["k2"][0]
    assert (k2[:, -1] - k2[:, -2]).abs().max() > 1e-3


# ---- the bad models ------------------------------------------------------------------------

def test_leaky_model_state_moves_with_the_candidate():
    bad = load("bad_models")
    model = bad.leaky_factory()
    user, cand = bad.example_inputs(n_users=1, n_candidates=4, seed=2)
    user["hist_len"] = torch.tensor([10])
    with torch.no_grad():
        state = model.encode_user(user)
        rows = model.unified_state(repeat_user(user, 0, 4) | cand)
        split = model.score_candidates(state, cand)
        uni = model(repeat_user(user, 0, 4) | cand)
    for name in ("k0", "v0"):  # straight from the embeddings: the leak cannot reach them
        assert (rows[name] - state[name]).abs().max() <= ATOL
    for name in ("k1", "v1"):
        assert (rows[name] - rows[name][:1]).abs().max() > 1e-3, f"{name} should differ across candidate rows"
        assert (rows[name] - state[name]).abs().max() > 1e-3
    assert (split - uni).abs().max() > 1e-3


def test_interacting_model_candidates_move_each_other():
    bad = load("bad_models")
    model = bad.interacting_factory()
    user, cand = bad.example_inputs(n_users=1, n_candidates=5, seed=3)
    other = bad.example_inputs(n_users=1, n_candidates=5, seed=4)[1]
    cand2 = {k: torch.cat([v[:4], other[k][4:]]) for k, v in cand.items()}
    with torch.no_grad():
        state = model.encode_user(user)
        a, b = model.score_candidates(state, cand), model.score_candidates(state, cand2)
        uni = model(repeat_user(user, 0, 5) | cand)
        rows = model.unified_state(repeat_user(user, 0, 5) | cand)
    assert (a[:4] - b[:4]).abs().max() > 1e-3, "changing candidate 4 should move the others"
    # split == unified and the state is clean: only the independence check can refuse it
    assert (a - uni).abs().max() <= ATOL
    for name, t in rows.items():
        assert (t.double() - state[name].double()).abs().max() <= ATOL


def test_bad_specs_on_disk():
    bad = load("bad_models")
    for stem, spec in (("leaky", bad.LEAKY_SPEC), ("interacting", bad.INTERACTING_SPEC)):
        assert json.loads((EXAMPLES / f"bad_models.{stem}.spec.json").read_text()) == json.loads(json.dumps(spec))
    assert bad.LEAKY_SPEC["state"] == load("fused_qkv_cls").SPEC["state"]
