"""Proofs before export: a module that follows the split protocol really splits.

On the user's example inputs and on random ones with empty, short, full and over-long
histories, and several candidate counts:

(a) **split == unified**: ``score_candidates(encode_user(user)[u], candidates)`` equals the
    unified ``forward`` over the user's inputs repeated per candidate, for every user ``u``
    (max abs/rel error reported);
(b) **the user state does not move with the candidates**: with ``unified_state`` the state the
    unified forward computes must be the same for every candidate row, and stay put when the
    candidates' inputs change (a model whose user side sees the candidate, e.g. through a
    non-causal mask, is refused with the state tensor that moved and by how much);
(c) **candidates are independent**: changing candidate j's inputs leaves every other
    candidate's split score unchanged.

A failure raises :class:`ProtocolError` naming what broke; success returns the report.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from onetrans_trt.errors import InputError
from onetrans_trt.protocol.spec import InputSpec, SplitSpec

ATOL = 1e-4  # fp32 split vs unified: two orders of summation, nothing more
INDEPENDENCE_ATOL = 1e-5


class ProtocolError(InputError):
    """The module does not keep the split protocol; the message names the tensor and the case."""


def _torch_dtype(name: str):
    import torch

    return getattr(torch, name)


def _resolve(shape: list, sizes: dict[str, int], spec: SplitSpec) -> list[int]:
    return [d if isinstance(d, int) else sizes.get(d, spec.dim_range(d)[1]) for d in shape]


def random_inputs(spec: SplitSpec, *, users: int, candidates: int, lengths: list[int] | int,
                  rng: np.random.Generator) -> tuple[dict, dict]:
    """Random user inputs ``[U, ...]`` and candidate inputs ``[C, ...]``; user u's history holds
    ``lengths[u]`` real events (padded positions are 0; a length above the padded axis means every
    position is real, the length input then says more than fits: an over-long history)."""
    import torch

    lengths = [lengths] * users if isinstance(lengths, int) else list(lengths)
    hmax = spec.history.max
    sizes = {"users": users, "candidates": candidates, "history": hmax}

    def make(i: InputSpec, n_rows: int) -> "torch.Tensor":
        shape = _resolve(i.shape, {**sizes, i.shape[0]: n_rows}, spec)
        if i.role == "history_length":
            return torch.tensor(lengths, dtype=_torch_dtype(i.dtype))
        if i.dtype in ("int64", "int32"):
            lo, hi = int(i.low if i.low is not None else 0), int(i.high if i.high is not None else 2)
            x = torch.from_numpy(rng.integers(lo, hi, size=shape)).to(_torch_dtype(i.dtype))
        elif i.dtype == "bool":
            x = torch.from_numpy(rng.random(shape) < 0.5)
        else:
            x = torch.from_numpy(rng.standard_normal(shape).astype(np.float32)).to(_torch_dtype(i.dtype))
        if "history" in i.shape:
            ax = i.shape.index("history")
            pos = torch.arange(hmax)
            for u, n in enumerate(lengths):
                n = min(n, hmax)
                real = pos >= hmax - n if spec.history.padding == "left" else pos < n
                idx = [u] + [slice(None)] * (x.dim() - 1)
                view = x[tuple(idx)]
                mask = real.reshape([hmax if a == ax - 1 else 1 for a in range(view.dim())])
                x[tuple(idx)] = torch.where(mask, view, torch.zeros((), dtype=x.dtype))
        return x

    user = {i.name: make(i, users) for i in spec.side("user")}
    cand = {i.name: make(i, candidates) for i in spec.side("candidate")}
    return user, cand


def unified_inputs(user: dict, cand: dict, u: int) -> dict:
    """User ``u``'s inputs repeated per candidate, next to the candidates' own."""
    c = next(iter(cand.values())).shape[0]
    return {**{k: v[u:u + 1].expand(c, *v.shape[1:]).contiguous() for k, v in user.items()}, **cand}


def user_slice(state: dict, u: int) -> dict:
    return {k: v[u:u + 1] for k, v in state.items()}


def _err(a, b) -> tuple[float, float]:
    a, b = a.detach().double(), b.detach().double()
    if a.numel() == 0:
        return 0.0, 0.0
    d = (a - b).abs()
    return float(d.max()), float((d / b.abs().clamp_min(1e-6)).max())


def _check_state(spec: SplitSpec, state: Any, users: int) -> None:
    if not isinstance(state, dict):
        raise ProtocolError(f"encode_user must return a dict of named tensors, got {type(state).__name__}")
    want = [s.name for s in spec.state]
    if list(state) != want:
        raise ProtocolError(f"encode_user returned state {list(state)}; the spec declares {want} (same names, same order)")
    for s in spec.state:
        t = state[s.name]
        if t.shape[0] != users:
            raise ProtocolError(f"state {s.name}: batch {t.shape[0]}, expected one row per user ({users})")
        if s.kind != "other" and t.dim() != 4:
            raise ProtocolError(f"state {s.name}: a {s.kind} must be 4-D ({s.layout}), got shape {tuple(t.shape)}")
    for layer in spec.kv_layers:
        k, v = (next(state[s.name] for s in spec.state if s.layer == layer and s.kind == kind) for kind in ("key", "value"))
        if k.shape != v.shape:
            raise ProtocolError(f"layer {layer}: key {tuple(k.shape)} and value {tuple(v.shape)} differ in shape")


def _logits(spec: SplitSpec, x: Any, c: int, where: str):
    import torch

    if not isinstance(x, torch.Tensor) or tuple(x.shape) != (c, len(spec.tasks)):
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ProtocolError(f"{where} must return logits [{c}, {len(spec.tasks)}] (candidates x tasks {spec.tasks}), got {got}")
    if not torch.isfinite(x).all():
        raise ProtocolError(f"{where} returned non-finite logits")
    return x


def check_case(module, spec: SplitSpec, user: dict, cand: dict, name: str,
               rng: np.random.Generator) -> dict[str, Any]:
    """(a), (b), (c) on one set of inputs; returns the case's record."""
    import torch

    users = next(iter(user.values())).shape[0]
    c = next(iter(cand.values())).shape[0]
    with torch.no_grad():
        state = module.encode_user(user)
        _check_state(spec, state, users)
        worst_abs = worst_rel = 0.0
        for u in range(users):
            split = _logits(spec, module.score_candidates(user_slice(state, u), cand), c, "score_candidates")
            uni = _logits(spec, module(unified_inputs(user, cand, u)), c, "forward")
            a, r = _err(split, uni)
            worst_abs, worst_rel = max(worst_abs, a), max(worst_rel, r)
            if a > ATOL * max(1.0, float(uni.abs().max())):
                where = _state_moved(module, spec, user, cand, u, state)
                raise ProtocolError(f"{name}: split != unified for user {u}: max abs error {a:.3g} (tolerance "
                                    f"{ATOL:g}){'; ' + where if where else ''}")
        moved = _state_moved(module, spec, user, cand, 0, state, rng=rng)
        if moved:
            raise ProtocolError(f"{name}: {moved}")
        indep = 0.0
        if c > 1:
            base = module.score_candidates(user_slice(state, 0), cand)
            _, other = random_inputs(spec, users=1, candidates=c, lengths=0, rng=rng)
            j = c - 1
            cand2 = {k: torch.cat([v[:j], other[k][j:j + 1], v[j + 1:]]) for k, v in cand.items()}
            again = module.score_candidates(user_slice(state, 0), cand2)
            indep = float((again[:j] - base[:j]).abs().max())
            if indep > INDEPENDENCE_ATOL * max(1.0, float(base.abs().max())):
                i = int((again[:j] - base[:j]).abs().amax(dim=1).argmax())
                raise ProtocolError(f"{name}: candidates interact: changing candidate {j}'s inputs moved candidate "
                                    f"{i}'s score by {indep:.3g}; each candidate must be scored on its own")
    return {"case": name, "users": users, "candidates": c, "max_abs": worst_abs, "max_rel": worst_rel,
            "independence_max_abs": indep}


