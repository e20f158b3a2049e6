"""The FFF layers: parameters, validation and dispatch to a backend's kernels."""

from __future__ import annotations

import numpy as np

from . import _balance, _master, _routing
from ._threads import effective_n_threads
from ._validation import (
    HALF_DTYPES,
    as_rows,
    check_bool,
    check_choice,
    check_depth,
    check_fits_in_memory,
    check_int,
    check_nonnegative,
    check_probability,
    check_width,
)
from .module import Module, _aligned_copy, _aligned_empty, initialising, keep_for_backward, run_once
from .ops import ACTIVATIONS, to_host

USAGE_MODES = ("none", "soft", "hard")
_INTP_BYTES = np.dtype(np.intp).itemsize


def _fixed(name: str, doc: str) -> property:
    """A read-only attribute stored as `_<name>`. The kernels size their loops from these, so
    changing one after construction (layer.depth = 30) would make them read past the weights."""
    private = "_" + name

    def get(self):
        return getattr(self, private)

    def refuse(self, value):
        raise AttributeError(
            f"{type(self).__name__}.{name} is fixed at construction; build a new "
            "layer (and load_state_dict) to change it"
        )

    return property(get, refuse, doc=doc)


def _checked(name: str, check, doc: str) -> property:
    """An attribute stored as `_<name>` whose every assignment is checked like the
    constructor's argument (layer.activation = "x" would otherwise fail only in a kernel)."""
    private = "_" + name

    def get(self):
        return getattr(self, private)

    def set_(self, value):
        setattr(self, private, check(value, name))

    return property(get, set_, doc=doc)


def _check_activation(value, name):
    return check_choice(value, name, ACTIVATIONS)


def _uniform(rng, shape, bound, dtype):
    """U(-bound, bound) drawn straight in `dtype` (no float64 temporary for huge trees), into a
    64-byte aligned array. Left unfilled while fastff.load rebuilds a module (its file then
    overwrites every parameter)."""
    out = _aligned_empty(shape, dtype)
    if not initialising():
        return out
    if dtype in HALF_DTYPES:  # drawn in float32 (NumPy draws no 16-bit floats), then rounded
        out[...] = _uniform(rng, shape, bound, np.dtype(np.float32))
        return out
    rng.random(dtype=dtype, out=out)
    out *= dtype.type(2 * bound)
    out -= dtype.type(bound)
    return out


