"""JAX functions that run fastff's CPU kernels: ``ultra_fff`` and ``fff``.

``import fastff.jax`` needs JAX (the ``jax`` extra); ``import fastff`` never imports it.

- ``ultra_fff(params, x, *, depth, parallel_size=1, activation="gelu")``: the neuron-tree FFF
  (``fastff.UltraFFF``) of x (..., in) -> (..., out); params a dict with UltraFastBERT's keys
  ``linear_in.weight`` (T*n, in), ``linear_in.bias`` (T*n,), ``linear_out.weight`` (out, T*n),
  n = 2**(depth+1) - 1. Its gradient is the hard-path one of DESIGN.md section 1 (decisions are
  not differentiated), as ``UltraFFF.forward_train``'s backprop computes it.
- ``fff(params, x, *, depth, activation="relu", mode="hard", return_entropy=False)``: the
  router-leaf FFF (``fastff.FFF``); params with the ``fastfeedforward`` keys ``node_weights``,
  ``node_biases``, ``w1s``, ``b1s``, ``w2s``, ``b2s``. ``mode="hard"``: the value is
  ``FFF.__call__``'s hard inference, and the gradient is hardened training's (the reached
  leaf's parameters and x; the rounding passes none to the routers). ``mode="soft"``: the soft
  mixture of ``FFF.forward_train`` and its full gradient. ``return_entropy=True`` also returns
  the mean router decision entropy (``FFF.last_mean_entropy``; soft: every row and node, hard:
  the visited nodes), differentiable: add ``hardening * entropy`` to a loss to harden.

Both work under ``jax.jit``, ``jax.grad`` (reverse mode; a ``jax.custom_vjp``) and ``jax.vmap``,
in float32 and, with ``jax_enable_x64``, float64 (the parameters' dtype; x is cast to it).
Region leak and dropout are not offered here (they need random masks; use the layer).

How: each function is a ``jax.custom_vjp`` whose forward and backward call the kernels of
``fastff.cpu.ops.CPUOps`` through ``jax.pure_callback``. The callback copies nothing it need
not: JAX hands it NumPy views of its CPU buffers. The anchors' transposed layouts
(``linear_out.weight``, ``w1s``) are transposed into the kernels' layout by XLA on each call
(an O(parameters) copy; XLA's was faster than NumPy's here), and their gradients back.

Why pure_callback and not the XLA FFI: the FFI would need a C++ handler per
kernel, compiled against XLA's headers and registered per platform, for fastff's kernels that
already take NumPy arrays, and nothing to gain on the CPU but the callback's dispatch.
Measured on a 2-core VM (jax 0.10.2): a jitted identity pure_callback costs about 0.2 ms a call
(a plain jitted op 8 us); ultra_fff(32 -> 8, depth 4, 4 trees) on one row 0.6-0.8 ms under jit
against 10-20 us for ``UltraFFF.__call__``; at 768 -> 768, depth 11, the per-call transpose of
linear_out.weight (12 MB) adds about 7 ms (1 row: 7-11 ms against 0.04 ms; 1,024 rows: 24-26 ms
against 12-19 ms). So: fine inside a JAX training step or for batches, and for small-batch
inference of big trees the layer itself (``fastff.UltraFFF``) is the fast path. An FFI handler
would remove the 0.2 ms, not the transpose (the anchors' layout is not the kernels').

Callbacks run on JAX's CPU host: arrays on an accelerator are copied to the host and
back. The kernels' thread count is read in the callback, on a JAX runtime thread: the
process-wide ``fastff.set_num_threads``/threadpoolctl/OMP_NUM_THREADS apply, a
``with fastff.num_threads(n)`` scope of the caller does not.

Under ``vmap`` (``vmap_method="expand_dims"``) a batch over x only with the parameters shared
runs as one kernel call over every row; a batch over the parameters (and the parameter
gradients of ``vmap(grad(...))``, which are per element) loops over the batch in the callback.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from fastff._threads import effective_n_threads
from fastff._validation import check_choice, check_depth, check_int
from fastff.backends import get_ops
from fastff.ops import ACTIVATIONS

__all__ = ["ultra_fff", "fff", "ULTRA_KEYS", "FFF_KEYS"]

ULTRA_KEYS = ("linear_in.weight", "linear_in.bias", "linear_out.weight")
FFF_KEYS = ("node_weights", "node_biases", "w1s", "b1s", "w2s", "b2s")
FFF_MODES = ("hard", "soft")

_OPS = get_ops("cpu")

# jax >= 0.4.34 names the batching rule vmap_method; before, vectorized=True was the same rule.
if "vmap_method" in inspect.signature(jax.pure_callback).parameters:
    _VMAP: dict[str, Any] = {"vmap_method": "expand_dims"}
else:  # pragma: no cover (old jax)
    _VMAP = {"vectorized": True}


def _callback(host: Callable, shapes, *args):
    return jax.pure_callback(host, shapes, *args, **_VMAP)


def _sds(shape, dtype) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(shape), dtype)


# ---- vmap inside the callbacks -------------------------------------------------------------
# With expand_dims, every vmap level adds one leading axis to every argument: of its batch size
# where the argument is batched, else of size 1. The outputs must carry the full batch axes.


def _batch_shape(args, ranks) -> tuple[int, ...]:
    k = args[0].ndim - ranks[0]
    return tuple(np.broadcast_shapes(*(a.shape[:k] for a in args)))


def _unbatched(args, ranks) -> bool:
    return all(all(s == 1 for s in a.shape[: a.ndim - r]) for a, r in zip(args, ranks))


def _per_element(host: Callable, args, ranks):
    """host(*args) -> tuple of arrays, once per element of the vmap batch, stacked."""
    lead = _batch_shape(args, ranks)
    k = len(lead)
    if k == 0:
        return host(*args)
    results = []
    for idx in np.ndindex(*lead):
        sub = [a[tuple(i if s != 1 else 0 for i, s in zip(idx, a.shape[:k]))] for a in args]
        results.append(host(*sub))
    return tuple(
        np.stack([r[j] for r in results]).reshape(lead + results[0][j].shape)
        for j in range(len(results[0]))
    )


def _rows_then_batch(host: Callable, params, x, ranks):
    """host(*params, x_rows) where x_rows (B, in) -> outputs with B leading. Unbatched
    parameters: one call over every row of every batch element; else one call per element."""
    if _unbatched(params, ranks):
        k = params[0].ndim - ranks[0]
        squeezed = [p.reshape(p.shape[k:]) for p in params]
        lead = x.shape[:-2]
        outs = host(*squeezed, x.reshape(-1, x.shape[-1]))
        return tuple(o.reshape(lead + (x.shape[-2],) + o.shape[1:]) for o in outs)
    return _per_element(host, [*params, x], [*ranks, 2])


# ---- neuron-tree FFF -------------------------------------------------------------------------


def _ultra_p(w_in, b_in, w_out_t):  # the CPU kernels' parameter dict
    return {
        "w_in": np.ascontiguousarray(w_in),
        "b_in": np.ascontiguousarray(b_in),
        "w_out_t": np.ascontiguousarray(w_out_t),
    }


@functools.cache
def _ultra_op(depth: int, n_trees: int, act: str):
    path = n_trees * (depth + 1)
    ranks = (2, 1, 2)

    # The op takes linear_out.weight transposed, (T*n, out), the kernels' layout: the wrapper
    # transposes in XLA (faster than NumPy's transposing copy).
    def infer_host(w_in, b_in, w_out_t, x):
        x = np.ascontiguousarray(x)
        y, _, _ = _OPS.ultra_forward(
            x, _ultra_p(w_in, b_in, w_out_t), depth, n_trees, act, False, effective_n_threads()
        )
        return (y,)

    def train_host(w_in, b_in, w_out_t, x):
        x = np.ascontiguousarray(x)
        y, visited, preact = _OPS.ultra_forward(
            x, _ultra_p(w_in, b_in, w_out_t), depth, n_trees, act, True, effective_n_threads()
        )
        return y, visited.astype(np.int32), preact

    def backward_host(w_in, b_in, w_out_t, x, dy, visited, preact):
        p = _ultra_p(w_in, b_in, w_out_t)
        g = {k: np.zeros_like(v) for k, v in p.items()}
        dx = _OPS.ultra_backward(
            np.ascontiguousarray(x),
            np.ascontiguousarray(dy),
            p,
            g,
            np.ascontiguousarray(visited, dtype=np.intp),
            np.ascontiguousarray(preact),
            act,
            effective_n_threads(),
        )
        return g["w_in"], g["b_in"], g["w_out_t"], dx

    def shapes(w_in, w_out_t, x, train):
        n_rows, dtype = x.shape[0], x.dtype
        y = _sds((n_rows, w_out_t.shape[1]), dtype)
        if train:
            return (y, _sds((n_rows, path), np.int32), _sds((n_rows, path), dtype))
        return (y,)

    @jax.custom_vjp
    def op(w_in, b_in, w_out_t, x):
        (y,) = _callback(
            lambda *a: _rows_then_batch(infer_host, a[:3], a[3], ranks),
            shapes(w_in, w_out_t, x, False),
            w_in,
            b_in,
            w_out_t,
            x,
        )
        return y

    def op_fwd(w_in, b_in, w_out_t, x):
        y, visited, preact = _callback(
            lambda *a: _rows_then_batch(train_host, a[:3], a[3], ranks),
            shapes(w_in, w_out_t, x, True),
            w_in,
            b_in,
            w_out_t,
            x,
        )
        return y, (w_in, b_in, w_out_t, x, visited, preact)

    def op_bwd(res, dy):
        w_in, b_in, w_out_t, x, visited, preact = res
        out = tuple(_sds(a.shape, a.dtype) for a in (w_in, b_in, w_out_t, x))
        return _callback(
            lambda *a: _per_element(backward_host, a, (*ranks, 2, 2, 2, 2)),
            out,
            w_in,
            b_in,
            w_out_t,
            x,
            dy,
            visited,
            preact,
        )

    op.defvjp(op_fwd, op_bwd)
    return op


def _float_dtype(arrays, what: str):
    dtype = jnp.result_type(*arrays)
    if dtype not in (jnp.float32, jnp.float64):
        raise TypeError(
            f"{what} parameters must be float32 or float64 (float64 needs jax_enable_x64), "
            f"got {dtype}"
        )
    return dtype


def _check_shape(name: str, a, shape) -> None:
    if tuple(a.shape) != tuple(shape):
        raise ValueError(f"params[{name!r}] must have shape {tuple(shape)}, got {tuple(a.shape)}")


def _rows_of(x, width: int):
    """x (..., width), real numbers, as a JAX array; width is the parameters' input width."""
    x = jnp.asarray(x)
    if x.dtype.kind not in "fiu":
        raise TypeError(f"x must hold real numbers, got dtype {x.dtype}")
    if x.ndim < 1 or x.shape[-1] != width:
        raise ValueError(f"x must have shape (..., {width}), got {tuple(x.shape)}")
    return x


