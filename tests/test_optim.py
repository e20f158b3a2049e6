"""fastff.optim: updates against hand-written formulas, in-place write-through, schedules."""

import math
import platform

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import fastff
from fastff import _cmm, nn, optim
from fastff import reference as R
from fastff.cpu import ops


def make_model():
    """A Linear (weight stored transposed) and an UltraFFF (linear_out stored transposed)."""
    return nn.Sequential(
        nn.Linear(3, 4, dtype=np.float64, seed=0),
        fastff.UltraFFF(4, 2, 1, dtype=np.float64, seed=1),
    )


def run_steps(opt, model, grads_per_step):
    """Write the given gradients into the model and step; returns the state after each step."""
    states = []
    for grads in grads_per_step:
        for name, g in model.grads.items():
            g[...] = grads[name]
        opt.step()
        states.append(model.state_dict())
    return states


def random_grads(model, n_steps, seed=0):
    rng = np.random.default_rng(seed)
    return [
        {k: rng.standard_normal(v.shape) for k, v in model.state_dict().items()}
        for _ in range(n_steps)
    ]


def expected_sgd(p0, grads, lr, momentum=0.0, nesterov=False, weight_decay=0.0):
    p, buf, out = p0.copy(), np.zeros_like(p0), []
    for g in grads:
        g = g + weight_decay * p
        if momentum:
            buf = momentum * buf + g
            g = g + momentum * buf if nesterov else buf
        p = p - lr * g
        out.append(p)
    return out


def expected_adam(p0, grads, lr, b1, b2, eps, weight_decay=0.0, decoupled=False):
    p, m, v, out = p0.copy(), np.zeros_like(p0), np.zeros_like(p0), []
    for t, g in enumerate(grads, start=1):
        if decoupled:
            p = p * (1 - lr * weight_decay)
        else:
            g = g + weight_decay * p
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        m_hat, v_hat = m / (1 - b1**t), v / (1 - b2**t)
        p = p - lr * m_hat / (np.sqrt(v_hat) + eps)
        out.append(p)
    return out


def assert_states(model, start, states, grads, expected_fn):
    for name in start:
        expected = expected_fn(start[name], [g[name] for g in grads])
        for step, (state, exp) in enumerate(zip(states, expected)):
            np.testing.assert_allclose(
                state[name], exp, rtol=1e-12, atol=1e-14, err_msg=f"{name} after step {step + 1}"
            )


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(lr=0.1),
        dict(lr=0.05, momentum=0.9),
        dict(lr=0.05, momentum=0.8, nesterov=True),
        dict(lr=0.1, momentum=0.5, weight_decay=0.01),
        dict(lr=0.1, weight_decay=0.3),
    ],
)
def test_sgd_matches_formula(kwargs):
    model = make_model()
    start, grads = model.state_dict(), random_grads(model, 3)
    states = run_steps(optim.SGD(model, **kwargs), model, grads)
    assert_states(model, start, states, grads, lambda p, g: expected_sgd(p, g, **kwargs))


@pytest.mark.parametrize(
    "cls, kwargs, decoupled",
    [
        (optim.Adam, dict(lr=1e-2), False),
        (optim.Adam, dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1), False),
        (optim.AdamW, dict(lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1), True),
    ],
)
def test_adam_matches_formula(cls, kwargs, decoupled):
    model = make_model()
    start, grads = model.state_dict(), random_grads(model, 3, seed=1)
    states = run_steps(cls(model, **kwargs), model, grads)
    args = dict(
        lr=kwargs["lr"],
        b1=kwargs.get("betas", (0.9, 0.999))[0],
        b2=kwargs.get("betas", (0.9, 0.999))[1],
        eps=kwargs.get("eps", 1e-8),
        weight_decay=kwargs.get("weight_decay", 0.0),
        decoupled=decoupled,
    )
    assert_states(model, start, states, grads, lambda p, g: expected_adam(p, g, **args))


def test_adam_first_step_is_lr_times_sign():
    """Bias correction: after one step m_hat/sqrt(v_hat) = g/|g|, so every weight moves by lr."""
    model = make_model()
    start = model.state_dict()
    grads = random_grads(model, 1, seed=2)
    (state,) = run_steps(optim.Adam(model, lr=0.01, eps=1e-12), model, grads)
    for name in start:
        np.testing.assert_allclose(
            state[name] - start[name], -0.01 * np.sign(grads[0][name]), rtol=1e-9
        )