def _chunks(n_rows: int, row_size: int, max_elements: int = 1 << 24):
    """(start, stop) ranges of at most max_elements elements (whole rows, at least one)."""
    step = max(1, max_elements // max(row_size, 1))
    return [(start, min(start + step, n_rows)) for start in range(0, n_rows, step)]


def _node_records(
    n_nodes: int, input_width: int, output_width: int, dtype, w_in=None, w_out_t=None
):
    """UltraFFF's CPU layout: w_in (n, in) and w_out_t (n, out) as the two column blocks of one
    (n, in + out) array, so node g's input and output weights are one contiguous record and a
    walk reads each visited node as one stream. Deep trees fetch every node from DRAM, and this
    measured 9% faster at depth 20 than two separate arrays. The kernels take either layout.
    With w_in / w_out_t given, copies them in."""
    nodes = _aligned_empty((n_nodes, input_width + output_width), dtype)
    if w_in is not None:
        nodes[:, :input_width] = w_in
        nodes[:, input_width:] = w_out_t
    return nodes[:, :input_width], nodes[:, input_width:]


class UltraFFF(Module):
    """Neuron-tree fast feedforward layer of UltraFastBERT.

    `parallel_size` trees of depth `depth` (2**(depth+1) - 1 neurons each) share the input; a row
    evaluates the depth+1 neurons on its root-to-leaf path in every tree (right child iff the
    pre-activation is > 0) and the trees' outputs are summed.

    Parameters (state_dict, as UltraFastBERT stores them): ``linear_in.weight``
    (T*n_nodes, input_width), ``linear_in.bias`` (T*n_nodes,), ``linear_out.weight``
    (output_width, T*n_nodes).

    ``layer(x)``: x of shape (..., input_width) -> (..., output_width), hard inference.
    ``layer.forward_train(x) -> (y, backprop)``; ``backprop(dy) -> dx`` adds into ``layer.grads``.
    Inputs of another float or integer dtype are cast to the layer's dtype.

    Arguments: ``input_width``, ``output_width`` (>= 1); ``depth`` (>= 0; depth 11 is
    UltraFastBERT's 4095 neurons); ``parallel_size`` T (>= 1); ``activation`` "gelu" (exact,
    erf-based), "relu" or "identity"; ``dtype`` numpy.float32, numpy.float64, or for
    inference half precision, "bfloat16" or numpy.float16 (weights stored in 16 bits, inputs
    and outputs float32, every dot and sum accumulated in float32; train in float32 and
    convert with ``layer.astype("bfloat16")``); ``seed`` for the initialisation,
    U(+-1/sqrt(input_width)) for ``linear_in`` and U(+-1/sqrt(T * (depth+1))) for
    ``linear_out``. Inputs may be NumPy arrays, anything
    numpy.asarray takes, or CPU DLPack producers (torch, JAX); on "cuda", CuPy arrays.
    """

    input_width = _fixed("input_width", "Width of the input rows.")
    output_width = _fixed("output_width", "Width of the output rows.")
    depth = _fixed("depth", "Depth of each tree (a row visits depth + 1 neurons per tree).")
    parallel_size = _fixed("parallel_size", "Number of trees, whose outputs are summed.")
    n_nodes = _fixed("n_nodes", "Neurons per tree, 2**(depth+1) - 1.")
    activation = _checked("activation", _check_activation, "The neurons' activation.")

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
    ):
        super().__init__(dtype, half=True)
        self._input_width = check_width(input_width, "input_width")
        self._output_width = check_width(output_width, "output_width")
        self._parallel_size = check_int(parallel_size, "parallel_size", 1)
        self._depth = check_depth(depth, "UltraFFF")
        self.activation = activation
        self._n_nodes = 2 ** (self.depth + 1) - 1
        total_nodes = self.parallel_size * self.n_nodes
        check_fits_in_memory(
            total_nodes * (self.input_width + 1 + self.output_width) * self.dtype.itemsize,
            f"UltraFFF(depth={self.depth}, parallel_size={self.parallel_size}, "
            f"{self.input_width}->{self.output_width}, {self.dtype}) parameters",
        )
        rng = np.random.default_rng(seed)
        k_in = (1.0 / self.input_width) ** 0.5
        k_out = (1.0 / ((self.depth + 1) * self.parallel_size)) ** 0.5
        w_in, w_out_t = _node_records(total_nodes, self.input_width, self.output_width, self.dtype)
        fill = initialising()  # not while fastff.load rebuilds the layer
        for start, stop in _chunks(total_nodes, self.input_width) if fill else ():
            w_in[start:stop] = _uniform(rng, (stop - start, self.input_width), k_in, self.dtype)
        b_in = _uniform(rng, (total_nodes,), k_in, self.dtype)
        # linear_out.weight (out, n) is drawn row by row, as a single draw would give it
        for start, stop in _chunks(self.output_width, total_nodes) if fill else ():
            w_out_t[:, start:stop] = _uniform(rng, (stop - start, total_nodes), k_out, self.dtype).T
        self._params = {"w_in": w_in, "b_in": b_in, "w_out_t": w_out_t}
        self.last_balance_loss = None  # float after a forward_train with load_balancing > 0
        self._anchor = {
            "linear_in.weight": ("w_in", None),
            "linear_in.bias": ("b_in", None),
            "linear_out.weight": ("w_out_t", (1, 0)),
        }

    def _on_device_change(self, ops) -> None:
        if ops.xp is np:  # back on the CPU: rebuild the node records (see _node_records)
            p = self._params
            p["w_in"], p["w_out_t"] = _node_records(
                p["w_in"].shape[0],
                self.input_width,
                self.output_width,
                self.dtype,
                p["w_in"],
                p["w_out_t"],
            )

    def __repr__(self):
        return (
            f"UltraFFF({self.input_width}, {self.output_width}, depth={self.depth}, "
            f"parallel_size={self.parallel_size}, activation={self.activation!r}, "
            f"dtype={self.dtype.name}, device={self.device!r})"
        )

    def get_config(self) -> dict:
        return {
            "input_width": self.input_width,
            "output_width": self.output_width,
            "depth": self.depth,
            "parallel_size": self.parallel_size,
            "activation": self.activation,
            "dtype": self.dtype.name,
        }

    @property
    def training_width(self) -> int:
        """Neurons a dense layer of the same parameter count would evaluate per row."""
        return self.parallel_size * self.n_nodes

    @property
    def neurons_per_inference(self) -> int:
        """Neurons a row evaluates at inference: parallel_size * (depth + 1)."""
        return self.parallel_size * (self.depth + 1)

    def routing_stats(self, x) -> dict:
        """Where inference routes the rows of x (..., input_width): a dict of host values,
        ``rows``; ``node_counts`` (parallel_size * n_nodes,) int64, the rows visiting each
        neuron (state-dict order); ``leaf_counts`` (parallel_size, 2**depth), the rows ending
        at each bottom neuron of each tree; ``dead_node_fraction`` and ``dead_leaf_fraction``
        (never visited); ``routing_entropy`` (bits, of each tree's leaf histogram, averaged
        over the trees; at most depth) and ``max_routing_entropy`` (depth). See
        fastff._routing."""
        return _routing.ultra_stats(self, x)

    def _forward(self, x, save_path):
        # plain attributes, not the public properties: a batch-1 call is a few microseconds
        ops, dtype, depth, n_trees = self.ops, self.compute_dtype, self._depth, self._parallel_size
        rows, lead = as_rows(x, self._input_width, dtype, ops.xp)
        # y, and for training each row's visited nodes (intp) and pre-activations
        row_bytes = self._output_width * dtype.itemsize
        if save_path:
            row_bytes += n_trees * (depth + 1) * (_INTP_BYTES + dtype.itemsize)
        check_fits_in_memory(
            rows.shape[0] * row_bytes,
            lambda: (
                f"{'forward_train' if save_path else 'inference'} of UltraFFF(depth="
                f"{depth}, parallel_size={n_trees}) on {rows.shape[0]} rows"
            ),
        )
        p = self._params
        y, visited, preact = ops.ultra_forward(
            rows,
            p,
            depth,
            n_trees,
            self.activation,
            save_path,
            effective_n_threads(),
        )
        return rows, lead, y, visited, preact

    def __call__(self, x):
        """Hard inference: x (..., input_width) -> y (..., output_width)."""
        _, lead, y, _, _ = self._forward(x, save_path=False)
        return y if len(lead) == 1 else y.reshape(lead + (self._output_width,))

    def forward_train(self, x, *, load_balancing=0.0, input_grad=True):
        """Training forward: returns (y, backprop). Keeps each row's visited nodes and
        pre-activations, B * T * (depth+1) numbers, for the O(depth) backward. Without
        input_grad (x is the model's input), backprop returns None and the CPU kernel skips
        the dx pass (on CUDA dx is computed and dropped).

        load_balancing (>= 0, finite) adds ``load_balancing * balance`` to the loss:
        ``balance`` is the router-leaf FFF's hardened term applied to each tree, whose leaves
        are its 2**depth bottom neurons and whose branch weights are sigmoid(z) going right
        (z > 0) and 1 - sigmoid(z) going left; the mean over the trees of n_leaves * sum_l
        f_l * P_l, f_l the fraction of rows reaching bottom neuron l and P_l the mean of
        [row reaches l] * the product of the row's chosen branch weights (fastff._balance;
        the dense twin is fastff.reference.ultra_balance). P_l <= f_l, so the term is at most
        n_leaves * sum_l f_l**2: 1.0 for an even spread, n_leaves when one bottom neuron
        takes every row; it also falls as the decisions soften. Its gradient reaches the
        input weights and biases of the routing neurons each row visited, and dx. Depth 0:
        a constant 1.0, no gradient. With load_balancing > 0 the term's value is kept in
        ``layer.last_balance_loss`` (else None: unlike FFF's, it is not computed unasked)."""
        self._check_trainable("forward_train")
        input_grad = check_bool(input_grad, "input_grad")
        load_balancing = check_nonnegative(load_balancing, "load_balancing")
        rows, lead, y, visited, preact = self._forward(x, save_path=True)
        n_trees = self._parallel_size
        self.last_balance_loss = (
            _balance.ultra_loss(visited, preact, self._depth, n_trees, self.ops.xp)
            if load_balancing
            else None
        )
        rows = keep_for_backward(rows, x)
        version, device, out_shape = self._version, self.device, lead + (self.output_width,)
        activation = self.activation  # the forward's, whatever is assigned before backprop

        @run_once
        def backprop(dy):
            """dy (..., output_width), the shape of y -> dx (..., input_width); adds the
            parameter gradients into layer.grads."""
            dy_rows, g = self._backprop_inputs(dy, version, device, lead, self.output_width)
            p = self._params
            dx = self.ops.ultra_backward(
                rows,
                dy_rows,
                p,
                g,
                visited,
                preact,
                activation,
                effective_n_threads(),
                input_grad,
                load_balancing,
                n_trees,
            )
            return None if dx is None else dx.reshape(lead + (self.input_width,))

        return y.reshape(out_shape), backprop


