"""The CPU benchmarks' timer (../shared/BENCHMARKS.md: one warm-up, then median and min-max)."""

from __future__ import annotations

import math
import statistics
import time
from typing import Callable

# Idle time before each timed series. OpenBLAS worker threads spin after each call before they
# sleep (about 0.1 s unless OPENBLAS_THREAD_TIMEOUT is short, see fastff/_spin.py); on a 2-core
# machine they take a core from whatever runs next, which made an OpenMP kernel timed right
# after the dense GEMMs up to 10x slower than on its own.
SETTLE_S = 0.3
# A sample shorter than this times several back-to-back calls instead of one (as the GPU bench
# times 10): a 10-30 us call timed alone lands in the wake-up after the settle sleep (parked
# threads, a descheduled vCPU), and the same batch-1 UltraFFF call measured 26 us timed singly
# against 11.5 us in a loop, which is how a batch-1 caller runs it.
MIN_SAMPLE_S = 2e-3
MAX_CALLS_PER_SAMPLE = 1000


def calls_per_sample(one_call_s: float) -> int:
    """Back-to-back calls per timed sample for a call that takes one_call_s seconds."""
    if one_call_s >= MIN_SAMPLE_S:
        return 1
    return min(MAX_CALLS_PER_SAMPLE, math.ceil(MIN_SAMPLE_S / max(one_call_s, 1e-9)))


def median_min_max(fn: Callable[[], object], repeat: int) -> tuple[float, float, float]:
    """Seconds per call of `fn`: median, min and max of `repeat` samples after a warm-up. Each
    sample is one call, or the mean of several back-to-back calls when one call is shorter
    than MIN_SAMPLE_S."""
    time.sleep(SETTLE_S)  # let the other side's idle BLAS / OpenMP workers park first
    fn()  # warm-up (also triggers lazy allocations)
    t1 = time.perf_counter()
    fn()  # a second call, warm, sizes the samples
    calls = calls_per_sample(time.perf_counter() - t1)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - t0) / calls)
    return statistics.median(times), min(times), max(times)
