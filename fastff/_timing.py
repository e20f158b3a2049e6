"""The CPU benchmarks' timer (../shared/BENCHMARKS.md: one warm-up, then median and min-max)."""

from __future__ import annotations

import statistics
import time
from typing import Callable

# Idle time before each timed series. OpenBLAS worker threads spin after each call before they
# sleep (about 0.1 s unless OPENBLAS_THREAD_TIMEOUT is short, see fastff/_spin.py); on a 2-core
# machine they take a core from whatever runs next, which made an OpenMP kernel timed right
# after the dense GEMMs up to 10x slower than on its own.
SETTLE_S = 0.3


def median_min_max(fn: Callable[[], object], repeat: int) -> tuple[float, float, float]:
    """Seconds per call of `fn`: median, min and max of `repeat` calls after a warm-up."""
    time.sleep(SETTLE_S)  # let the other side's idle BLAS / OpenMP workers park first
    fn()  # warm-up (also triggers lazy allocations)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), min(times), max(times)