class FFF(Module):
    """Router-leaf fast feedforward layer (Belcak & Wattenhofer, "Fast Feedforward Networks"),
    a NumPy twin of the `fastfeedforward` package's ``FFF``.

    A balanced tree of ``n_nodes = 2**depth - 1`` routers (children of node n: 2n+1 left, 2n+2
    right) over ``n_leaves = 2**depth`` leaf MLPs ``f_l(x) = act(x @ w1s[l] + b1s[l]) @ w2s[l] +
    b2s[l]`` of width ``leaf_width``.

    ``layer(x)``: hard inference, x (..., input_width) -> (..., output_width): right at node n iff
    ``x @ node_weights[n] + node_biases[n] >= 0``, then only the reached leaf is evaluated.

    ``layer.forward_train(x, rng=None, hardening=0.0, load_balancing=0.0) -> (y, backprop)``:
    soft training (every leaf, mixed by the products of the router sigmoids along each leaf's
    path), or, with ``train_hardened``, the rounded path only. ``region_leak`` and ``dropout``
    act here only; ``load_balancing`` weighs a leaf-usage balancing term (forward_train).

    Master leaf (``master_leaf=True``; fastff._master): one more leaf MLP of ``leaf_width``
    hidden units that every row evaluates, in training and at inference, mixed in as
    ``y = (1 - s) * y_tree + s * y_master`` with ``s = sigmoid(master.mix)`` learned (starting
    at 0, s = 1/2). Dropout and region leak act on the tree only.

    Parameters (state_dict, the package's keys and shapes): ``node_weights`` (n_nodes, in),
    ``node_biases`` (n_nodes, 1), ``w1s`` (n_leaves, in, leaf), ``b1s`` (n_leaves, leaf),
    ``w2s`` (n_leaves, leaf, out), ``b2s`` (n_leaves, out); with the master leaf also
    ``master.w1`` (in, leaf), ``master.b1`` (leaf,), ``master.w2`` (leaf, out), ``master.b2``
    (out,) and ``master.mix`` (1,), the logit of s. ``load_state_dict`` also takes the
    package's own state dict (master_leaf=False), with its ``depth`` entry (checked) and usage
    counters.

    Usage counters (``usage_mode`` "soft" or "hard"; None for "none"): ``node_usage``
    (n_nodes,) and ``leaf_usage`` (n_leaves,), float64, added to by every ``forward_train``:
    "soft" adds each row's probability of reaching the node or leaf (its mixture weight), "hard"
    counts the rows whose rounded path visits it. ``reset_usage()`` zeroes them. (For a node
    below the root the package adds its parent's decision weight summed over every row, reaching
    the parent or not; fastff counts the reach, which is what a per-node optimizer step means
    by use, and which hardened training can count in O(depth).) These are the package's
    attributes, so the routing diagnostics of a batch are a method of another name,
    ``routing_stats(x)``: leaf and node histograms of the hard routes, dead leaves, entropy.

    Arguments: ``input_width``, ``leaf_width``, ``output_width`` (>= 1); ``depth`` (>= 0);
    ``activation`` of the leaves, "relu" (the package's default), "gelu" or "identity";
    ``dropout`` rate on leaf activations and ``region_leak`` swap probability, both in [0, 1)
    and used by ``forward_train`` only; ``train_hardened``; ``usage_mode`` "none", "soft" or
    "hard"; ``master_leaf`` (keyword; default False); ``dtype`` numpy.float32, numpy.float64,
    or for inference "bfloat16" or numpy.float16 (16-bit weights, float32 inputs, outputs and
    sums; train in float32, then ``layer.astype("bfloat16")``); ``seed`` for the
    initialisation (the package's; the master leaf is drawn after the tree, like one more
    leaf, so the tree's weights do not depend on master_leaf) and the default stream of
    training masks.
    """

    input_width = _fixed("input_width", "Width of the input rows.")
    master_leaf = _fixed("master_leaf", "Whether every row also evaluates the master leaf.")
    leaf_width = _fixed("leaf_width", "Hidden width of each leaf MLP.")
    output_width = _fixed("output_width", "Width of the output rows.")
    depth = _fixed("depth", "Depth of the router tree (a row takes depth decisions).")
    n_nodes = _fixed("n_nodes", "Routers, 2**depth - 1.")
    n_leaves = _fixed("n_leaves", "Leaf MLPs, 2**depth.")
    activation = _checked("activation", _check_activation, "The leaves' activation.")
    dropout = _checked("dropout", check_probability, "Dropout rate on leaf activations, [0, 1).")
    region_leak = _checked(
        "region_leak", check_probability, "Probability of a swapped decision, [0, 1)."
    )
    train_hardened = _checked(
        "train_hardened", check_bool, "Train on the rounded decisions' path only."
    )

    @property
    def usage_mode(self) -> str:
        """Usage tracking, "none", "soft" or "hard"; assigning another mode starts the
        counters from zero (None for "none")."""
        return self._usage_mode

    @usage_mode.setter
    def usage_mode(self, value) -> None:
        value = check_choice(value, "usage_mode", USAGE_MODES)
        if value != getattr(self, "_usage_mode", None):
            self._usage_mode = value
            self.node_usage = self.leaf_usage = None
            self.reset_usage()

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
        master_leaf=False,
        dtype=np.float32,
        seed=None,
    ):
        super().__init__(dtype, half=True)
        self._input_width = check_width(input_width, "input_width")
        self._master_leaf = check_bool(master_leaf, "master_leaf")
        self._leaf_width = check_width(leaf_width, "leaf_width")
        self._output_width = check_width(output_width, "output_width")
        self._depth = check_depth(depth, "FFF")
        self.activation = activation
        self.dropout = dropout
        self.train_hardened = train_hardened
        self.region_leak = region_leak
        self._usage_mode = check_choice(usage_mode, "usage_mode", USAGE_MODES)
        self._n_nodes = 2**self.depth - 1
        self._n_leaves = 2**self.depth
        in_w, leaf_w, out_w = self.input_width, self.leaf_width, self.output_width
        n_leaf_mlps = self.n_leaves + self.master_leaf
        check_fits_in_memory(
            (self.n_nodes * (in_w + 1) + n_leaf_mlps * (leaf_w * (in_w + 1 + out_w) + out_w))
            * self.dtype.itemsize,
            f"FFF(depth={self.depth}, {in_w}->{leaf_w}->{out_w}, {self.dtype}) parameters",
        )
        rng = np.random.default_rng(seed)
        # Region-leak and dropout masks come from this stream unless forward_train gets an rng.
        self._train_rng = rng.spawn(1)[0]
        # The package's init: U(+-1/sqrt(input_width)) for routers and the leaves' first layer,
        # U(+-1/sqrt(leaf_width)) for their second layer.
        k_in, k_leaf = (1.0 / in_w) ** 0.5, (1.0 / leaf_w) ** 0.5
        self._params = {
            "node_w": _uniform(rng, (self.n_nodes, in_w), k_in, self.dtype),
            "node_b": _uniform(rng, (self.n_nodes, 1), k_in, self.dtype),
            # w1s stored transposed: hidden unit j of leaf l is the contiguous row w1t[l, j].
            "w1t": _uniform(rng, (self.n_leaves, leaf_w, in_w), k_in, self.dtype),
            "b1": _uniform(rng, (self.n_leaves, leaf_w), k_in, self.dtype),
            "w2": _uniform(rng, (self.n_leaves, leaf_w, out_w), k_leaf, self.dtype),
            "b2": _uniform(rng, (self.n_leaves, out_w), k_leaf, self.dtype),
        }
        self._anchor = {
            "node_weights": ("node_w", None),
            "node_biases": ("node_b", None),
            "w1s": ("w1t", (0, 2, 1)),
            "b1s": ("b1", None),
            "w2s": ("w2", None),
            "b2s": ("b2", None),
        }
        if self.master_leaf:  # one more leaf, drawn as the tree's leaves are (fastff._master)
            self._params.update(
                master_w1t=_uniform(rng, (leaf_w, in_w), k_in, self.dtype),
                master_b1=_uniform(rng, (leaf_w,), k_in, self.dtype),
                master_w2=_uniform(rng, (leaf_w, out_w), k_leaf, self.dtype),
                master_b2=_uniform(rng, (out_w,), k_leaf, self.dtype),
                master_mix=_aligned_empty((1,), self.dtype),
            )
            self._params["master_mix"][...] = 0
            self._anchor.update(_master.ANCHOR)
        self.node_usage = self.leaf_usage = None
        self.reset_usage()
        self.last_mean_entropy = None  # float after the first forward_train
        self.last_balance_loss = None  # float after the first forward_train
        self._pending_usage = {}

    def __repr__(self):
        return (
            f"FFF({self.input_width}, {self.leaf_width}, {self.output_width}, "
            f"depth={self.depth}, activation={self.activation!r}, dropout={self.dropout}, "
            f"train_hardened={self.train_hardened}, region_leak={self.region_leak}, "
            f"usage_mode={self.usage_mode!r}, master_leaf={self.master_leaf}, "
            f"dtype={self.dtype.name}, device={self.device!r})"
        )

    def get_config(self) -> dict:
        return {
            "input_width": self.input_width,
            "leaf_width": self.leaf_width,
            "output_width": self.output_width,
            "depth": self.depth,
            "activation": self.activation,
            "dropout": self.dropout,
            "train_hardened": self.train_hardened,
            "region_leak": self.region_leak,
            "usage_mode": self.usage_mode,
            "master_leaf": self.master_leaf,
            "dtype": self.dtype.name,
        }

    @property
    def training_width(self) -> int:
        """Hidden units soft training evaluates per row (the width of the equivalent dense FF):
        n_leaves * leaf_width, plus leaf_width for the master leaf."""
        return (self.n_leaves + self.master_leaf) * self.leaf_width

    @property
    def neurons_per_inference(self) -> int:
        """Neurons a row evaluates at inference: depth routers and one leaf's leaf_width hidden
        units, plus leaf_width for the master leaf."""
        return self.depth + (1 + self.master_leaf) * self.leaf_width

    def routing_stats(self, x) -> dict:
        """Where inference routes the rows of x (..., input_width): a dict of host values,
        ``rows``; ``leaf_counts`` (n_leaves,) and ``node_counts`` (n_nodes,), int64 (rows
        reaching each leaf, visiting each router); ``dead_leaf_fraction`` (leaves no row
        reaches); ``routing_entropy`` (bits, of the leaf histogram; at most depth) and
        ``max_routing_entropy`` (depth); ``balance`` (n_leaves * sum_l f_l**2 of the hard
        fractions: 1.0 uniform, n_leaves all in one leaf). Not ``leaf_usage`` / ``node_usage``,
        which are the training usage counters of the package's API. See fastff._routing."""
        return _routing.fff_stats(self, x)

    # ---- usage counters (what the package's LocalSGD / LocalAdam read) ------------------------
    def reset_usage(self) -> None:
        """Zero node_usage and leaf_usage in place (an optimizer may hold them); no-op for
        usage_mode "none"."""
        if self.usage_mode == "none":
            return
        if self.node_usage is None:
            xp = self.ops.xp
            self.node_usage = xp.zeros(self.n_nodes, dtype=np.float64)
            self.leaf_usage = xp.zeros(self.n_leaves, dtype=np.float64)
        assert self.node_usage is not None and self.leaf_usage is not None
        self.node_usage[...] = 0
        self.leaf_usage[...] = 0

    def get_node_param_group(self) -> dict:
        """The routers' state-dict keys and their usage counter (rows: nodes), as the package's
        method of the same name gives its optimizers."""
        return {"params": ["node_weights", "node_biases"], "usage": self.node_usage}

    def get_leaf_param_group(self) -> dict:
        """The leaves' state-dict keys and their usage counter (rows: leaves)."""
        return {"params": ["w1s", "b1s", "w2s", "b2s"], "usage": self.leaf_usage}

    def _track_usage(self, saved, hardened: bool) -> None:
        if self.usage_mode == "none":
            return
        node, leaf = usage_increments(
            saved, hardened, self.usage_mode, self.n_nodes, self.n_leaves, self.ops.xp
        )
        self.node_usage += node
        self.leaf_usage += leaf

    def _on_device_change(self, ops) -> None:
        if ops.xp is np:  # back on the CPU: aligned weights again (see _aligned_empty)
            self._params = {k: _aligned_copy(v) for k, v in self._params.items()}
        if self.usage_mode != "none":
            self.node_usage = ops.asarray(self.node_usage)
            self.leaf_usage = ops.asarray(self.leaf_usage)

    # ---- state dicts -------------------------------------------------------------------------
    def _accept_extra_state(self, state: dict) -> dict:
        """The package's state dict also holds `depth` (a 0-d long tensor; it must equal this
        layer's) and, with usage tracking, `node_usage` / `leaf_usage` (kept if this layer tracks
        usage, applied only once the whole dict has been accepted)."""
        if "depth" in state:
            value = state.pop("depth")
            arr = to_host(value)
            if arr.size != 1 or arr.dtype.kind not in "iuf" or arr.reshape(-1)[0] % 1 != 0:
                raise ValueError(f"state['depth'] must be one integer, got {value!r}")
            if int(arr.reshape(-1)[0]) != self.depth:
                raise ValueError(
                    f"state dict is for an FFF of depth {int(arr.reshape(-1)[0])}, "
                    f"this layer has depth {self.depth}"
                )
        self._pending_usage = {}
        for key, size in (("node_usage", self.n_nodes), ("leaf_usage", self.n_leaves)):
            if key in state:
                value = state.pop(key)
                arr = to_host(value)
                if arr.dtype.kind not in "iuf" or arr.shape != (size,):
                    raise ValueError(
                        f"state[{key!r}] must be a real array of shape ({size},), "
                        f"got {arr.dtype} {arr.shape}"
                    )
                # counts of rows (or summed probabilities): a negative or NaN count would stall
                # or skip local_batch_size updates forever
                if not (np.isfinite(arr).all() and (arr >= 0).all()):
                    raise ValueError(
                        f"state[{key!r}] must hold finite counts >= 0, got "
                        f"{arr[~(np.isfinite(arr) & (arr >= 0))][0]!r}"
                    )
                self._pending_usage[key] = arr.astype(np.float64)
        return state

    def load_state_dict(self, state: dict) -> None:
        try:
            super().load_state_dict(state)
            if self.usage_mode != "none":
                for key, value in self._pending_usage.items():
                    getattr(self, key)[...] = self.ops.asarray(value)
        finally:
            self._pending_usage = {}

    # ---- forward and backward ----------------------------------------------------------------
    def __call__(self, x):
        """Hard inference: x (..., input_width) -> y (..., output_width)."""
        ops = self.ops
        rows, lead = as_rows(x, self.input_width, self.compute_dtype, ops.xp)
        check_fits_in_memory(
            rows.shape[0] * self.output_width * self.compute_dtype.itemsize,
            lambda: f"inference of FFF(depth={self.depth}) on {rows.shape[0]} rows",
        )
        p, n_threads = self._params, effective_n_threads()
        y = ops.fff_infer(rows, p, self.depth, self.activation, n_threads)
        if self.master_leaf:
            y = _master.infer(ops, rows, p, y, self.activation, n_threads)
        return y.reshape(lead + (self.output_width,))

    def _draw_masks(self, rng, n_rows: int):
        """(swap, drop) for one training forward, drawn in this order from `rng`: swap (bool;
        soft (B, n_nodes), hardened (B, depth): one visit per level) where the region leak swaps
        a node's children, as the package's `uniform < region_leak`; drop (B, n_leaves * leaf)
        or (B, leaf), the dropout keep mask scaled by 1 / (1 - dropout). None where off."""
        swap = drop = None
        if self.region_leak > 0:
            n_cols = self.depth if self.train_hardened else self.n_nodes
            swap = rng.random((n_rows, n_cols)) < self.region_leak
        if self.dropout > 0:
            n_cols = self.leaf_width * (1 if self.train_hardened else self.n_leaves)
            keep = rng.random((n_rows, n_cols), dtype=self.dtype) >= self.dropout
            drop = keep.astype(self.dtype)
            drop *= self.dtype.type(1.0 / (1.0 - self.dropout))
        return swap, drop

    def forward_train(self, x, *, rng=None, hardening=0.0, load_balancing=0.0, input_grad=True):
        """Training forward: returns (y, backprop); ``backprop(dy) -> dx`` adds into
        ``layer.grads`` the gradients of ``sum(y * dy) + hardening * mean_entropy +
        load_balancing * balance``. Without input_grad (x is the model's input) backprop
        returns None and leaves out dx's products (on CUDA the hardened kernel still forms
        dx, then drops it).

        Soft (default): every leaf on every row, mixed by path products of the router sigmoids;
        cost of a dense FF of width n_leaves * leaf_width. ``train_hardened``: decisions rounded
        (right iff the sigmoid > 1/2, ties left, as torch.round), only the reached leaf is
        evaluated, O(depth * in + leaf * (in + out)) per row; the rounding passes no gradient to
        the routers (as in the package), which then learn from the hardening term only.

        mean_entropy (``layer.last_mean_entropy``) is the mean Bernoulli entropy of the router
        decisions, as the package computes it (after region leak, clamped at 1e-6): over every
        row and node when soft; over the depth nodes each row visits when hardened (the package
        averages over all nodes there too, which would cost the dense O(n_nodes * in) per row).
        0.0 when there are no decisions (depth 0 or no rows).

        balance (``layer.last_balance_loss``, whatever load_balancing is; fastff._balance and
        fastff.reference's fff_balance): soft, ``n_leaves * sum_l f_l**2`` with f_l the mean
        mixture weight of leaf l over the batch (1.0 when the leaves share the rows evenly, up
        to n_leaves), differentiable through the router sigmoids; hardened, the Switch
        Transformer's ``n_leaves * sum_l f_l * P_l``, f_l the fraction of rows reaching leaf l
        (a count, no gradient), P_l the mean over rows of [row reaches l] times the product of
        the branch weights its path took (after region leak), whose gradient reaches the
        visited routers only. 0.0 for a batch without rows. load_balancing >= 0 (finite).

        rng: NumPy Generator for the region-leak and dropout masks (default: the layer's own
        stream, seeded from ``seed``). Usage counters are updated here.
        """
        self._check_trainable("forward_train")
        hardening = check_nonnegative(hardening, "hardening")
        load_balancing = check_nonnegative(load_balancing, "load_balancing")
        input_grad = check_bool(input_grad, "input_grad")
        if rng is None:
            rng = self._train_rng
        elif not isinstance(rng, np.random.Generator):
            raise TypeError(
                f"rng must be a numpy.random.Generator or None, got {type(rng).__name__}"
            )
        ops = self.ops
        rows, lead = as_rows(x, self.input_width, self.dtype, ops.xp)
        n_rows = rows.shape[0]
        hardened, activation = self.train_hardened, self.activation
        # the master leaf keeps its hidden units (3x) and both outputs of every row
        master_floats = (3 * self.leaf_width + 2 * self.output_width) * self.master_leaf
        if not hardened:  # soft training keeps every leaf's hidden units of every row
            check_fits_in_memory(
                n_rows
                * (
                    4 * self.n_leaves * self.leaf_width
                    + 3 * (self.n_nodes + self.n_leaves)
                    + master_floats
                )
                * self.dtype.itemsize,
                f"soft training of FFF(depth={self.depth}) on {n_rows} rows",
            )
        else:  # y, the path (intp and logits), the leaf, its hidden units, dropout masks
            per_row = (
                (self.output_width + self.depth + 2 * self.leaf_width + 1 + master_floats)
                * self.dtype.itemsize
                + (self.depth + 1) * np.dtype(np.intp).itemsize
                + self.depth
            )
            check_fits_in_memory(
                n_rows * per_row, f"hardened training of FFF(depth={self.depth}) on {n_rows} rows"
            )
        swap, drop = self._draw_masks(rng, n_rows)
        if swap is not None:
            swap = ops.asarray(swap)
        if drop is not None:
            drop = ops.asarray(drop)
        p = self._params
        n_threads = effective_n_threads()
        if hardened:
            y, saved = ops.fff_hard_forward(rows, p, self.depth, activation, n_threads, swap, drop)
            n_decisions = n_rows * self.depth
            balance = _balance.hard_loss(saved, self.n_nodes, self.n_leaves, ops.xp)
        else:
            y, saved = ops.fff_soft_forward(rows, p, activation, n_threads, swap, drop)
            n_decisions = n_rows * self.n_nodes
            balance = _balance.soft_loss(saved["mix"])
        self.last_balance_loss = balance
        master_saved = None
        if self.master_leaf:
            y, master_saved = _master.train_forward(ops, rows, p, y, activation, n_threads)
        self.last_mean_entropy = (
            float(saved["entropy"].sum(dtype=np.float64)) / n_decisions if n_decisions else 0.0
        )
        self._track_usage(saved, hardened)
        entropy_weight = hardening / n_decisions if n_decisions else 0.0
        version, device, out_shape = self._version, self.device, lead + (self.output_width,)
        rows = keep_for_backward(rows, x)

        @run_once
        def backprop(dy):
            """dy (..., output_width), the shape of y -> dx (..., input_width); adds the
            parameter gradients into layer.grads."""
            dy_rows, g = self._backprop_inputs(dy, version, device, lead, self.output_width)
            n_threads = effective_n_threads()
            dx_master = None
            if master_saved is not None:  # dy_rows becomes the tree's share of dy
                dy_rows, dx_master = _master.backward(
                    ops, rows, dy_rows, p, g, master_saved, activation, n_threads, input_grad
                )
            backward = ops.fff_hard_backward if hardened else ops.fff_soft_backward
            dx = backward(
                rows,
                dy_rows,
                p,
                saved,
                activation,
                entropy_weight,
                g,
                n_threads,
                load_balancing,
                need_dx=input_grad,
            )
            if dx is None:
                return None
            if dx_master is not None:
                dx += dx_master
            return dx.reshape(lead + (self.input_width,))

        return y.reshape(out_shape), backprop


