"""Dense NumPy reference of every fastff kernel: short, obviously right, and slow (O(width)).

This is the specification the tests hold both backends to. Parameters are in the anchor
(state-dict) layout; nothing here is optimised.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.special import erf


def act(name, z):
    """The activation `name` ("identity", "relu" or exact "gelu") of z, elementwise."""
    if name == "identity":
        return z
    if name == "relu":
        return np.maximum(z, 0)
    if name == "gelu":
        return 0.5 * z * (1 + erf(z / np.sqrt(2)))
    raise ValueError(name)


def act_grad(name, z):
    """d act(name, z) / dz, elementwise (ReLU's derivative at 0 taken as 0)."""
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


# ---- router-leaf FFF (Fast Feedforward Networks, the `fastfeedforward` package) ----------------
# Heap order: node n's children are 2n+1 (left) and 2n+2 (right); leaf l is heap index
# n_nodes + l. Parameters in the package's layout: node_weights (n_nodes, in), node_biases
# (n_nodes, 1), w1s (n_leaves, in, leaf), b1s (n_leaves, leaf), w2s (n_leaves, leaf, out),
# b2s (n_leaves, out).

ENTROPY_EPS = 1e-6  # the clamp of the package's compute_entropy_safe


def fff_leaves(x, params, activation, drop=None):
    """Every leaf on every row. -> hpre (B, L, leaf), a = act(hpre) * drop, f (B, L, out)."""
    hpre = np.einsum("bi,lij->blj", x, params["w1s"]) + params["b1s"]
    a = act(activation, hpre) if drop is None else act(activation, hpre) * drop
    f = np.einsum("blj,ljo->blo", a, params["w2s"]) + params["b2s"]
    return hpre, a, f


def fff_hard_paths(z, right):
    """Walk each row down from the root: right[b, n] says whether row b goes right at node n.
    -> visited (B, n_nodes) 0/1, leaf (B,)."""
    n_rows, n_nodes = z.shape
    depth = (n_nodes + 1).bit_length() - 1
    visited = np.zeros(z.shape)
    node = np.zeros(n_rows, dtype=np.intp)
    rows = np.arange(n_rows)
    for _ in range(depth):
        visited[rows, node] = 1
        node = 2 * node + 1 + right[rows, node]
    return visited, node - n_nodes


def fff_infer(x, params, activation):
    """Hard inference (the package's eval_forward): right iff logit >= 0; the reached leaf's f."""
    z = x @ params["node_weights"].T + params["node_biases"].T
    _, leaf = fff_hard_paths(z, (z >= 0).astype(np.intp))
    _, _, f = fff_leaves(x, params, activation)
    return f[np.arange(x.shape[0]), leaf]


def fff_entropy(q):
    """The package's clamped Bernoulli entropy and its derivative in q (torch.clamp passes no
    gradient where it cuts)."""
    p = np.clip(q, ENTROPY_EPS, 1 - ENTROPY_EPS)
    m = np.clip(1 - q, ENTROPY_EPS, 1 - ENTROPY_EPS)
    in_p = (q >= ENTROPY_EPS) & (q <= 1 - ENTROPY_EPS)
    in_m = (1 - q >= ENTROPY_EPS) & (1 - q <= 1 - ENTROPY_EPS)
    h = -p * np.log(p) - m * np.log(m)
    dh_dq = -(np.log(p) + 1) * in_p + (np.log(m) + 1) * in_m
    return h, dh_dq


def fff_train_forward(x, params, activation, *, hardened=False, swap=None, drop=None):
    """Training forward of the package's training_forward, written densely.

    swap (B, n_nodes) bool: region-leak swaps (the right weight q becomes 1 - sigmoid(z));
    drop (B, L, leaf): dropout keep mask with its 1/(1-rate) scale. Soft: each branch weighs q or
    1 - q and a leaf's mixture weight is the product along its path. Hardened: the weights are
    rounded, right iff q > 1/2 (torch.round, ties left), so the mixture is one-hot.
    Entropies: soft, of every node on every row; hardened, of the nodes each row visits.
    -> y (B, out), mean entropy, cache.
    """
    n_rows = x.shape[0]
    n_nodes = params["node_weights"].shape[0]
    z = x @ params["node_weights"].T + params["node_biases"].T
    p = 1 / (1 + np.exp(-z))
    swap = np.zeros(z.shape, bool) if swap is None else swap
    q = np.where(swap, 1 - p, p)
    d = (q > 0.5).astype(x.dtype) if hardened else q  # right-branch weight of each node
    reach = np.ones((n_rows, 2 * n_nodes + 1))
    for n in range(n_nodes):
        reach[:, 2 * n + 1] = reach[:, n] * (1 - d[:, n])
        reach[:, 2 * n + 2] = reach[:, n] * d[:, n]
    mix = reach[:, n_nodes:]
    hpre, a, f = fff_leaves(x, params, activation, drop)
    y = np.einsum("bl,blo->bo", mix, f)
    h, _ = fff_entropy(q)
    counted = reach[:, :n_nodes] if hardened else np.ones(z.shape)  # 0/1 visited when hardened
    n_counted = counted.sum()
    mean_entropy = float((h * counted).sum() / n_counted) if n_counted else 0.0
    cache = dict(
        x=x,
        z=z,
        p=p,
        q=q,
        d=d,
        swap=swap,
        reach=reach,
        hpre=hpre,
        a=a,
        f=f,
        drop=drop,
        counted=counted,
        n_counted=n_counted,
        hardened=hardened,
    )
    return y, mean_entropy, cache


def fff_train_backward(dy, cache, params, activation, hardening=0.0):
    """Gradients of sum(y * dy) + hardening * mean entropy. -> dx (B, in), grads (package
    layout). Hardened: the rounding passes no gradient (torch.round), so routers learn only from
    the entropy term."""
    c = cache
    x, n_nodes = c["x"], c["z"].shape[1]
    mix = c["reach"][:, n_nodes:]
    # leaves: y = sum_l mix_l (a_l @ w2_l + b2_l)
    dmix = np.einsum("bo,blo->bl", dy, c["f"])
    da = np.einsum("bl,bo,ljo->blj", mix, dy, params["w2s"])
    dhpre = da * act_grad(activation, c["hpre"])
    if c["drop"] is not None:
        dhpre = dhpre * c["drop"]
    grads = {
        "w2s": np.einsum("bl,blj,bo->ljo", mix, c["a"], dy),
        "b2s": np.einsum("bl,bo->lo", mix, dy),
        "w1s": np.einsum("bi,blj->lij", x, dhpre),
        "b1s": dhpre.sum(axis=0),
    }
    dx = np.einsum("blj,lij->bi", dhpre, params["w1s"])
    # routers: back through the path products, leaves to root
    dreach = np.zeros_like(c["reach"])
    dreach[:, n_nodes:] = dmix
    dd = np.zeros_like(c["z"])
    for n in reversed(range(n_nodes)):
        left, right = dreach[:, 2 * n + 1], dreach[:, 2 * n + 2]
        dd[:, n] = c["reach"][:, n] * (right - left)
        dreach[:, n] = left * (1 - c["d"][:, n]) + right * c["d"][:, n]
    dq = np.zeros_like(dd) if c["hardened"] else dd
    if hardening and c["n_counted"]:
        _, dh_dq = fff_entropy(c["q"])
        dq = dq + hardening * dh_dq * c["counted"] / c["n_counted"]
    dp = np.where(c["swap"], -dq, dq)
    dz = dp * c["p"] * (1 - c["p"])
    grads["node_weights"] = dz.T @ x
    grads["node_biases"] = dz.sum(axis=0)[:, None]
    return dx + dz @ params["node_weights"], grads


def sgd_step(p, g, buf, lr, momentum=0.0, nesterov=False, weight_decay=0.0):
    """PyTorch's SGD update of one parameter, in its dtype, one operation at a time as
    fastff/optim.py writes it: returns (p, buf) (buf: the momentum buffer, or None)."""
    if weight_decay:
        g = g + weight_decay * p
    if momentum:
        buf = momentum * buf + g
        g = g + momentum * buf if nesterov else buf
    return p - lr * g, buf


def adam_step(p, g, m, v, t, lr, beta1, beta2, eps, weight_decay=0.0, decoupled=False):
    """PyTorch's Adam (AdamW with decoupled) update of one parameter at step t >= 1, in its
    dtype, one operation at a time as fastff/optim.py writes it: returns (p, m, v)."""
    if weight_decay and decoupled:
        p = p * (1 - lr * weight_decay)
    elif weight_decay:
        g = g + weight_decay * p
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * (g * g)
    # Python-float scalars: they take the arrays' dtype (a NumPy float64 scalar would not)
    denom = np.sqrt(v) * (1 / math.sqrt(1 - beta2**t)) + eps
    return p - (lr / (1 - beta1**t)) * (m / denom), m, v
