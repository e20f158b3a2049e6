"""Learning-quality options of FFF (issue 23): the load-balancing term, the master leaf and the
routing diagnostics, against fastff.reference (whose gradients are checked by finite
differences here too)."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from test_fff import check_training, training_case

import fastff
from fastff import reference as R

from conftest import assert_close, dyadic, dyadic_state

DTYPES = [np.float32, np.float64]
ACTS = ["relu", "gelu", "identity"]
TREE_KEYS = ["node_weights", "node_biases", "w1s", "b1s", "w2s", "b2s"]
MASTER_SHAPES = {"master.w1": (5, 3), "master.b1": (3,), "master.w2": (3, 2), "master.b2": (2,)}


case = training_case  # test_fff's: dyadic weights, inputs and dy


shapes = dict(
    in_w=st.integers(1, 30),
    leaf_w=st.integers(1, 6) | st.sampled_from([64, 65]),
    out_w=st.integers(1, 9),
    depth=st.integers(0, 6),
    batch=st.integers(0, 40),
    act=st.sampled_from(ACTS),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**32 - 1),
)


# ---- the reference's gradients ----------------------------------------------------------------


def random_params(rng, in_w, leaf_w, out_w, depth, master):
    n_nodes, n_leaves = 2**depth - 1, 2**depth
    params = {
        "node_weights": rng.standard_normal((n_nodes, in_w)),
        "node_biases": rng.standard_normal((n_nodes, 1)),
        "w1s": rng.standard_normal((n_leaves, in_w, leaf_w)),
        "b1s": rng.standard_normal((n_leaves, leaf_w)),
        "w2s": rng.standard_normal((n_leaves, leaf_w, out_w)),
        "b2s": rng.standard_normal((n_leaves, out_w)),
    }
    if master:
        params.update(
            {
                "master.w1": rng.standard_normal((in_w, leaf_w)),
                "master.b1": rng.standard_normal(leaf_w),
                "master.w2": rng.standard_normal((leaf_w, out_w)),
                "master.b2": rng.standard_normal(out_w),
                "master.mix": rng.standard_normal(1),
            }
        )
    return params


@pytest.mark.parametrize("master", [False, True])
@pytest.mark.parametrize("hardened", [False, True])
def test_reference_gradients_match_finite_differences(hardened, master):
    """The reference backward is the derivative of sum(y * dy) + hardening * mean entropy +
    load_balancing * balance (hardened: with the leaf fractions f_l held, as they are counts)."""
    rng = np.random.default_rng(3)
    in_w, leaf_w, out_w, batch, hardening, balancing = 5, 3, 2, 9, 0.8, 1.3
    params = random_params(rng, in_w, leaf_w, out_w, 2, master)
    x, dy = rng.standard_normal((batch, in_w)), rng.standard_normal((batch, out_w))
    swap = rng.random((batch, 3)) < 0.3
    drop = (rng.random((batch, 4, leaf_w)) > 0.2) / 0.8
    kw = dict(hardened=hardened, swap=swap, drop=drop)

    def objective():
        y, entropy, cache = R.fff_train_forward(x, params, "gelu", **kw)
        return float((y * dy).sum() + hardening * entropy + balancing * cache["balance"]["loss"])

    _, _, cache = R.fff_train_forward(x, params, "gelu", **kw)
    dx, grads = R.fff_train_backward(dy, cache, params, "gelu", hardening, balancing)
    eps = 1e-6

    def numeric(arr):
        out = np.zeros_like(arr)
        for i in np.ndindex(out.shape):
            old = arr[i]
            arr[i] = old + eps
            up = objective()
            arr[i] = old - eps
            down = objective()
            arr[i] = old
            out[i] = (up - down) / (2 * eps)
        return out

    np.testing.assert_allclose(dx, numeric(x), rtol=1e-6, atol=1e-7)
    assert sorted(grads) == sorted(params)
    for key in params:
        np.testing.assert_allclose(
            grads[key], numeric(params[key]), rtol=1e-6, atol=1e-7, err_msg=key
        )
    # the balancing term's own gradient reaches the routers (and nothing else)
    _, grads_off = R.fff_train_backward(dy, cache, params, "gelu", hardening, 0.0)
    for key in params:
        changed = not np.allclose(grads[key], grads_off[key], rtol=0, atol=1e-12)
        assert changed == (key in ("node_weights", "node_biases")), key


def test_reference_balance_values_by_hand():
    """Depth 1, one router: soft f = mean mixture weights; hardened f = counts, P = mean of each
    row's chosen branch weight."""
    params = random_params(np.random.default_rng(0), 1, 1, 1, 1, False)
    params["node_weights"][...] = 1.0
    params["node_biases"][...] = 0.0
    x = np.array([[0.0], [np.log(3.0)], [-np.log(3.0)], [np.log(3.0)]])  # q = 1/2, 3/4, 1/4, 3/4
    _, _, soft = R.fff_train_forward(x, params, "relu")
    f = np.array([1 - (0.5 + 0.75 + 0.25 + 0.75) / 4, (0.5 + 0.75 + 0.25 + 0.75) / 4])
    assert soft["balance"]["loss"] == pytest.approx(2 * (f * f).sum())
    _, _, hard = R.fff_train_forward(x, params, "relu", hardened=True)
    # left: rows 0 (tie, weight 1/2) and 2 (3/4); right: rows 1 and 3 (3/4 each)
    f, big_p = np.array([0.5, 0.5]), np.array([(0.5 + 0.75) / 4, (0.75 + 0.75) / 4])
    assert hard["balance"]["loss"] == pytest.approx(2 * (f * big_p).sum())


