"""Dense NumPy reference of every fastff kernel: short, obviously right, and slow (O(width)).

This is the specification the tests hold both backends to. Parameters are in the anchor
(state-dict) layout; nothing here is optimised.
"""
from __future__ import annotations

import numpy as np
from scipy.special import erf


def act(name, z):
    if name == "identity":
        return z
    if name == "relu":
        return np.maximum(z, 0)
    if name == "gelu":
        return 0.5 * z * (1 + erf(z / np.sqrt(2)))
    raise ValueError(name)


def act_grad(name, z):
    if name == "identity":
        return np.ones_like(z)
    if name == "relu":
        return (z > 0).astype(z.dtype)
    if name == "gelu":
        return 0.5 * (1 + erf(z / np.sqrt(2))) + z * np.exp(-0.5 * z * z) / np.sqrt(2 * np.pi)
    raise ValueError(name)


# ---- neuron-tree FFF (UltraFastBERT) ---------------------------------------------------------

def ultra_visit_mask(z, depth, parallel_size):
    """M (B, T*n): 1 on the depth+1 nodes each row visits in each tree (right iff z > 0)."""
    n_rows = z.shape[0]
    n_nodes = 2 ** (depth + 1) - 1
    zt = z.reshape(n_rows, parallel_size, n_nodes)
    mask = np.zeros_like(zt)
    rows, trees = np.indices((n_rows, parallel_size))
    node = np.zeros((n_rows, parallel_size), dtype=np.intp)
    for _ in range(depth + 1):
        mask[rows, trees, node] = 1
        node = 2 * node + 1 + (zt[rows, trees, node] > 0)
    return mask.reshape(n_rows, parallel_size * n_nodes)


def ultra_forward(x, params, depth, parallel_size, activation):
    """UltraFastBERT's masked dense forward. x (B, in) -> y (B, out), cache."""
    z = x @ params["linear_in.weight"].T + params["linear_in.bias"]
    mask = ultra_visit_mask(z, depth, parallel_size)
    y = (act(activation, z) * mask) @ params["linear_out.weight"].T
    return y, (x, z, mask)


def ultra_backward(dy, cache, params, activation):
    """Hard-path gradients (decisions not differentiated) -> dx (B, in), grads by anchor key."""
    x, z, mask = cache
    d_act = dy @ params["linear_out.weight"]
    dz = d_act * act_grad(activation, z) * mask
    grads = {
        "linear_in.weight": dz.T @ x,
        "linear_in.bias": dz.sum(axis=0),
        "linear_out.weight": dy.T @ (act(activation, z) * mask),
    }
    return dz @ params["linear_in.weight"], grads


# ---- dense feedforward baseline (benchmarks) -------------------------------------------------

def dense_forward(x, w1, b1, w2, activation):
    """act(x @ w1 + b1) @ w2 with w1 (in, width), w2 (width, out): the FF an FFF replaces."""
    return act(activation, x @ w1 + b1) @ w2
