"""FFF (router-leaf): CPU kernels against fastff.reference, masks, usage, state dicts, errors."""

import os
import platform

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import fastff
from fastff import reference as R

from conftest import assert_close, dyadic, dyadic_state

DTYPES = [np.float32, np.float64]
ACTS = ["relu", "gelu", "identity"]
PARAM_KEYS = ["node_weights", "node_biases", "w1s", "b1s", "w2s", "b2s"]


def node_levels(depth):
    """Level (0..depth-1) of each node in heap order."""
    return np.array([(n + 1).bit_length() - 1 for n in range(2**depth - 1)], dtype=np.intp)


def reference_masks(layer, swap, drop, n_rows):
    """The kernel-layout masks of layer._draw_masks in the reference's layout: swap per node
    (B, n_nodes) (hardened masks are per level), drop (B, n_leaves, leaf) or, hardened, the row's
    mask for whichever leaf it reaches."""
    if swap is not None and layer.train_hardened:
        swap = swap[:, node_levels(layer.depth)]
    if drop is not None:
        if layer.train_hardened:
            drop = np.repeat(drop[:, None, :], layer.n_leaves, axis=1)
        else:
            drop = drop.reshape(n_rows, layer.n_leaves, layer.leaf_width)
    return swap, drop


def check_training(layer, state, x, dy, hardening, balancing=0.0, *, rng=None, masks=(None, None)):
    """Kernel forward_train/backprop (with load_balancing=balancing) against the reference,
    same masks; returns nothing."""
    dtype = layer.dtype
    layer.zero_grad()
    y, backprop = layer.forward_train(x, rng=rng, hardening=hardening, load_balancing=balancing)
    dx = backprop(dy)
    swap, drop = reference_masks(layer, *masks, x.shape[0])
    y_ref, entropy_ref, cache = R.fff_train_forward(
        np.asarray(x, np.float64),
        state,
        layer.activation,
        hardened=layer.train_hardened,
        swap=swap,
        drop=drop,
    )
    dx_ref, grads_ref = R.fff_train_backward(
        np.asarray(dy, np.float64), cache, state, layer.activation, hardening, balancing
    )
    n_rows, width = x.shape[0], layer.training_width + layer.input_width
    assert y.dtype == dtype and dx.dtype == dtype
    assert_close(y, y_ref, dtype, width, "y")
    assert_close(dx, dx_ref, dtype, width + layer.n_nodes, "dx")
    assert layer.last_mean_entropy == pytest.approx(entropy_ref, rel=1e-5, abs=1e-6)
    assert layer.last_balance_loss == pytest.approx(cache["balance"]["loss"], rel=1e-5, abs=1e-6)
    grads = layer.grads
    assert set(PARAM_KEYS) <= set(grads) and sorted(grads) == sorted(grads_ref)
    for key in grads:
        assert_close(grads[key], grads_ref[key], dtype, (n_rows + 1) * width, key)


def training_case(seed, in_w, leaf_w, out_w, depth, batch, act, dtype, **kwargs):
    rng = np.random.default_rng(seed)
    layer = fastff.FFF(in_w, leaf_w, out_w, depth, act, dtype=dtype, seed=seed, **kwargs)
    state = dyadic_state(layer, rng)
    x = dyadic(rng, (batch, in_w), denom=8)
    dy = dyadic(rng, (batch, out_w))
    return layer, state, x, dy


shapes = dict(
    in_w=st.integers(1, 40),
    # mostly small leaves; sometimes more than the 64 hidden units the kernel keeps at a time
    leaf_w=st.integers(1, 8) | st.sampled_from([63, 64, 65, 130]),
    out_w=st.integers(1, 12),
    depth=st.integers(0, 6),
    batch=st.integers(0, 40),
    act=st.sampled_from(ACTS),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**32 - 1),
)


@given(**shapes)
def test_inference_matches_reference(in_w, leaf_w, out_w, depth, batch, act, dtype, seed):
    rng = np.random.default_rng(seed)
    layer = fastff.FFF(in_w, leaf_w, out_w, depth, act, dtype=dtype, seed=seed)
    state = dyadic_state(layer, rng)
    x = dyadic(rng, (batch, in_w), denom=8)
    y = layer(x)
    assert y.dtype == dtype and y.shape == (batch, out_w)
    assert_close(y, R.fff_infer(x, state, act), dtype, in_w + leaf_w, "y")


