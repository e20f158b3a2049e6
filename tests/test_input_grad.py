"""forward_train(x, input_grad=False): the input needs no gradient (a training loop's data), so
backprop returns None and skips dx's work; every parameter gradient must be bitwise the one of
the full backward."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import fastff
from fastff import nn
from fastff.module import Module, run_once

DTYPES = [np.float32, np.float64]


def _backward_both_ways(make, x, dy, **options):
    """(y, dx, grads) of the full backward and (y, result, grads) with input_grad=False, each on
    a fresh module from make() and a fresh rng of the same seed."""
    runs = []
    for input_grad in (True, False):
        module = make()
        module.zero_grad()
        kw = dict(options)
        if "rng" in kw:
            kw["rng"] = np.random.default_rng(kw["rng"])
        y, backprop = module.forward_train(x, input_grad=input_grad, **kw)
        runs.append((y, backprop(dy), {k: v.copy() for k, v in module.grads.items()}))
    return runs


def _assert_same_gradients(full, skipped, x):
    (y_full, dx, g_full), (y_skip, none, g_skip) = full, skipped
    assert none is None
    assert dx is not None and dx.shape == x.shape
    np.testing.assert_array_equal(y_skip, y_full)
    assert set(g_skip) == set(g_full)
    for key in g_full:
        np.testing.assert_array_equal(g_skip[key], g_full[key], err_msg=key)


@given(
    in_w=st.integers(1, 40),
    out_w=st.integers(1, 20),
    depth=st.integers(0, 5),
    trees=st.integers(1, 3),
    batch=st.integers(0, 80),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**32 - 1),
)
def test_ultra_fff_without_input_grad(in_w, out_w, depth, trees, batch, dtype, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, in_w)).astype(dtype)
    dy = rng.standard_normal((batch, out_w)).astype(dtype)
    full, skipped = _backward_both_ways(
        lambda: fastff.UltraFFF(in_w, out_w, depth, trees, "gelu", dtype=dtype, seed=seed), x, dy
    )
    _assert_same_gradients(full, skipped, x)


@given(
    in_w=st.integers(1, 30),
    leaf_w=st.integers(1, 8),
    out_w=st.integers(1, 12),
    depth=st.integers(0, 4),
    batch=st.integers(0, 60),
    dtype=st.sampled_from(DTYPES),
    hardened=st.booleans(),
    master_leaf=st.booleans(),
    dropout=st.sampled_from([0.0, 0.3]),
    region_leak=st.sampled_from([0.0, 0.2]),
    hardening=st.sampled_from([0.0, 1.5]),
    load_balancing=st.sampled_from([0.0, 0.1]),
    seed=st.integers(0, 2**32 - 1),
)
def test_router_leaf_fff_without_input_grad(
    in_w,
    leaf_w,
    out_w,
    depth,
    batch,
    dtype,
    hardened,
    master_leaf,
    dropout,
    region_leak,
    hardening,
    load_balancing,
    seed,
):
    """Soft and hardened training, with the entropy and balancing terms (whose router
    gradients also reach dx), dropout, region leak and the master leaf."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, in_w)).astype(dtype)
    dy = rng.standard_normal((batch, out_w)).astype(dtype)

    def make():
        return fastff.FFF(
            in_w,
            leaf_w,
            out_w,
            depth,
            "relu",
            dropout=dropout,
            train_hardened=hardened,
            region_leak=region_leak,
            master_leaf=master_leaf,
            dtype=dtype,
            seed=seed,
        )

    full, skipped = _backward_both_ways(
        make, x, dy, rng=seed, hardening=hardening, load_balancing=load_balancing
    )
    _assert_same_gradients(full, skipped, x)


@pytest.mark.parametrize("dtype", DTYPES)
def test_sequential_tells_its_first_child_only(dtype):
    """A Sequential without input_grad skips the first child's dx and no other: the gradients
    of every layer are bitwise the full backward's. Its first child's backprop returns None."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((33, 20)).astype(dtype)
    dy = rng.standard_normal((33, 4)).astype(dtype)

    def make():
        return nn.Sequential(
            nn.Linear(20, 16, dtype=dtype, seed=1),
            nn.GELU(),
            nn.Dropout(0.25, seed=2),
            fastff.FFF(16, 4, 8, 2, dtype=dtype, seed=3),
            nn.ReLU(),
            fastff.UltraFFF(8, 4, 3, dtype=dtype, seed=4),
        )

    full, skipped = _backward_both_ways(make, x, dy, rng=5)
    _assert_same_gradients(full, skipped, x)

    calls = []
    model = make()
    first = model.layers[0]
    original = first.forward_train

    def spy(x, **kw):
        calls.append(kw)
        return original(x, **kw)

    first.forward_train = spy
    model.forward_train(x, input_grad=False)
    model.forward_train(x)
    assert calls == [{"input_grad": False}, {}]


@pytest.mark.parametrize("module", [nn.ReLU(), nn.Tanh(), nn.Dropout(0.5), nn.Dropout(0.0)])
def test_parameterless_first_modules(module):
    x = np.random.default_rng(0).standard_normal((5, 3)).astype(np.float32)
    y, backprop = module.forward_train(x, input_grad=False)
    assert backprop(np.ones_like(y)) is None
    _, backprop = module.forward_train(x, input_grad=False)
    with pytest.raises(ValueError, match="shape of y"):  # dy is still checked
        backprop(np.ones((5, 4), np.float32))


class _Scale(Module):
    """A user module whose forward_train takes no input_grad."""

    def __init__(self):
        super().__init__()
        self.dtype = self.compute_dtype = None

    def __call__(self, x):
        return 2 * x

    def forward_train(self, x):
        return 2 * x, run_once(lambda dy: 2 * dy)


def test_a_first_child_without_the_option_still_trains():
    """A user module that does not take input_grad computes its dx as before; the Sequential
    returns None all the same, and the later layers' gradients are unchanged."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((9, 6)).astype(np.float32)
    dy = rng.standard_normal((9, 3)).astype(np.float32)
    full, skipped = _backward_both_ways(
        lambda: nn.Sequential(_Scale(), nn.Linear(6, 3, seed=0)), x, dy
    )
    _assert_same_gradients(full, skipped, x)