def test_adamw_decay_is_decoupled():
    """With zero gradients Adam(weight_decay) moves by lr * sign(p) (the decay goes through the
    normalisation), AdamW shrinks by the factor 1 - lr * wd."""
    zeros = {k: np.zeros_like(v) for k, v in make_model().state_dict().items()}
    model_w = make_model()
    start = model_w.state_dict()
    (after_w,) = run_steps(optim.AdamW(model_w, lr=0.1, weight_decay=0.5), model_w, [zeros])
    model_l2 = make_model()
    (after_l2,) = run_steps(
        optim.Adam(model_l2, lr=0.1, weight_decay=0.5, eps=1e-12), model_l2, [zeros]
    )
    for name in start:
        np.testing.assert_allclose(after_w[name], start[name] * 0.95, rtol=1e-12)
        np.testing.assert_allclose(
            after_l2[name], start[name] - 0.1 * np.sign(start[name]), rtol=1e-9
        )


def test_updates_reach_the_kernels(rng):
    """The optimizer writes through the anchor views into the layers' internal storage."""
    model = make_model()
    x = rng.standard_normal((6, 3))
    grads = random_grads(model, 1)
    (state,) = run_steps(optim.SGD(model, lr=0.5), model, grads)
    fresh = make_model()
    fresh.load_state_dict(state)
    np.testing.assert_array_equal(model(x), fresh(x))
    assert not np.array_equal(model(x), make_model()(x))


def test_step_marks_model_updated_and_zero_grad(rng):
    model = make_model()
    opt = optim.Adam(model)
    y, backprop = model.forward_train(rng.standard_normal((2, 3)))
    backprop(np.ones_like(y))
    assert any(g.any() for g in model.grads.values())
    _, pending = model.forward_train(rng.standard_normal((2, 3)))
    opt.step()
    with pytest.raises(RuntimeError, match="stale"):
        pending(np.ones_like(y))
    opt.zero_grad()
    assert not any(g.any() for g in model.grads.values())
    assert opt.step_count == 1 and set(opt.state) == set(model.state_dict())


def test_training_reduces_loss():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 3))
    target = x @ np.array([[1.0], [-2.0], [0.5]]) + 0.3
    model = nn.Linear(3, 1, dtype=np.float64, seed=0)
    opt = optim.SGD(model, lr=0.1, momentum=0.5)
    losses = []
    for _ in range(50):
        opt.zero_grad()
        y, backprop = model.forward_train(x)
        loss, dy = nn.mse(y, target)
        backprop(dy)
        opt.step()
        losses.append(loss)
    assert losses[-1] < 1e-12 * losses[0]  # noise-free: it converges to the exact fit


def lrs(schedule, n):
    values = [schedule.optimizer.lr]
    for _ in range(n):
        schedule.step()
        values.append(schedule.optimizer.lr)
    return values


def test_step_lr():
    opt = optim.SGD(nn.Linear(2, 2), lr=1.0)
    np.testing.assert_allclose(
        lrs(optim.StepLR(opt, 2, gamma=0.5), 5), [1.0, 1.0, 0.5, 0.5, 0.25, 0.25]
    )


def test_cosine_lr_with_warmup():
    opt = optim.SGD(nn.Linear(2, 2), lr=0.4)
    sched = optim.CosineLR(opt, total_steps=6, warmup_steps=2, min_lr=0.1)
    values = lrs(sched, 8)
    cos = [0.1 + 0.3 * 0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(5)]
    np.testing.assert_allclose(values, [0.2, 0.4] + cos + [0.1, 0.1])
    assert sched.lr_at(2) == pytest.approx(0.4)
    no_warmup = optim.CosineLR(optim.SGD(nn.Linear(2, 2), lr=1.0), total_steps=4)
    np.testing.assert_allclose(
        lrs(no_warmup, 4),
        [1.0, 0.5 + 0.5 / math.sqrt(2), 0.5, 0.5 - 0.5 / math.sqrt(2), 0.0],
        atol=1e-15,
    )