@pytest.mark.parametrize("batch", [1, 31, 700])  # 700 >= 2 * n_leaves: rows grouped by leaf
def test_inference_row_orders_agree(batch):
    rng = np.random.default_rng(batch)
    layer = fastff.FFF(24, 5, 7, 5, "gelu", dtype=np.float64, seed=batch)
    state = dyadic_state(layer, rng)
    x = dyadic(rng, (batch, 24), denom=8)
    y = layer(x)
    assert_close(y, R.fff_infer(x, state, "gelu"), np.float64, 30, "y")
    np.testing.assert_array_equal(layer(x[::-1])[::-1], y)


@pytest.mark.parametrize("depth", [3, 7])
def test_inference_rows_do_not_depend_on_their_batch(depth):
    """A row's output is bitwise the same alone, in a small batch (rows routed and evaluated
    block by block) and in a large one (leaves evaluated with the rows grouped by leaf)."""
    rng = np.random.default_rng(0)
    layer = fastff.FFF(100, 70, 9, depth, "relu", dtype=np.float32, seed=0)
    x = rng.standard_normal((600, 100)).astype(np.float32)
    y = layer(x)  # 600 >= 2 * n_leaves: grouped by leaf
    for i in (0, 1, 250, 498, 499):
        np.testing.assert_array_equal(layer(x[i : i + 1]), y[i : i + 1])
    np.testing.assert_array_equal(layer(x[:7]), y[:7])
    np.testing.assert_array_equal(layer(x[::-1])[::-1], y)


def test_relu_leaves_propagate_nan_and_skip_zeros(rng):
    """A NaN input reaches NaN outputs through relu leaves (as in the reference); rows whose
    hidden units are all zero get exactly the output bias."""
    layer = fastff.FFF(6, 5, 3, 2, "relu", dtype=np.float64, seed=3)
    x = rng.standard_normal((300, 6))  # 300 >= 2 * n_leaves: the leaf-grouped path
    x[7, 2] = np.nan
    y = layer(x)
    assert np.isnan(y[7]).all() and not np.isnan(np.delete(y, 7, axis=0)).any()
    state = layer.state_dict()
    layer.load_state_dict({**state, "b1s": np.full_like(state["b1s"], -1e9)})
    np.testing.assert_array_equal(layer(x[:7]), state["b2s"][layer_leaves(layer, x[:7])])


def layer_leaves(layer, x):
    state = layer.state_dict()
    node = np.zeros(len(x), dtype=int)
    for _ in range(layer.depth):
        z = np.einsum("ri,ri->r", x, state["node_weights"][node]) + state["node_biases"][node, 0]
        node = 2 * node + 1 + (z >= 0)
    return node - (2**layer.depth - 1)


def test_inference_leaf_tiles_agree():
    """Every leaf tile (4 x 4 with AVX-512, 4 x 2 with AVX2, and the odd shapes a block's
    edges take) gives bitwise the same rows."""
    from fastff import _cmm

    rng = np.random.default_rng(1)
    layer = fastff.FFF(101, 7, 5, 2, "gelu", dtype=np.float32, seed=1)
    x = rng.standard_normal((300, 101)).astype(np.float32)
    outputs = []
    previous = _cmm._set_leaf_tile(2, 2)
    assert previous in {(4, 4), (4, 2)}  # the load-time choice: AVX-512 or not
    if os.path.exists("/proc/cpuinfo") and platform.machine() == "x86_64":
        wide = " avx512f" in open("/proc/cpuinfo").read()
        assert previous == (4, 4 if wide else 2)
    try:
        last = (2, 2)
        for rows, units in [(2, 2), (4, 4), (4, 2), (3, 3), (1, 4), (4, 1)]:
            assert _cmm._set_leaf_tile(rows, units) == last  # the hook really sets the tile
            last = (rows, units)
            outputs.append((layer(x), layer(x[:5])))
        with pytest.raises(ValueError, match="1 to 4"):
            _cmm._set_leaf_tile(5, 2)
    finally:
        _cmm._set_leaf_tile(*previous)
    for big, small in outputs[1:]:
        np.testing.assert_array_equal(big, outputs[0][0])
        np.testing.assert_array_equal(small, outputs[0][1])


@given(hardening=st.sampled_from([0.0, 0.75]), **shapes)
def test_soft_training_matches_reference(
    hardening, in_w, leaf_w, out_w, depth, batch, act, dtype, seed
):
    layer, state, x, dy = training_case(seed, in_w, leaf_w, out_w, depth, batch, act, dtype)
    check_training(layer, state, x, dy, hardening)