def _state_moved(module, spec: SplitSpec, user: dict, cand: dict, u: int, state: dict, rng=None) -> str:
    """With ``unified_state``: the first state tensor that differs between candidate rows, from
    ``encode_user``'s, or when the candidates' inputs change; '' when none does or it is unknown."""
    if not hasattr(module, "unified_state"):
        return "" if rng is not None else ("the module has no unified_state, so the state tensor that differs "
                                           "cannot be named; a user side that reads the candidates gives this")
    uni = unified_inputs(user, cand, u)
    first = module.unified_state(uni)
    checks = [("differs between candidate rows of one user", lambda s, t: t - t[:1]),
              ("differs from encode_user's", lambda s, t: t - state[s][u:u + 1])]
    for what, diff in checks:
        for s in spec.state:
            d = float(diff(s.name, first[s.name]).abs().max()) if first[s.name].numel() else 0.0
            if d > ATOL * max(1.0, float(first[s.name].abs().max())):
                return f"user state {s.name!r} {what} by up to {d:.3g}: the user side sees the candidates"
    if rng is not None:
        _, other = random_inputs(spec, users=1, candidates=next(iter(cand.values())).shape[0], lengths=0, rng=rng)
        moved = module.unified_state({**uni, **other})
        for s in spec.state:
            d = float((moved[s.name] - first[s.name]).abs().max()) if first[s.name].numel() else 0.0
            if d > ATOL * max(1.0, float(first[s.name].abs().max())):
                return (f"user state {s.name!r} moved by {d:.3g} when only the candidates' inputs changed: "
                        "the user side sees the candidates")
    return ""


