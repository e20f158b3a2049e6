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


def ultra_balance(z, depth, parallel_size):
    """UltraFFF's load-balancing term (UltraFFF.forward_train(load_balancing=...)): per tree,
    the hardened FFF's n_leaves * sum_l f_l * P_l over its 2**depth bottom neurons, with branch
    weight q = sigmoid(z) going right (z > 0) and 1 - q going left; averaged over the trees.
    -> (loss, dloss/dz (B, T*n) at the routing nodes each row visits, 0 elsewhere)."""
    n_rows = z.shape[0]
    n_nodes, n_routers, n_leaves = 2 ** (depth + 1) - 1, 2**depth - 1, 2**depth
    if n_rows == 0:
        return 0.0, np.zeros_like(z)
    zt = z.reshape(n_rows, parallel_size, n_nodes)
    mask = ultra_visit_mask(z, depth, parallel_size).reshape(zt.shape)
    reach, routed = mask[:, :, n_routers:], mask[:, :, :n_routers]  # bottom / routing visits
    q = 1 / (1 + np.exp(-zt[:, :, :n_routers]))
    chosen = np.where(zt[:, :, :n_routers] > 0, q, 1 - q)
    prob = np.where(routed > 0, chosen, 1.0).prod(axis=2)  # (B, T)
    f = reach.mean(axis=0)  # (T, n_leaves)
    big_p = (reach * prob[:, :, None]).mean(axis=0)
    loss = float((n_leaves * (f * big_p).sum(axis=1)).mean())
    f_row = (reach * f).sum(axis=2)  # f of the bottom neuron each row reaches, (B, T)
    sign = np.where(zt[:, :, :n_routers] > 0, 1.0, -1.0)
    coef = n_leaves * f_row * prob / (n_rows * parallel_size)
    dz = np.zeros_like(zt)
    dz[:, :, :n_routers] = routed * coef[:, :, None] / chosen * q * (1 - q) * sign
    return loss, dz.reshape(z.shape)


def ultra_backward(dy, cache, params, activation, load_balancing=0.0, depth=0, parallel_size=1):
    """Hard-path gradients (decisions not differentiated) of sum(y * dy) + load_balancing *
    ultra_balance -> dx (B, in), grads by anchor key."""
    x, z, mask = cache
    d_act = dy @ params["linear_out.weight"]
    dz = d_act * act_grad(activation, z) * mask
    if load_balancing:
        dz = dz + load_balancing * ultra_balance(z, depth, parallel_size)[1]
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
#
# Master leaf (FFF(master_leaf=True)): one more leaf MLP every row evaluates, master.w1 (in, leaf),
# master.b1 (leaf,), master.w2 (leaf, out), master.b2 (out,), mixed in by s = sigmoid(master.mix)
# (master.mix of shape (1,)): y = (1 - s) * y_tree + s * y_master, in training and inference.
#
# Load balancing (forward_train(load_balancing=alpha)): alpha times a term over the leaf-usage
# fractions of the batch, minimal (1.0) when every leaf takes the same share of rows:
#   soft:     f_l = mean over rows of the mixture weight mix_l;  L = n_leaves * sum_l f_l**2
#   hardened: f_l = fraction of rows reaching leaf l (no gradient); P_l = mean over rows of
#             [row reaches l] * prod of the chosen branch weights on its path (q or 1 - q after
#             region leak, the Switch Transformer's router probability);
#             L = n_leaves * sum_l f_l * P_l

MASTER_KEYS = ("master.w1", "master.b1", "master.w2", "master.b2", "master.mix")

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
    y = f[np.arange(x.shape[0]), leaf]
    if "master.w1" not in params:
        return y
    s = fff_master_share(params)
    return (1 - s) * y + s * fff_master_forward(x, params, activation)[2]


def fff_master_share(params):
    """s = sigmoid(master.mix), the master leaf's share of the output."""
    return float(1 / (1 + np.exp(-np.asarray(params["master.mix"], np.float64).reshape(-1)[0])))


