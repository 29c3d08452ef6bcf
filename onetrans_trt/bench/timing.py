"""Interleaved latency measurement: every contender runs once per round, in turn."""

from __future__ import annotations

import time
from typing import Callable

import numpy as np


def interleaved(contenders: dict[str, Callable[[], object]], *, rounds: int = 20, warmup: int = 2,
                budget_s: float | None = None) -> dict[str, dict[str, float]]:
    """Latency stats (ms) per contender, measured round-robin so noise hits all alike."""
    for _ in range(warmup):
        for fn in contenders.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in contenders}
    start = time.perf_counter()
    for r in range(rounds):
        order = list(contenders.items())
        if r % 2:
            order.reverse()
        for name, fn in order:
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1e3)
        if budget_s is not None and time.perf_counter() - start > budget_s and r >= 2:
            break
    return {k: {"p50_ms": float(np.percentile(v, 50)), "p99_ms": float(np.percentile(v, 99)),
                "mean_ms": float(np.mean(v)), "runs": len(v)} for k, v in times.items()}