@given(hardening=st.sampled_from([0.0, 0.75]), **shapes)
def test_hardened_training_matches_reference(
    hardening, in_w, leaf_w, out_w, depth, batch, act, dtype, seed
):
    layer, state, x, dy = training_case(
        seed, in_w, leaf_w, out_w, depth, batch, act, dtype, train_hardened=True
    )
    check_training(layer, state, x, dy, hardening)


@given(
    hardened=st.booleans(),
    leak=st.sampled_from([0.2, 0.6]),
    dropout=st.sampled_from([0.0, 0.3]),
    depth=st.integers(0, 5),
    batch=st.integers(1, 30),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**32 - 1),
)
def test_region_leak_and_dropout_match_reference(
    hardened, leak, dropout, depth, batch, dtype, seed
):
    layer, state, x, dy = training_case(
        seed,
        9,
        3,
        4,
        depth,
        batch,
        "gelu",
        dtype,
        train_hardened=hardened,
        region_leak=leak,
        dropout=dropout,
    )
    masks = layer._draw_masks(np.random.default_rng(seed), batch)
    check_training(layer, state, x, dy, 0.5, rng=np.random.default_rng(seed), masks=masks)


@pytest.mark.parametrize("hardened", [False, True])
def test_same_rng_same_result_and_masks_take_effect(hardened, rng):
    layer = fastff.FFF(
        12, 4, 3, 3, region_leak=0.4, dropout=0.3, train_hardened=hardened, dtype=np.float64, seed=5
    )
    x = rng.standard_normal((50, 12))
    dy = rng.standard_normal((50, 3))

    def run(generator):
        layer.zero_grad()
        y, backprop = layer.forward_train(x, rng=generator)
        return y, backprop(dy), layer.grads["w1s"].copy()

    a, b = run(np.random.default_rng(1)), run(np.random.default_rng(1))
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)
    assert not np.array_equal(run(np.random.default_rng(2))[0], a[0])
    # without leak and dropout the training forward is deterministic and, hardened, the hard path
    plain = fastff.FFF(12, 4, 3, 3, train_hardened=hardened, dtype=np.float64, seed=5)
    plain.load_state_dict(layer.state_dict())
    y1, _ = plain.forward_train(x, rng=np.random.default_rng(1))
    y2, _ = plain.forward_train(x)
    np.testing.assert_array_equal(y1, y2)


def test_default_stream_follows_the_seed(rng):
    x = rng.standard_normal((20, 6))
    a = fastff.FFF(6, 2, 2, 2, region_leak=0.5, dropout=0.5, seed=11)
    b = fastff.FFF(6, 2, 2, 2, region_leak=0.5, dropout=0.5, seed=11)
    ya1, ya2 = a.forward_train(x)[0], a.forward_train(x)[0]
    np.testing.assert_array_equal(ya1, b.forward_train(x)[0])
    np.testing.assert_array_equal(ya2, b.forward_train(x)[0])
    assert not np.array_equal(ya1, ya2)  # fresh masks every call


def test_dropout_mask_statistics():
    layer = fastff.FFF(4, 8, 2, 2, dropout=0.25, seed=0)
    swap, drop = layer._draw_masks(np.random.default_rng(0), 2000)
    assert swap is None and drop.shape == (2000, 32) and drop.dtype == np.float32
    assert set(np.unique(drop)) == {0.0, np.float32(1 / 0.75)}
    assert abs((drop == 0).mean() - 0.25) < 0.01
    leaky = fastff.FFF(4, 8, 2, 3, region_leak=0.1, train_hardened=True, seed=0)
    swap, drop = leaky._draw_masks(np.random.default_rng(0), 5000)
    assert drop is None and swap.shape == (5000, 3) and abs(swap.mean() - 0.1) < 0.01