def fff_master_forward(x, params, activation):
    """The master leaf on every row: -> hpre (B, leaf), a = act(hpre), y_master (B, out)."""
    hpre = x @ params["master.w1"] + params["master.b1"]
    a = act(activation, hpre)
    return hpre, a, a @ params["master.w2"] + params["master.b2"]


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
    """Training forward of the package's training_forward, written densely (plus fastff's
    master leaf where params hold its keys, and the load-balancing term in the cache).

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
    balance = fff_balance(mix, q, d, counted, hardened)
    master = None
    if "master.w1" in params:
        s = fff_master_share(params)
        y_tree = y
        master = (s, y_tree, *fff_master_forward(x, params, activation))
        y = (1 - s) * y_tree + s * master[4]
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
        balance=balance,
        master=master,
    )
    return y, mean_entropy, cache


def fff_balance(mix, q, d, counted, hardened):
    """The load-balancing term (see the top of this section) and what its gradient needs:
    dict(loss, f, and hardened: chosen (B, n_nodes) branch weights, prob (B,) path products).
    No rows: loss 0.0."""
    n_rows, n_leaves = mix.shape
    if n_rows == 0:
        return dict(loss=0.0, f=np.zeros(n_leaves))
    f = mix.mean(axis=0)
    if not hardened:
        return dict(loss=float(n_leaves * (f * f).sum()), f=f)
    chosen = np.where(d > 0, q, 1 - q)
    prob = np.where(counted > 0, chosen, 1.0).prod(axis=1)
    big_p = (mix * prob[:, None]).mean(axis=0)
    return dict(loss=float(n_leaves * (f * big_p).sum()), f=f, chosen=chosen, prob=prob)


def fff_train_backward(dy, cache, params, activation, hardening=0.0, load_balancing=0.0):
    """Gradients of sum(y * dy) + hardening * mean entropy + load_balancing * balance term.
    -> dx (B, in), grads (package layout, plus the master leaf's keys where it has one).
    Hardened: the rounding passes no gradient (torch.round), so routers learn only from the
    entropy and balancing terms (the latter through the chosen branch weights of P_l)."""
    c = cache
    x, n_nodes = c["x"], c["z"].shape[1]
    n_rows, n_leaves = x.shape[0], n_nodes + 1
    mix = c["reach"][:, n_nodes:]
    master_grads, dx_master = {}, 0.0
    if c["master"] is not None:  # y = (1 - s) y_tree + s y_master
        s, y_tree, m_hpre, m_a, y_master = c["master"]
        dm_hpre = (s * dy) @ params["master.w2"].T * act_grad(activation, m_hpre)
        master_grads = {
            "master.w1": x.T @ dm_hpre,
            "master.b1": dm_hpre.sum(axis=0),
            "master.w2": m_a.T @ (s * dy),
            "master.b2": (s * dy).sum(axis=0),
            "master.mix": np.array([(dy * (y_master - y_tree)).sum() * s * (1 - s)]),
        }
        dx_master = dm_hpre @ params["master.w1"].T
        dy = (1 - s) * dy
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
    balance = c["balance"]
    if load_balancing and n_rows and not c["hardened"]:  # d(n_leaves sum f_l^2) / d mix_bl
        dmix = dmix + load_balancing * n_leaves * 2 * balance["f"] / n_rows
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
    if load_balancing and n_rows and c["hardened"]:
        # L = n_leaves/B * sum_b f_leaf(b) prob_b; prob_b = prod of chosen weights (visited)
        dprob = load_balancing * n_leaves * (mix @ balance["f"]) / n_rows
        sign = np.where(c["d"] > 0, 1.0, -1.0)  # chosen = q going right, 1 - q going left
        dq = dq + (dprob * balance["prob"])[:, None] / balance["chosen"] * sign * c["counted"]
    dp = np.where(c["swap"], -dq, dq)
    dz = dp * c["p"] * (1 - c["p"])
    grads["node_weights"] = dz.T @ x
    grads["node_biases"] = dz.sum(axis=0)[:, None]
    grads.update(master_grads)
    return dx + dz @ params["node_weights"] + dx_master, grads


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