def check_protocol(module, spec: SplitSpec, example: tuple[dict, dict] | None = None, *, seed: int = 0,
                   progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the proofs; raise :class:`ProtocolError` on the first that fails; return the report."""
    say = progress or (lambda msg: None)
    for method in ("encode_user", "score_candidates", "forward"):
        if not callable(getattr(module, method, None)):
            raise ProtocolError(f"the module has no {method}(); see the README's 'Your own model' for the protocol")
    rng = np.random.default_rng(seed)
    hmax = spec.history.max
    cases = []
    if example is not None:
        cases.append(("example inputs", *example))
    for lengths, c in (([0, 1], 3), ([hmax, hmax + 5], 3), ([hmax // 2, 1], 1), ([0, hmax], 17)):
        user, cand = random_inputs(spec, users=len(lengths), candidates=c, lengths=lengths, rng=rng)
        cases.append((f"random: histories {lengths}, {c} candidates", user, cand))
    if spec.history_length is None:
        say("no history_length input in the spec: random histories are full")
    records = []
    for name, user, cand in cases:
        say(f"check {name}")
        records.append(check_case(module, spec, user, cand, name, rng))
    return {"ok": True, "cases": records, "max_abs": max(r["max_abs"] for r in records),
            "max_rel": max(r["max_rel"] for r in records), "tolerance": ATOL,
            "state_checked": "unified_state" if hasattr(module, "unified_state") else
            "split == unified only (the module has no unified_state)",
            "independence_max_abs": max(r["independence_max_abs"] for r in records)}


def inputs_from_file(path, spec: SplitSpec) -> tuple[list[tuple[dict, dict]], str]:
    """The user's requests for a module build (``--inputs``: npz or Polygraphy JSON, see
    :mod:`onetrans_trt.data.feeds`), each split by the spec into (user inputs, candidate
    inputs) as torch tensors, every array checked against its spec dtype and rank."""
    import torch

    from onetrans_trt.data.feeds import load_feed_list, split_feeds

    feeds, source = load_feed_list(path)
    by_name = {i.name: i for i in spec.inputs}
    pairs = split_feeds(path, feeds, [i.name for i in spec.inputs if i.side == "user"],
                        [i.name for i in spec.inputs if i.side != "user"])
    out = []
    for k, (user, cand) in enumerate(pairs):
        conv: tuple[dict, dict] = ({}, {})
        for side, arrays in ((0, user), (1, cand)):
            for name, a in arrays.items():
                i = by_name[name]
                if str(a.dtype) != i.dtype and not (i.dtype == "bfloat16" and a.dtype == np.float32):
                    raise InputError(f"--inputs {path}: request {k} {name} is {a.dtype}, the spec says {i.dtype}")
                if a.ndim != len(i.shape) or any(isinstance(d, int) and d != n for d, n in zip(i.shape, a.shape)):
                    raise InputError(f"--inputs {path}: request {k} {name} has shape {list(a.shape)}, the spec says "
                                     f"{i.shape}")
                conv[side][name] = torch.from_numpy(np.ascontiguousarray(a))  # as export.module.load_inputs
        sizes = {name: t.shape[0] for name, t in conv[0].items()}
        if len(set(sizes.values())) > 1:
            raise InputError(f"--inputs {path}: request {k}'s user inputs disagree on the number of users {sizes}")
        csizes = {name: t.shape[0] for name, t in conv[1].items()}
        if len(set(csizes.values())) > 1:
            raise InputError(f"--inputs {path}: request {k}'s candidate inputs disagree on the number of candidates "
                             f"{csizes}")
        out.append(conv)
    return out, source
