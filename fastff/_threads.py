"""Thread counts of the CPU kernels: resolved once per call in Python, passed to every kernel.

OpenMP keeps its thread count per OS thread (libgomp's and libomp's nthreads setting), so a
kernel that read ``omp_get_max_threads()`` ran with whatever the Python thread it happened to be
called from had set: ``set_num_threads`` in the main thread did not reach a worker thread. Here,
as in scikit-learn (``_openmp_effective_n_threads``), Python decides the count and every kernel
takes it as its ``n_threads`` argument; a kernel then uses fewer threads when its work is too
small to pay for waking them (``fastff/_cmm.pyx``, ``_team``).

Precedence, first that applies:
1. ``with fastff.num_threads(n):`` in the calling thread (a context variable: it does not leak
   into other threads, nor into threads started inside the block);
2. ``threadpoolctl.threadpool_limits(n)`` (fastff registers itself as a threadpoolctl
   controller, so the limit applies to kernels called from every thread while it holds) and
   ``fastff.set_num_threads(n)``, whichever was set last; both are process-wide;
3. ``OMP_NUM_THREADS`` (its first entry), read once at import;
4. the CPUs this process may run on: its affinity mask, lowered to a cgroup's CPU quota
   (containers), at least 1.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from contextvars import ContextVar

from ._validation import check_int, max_threads
from ._version import __version__

_scoped: ContextVar[int | None] = ContextVar("fastff_num_threads", default=None)
_process_wide: int | None = None


def _cgroup_cpu_limit() -> float | None:
    """CPUs allowed by a cgroup quota (v2 cpu.max, v1 cfs quota/period); None if unlimited."""
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()[:2]
        if quota != "max":
            return int(quota) / int(period)
        return None
    except (OSError, ValueError):
        pass
    try:
        with open("/sys/fs/cgroup/cpu/cpu.cfs_quota_us") as f:
            quota_us = int(f.read())
        with open("/sys/fs/cgroup/cpu/cpu.cfs_period_us") as f:
            period_us = int(f.read())
        if quota_us > 0 and period_us > 0:
            return quota_us / period_us
    except (OSError, ValueError):
        pass
    return None


def available_cpus() -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup CPU quota."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        n = os.cpu_count() or 1
    quota = _cgroup_cpu_limit()
    if quota is not None:
        n = min(n, max(1, math.ceil(quota)))
    return max(1, n)


def _from_environment() -> int | None:
    """OMP_NUM_THREADS's first entry ("4" or "4,2" for nested levels), if it is valid."""
    value = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    try:
        n = int(value)
    except ValueError:
        return None
    return min(n, max_threads()) if n >= 1 else None


_DEFAULT = _from_environment() or available_cpus()


def effective_n_threads() -> int:
    """The thread count a kernel called now, from this thread, is given (see the module doc)."""
    scoped = _scoped.get()
    if scoped is not None:
        return scoped
    if _process_wide is not None:
        return _process_wide
    return _DEFAULT


def set_num_threads(n: int) -> None:
    """Process-wide thread count of the CPU kernels: 1 <= n <= max(64, 8 per CPU)."""
    global _process_wide
    _process_wide = check_int(n, "n", 1, max_threads())


def reset_num_threads() -> None:
    """Forget set_num_threads: back to OMP_NUM_THREADS or the available CPUs."""
    global _process_wide
    _process_wide = None


@contextlib.contextmanager
def num_threads(n: int) -> Iterator[None]:
    """Scoped thread count: ``with fastff.num_threads(1): ...`` runs the kernels that this thread
    calls inside the block on n threads, whatever the process-wide setting."""
    token = _scoped.set(check_int(n, "n", 1, max_threads()))
    try:
        yield
    finally:
        _scoped.reset(token)


# ---- threadpoolctl --------------------------------------------------------------------------
def register_threadpoolctl() -> bool:
    """Make ``threadpoolctl.threadpool_limits`` govern fastff's kernels; True if registered."""
    try:
        import threadpoolctl
    except ImportError:
        return False
    register = getattr(threadpoolctl, "register", None)
    if register is None:  # threadpoolctl < 3.5
        return False

    class FastffController(threadpoolctl.LibController):
        """fastff's CPU kernels, found by their extension module (fastff/_cmm*.so)."""

        user_api = "fastff"
        internal_api = "fastff"
        filename_prefixes = ("_cmm.",)
        check_symbols = ("PyInit__cmm",)

        def get_num_threads(self):
            # the process-wide count, not a num_threads scope: threadpool_limits restores what
            # this reports on exit, and a scope must not become the process-wide setting
            return _process_wide if _process_wide is not None else _DEFAULT

        def set_num_threads(self, num_threads):
            # threadpool_limits restores the value get_num_threads reported on exit
            set_num_threads(num_threads)

        def get_version(self):
            return __version__

    register(FastffController)
    return True