@pytest.mark.parametrize("hardened", [False, True])
def test_reference_gradients_match_finite_differences(hardened):
    """The reference backward is the derivative of sum(y * dy) + hardening * mean entropy."""
    rng = np.random.default_rng(3)
    in_w, leaf_w, out_w, batch, hardening = 5, 3, 2, 7, 0.8  # depth 2: 3 nodes, 4 leaves
    params = {
        "node_weights": rng.standard_normal((3, in_w)),
        "node_biases": rng.standard_normal((3, 1)),
        "w1s": rng.standard_normal((4, in_w, leaf_w)),
        "b1s": rng.standard_normal((4, leaf_w)),
        "w2s": rng.standard_normal((4, leaf_w, out_w)),
        "b2s": rng.standard_normal((4, out_w)),
    }
    x, dy = rng.standard_normal((batch, in_w)), rng.standard_normal((batch, out_w))
    swap = rng.random((batch, 3)) < 0.3
    drop = (rng.random((batch, 4, leaf_w)) > 0.2) / 0.8
    kw = dict(hardened=hardened, swap=swap, drop=drop)

    def objective(x_, p_):
        y, entropy, _ = R.fff_train_forward(x_, p_, "gelu", **kw)
        return float((y * dy).sum() + hardening * entropy)

    _, _, cache = R.fff_train_forward(x, params, "gelu", **kw)
    dx, grads = R.fff_train_backward(dy, cache, params, "gelu", hardening)
    eps = 1e-6

    def numeric(get):
        out = np.zeros_like(get())
        for i in np.ndindex(out.shape):
            old = get()[i]
            get()[i] = old + eps
            up = objective(x, params)
            get()[i] = old - eps
            down = objective(x, params)
            get()[i] = old
            out[i] = (up - down) / (2 * eps)
        return out

    np.testing.assert_allclose(dx, numeric(lambda: x), rtol=1e-6, atol=1e-7)
    for key in PARAM_KEYS:
        np.testing.assert_allclose(
            grads[key], numeric(lambda key=key: params[key]), rtol=1e-6, atol=1e-7, err_msg=key
        )
    if hardened:  # the rounding passes nothing: routers learn from the entropy term alone
        _, grads0 = R.fff_train_backward(dy, cache, params, "gelu", 0.0)
        assert not grads0["node_weights"].any() and not grads0["node_biases"].any()


def test_hand_computed_routing_and_ties():
    layer = fastff.FFF(2, 1, 1, 1, activation="identity", dtype=np.float64)
    layer.load_state_dict(
        {
            "node_weights": np.array([[1.0, 0.0]]),
            "node_biases": np.array([[0.0]]),
            "w1s": np.array([[[1.0], [0.0]], [[0.0], [1.0]]]),
            "b1s": np.array([[0.0], [0.5]]),
            "w2s": np.array([[[2.0]], [[3.0]]]),
            "b2s": np.array([[1.0], [-1.0]]),
        }
    )
    # x=(1,2): z=1 >= 0 -> right leaf: (2 + 0.5) * 3 - 1 = 6.5
    # x=(-1,2): z=-1 -> left leaf: -1 * 2 + 1 = -1
    # x=(0,7): z=0 >= 0 -> right in inference: 7.5 * 3 - 1 = 21.5
    x = np.array([[1.0, 2.0], [-1.0, 2.0], [0.0, 7.0]])
    np.testing.assert_array_equal(layer(x), [[6.5], [-1.0], [21.5]])
    # soft: z=0 mixes both leaves half and half: 0.5 * 1 + 0.5 * 21.5
    y, _ = layer.forward_train(x[2:])
    np.testing.assert_allclose(y, [[11.25]], rtol=1e-15)
    assert layer.last_mean_entropy == pytest.approx(np.log(2))
    # hardened training rounds like torch.round: sigmoid(0) = 0.5 -> 0 -> left: 0 * 2 + 1
    hard = fastff.FFF(2, 1, 1, 1, activation="identity", train_hardened=True, dtype=np.float64)
    hard.load_state_dict(layer.state_dict())
    y, _ = hard.forward_train(x)
    np.testing.assert_array_equal(y, [[6.5], [-1.0], [1.0]])


def test_hardened_gradients_only_touch_the_reached_leaf(rng):
    layer, state, x, dy = training_case(4, 6, 3, 2, 3, 10, "relu", np.float64, train_hardened=True)
    y, backprop = layer.forward_train(x)
    backprop(dy)
    z = x @ state["node_weights"].T + state["node_biases"].T
    _, leaf = R.fff_hard_paths(z, (z > 0).astype(np.intp))
    untouched = np.setdiff1d(np.arange(layer.n_leaves), leaf)
    for key in ["w1s", "b1s", "w2s", "b2s"]:
        assert not layer.grads[key][untouched].any()
    assert not layer.grads["node_weights"].any()  # no hardening term: no router gradient