def usage_increments(saved, hardened: bool, usage_mode: str, n_nodes: int, n_leaves: int, xp):
    """What one training forward adds to FFF's usage counters (see FFF): (node (n_nodes,), leaf
    (n_leaves,)) from the forward's saved arrays. Shared with fastff.torch.FFF."""
    if hardened:  # rounded decisions: "soft" and "hard" both count visits
        node = xp.bincount(saved["path"].reshape(-1), minlength=n_nodes)
        return node, xp.bincount(saved["leaf"], minlength=n_leaves)
    if usage_mode == "soft":
        reach = saved["reach"]
        node = reach[:, :n_nodes].sum(axis=0, dtype=np.float64)
        return node, reach[:, n_nodes:].sum(axis=0, dtype=np.float64)
    # "hard": the rounded path of each row (right iff q > 1/2), though training is soft
    q = saved["q"]
    rows = xp.arange(q.shape[0])
    at = xp.zeros(q.shape[0], dtype=np.intp)
    node = xp.zeros(n_nodes, dtype=np.float64)
    for _ in range(n_leaves.bit_length() - 1):  # depth levels
        node += xp.bincount(at, minlength=n_nodes)
        at = 2 * at + 1 + (q[rows, at] > 0.5)
    return node, xp.bincount(at - n_nodes, minlength=n_leaves)