def test_one_cycle_lr_is_crammings_triangle():
    opt = optim.SGD(nn.Linear(2, 2), lr=2.0)
    values = lrs(optim.OneCycleLR(opt, total_steps=8), 10)
    # cramming's get_one_cycle: s / (N/2) before the middle, 2 - s / (N/2) after, N = 8
    expected = [2.0 * (s / 4 if s < 4 else max(0.0, 2 - s / 4)) for s in range(11)]
    np.testing.assert_allclose(values, expected)
    assert values[4] == 2.0 and values[0] == 0.0 and values[8] == 0.0
    early = optim.OneCycleLR(optim.SGD(nn.Linear(2, 2), lr=1.0), total_steps=10, peak_fraction=0.2)
    np.testing.assert_allclose(lrs(early, 4), [0.0, 0.5, 1.0, 0.875, 0.75])


@pytest.mark.parametrize(
    "make, exc, words",
    [
        (lambda m: optim.SGD(m, lr=-1.0), ValueError, "lr"),
        (lambda m: optim.SGD(m, lr="0.1"), TypeError, "lr"),
        (lambda m: optim.SGD(m, lr=float("nan")), ValueError, "lr"),
        (lambda m: optim.SGD(m, lr=0.1, momentum=1.0), ValueError, "momentum"),
        (lambda m: optim.SGD(m, lr=0.1, nesterov=True), ValueError, "nesterov"),
        (lambda m: optim.SGD(m, lr=0.1, weight_decay=-0.1), ValueError, "weight_decay"),
        (lambda m: optim.SGD([m], lr=0.1), TypeError, "Module"),
        (lambda m: optim.Adam(m, betas=(0.9,)), TypeError, "betas"),
        (lambda m: optim.Adam(m, betas=(0.9, 1.0)), ValueError, r"betas\[1\]"),
        (lambda m: optim.Adam(m, eps=0.0), ValueError, "eps"),
        (lambda m: optim.StepLR(optim.SGD(m, lr=1.0), 0), ValueError, "step_size"),
        (lambda m: optim.StepLR("opt", 1), TypeError, "Optimizer"),
        (lambda m: optim.CosineLR(optim.SGD(m, lr=1.0), 5, warmup_steps=5), ValueError, "warmup"),
        (lambda m: optim.CosineLR(optim.SGD(m, lr=1.0), 5, min_lr=2.0), ValueError, "min_lr"),
        (
            lambda m: optim.OneCycleLR(optim.SGD(m, lr=1.0), 5, peak_fraction=1.0),
            ValueError,
            "peak_fraction",
        ),
        (lambda m: optim.OneCycleLR(optim.SGD(m, lr=1.0), 0), ValueError, "total_steps"),
    ],
)
def test_argument_errors(make, exc, words):
    with pytest.raises(exc, match=words):
        make(nn.Linear(2, 2))


# ---- the fastfeedforward package's LocalSGD / LocalAdam rule ---------------------------------


def _usage_fff(mode="hard"):
    layer = fastff.FFF(6, 3, 2, 3, train_hardened=True, usage_mode=mode, dtype=np.float64, seed=0)
    x = np.random.default_rng(1).standard_normal((40, 6))
    return layer, x


def test_local_sgd_updates_only_leaves_with_enough_usage():
    layer, x = _usage_fff()
    opt = fastff.optim.SGD(layer, lr=0.1, local_batch_size=6)
    before = layer.state_dict()
    _, backprop = layer.forward_train(x)
    backprop(np.ones((40, 2)))
    usage = layer.leaf_usage.copy()
    grads = {k: v.copy() for k, v in layer.grads.items()}
    ready = usage >= 6
    assert ready.any() and (~ready).any()
    opt.step()
    after = layer.state_dict()
    for key in ("w1s", "b1s", "w2s", "b2s"):
        scale = np.where(ready, 6 / np.maximum(usage, 1), 0).reshape(
            (-1,) + (1,) * (grads[key].ndim - 1)
        )
        np.testing.assert_allclose(after[key], before[key] - 0.1 * grads[key] * scale, rtol=1e-12)
        np.testing.assert_array_equal(after[key][~ready], before[key][~ready])
    # hardened routers get no gradient without a hardening weight: ready or not, they stay
    np.testing.assert_array_equal(after["node_weights"], before["node_weights"])
    opt.zero_grad()
    for key in ("w1s", "b2s"):
        assert (layer.grads[key][ready] == 0).all()
        np.testing.assert_array_equal(
            layer.grads[key][~ready], grads[key][~ready]
        )  # keeps accumulating
    np.testing.assert_array_equal(layer.leaf_usage[ready], 0)
    np.testing.assert_array_equal(layer.leaf_usage[~ready], usage[~ready])