# ---- the layer against the reference ------------------------------------------------------------


@given(master=st.booleans(), balancing=st.sampled_from([0.0, 0.6, 3.0]), **shapes)
def test_soft_training_matches_reference(
    master, balancing, in_w, leaf_w, out_w, depth, batch, act, dtype, seed
):
    layer, state, x, dy = case(
        seed, in_w, leaf_w, out_w, depth, batch, act, dtype, master_leaf=master
    )
    check_training(layer, state, x, dy, 0.5, balancing)


@given(master=st.booleans(), balancing=st.sampled_from([0.0, 0.6, 3.0]), **shapes)
def test_hardened_training_matches_reference(
    master, balancing, in_w, leaf_w, out_w, depth, batch, act, dtype, seed
):
    layer, state, x, dy = case(
        seed, in_w, leaf_w, out_w, depth, batch, act, dtype, master_leaf=master, train_hardened=True
    )
    check_training(layer, state, x, dy, 0.5, balancing)


@given(
    hardened=st.booleans(),
    master=st.booleans(),
    leak=st.sampled_from([0.2, 0.6]),
    dropout=st.sampled_from([0.0, 0.3]),
    depth=st.integers(1, 5),
    batch=st.integers(1, 30),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**32 - 1),
)
def test_region_leak_and_dropout_match_reference(
    hardened, master, leak, dropout, depth, batch, dtype, seed
):
    kw = dict(train_hardened=hardened, region_leak=leak, dropout=dropout, master_leaf=master)
    layer, state, x, dy = case(seed, 9, 3, 4, depth, batch, "gelu", dtype, **kw)
    masks = layer._draw_masks(np.random.default_rng(seed), batch)
    check_training(layer, state, x, dy, 0.5, 1.5, rng=np.random.default_rng(seed), masks=masks)


@given(**shapes)
def test_master_leaf_inference_matches_reference(
    in_w, leaf_w, out_w, depth, batch, act, dtype, seed
):
    layer, state, x, _ = case(seed, in_w, leaf_w, out_w, depth, batch, act, dtype, master_leaf=True)
    y = layer(x)
    assert y.dtype == dtype and y.shape == (batch, out_w)
    assert_close(y, R.fff_infer(x, state, act), dtype, in_w + 2 * leaf_w, "y")


@pytest.mark.parametrize("hardened", [False, True])
def test_balancing_zero_changes_nothing(hardened, rng):
    """load_balancing=0 (the default) gives bitwise the results of a call without it; a weight
    > 0 changes the routers' gradients and dx only."""
    layer = fastff.FFF(12, 4, 3, 3, train_hardened=hardened, dtype=np.float64, seed=5)
    x, dy = rng.standard_normal((60, 12)), rng.standard_normal((60, 3))

    def run(**kw):
        layer.zero_grad()
        y, backprop = layer.forward_train(x, hardening=0.3, **kw)
        dx = backprop(dy)
        return y, dx, {k: v.copy() for k, v in layer.grads.items()}

    y0, dx0, g0 = run()
    y1, dx1, g1 = run(load_balancing=0.0)
    np.testing.assert_array_equal(y0, y1)
    np.testing.assert_array_equal(dx0, dx1)
    for key in g0:
        np.testing.assert_array_equal(g0[key], g1[key])
    y2, dx2, g2 = run(load_balancing=2.0)
    np.testing.assert_array_equal(y0, y2)  # the term is a loss: the output is the same
    assert not np.array_equal(dx0, dx2)
    for key in g0:
        assert np.array_equal(g0[key], g2[key]) == (key not in ("node_weights", "node_biases"))


