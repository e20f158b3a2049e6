"""The CPU backend: NumPy arrays and the Cython/OpenMP kernels of fastff._cmm (whose sources by
concern are the .pxi files beside this module), the twin of fastff.gpu.ops.GPUOps."""

from __future__ import annotations

import threading

import numpy as np

from .. import _cmm
from ..ops import Ops, to_host

# Kernel calls running now, from any Python thread (CPUOps._run).
_ACTIVE = [0]
_ACTIVE_LOCK = threading.Lock()


class CPUOps(Ops):
    """NumPy arrays, Cython/OpenMP kernels (fastff._cmm)."""

    name = "cpu"
    xp = np
    cmm = _cmm
    _kernels_skip_dx = True

    def _run(self, kernel, *args):
        # Kernels called from several Python threads at once share the cores: each gets its
        # n_threads divided by the calls running (4 threads calling ufb with 2 OpenMP threads
        # each put 8 threads on 2 cores, and lost 1.1-1.2x to 1 OpenMP thread each).
        with _ACTIVE_LOCK:
            _ACTIVE[0] += 1
            active = _ACTIVE[0]
        try:
            return kernel(*args[:-1], max(1, args[-1] // active))
        finally:
            with _ACTIVE_LOCK:
                _ACTIVE[0] -= 1

    def asarray(self, a, dtype=None):
        return np.asarray(to_host(a), dtype=dtype)

    def to_numpy(self, a):
        return np.asarray(a)

    def sgd_update(self, param, grad, buf, lr, weight_decay, momentum, nesterov, n_threads):
        views = _fused_views(param, grad, *([] if buf is None else [buf]))
        if views is None:
            return super().sgd_update(
                param, grad, buf, lr, weight_decay, momentum, nesterov, n_threads
            )
        p, g, *b = views  # the same arithmetic as Ops.sgd_update, in one pass
        self._run(
            _cmm.sgd_update,
            p,
            g,
            b[0] if b else p,
            bool(b),
            lr,
            weight_decay,
            momentum,
            nesterov,
            n_threads,
        )
        return None

    def adam_update(
        self, param, grad, m, v, lr, betas, eps, weight_decay, decoupled, step, n_threads
    ):
        views = _fused_views(param, grad, m, v)
        if views is None:
            return super().adam_update(
                param, grad, m, v, lr, betas, eps, weight_decay, decoupled, step, n_threads
            )
        self._run(  # the same arithmetic as Ops.adam_update, in one pass
            _cmm.adam_update,
            *views,
            weight_decay,
            decoupled,
            lr,
            betas[0],
            betas[1],
            eps,
            step,
            n_threads,
        )
        return None


def _fused_views(*arrays):
    """(rows, cols) views of same-shaped float NumPy arrays, all with the axes in the order
    that makes their rows contiguous (a transposed parameter view goes back to its storage
    order; its gradient and state share that layout), for the fused update kernels of
    fastff._cmm; None where some array's layout or type does not allow it. The order comes
    from the first array's strides, else from another's: with a length-1 axis, an array's
    strides may not tell its storage order (a (1, n) view of a strided (n, 1) column)."""
    first = arrays[0]
    if first.ndim == 0 or first.dtype not in (np.float32, np.float64):
        return None
    for a in arrays:
        if type(a) is not np.ndarray or a.dtype != first.dtype or a.shape != first.shape:
            return None
    tried = []
    for guide in arrays:
        strides = guide.strides
        axes = sorted(range(first.ndim), key=lambda k: -abs(strides[k]))
        if axes in tried:
            continue
        tried.append(axes)
        views = [_rows_view(a, axes) for a in arrays]
        if all(v is not None for v in views):
            return views
    return None


def _rows_view(a, axes):
    """a with its axes in `axes` order as (rows, cols) with contiguous rows, or None."""
    t = a.transpose(axes)
    if t.ndim == 1:
        t = t[np.newaxis]
    elif t.ndim > 2:
        if not t.flags.c_contiguous:
            return None
        t = t.reshape(-1, t.shape[-1])
    if t.shape[1] > 1 and t.strides[1] != t.itemsize:
        return None
    return t