def test_local_adam_keeps_state_of_waiting_rows_and_plain_params_update_every_step():
    from fastff import nn

    fff, x = _usage_fff("soft")
    model = nn.Sequential(nn.Linear(6, 6, dtype=np.float64, seed=2), fff)
    opt = fastff.optim.Adam(model, lr=0.01, local_batch_size=1000)
    before = model.state_dict()
    _, backprop = model.forward_train(x)
    backprop(np.ones((40, 2)))
    opt.step()
    after = model.state_dict()
    assert not np.array_equal(after["0.weight"], before["0.weight"])
    for key in ("1.w1s", "1.node_weights"):  # nobody reached 1000 uses
        np.testing.assert_array_equal(after[key], before[key])
    with pytest.raises(ValueError):
        fastff.optim.SGD(model, lr=0.1, local_batch_size=0)


OPTIMIZERS = [
    lambda m: optim.SGD(m, lr=0.05),
    lambda m: optim.SGD(m, lr=0.05, momentum=0.9, weight_decay=0.01),
    lambda m: optim.SGD(m, lr=0.05, momentum=0.8, nesterov=True),
    lambda m: optim.Adam(m, lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1),
    lambda m: optim.AdamW(m, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1),
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("make_opt", OPTIMIZERS)
def test_fused_updates_give_the_bits_of_the_numpy_expressions(monkeypatch, make_opt, dtype):
    """On the CPU every parameter goes through one fused kernel (fastff._cmm.adam_update /
    sgd_update), whatever its layout: a transposed Linear weight, UltraFFF's node records
    (rows with a stride), FFF's 3-D leaf weights and (n, 1) biases. Their results equal the
    NumPy expressions' bit for bit (checked exactly on x86-64, see EXACT)."""

    def make_model():
        return nn.Sequential(
            nn.Linear(33, 70, dtype=dtype, seed=0),
            fastff.UltraFFF(70, 9, 5, 2, dtype=dtype, seed=1),
            fastff.FFF(9, 4, 3, 2, dtype=dtype, seed=2),
        )

    fused_model, numpy_model = make_model(), make_model()
    fused_opt, numpy_opt = make_opt(fused_model), make_opt(numpy_model)
    calls = []
    for kernel in ("adam_update", "sgd_update"):
        real = getattr(_cmm, kernel)
        monkeypatch.setattr(_cmm, kernel, lambda *a, _real=real: (calls.append(1), _real(*a))[1])
    rng = np.random.default_rng(0)
    for _ in range(3):
        grads = {k: rng.standard_normal(v.shape) for k, v in fused_model.grads.items()}
        for model in (fused_model, numpy_model):
            for key, g in model.grads.items():
                g[...] = grads[key]
        fused_opt.step()
        with monkeypatch.context() as patch:
            patch.setattr(ops, "_fused_views", lambda *arrays: None)
            numpy_opt.step()
    assert len(calls) == 3 * len(fused_model.grads)
    fused, reference = fused_model.state_dict(), numpy_model.state_dict()
    for key in fused:
        _assert_same(fused[key], reference[key], dtype)


def test_fused_views_and_kernel_checks():
    """_fused_views maps same-shaped arrays to (rows, cols) views with contiguous rows, in the
    first array's storage order, or says None; the kernels refuse what does not fit."""
    from fastff import _cmm

    a = np.zeros((4, 6), np.float32)
    p, g = ops._fused_views(a.T, np.zeros((4, 6), np.float32).T)
    assert p.shape == g.shape == (4, 6) and np.shares_memory(p, a)
    (q,) = ops._fused_views(np.zeros((2, 3, 5)))
    assert q.shape == (6, 5)
    (b,) = ops._fused_views(np.zeros(7, np.float32))
    assert b.shape == (1, 7)
    assert ops._fused_views(a, np.asfortranarray(np.zeros((4, 6), np.float32))) is None
    assert ops._fused_views(a, np.zeros((4, 6))) is None  # dtypes differ
    assert ops._fused_views(a, np.zeros((4, 5), np.float32)) is None
    assert ops._fused_views(np.zeros((3, 4), np.int64)) is None
    assert ops._fused_views(np.zeros((4, 12), np.float32)[:, ::2]) is None
    with pytest.raises(ValueError, match="one shape"):
        _cmm.sgd_update(a, np.zeros((4, 5), np.float32), a, False, 0.1, 0.0, 0.0, False, 1)
    with pytest.raises(ValueError, match="contiguous rows"):
        strided = np.zeros((4, 12), np.float32)[:, ::2]
        _cmm.adam_update(strided, strided, strided, strided, 0.0, False, 0.1, 0.9, 0.99, 1e-8, 1, 1)


def _layout(shape, dtype, transposed, strided):
    """A zero array of `shape`: in C order or transposed storage, its storage rows strided (a
    view of a wider array, like UltraFFF's node records) or not."""
    storage = shape[::-1] if transposed else shape
    if strided and len(storage) == 2:
        a = np.zeros((storage[0], storage[1] + 3), dtype)[:, : storage[1]]
    else:
        a = np.zeros(storage, dtype)
    return a.T if transposed else a


@st.composite
def update_cases(draw):
    """A parameter, its gradient and two state buffers in one orientation (the optimizer's
    arrays share it), each with or without strided rows."""
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    shape = draw(
        st.one_of(
            st.lists(st.integers(1, 9), min_size=1, max_size=3).map(tuple),
            st.sampled_from([(70, 1000), (3, 30000)]),  # several threads, chunks across rows
        )
    )
    transposed = draw(st.booleans())
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    arrays = []
    for kind in ("p", "g", "m", "v"):
        a = _layout(shape, dtype, transposed, draw(st.booleans()))
        # tiny gradients and moments (GELU's tails, decayed state) make subnormals on the way
        scale = 1.0 if kind == "p" else draw(st.sampled_from([1.0, 1e-20, 1e-160]))
        values = rng.standard_normal(shape) * scale
        a[...] = np.abs(values) * 0.01 if kind == "v" else values  # v (squares) is >= 0
        arrays.append(a)
    return dtype, arrays


# exact where CI runs; a compiler that ignores the kernels' contraction-off setting may fuse
EXACT = platform.machine().lower() in ("x86_64", "amd64")


def _assert_same(got, want, dtype):
    if EXACT:
        np.testing.assert_array_equal(got, want)
    else:  # a compiler that fuses multiply-adds rounds once less per pair
        np.testing.assert_allclose(got, want, rtol=1e-5 if dtype == np.float32 else 1e-12)


@given(
    update_cases(),
    st.floats(1e-4, 0.5),
    st.sampled_from([0.0, 1e-3, 0.1]),
    st.sampled_from([0.0, 0.5, 0.9]),
    st.booleans(),
)
def test_sgd_kernel_matches_reference(case, lr, weight_decay, momentum, nesterov):
    dtype, (p, g, buf, _) = case
    nesterov = nesterov and momentum > 0
    want_p, want_buf = R.sgd_step(p.copy(), g, buf.copy(), lr, momentum, nesterov, weight_decay)
    views = ops._fused_views(p, g, buf)
    assert views is not None
    _cmm.sgd_update(*views, momentum > 0, lr, weight_decay, momentum, nesterov, 1)
    _assert_same(p, want_p, dtype)
    if momentum:
        _assert_same(buf, want_buf, dtype)


@given(
    update_cases(),
    st.floats(1e-4, 0.1),
    st.sampled_from([0.0, 1e-2, 0.1]),
    st.booleans(),
    st.sampled_from([(0.9, 0.999), (0.8, 0.95)]),
    st.sampled_from([1e-8, 1e-6]),
    st.integers(1, 5000),
)
def test_adam_kernel_matches_reference(case, lr, weight_decay, decoupled, betas, eps, t):
    dtype, (p, g, m, v) = case
    want = R.adam_step(p.copy(), g, m.copy(), v.copy(), t, lr, *betas, eps, weight_decay, decoupled)
    views = ops._fused_views(p, g, m, v)
    assert views is not None
    _cmm.adam_update(*views, weight_decay, decoupled, lr, *betas, eps, t, 1)
    for got, exp in zip((p, m, v), want):
        _assert_same(got, exp, dtype)