@pytest.mark.parametrize("hardened", [False, True])
def test_balancing_spreads_a_collapsed_tree(hardened):
    """Routers that send nearly every row to one leaf, trained on the balancing term alone
    (dy = 0): the hard routes spread out. (Hardened, the Switch-style term alone keeps moving
    crowds of rows from leaf to leaf rather than settling, so its routes are averaged over the
    last steps; soft, the term falls steadily.)"""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((512, 8))
    layer = fastff.FFF(8, 2, 1, 3, train_hardened=hardened, dtype=np.float64, seed=1)
    biases = layer.params["node_biases"]
    biases[...] = 2.0  # right, right, right: leaf 7 for most rows
    opt = fastff.optim.SGD(layer, lr=0.1 if hardened else 0.5)
    before = layer.routing_stats(x)
    assert before["leaf_counts"][7] > 0.8 * len(x)
    losses, entropies = [], []
    for _ in range(300):
        opt.zero_grad()
        y, backprop = layer.forward_train(x, load_balancing=1.0)
        backprop(np.zeros_like(y))
        opt.step()
        losses.append(layer.last_balance_loss)
        entropies.append(layer.routing_stats(x)["routing_entropy"])
    assert np.mean(entropies[-100:]) > before["routing_entropy"] + 1.0, entropies[-100:]
    if not hardened:
        assert layer.routing_stats(x)["balance"] < 0.5 * before["balance"]
        assert losses[-1] < 0.5 * losses[0]


def test_hardened_balancing_gradients_do_not_depend_on_the_thread_count(rng):
    """The sparse products of the hardened balancing backward are summed in a fixed order."""
    layer = fastff.FFF(30, 4, 5, 4, "gelu", train_hardened=True, region_leak=0.2, seed=2)
    x = rng.standard_normal((300, 30)).astype(np.float32)
    dy = rng.standard_normal((300, 5)).astype(np.float32)
    n = fastff.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            fastff.set_num_threads(threads)
            layer.zero_grad()
            y, backprop = layer.forward_train(
                x, rng=np.random.default_rng(0), hardening=0.3, load_balancing=2.0
            )
            results.append((backprop(dy), {k: v.copy() for k, v in layer.grads.items()}))
    finally:
        fastff.set_num_threads(n)
    dx0, g0 = results[0]
    assert g0["node_weights"].any()
    for dx, g in results[1:]:
        np.testing.assert_array_equal(dx, dx0)
        for key in g0:
            np.testing.assert_array_equal(g[key], g0[key])


# ---- master leaf: parameters, counts, files ------------------------------------------------------


def test_master_leaf_parameters_and_counts():
    plain = fastff.FFF(5, 3, 2, 2, seed=9)
    layer = fastff.FFF(5, 3, 2, 2, master_leaf=True, seed=9)
    state = layer.state_dict()
    assert list(state)[: len(TREE_KEYS)] == TREE_KEYS
    assert {k: state[k].shape for k in MASTER_SHAPES} == MASTER_SHAPES
    assert state["master.mix"].shape == (1,) and state["master.mix"][0] == 0  # s = 1/2
    for key in TREE_KEYS:  # drawn after the tree: the tree does not depend on master_leaf
        np.testing.assert_array_equal(state[key], plain.state_dict()[key])
    bound_in, bound_leaf = 1 / np.sqrt(5), 1 / np.sqrt(3)
    assert np.abs(state["master.w1"]).max() <= bound_in
    assert np.abs(state["master.w2"]).max() <= bound_leaf
    assert not np.array_equal(state["master.w1"], state["w1s"][0])
    assert layer.master_leaf and not plain.master_leaf
    assert layer.neurons_per_inference == 2 + 2 * 3 and plain.neurons_per_inference == 2 + 3
    assert layer.training_width == 5 * 3 and plain.training_width == 4 * 3
    assert layer.n_parameters() == plain.n_parameters() + 5 * 3 + 3 + 3 * 2 + 2 + 1
    assert layer.get_config()["master_leaf"] is True
    assert "master_leaf=True" in repr(layer)
    rebuilt = fastff.FFF(**layer.get_config())
    rebuilt.load_state_dict(state)
    x = np.random.default_rng(0).standard_normal((7, 5)).astype(np.float32)
    np.testing.assert_array_equal(rebuilt(x), layer(x))
    with pytest.raises(AttributeError, match="fixed"):
        layer.master_leaf = False


