"""Load balancing of the router-leaf FFF (``FFF.forward_train(x, load_balancing=alpha)``) and
of UltraFFF (the hardened form per tree; bottom of this file).

Array-module code (NumPy or CuPy, ``xp``) over the arrays the training forwards save; no
kernel of its own. The terms, their dense twins in fastff/reference.py (``fff_balance``):

- soft training: f_l = mean over the batch's rows of leaf l's mixture weight;
  ``L = n_leaves * sum_l f_l**2``, 1.0 when every leaf takes 1/n_leaves of the mass, n_leaves
  when one leaf takes it all. Its gradient reaches the routers through the mixture weights.
- hardened training (Switch Transformer's form): f_l = fraction of the rows whose rounded path
  reaches leaf l (a count: no gradient); P_l = mean over rows of [row reaches l] * the row's
  path probability, the product of the branch weights it took (q going right, 1 - q going
  left, q after any region-leak swap); ``L = n_leaves * sum_l f_l * P_l``. Its gradient
  reaches only the nodes each row visited: O(depth) per row for the logits, then one sparse
  (rows x nodes, depth entries a row) product each for the router weights and for dx.

A batch without rows has L = 0.0 and no gradient.
"""

from __future__ import annotations

import numpy as np


def soft_loss(mix) -> float:
    """L of soft training from the (B, n_leaves) mixture weights."""
    n_rows, n_leaves = mix.shape
    if n_rows == 0:
        return 0.0
    f = mix.mean(axis=0, dtype=np.float64)
    return float(n_leaves * (f * f).sum())


def soft_dmix(mix, weight: float):
    """weight * dL/dmix of soft training: the same (n_leaves,) row for every row of the batch
    (2 * n_leaves * f_l / B), in mix's dtype."""
    n_rows, n_leaves = mix.shape
    f = mix.mean(axis=0)
    f *= mix.dtype.type(weight * 2 * n_leaves / n_rows)
    return f


def _sigmoid(xp, z):
    return 0.5 * (1 + xp.tanh(0.5 * z))  # no overflow warning for large |z|


def hard_route(saved, n_nodes: int, xp):
    """(q (B, depth) right weights after region leak, right (B, depth) bool: the branch each
    row took (read from its path, so it is the kernel's decision), chosen (B, depth) weight
    of that branch) of a hardened training forward."""
    path, leaf, z = saved["path"], saved["leaf"], saved["z_path"]
    q = _sigmoid(xp, z)
    if saved.get("has_swap"):
        q = xp.where(saved["swap"].astype(bool), 1 - q, q)
    following = xp.concatenate([path[:, 1:], (leaf + n_nodes)[:, None]], axis=1)
    right = following == 2 * path + 2
    return q, right, xp.where(right, q, 1 - q)


def _switch_loss(leaf, chosen, n_leaves: int, n_trees: int, xp) -> float:
    """The hardened term of n_trees trees of n_leaves leaves each, averaged over the trees:
    leaf (N,) the leaf each of the N = B * n_trees (row, tree) walks reached, numbered
    tree * n_leaves + l; chosen (N, depth) the weights of the branches it took."""
    n_rows = leaf.shape[0] // n_trees
    counts = xp.bincount(leaf, minlength=n_trees * n_leaves).astype(np.float64)
    prob = chosen.astype(np.float64).prod(axis=1)
    big_p = xp.bincount(leaf, weights=prob, minlength=n_trees * n_leaves)
    return float(n_leaves * (counts * big_p).sum() / (n_rows * n_rows * n_trees))


def _switch_dz(leaf, q, chosen, n_leaves: int, n_trees: int, weight: float, xp):
    """weight * |dL/dz| of _switch_loss at each walk's decisions, (N, depth) in q's dtype (q
    the right weights); the sign is the caller's (+ going right, unless region leak swapped)."""
    n_rows = leaf.shape[0] // n_trees
    dtype = q.dtype
    share = xp.bincount(leaf, minlength=n_trees * n_leaves).astype(dtype)[leaf]  # B * f_leaf
    dprob = share * dtype.type(weight * n_leaves / (n_rows * n_rows * n_trees))
    # d prob / d q_k = +-prob / chosen_k (chosen >= 1/2: a rounded decision takes the larger
    # weight), and dq/dz = q (1 - q)
    dz = (dprob * chosen.prod(axis=1))[:, None] / chosen
    dz *= q * (1 - q)
    return dz


