"""UltraFFF (neuron tree): CPU kernels against fastff.reference, inputs, state dicts, errors."""

import itertools

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import fastff
from fastff import reference as R

from conftest import assert_close, dyadic, dyadic_state

DTYPES = [np.float32, np.float64]
ACTS = ["gelu", "relu", "identity"]


def ref_forward(layer, x, state):
    return R.ultra_forward(
        np.asarray(x, np.float64), state, layer.depth, layer.parallel_size, layer.activation
    )


@given(
    in_w=st.integers(1, 300),
    out_w=st.integers(1, 300),
    depth=st.integers(0, 10),
    trees=st.integers(1, 4),
    batch=st.integers(0, 300),
    dtype=st.sampled_from(DTYPES),
    act=st.sampled_from(ACTS),
    seed=st.integers(0, 2**32 - 1),
)
def test_inference_matches_reference(in_w, out_w, depth, trees, batch, dtype, act, seed):
    # keep the O(width) reference affordable: depth 10 only with small batches/trees
    batch = min(batch, max(1, 200_000 // (trees * 2 ** (depth + 1))))
    rng = np.random.default_rng(seed)
    layer = fastff.UltraFFF(in_w, out_w, depth, trees, act, dtype=dtype, seed=seed)
    state = dyadic_state(layer, rng)
    x = dyadic(rng, (batch, in_w), denom=8)
    y = layer(x)
    assert y.dtype == dtype and y.shape == (batch, out_w)
    y_ref, _ = ref_forward(layer, x, state)
    assert_close(y, y_ref, dtype, trees * (depth + 1) * in_w, "y")


@pytest.mark.parametrize("dtype", DTYPES)
def test_continuous_data_relative_error(dtype):
    """Ordinary Gaussian data at the ufb shape scaled down: rel. error per unit scale."""
    rng = np.random.default_rng(0)
    layer = fastff.UltraFFF(96, 64, 7, 2, dtype=dtype, seed=3)
    x = rng.standard_normal((500, 96)).astype(dtype)
    state = {k: v.astype(np.float64) for k, v in layer.state_dict().items()}
    y_ref, (_, z, mask) = ref_forward(layer, x, state)
    # exclude rows whose float64 path passes within rounding distance of a decision boundary
    margin = 1e-4 if dtype == np.float32 else 1e-12
    safe = ~((np.abs(z) < margin) & (mask > 0)).any(axis=1)
    assert safe.mean() > 0.95
    err = np.abs(layer(x)[safe] - y_ref[safe]).max() / np.abs(y_ref).max()
    assert err < (1e-5 if dtype == np.float32 else 1e-12)


def test_hand_computed_case():
    layer = fastff.UltraFFF(2, 1, 1, activation="identity", dtype=np.float64)
    layer.load_state_dict(
        {
            "linear_in.weight": np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]),
            "linear_in.bias": np.array([0.0, 0.5, -1.0]),
            "linear_out.weight": np.array([[2.0, 3.0, 5.0]]),
        }
    )
    # x=(1,2): root z=1>0 -> right child 2: z=1+2-1=2. y = 2*1 + 5*2 = 12
    # x=(-1,2): root z=-1 -> left child 1: z=2.5. y = 2*(-1) + 3*2.5 = 5.5
    # x=(0,7): root z=0 is not > 0 -> left: z=7.5. y = 0 + 22.5
    np.testing.assert_array_equal(layer([[1, 2], [-1, 2], [0, 7]]), [[12.0], [5.5], [22.5]])


@pytest.mark.parametrize("act", ACTS)
def test_relu_gelu_identity_hand_values(act):
    layer = fastff.UltraFFF(1, 1, 0, activation=act, dtype=np.float64)
    layer.load_state_dict(
        {
            "linear_in.weight": np.array([[1.0]]),
            "linear_in.bias": np.array([0.0]),
            "linear_out.weight": np.array([[1.0]]),
        }
    )
    z = np.array([[-1.5], [0.0], [0.7]])
    expected = {
        "identity": z,
        "relu": np.maximum(z, 0),
        "gelu": z * 0.5 * (1 + np.vectorize(__import__("math").erf)(z / np.sqrt(2))),
    }[act]
    np.testing.assert_allclose(layer(z), expected, rtol=1e-15, atol=1e-15)


@pytest.mark.parametrize("dtype", DTYPES)
def test_relu_propagates_nan_and_zeroes_negatives(dtype):
    """relu is maxss/maxsd with the pre-activation second: NaN stays NaN (as np.maximum), and
    -inf, negatives and -0.0 give 0."""
    layer = fastff.UltraFFF(1, 1, 0, activation="relu", dtype=dtype)
    layer.load_state_dict(
        {
            "linear_in.weight": np.array([[1.0]]),
            "linear_in.bias": np.array([0.0]),
            "linear_out.weight": np.array([[1.0]]),
        }
    )
    z = np.array([[np.nan], [-np.inf], [-2.0], [-0.0], [0.0], [3.0], [np.inf]], dtype=dtype)
    y = layer(z)
    np.testing.assert_array_equal(y, np.maximum(z, 0))  # -0.0 == 0.0 here
    assert np.isnan(y[0, 0]) and y[6, 0] == np.inf