@pytest.mark.parametrize("hardened", [False, True])
def test_backward_is_thread_count_independent(hardened, rng):
    layer = fastff.FFF(30, 4, 5, 4, "gelu", train_hardened=hardened, seed=2)
    x = rng.standard_normal((300, 30)).astype(np.float32)
    dy = rng.standard_normal((300, 5)).astype(np.float32)
    n = fastff.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            fastff.set_num_threads(threads)
            layer.zero_grad()
            y, backprop = layer.forward_train(x, hardening=0.3)
            results.append((y, backprop(dy), {k: v.copy() for k, v in layer.grads.items()}))
    finally:
        fastff.set_num_threads(n)
    y0, dx0, g0 = results[0]
    for y, dx, g in results[1:]:
        np.testing.assert_array_equal(y, y0)
        if hardened:  # the soft path's GEMMs belong to BLAS; the hardened path is all fastff
            np.testing.assert_array_equal(dx, dx0)
            for k in g0:
                np.testing.assert_array_equal(g[k], g0[k])


def test_gradients_accumulate_and_zero(rng):
    layer = fastff.FFF(5, 2, 3, 2, dtype=np.float64, seed=0)
    x, dy = rng.standard_normal((4, 5)), rng.standard_normal((4, 3))
    _, backprop = layer.forward_train(x)
    backprop(dy)
    once = {k: v.copy() for k, v in layer.grads.items()}
    with pytest.raises(RuntimeError, match="already ran"):  # would add the gradients twice
        backprop(dy)
    _, backprop = layer.forward_train(x)
    backprop(dy)
    for k in once:
        np.testing.assert_allclose(layer.grads[k], 2 * once[k])
    layer.zero_grad()
    assert not any(v.any() for v in layer.grads.values())


# ---- usage tracking ---------------------------------------------------------------------------


def _reference_reach(layer, state, x, hardened_decisions):
    z = x @ state["node_weights"].T + state["node_biases"].T
    q = 1 / (1 + np.exp(-z))
    d = (q > 0.5).astype(float) if hardened_decisions else q
    reach = np.ones((x.shape[0], 2 * layer.n_nodes + 1))
    for n in range(layer.n_nodes):
        reach[:, 2 * n + 1] = reach[:, n] * (1 - d[:, n])
        reach[:, 2 * n + 2] = reach[:, n] * d[:, n]
    return reach


@pytest.mark.parametrize(
    "mode, hardened", [("soft", False), ("hard", False), ("soft", True), ("hard", True)]
)
def test_usage_counters(mode, hardened):
    layer, state, x, _ = training_case(
        8, 7, 2, 3, 3, 25, "relu", np.float64, usage_mode=mode, train_hardened=hardened
    )
    assert layer.node_usage.shape == (7,) and layer.leaf_usage.shape == (8,)
    assert not layer.node_usage.any()
    for _ in range(2):
        layer.forward_train(x)
    reach = 2 * _reference_reach(layer, state, x, hardened or mode == "hard").sum(axis=0)
    np.testing.assert_allclose(layer.node_usage, reach[:7], rtol=1e-12)
    np.testing.assert_allclose(layer.leaf_usage, reach[7:], rtol=1e-12)
    assert layer.node_usage[0] == 50 and layer.leaf_usage.sum() == pytest.approx(50)
    layer(x)  # inference does not count
    np.testing.assert_allclose(layer.leaf_usage.sum(), 50)
    group = layer.get_node_param_group()
    assert group["params"] == ["node_weights", "node_biases"] and group["usage"] is layer.node_usage
    assert layer.get_leaf_param_group()["usage"] is layer.leaf_usage
    held = layer.node_usage
    layer.reset_usage()
    assert layer.node_usage is held and not held.any() and not layer.leaf_usage.any()


def test_no_usage_tracking_by_default(rng):
    layer = fastff.FFF(3, 2, 1, 2)
    layer.forward_train(rng.standard_normal((4, 3)))
    assert layer.node_usage is None and layer.leaf_usage is None
    assert layer.get_leaf_param_group()["usage"] is None


# ---- shapes, inputs, depth 0 ------------------------------------------------------------------


def test_state_dict_keys_shapes_and_init_bounds():
    layer = fastff.FFF(16, 4, 9, 3, seed=7)
    state = layer.state_dict()
    assert {k: v.shape for k, v in state.items()} == {
        "node_weights": (7, 16),
        "node_biases": (7, 1),
        "w1s": (8, 16, 4),
        "b1s": (8, 4),
        "w2s": (8, 4, 9),
        "b2s": (8, 9),
    }
    assert all(v.flags.c_contiguous and v.dtype == np.float32 for v in state.values())
    for key, bound in [
        ("node_weights", 1 / 4),
        ("node_biases", 1 / 4),
        ("w1s", 1 / 4),
        ("b1s", 1 / 4),
        ("w2s", 1 / 2),
        ("b2s", 1 / 2),
    ]:
        assert np.abs(state[key]).max() <= bound
        assert np.abs(state[key]).max() > 0.7 * bound, key  # really spans the range
    again = fastff.FFF(16, 4, 9, 3, seed=7).state_dict()
    for k in state:
        np.testing.assert_array_equal(state[k], again[k])
    assert layer.n_parameters() == 7 * 17 + 8 * (16 * 4 + 4 + 4 * 9 + 9)