def _input_width(name: str, a) -> int:
    if a.ndim != 2:
        raise ValueError(f"params[{name!r}] must be 2-d (rows, input_width), got {tuple(a.shape)}")
    return a.shape[1]


def _get(params, keys, what):
    missing = [k for k in keys if k not in params]
    if missing:
        raise KeyError(f"{what} params lack {missing}; expected the keys {list(keys)}")
    return [jnp.asarray(params[k]) for k in keys]


def ultra_fff(params, x, *, depth, parallel_size=1, activation="gelu"):
    """Neuron-tree FFF (``fastff.UltraFFF``) of x (..., in) -> (..., out) on fastff's kernels.

    params: {"linear_in.weight": (T*n, in), "linear_in.bias": (T*n,), "linear_out.weight":
    (out, T*n)} with n = 2**(depth+1) - 1 and T = parallel_size, float32 or float64. The
    gradient (``jax.grad``, ``jax.vjp``) is the hard-path one: routing decisions are not
    differentiated. Works under ``jit`` and ``vmap``; depth, parallel_size and activation are
    static.
    """
    depth = check_depth(depth, "ultra_fff")
    n_trees = check_int(parallel_size, "parallel_size", 1)
    act = check_choice(activation, "activation", ACTIVATIONS)
    w_in, b_in, w_out = _get(params, ULTRA_KEYS, "ultra_fff")
    dtype = _float_dtype([w_in, b_in, w_out], "ultra_fff")
    total = n_trees * (2 ** (depth + 1) - 1)
    width = _input_width("linear_in.weight", w_in)
    _check_shape("linear_in.weight", w_in, (total, width))
    x = _rows_of(x, width)
    _check_shape("linear_in.bias", b_in, (total,))
    if w_out.ndim != 2 or w_out.shape[1] != total:
        raise ValueError(
            f"params['linear_out.weight'] must have shape (out, {total}), got {w_out.shape}"
        )
    lead = x.shape[:-1]
    rows = x.astype(dtype).reshape(-1, width)
    y = _ultra_op(depth, n_trees, act)(
        w_in.astype(dtype), b_in.astype(dtype), w_out.astype(dtype).T, rows
    )
    return y.reshape(lead + (w_out.shape[0],))


