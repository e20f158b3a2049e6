"""CUDA twins of the router-leaf kernels of fastff._cmm, with the same signatures (the CPU's
trailing n_threads is accepted and ignored).

The FFF ops code (GEMMs plus these kernels) is written once against an array module and a
kernel module; on the GPU the array module is CuPy and the kernel module is this one.
"""

from __future__ import annotations

from . import kernels
from .kernels import cp

THREADS = 256
WARPS = 8


def _k(name, dtype):
    return kernels.get(name, dtype)


def _warp_grid(n_rows):
    return ((n_rows + WARPS - 1) // WARPS,), (32 * WARPS,)


def _thread_grid(n):
    return ((n + THREADS - 1) // THREADS,), (THREADS,)


def _hard_forward(
    x,
    node_w,
    node_b,
    w1t,
    b1,
    w2,
    b2,
    depth,
    act,
    mode,
    swap,
    has_swap,
    drop,
    has_drop,
    y,
    path,
    z_path,
    leaf,
    hpre,
    entropy,
):
    n_rows, in_w = x.shape
    if n_rows == 0:
        return
    grid, block = _warp_grid(n_rows)
    _k("fff_hard_forward", x.dtype)(
        grid,
        block,
        (
            x,
            node_w,
            node_b,
            w1t,
            b1,
            w2,
            b2,
            cp.int64(n_rows),
            cp.int32(in_w),
            cp.int32(w1t.shape[1]),
            cp.int32(y.shape[1]),
            cp.int32(depth),
            cp.int32(act),
            cp.int32(mode),
            swap,
            cp.int32(has_swap),
            drop,
            cp.int32(has_drop),
            y,
            path,
            z_path,
            leaf,
            hpre,
            entropy,
        ),
    )


def fff_infer(x, node_w, node_b, w1t, b1, w2, b2, depth, act, y, n_threads=None):
    empty = cp.empty(0, dtype=x.dtype)
    none_i = cp.empty(0, dtype=cp.int64)
    _hard_forward(
        x,
        node_w,
        node_b,
        w1t,
        b1,
        w2,
        b2,
        depth,
        act,
        0,
        cp.empty(0, cp.uint8),
        0,
        empty,
        0,
        y,
        none_i,
        empty,
        none_i,
        empty,
        empty,
    )


def fff_hard_train_forward(
    x,
    node_w,
    node_b,
    w1t,
    b1,
    w2,
    b2,
    depth,
    act,
    swap,
    has_swap,
    drop,
    has_drop,
    y,
    path,
    z_path,
    leaf,
    hpre,
    entropy,
    n_threads=None,
):
    _hard_forward(
        x,
        node_w,
        node_b,
        w1t,
        b1,
        w2,
        b2,
        depth,
        act,
        1,
        swap,
        int(has_swap),
        drop,
        int(has_drop),
        y,
        path,
        z_path,
        leaf,
        hpre,
        entropy,
    )


def fff_hard_train_backward(
    x,
    dy,
    node_w,
    w1t,
    w2,
    path,
    z_path,
    leaf,
    swap,
    has_swap,
    drop,
    has_drop,
    hpre,
    act,
    entropy_weight,
    dx,
    grad_node_w,
    grad_node_b,
    grad_w1t,
    grad_b1,
    grad_w2,
    grad_b2,
    n_threads=None,
):
    n_rows, in_w = x.shape
    if n_rows == 0:
        return
    grid, block = _warp_grid(n_rows)
    _k("fff_hard_backward", x.dtype)(
        grid,
        block,
        (
            x,
            dy,
            node_w,
            w1t,
            w2,
            path,
            z_path,
            leaf,
            swap,
            cp.int32(has_swap),
            drop,
            cp.int32(has_drop),
            hpre,
            cp.int64(n_rows),
            cp.int32(in_w),
            cp.int32(w1t.shape[1]),
            cp.int32(dy.shape[1]),
            cp.int32(path.shape[1]),
            cp.int32(act),
            x.dtype.type(entropy_weight),
            dx,
            grad_node_w,
            grad_node_b,
            grad_w1t,
            grad_b1,
            grad_w2,
            grad_b2,
        ),
    )


def fff_soft_mixture(z, swap, has_swap, q, reach, entropy, n_threads=None):
    n_rows, n_nodes = z.shape
    if n_rows == 0:
        return
    grid, block = _thread_grid(n_rows)
    _k("fff_soft_mixture", reach.dtype)(
        grid,
        block,
        (z, swap, cp.int32(has_swap), cp.int64(n_rows), cp.int64(n_nodes), q, reach, entropy),
    )


def fff_soft_router_backward(
    dmix, q, reach, swap, has_swap, entropy_weight, dreach, dz, n_threads=None
):
    n_rows, n_nodes = q.shape
    if n_rows == 0 or n_nodes == 0:
        return
    grid, block = _thread_grid(n_rows)
    _k("fff_soft_router_backward", q.dtype)(
        grid,
        block,
        (
            dmix,
            q,
            reach,
            swap,
            cp.int32(has_swap),
            cp.int64(n_rows),
            cp.int64(n_nodes),
            q.dtype.type(entropy_weight),
            dreach,
            dz,
        ),
    )


def fff_soft_leaf_activate(hpre, b1, mix, drop, has_drop, act, a, mixed, n_threads=None):
    n_rows, n_units = hpre.shape
    if n_rows * n_units == 0:
        return
    grid, block = _thread_grid(n_rows * n_units)
    _k("fff_soft_leaf_activate", hpre.dtype)(
        grid,
        block,
        (
            hpre,
            b1,
            mix,
            drop,
            cp.int32(has_drop),
            cp.int64(n_rows),
            cp.int64(n_units),
            cp.int32(b1.shape[1]),
            cp.int32(act),
            a,
            mixed,
        ),
    )


def fff_soft_leaf_backward(hpre, a, g, mix, drop, has_drop, act, dmix, n_threads=None):
    n_rows, n_leaves = mix.shape
    if n_rows * n_leaves == 0:
        return
    grid, block = _thread_grid(n_rows * n_leaves)
    _k("fff_soft_leaf_backward", hpre.dtype)(
        grid,
        block,
        (
            hpre,
            a,
            g,
            mix,
            drop,
            cp.int32(has_drop),
            cp.int64(n_rows),
            cp.int64(n_leaves),
            cp.int32(hpre.shape[1] // n_leaves),
            cp.int32(act),
            dmix,
        ),
    )
