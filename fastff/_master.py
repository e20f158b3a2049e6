"""The master leaf of the router-leaf FFF (``FFF(..., master_leaf=True)``).

One more leaf MLP, ``act(x @ master.w1 + master.b1) @ master.w2 + master.b2`` (leaf_width
hidden units, the layer's activation), that every row evaluates, in training and at inference,
mixed with the tree's output by a learned share s = sigmoid(master.mix) (master.mix starts at
0, so s starts at 1/2):

    y = (1 - s) * y_tree + s * y_master

It is computed as a router-leaf tree of depth 0 (no routers, one leaf, mixture weight 1)
through the same Ops as the tree, so it runs on the CPU and the GPU alike: the soft training
forward and backward (two GEMMs each way, around the leaf-activation kernels) and hard
inference's kernel (``fff_infer``, also in half precision). Dropout and region leak act on the
tree only. The dense twin is fastff.reference's ``fff_master_forward``.

Internal parameters (FFF._params): master_w1t (leaf, in), master_b1 (leaf,), master_w2 (leaf,
out), master_b2 (out,), master_mix (1,); state-dict keys ``master.w1`` (in, leaf, the
transposed view), ``master.b1``, ``master.w2``, ``master.b2``, ``master.mix``.
"""

from __future__ import annotations

import numpy as np

ANCHOR = {
    "master.w1": ("master_w1t", (1, 0)),
    "master.b1": ("master_b1", None),
    "master.w2": ("master_w2", None),
    "master.b2": ("master_b2", None),
    "master.mix": ("master_mix", None),
}


def as_leaf(store, xp) -> dict:
    """The master leaf's arrays (parameters or gradients) as the Ops' router-leaf dict of a
    depth-0 tree: views with a leading leaf axis of 1, and empty router arrays."""
    w1t = store["master_w1t"]
    return {
        "node_w": xp.empty((0, w1t.shape[1]), dtype=w1t.dtype),
        "node_b": xp.empty((0, 1), dtype=w1t.dtype),
        "w1t": w1t[None],
        "b1": store["master_b1"][None],
        "w2": store["master_w2"][None],
        "b2": store["master_b2"][None],
    }


def share(p, xp, dtype):
    """s = sigmoid(master.mix) as a (1,) array of the compute dtype (no overflow warning)."""
    theta = p["master_mix"].astype(dtype)
    return 0.5 * (1 + xp.tanh(0.5 * theta))


def infer(ops, rows, p, y_tree, act, n_threads):
    """Hard inference's output: y_tree mixed with the master leaf's output on every row."""
    y_master = ops.fff_infer(rows, as_leaf(p, ops.xp), 0, act, n_threads)
    s = share(p, ops.xp, y_tree.dtype)
    y_tree *= 1 - s
    y_master *= s
    y_tree += y_master
    return y_tree


def train_forward(ops, rows, p, y_tree, act, n_threads):
    """-> (y, saved) of a training forward: the master leaf on every row, mixed in."""
    y_master, leaf_saved = ops.fff_soft_forward(rows, as_leaf(p, ops.xp), act, n_threads)
    s = share(p, ops.xp, y_tree.dtype)
    y = (1 - s) * y_tree + s * y_master
    return y, {"s": s, "y_tree": y_tree, "y_master": y_master, "leaf": leaf_saved}


def backward(ops, rows, dy, p, g, saved, act, n_threads, need_dx=True):
    """Adds the master leaf's gradients (its weights and master.mix) into g; returns (dy of the
    tree's output, dx of the master leaf or None without need_dx)."""
    xp, s = ops.xp, saved["s"]
    # d y / d mix = s (1 - s) (y_master - y_tree)
    diff = saved["y_master"] - saved["y_tree"]
    dmix = (dy * diff).sum(dtype=np.float64)
    g["master_mix"] += (dmix * (s * (1 - s))).astype(g["master_mix"].dtype)
    dx = ops.fff_soft_backward(
        rows,
        s * dy,
        as_leaf(p, xp),
        saved["leaf"],
        act,
        0.0,
        as_leaf(g, xp),
        n_threads,
        need_dx=need_dx,
    )
    return (1 - s) * dy, dx