def test_leading_dims_and_single_row(rng):
    layer = fastff.UltraFFF(5, 3, 3, 2, seed=0)
    x = rng.standard_normal((2, 4, 5)).astype(np.float32)
    y = layer(x)
    assert y.shape == (2, 4, 3)
    np.testing.assert_array_equal(y.reshape(8, 3), layer(x.reshape(8, 5)))
    np.testing.assert_array_equal(layer(x[0, 0]), y[0, 0])
    assert layer(np.zeros((0, 5))).shape == (0, 3)
    assert layer(np.zeros((3, 0, 5))).shape == (3, 0, 3)


def test_layouts_lists_and_casts(rng):
    layer = fastff.UltraFFF(6, 4, 4, seed=1)
    x = rng.standard_normal((7, 6))
    y = layer(x)
    assert y.dtype == np.float32
    np.testing.assert_array_equal(layer(np.asfortranarray(x)), y)
    np.testing.assert_array_equal(layer(np.ascontiguousarray(x.T).T), y)
    wide = np.zeros((7, 12))
    wide[:, ::2] = x
    np.testing.assert_array_equal(layer(wide[:, ::2]), y)
    np.testing.assert_array_equal(layer(x[::-1])[::-1], y)
    np.testing.assert_array_equal(layer(x.tolist()), y)
    np.testing.assert_array_equal(layer(x.astype(np.float32)), y)
    ints = rng.integers(-3, 4, (5, 6))
    np.testing.assert_array_equal(layer(ints), layer(ints.astype(np.float32)))
    ro = x.copy()
    ro.flags.writeable = False
    np.testing.assert_array_equal(layer(ro), y)


@pytest.mark.parametrize(
    "bad, exc, words",
    [
        (np.zeros((3, 5)), ValueError, "(..., 6)"),
        (np.float32(1.0), ValueError, "0-d"),
        (np.zeros((3, 6), complex), TypeError, "complex"),
        (np.array([["a"] * 6]), TypeError, "dtype"),
        (np.zeros((3, 6), bool), TypeError, "bool"),
        ([[1, 2], [3]], ValueError, "(..., 6)"),
        ({"x": 1}, TypeError, "dtype"),
    ],
)
def test_bad_inputs(bad, exc, words):
    layer = fastff.UltraFFF(6, 4, 2)
    with pytest.raises(exc) as info:
        layer(bad)
    assert words in str(info.value)


@pytest.mark.parametrize(
    "kwargs, exc, words",
    [
        (dict(input_width=0), ValueError, "input_width"),
        (dict(output_width=-3), ValueError, "output_width"),
        (dict(depth=-1), ValueError, "depth"),
        (dict(parallel_size=0), ValueError, "parallel_size"),
        (dict(depth=2.5), TypeError, "depth"),
        (dict(input_width=True), TypeError, "input_width"),
        (dict(activation="tanh"), ValueError, "activation"),
        (dict(dtype=np.int32), TypeError, "dtype"),
        (dict(depth=40), MemoryError, "bytes"),
    ],
)
def test_constructor_errors(kwargs, exc, words):
    args = dict(input_width=8, output_width=8, depth=3)
    args.update(kwargs)
    with pytest.raises(exc, match=words):
        fastff.UltraFFF(**args)


def test_init_distribution_and_seed():
    a = fastff.UltraFFF(64, 32, 5, 2, seed=7).state_dict()
    b = fastff.UltraFFF(64, 32, 5, 2, seed=7).state_dict()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert a["linear_in.weight"].shape == (2 * 63, 64)
    assert a["linear_in.bias"].shape == (126,)
    assert a["linear_out.weight"].shape == (32, 126)
    assert np.abs(a["linear_in.weight"]).max() <= 1 / 8
    assert np.abs(a["linear_out.weight"]).max() <= (1 / 12) ** 0.5
    assert np.abs(a["linear_in.weight"]).max() > 0.9 / 8  # really spans the range


def test_state_dict_round_trip_and_atomic_errors(rng):
    layer = fastff.UltraFFF(4, 3, 2, seed=0)
    state = layer.state_dict()
    assert all(v.flags.c_contiguous for v in state.values())
    other = fastff.UltraFFF(4, 3, 2, seed=1)
    other.load_state_dict(state)
    x = rng.standard_normal((9, 4))
    np.testing.assert_array_equal(other(x), layer(x))
    before = other.state_dict()
    bad_cases = [
        ({k: v for k, v in state.items() if k != "linear_in.bias"}, ValueError, "missing"),
        ({**state, "extra": np.zeros(1)}, ValueError, "unexpected"),
        ({**state, "linear_out.weight": np.zeros((7, 3))}, ValueError, "shape"),
        ({**state, "linear_in.bias": np.full(7, 1e300)}, ValueError, "range"),
        ({**state, "linear_in.bias": np.array(["a"] * 7)}, TypeError, "numeric"),
    ]
    for bad, exc, words in bad_cases:
        with pytest.raises(exc, match=words):
            other.load_state_dict(bad)
        for k in before:  # nothing already stored is lost
            np.testing.assert_array_equal(other.state_dict()[k], before[k])