def test_weights_start_on_cache_lines():
    """Internal weights are 64-byte aligned (vector loads then never span two cache lines),
    also after the device hook has taken arrays back from the GPU."""
    from fastff.backends import get_ops

    layer = fastff.FFF(16, 4, 9, 3, seed=7)
    assert all(v.ctypes.data % 64 == 0 for v in layer._params.values())
    before = layer.state_dict()

    def misaligned(a):
        buffer = np.empty(a.nbytes + 80, np.uint8)
        start = -buffer.ctypes.data % 64 + 16
        out = buffer[start : start + a.nbytes].view(a.dtype).reshape(a.shape)
        out[...] = a
        return out

    layer._params = {k: misaligned(v) for k, v in layer._params.items()}
    layer._on_device_change(get_ops("cpu"))
    assert all(v.ctypes.data % 64 == 0 for v in layer._params.values())
    for k, v in layer.state_dict().items():
        np.testing.assert_array_equal(v, before[k])


def test_params_are_writable_views_in_anchor_layout(rng):
    layer = fastff.FFF(4, 2, 3, 1, activation="identity", dtype=np.float64)
    x = rng.standard_normal((6, 4))
    layer.params["w1s"][...] = 0
    layer.params["b1s"][...] = 0
    layer.params["b2s"][...] = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    layer.params["w1s"][1, 2, 0] = 1.0  # leaf 1, input 2 -> hidden 0
    layer.params["w2s"][1, 0, 2] = 10.0
    state = layer.state_dict()
    np.testing.assert_allclose(layer(x), R.fff_infer(x, state, "identity"), rtol=1e-14)
    assert state["w1s"][1, 2, 0] == 1.0 and np.count_nonzero(state["w1s"]) == 1


def test_depth_zero_is_one_leaf(rng):
    layer = fastff.FFF(5, 3, 2, 0, "gelu", dtype=np.float64, seed=1)
    assert (layer.n_nodes, layer.n_leaves) == (0, 1)
    state = layer.state_dict()
    assert state["node_weights"].shape == (0, 5) and state["node_biases"].shape == (0, 1)
    x = rng.standard_normal((7, 5))
    _, _, f = R.fff_leaves(x, state, "gelu")
    np.testing.assert_allclose(layer(x), f[:, 0], rtol=1e-13)
    y, backprop = layer.forward_train(x, hardening=1.0)
    np.testing.assert_allclose(y, f[:, 0], rtol=1e-13)
    assert layer.last_mean_entropy == 0.0
    assert backprop(np.ones((7, 2))).shape == (7, 5)


@pytest.mark.parametrize("hardened", [False, True])
def test_leading_dims_and_empty_batches(hardened, rng):
    layer = fastff.FFF(5, 3, 2, 3, train_hardened=hardened, usage_mode="hard", seed=0)
    x = rng.standard_normal((2, 4, 5)).astype(np.float32)
    y = layer(x)
    assert y.shape == (2, 4, 2)
    np.testing.assert_array_equal(y.reshape(8, 2), layer(x.reshape(8, 5)))
    np.testing.assert_array_equal(layer(x[0, 0]), y[0, 0])
    yt, backprop = layer.forward_train(x)
    assert yt.shape == (2, 4, 2) and backprop(np.ones((2, 4, 2))).shape == (2, 4, 5)
    flat_y, flat_backprop = layer.forward_train(x.reshape(8, 5))
    np.testing.assert_array_equal(flat_y, yt.reshape(8, 2))
    for empty in (np.zeros((0, 5)), np.zeros((3, 0, 5))):
        assert layer(empty).shape == empty.shape[:-1] + (2,)
        layer.zero_grad()
        ye, backprop = layer.forward_train(empty, hardening=1.0)
        assert ye.shape == empty.shape[:-1] + (2,) and layer.last_mean_entropy == 0.0
        assert backprop(np.zeros(empty.shape[:-1] + (2,))).shape == empty.shape
        assert not any(g.any() for g in layer.grads.values())