@pytest.mark.parametrize(
    "module",
    [
        nn.Linear(3, 2),
        nn.ReLU(),
        nn.Dropout(0.1),
        fastff.UltraFFF(3, 2, 1),
        fastff.FFF(3, 2, 2, 1),
        nn.Sequential(nn.Linear(3, 2)),
    ],
)
@pytest.mark.parametrize("bad", ["no", 0, None, np.array([True])])
def test_input_grad_must_be_a_bool(module, bad):
    with pytest.raises(TypeError, match="input_grad must be True or False"):
        module.forward_train(np.ones((2, 3), np.float32), input_grad=bad)


def test_hard_backward_kernel_refuses_a_dx_of_other_rows():
    """The CPU kernel skips dx when handed one of no rows; any other row count but the batch's
    is refused, not half-filled."""
    from fastff import _cmm
    from fastff.ops import ACTIVATIONS

    layer = fastff.FFF(5, 3, 2, 2, train_hardened=True, seed=0)
    x = np.random.default_rng(0).standard_normal((4, 5)).astype(np.float32)
    _, saved = layer.ops.fff_hard_forward(x, layer._params, 2, "relu", 1)
    p, g = layer._params, {k: np.zeros_like(v) for k, v in layer._params.items()}
    dy = np.ones((4, 2), np.float32)
    no_mask = (np.empty((0, 0), np.uint8), False, np.empty((0, 0), np.float32), False)
    for rows in (1, 5):
        with pytest.raises(ValueError, match="one row per input row"):
            _cmm.fff_hard_train_backward(
                x,
                dy,
                p["node_w"],
                p["w1t"],
                p["w2"],
                saved["path"],
                saved["z_path"],
                saved["leaf"],
                *no_mask,
                saved["hpre"],
                ACTIVATIONS["relu"],
                0.0,
                np.empty((rows, 5), np.float32),
                g["node_w"],
                g["node_b"].reshape(-1),
                g["w1t"],
                g["b1"],
                g["w2"],
                g["b2"],
                1,
            )


def test_parameterless_first_children_pass_it_on():
    """Input dropout and an activation ahead of the first Linear: they need no dx, so neither
    does the Linear, which is told too; the later layers are not. Gradients are bitwise the
    full backward's."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((17, 12)).astype(np.float32)
    dy = rng.standard_normal((17, 3)).astype(np.float32)

    def make():
        return nn.Sequential(
            nn.Dropout(0.2, seed=1),
            nn.Tanh(),
            nn.Linear(12, 8, seed=2),
            nn.ReLU(),
            nn.Linear(8, 3, seed=3),
        )

    full, skipped = _backward_both_ways(make, x, dy, rng=7)
    _assert_same_gradients(full, skipped, x)
    model, told = make(), []
    for m in model.layers:
        original = m.forward_train

        def spy(x, _original=original, **kw):
            told.append(kw.get("input_grad", True))
            return _original(x, **kw)

        m.forward_train = spy
    model.forward_train(x, input_grad=False)
    assert told == [False, False, False, True, True]


def test_a_sequential_of_parameterless_modules_still_checks_dy():
    model = nn.Sequential(nn.ReLU(), nn.Dropout(0.0))
    x = np.ones((4, 2), np.float32)
    y, backprop = model.forward_train(x, input_grad=False)
    assert backprop(np.ones_like(y)) is None
    _, backprop = model.forward_train(x, input_grad=False)
    with pytest.raises(ValueError, match="shape of y"):
        backprop(np.ones((4, 3), np.float32))


def test_a_replaced_child_is_inspected_again():
    """Sequential.layers is a plain list: a child replaced after construction gets the options
    its own forward_train takes (here none), and unknown options never list input_grad."""
    model = nn.Sequential(nn.Linear(6, 6, seed=0), nn.Linear(6, 3, seed=1))
    model.layers[0] = _Scale()
    x = np.ones((2, 6), np.float32)
    y, backprop = model.forward_train(x, input_grad=False)
    assert backprop(np.ones_like(y)) is None
    with pytest.raises(TypeError, match=r"accepts the option\(s\) \['rng'\]; accepted: \[\]"):
        model.forward_train(x, rng=np.random.default_rng(0))


def test_ultra_fff_regrouped_rows_without_input_grad(subtree_bytes):
    """Batches large enough to be regrouped by subtree (forward) and reordered (backward)."""
    from fastff import _cmm

    subtree_bytes(1 << 12)  # 15-node subtrees of 256-byte nodes
    assert _cmm._subtree_split(600, 7, 40, 24, 4) == 4
    rng = np.random.default_rng(8)
    x = rng.standard_normal((600, 40)).astype(np.float32)
    dy = rng.standard_normal((600, 24)).astype(np.float32)
    full, skipped = _backward_both_ways(lambda: fastff.UltraFFF(40, 24, 7, 2, seed=8), x, dy)
    _assert_same_gradients(full, skipped, x)
