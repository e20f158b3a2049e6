"""Backends: one Ops interface, a CPU implementation here and a CUDA twin in fastff.gpu.

Layers hold their parameters in the backend's array type and call only these methods, so the
layer code is the same on every device (thinc's Ops pattern).
"""
from __future__ import annotations

import numpy as np

from . import _cmm

ACTIVATIONS = dict(_cmm.ACTIVATIONS)


class CPUOps:
    """NumPy arrays, Cython/OpenMP kernels (fastff._cmm)."""

    name = "cpu"
    xp = np

    def asarray(self, a, dtype=None):
        if hasattr(a, "__cuda_array_interface__") and hasattr(a, "get"):
            a = a.get()
        return np.asarray(a, dtype=dtype)

    def to_numpy(self, a):
        return np.asarray(a)

    def ultra_forward(self, x, w_in, b_in, w_out_t, depth, n_trees, act, save_path):
        """x (B, in) -> y (B, out); with save_path also visited nodes and pre-activations,
        each (B, T*(depth+1))."""
        n_rows = x.shape[0]
        y = np.empty((n_rows, w_out_t.shape[1]), dtype=x.dtype)
        path = n_trees * (depth + 1) if save_path else 0
        visited = np.empty((n_rows if save_path else 0, path), dtype=np.intp)
        preact = np.empty((n_rows if save_path else 0, path), dtype=x.dtype)
        _cmm.ultra_forward(x, w_in, b_in, w_out_t, depth, n_trees, ACTIVATIONS[act], y,
                           visited, preact, save_path)
        return y, visited, preact

    def ultra_backward(self, x, dy, w_in, w_out_t, visited, preact, act, grad_w_in, grad_b_in,
                       grad_w_out_t):
        """Adds the hard-path parameter gradients into grad_*; returns dx (B, in)."""
        dx = np.empty_like(x)
        _cmm.ultra_backward(x, dy, w_in, w_out_t, visited, preact, ACTIVATIONS[act], dx,
                            grad_w_in, grad_b_in, grad_w_out_t)
        return dx


_CPU = CPUOps()


def get_ops(device: str):
    """The Ops of a device name: "cpu", or "cuda" (needs CuPy and a CUDA device)."""
    if device == "cpu":
        return _CPU
    if device == "cuda":
        from .gpu import get_gpu_ops

        return get_gpu_ops()
    raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")


def get_array_module(a):
    """numpy for host arrays, cupy for CUDA arrays (without importing CuPy for host ones)."""
    if hasattr(a, "__cuda_array_interface__"):
        import cupy

        return cupy.get_array_module(a)
    return np