def test_input_casts_and_layouts(rng):
    layer = fastff.FFF(6, 2, 4, 3, seed=1)
    x = rng.standard_normal((7, 6))
    y = layer(x)
    assert y.dtype == np.float32
    np.testing.assert_array_equal(layer(np.asfortranarray(x)), y)
    np.testing.assert_array_equal(layer(x.tolist()), y)
    np.testing.assert_array_equal(layer(x[::-1])[::-1], y)
    ints = rng.integers(-3, 4, (5, 6))
    np.testing.assert_array_equal(layer(ints), layer(ints.astype(np.float32)))


# ---- errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, exc, words",
    [
        (dict(input_width=0), ValueError, "input_width"),
        (dict(leaf_width=0), ValueError, "leaf_width"),
        (dict(output_width=-2), ValueError, "output_width"),
        (dict(depth=-1), ValueError, "depth"),
        (dict(depth=2.0), TypeError, "depth"),
        (dict(leaf_width=True), TypeError, "leaf_width"),
        (dict(dropout=1.0), ValueError, "dropout"),
        (dict(dropout=-0.1), ValueError, "dropout"),
        (dict(dropout="0.1"), TypeError, "dropout"),
        (dict(region_leak=1.0), ValueError, "region_leak"),
        (dict(usage_mode="always"), ValueError, "usage_mode"),
        (dict(activation="tanh"), ValueError, "activation"),
        (dict(train_hardened=1), TypeError, "train_hardened"),
        (dict(dtype=np.int64), TypeError, "dtype"),
        (dict(depth=45), MemoryError, "bytes"),
    ],
)
def test_constructor_errors(kwargs, exc, words):
    args = dict(input_width=8, leaf_width=4, output_width=3, depth=3)
    args.update(kwargs)
    with pytest.raises(exc, match=words):
        fastff.FFF(**args)


def test_training_call_errors(rng):
    layer = fastff.FFF(4, 2, 3, 2, seed=0)
    x = rng.standard_normal((5, 4))
    with pytest.raises(ValueError, match="hardening"):
        layer.forward_train(x, hardening=-1.0)
    with pytest.raises(TypeError, match="rng"):
        layer.forward_train(x, rng=42)
    with pytest.raises(ValueError, match=r"\(..., 4\)"):
        layer.forward_train(np.zeros((5, 3)))
    y, backprop = layer.forward_train(x)
    with pytest.raises(ValueError, match="shape of y"):
        backprop(np.zeros((4, 3)))
    with pytest.raises(ValueError, match=r"\(..., 3\)"):
        backprop(np.zeros((5, 2)))
    layer.load_state_dict(layer.state_dict())
    with pytest.raises(RuntimeError, match="stale"):
        backprop(np.zeros((5, 3)))
    wide = fastff.FFF(1, 16, 1, 16)  # 12 MB of parameters, but soft training would keep
    with pytest.raises(MemoryError, match="soft training"):  # 2**20 hidden units per row
        wide.forward_train(np.zeros((10**6, 1), np.float32))  # 16 TB


# ---- state dicts ------------------------------------------------------------------------------


def test_state_dict_round_trip_and_atomic_errors(rng):
    layer = fastff.FFF(4, 3, 2, 2, seed=0)
    other = fastff.FFF(4, 3, 2, 2, seed=1)
    state = layer.state_dict()
    other.load_state_dict(state)
    x = rng.standard_normal((9, 4))
    np.testing.assert_array_equal(other(x), layer(x))
    before = other.state_dict()
    bad_cases = [
        ({k: v for k, v in state.items() if k != "b1s"}, ValueError, "missing"),
        ({**state, "extra": np.zeros(1)}, ValueError, "unexpected"),
        ({**state, "w1s": np.zeros((4, 3, 4))}, ValueError, "shape"),
        ({**state, "node_biases": np.zeros(3)}, ValueError, "shape"),
        ({**state, "depth": np.array(3)}, ValueError, "depth 3"),
        ({**state, "depth": np.array([1, 2])}, ValueError, "depth"),
        ({**state, "node_usage": np.zeros(4)}, ValueError, "node_usage"),
    ]
    for bad, exc, words in bad_cases:
        with pytest.raises(exc, match=words):
            other.load_state_dict(bad)
        for k in before:
            np.testing.assert_array_equal(other.state_dict()[k], before[k])


