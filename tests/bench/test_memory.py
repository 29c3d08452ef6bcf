"""Peak memory is measured exactly (the kernel's high-water mark in a fresh process, reset
after setup), not sampled: a short-lived allocation of a known size shows up at its size."""

from __future__ import annotations

import pytest

from onetrans_trt.bench.memory import peak_of

MIB = 1 << 20
# Margin: the measured section touches the array's N MiB plus the interpreter's own few KiB
# (the call, the array header, page rounding to 4 KiB); 4 MiB bounds that with room, and is
# far below N, so a missed or half-seen allocation cannot pass.
MARGIN = 4 * MIB


def short_lived_array(n_mib: int):
    """Setup (numpy imported, nothing allocated yet); the work writes every byte of an N MiB
    array and frees it at once."""
    import numpy as np

    def work() -> None:
        a = np.ones(n_mib * MIB // 8)  # float64: n_mib MiB, every page written
        del a  # unmapped again before the work returns

    return work


def short_lived_bytes(n_mib: int):
    """The work allocates N MiB, writes every byte and frees it inside one C call that holds
    the GIL (``len(b"x" * n)``): no sampling thread can run while it exists."""
    n = n_mib * MIB

    def work() -> None:
        len(b"\x01" * n)

    return work


def nothing():
    return lambda: None


@pytest.mark.parametrize("kind", ["short_lived_array", "short_lived_bytes"])
def test_a_short_lived_allocation_is_measured_at_its_size(kind):
    """(A watcher thread sampling RSS every 0.5 ms, the former method, reports ~0 MiB for
    the bytes case: it cannot run while the allocation exists.)"""
    for n in (16, 64, 256):
        r = peak_of(f"tests.bench.test_memory:{kind}", n)
        assert r["exact"], r
        assert abs(r["bytes"] - n * MIB) <= MARGIN, (n, r)
        # gone by the end of the work: RSS sampled after it (or before it) sees none of it,
        # only the high-water mark does
        assert r["rss_after_bytes"] - r["baseline_bytes"] <= MARGIN, (n, r)


def test_no_work_measures_no_growth():
    r = peak_of("tests.bench.test_memory:nothing")
    assert r["exact"] and r["bytes"] <= MARGIN, r
