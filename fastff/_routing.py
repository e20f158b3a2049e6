"""Routing diagnostics of the FFF layers (``layer.routing_stats(x)``).

Where hard inference sends the rows of a batch: per-leaf and per-node histograms, the fraction
of leaves (and, for the neuron tree, neurons) no row reaches, and the entropy of the leaf
histogram in bits (depth bits when the rows spread evenly, 0 when they all take one path).
The router-leaf FFF's own attributes ``node_usage`` / ``leaf_usage`` are the training usage
counters of the ``fastfeedforward`` package's API, so the method has another name.

Rows are walked in chunks with array-module code (NumPy or CuPy) or the inference kernels'
saved paths; the results come back as host NumPy arrays and Python floats.
"""

from __future__ import annotations

import numpy as np

from ._threads import effective_n_threads
from ._validation import as_rows
from .ops import to_host

_CHUNK_ROWS = 4096


def _entropy_bits(counts) -> float:
    """Entropy in bits of the distribution a histogram (host array) gives; 0.0 if empty."""
    total = counts.sum()
    if total == 0:
        return 0.0
    share = counts[counts > 0] / total
    return float(max(0.0, -(share * np.log2(share)).sum()))


def _dead_fraction(counts) -> float:
    return float((counts == 0).mean()) if counts.size else 0.0


def fff_routes(layer, rows):
    """(path (B, depth) visited routers, leaf (B,)) of a router-leaf FFF's hard inference:
    right at node n iff x @ node_weights[n] + node_biases[n] >= 0 (the kernels' rule; a logit
    within rounding of 0 may go either way, as the summation order differs)."""
    xp = layer.ops.xp
    node_w, node_b = layer._params["node_w"], layer._params["node_b"].reshape(-1)
    n_rows, dtype = rows.shape[0], layer.compute_dtype
    path = xp.empty((n_rows, layer.depth), dtype=np.intp)
    at = xp.zeros(n_rows, dtype=np.intp)
    for level in range(layer.depth):
        path[:, level] = at
        z = xp.einsum("ri,ri->r", rows, node_w[at].astype(dtype, copy=False))
        z += node_b[at].astype(dtype, copy=False)
        at = 2 * at + 1 + (z >= 0)
    return path, at - layer.n_nodes


def fff_stats(layer, x) -> dict:
    """FFF.routing_stats."""
    xp = layer.ops.xp
    rows, _ = as_rows(x, layer.input_width, layer.compute_dtype, xp)
    leaf_counts = xp.zeros(layer.n_leaves, dtype=np.int64)
    node_counts = xp.zeros(layer.n_nodes, dtype=np.int64)
    for start in range(0, rows.shape[0], _CHUNK_ROWS):
        path, leaf = fff_routes(layer, rows[start : start + _CHUNK_ROWS])
        leaf_counts += xp.bincount(leaf, minlength=layer.n_leaves)
        if layer.depth:
            node_counts += xp.bincount(path.reshape(-1), minlength=layer.n_nodes)
    leaves, nodes = to_host(leaf_counts), to_host(node_counts)
    n_rows = int(rows.shape[0])
    share = leaves / n_rows if n_rows else leaves.astype(np.float64)
    return {
        "rows": n_rows,
        "leaf_counts": leaves,
        "node_counts": nodes,
        "dead_leaf_fraction": _dead_fraction(leaves),
        "routing_entropy": _entropy_bits(leaves),
        "max_routing_entropy": float(layer.depth),
        "balance": float(layer.n_leaves * (share * share).sum()),
    }


def ultra_stats(layer, x) -> dict:
    """UltraFFF.routing_stats."""
    xp, depth, n_trees = layer.ops.xp, layer.depth, layer.parallel_size
    n_nodes = layer.n_nodes
    rows, _ = as_rows(x, layer.input_width, layer.compute_dtype, xp)
    node_counts = xp.zeros(n_trees * n_nodes, dtype=np.int64)
    first_leaf = 2**depth - 1  # heap index of the first bottom neuron: a row's last visit
    for start in range(0, rows.shape[0], _CHUNK_ROWS):
        chunk = rows[start : start + _CHUNK_ROWS]
        _, visited, _ = layer.ops.ultra_forward(
            chunk, layer._params, depth, n_trees, layer.activation, True, effective_n_threads()
        )
        node_counts += xp.bincount(visited.reshape(-1), minlength=n_trees * n_nodes)
    nodes = to_host(node_counts)
    leaves = nodes.reshape(n_trees, n_nodes)[:, first_leaf:]
    entropy = [_entropy_bits(tree) for tree in leaves]
    return {
        "rows": int(rows.shape[0]),
        "node_counts": nodes,
        "leaf_counts": np.ascontiguousarray(leaves),
        "dead_node_fraction": _dead_fraction(nodes),
        "dead_leaf_fraction": _dead_fraction(leaves),
        "routing_entropy": float(sum(entropy) / n_trees),
        "max_routing_entropy": float(depth),
    }