def hard_loss(saved, n_nodes: int, n_leaves: int, xp) -> float:
    """L of hardened training from the forward's saved path, logits, leaves and swaps."""
    leaf = saved["leaf"]
    n_rows = leaf.shape[0]
    if n_rows == 0:
        return 0.0
    if n_nodes == 0:
        chosen = xp.ones((n_rows, 0), dtype=np.float64)
    else:
        chosen = hard_route(saved, n_nodes, xp)[2]
    return _switch_loss(leaf, chosen, n_leaves, 1, xp)


def hard_dz(saved, n_nodes: int, n_leaves: int, weight: float, xp):
    """weight * dL/dz at each row's visited nodes, (B, depth) in the logits' dtype."""
    q, right, chosen = hard_route(saved, n_nodes, xp)
    dz = _switch_dz(saved["leaf"], q, chosen, n_leaves, 1, weight, xp)
    flip = ~right  # d chosen/dz is -q (1 - q) going left, and the reverse where swapped
    if saved.get("has_swap"):
        flip ^= saved["swap"].astype(bool)
    return xp.where(flip, -dz, dz)


# ---- UltraFFF (UltraFFF.forward_train(x, load_balancing=alpha)) --------------------------------
# The hardened form above, per tree of the neuron tree: a row's decisions are its pre-activations'
# signs (right iff z > 0) at the depth routing levels of its path, q = sigmoid(z) the soft weight
# of going right, and the tree's "leaves" its 2**depth bottom neurons. Each tree's term is
# n_leaves * sum_l f_l * P_l (at most n_leaves * sum_l f_l**2, as P_l <= f_l: 1.0 for an even
# spread, n_leaves for one bottom neuron taking every row); L is their mean over the trees. Its
# gradient reaches the routing nodes each row visited (not the bottom ones).


def ultra_route(visited, preact, depth: int, n_trees: int, xp):
    """(q (B, T, depth) right weights, right (B, T, depth) bool: the branch each row took, read
    from its path as the kernel chose it, chosen (B, T, depth) weight of that branch, leaf
    (B, T) bottom neuron reached, numbered tree * 2**depth + l) of an UltraFFF training forward's
    visited (B, T*(depth+1)) global node ids and preact (same shape)."""
    n_rows = visited.shape[0]
    n_nodes = 2 ** (depth + 1) - 1
    path = visited.reshape(n_rows, n_trees, depth + 1)
    local = path - (xp.arange(n_trees) * n_nodes)[None, :, None]
    right = local[:, :, 1:] == 2 * local[:, :, :-1] + 2
    q = _sigmoid(xp, preact.reshape(n_rows, n_trees, depth + 1)[:, :, :-1])
    leaf = local[:, :, -1] - (2**depth - 1) + (xp.arange(n_trees) << depth)[None, :]
    return q, right, xp.where(right, q, 1 - q), leaf


def ultra_loss(visited, preact, depth: int, n_trees: int, xp) -> float:
    """L of an UltraFFF training forward (0.0 for a batch without rows)."""
    n_rows = visited.shape[0]
    if n_rows == 0:
        return 0.0
    _, _, chosen, leaf = ultra_route(visited, preact, depth, n_trees, xp)
    walks = n_rows * n_trees  # depth may be 0: reshape(-1, 0) would not know this
    return _switch_loss(leaf.reshape(walks), chosen.reshape(walks, depth), 2**depth, n_trees, xp)


def ultra_dz(visited, preact, depth: int, n_trees: int, weight: float, xp):
    """(weight * dL/dz at each row's visited routing nodes (B, T*depth) in preact's dtype, their
    global node ids (B, T*depth), ascending along each row)."""
    n_rows = visited.shape[0]
    q, right, chosen, leaf = ultra_route(visited, preact, depth, n_trees, xp)
    walks = n_rows * n_trees
    dz = _switch_dz(
        leaf.reshape(walks),
        q.reshape(walks, depth),
        chosen.reshape(walks, depth),
        2**depth,
        n_trees,
        weight,
        xp,
    ).reshape(right.shape)
    dz = xp.where(right, dz, -dz)
    nodes = visited.reshape(n_rows, n_trees, depth + 1)[:, :, :-1]
    return dz.reshape(n_rows, -1), nodes.reshape(n_rows, -1)
