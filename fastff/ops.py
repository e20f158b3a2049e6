"""Backends: one Ops interface, implemented by fastff.cpu.ops.CPUOps and fastff.gpu.ops.GPUOps.

Layers hold their parameters in the backend's array type and call only these methods, so the
layer code is the same on every device (thinc's Ops pattern). Every kernel method takes
``n_threads``, resolved once per call by the caller (fastff._threads.effective_n_threads): the CPU
kernels never ask OpenMP, whose setting is per OS thread; the GPU ignores it.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from . import _balance, _cmm
from ._validation import HALF_DTYPES

ACTIVATIONS = dict(_cmm.ACTIVATIONS)
# half-precision storage dtype -> the kernels' code for it; keyed by the dtype itself: a dtype's
# .name costs ~4 us, a quarter of a batch-1 UltraFFF call
HALF_KINDS = {d: _cmm.HALF_KINDS[d.name] for d in HALF_DTYPES}


class Ops:
    """Every operation the layers, nn and optim call, declared once with its signature.

    The ops are written once here, against `self.xp` (NumPy or CuPy) and `self.cmm` (the kernel
    module: fastff._cmm or its CUDA twin fastff.gpu.cmm, same function names and arguments);
    every kernel call goes through `self._run`. A backend (CPUOps in fastff.cpu.ops, GPUOps in
    fastff.gpu.ops) sets xp and cmm, implements the array helpers and overrides what it does
    differently. tests/test_ops.py holds every backend's public methods to these signatures.
    """

    name: str
    xp: Any
    cmm: Any

    def _run(self, kernel, *args):
        """kernel(*args): every kernel call goes through here (its last argument is n_threads),
        so a backend can adjust it (CPUOps shares the cores among concurrent calls)."""
        return kernel(*args)

    # ---- arrays --------------------------------------------------------------------------
    def asarray(self, a, dtype=None):
        """`a` as this backend's array (copied across devices), optionally cast to dtype."""
        raise NotImplementedError

    def to_numpy(self, a):
        """A NumPy array of this backend's array `a`."""
        raise NotImplementedError

    # ---- neuron-tree FFF -------------------------------------------------------------------
    # p and g are the layer's internal parameter / gradient dicts: w_in (T*n, in), b_in (T*n,),
    # w_out_t (T*n, out); node g's input and output weights are rows w_in[g] and w_out_t[g].
    def ultra_forward(self, x, p, depth, n_trees, act, save_path, n_threads, y=None):
        """x (B, in) -> y (B, out), visited (B, T*(depth+1)) node ids and preact (same shape)
        pre-activations; the last two are (0, 0) unless save_path.

        y given (a C-contiguous (B, out) array of x's dtype; float32 or float64 weights): the
        walk adds into it and returns it. On the CPU each row's sum goes on from y's value in
        path order, so a walk split in two calls (a tree's top levels, then the subtree below
        the node they reach, given as a tree of its own) is bitwise one call's; the GPU adds
        its walk's sum into y."""
        n_rows = x.shape[0]
        kernel = self.cmm.ultra_forward_add
        if y is None:
            kernel = self.cmm.ultra_forward
            y = self.xp.empty((n_rows, p["w_out_t"].shape[1]), dtype=x.dtype)
        if save_path:
            path = n_trees * (depth + 1)
            visited = self.xp.empty((n_rows, path), dtype=np.intp)
            preact = self.xp.empty((n_rows, path), dtype=x.dtype)
        else:  # the kernels do not touch them: shared empty arrays, no allocation per call
            visited, preact = self._no_path(x.dtype)
        weights = (p["w_in"], p["b_in"], p["w_out_t"])
        act_code = ACTIVATIONS[act]
        outputs = (y, visited, preact, save_path)
        half_kind = HALF_KINDS.get(weights[0].dtype)
        if half_kind is not None:  # 16-bit storage: the kernels take the bits and the format
            if kernel is self.cmm.ultra_forward_add:
                raise TypeError("ultra_forward adds into y with float32 or float64 weights only")
            bits = [w.view(np.uint16) for w in weights]
            args = (x, *bits, depth, n_trees, act_code, *outputs, half_kind, n_threads)
            self._run(self.cmm.ultra_forward_half, *args)
            return y, visited, preact
        self._run(kernel, x, *weights, depth, n_trees, act_code, *outputs, n_threads)
        return y, visited, preact

    # whether cmm.ultra_backward and cmm.fff_hard_train_backward skip dx when handed a dx of no
    # rows (the CPU kernels do; the CUDA ones fill a whole dx)
    _kernels_skip_dx = False

    def _dx_out(self, x, need_dx):
        """The dx a backward kernel writes: (0, in) where the input needs no gradient and the
        kernel can skip it, else x's shape."""
        if need_dx or not self._kernels_skip_dx:
            return self.xp.empty_like(x)
        return self.xp.empty((0, x.shape[1]), dtype=x.dtype)

    def ultra_backward(
        self, x, dy, p, g, visited, preact, act, n_threads, need_dx=True, balance=0.0, n_trees=1
    ):
        """Adds the hard-path parameter gradients into g; returns dx (B, in), or None without
        need_dx (an input that needs no gradient: the CPU kernel then skips the dx pass, whose
        w_in reads are most of the backward when in >> out). balance weighs the load-balancing
        term of the n_trees trees (fastff._balance.ultra_loss), whose gradient reaches the
        visited routing nodes only."""
        dx = self._dx_out(x, need_dx)
        n_rows, depth = visited.shape[0], visited.shape[1] // n_trees - 1
        balance_terms = None
        if balance and n_rows and depth:  # before the kernel adds anything: it may fail
            dz, nodes = _balance.ultra_dz(visited, preact, depth, n_trees, balance, self.xp)
            balance_terms = self._path_gradients(x, dz, nodes, p["w_in"], need_dx)
        saved = (visited, preact, ACTIVATIONS[act])
        grads = (g["w_in"], g["b_in"], g["w_out_t"])
        self._run(
            self.cmm.ultra_backward, x, dy, p["w_in"], p["w_out_t"], *saved, dx, *grads, n_threads
        )
        if balance_terms is not None:
            self._add_path_gradients(balance_terms, g["w_in"], g["b_in"], dx)
        return dx if need_dx else None

    def _path_gradients(self, x, dz, nodes, w, need_dx):
        """The gradients of pre-activations z = x @ w.T + b given at each row's nodes (dz (B, k)
        at node ids nodes (B, k), ascending along a row), for _add_path_gradients: (rows,
        dw, db, dx_part), rows None for all n nodes of w (n, in), else the node ids dw and db
        belong to. One sparse (rows x nodes, k entries a row) product each, O(k * in) per row.
        Where the tree has more nodes than the batch has entries (a deep tree), the columns
        are only the visited nodes, so neither the product nor the update touches the others;
        a small tree's dense (n, in) product is cheaper than finding them (the same sums)."""
        xp = self.xp
        rows, columns, n_columns = None, nodes, w.shape[0]
        if w.shape[0] > dz.size:
            rows, columns = xp.unique(nodes.reshape(-1), return_inverse=True)
            columns, n_columns = columns.reshape(nodes.shape), rows.shape[0]
        sparse = self._csr_rows(dz, columns, n_columns)
        dw = sparse.T @ x
        db = xp.bincount(columns.reshape(-1), weights=dz.reshape(-1), minlength=n_columns)
        dx_part = (sparse @ (w if rows is None else w[rows])) if need_dx else None
        return rows, dw, db.astype(dz.dtype), dx_part

    @staticmethod
    def _add_path_gradients(terms, g_w, g_b, dx):
        """Adds _path_gradients' terms into g_w (n, in), g_b (n,) and dx (B, in). The terms are
        formed before a backward kernel runs and added after it, so running out of memory
        forming them leaves every gradient as it was."""
        rows, dw, db, dx_part = terms
        if rows is None:
            g_w += dw
            g_b += db
        else:
            g_w[rows] += dw
            g_b[rows] += db
        if dx_part is not None:
            dx += dx_part

    def _no_path(self, dtype):
        """(0, 0) visited and preact stand-ins for an inference call, made once per dtype."""
        cache = self.__dict__.setdefault("_no_paths", {})
        key = np.dtype(dtype).char
        if key not in cache:
            cache[key] = (self.xp.empty((0, 0), np.intp), self.xp.empty((0, 0), dtype))
        return cache[key]

    # ---- optimizer updates, in place (PyTorch's semantics; fastff/optim.py) ------------------
    def sgd_update(self, param, grad, buf, lr, weight_decay, momentum, nesterov, n_threads):
        """g = grad + weight_decay * p; with a momentum buffer buf (None: no momentum):
        buf = momentum * buf + g, g = g + momentum * buf if nesterov else buf; p -= lr * g."""
        g = grad
        if weight_decay:
            g = g + weight_decay * param
        if buf is not None:
            buf *= momentum
            buf += g
            g = g + momentum * buf if nesterov else buf
        param -= lr * g

    def adam_update(
        self, param, grad, m, v, lr, betas, eps, weight_decay, decoupled, step, n_threads
    ):
        """One Adam (decoupled: AdamW) step of p, m, v from grad; step is the 1-based t."""
        beta1, beta2 = betas
        g = grad
        if weight_decay:
            if decoupled:
                param *= 1 - lr * weight_decay
            else:
                g = g + weight_decay * param
        m *= beta1
        m += (1 - beta1) * g
        v *= beta2
        v += (1 - beta2) * (g * g)
        denom = self.xp.sqrt(v)
        denom *= 1 / math.sqrt(1 - beta2**step)
        denom += eps
        param -= (lr / (1 - beta1**step)) * (m / denom)

    # ---- router-leaf FFF ---------------------------------------------------------------------
    # p and g are the layer's internal parameter / gradient dicts: node_w (n_nodes, in),
    # node_b (n_nodes, 1), w1t (n_leaves, leaf, in), b1 (n_leaves, leaf), w2 (n_leaves, leaf,
    # out), b2 (n_leaves, out). Optional masks: swap (bool; soft (B, n_nodes), hardened
    # (B, depth)), drop (scaled keep mask; soft (B, n_leaves * leaf), hardened (B, leaf)).

    def _masks(self, swap, drop, dtype):
        """The kernels' optional mask arguments: {"swap", "has_swap", "drop", "has_drop"} in
        their argument order (an absent mask is an empty array and a False flag)."""
        masks = {}
        for name, mask, mask_dtype in (("swap", swap, np.uint8), ("drop", drop, dtype)):
            present = mask is not None
            masks[name] = (
                self.xp.ascontiguousarray(mask, dtype=mask_dtype)
                if present
                else self.xp.empty((0, 0), dtype=mask_dtype)
            )
            masks["has_" + name] = present
        return masks

    def fff_infer(self, x, p, depth, act, n_threads):
        """Hard inference, x (B, in) -> y (B, out)."""
        y = self.xp.empty((x.shape[0], p["w2"].shape[2]), dtype=x.dtype)
        weights = _fff_weights(p)
        half_kind = HALF_KINDS.get(weights[0].dtype)
        if half_kind is not None:  # 16-bit storage: the kernels take the bits and the format
            bits = [w.view(np.uint16) for w in weights]
            args = (x, *bits, depth, ACTIVATIONS[act], y, half_kind, n_threads)
            self._run(self.cmm.fff_infer_half, *args)
            return y
        self._run(self.cmm.fff_infer, x, *weights, depth, ACTIVATIONS[act], y, n_threads)
        return y

    def fff_soft_forward(self, x, p, act, n_threads, swap=None, drop=None):
        """Soft-mixture training forward: x (B, in) -> y (B, out), saved (dict for the backward;
        "q" right weights (B, n_nodes), "reach" (B, n_nodes + n_leaves) heap-order path
        products, "entropy" (B,) summed node entropies per row)."""
        n_rows = x.shape[0]
        n_nodes, n_leaves, leaf_w = p["node_w"].shape[0], p["w1t"].shape[0], p["w1t"].shape[1]
        masks = self._masks(swap, drop, x.dtype)
        swap_arr, has_swap, drop_arr, has_drop = masks.values()
        z = x @ p["node_w"].T
        z += p["node_b"].reshape(1, -1)
        q = self.xp.empty_like(z)
        reach = self.xp.empty((n_rows, n_nodes + n_leaves), dtype=x.dtype)
        entropy = self.xp.empty(n_rows, dtype=x.dtype)
        self._run(self.cmm.fff_soft_mixture, z, swap_arr, has_swap, q, reach, entropy, n_threads)
        mix = self.xp.ascontiguousarray(reach[:, n_nodes:])
        # Every leaf's hidden units at once: one GEMM against w1t viewed (n_leaves * leaf, in).
        hpre = x @ p["w1t"].reshape(n_leaves * leaf_w, -1).T
        a = self.xp.empty_like(hpre)
        mixed = self.xp.empty_like(hpre)
        self._run(
            self.cmm.fff_soft_leaf_activate,
            hpre,
            p["b1"],
            mix,
            drop_arr,
            has_drop,
            ACTIVATIONS[act],
            a,
            mixed,
            n_threads,
        )
        # sum_l mix_l (a_l @ w2_l + b2_l) is one GEMM over the mixed hidden units plus mix @ b2.
        y = mixed @ p["w2"].reshape(n_leaves * leaf_w, -1)
        y += mix @ p["b2"]
        saved = {
            "q": q,
            "reach": reach,
            "mix": mix,
            "hpre": hpre,
            "a": a,
            "mixed": mixed,
            "entropy": entropy,
            **masks,
        }
        return y, saved

    def fff_soft_backward(
        self, x, dy, p, saved, act, entropy_weight, g, n_threads, balance=0.0, need_dx=True
    ):
        """Adds the soft-mixture gradients into g; returns dx (B, in), or None without need_dx
        (then its two products, as large as the weight gradients', are not formed).
        entropy_weight scales each (row, node) entropy's gradient (hardening / (B * n_nodes));
        balance weighs the load-balancing term n_leaves * sum_l f_l**2 (fastff._balance), whose
        gradient joins the mixture weights' before the router backward."""
        n_leaves, leaf_w = p["w1t"].shape[0], p["w1t"].shape[1]
        w1_flat = p["w1t"].reshape(n_leaves * leaf_w, -1)
        w2_flat = p["w2"].reshape(n_leaves * leaf_w, -1)
        mix = saved["mix"]
        dh = dy @ w2_flat.T  # becomes the hidden pre-activation gradient in place
        dmix = dy @ p["b2"].T
        self._run(
            self.cmm.fff_soft_leaf_backward,
            saved["hpre"],
            saved["a"],
            dh,
            mix,
            saved["drop"],
            saved["has_drop"],
            ACTIVATIONS[act],
            dmix,
            n_threads,
        )
        g["w2"].reshape(n_leaves * leaf_w, -1)[...] += saved["mixed"].T @ dy
        g["b2"][...] += mix.T @ dy
        g["w1t"].reshape(n_leaves * leaf_w, -1)[...] += dh.T @ x
        g["b1"].reshape(-1)[...] += dh.sum(axis=0)
        dx = dh @ w1_flat if need_dx else None
        q = saved["q"]
        if q.shape[1] > 0:
            if balance and q.shape[0] > 0:
                dmix += _balance.soft_dmix(mix, balance)
            dz = self.xp.empty_like(q)
            self._run(
                self.cmm.fff_soft_router_backward,
                dmix,
                q,
                saved["reach"],
                saved["swap"],
                saved["has_swap"],
                entropy_weight,
                self.xp.empty_like(saved["reach"]),
                dz,
                n_threads,
            )
            g["node_w"][...] += dz.T @ x
            g["node_b"].reshape(-1)[...] += dz.sum(axis=0)
            if need_dx:
                dx += dz @ p["node_w"]
        return dx

    def fff_hard_forward(self, x, p, depth, act, n_threads, swap=None, drop=None):
        """Hardened training forward: x (B, in) -> y (B, out), saved ("path" (B, depth) visited
        nodes, "leaf" (B,), "entropy" (B,) summed over the visited nodes, ...)."""
        n_rows, leaf_w = x.shape[0], p["w1t"].shape[1]
        y = self.xp.empty((n_rows, p["w2"].shape[2]), dtype=x.dtype)
        saved = {
            "path": self.xp.empty((n_rows, depth), dtype=np.intp),
            "z_path": self.xp.empty((n_rows, depth), dtype=x.dtype),
            "leaf": self.xp.empty(n_rows, dtype=np.intp),
            "hpre": self.xp.empty((n_rows, leaf_w), dtype=x.dtype),
            "entropy": self.xp.empty(n_rows, dtype=x.dtype),
        }
        masks = self._masks(swap, drop, x.dtype)
        self._run(
            self.cmm.fff_hard_train_forward,
            x,
            *_fff_weights(p),
            depth,
            ACTIVATIONS[act],
            *masks.values(),
            y,
            *saved.values(),  # path, z_path, leaf, hpre, entropy: the kernel's outputs
            n_threads,
        )
        saved.update(masks)
        return y, saved

    def fff_hard_backward(
        self, x, dy, p, saved, act, entropy_weight, g, n_threads, balance=0.0, need_dx=True
    ):
        """Adds the hardened-path gradients into g; returns dx (B, in), or None without need_dx
        (the CPU kernel then skips the leaves' w1t reads for dx). entropy_weight scales each
        visited node's entropy gradient (hardening / (B * depth)); balance weighs the
        load-balancing term n_leaves * sum_l f_l * P_l (fastff._balance), whose gradient
        reaches the visited nodes only."""
        dx = self._dx_out(x, need_dx)
        n_rows, depth = saved["path"].shape
        balance_terms = None
        if balance and n_rows and depth:  # before the kernel adds anything: it may fail
            n_nodes, n_leaves = p["node_w"].shape[0], p["w1t"].shape[0]
            dz = _balance.hard_dz(saved, n_nodes, n_leaves, balance, self.xp)
            balance_terms = self._path_gradients(x, dz, saved["path"], p["node_w"], need_dx)
        self._run(
            self.cmm.fff_hard_train_backward,
            x,
            dy,
            p["node_w"],
            p["w1t"],
            p["w2"],
            saved["path"],
            saved["z_path"],
            saved["leaf"],
            saved["swap"],
            saved["has_swap"],
            saved["drop"],
            saved["has_drop"],
            saved["hpre"],
            ACTIVATIONS[act],
            entropy_weight,
            dx,
            g["node_w"],
            g["node_b"].reshape(-1),
            g["w1t"],
            g["b1"],
            g["w2"],
            g["b2"],
            n_threads,
        )
        if balance_terms is not None:
            self._add_path_gradients(balance_terms, g["node_w"], g["node_b"].reshape(-1), dx)
        return dx if need_dx else None

    def _csr_rows(self, values, columns, n_columns):
        """A CSR matrix (rows, n_columns) with values[r, k] at column columns[r, k] (each row's
        columns ascending, as a path's nodes are)."""
        import scipy.sparse

        n_rows, per_row = values.shape
        indptr = np.arange(0, n_rows * per_row + 1, per_row)
        return scipy.sparse.csr_matrix(
            (values.reshape(-1), columns.reshape(-1), indptr), shape=(n_rows, n_columns)
        )


def _fff_weights(p):
    """The router-leaf weights in the kernels' order (node_b flat)."""
    return p["node_w"], p["node_b"].reshape(-1), p["w1t"], p["b1"], p["w2"], p["b2"]


def to_host(a):
    """A NumPy view or copy of `a`: CuPy arrays are copied from the device, the rest is as
    np.asarray makes it."""
    if hasattr(a, "__cuda_array_interface__") and hasattr(a, "get"):
        return a.get()
    return np.asarray(a)


def get_array_module(a):
    """numpy for host arrays, cupy for CUDA arrays (without importing CuPy for host ones)."""
    if hasattr(a, "__cuda_array_interface__"):
        import cupy

        return cupy.get_array_module(a)
    return np
