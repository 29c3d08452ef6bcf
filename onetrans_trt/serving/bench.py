"""``onetrans-trt bench BUILD --suite server``: a real ``tritonserver`` on loopback under load.

The build's ``serve-repo --backend python`` repository is written to a temporary directory and
served; MovieLens test requests (raw JSON over HTTP, one client thread per concurrent request)
go to three contenders, interleaved round by round at each concurrency:

- ``rank``: the ensemble; every request runs ``user_encoder``, then ``candidate_scorer``;
- ``rank-users``: the ``rank_users`` ensemble, the same over ``candidate_scorer_users``: concurrent
  requests of different users share scorer calls (cross-user batching; the users per call are
  read from Triton's statistics);
- ``cached-miss``: ``rank_cached`` with a fresh ``user_key`` per request (never a hit: the miss
  path, the cache's own cost included);
- ``cached-hit``: ``rank_cached`` on users it has seen (``user_encoder`` is never called; counted
  with Triton's statistics).

Every response is compared with the serial answer of ``Ranker.load(build, backend="ort")``
(1e-5); errors and mismatches are counted, never dropped. Requests/s, p50 and p99 per contender
and concurrency, and the ratios against ``rank`` measured in the same rounds. After the run no
process of the server may be left. ``rank_cached`` runs one instance here, so its scorer calls
hold one user each: batching and the cache are measured apart (``rank-users`` vs ``rank``, cache
on vs off: ``cached-hit`` vs ``cached-miss``).
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import numpy as np

from onetrans_trt.errors import InputError

TOL = 1e-5
CONTENDERS = ("rank", "rank-users", "cached-miss", "cached-hit")
MODEL = {"rank": "rank", "rank-users": "rank_users", "cached-miss": "rank_cached", "cached-hit": "rank_cached"}


def _pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs) * 1e3, q)) if xs else float("nan")


def bench_server(build: str | Path, *, candidates: int = 50, concurrency: tuple[int, ...] = (1, 4, 16),
                 requests: int = 32, rounds: int = 2, seed: int = 0, data_dir=None, user_cache_mb: float = 256,
                 say: Callable[[str], None] | None = None, store: str | None = None) -> dict[str, Any]:
    """The measurements above; ``requests``: requests per contender per round at each
    concurrency (at least the concurrency); ``rounds``: interleaved rounds;
    ``store``: a user state store URL for ``rank_cached`` instead of its own cache."""
    from onetrans_trt import interrupts
    from onetrans_trt.data.movielens import MovieLens
    from onetrans_trt.data.requests import Request
    from onetrans_trt.runtime.ranker import Ranker
    from onetrans_trt.serving import client
    from onetrans_trt.serving.repository import write_python_repository
    from onetrans_trt.serving.server import TritonServer, _session_members

    build = Path(build)
    if not (build / "config.json").is_file():
        raise InputError(f"{build}: --suite server sends raw requests, which need the build's feature schema "
                         "(a build from a checkpoint; a module build has none)")
    if not concurrency or min(concurrency) < 1:
        raise InputError("--concurrency: positive integers, e.g. 1,4,16")
    say = say or (lambda _m: None)
    n = max(requests, max(concurrency))
    ranker = Ranker.load(build, backend="ort")
    pool = [r for r, _ in MovieLens(data_dir).requests(n, n_candidates=candidates, seed=seed)]
    serial = [ranker.rank(r).logits for r in pool]
    fresh = iter(range(10 ** 9))

    def anonymous(r: Request) -> dict:  # the same user and history under a key never seen: a miss
        return {**r.to_json(), "user_key": f"bench-miss-{next(fresh)}"}

    with interrupts.temporary_directory(prefix="onetrans-bench-server-") as tmp:
        repo = Path(tmp) / "repo"
        written = write_python_repository(build, repo, user_cache_mb=user_cache_mb, store=store)
        batching = written["cross_user_batching"]
        contenders = [c for c in CONTENDERS if c != "rank-users" or batching["users_per_call"] > 1]
        say(f"serving {repo} (python backend, fp32)")
        with TritonServer(repo) as server:
            url = server.http_url

            def one(model: str, body: dict, want: np.ndarray) -> tuple[float, str | None]:
                t0 = time.perf_counter()
                try:
                        got = client.rank_http(url, body, model=model)
                except client.ServingError as e:
                    return time.perf_counter() - t0, f"error: {str(e)[:200]}"
                dt = time.perf_counter() - t0
                if model == "rank_users":  # one user's row: [1, C, tasks]
                    got = {k: v[0] if v.ndim == 3 and v.shape[0] == 1 else v for k, v in got.items()}
                if got["logits"].shape != want.shape or float(np.abs(got["logits"] - want).max(initial=0.0)) > TOL:
                    return dt, "mismatch"
                return dt, None

            for i, r in enumerate(pool):  # warm: every model loaded and run, every user cached
                for model in sorted({MODEL[c] for c in contenders}):
                    _, bad = one(model, r.to_json(), serial[i])
                    if bad:
                        raise InputError(f"the server's answer to request {i} ({model}): {bad}")
            levels = []
            hits_encoded = 0
            for c in concurrency:
                lat: dict[str, list[float]] = {k: [] for k in contenders}
                wall = {k: 0.0 for k in contenders}
                problems = {k: [] for k in contenders}
                merged = [0, 0]  # candidate_scorer_users: requests, executions during rank-users rounds
                with ThreadPoolExecutor(max_workers=c) as ex:
                    for rnd in range(rounds):
                        for name in contenders:
                            model = MODEL[name]
                            bodies = [anonymous(r) if name == "cached-miss" else r.to_json() for r in pool[:n]]
                            before = client.successes_http(url, "user_encoder") if name == "cached-hit" else 0
                            calls = _scorer_calls(url) if name == "rank-users" else (0, 0)
                            t0 = time.perf_counter()
                            outs = list(ex.map(lambda ib: one(model, ib[1], serial[ib[0]]), enumerate(bodies)))
                            wall[name] += time.perf_counter() - t0
                            if name == "cached-hit":
                                hits_encoded += client.successes_http(url, "user_encoder") - before
                            if name == "rank-users":
                                after = _scorer_calls(url)
                                merged = [merged[0] + after[0] - calls[0], merged[1] + after[1] - calls[1]]
                            lat[name] += [dt for dt, _ in outs]
                            problems[name] += [p for _, p in outs if p]
                        say(f"concurrency {c}: round {rnd + 1}/{rounds}")
                row = {name: {"requests": len(lat[name]), "rps": len(lat[name]) / wall[name] if wall[name] else 0.0,
                              "p50_ms": _pct(lat[name], 50), "p99_ms": _pct(lat[name], 99),
                              "errors": sum(1 for p in problems[name] if p.startswith("error")),
                              "mismatches": sum(1 for p in problems[name] if p == "mismatch"),
                              "first_problem": problems[name][0] if problems[name] else None}
                       for name in contenders}
                level = {"concurrency": c, "contenders": row,
                         "hit_over_rank_rps": row["cached-hit"]["rps"] / row["rank"]["rps"],
                         "miss_over_rank_rps": row["cached-miss"]["rps"] / row["rank"]["rps"],
                         "hit_over_miss_rps": row["cached-hit"]["rps"] / row["cached-miss"]["rps"]}
                if "rank-users" in row:
                    level["users_over_rank_rps"] = row["rank-users"]["rps"] / row["rank"]["rps"]
                    level["users_per_scorer_call"] = merged[0] / merged[1] if merged[1] else float("nan")
                levels.append(level)
            pid = server.pid
        leftovers = _session_members(pid) if pid else []  # the server's session after the stop
    return {"build": str(build), "candidates": candidates, "requests_per_round": n, "rounds": rounds,
            "concurrency": list(concurrency), "levels": levels, "encoder_calls_during_hits": hits_encoded,
            "errors": sum(v["errors"] + v["mismatches"] for lv in levels for v in lv["contenders"].values()),
            "leftover_processes": leftovers, "user_cache_mb": None if store else user_cache_mb,
            "store": _safe(store),
            "data": f"MovieLens-100K test requests ({n} users, {candidates} candidates each, seed {seed})",
            "transport": "HTTP/JSON (KServe v2), one connection per request",
            "cross_user_batching": batching}


def _safe(url: str | None) -> str | None:
    """A store URL without its password (it goes into reports)."""
    if url is None:
        return None
    from onetrans_trt.runtime.store import _safe_url

    return _safe_url(url)


def _scorer_calls(url: str) -> tuple[int, int]:
    """``candidate_scorer_users``' (requests, executions) so far (settled counts)."""
    from onetrans_trt.serving import client

    client.successes_http(url, "candidate_scorer_users")
    st = client.model_statistics_http(url, "candidate_scorer_users")["model_stats"][0]
    return int(st.get("inference_count", 0)), int(st.get("execution_count", 0))


