"""ShardedUltraFFF: a neuron-tree FFF whose subtrees live on different MPI ranks."""

from __future__ import annotations

import numpy as np

from .._threads import effective_n_threads
from .._validation import (
    as_rows,
    check_bool,
    check_choice,
    check_depth,
    check_fits_in_memory,
    check_int,
    check_width,
)
from ..backends import get_ops
from ..layers import UltraFFF, _node_records
from ..module import run_once
from ..ops import ACTIVATIONS
from ._base import _Sharded, check_shard_dtype
from ._common import (
    InitStream,
    allreduce_sum,
    blocks,
    choose_top_levels,
    exchange,
    fingerprint,
    send_order,
    sources,
    subtree_rows,
)

_OUT_CHUNK = 64  # linear_out.weight rows drawn together when a shard initialises itself
_COL_CHUNK = 1 << 16  # ... and at most this many of their columns at a time


class ShardedUltraFFF(_Sharded):
    """An UltraFFF split over the ranks of an MPI communicator (tree / expert parallelism).

    Every rank holds the top ``top_levels`` levels of each tree (``2**top_levels - 1`` neurons
    per tree) and a contiguous run of the ``parallel_size * 2**top_levels`` subtrees below
    them (see ``subtrees``). ``layer(x)``, ``forward_train`` and ``backprop`` are collective:
    every rank calls them, each with its own rows (any number, zero included), and gets the
    outputs of its own rows, in their order, bitwise those of the whole UltraFFF.

    A call: each rank walks its rows through the top levels to find their subtree in every
    tree (routing), sends each row to the rank owning its tree-0 subtree (``Alltoallv``),
    which walks that tree's path from the root (the top levels again, then the subtree, with
    fastff's CPU kernels, adding into the row's output in path order) and passes the row and
    its partial output on to the owner of its tree-1 subtree, and so on; the last owner sends
    the output back. With ``parallel_size`` T that is T + 1 exchanges (2 for one tree).
    ``backprop(dy)`` sends dy to the T owners of each row's paths (one exchange) and brings
    dx back (another); each rank adds the gradients of its own subtrees into ``grads`` and
    those of the top levels into a buffer summed over the ranks (one ``Allreduce``), so the
    top levels get the whole batch's gradient on every rank and an optimizer on each rank
    keeps them identical. The gradients are those of the sum over ranks of sum(y * dy): with
    a loss averaged over the global batch, pass dy divided by the global row count.

    Build it from its config (``ShardedUltraFFF(in, out, depth, ..., seed=s, comm=comm)``:
    each rank draws only its own weights, exactly those ``UltraFFF(in, out, depth, ...,
    seed=s)`` would hold there, so the whole layer never exists) or from a whole layer
    (``fastff.distributed.shard``). Its state dict holds this rank's part:
    ``top.linear_in.weight`` (T * (2**k - 1), in) ... for the top levels, tree by tree in heap
    order, and ``subtrees.linear_in.weight`` (m * (2**(depth - k + 1) - 1), in),
    ``subtrees.linear_in.bias``, ``subtrees.linear_out.weight`` (out, ...) for its m subtrees,
    each in its own heap order.
    """

    KIND = "UltraFFF"

    def __init__(
        self,
        input_width,
        output_width,
        depth,
        parallel_size=1,
        activation="gelu",
        *,
        dtype=np.float32,
        seed=None,
        comm=None,
        top_levels=None,
    ):
        raw = {
            "input_width": input_width,
            "output_width": output_width,
            "depth": depth,
            "parallel_size": parallel_size,
            "activation": activation,
            "dtype": dtype,
        }
        self._build(comm, raw, seed, top_levels)

    @classmethod
    def _normalize(cls, config: dict) -> dict:
        known = {"input_width", "output_width", "depth", "parallel_size", "activation", "dtype"}
        if set(config) - known or not {"input_width", "output_width", "depth"} <= set(config):
            raise ValueError(f"an UltraFFF config holds {sorted(known)}, got {sorted(config)}")
        out = {
            "input_width": check_width(config["input_width"], "input_width"),
            "output_width": check_width(config["output_width"], "output_width"),
            "depth": check_depth(config["depth"], "UltraFFF"),
            "parallel_size": check_int(config.get("parallel_size", 1), "parallel_size", 1),
            "activation": check_choice(config.get("activation", "gelu"), "activation", ACTIVATIONS),
            "dtype": check_shard_dtype(config.get("dtype", np.float32)).name,
        }
        return out

    @staticmethod
    def _tree_shape(config: dict) -> tuple[int, int]:
        return config["parallel_size"], config["depth"]

    def _allocate(self) -> None:
        c, k = self._layer_config, self._top_levels
        in_w, out_w, depth = c["input_width"], c["output_width"], c["depth"]
        self._n_top = (1 << k) - 1  # top neurons per tree
        self._n_sub = (1 << (depth - k + 1)) - 1  # neurons per subtree
        n_top = c["parallel_size"] * self._n_top
        n_local = self._plan.n_local * self._n_sub
        check_fits_in_memory(
            (n_top + n_local) * (in_w + 1 + out_w) * self.dtype.itemsize,
            f"rank {self.rank}'s shard of UltraFFF(depth={depth}, {in_w}->{out_w})",
        )
        top_w_in, top_w_out_t = _node_records(n_top, in_w, out_w, self.dtype)
        w_in, w_out_t = _node_records(n_local, in_w, out_w, self.dtype)
        self._params = {
            "top_w_in": top_w_in,
            "top_b_in": np.empty(n_top, dtype=self.dtype),
            "top_w_out_t": top_w_out_t,
            "w_in": w_in,
            "b_in": np.empty(n_local, dtype=self.dtype),
            "w_out_t": w_out_t,
        }
        self._anchor = {
            "top.linear_in.weight": ("top_w_in", None),
            "top.linear_in.bias": ("top_b_in", None),
            "top.linear_out.weight": ("top_w_out_t", (1, 0)),
            "subtrees.linear_in.weight": ("w_in", None),
            "subtrees.linear_in.bias": ("b_in", None),
            "subtrees.linear_out.weight": ("w_out_t", (1, 0)),
        }

    # ---- the layer's attributes -------------------------------------------------------------
    @property
    def parallel_size(self) -> int:
        return self._layer_config["parallel_size"]

    @property
    def activation(self) -> str:
        return self._layer_config["activation"]

    @activation.setter
    def activation(self, value) -> None:
        self._layer_config["activation"] = check_choice(value, "activation", ACTIVATIONS)

    # ---- where a rank's rows come from in the whole layer -----------------------------------
    def _tree_nodes(self) -> int:
        return (1 << (self.depth + 1)) - 1

    def _blocks(self, plan=None):
        plan = self._plan if plan is None else plan
        return blocks(self._tree_nodes(), self._top_levels, self.depth - self._top_levels + 1, plan)

    def node_ids(self, rank: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(top, subtrees): the whole layer's neuron index (``t * n_nodes + heap index``) of each
        row of the shard's top and subtree arrays (this rank's, or those of rank `rank`)."""
        plan = self._plan if rank is None else self._plan.of(rank)
        n = self._tree_nodes()
        top = (np.arange(self.parallel_size)[:, None] * n + np.arange(self._n_top)).reshape(-1)
        sub = np.empty(plan.n_local * self._n_sub, dtype=np.int64)
        for g0, local0, count, level in self._blocks(plan):
            ids = g0 + np.arange(count << level).reshape(count, 1 << level)
            subtree_rows(sub, self._n_sub, local0, count, level)[...] = ids
        return top.astype(np.int64), sub

    def _copy_from(self, layer: UltraFFF) -> None:
        """Take this rank's rows of a whole layer's parameters."""
        src, p, n = layer._params, self._params, self._tree_nodes()
        for t in range(self.parallel_size):
            rows = slice(t * n, t * n + self._n_top)
            mine = slice(t * self._n_top, (t + 1) * self._n_top)
            for key in ("w_in", "b_in", "w_out_t"):
                p["top_" + key][mine] = src[key][rows]
        for g0, local0, count, level in self._blocks():
            rows = slice(g0, g0 + (count << level))
            for key in ("w_in", "b_in", "w_out_t"):
                block = src[key][rows].reshape((count, 1 << level) + src[key].shape[1:])
                subtree_rows(p[key], self._n_sub, local0, count, level)[...] = block

    def _draw(self, seed) -> None:
        """This rank's weights, drawn from UltraFFF's initialisation stream at their positions
        (UltraFFF fills linear_in.weight, linear_in.bias, then linear_out.weight, each in C
        order), so they equal UltraFFF(..., seed=seed)'s bitwise."""
        stream = InitStream(seed, self.dtype)
        in_w, out_w, p = self.input_width, self.output_width, self._params
        n, n_trees = self._tree_nodes(), self.parallel_size
        total = n_trees * n
        k_in = (1.0 / in_w) ** 0.5
        k_out = (1.0 / ((self.depth + 1) * n_trees)) ** 0.5
        bias_at, out_at = total * in_w, total * in_w + total

        def fill(prefix: str, g0: int, local: np.ndarray) -> None:
            """Global rows g0 .. g0 + len(local) of the whole layer into rows `local` of the
            arrays prefix + w_in, b_in, w_out_t, at most _COL_CHUNK rows at a time (one draw
            of linear_out.weight's row o covers them all)."""
            w_in, b_in, w_out_t = (p[prefix + key] for key in ("w_in", "b_in", "w_out_t"))
            for c0 in range(0, len(local), _COL_CHUNK):
                c1 = min(len(local), c0 + _COL_CHUNK)
                n_rows = c1 - c0
                rows: np.ndarray | slice = local[c0:c1]
                if local[c1 - 1] - local[c0] == n_rows - 1:  # one run: a view, not a scatter
                    rows = slice(int(local[c0]), int(local[c0]) + n_rows)
                step = max(1, (1 << 22) // in_w)
                for r0 in range(0, n_rows, step):
                    r1 = min(n_rows, r0 + step)
                    values = stream.uniform((g0 + c0 + r0) * in_w, (r1 - r0) * in_w, k_in)
                    if isinstance(rows, slice):
                        w_in[rows.start + r0 : rows.start + r1] = values.reshape(r1 - r0, in_w)
                    else:
                        w_in[rows[r0:r1]] = values.reshape(r1 - r0, in_w)
                b_in[rows] = stream.uniform(bias_at + g0 + c0, n_rows, k_in)
                for o0 in range(0, out_w, _OUT_CHUNK):
                    o1 = min(out_w, o0 + _OUT_CHUNK)
                    block = np.empty((o1 - o0, n_rows), dtype=self.dtype)
                    for o in range(o0, o1):
                        block[o - o0] = stream.uniform(out_at + o * total + g0 + c0, n_rows, k_out)
                    w_out_t[rows, o0:o1] = block.T

        for t in range(n_trees):
            fill("top_", t * n, t * self._n_top + np.arange(self._n_top))
        for g0, local0, count, level in self._blocks():
            width = 1 << level  # subtree c's nodes at this level: local rows from `first`
            first = (local0 + np.arange(count)) * self._n_sub + width - 1
            fill("", g0, (first[:, None] + np.arange(width)).reshape(-1))

    # ---- kernels' views ----------------------------------------------------------------------
    def _top(self, t: int) -> dict:
        rows = slice(t * self._n_top, (t + 1) * self._n_top)
        p = self._params
        return {
            "w_in": p["top_w_in"][rows],
            "b_in": p["top_b_in"][rows],
            "w_out_t": p["top_w_out_t"][rows],
        }

    def _top_all(self) -> dict:
        p = self._params
        return {"w_in": p["top_w_in"], "b_in": p["top_b_in"], "w_out_t": p["top_w_out_t"]}

    def _sub(self, local: int) -> dict:
        rows = slice(local * self._n_sub, (local + 1) * self._n_sub)
        p = self._params
        return {"w_in": p["w_in"][rows], "b_in": p["b_in"][rows], "w_out_t": p["w_out_t"][rows]}

    # ---- forward ---------------------------------------------------------------------------
    def _routes(self, rows, act, n_threads) -> np.ndarray:
        """(B, T): each row's subtree in every tree (global ids), from walks of the top levels."""
        ops, k, n_trees = get_ops("cpu"), self._top_levels, self.parallel_size
        routes = np.empty((rows.shape[0], n_trees), dtype=np.int64)
        for t in range(n_trees):
            if k == 0 or rows.shape[0] == 0:
                routes[:, t] = t << k
                continue
            _, visited, preact = ops.ultra_forward(
                rows, self._top(t), k - 1, 1, act, True, n_threads
            )
            child = 2 * visited[:, -1] + 1 + (preact[:, -1] > 0)
            routes[:, t] = (t << k) + child - self._n_top
        return routes

    def _forward(self, x, train: bool, input_grad=True):
        dtype, plan = self.dtype, self._plan
        in_w, out_w, n_trees = self.input_width, self.output_width, self.parallel_size
        error: BaseException | None = None
        rows = lead = None
        wants_dx = None  # in the call's tag: every rank must agree (the dx exchange is skipped)
        try:
            wants_dx = check_bool(input_grad, "input_grad")
            rows, lead = as_rows(x, in_w, dtype, np)
            per_row = (2 * in_w + 3 * out_w) * dtype.itemsize
            if train:  # each rank keeps its units' inputs and paths
                per_row += n_trees * (in_w + (self.depth + 1) * 2) * 8
            check_fits_in_memory(
                rows.shape[0] * per_row,
                lambda: (
                    f"{'forward_train' if train else 'inference'} of {self!r} on "
                    f"{rows.shape[0]} rows"
                ),
            )
        except (TypeError, ValueError, MemoryError) as exc:
            error = exc
        act = self.activation
        self._begin("forward_train" if train else "call", error, None, act, wants_dx)
        assert rows is not None and lead is not None
        comm, n_threads = self._comm, effective_n_threads()
        n_rows = rows.shape[0]
        routes = self._routes(rows, act, n_threads)
        # Hop t takes every row to the owner of its tree-t subtree, sorted by subtree within
        # each destination, so that each source's rows arrive in runs of one subtree. Rows
        # carry their subtree in every tree, and past one tree where they come from.
        if n_trees == 1:
            meta = routes
        else:
            meta = np.concatenate(
                [np.full((n_rows, 1), plan.rank), np.arange(n_rows)[:, None], routes], axis=1
            )
        column = 0 if n_trees == 1 else 2
        dest = plan.owner(routes[:, 0])
        first_order, counts, (xs, meta) = exchange(
            comm, dest, [rows, meta], send_order(dest, routes[:, 0]), self.traffic
        )
        ys = None
        units = []
        for t in range(n_trees):
            ys, paths = self._walk(xs, ys, t, meta[:, column + t], act, train, n_threads)
            if train:
                units.append((t, xs, meta, counts, paths))
            if t + 1 < n_trees:
                nxt = meta[:, column + t + 1]
                dest = plan.owner(nxt)
                _, counts, (xs, ys, meta) = exchange(
                    comm, dest, [xs, ys, meta], send_order(dest, nxt), self.traffic
                )
        assert ys is not None
        y = np.empty((n_rows, out_w), dtype=dtype)
        if n_trees == 1:  # back to the sources in the order they came: none to sort
            _, _, (back,) = exchange(comm, sources(counts), [ys], None, self.traffic)
            y[first_order if first_order is not None else slice(None)] = back
        else:
            _, _, (back, index) = exchange(comm, meta[:, 0], [ys, meta[:, 1]], None, self.traffic)
            y[index] = back
        saved = None
        if train:
            saved = self._units(units, routes, first_order)
            saved["need_dx"] = wants_dx  # agreed by every rank (the call's tag)
        return rows, lead, y, saved

    def _walk(self, xs, ys, t, subtree, act, train, n_threads):
        """Rows xs (arrived in runs of one subtree of tree t, `subtree` giving each row's) walk
        tree t from its root: the top levels, then their subtree, adding into ys (None: from
        zero). Returns ys and, when training, the paths: top neuron ids (into the top arrays)
        and pre-activations, subtree neuron ids (into the subtree arrays) and
        pre-activations."""
        ops, k, depth, n = get_ops("cpu"), self._top_levels, self.depth, xs.shape[0]
        kept = n if train else 0
        top_v = np.empty((kept, k), dtype=np.intp)
        top_z = np.empty((kept, k), dtype=self.dtype)
        sub_v = np.empty((kept, depth - k + 1), dtype=np.intp)
        sub_z = np.empty((kept, depth - k + 1), dtype=self.dtype)
        if k and n:
            ys, v, z = ops.ultra_forward(xs, self._top(t), k - 1, 1, act, train, n_threads, y=ys)
            if train:
                top_v[...] = v + t * self._n_top
                top_z[...] = z
        if ys is None:
            ys = np.zeros((n, self.output_width), dtype=self.dtype)
        local = subtree - self._plan.first
        starts = np.flatnonzero(np.diff(local, prepend=-1, append=-1))
        for a, b in zip(starts[:-1], starts[1:]):
            sub = int(local[a])
            _, v, z = ops.ultra_forward(
                xs[a:b], self._sub(sub), depth - k, 1, act, train, n_threads, y=ys[a:b]
            )
            if train:
                sub_v[a:b] = v + sub * self._n_sub
                sub_z[a:b] = z
        return ys, (top_v, top_z, sub_v, sub_z)

    def _units(self, units, routes, first_order) -> dict:
        """What backprop needs: this rank's units (a row's path in one tree), in the order in
        which their dy will arrive: by origin rank, then tree, subtree and row (one tree: the
        order they arrived in)."""
        plan, n_trees = self._plan, self.parallel_size
        holders = plan.owner(routes)
        if n_trees == 1:
            _, xs, _, counts, paths = units[0]
            return {
                "x": xs,
                "back": sources(counts),
                "dy": (holders[:, 0], first_order, None),
                "paths": paths,
            }
        x = np.concatenate([u[1] for u in units])
        meta = np.concatenate([u[2] for u in units])
        tree = np.concatenate([np.full(len(u[1]), u[0], dtype=np.int64) for u in units])
        subtree = meta[np.arange(len(meta)), 2 + tree]
        order = np.lexsort((meta[:, 1], subtree, tree, meta[:, 0]))
        paths = tuple(np.concatenate([u[4][i] for u in units])[order] for i in range(4))
        # the origin sends dy for (row, tree) to holders[row, tree], by destination, tree,
        # subtree and row: the order above
        n_rows = routes.shape[0]
        flat_tree = np.tile(np.arange(n_trees), n_rows)
        flat_holder = holders.reshape(-1)
        dy_order = np.lexsort(
            (np.repeat(np.arange(n_rows), n_trees), routes.reshape(-1), flat_tree, flat_holder)
        )
        return {
            "x": x[order],
            "back": meta[order, 0].astype(np.intp),
            "dy": (flat_holder, dy_order, n_trees),
            "paths": paths,
        }

    def __call__(self, x):
        """Hard inference of this rank's rows, x (..., input_width) -> (..., output_width);
        collective: every rank calls it."""
        _, lead, y, _ = self._forward(x, train=False)
        return y.reshape(lead + (self.output_width,))

    def forward_train(self, x, *, input_grad=True):
        """Training forward of this rank's rows: (y, backprop); collective, as backprop.
        Without input_grad (the same on every rank) backprop returns None and neither forms
        nor sends back dx."""
        _, lead, y, saved = self._forward(x, train=True, input_grad=input_grad)
        version, act, call = self._version, self.activation, self._calls
        in_w, out_w = self.input_width, self.output_width

        @run_once
        def backprop(dy):
            """dy (..., output_width) -> dx (..., input_width); adds into grads. Collective."""
            dy_rows = self._backprop_rows(dy, version, call, lead)
            dx = self._backward(dy_rows, saved, act)
            return None if dx is None else dx.reshape(lead + (in_w,))

        return y.reshape(lead + (out_w,)), backprop

    def _backward(self, dy, saved, act):
        ops, comm, dtype = get_ops("cpu"), self._comm, self.dtype
        need_dx = saved["need_dx"]
        in_w, n_trees = self.input_width, self.parallel_size
        n_threads = effective_n_threads()
        n_rows = dy.shape[0]
        # dy to the owner of each (row, tree), in the order its units are stored
        dest, order, repeat = saved["dy"]
        send = dy if repeat is None else np.repeat(dy, repeat, axis=0)
        _, _, (dys,) = exchange(comm, dest, [send], order, self.traffic)
        xs = saved["x"]
        top_v, top_z, sub_v, sub_z = saved["paths"]
        grads = self._allocate_grads()
        top_g = {
            "w_in": np.zeros_like(grads["top_w_in"]),
            "b_in": np.zeros_like(grads["top_b_in"]),
            "w_out_t": np.zeros_like(grads["top_w_out_t"]),
        }
        dxs = np.zeros((xs.shape[0], in_w), dtype=dtype) if need_dx else None
        if xs.shape[0]:
            sub_g = {"w_in": grads["w_in"], "b_in": grads["b_in"], "w_out_t": grads["w_out_t"]}
            p = self._params
            sub_p = {"w_in": p["w_in"], "b_in": p["b_in"], "w_out_t": p["w_out_t"]}
            dxs = ops.ultra_backward(xs, dys, sub_p, sub_g, sub_v, sub_z, act, n_threads, need_dx)
            if self._top_levels:
                dx_top = ops.ultra_backward(
                    xs, dys, self._top_all(), top_g, top_v, top_z, act, n_threads, need_dx
                )
                if need_dx:
                    dxs += dx_top
        dx = None
        if need_dx:  # the same on every rank: all exchange or none
            _, _, (parts,) = exchange(comm, saved["back"], [dxs], None, self.traffic)
            # the partial dx come back in the order the dy went out
            if repeat is None:
                dx = np.empty((n_rows, in_w), dtype=dtype)
                dx[order if order is not None else slice(None)] = parts
            else:
                flat = np.empty((n_rows * n_trees, in_w), dtype=dtype)
                flat[order] = parts
                flat = flat.reshape(n_rows, n_trees, in_w)
                dx = flat[:, 0].copy()
                for t in range(1, n_trees):
                    dx += flat[:, t]
        allreduce_sum(comm, list(top_g.values()), self.traffic)
        for key in ("w_in", "b_in", "w_out_t"):
            grads["top_" + key] += top_g[key]
        return dx


def shard_ultra(layer: UltraFFF, comm, top_levels) -> ShardedUltraFFF:
    """fastff.distributed.shard for an UltraFFF (see there)."""
    error: BaseException | None = None
    described = None
    try:
        config = ShardedUltraFFF._normalize(layer.get_config())
        top_levels = choose_top_levels(
            top_levels, layer.parallel_size, layer.depth, comm.Get_size(), "UltraFFF"
        )
        described = {"config": config, "top_levels": top_levels, "weights": _sample(layer)}
    except (TypeError, ValueError, MemoryError) as exc:
        error = exc
    return ShardedUltraFFF._adopt(comm, layer, config, top_levels, error, described)


def _sample(layer: UltraFFF) -> str:
    """A fingerprint of a few rows of every level (the whole top would do for the replicated
    part, but a layer built with seed=None on each rank differs everywhere)."""
    p, n = layer._params, layer.n_nodes
    picks = [0]
    for level in range(layer.depth + 1):
        picks += [(1 << level) - 1, (1 << (level + 1)) - 2]
    ids = np.unique([t * n + i for t in range(layer.parallel_size) for i in picks])
    return fingerprint(p["w_in"][ids], p["b_in"][ids], p["w_out_t"][ids])