@pytest.mark.parametrize("depth_entry", [np.array(2, dtype=np.int64), np.array([2]), 2])
def test_loads_a_package_state_dict(depth_entry, rng):
    """The fastfeedforward module's state_dict(): float32 tensors, `depth`, usage counters."""
    source = fastff.FFF(6, 3, 2, 2, usage_mode="soft", seed=3)
    source.forward_train(rng.standard_normal((10, 6)))
    package_state = {
        "depth": depth_entry,
        **source.state_dict(),
        "node_usage": source.node_usage.astype(np.float32),
        "leaf_usage": source.leaf_usage.astype(np.float32),
    }
    tracking = fastff.FFF(6, 3, 2, 2, usage_mode="soft", dtype=np.float64, seed=4)
    held = tracking.leaf_usage
    tracking.load_state_dict(package_state)
    assert tracking.leaf_usage is held  # loaded in place
    x = rng.standard_normal((5, 6))
    np.testing.assert_allclose(tracking(x), source(x), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(tracking.leaf_usage, source.leaf_usage, rtol=1e-6)
    plain = fastff.FFF(6, 3, 2, 2, seed=4)  # not tracking: the counters are checked, then dropped
    plain.load_state_dict(package_state)
    assert plain.leaf_usage is None
    np.testing.assert_array_equal(plain(x), source(x))


def test_get_config_rebuilds_the_layer():
    layer = fastff.FFF(7, 3, 2, 4, "gelu", 0.1, True, 0.05, "hard", dtype=np.float64, seed=0)
    config = layer.get_config()
    assert config == {
        "input_width": 7,
        "leaf_width": 3,
        "output_width": 2,
        "depth": 4,
        "activation": "gelu",
        "dropout": 0.1,
        "train_hardened": True,
        "region_leak": 0.05,
        "usage_mode": "hard",
        "master_leaf": False,
        "dtype": "float64",
    }
    rebuilt = fastff.FFF(**config)
    assert rebuilt.get_config() == config
    assert "FFF(7, 3, 2, depth=4" in repr(layer)


# ---- the real package, where installed ---------------------------------------------------------


@pytest.mark.parametrize("hardened", [False, True])
def test_matches_the_fastfeedforward_package(hardened):
    torch = pytest.importorskip("torch")
    fff_module = pytest.importorskip("fastfeedforward")
    torch.manual_seed(0)
    theirs = fff_module.FFF(12, 4, 3, 3, activation=torch.nn.GELU(), train_hardened=hardened)
    ours = fastff.FFF(12, 4, 3, 3, "gelu", train_hardened=hardened, dtype=np.float64)
    ours.load_state_dict({k: v.detach().numpy() for k, v in theirs.state_dict().items()})
    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, 12))
    dy = rng.standard_normal((16, 3))
    xt = torch.tensor(x, dtype=torch.float32, requires_grad=True)
    theirs.train()
    yt, entropies = theirs(xt, return_entropies=True)
    # hardened, the package averages the entropies over every node, fastff over the visited ones
    hardening = 0.0 if hardened else 0.5
    y, backprop = ours.forward_train(x, hardening=hardening)
    np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-4, atol=1e-5)
    if not hardened:
        assert ours.last_mean_entropy == pytest.approx(float(entropies.mean().detach()), rel=1e-4)
    loss = (yt * torch.tensor(dy, dtype=torch.float32)).sum() + hardening * entropies.mean()
    loss.backward()
    dx = backprop(dy)
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-3, atol=1e-5)
    for name, param in theirs.named_parameters():
        if param.grad is not None:
            np.testing.assert_allclose(
                ours.grads[name], param.grad.numpy(), rtol=1e-3, atol=1e-5, err_msg=name
            )
    # Inference. PyPI's 0.2.1 eval_forward leaves out b2s (the repository's later 'sparse'
    # implementation adds it, as fastff does), so compare with b2s zeroed on both sides.
    with torch.no_grad():
        theirs.b2s.zero_()
    ours.params["b2s"][...] = 0
    theirs.eval()
    np.testing.assert_allclose(ours(x), theirs(xt).detach().numpy(), rtol=1e-4, atol=1e-5)


def test_to_cuda_without_a_gpu_raises_and_keeps_the_layer():
    """Where CuPy or a GPU is missing, to("cuda") names what is missing and the layer stays
    usable on the CPU (tests/test_gpu.py runs the CUDA kernels where a GPU is present)."""
    from fastff.backends import get_ops

    try:
        get_ops("cuda")
    except RuntimeError:
        pass
    else:
        pytest.skip("a CUDA GPU is present: tests/test_gpu.py covers FFF on it")
    layer = fastff.FFF(3, 2, 1, 1)
    with pytest.raises(RuntimeError, match="CuPy|CUDA"):
        layer.to("cuda")
    assert layer.device == "cpu" and layer(np.zeros((1, 3))).shape == (1, 1)