def test_master_leaf_share_mixes_the_outputs(rng):
    """s = sigmoid(master.mix): y = (1 - s) y_tree + s y_master, in inference and training."""
    layer = fastff.FFF(6, 4, 3, 2, "gelu", master_leaf=True, dtype=np.float64, seed=2)
    tree = fastff.FFF(6, 4, 3, 2, "gelu", dtype=np.float64)
    state = layer.state_dict()
    tree.load_state_dict({k: state[k] for k in TREE_KEYS})
    x = rng.standard_normal((11, 6))
    _, _, y_master = R.fff_master_forward(x, state, "gelu")
    for mix in (0.0, 1.5, -40.0, 40.0):
        layer.params["master.mix"][...] = mix
        s = 1 / (1 + np.exp(-mix))
        np.testing.assert_allclose(
            layer(x), (1 - s) * tree(x) + s * y_master, rtol=1e-12, atol=1e-12
        )
        y_soft, _ = layer.forward_train(x)
        np.testing.assert_allclose(
            y_soft, (1 - s) * tree.forward_train(x)[0] + s * y_master, rtol=1e-12, atol=1e-12
        )


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_master_leaf_save_load_and_astype(suffix, tmp_path, rng):
    layer = fastff.FFF(6, 4, 3, 3, master_leaf=True, seed=4)
    layer.params["master.mix"][...] = 0.7
    path = tmp_path / f"fff{suffix}"
    fastff.save(layer, path)
    loaded = fastff.load(path)
    assert loaded.master_leaf and loaded.get_config() == layer.get_config()
    for key, value in layer.state_dict().items():
        np.testing.assert_array_equal(loaded.state_dict()[key], value)
    x = rng.standard_normal((9, 6)).astype(np.float32)
    np.testing.assert_array_equal(loaded(x), layer(x))
    wide = layer.astype(np.float64)
    np.testing.assert_allclose(wide(x), layer(x), rtol=1e-5, atol=1e-6)


def test_master_leaf_half_precision(rng):
    """bfloat16 storage: the master leaf runs through the half inference kernel too."""
    layer = fastff.FFF(16, 8, 4, 3, master_leaf=True, seed=0)
    layer.params["master.mix"][...] = 0.25
    rng2 = np.random.default_rng(1)
    state = dyadic_state(layer, rng2)  # dyadic values are exact in bfloat16
    half = layer.astype("bfloat16")
    x = dyadic(rng, (50, 16), denom=8).astype(np.float32)
    y = half(x)
    assert y.dtype == np.float32
    assert_close(y, R.fff_infer(x.astype(np.float64), state, "relu"), np.float32, 40, "y")
    np.testing.assert_array_equal(
        half.routing_stats(x)["leaf_counts"], layer.routing_stats(x)["leaf_counts"]
    )


def test_master_leaf_state_dicts(rng):
    """A master-leaf layer needs the master keys; a plain one still loads the package's dict."""
    layer = fastff.FFF(6, 3, 2, 2, master_leaf=True, seed=0)
    plain = fastff.FFF(6, 3, 2, 2, seed=1)
    package_state = {"depth": np.array(2), **plain.state_dict()}
    with pytest.raises(ValueError, match="missing keys.*master.b1"):
        layer.load_state_dict(package_state)
    with pytest.raises(ValueError, match="unexpected keys.*master"):
        plain.load_state_dict(layer.state_dict())
    with pytest.raises(ValueError, match="master.mix"):
        layer.load_state_dict({**layer.state_dict(), "master.mix": np.zeros(2)})
    fastff.FFF(6, 3, 2, 2, seed=2).load_state_dict(package_state)
    from fastff.interop import to_torch_state_dict

    pytest.importorskip("torch")
    with pytest.raises(ValueError, match="master leaf"):
        to_torch_state_dict(layer)