def test_nan_propagates_and_routes_left():
    layer = fastff.UltraFFF(2, 1, 1, activation="identity", dtype=np.float64)
    layer.load_state_dict(
        {
            "linear_in.weight": np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 2.0]]),
            "linear_in.bias": np.zeros(3),
            "linear_out.weight": np.ones((1, 3)),
        }
    )
    y, backprop = layer.forward_train(np.array([[np.nan, 1.0]]))
    assert np.isnan(y).all()
    backprop(np.ones((1, 1)))
    g = layer.grads["linear_in.bias"]
    assert g[2] == 0 and g[1] == 1  # NaN at the root is not > 0: the row went left (node 1)


def test_threads_api():
    n = fastff.get_num_threads()
    try:
        fastff.set_num_threads(1)
        assert fastff.get_num_threads() == 1
    finally:
        fastff.set_num_threads(n)
    with pytest.raises(ValueError):
        fastff.set_num_threads(0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("activation", ACTS)
def test_large_batches_take_the_subtree_path_with_the_same_bits(activation, dtype, subtree_bytes):
    """Batches big enough to be regrouped by subtree (fastff._cmm._subtree_split) give bitwise
    the results of small batches walked row by row, and match the reference. The top walks
    hand their terms to the subtree walks, which write y once per row; a second tree adds."""
    from fastff import _cmm

    subtree_bytes(1 << 18)
    layer = fastff.UltraFFF(300, 200, 9, 2, activation, dtype=dtype, seed=4)
    rng = np.random.default_rng(4)
    state = dyadic_state(layer, rng)
    x = dyadic(rng, (2000, 300), denom=8).astype(dtype)
    itemsize = np.dtype(dtype).itemsize
    assert _cmm._subtree_split(2000, 9, 300, 200, itemsize) < 10  # regrouped
    assert _cmm._subtree_split(4, 9, 300, 200, itemsize) == 10  # not regrouped
    y = layer(x)
    np.testing.assert_array_equal(
        y, np.concatenate([layer(x[i : i + 4]) for i in range(0, 2000, 4)])
    )
    y_train, backprop = layer.forward_train(x)
    np.testing.assert_array_equal(y_train, y)
    y_ref, cache = R.ultra_forward(x, state, 9, 2, activation)
    assert_close(y, y_ref, dtype, 20 * 300, "y")
    dy = dyadic(rng, (2000, 200), denom=8).astype(dtype)
    dx = backprop(dy)
    dx_ref, grads_ref = R.ultra_backward(dy, cache, state, activation)
    assert_close(dx, dx_ref, dtype, 20 * 2000, "dx")
    for key, g in layer.grads.items():
        assert_close(g, grads_ref[key], dtype, 20 * 2000, key)


@pytest.mark.parametrize("itemsize", [2, 4, 8])
@pytest.mark.parametrize("depth", [2, 4, 6, 8, 11, 20])
def test_subtree_split_sizes_subtrees_to_the_cache(depth, itemsize, subtree_bytes):
    """Below the split level a subtree's weights fit in _subtree_bytes() (half this CPU's L2)
    and one level more would not; a batch too small for that many subtrees (under 16 rows
    each) splits higher, with larger subtrees; fewer than 8 subtrees are not worth regrouping."""
    from fastff import _cmm

    assert 1 << 16 <= _cmm._subtree_bytes() <= 1 << 20  # half this CPU's L2, bounded
    node_bytes = (768 + 768) * itemsize
    for budget, n_rows in itertools.product(
        (_cmm._subtree_bytes(), 1 << 17, 1 << 20), (1 << 18, 1 << 9)
    ):
        subtree_bytes(budget)
        split = _cmm._subtree_split(n_rows, depth, 768, 768, itemsize)
        tree_bytes = ((1 << (depth + 1 - split)) - 1) * node_bytes
        if split > depth:  # not regrouped: 4 subtrees would fit, or too few rows for 8
            assert depth < 3 or (
                ((1 << (depth - 1)) - 1) * node_bytes <= budget or (n_rows >> 3) < 16
            )
        else:  # the largest subtrees that fit, or larger where rows are too few for more
            assert split >= 3 and (n_rows >> split) >= 16
            fits = tree_bytes <= budget < 2 * tree_bytes + node_bytes
            assert fits or (tree_bytes > budget and (n_rows >> (split + 1)) < 16)
    with pytest.raises(ValueError, match="at least 1 byte"):
        subtree_bytes(0)
    few_rows = _cmm._subtree_split(64, depth, 768, 768, itemsize)
    assert few_rows == depth + 1 or (64 >> few_rows) >= 16


@pytest.mark.parametrize("n_rows, depth, n_trees", [(2000, 9, 1), (2000, 9, 2), (7, 3, 2)])
def test_kernels_write_every_output_row_whatever_it_held(n_rows, depth, n_trees, subtree_bytes):
    """The forward overwrites y (its first tree's sums start from zero; rows regrouped by
    subtree are written by their subtree walk only) and the backward overwrites dx: arrays
    that start as NaN come out equal to fresh ones, relu rows without a nonzero term
    included, on the regrouped path (2000 rows) and the row-by-row one (7 rows)."""
    from fastff import _cmm
    from fastff.ops import ACTIVATIONS

    subtree_bytes(1 << 18)
    layer = fastff.UltraFFF(300, 200, depth, n_trees, "relu", seed=5)
    rng = np.random.default_rng(5)
    x = rng.standard_normal((n_rows, 300)).astype(np.float32)
    x[0] = 0  # every pre-activation is the bias: make it negative, so row 0 has no terms
    layer.load_state_dict({**layer.state_dict(), "linear_in.bias": -np.ones(layer.training_width)})
    assert (_cmm._subtree_split(n_rows, depth, 300, 200, 4) <= depth) == (n_rows > 100)
    p = layer._params
    path = n_trees * (depth + 1)
    y = np.full((n_rows, 200), np.nan, np.float32)
    visited = np.empty((n_rows, path), np.intp)
    preact = np.empty((n_rows, path), np.float32)
    args = (p["w_in"], p["b_in"], p["w_out_t"], depth, n_trees, ACTIVATIONS["relu"])
    _cmm.ultra_forward(x, *args, y, visited, preact, True, 1)
    y_ref, backprop = layer.forward_train(x)
    np.testing.assert_array_equal(y, y_ref)
    assert not y[0].any()
    dy = rng.standard_normal((n_rows, 200)).astype(np.float32)
    dx = np.full_like(x, np.nan)
    grads = [np.zeros_like(p["w_in"]), np.zeros_like(p["b_in"]), np.zeros_like(p["w_out_t"])]
    _cmm.ultra_backward(
        x, dy, p["w_in"], p["w_out_t"], visited, preact, ACTIVATIONS["relu"], dx, *grads, 1
    )
    np.testing.assert_array_equal(dx, backprop(dy))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("n_rows", [1, 7, 3000])
def test_a_walk_split_at_a_level_adds_up_to_the_same_bits(n_rows, act, dtype):
    """ultra_forward(..., y=y) adds into y, each row's sum going on from y's value in path
    order: walking the top 3 levels (a tree of their own), then with each row's subtree as a
    tree of its own, gives bitwise the one walk (what fastff.distributed's shards rely on),
    on the regrouped path (3000 rows) and the row-by-row one. Without y, y is new."""
    from fastff.backends import get_ops

    ops, depth, top = get_ops("cpu"), 9, 3
    layer = fastff.UltraFFF(40, 24, depth, activation=act, dtype=dtype, seed=1)
    x = np.random.default_rng(2).standard_normal((n_rows, 40)).astype(dtype)
    p, n_top = layer._params, 2**top - 1
    y, visited, preact = ops.ultra_forward(
        x, {k: v[:n_top] for k, v in p.items()}, top - 1, 1, act, True, 2
    )
    subtree = 2 * visited[:, -1] + 1 + (preact[:, -1] > 0) - n_top
    for j in np.unique(subtree):
        rows = np.flatnonzero(subtree == j)
        nodes = np.concatenate(
            [2**lv - 1 + j * 2 ** (lv - top) + np.arange(2 ** (lv - top)) for lv in range(top, 10)]
        )
        part = np.ascontiguousarray(y[rows])
        out, _, _ = ops.ultra_forward(
            np.ascontiguousarray(x[rows]),
            {k: np.ascontiguousarray(v[nodes]) for k, v in p.items()},
            depth - top,
            1,
            act,
            False,
            2,
            y=part,
        )
        assert out is part
        y[rows] = part
    np.testing.assert_array_equal(y, layer(x))


def test_cpu_layout_is_one_record_per_node_and_survives_updates(rng):
    """On the CPU a node's input and output weights share one contiguous record; the anchor
    views, optimizer steps and load_state_dict write into it, and results equal those of the
    same weights held as two separate arrays."""
    from fastff.backends import get_ops
    from fastff.optim import SGD

    layer = fastff.UltraFFF(6, 5, 3, 2, "gelu", seed=2)
    p = layer._params

    def assert_records():
        w_in, w_out_t = p["w_in"], p["w_out_t"]
        assert w_in.strides == w_out_t.strides == (11 * 4, 4)
        assert w_out_t.ctypes.data == w_in.ctypes.data + 6 * 4
        assert w_in.ctypes.data % 64 == 0

    assert_records()
    x = rng.standard_normal((40, 6)).astype(np.float32)
    y, backprop = layer.forward_train(x)
    backprop(np.ones_like(y))
    SGD(layer, lr=0.1).step()
    layer.load_state_dict({**layer.state_dict(), "linear_in.bias": np.zeros(30)})
    assert_records()  # still views of the records
    separate = {k: np.ascontiguousarray(v) for k, v in p.items()}
    assert separate["w_in"].base is None
    ops = get_ops("cpu")
    for save_path in (False, True):
        args = (layer.depth, layer.parallel_size, layer.activation, save_path, 2)
        got = ops.ultra_forward(x, p, *args)
        want = ops.ultra_forward(x, separate, *args)
        for a, b in zip(got, want):
            np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(
        layer(x),
        ops.ultra_forward(x, separate, 3, 2, "gelu", False, 2)[0],
    )


def test_device_hook_rebuilds_the_records():
    """What to("cpu") does after copying contiguous arrays back: the records are rebuilt with
    the same values (the GPU side, tested on a GPU, keeps separate contiguous arrays)."""
    from fastff.backends import get_ops

    layer = fastff.UltraFFF(4, 3, 2, seed=5)
    before = layer.state_dict()
    layer._params = {k: np.array(v, order="C") for k, v in layer._params.items()}
    assert layer._params["w_in"].base is None
    layer._on_device_change(get_ops("cpu"))
    w_in, w_out_t = layer._params["w_in"], layer._params["w_out_t"]
    assert w_out_t.ctypes.data == w_in.ctypes.data + 4 * 4 and w_in.strides[0] == 7 * 4
    for k, v in layer.state_dict().items():
        np.testing.assert_array_equal(v, before[k])


def test_kernels_reject_weights_whose_rows_are_not_contiguous(rng):
    from fastff import _cmm

    w = rng.standard_normal((7, 8)).astype(np.float32)
    b = np.zeros(7, np.float32)
    x = rng.standard_normal((3, 4)).astype(np.float32)
    y = np.empty((3, 4), np.float32)
    no_path = (np.empty((0, 0), np.intp), np.empty((0, 0), np.float32), False)
    with pytest.raises(ValueError, match="rows of w_in and w_out_t must be contiguous"):
        _cmm.ultra_forward(x, w[:, ::2], b, w[:, :4], 2, 1, 0, y, *no_path, 1)
    with pytest.raises(ValueError, match="rows of w_in and w_out_t must be contiguous"):
        _cmm.ultra_forward(x, w[:, :4], b, w[:, 1::2], 2, 1, 0, y, *no_path, 1)
    visited = np.zeros((3, 3), np.intp)
    preact = np.zeros((3, 3), np.float32)
    grads = (np.zeros((7, 4), np.float32), np.zeros(7, np.float32), np.zeros((7, 4), np.float32))
    with pytest.raises(ValueError, match="rows of w_in and w_out_t must be contiguous"):
        _cmm.ultra_backward(
            x, y, w[:, ::2], w[:, :4], visited, preact, 0, np.empty_like(x), *grads, 1
        )


# ---- training: hard-path gradients --------------------------------------------------------


@given(
    in_w=st.integers(1, 120),
    out_w=st.integers(1, 120),
    depth=st.integers(0, 8),
    trees=st.integers(1, 3),
    batch=st.integers(0, 200),
    dtype=st.sampled_from(DTYPES),
    act=st.sampled_from(ACTS),
    seed=st.integers(0, 2**32 - 1),
)
def test_gradients_match_reference(in_w, out_w, depth, trees, batch, dtype, act, seed):
    rng = np.random.default_rng(seed)
    layer = fastff.UltraFFF(in_w, out_w, depth, trees, act, dtype=dtype, seed=seed)
    state = dyadic_state(layer, rng)
    x = dyadic(rng, (batch, in_w), denom=8)
    dy = dyadic(rng, (batch, out_w), denom=8)
    y, backprop = layer.forward_train(x)
    dx = backprop(dy)
    y_ref, cache = R.ultra_forward(x, state, depth, trees, act)
    dx_ref, grads_ref = R.ultra_backward(dy, cache, state, act)
    terms = max(in_w, out_w, batch) * trees * (depth + 1)
    assert_close(y, y_ref, dtype, terms, "y")
    assert dx.dtype == dtype and dx.shape == x.shape
    assert_close(dx, dx_ref, dtype, terms, "dx")
    assert set(layer.grads) == set(grads_ref)
    for key, g in layer.grads.items():
        assert g.shape == grads_ref[key].shape
        assert_close(g, grads_ref[key], dtype, terms, key)


@given(
    in_w=st.integers(1, 60),
    out_w=st.integers(1, 60),
    depth=st.integers(0, 7),
    trees=st.integers(1, 3),
    batch=st.integers(0, 150),
    dtype=st.sampled_from(DTYPES),
    act=st.sampled_from(ACTS),
    seed=st.integers(0, 2**32 - 1),
)
def test_backward_without_dx_gives_the_same_gradients(
    in_w, out_w, depth, trees, batch, dtype, act, seed
):
    # need_dx=False (an input that needs no gradient) skips the dx pass in the CPU kernel: the
    # parameter gradients must be bitwise those of the full backward
    rng = np.random.default_rng(seed)
    layer = fastff.UltraFFF(in_w, out_w, depth, trees, act, dtype=dtype, seed=seed)
    ops, p = layer.ops, layer._params
    x = rng.standard_normal((batch, in_w)).astype(dtype)
    dy = rng.standard_normal((batch, out_w)).astype(dtype)
    _, visited, preact = ops.ultra_forward(x, p, depth, trees, act, True, 2)
    grads = []
    for need_dx in (True, False):
        g = {k: np.zeros_like(v) for k, v in p.items()}
        dx = ops.ultra_backward(x, dy, p, g, visited, preact, act, 2, need_dx)
        assert (dx is None) == (not need_dx)
        grads.append(g)
    for key in p:
        np.testing.assert_array_equal(grads[1][key], grads[0][key], err_msg=key)
    if batch >= 2:  # a dx of rows other than 0 or the batch's is refused, not half-filled
        g = {k: np.zeros_like(v) for k, v in p.items()}
        bad = np.empty((1, in_w), dtype)
        args = (p["w_in"], p["w_out_t"], visited, preact, fastff.ops.ACTIVATIONS[act], bad)
        with pytest.raises(ValueError, match="row counts"):
            ops.cmm.ultra_backward(x, dy, *args, g["w_in"], g["b_in"], g["w_out_t"], 1)


@pytest.mark.parametrize("act", ACTS)
def test_reference_gradients_match_finite_differences(act):
    """The reference backward is the derivative of the reference forward (routing held fixed,
    which finite steps far smaller than every |z| do not change)."""
    rng = np.random.default_rng(7)
    depth, trees, in_w, out_w = 3, 2, 5, 4
    layer = fastff.UltraFFF(in_w, out_w, depth, trees, act, dtype=np.float64, seed=7)
    state = {k: v.astype(np.float64) for k, v in layer.state_dict().items()}
    x = rng.standard_normal((6, in_w))
    dy = rng.standard_normal((6, out_w))
    _, cache = R.ultra_forward(x, state, depth, trees, act)
    assert np.abs(cache[1]).min() > 1e-4  # no decision within reach of the finite step
    dx, grads = R.ultra_backward(dy, cache, state, act)

    def objective(x_, state_):
        return float((R.ultra_forward(x_, state_, depth, trees, act)[0] * dy).sum())

    eps = 1e-7
    numeric_dx = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        xp, xm = x.copy(), x.copy()
        xp[idx] += eps
        xm[idx] -= eps
        numeric_dx[idx] = (objective(xp, state) - objective(xm, state)) / (2 * eps)
    np.testing.assert_allclose(dx, numeric_dx, rtol=1e-6, atol=1e-7)
    for key, value in state.items():
        numeric = np.zeros_like(value)
        for idx in np.ndindex(value.shape):
            sp = {**state, key: value.copy()}
            sm = {**state, key: value.copy()}
            sp[key][idx] += eps
            sm[key][idx] -= eps
            numeric[idx] = (objective(x, sp) - objective(x, sm)) / (2 * eps)
        np.testing.assert_allclose(grads[key], numeric, rtol=1e-6, atol=1e-7, err_msg=key)


def test_gradients_are_bitwise_reproducible_and_thread_count_independent():
    rng = np.random.default_rng(3)
    layer = fastff.UltraFFF(96, 80, 7, 2, seed=3)
    x = rng.standard_normal((1000, 96)).astype(np.float32)
    dy = rng.standard_normal((1000, 80)).astype(np.float32)
    n = fastff.get_num_threads()
    runs = []
    try:
        for threads in (n, n, 1, 2):
            fastff.set_num_threads(threads)
            layer.zero_grad()
            _, backprop = layer.forward_train(x)
            runs.append((backprop(dy), {k: v.copy() for k, v in layer.grads.items()}))
    finally:
        fastff.set_num_threads(n)
    for dx, grads in runs[1:]:
        np.testing.assert_array_equal(dx, runs[0][0])
        for k in grads:
            np.testing.assert_array_equal(grads[k], runs[0][1][k])


def test_backprop_errors_and_accumulation(rng):
    layer = fastff.UltraFFF(6, 4, 2, seed=0)
    x = rng.standard_normal((5, 6))
    _, backprop = layer.forward_train(x)
    with pytest.raises(ValueError, match=r"dy must have shape \(\.\.\., 4\)"):
        backprop(np.ones((5, 3)))
    with pytest.raises(ValueError, match="shape of y"):
        backprop(np.ones((4, 4)))
    backprop(np.ones((5, 4)))
    once = {k: v.copy() for k, v in layer.grads.items()}
    with pytest.raises(RuntimeError, match="already ran"):  # would add the gradients twice
        backprop(np.ones((5, 4)))
    _, backprop = layer.forward_train(x)  # a second pass accumulates
    backprop(np.ones((5, 4)))
    for k, v in layer.grads.items():
        np.testing.assert_allclose(v, 2 * once[k], rtol=1e-6)
    layer.zero_grad()
    assert all((v == 0).all() for v in layer.grads.values())
    _, backprop = layer.forward_train(x)
    layer.load_state_dict(layer.state_dict())
    with pytest.raises(RuntimeError, match="stale"):
        backprop(np.ones((5, 4)))


@pytest.mark.parametrize(
    "n_trees, depth, n_rows, threads", [(1, 11, 4096, 2), (2, 4, 50, 1), (3, 0, 9, 2)]
)
def test_gradient_pass_schedule_covers_each_visited_node_once(
    n_trees, depth, n_rows, threads, subtree_bytes
):
    """_backward_schedule hands every visited node to exactly one task, and a task of several
    nodes is one subtree, level by level (each node's parent precedes it in the task)."""
    from fastff import _cmm

    subtree_bytes(1 << 18)  # the same tasks on any CPU

    n_nodes = (1 << (depth + 1)) - 1
    counts = np.zeros(n_trees * n_nodes, np.intp)  # visits of n_rows random root-to-leaf walks
    rng = np.random.default_rng(depth)
    for t in range(n_trees):
        node = np.zeros(n_rows, np.intp)
        for _ in range(depth + 1):
            np.add.at(counts, t * n_nodes + node, 1)
            node = 2 * node + 1 + rng.integers(0, 2, n_rows)
    nodes, tasks = _cmm._backward_schedule(
        counts, n_trees * (depth + 1), n_trees * n_nodes, n_rows, 6144, threads
    )
    assert sorted(nodes.tolist()) == np.flatnonzero(counts).tolist()
    assert tasks[0] == 0 and tasks[-1] == len(nodes) and np.all(np.diff(tasks) > 0)
    for k in range(len(tasks) - 1):
        task = nodes[tasks[k] : tasks[k + 1]].tolist()
        trees = {g // n_nodes for g in task}
        assert len(trees) == 1
        local = [g % n_nodes for g in task]
        for g in local[1:]:  # below the task's first node, level by level
            ancestor = g
            while ancestor > local[0]:
                ancestor = (ancestor - 1) // 2
            assert ancestor == local[0]
        levels = [int(np.log2(g + 1)) for g in local]
        assert levels == sorted(levels)
    # arrays not shaped like a forest keep one task per node
    nodes, tasks = _cmm._backward_schedule(np.array([0, 2, 1]), 5, 3, 10, 8, 1)
    assert nodes.tolist() == [1, 2] and tasks.tolist() == [0, 1, 2]


# ---- training: load balancing (issue 23) ------------------------------------------------------


@given(
    in_w=st.integers(1, 60),
    out_w=st.integers(1, 40),
    depth=st.integers(0, 6),
    trees=st.integers(1, 3),
    batch=st.integers(0, 150),
    dtype=st.sampled_from(DTYPES),
    balancing=st.sampled_from([0.3, 2.0, 50.0]),
    need_dx=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_balanced_gradients_match_reference(
    in_w, out_w, depth, trees, batch, dtype, balancing, need_dx, seed
):
    rng = np.random.default_rng(seed)
    layer = fastff.UltraFFF(in_w, out_w, depth, trees, "gelu", dtype=dtype, seed=seed)
    state = dyadic_state(layer, rng)
    x = dyadic(rng, (batch, in_w), denom=8)
    dy = dyadic(rng, (batch, out_w), denom=8)
    y, backprop = layer.forward_train(x, load_balancing=balancing, input_grad=need_dx)
    dx = backprop(dy)
    _, cache = R.ultra_forward(x, state, depth, trees, "gelu")
    loss, _ = R.ultra_balance(cache[1], depth, trees)
    dx_ref, grads_ref = R.ultra_backward(dy, cache, state, "gelu", balancing, depth, trees)
    terms = max(in_w, out_w, batch) * trees * (depth + 1)
    assert layer.last_balance_loss == pytest.approx(
        loss, rel=1e-5 if dtype == np.float32 else 1e-12
    )
    if need_dx:
        assert_close(dx, dx_ref, dtype, terms * 16, "dx")
    else:
        assert dx is None
    for key, g in layer.grads.items():  # the sigmoid's rounding: a wider margin than the path's
        assert_close(g, grads_ref[key], dtype, terms * 16, key)


def test_reference_balance_matches_finite_differences_and_a_hand_value():
    """ultra_balance's gradient is the derivative of its loss (routing held fixed), and a
    depth-1 tree's loss is n_leaves * sum_l f_l * P_l by hand."""
    rng = np.random.default_rng(5)
    depth, trees = 3, 2
    z = rng.standard_normal((40, trees * (2 ** (depth + 1) - 1)))
    assert np.abs(z).min() > 1e-5
    loss, dz = R.ultra_balance(z, depth, trees)
    eps = 1e-7
    for idx in np.ndindex(z.shape):
        zp, zm = z.copy(), z.copy()
        zp[idx] += eps
        zm[idx] -= eps
        numeric = (R.ultra_balance(zp, depth, trees)[0] - R.ultra_balance(zm, depth, trees)[0]) / (
            2 * eps
        )
        assert dz[idx] == pytest.approx(numeric, rel=1e-5, abs=1e-9), idx
    # one tree of depth 1: rows 0, 1 go right (z = 2, 1), row 2 left (z = -3)
    z = np.array([[2.0, 0, 0], [1.0, 0, 0], [-3.0, 0, 0]])
    sig = lambda v: 1 / (1 + np.exp(-v))  # noqa: E731
    f = np.array([1 / 3, 2 / 3])
    big_p = np.array([1 - sig(-3.0), sig(2.0) + sig(1.0)]) / 3
    assert R.ultra_balance(z, 1, 1)[0] == pytest.approx(2 * (f * big_p).sum())
    assert R.ultra_balance(np.zeros((0, 3)), 1, 1)[0] == 0.0


def test_balancing_zero_changes_nothing_and_keeps_no_loss(rng):
    layer = fastff.UltraFFF(12, 5, 4, 2, seed=4)
    x = rng.standard_normal((70, 12)).astype(np.float32)
    dy = rng.standard_normal((70, 5)).astype(np.float32)
    results = []
    for kwargs in ({}, {"load_balancing": 0.0}, {"load_balancing": 1.5}):
        layer.zero_grad()
        y, backprop = layer.forward_train(x, **kwargs)
        results.append((y, backprop(dy), {k: v.copy() for k, v in layer.grads.items()}))
        assert (layer.last_balance_loss is None) == (not kwargs.get("load_balancing"))
    np.testing.assert_array_equal(results[1][0], results[0][0])
    np.testing.assert_array_equal(results[1][1], results[0][1])
    np.testing.assert_array_equal(results[2][0], results[0][0])  # the output does not change
    for key in layer.grads:
        np.testing.assert_array_equal(results[1][2][key], results[0][2][key])
        # the term reaches the routing neurons' input weights and biases, and dx, only
        changed = not np.array_equal(results[2][2][key], results[0][2][key])
        assert changed == (key != "linear_out.weight"), key
    assert not np.array_equal(results[2][1], results[0][1])


def test_balancing_spreads_a_collapsed_tree():
    """Routing neurons that send nearly every row down the right edge, trained on the balancing
    term alone (dy = 0): the routes spread out."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((512, 8))
    layer = fastff.UltraFFF(8, 2, 3, 2, dtype=np.float64, seed=1)
    layer.params["linear_in.bias"][...] = 2.0
    opt = fastff.optim.SGD(layer, lr=0.5)
    before = layer.routing_stats(x)
    assert before["leaf_counts"][:, -1].min() > 0.8 * len(x)
    entropies = []
    for _ in range(200):
        opt.zero_grad()
        y, backprop = layer.forward_train(x, load_balancing=1.0)
        backprop(np.zeros_like(y))
        opt.step()
        entropies.append(layer.routing_stats(x)["routing_entropy"])
    assert np.mean(entropies[-50:]) > before["routing_entropy"] + 1.0, entropies[-50:]


def test_balancing_backward_touches_only_the_visited_nodes(rng):
    """The term's sparse products cover the batch's visited nodes, not the whole tree: a deep
    tree's input weights are far larger than a batch's paths (here 8 MB against 16 rows)."""
    import tracemalloc

    layer = fastff.UltraFFF(64, 4, 14, seed=0)
    x = rng.standard_normal((16, 64)).astype(np.float32)

    def backward_peak(balancing):
        y, backprop = layer.forward_train(x, load_balancing=balancing)
        tracemalloc.start()
        try:
            backprop(np.zeros_like(y))
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    backward_peak(1.0)  # allocates layer.grads and imports scipy.sparse
    layer.zero_grad()
    extra = backward_peak(1.0) - backward_peak(0.0)
    assert extra < layer.params["linear_in.weight"].nbytes / 16, extra
    touched = np.flatnonzero(np.abs(layer.grads["linear_in.weight"]).sum(axis=1))
    assert 0 < touched.size <= 16 * 14


@pytest.mark.parametrize("kind", ["ultra", "fff"])
@pytest.mark.parametrize("stage", ["_csr_rows", "dz"])
def test_a_failed_balancing_backward_adds_nothing(kind, stage, rng, monkeypatch):
    """The term's gradient is formed before the kernel adds the path's: a failure there (out
    of memory) leaves the gradients as they were, and the backprop can be called again. For
    UltraFFF and the hardened FFF, failing in the term's dz or in its sparse products."""
    from fastff import _balance

    if kind == "ultra":
        layer = fastff.UltraFFF(10, 3, 4, 2, seed=0)
        kw = {"load_balancing": 1.0}
        where, name = _balance, "ultra_dz"
    else:
        layer = fastff.FFF(10, 4, 3, 4, train_hardened=True, region_leak=0.2, seed=0)
        kw = {"load_balancing": 1.0, "hardening": 0.5}
        where, name = _balance, "hard_dz"
    if stage == "_csr_rows":
        where, name = type(layer.ops), "_csr_rows"
    x = rng.standard_normal((30, 10)).astype(np.float32)
    dy = rng.standard_normal((30, 3)).astype(np.float32)

    def run():
        return (
            layer.forward_train(x, rng=np.random.default_rng(1), **kw)
            if kind == "fff"
            else (layer.forward_train(x, **kw))
        )

    _, backprop = run()
    expected = backprop(dy), {k: v.copy() for k, v in layer.grads.items()}
    layer.zero_grad()
    _, backprop = run()
    real = getattr(where, name)

    def fail(*args):
        raise MemoryError("simulated")

    monkeypatch.setattr(where, name, fail)
    with pytest.raises(MemoryError, match="simulated"):
        backprop(dy)
    assert all(not v.any() for v in layer.grads.values())
    monkeypatch.setattr(where, name, real)
    np.testing.assert_array_equal(backprop(dy), expected[0])
    for key, value in layer.grads.items():
        np.testing.assert_array_equal(value, expected[1][key])