def table(res: dict[str, Any]) -> str:
    lines = [f"Triton server on loopback, python backend (ORT CPU), {res['data']}; {res['transport']}",
             f"{'concurrency':>11}  {'contender':<12} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8}  {'vs rank':>7}  errors"]
    for lv in res["levels"]:
        base = lv["contenders"]["rank"]["rps"]
        for name, v in lv["contenders"].items():
            ratio = v["rps"] / base if base else float("nan")
            lines.append(f"{lv['concurrency']:>11}  {name:<12} {v['rps']:>8.1f} {v['p50_ms']:>8.1f} {v['p99_ms']:>8.1f}"
                         f"  {ratio:>6.2f}x  {v['errors'] + v['mismatches']}")
    lines.append(f"user_encoder calls while serving cached users: {res['encoder_calls_during_hits']}; "
                 f"errors and mismatches: {res['errors']}; server processes left: {len(res['leftover_processes'])}")
    for lv in res["levels"]:
        if "users_per_scorer_call" in lv:
            lines.append(f"concurrency {lv['concurrency']}: rank-users scored {lv['users_per_scorer_call']:.2f} users per "
                         f"candidate_scorer_users call (Triton statistics)")
    b = res["cross_user_batching"]
    if b["users_per_call"] <= 1:
        lines.append(f"cross-user batching not measured: {b.get('why', 'off')}")
    return "\n".join(lines)