# ---- router-leaf FFF -------------------------------------------------------------------------


def _fff_p(nw, nb, w1t, b1s, w2s, b2s):
    return {
        "node_w": np.ascontiguousarray(nw),
        "node_b": np.ascontiguousarray(nb),
        "w1t": np.ascontiguousarray(w1t),
        "b1": np.ascontiguousarray(b1s),
        "w2": np.ascontiguousarray(w2s),
        "b2": np.ascontiguousarray(b2s),
    }


@functools.cache
def _fff_op(depth: int, act: str, mode: str, with_entropy: bool):
    """custom_vjp op (node_w, node_b, w1t, b1s, w2s, b2s, x (B, in)) -> (y (B, out), entropy
    (B,) summed per row over its counted decisions); w1t is w1s transposed (n_leaves, leaf, in),
    the kernels' layout, transposed by the wrapper in XLA."""
    ranks = (2, 2, 3, 2, 3, 2)
    soft = mode == "soft"

    def train_forward(p, x, n_threads):
        if soft:
            return _OPS.fff_soft_forward(x, p, act, n_threads)
        return _OPS.fff_hard_forward(x, p, depth, act, n_threads)

    def forward_host(*a):
        *params, x = a
        p, x = _fff_p(*params), np.ascontiguousarray(x)
        n_threads = effective_n_threads()
        if not soft and not with_entropy:  # FFF.__call__'s hard inference (right iff z >= 0)
            y = _OPS.fff_infer(x, p, depth, act, n_threads)
            return y, np.zeros(x.shape[0], dtype=x.dtype)
        y, saved = train_forward(p, x, n_threads)
        return y, saved["entropy"]

    def train_host(*a):  # under grad, the forward whose gradient the backward computes
        *params, x = a
        p, x = _fff_p(*params), np.ascontiguousarray(x)
        y, saved = train_forward(p, x, effective_n_threads())
        return y, saved["entropy"]

    def backward_host(*a):
        *params, x, dy, dent = a
        p, x = _fff_p(*params), np.ascontiguousarray(x)
        n_threads = effective_n_threads()
        _, saved = train_forward(p, x, n_threads)  # recomputed: cheaper than keeping it in JAX
        g = {k: np.zeros_like(v) for k, v in p.items()}
        # every row's entropy enters the loss through one mean: one weight for all rows
        weight = float(dent.mean()) if dent.size else 0.0
        backward = _OPS.fff_soft_backward if soft else _OPS.fff_hard_backward
        dx = backward(x, np.ascontiguousarray(dy), p, saved, act, weight, g, n_threads)
        return (
            g["node_w"],
            g["node_b"],
            g["w1t"],
            g["b1"],
            g["w2"],
            g["b2"],
            dx,
        )

    def shapes(w2s, x):
        return (_sds((x.shape[0], w2s.shape[2]), x.dtype), _sds((x.shape[0],), x.dtype))

    @jax.custom_vjp
    def op(nw, nb, w1s, b1s, w2s, b2s, x):
        return _callback(
            lambda *a: _rows_then_batch(forward_host, a[:6], a[6], ranks),
            shapes(w2s, x),
            nw,
            nb,
            w1s,
            b1s,
            w2s,
            b2s,
            x,
        )

    def op_fwd(*args):
        out = _callback(
            lambda *a: _rows_then_batch(train_host, a[:6], a[6], ranks),
            shapes(args[4], args[6]),
            *args,
        )
        return tuple(out), args

    def op_bwd(res, cts):
        dy, dent = cts
        out = tuple(_sds(a.shape, a.dtype) for a in res)
        return _callback(
            lambda *a: _per_element(backward_host, a, (*ranks, 2, 2, 1)), out, *res, dy, dent
        )

    op.defvjp(op_fwd, op_bwd)
    return op