def test_torch_fff_refuses_the_master_leaf():
    torch_mod = pytest.importorskip("fastff.torch")
    with pytest.raises(NotImplementedError, match="master_leaf"):
        torch_mod.FFF(4, 2, 3, 1, master_leaf=True)
    assert torch_mod.FFF(4, 2, 3, 1, master_leaf=False).n_leaves == 2


# ---- argument checks ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, exc",
    [
        (-0.5, ValueError),
        (float("nan"), ValueError),
        (float("inf"), ValueError),
        ("1", TypeError),
        (True, TypeError),
        (None, TypeError),
    ],
)
def test_bad_load_balancing_is_refused(value, exc, rng):
    layer = fastff.FFF(4, 2, 3, 2, seed=0)
    with pytest.raises(exc, match="load_balancing"):
        layer.forward_train(rng.standard_normal((5, 4)), load_balancing=value)
    hard = fastff.FFF(4, 2, 3, 2, train_hardened=True, seed=0)
    with pytest.raises(exc, match="load_balancing"):
        hard.forward_train(rng.standard_normal((5, 4)), load_balancing=value)
    ultra = fastff.UltraFFF(4, 2, 2, seed=0)  # UltraFFF's balancing takes the same weights
    before = {k: v.copy() for k, v in ultra.state_dict().items()}
    with pytest.raises(exc, match="load_balancing"):
        ultra.forward_train(rng.standard_normal((5, 4)), load_balancing=value)
    for key, array in ultra.state_dict().items():
        np.testing.assert_array_equal(array, before[key])


@pytest.mark.parametrize("value", [1, "yes", None, np.float64(1.0)])
def test_bad_master_leaf_is_refused(value):
    with pytest.raises(TypeError, match="master_leaf"):
        fastff.FFF(4, 2, 3, 2, master_leaf=value)


@pytest.mark.parametrize("hardened", [False, True])
def test_empty_batch_and_depth_zero(hardened):
    layer = fastff.FFF(4, 2, 3, 2, train_hardened=hardened, master_leaf=True, seed=0)
    y, backprop = layer.forward_train(np.zeros((0, 4), np.float32), load_balancing=1.0)
    assert y.shape == (0, 3) and layer.last_balance_loss == 0.0
    assert backprop(np.zeros((0, 3), np.float32)).shape == (0, 4)
    one_leaf = fastff.FFF(4, 2, 3, 0, train_hardened=hardened, master_leaf=True, seed=0)
    x = np.ones((3, 4), np.float32)
    y, backprop = one_leaf.forward_train(x, load_balancing=1.0)
    assert one_leaf.last_balance_loss == pytest.approx(1.0)  # one leaf takes every row
    backprop(np.ones_like(y))
    stats = one_leaf.routing_stats(x)
    assert stats["leaf_counts"].tolist() == [3] and stats["node_counts"].shape == (0,)
    assert stats["routing_entropy"] == 0.0 and stats["max_routing_entropy"] == 0.0


# ---- routing diagnostics ------------------------------------------------------------------------


@given(
    depth=st.integers(0, 7),
    batch=st.integers(0, 300),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**32 - 1),
)
def test_fff_routing_stats_match_reference(depth, batch, dtype, seed):
    rng = np.random.default_rng(seed)
    layer = fastff.FFF(10, 2, 3, depth, dtype=dtype, seed=seed)
    state = dyadic_state(layer, rng)
    x = dyadic(rng, (batch, 10), denom=8)
    stats = layer.routing_stats(x)
    z = x @ state["node_weights"].T + state["node_biases"].T
    visited, leaf = R.fff_hard_paths(z, (z >= 0).astype(np.intp))
    leaf_counts = np.bincount(leaf, minlength=2**depth)
    np.testing.assert_array_equal(stats["leaf_counts"], leaf_counts)
    np.testing.assert_array_equal(stats["node_counts"], visited.sum(axis=0))
    assert stats["rows"] == batch
    assert stats["dead_leaf_fraction"] == pytest.approx((leaf_counts == 0).mean())
    share = leaf_counts[leaf_counts > 0] / max(batch, 1)
    assert stats["routing_entropy"] == pytest.approx(-(share * np.log2(share)).sum(), abs=1e-12)
    assert 0 <= stats["routing_entropy"] <= depth + 1e-12
    assert stats["balance"] == pytest.approx(2**depth * ((leaf_counts / max(batch, 1)) ** 2).sum())
    # the leaves the stats count are where inference sends the rows
    np.testing.assert_allclose(layer(x), R.fff_infer(x, state, "relu"), rtol=1e-6, atol=1e-6)


