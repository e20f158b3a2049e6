"""ShardedFFF: a router-leaf FFF whose subtrees (routers and leaves) live on different ranks."""

from __future__ import annotations

import numpy as np

from .._threads import effective_n_threads
from .._validation import (
    as_rows,
    check_bool,
    check_choice,
    check_depth,
    check_fits_in_memory,
    check_nonnegative,
    check_probability,
    check_width,
)
from ..backends import get_ops
from ..layers import FFF
from ..module import run_once
from ..ops import ACTIVATIONS
from ._base import _Sharded, check_shard_dtype
from ._common import (
    InitStream,
    allgather_rows,
    allreduce_sum,
    blocks,
    choose_top_levels,
    exchange,
    fingerprint,
    reduce_scatter_rows,
    send_order,
    sources,
    subtree_rows,
)


def _setting(name: str, check, doc: str) -> property:
    """A setting of the layer config, checked on assignment like the constructor's argument
    (every rank must make the same change: each call compares them)."""

    def get(self):
        return self._layer_config[name]

    def set_(self, value):
        self._layer_config[name] = check(value, name)

    return property(get, set_, doc=doc)


class ShardedFFF(_Sharded):
    """A router-leaf FFF split over the ranks of an MPI communicator.

    Every rank holds the top ``top_levels`` levels of routers (``2**top_levels - 1``) and a
    contiguous run of the ``2**top_levels`` subtrees below them, each an FFF of depth
    ``depth - top_levels`` (its routers and ``2**(depth - top_levels)`` leaves). All calls are
    collective: every rank calls them with its own rows (zero rows are fine).

    Hard inference (``layer(x)``) and hardened training (``train_hardened``) follow one path
    per row: each rank routes its rows through the top routers, sends each to the owner of
    its subtree (``Alltoallv``), which routes it the rest of the way and evaluates its leaf,
    and sends the output back; the outputs are bitwise the whole FFF's. The hardened backward
    sends dy out and dx back the same way. Soft training mixes every leaf into every row:
    each rank gathers all ranks' rows (``Allgatherv``), evaluates its own subtrees' mixtures
    weighted by the rows' probabilities of reaching them, and the ranks' partial outputs are
    summed back to the rows' ranks (``Reduce_scatter``); the backward does the same with dy
    and dx. The top routers' gradients are summed over the ranks (``Allreduce``) so that
    every rank's optimizer updates them alike. Region-leak and dropout masks are drawn for the
    whole batch (every rank's rows, in rank order) on every rank from the same stream (the
    layer's, or ``rng``, which must then be in the same state on every rank), so training
    draws exactly the masks the whole FFF would draw for the ranks' rows stacked in rank
    order, and the weights follow its training to rounding. ``usage_mode`` must be "none".

    Built from its config (``ShardedFFF(in, leaf, out, depth, ..., seed=s, comm=comm)``, each
    rank drawing exactly its part of ``FFF(..., seed=s)``'s weights) or from a whole layer
    (``fastff.distributed.shard``). State dict: ``top.node_weights`` (2**k - 1, in),
    ``top.node_biases``; ``subtrees.node_weights`` (m * (2**(depth - k) - 1), in) and
    ``subtrees.node_biases`` (each subtree's routers in its heap order), ``subtrees.w1s``
    (m * 2**(depth - k), in, leaf), ``subtrees.b1s``, ``subtrees.w2s``, ``subtrees.b2s`` (its
    leaves in order).
    """

    KIND = "FFF"

    def __init__(
        self,
        input_width,
        leaf_width,
        output_width,
        depth,
        activation="relu",
        dropout=0.0,
        train_hardened=False,
        region_leak=0.0,
        usage_mode="none",
        *,
        dtype=np.float32,
        seed=None,
        comm=None,
        top_levels=None,
    ):
        raw = {
            "input_width": input_width,
            "leaf_width": leaf_width,
            "output_width": output_width,
            "depth": depth,
            "activation": activation,
            "dropout": dropout,
            "train_hardened": train_hardened,
            "region_leak": region_leak,
            "usage_mode": usage_mode,
            "dtype": dtype,
        }
        self._build(comm, raw, seed, top_levels)

    def _seeded(self, seed) -> None:
        self._train_rng = np.random.default_rng(seed).spawn(1)[0]  # as FFF's

    @classmethod
    def _normalize(cls, config: dict) -> dict:
        required = {"input_width", "leaf_width", "output_width", "depth"}
        known = required | {
            "activation",
            "dropout",
            "train_hardened",
            "region_leak",
            "usage_mode",
            "master_leaf",
            "dtype",
        }
        if set(config) - known or not required <= set(config):
            raise ValueError(f"an FFF config holds {sorted(known)}, got {sorted(config)}")
        if check_bool(config.get("master_leaf", False), "master_leaf"):
            raise ValueError(
                "a sharded FFF has no master leaf (master_leaf=True): every rank would evaluate "
                "it for every row; shard an FFF built with master_leaf=False"
            )
        usage = check_choice(
            config.get("usage_mode", "none"), "usage_mode", ("none", "soft", "hard")
        )
        if usage != "none":
            raise ValueError(
                f"a sharded FFF does not track usage (usage_mode={usage!r}): build the FFF with "
                "usage_mode='none' (the optimizers' local_batch_size needs the counters)"
            )
        return {
            "input_width": check_width(config["input_width"], "input_width"),
            "leaf_width": check_width(config["leaf_width"], "leaf_width"),
            "output_width": check_width(config["output_width"], "output_width"),
            "depth": check_depth(config["depth"], "FFF"),
            "activation": check_choice(config.get("activation", "relu"), "activation", ACTIVATIONS),
            "dropout": check_probability(config.get("dropout", 0.0), "dropout"),
            "train_hardened": check_bool(config.get("train_hardened", False), "train_hardened"),
            "region_leak": check_probability(config.get("region_leak", 0.0), "region_leak"),
            "usage_mode": "none",
            "dtype": check_shard_dtype(config.get("dtype", np.float32)).name,
        }

    @staticmethod
    def _tree_shape(config: dict) -> tuple[int, int]:
        return 1, config["depth"]

    def _allocate(self) -> None:
        c, k, dtype = self._layer_config, self._top_levels, self.dtype
        in_w, leaf_w, out_w = c["input_width"], c["leaf_width"], c["output_width"]
        depth = c["depth"]
        self._n_top = (1 << k) - 1
        self._n_sub = (1 << (depth - k)) - 1  # routers per subtree
        self._n_sub_leaves = 1 << (depth - k)
        m = self._plan.n_local
        routers, leaves = self._n_top + m * self._n_sub, m * self._n_sub_leaves
        n_values = routers * (in_w + 1) + leaves * (leaf_w * (in_w + 1 + out_w) + out_w)
        check_fits_in_memory(
            n_values * dtype.itemsize,
            f"rank {self.rank}'s shard of FFF(depth={depth}, {in_w}->{leaf_w}->{out_w})",
        )
        self._params = {
            "top_node_w": np.empty((self._n_top, in_w), dtype),
            "top_node_b": np.empty((self._n_top, 1), dtype),
            "node_w": np.empty((m * self._n_sub, in_w), dtype),
            "node_b": np.empty((m * self._n_sub, 1), dtype),
            "w1t": np.empty((leaves, leaf_w, in_w), dtype),
            "b1": np.empty((leaves, leaf_w), dtype),
            "w2": np.empty((leaves, leaf_w, out_w), dtype),
            "b2": np.empty((leaves, out_w), dtype),
        }
        self._anchor = {
            "top.node_weights": ("top_node_w", None),
            "top.node_biases": ("top_node_b", None),
            "subtrees.node_weights": ("node_w", None),
            "subtrees.node_biases": ("node_b", None),
            "subtrees.w1s": ("w1t", (0, 2, 1)),
            "subtrees.b1s": ("b1", None),
            "subtrees.w2s": ("w2", None),
            "subtrees.b2s": ("b2", None),
        }
        self._train_rng = np.random.default_rng()
        self.last_mean_entropy: float | None = None
        self._dummies: dict = {}

    # ---- the layer's attributes -------------------------------------------------------------
    activation = _setting(
        "activation", lambda v, n: check_choice(v, n, ACTIVATIONS), "The leaves' activation."
    )
    dropout = _setting("dropout", check_probability, "Dropout rate on leaf activations.")
    region_leak = _setting("region_leak", check_probability, "Probability of a swapped decision.")
    train_hardened = _setting("train_hardened", check_bool, "Train on the rounded path only.")

    @property
    def leaf_width(self) -> int:
        return self._layer_config["leaf_width"]

    @property
    def usage_mode(self) -> str:
        return "none"

    # ---- where a rank's rows come from in the whole layer -----------------------------------
    def _blocks(self, plan=None):
        plan = self._plan if plan is None else plan
        return blocks((1 << self.depth) - 1, self._top_levels, self.depth - self._top_levels, plan)

    def _leaves(self, plan=None) -> slice:
        plan = self._plan if plan is None else plan
        return slice(plan.first * self._n_sub_leaves, plan.stop * self._n_sub_leaves)

    def node_ids(self, rank: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(top routers, subtree routers, leaves): the whole FFF's router and leaf index of each
        row of the shard's arrays (this rank's, or those of rank `rank`)."""
        plan = self._plan if rank is None else self._plan.of(rank)
        sub = np.empty(plan.n_local * self._n_sub, dtype=np.int64)
        for g0, local0, count, level in self._blocks(plan):
            ids = g0 + np.arange(count << level).reshape(count, 1 << level)
            subtree_rows(sub, self._n_sub, local0, count, level)[...] = ids
        leaves = self._leaves(plan)
        return np.arange(self._n_top, dtype=np.int64), sub, np.arange(leaves.start, leaves.stop)

    def _copy_from(self, layer: FFF) -> None:
        src, p = layer._params, self._params
        p["top_node_w"][...] = src["node_w"][: self._n_top]
        p["top_node_b"][...] = src["node_b"][: self._n_top]
        for g0, local0, count, level in self._blocks():
            rows = slice(g0, g0 + (count << level))
            for key in ("node_w", "node_b"):
                block = src[key][rows].reshape((count, 1 << level) + src[key].shape[1:])
                subtree_rows(p[key], self._n_sub, local0, count, level)[...] = block
        for key in ("w1t", "b1", "w2", "b2"):
            p[key][...] = src[key][self._leaves()]
        self._train_rng = np.random.Generator(np.random.PCG64())
        self._train_rng.bit_generator.state = layer._train_rng.bit_generator.state

    def _draw(self, seed) -> None:
        """This rank's weights from FFF's initialisation stream, at their positions (FFF fills
        node_weights, node_biases, w1s (stored transposed), b1s, w2s, b2s, in C order)."""
        stream = InitStream(seed, self.dtype)
        c, p = self._layer_config, self._params
        in_w, leaf_w, out_w = c["input_width"], c["leaf_width"], c["output_width"]
        n_nodes, n_leaves = (1 << self.depth) - 1, 1 << self.depth
        k_in, k_leaf = (1.0 / in_w) ** 0.5, (1.0 / leaf_w) ** 0.5
        at = {"node_w": 0, "node_b": n_nodes * in_w}
        at["w1t"] = at["node_b"] + n_nodes
        at["b1"] = at["w1t"] + n_leaves * leaf_w * in_w
        at["w2"] = at["b1"] + n_leaves * leaf_w
        at["b2"] = at["w2"] + n_leaves * leaf_w * out_w
        bound = {key: k_in for key in ("node_w", "node_b", "w1t", "b1")}
        bound.update(w2=k_leaf, b2=k_leaf)

        def fill(key: str, target: np.ndarray, row0: int) -> None:
            """target: rows row0.. of the whole layer's array `key`, contiguous."""
            row = int(np.prod(target.shape[1:], dtype=np.int64))
            step = max(1, (1 << 22) // max(row, 1))
            for r0 in range(0, target.shape[0], step):
                r1 = min(target.shape[0], r0 + step)
                values = stream.uniform(at[key] + (row0 + r0) * row, (r1 - r0) * row, bound[key])
                target[r0:r1] = values.reshape((r1 - r0,) + target.shape[1:])

        fill("node_w", p["top_node_w"], 0)
        fill("node_b", p["top_node_b"], 0)
        for g0, local0, count, level in self._blocks():
            width = 1 << level
            for i in range(count):
                start = (local0 + i) * self._n_sub + width - 1
                for key in ("node_w", "node_b"):
                    fill(key, p[key][start : start + width], g0 + i * width)
        for key in ("w1t", "b1", "w2", "b2"):
            fill(key, p[key], self._leaves().start)

    # ---- kernels' views ----------------------------------------------------------------------
    def _sub(self, local: int) -> dict:
        p = self._params
        nodes = slice(local * self._n_sub, (local + 1) * self._n_sub)
        leaves = slice(local * self._n_sub_leaves, (local + 1) * self._n_sub_leaves)
        out = {"node_w": p["node_w"][nodes], "node_b": p["node_b"][nodes]}
        out.update({key: p[key][leaves] for key in ("w1t", "b1", "w2", "b2")})
        return out

    def _sub_grads(self, local: int) -> dict:
        g = self._allocate_grads()
        nodes = slice(local * self._n_sub, (local + 1) * self._n_sub)
        leaves = slice(local * self._n_sub_leaves, (local + 1) * self._n_sub_leaves)
        out = {"node_w": g["node_w"][nodes], "node_b": g["node_b"][nodes]}
        out.update({key: g[key][leaves] for key in ("w1t", "b1", "w2", "b2")})
        return out

    def _top(self, kind: str) -> dict:
        """The top routers as an FFF of depth top_levels whose leaves are stand-ins, so that
        the router kernels route through them exactly as through the whole FFF: a leaf of
        zero weights outputs its bias, which is its own index ("index": hard inference tells
        each row's subtree) or its one-hot row ("onehot": the soft mixture's output is then
        the rows' probabilities of reaching each subtree, and its backward takes their
        gradients as dy). Their gradients land in a scratch dict."""
        k, in_w, dtype = self._top_levels, self.input_width, self.dtype
        n = 1 << k
        if kind not in self._dummies:
            out_w = 1 if kind == "index" else n
            if kind == "index":
                b2 = np.arange(n, dtype=dtype).reshape(n, 1)
            else:
                b2 = np.eye(n, dtype=dtype)
            self._dummies[kind] = {
                "w1t": np.zeros((n, 1, in_w), dtype),
                "b1": np.zeros((n, 1), dtype),
                "w2": np.zeros((n, 1, out_w), dtype),
                "b2": b2,
            }
        p = dict(self._dummies[kind])
        p["node_w"], p["node_b"] = self._params["top_node_w"], self._params["top_node_b"]
        return p

    # ---- masks ---------------------------------------------------------------------------
    def _masks(self, rng, n_rows: int, hardened: bool):
        """FFF._draw_masks for the whole batch: (swap, drop), drawn in this order."""
        swap = drop = None
        if self.region_leak > 0:
            n_cols = self.depth if hardened else (1 << self.depth) - 1
            swap = rng.random((n_rows, n_cols)) < self.region_leak
        if self.dropout > 0:
            n_cols = self.leaf_width * (1 if hardened else 1 << self.depth)
            keep = rng.random((n_rows, n_cols), dtype=self.dtype) >= self.dropout
            drop = keep.astype(self.dtype)
            drop *= self.dtype.type(1.0 / (1.0 - self.dropout))
        return swap, drop

    def _router_cols(self, local: int) -> np.ndarray:
        """The whole FFF's router indices of local subtree `local`, in its heap order."""
        j, k = self._plan.first + local, self._top_levels
        levels = [
            (1 << (k + lv)) - 1 + j * (1 << lv) + np.arange(1 << lv) for lv in range(self.depth - k)
        ]
        return np.concatenate([np.zeros(0, np.intp)] + levels)

    # ---- inference --------------------------------------------------------------------------
    def _check_rows(self, x, train: bool, what: str):
        rows, lead = as_rows(x, self.input_width, self.dtype, np)
        per_row = (self.input_width + 2 * self.output_width) * self.dtype.itemsize
        if train:
            per_row += (self.depth + 2 * self.leaf_width + self.input_width + 4) * 8
        check_fits_in_memory(rows.shape[0] * per_row, f"{what} of {self!r} on {rows.shape[0]} rows")
        return rows, lead

    def __call__(self, x):
        """Hard inference of this rank's rows, x (..., input_width) -> (..., output_width);
        collective: every rank calls it."""
        error: BaseException | None = None
        rows = lead = None
        try:
            rows, lead = self._check_rows(x, False, "inference")
        except (TypeError, ValueError, MemoryError) as exc:
            error = exc
        act = self.activation
        self._begin("call", error, None, act)
        assert rows is not None and lead is not None
        ops, n_threads, plan = get_ops("cpu"), effective_n_threads(), self._plan
        k, depth, out_w = self._top_levels, self.depth, self.output_width
        n_rows = rows.shape[0]
        subtree = np.zeros(n_rows, dtype=np.int64)
        if n_rows:
            index = ops.fff_infer(rows, self._top("index"), k, act, n_threads)[:, 0]
            finite = np.isfinite(index)
            subtree[finite] = index[finite]
            if not finite.all():
                subtree[~finite] = self._route_nonfinite(rows[~finite])
        dest = plan.owner(subtree)
        order, counts, (xs, got) = exchange(
            self._comm, dest, [rows, subtree], send_order(dest, subtree), self.traffic
        )
        ys = np.empty((xs.shape[0], out_w), dtype=self.dtype)
        for a, b, sub in self._runs(got):
            ys[a:b] = ops.fff_infer(xs[a:b], self._sub(sub), depth - k, act, n_threads)
        _, _, (back,) = exchange(self._comm, sources(counts), [ys], None, self.traffic)
        y = np.empty((n_rows, out_w), dtype=self.dtype)
        y[order if order is not None else slice(None)] = back
        return y.reshape(lead + (out_w,))

    def _route_nonfinite(self, rows: np.ndarray) -> np.ndarray:
        """The subtrees of rows holding NaN or infinities, whose stand-in leaf outputs are NaN
        (x @ 0). Their router logits are NaN or infinite whatever the order of the sum (an
        infinite term absorbs the finite ones), so NumPy's sum decides as the kernel's does:
        right iff the logit is >= 0 (NaN: left)."""
        w, b = self._params["top_node_w"], self._params["top_node_b"][:, 0]
        node = np.zeros(rows.shape[0], dtype=np.intp)
        with np.errstate(invalid="ignore", over="ignore"):
            for _ in range(self._top_levels):
                z = np.einsum("ij,ij->i", rows, w[node]) + b[node]
                node = 2 * node + 1 + (z >= 0)
        return node - self._n_top

    def _runs(self, subtree: np.ndarray):
        """(start, stop, local subtree) of each run of rows of one subtree."""
        local = subtree - self._plan.first
        starts = np.flatnonzero(np.diff(local, prepend=-1, append=-1))
        return [(int(a), int(b), int(local[a])) for a, b in zip(starts[:-1], starts[1:])]

    # ---- training ---------------------------------------------------------------------------
    def forward_train(self, x, *, rng=None, hardening=0.0, input_grad=True):
        """Training forward of this rank's rows: (y, backprop), as FFF.forward_train (soft, or
        hardened with train_hardened); collective, as backprop. ``rng`` (or the layer's own
        stream) must be in the same state on every rank: the masks are drawn for the whole
        batch everywhere. ``last_mean_entropy`` is the whole batch's. Without input_grad (the
        same on every rank) backprop returns None and leaves out dx's products (hardened: and
        its exchange)."""
        error: BaseException | None = None
        rows = lead = None
        state = None
        wants_dx = None
        try:
            hardening = check_nonnegative(hardening, "hardening")
            wants_dx = check_bool(input_grad, "input_grad")
            if rng is None:
                rng = self._train_rng
            elif not isinstance(rng, np.random.Generator):
                raise TypeError(
                    f"rng must be a numpy.random.Generator or None, got {type(rng).__name__}"
                )
            state = fingerprint(np.frombuffer(repr(rng.bit_generator.state).encode(), np.uint8))
            rows, lead = self._check_rows(x, True, "forward_train")
        except (TypeError, ValueError, MemoryError) as exc:
            error = exc
        hardened, act = self.train_hardened, self.activation
        settings = (act, hardened, self.dropout, self.region_leak, hardening, wants_dx)
        mine = (0 if rows is None else rows.shape[0], state)
        everyone = self._begin("forward_train", error, mine, *settings)
        assert rows is not None and lead is not None
        if any(state != e[1] for e in everyone):
            raise ValueError(
                "forward_train: the ranks' random streams differ (the layer's own, or rng): "
                "the masks are drawn for the whole batch on every rank, from the same stream"
            )
        counts = [e[0] for e in everyone]
        n_total = int(sum(counts))
        offset = int(sum(counts[: self.rank]))
        swap, drop = self._masks(rng, n_total, hardened)
        n_decisions = n_total * (self.depth if hardened else (1 << self.depth) - 1)
        weight = hardening / n_decisions if n_decisions else 0.0
        if hardened:
            y, saved, entropy = self._hard_forward(rows, offset, swap, drop, act)
        else:
            y, saved, entropy = self._soft_forward(rows, counts, offset, swap, drop, act)
        total = np.array([entropy])
        allreduce_sum(self._comm, [total], self.traffic)
        self.last_mean_entropy = float(total[0]) / n_decisions if n_decisions else 0.0
        version, call, out_w, in_w = self._version, self._calls, self.output_width, self.input_width

        @run_once
        def backprop(dy):
            """dy (..., output_width) -> dx (..., input_width); adds into grads. Collective."""
            dy_rows = self._backprop_rows(dy, version, call, lead)
            if hardened:
                dx = self._hard_backward(dy_rows, saved, act, weight, wants_dx)
            else:
                dx = self._soft_backward(dy_rows, saved, counts, act, weight, wants_dx)
            return None if dx is None else dx.reshape(lead + (in_w,))

        return y.reshape(lead + (out_w,)), backprop

    def _top_grads(self, scratch: dict) -> None:
        """Sum the top routers' gradients over the ranks and add them into grads."""
        allreduce_sum(self._comm, [scratch["node_w"], scratch["node_b"]], self.traffic)
        g = self._allocate_grads()
        g["top_node_w"] += scratch["node_w"]
        g["top_node_b"] += scratch["node_b"]

    def _hard_forward(self, rows, offset, swap, drop, act):
        """Route this rank's rows to their subtrees' owners, which walk each row's whole path
        (the top routers again, then the subtree) and evaluate its leaf."""
        ops, n_threads, plan = get_ops("cpu"), effective_n_threads(), self._plan
        k, depth, out_w = self._top_levels, self.depth, self.output_width
        n_rows = rows.shape[0]
        top = self._top("index")
        subtree = np.zeros(n_rows, dtype=np.int64)
        if n_rows:
            top_swap = None if swap is None else swap[offset : offset + n_rows, :k]
            _, routed = ops.fff_hard_forward(rows, top, k, act, n_threads, top_swap, None)
            subtree[...] = routed["leaf"]
        dest = plan.owner(subtree)
        meta = np.stack([subtree, offset + np.arange(n_rows)], axis=1)  # the batch's row
        order, counts, (xs, meta) = exchange(
            self._comm, dest, [rows, meta], send_order(dest, subtree), self.traffic
        )
        ys = np.empty((xs.shape[0], out_w), dtype=self.dtype)
        entropy = 0.0
        saved: dict = {"x": xs, "order": order, "dest": dest, "back": sources(counts)}
        saved["groups"] = []
        at = meta[:, 1]
        if xs.shape[0]:
            top_swap = None if swap is None else swap[at, :k]
            _, saved["top"] = ops.fff_hard_forward(xs, top, k, act, n_threads, top_swap, None)
            entropy += float(saved["top"]["entropy"].sum(dtype=np.float64))
        for a, b, sub in self._runs(meta[:, 0]):
            sub_swap = None if swap is None else swap[at[a:b], k:]
            sub_drop = None if drop is None else drop[at[a:b]]
            ys[a:b], part = ops.fff_hard_forward(
                xs[a:b], self._sub(sub), depth - k, act, n_threads, sub_swap, sub_drop
            )
            saved["groups"].append((sub, a, b, part))
            entropy += float(part["entropy"].sum(dtype=np.float64))
        _, _, (back,) = exchange(self._comm, saved["back"], [ys], None, self.traffic)
        y = np.empty((n_rows, out_w), dtype=self.dtype)
        y[order if order is not None else slice(None)] = back
        return y, saved, entropy

    def _hard_backward(self, dy, saved, act, weight, need_dx=True):
        """dy goes where the rows went, in the same order, so it arrives beside them; dx comes
        back the same way where need_dx (the same on every rank)."""
        ops, n_threads, dtype = get_ops("cpu"), effective_n_threads(), self.dtype
        order = saved["order"]
        _, _, (dys,) = exchange(self._comm, saved["dest"], [dy], order, self.traffic)
        xs = saved["x"]
        dxs = np.zeros((xs.shape[0], self.input_width), dtype=dtype) if need_dx else None
        scratch = {key: np.zeros_like(v) for key, v in self._top("index").items()}
        for sub, a, b, part in saved["groups"]:
            dx_sub = ops.fff_hard_backward(
                xs[a:b],
                dys[a:b],
                self._sub(sub),
                part,
                act,
                weight,
                self._sub_grads(sub),
                n_threads,
                need_dx=need_dx,
            )
            if dxs is not None:
                dxs[a:b] = dx_sub
        if xs.shape[0]:  # the top routers learn from the hardening term only
            zeros = np.zeros((xs.shape[0], 1), dtype=dtype)
            dx_top = ops.fff_hard_backward(
                xs,
                zeros,
                self._top("index"),
                saved["top"],
                act,
                weight,
                scratch,
                n_threads,
                need_dx=need_dx,
            )
            if dxs is not None:
                dxs += dx_top
        dx = None
        if dxs is not None:
            _, _, (back,) = exchange(self._comm, saved["back"], [dxs], None, self.traffic)
            dx = np.empty((dy.shape[0], self.input_width), dtype=dtype)
            dx[order if order is not None else slice(None)] = back
        self._top_grads(scratch)
        return dx

    def _soft_forward(self, rows, counts, offset, swap, drop, act):
        """Every rank mixes its own subtrees into every row of the batch (gathered), weighted
        by the row's probability of reaching each; the partial outputs are summed back to the
        rows' ranks."""
        ops, n_threads, plan, comm = get_ops("cpu"), effective_n_threads(), self._plan, self._comm
        leaf_w = self.leaf_width
        x_all = allgather_rows(comm, rows, counts, self.traffic)
        n_total = x_all.shape[0]
        part = np.zeros((n_total, self.output_width), dtype=self.dtype)
        saved: dict = {"x": x_all, "offset": offset, "n_rows": rows.shape[0], "subs": []}
        entropy = 0.0
        if n_total:
            top_swap = None if swap is None else np.ascontiguousarray(swap[:, : self._n_top])
            _, top = ops.fff_soft_forward(
                x_all, self._top("onehot"), act, n_threads, top_swap, None
            )
            reach = top["mix"]  # (B, 2**k): each row's probability of reaching each subtree
            saved["top"], saved["reach"] = top, reach
            entropy += float(top["entropy"][offset : offset + rows.shape[0]].sum(dtype=np.float64))
            per_leaf = self._n_sub_leaves * leaf_w
            for sub in range(plan.n_local):
                j = plan.first + sub
                sub_swap = None
                if swap is not None:
                    sub_swap = np.ascontiguousarray(swap[:, self._router_cols(sub)])
                sub_drop = None if drop is None else drop[:, j * per_leaf : (j + 1) * per_leaf]
                y_sub, s = ops.fff_soft_forward(
                    x_all, self._sub(sub), act, n_threads, sub_swap, sub_drop
                )
                part += reach[:, j : j + 1] * y_sub
                saved["subs"].append((sub, y_sub, s))
                entropy += float(s["entropy"].sum(dtype=np.float64))
        y = reduce_scatter_rows(comm, part, counts, self.traffic)
        return y, saved, entropy

    def _soft_backward(self, dy, saved, counts, act, weight, need_dx=True):
        ops, n_threads, plan, comm = get_ops("cpu"), effective_n_threads(), self._plan, self._comm
        in_w, n_sub_total = self.input_width, 1 << self._top_levels
        dy_all = allgather_rows(comm, dy, counts, self.traffic)
        x_all = saved["x"]
        n_total = x_all.shape[0]
        # dx of every row from this rank's subtrees, and d(output) / d(reach) of each subtree;
        # without need_dx the dx columns stay zero but are still summed, so that the reach
        # columns' sums take MPI's same path and the gradients keep their bits
        packed = np.zeros((n_total, in_w + n_sub_total), dtype=self.dtype)
        for sub, y_sub, s in saved["subs"]:
            j = plan.first + sub
            reach = saved["reach"][:, j : j + 1]
            grads = self._sub_grads(sub)
            dx_sub = ops.fff_soft_backward(
                x_all,
                reach * dy_all,
                self._sub(sub),
                s,
                act,
                weight,
                grads,
                n_threads,
                need_dx=need_dx,
            )
            if need_dx:
                packed[:, :in_w] += dx_sub
            packed[:, in_w + j] = np.einsum("ij,ij->i", dy_all, y_sub)
        mine = reduce_scatter_rows(comm, packed, counts, self.traffic)
        dx = np.ascontiguousarray(mine[:, :in_w]) if need_dx else None
        scratch = {key: np.zeros_like(v) for key, v in self._top("onehot").items()}
        n_rows, offset = saved["n_rows"], saved["offset"]
        if n_rows:
            rows = slice(offset, offset + n_rows)
            top = dict(saved["top"])
            for key in ("q", "reach", "mix", "hpre", "a", "mixed", "entropy"):
                top[key] = top[key][rows]
            if top["has_swap"]:
                top["swap"] = top["swap"][rows]
            dx_top = ops.fff_soft_backward(
                x_all[rows],
                np.ascontiguousarray(mine[:, in_w:]),
                self._top("onehot"),
                top,
                act,
                weight,
                scratch,
                n_threads,
                need_dx=need_dx,
            )
            if dx is not None:
                dx += dx_top
        self._top_grads(scratch)
        return dx


def shard_fff(layer: FFF, comm, top_levels) -> ShardedFFF:
    """fastff.distributed.shard for an FFF (see there)."""
    error: BaseException | None = None
    described = None
    config: dict = {}
    try:
        config = ShardedFFF._normalize(layer.get_config())
        top_levels = choose_top_levels(top_levels, 1, layer.depth, comm.Get_size(), "FFF")
        p = layer._params
        n = layer.n_nodes
        picks = np.unique([0, max(n - 1, 0)] + [(1 << lv) - 1 for lv in range(layer.depth)])
        picks = picks[picks < n]
        described = {
            "config": config,
            "top_levels": top_levels,
            "weights": fingerprint(
                p["node_w"][picks], p["node_b"][picks], p["w1t"][[0, -1]], p["b2"][[0, -1]]
            ),
            "training stream": repr(layer._train_rng.bit_generator.state),
        }
    except (TypeError, ValueError, MemoryError) as exc:
        error = exc
    return ShardedFFF._adopt(comm, layer, config, top_levels, error, described)