def fff(params, x, *, depth, activation="relu", mode="hard", return_entropy=False):
    """Router-leaf FFF (``fastff.FFF``) of x (..., in) -> (..., out) on fastff's kernels.

    params: the ``fastfeedforward`` package's keys and shapes, ``node_weights`` (n_nodes, in),
    ``node_biases`` (n_nodes, 1), ``w1s`` (n_leaves, in, leaf), ``b1s`` (n_leaves, leaf),
    ``w2s`` (n_leaves, leaf, out), ``b2s`` (n_leaves, out); n_nodes = 2**depth - 1.

    mode "hard": the value is ``FFF.__call__``'s (right iff the logit is >= 0, only the reached
    leaf); the gradient is hardened training's (``FFF(train_hardened=True)``): the reached leaf
    and x, nothing to the routers through the rounding. Under ``grad`` the forward is hardened
    training's, which goes left at a logit of exactly 0, so the two differ only at such ties.
    mode "soft": ``FFF.forward_train``'s soft mixture of every leaf, and its full gradient.

    return_entropy: return (y, mean_entropy), the mean Bernoulli entropy of the decisions as
    ``FFF.last_mean_entropy`` (soft: every row and node; hard: the nodes each row visits),
    with its gradient; ``loss + hardening * mean_entropy`` is the package's hardening loss.
    """
    depth = check_depth(depth, "fff")
    act = check_choice(activation, "activation", ACTIVATIONS)
    mode = check_choice(mode, "mode", FFF_MODES)
    arrays = _get(params, FFF_KEYS, "fff")
    dtype = _float_dtype(arrays, "fff")
    nw, nb, w1s, b1s, w2s, b2s = (a.astype(dtype) for a in arrays)
    width = _input_width("node_weights", nw)
    n_nodes, n_leaves = 2**depth - 1, 2**depth
    if w1s.ndim != 3 or w2s.ndim != 3:
        raise ValueError("params['w1s'] and params['w2s'] must be 3-d (n_leaves, ., .)")
    leaf, out = w1s.shape[2], w2s.shape[2]
    _check_shape("node_weights", nw, (n_nodes, width))
    _check_shape("node_biases", nb, (n_nodes, 1))
    _check_shape("w1s", w1s, (n_leaves, width, leaf))
    _check_shape("b1s", b1s, (n_leaves, leaf))
    _check_shape("w2s", w2s, (n_leaves, leaf, out))
    _check_shape("b2s", b2s, (n_leaves, out))
    x = _rows_of(x, width)
    lead = x.shape[:-1]
    rows = x.astype(dtype).reshape(-1, width)
    w1t = w1s.transpose(0, 2, 1)
    y, entropy = _fff_op(depth, act, mode, bool(return_entropy))(nw, nb, w1t, b1s, w2s, b2s, rows)
    y = y.reshape(lead + (out,))
    if not return_entropy:
        return y
    n_decisions = rows.shape[0] * (n_nodes if mode == "soft" else depth)
    mean_entropy = entropy.sum() / n_decisions if n_decisions else jnp.zeros((), dtype)
    return y, mean_entropy