def test_routing_stats_by_hand():
    layer = fastff.FFF(1, 1, 1, 2, dtype=np.float64)
    layer.load_state_dict(
        {**layer.state_dict(), "node_weights": np.ones((3, 1)), "node_biases": np.zeros((3, 1))}
    )
    x = np.array([[1.0], [2.0], [3.0], [-1.0], [0.0], [5.0]])  # >= 0: right, right -> leaf 3
    stats = layer.routing_stats(x)
    assert stats["leaf_counts"].tolist() == [1, 0, 0, 5]
    assert stats["node_counts"].tolist() == [6, 1, 5]
    assert stats["dead_leaf_fraction"] == 0.5
    assert stats["routing_entropy"] == pytest.approx(
        -(1 / 6 * np.log2(1 / 6) + 5 / 6 * np.log2(5 / 6))
    )
    assert stats["balance"] == pytest.approx(4 * ((1 / 6) ** 2 + (5 / 6) ** 2))
    assert layer.routing_stats(x.reshape(2, 3, 1))["leaf_counts"].tolist() == [1, 0, 0, 5]
    with pytest.raises(ValueError, match=r"\(..., 1\)"):
        layer.routing_stats(np.zeros((3, 2)))


@given(
    depth=st.integers(0, 6),
    trees=st.integers(1, 3),
    batch=st.integers(0, 200),
    seed=st.integers(0, 2**32 - 1),
)
def test_ultra_routing_stats_match_reference(depth, trees, batch, seed):
    rng = np.random.default_rng(seed)
    layer = fastff.UltraFFF(9, 2, depth, trees, dtype=np.float64, seed=seed)
    state = dyadic_state(layer, rng)
    x = dyadic(rng, (batch, 9), denom=8)
    stats = layer.routing_stats(x)
    z = x @ state["linear_in.weight"].T + state["linear_in.bias"]
    mask = R.ultra_visit_mask(z, depth, trees)
    counts = mask.sum(axis=0).astype(np.int64)
    np.testing.assert_array_equal(stats["node_counts"], counts)
    n_nodes = 2 ** (depth + 1) - 1
    leaves = counts.reshape(trees, n_nodes)[:, 2**depth - 1 :]
    np.testing.assert_array_equal(stats["leaf_counts"], leaves)
    assert stats["leaf_counts"].shape == (trees, 2**depth)
    assert (stats["leaf_counts"].sum(axis=1) == batch).all()
    assert stats["dead_node_fraction"] == pytest.approx((counts == 0).mean())
    assert stats["dead_leaf_fraction"] == pytest.approx((leaves == 0).mean())
    assert 0 <= stats["routing_entropy"] <= depth + 1e-12
    assert stats["max_routing_entropy"] == depth


def test_ultra_routing_stats_half_precision(rng):
    layer = fastff.UltraFFF(16, 3, 4, 2, seed=0)
    dyadic_state(layer, rng)
    x = dyadic(rng, (100, 16), denom=8).astype(np.float32)
    full, half = layer.routing_stats(x), layer.astype("bfloat16").routing_stats(x)
    np.testing.assert_array_equal(full["node_counts"], half["node_counts"])


def test_sharding_takes_a_plain_fff_config_and_refuses_the_master_leaf():
    """fastff.distributed.shard reads FFF.get_config(), which now says master_leaf."""
    from fastff.distributed._fff import ShardedFFF

    plain = ShardedFFF._normalize(fastff.FFF(4, 2, 3, 2).get_config())
    assert "master_leaf" not in plain and plain["depth"] == 2
    with pytest.raises(ValueError, match="master leaf"):
        ShardedFFF._normalize(fastff.FFF(4, 2, 3, 2, master_leaf=True).get_config())
