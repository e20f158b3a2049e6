"""fastff.nn: layers against dense formulas and central finite differences, Sequential, losses."""

import math

import numpy as np
import pytest

import fastff
from fastff import nn, optim

DTYPES = [np.float32, np.float64]


def numeric_grad(f, arr, eps=1e-6):
    """Central differences of the scalar f() with respect to every element of arr (in place)."""
    grad = np.zeros(arr.shape)
    for idx in np.ndindex(arr.shape):
        old = arr[idx]
        arr[idx] = old + eps
        up = f()
        arr[idx] = old - eps
        down = f()
        arr[idx] = old
        grad[idx] = (up - down) / (2 * eps)
    return grad


def check_gradients(module, x, rng, tol=1e-6):
    """backprop of the loss sum(y * r) against finite differences, for x and every parameter."""
    y, backprop = module.forward_train(x)
    r = rng.standard_normal(y.shape)
    module.zero_grad()
    dx = backprop(r)

    def loss():
        return float(np.sum(module(x) * r))

    np.testing.assert_allclose(dx, numeric_grad(loss, x), rtol=tol, atol=tol)
    grads = module.grads
    for name, param in module.params.items():
        np.testing.assert_allclose(
            grads[name], numeric_grad(loss, param), rtol=tol, atol=tol, err_msg=name
        )
    return grads


GRADIENT_CASES = {
    "linear": lambda: nn.Linear(5, 3, dtype=np.float64, seed=0),
    "linear-no-bias": lambda: nn.Linear(5, 3, bias=False, dtype=np.float64, seed=0),
    "identity": nn.Identity,
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "mlp": lambda: nn.Sequential(
        nn.Linear(5, 7, dtype=np.float64, seed=1),
        nn.Tanh(),
        nn.Linear(7, 4, dtype=np.float64, seed=2),
        nn.Sigmoid(),
    ),
    "linear-ultra": lambda: nn.Sequential(
        nn.Linear(5, 6, dtype=np.float64, seed=3),
        fastff.UltraFFF(6, 4, 2, 2, dtype=np.float64, seed=4),
    ),
}


@pytest.mark.parametrize("case", sorted(GRADIENT_CASES))
def test_gradients_match_finite_differences(case):
    rng = np.random.default_rng(0)
    module = GRADIENT_CASES[case]()
    # inputs away from 0 so that the finite differences never straddle ReLU's kink
    x = rng.standard_normal((4, 5))
    x += np.sign(x) * 0.1
    check_gradients(module, x, rng)


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_matches_dense_formula(dtype):
    rng = np.random.default_rng(1)
    layer = nn.Linear(6, 3, dtype=dtype, seed=5)
    state = layer.state_dict()
    assert state["weight"].shape == (3, 6) and state["bias"].shape == (3,)
    x = rng.standard_normal((2, 4, 6))
    expected = x @ state["weight"].T.astype(np.float64) + state["bias"]
    y = layer(x)
    assert y.dtype == dtype and y.shape == (2, 4, 3)
    np.testing.assert_allclose(
        y,
        expected,
        rtol=1e-5 if dtype == np.float32 else 1e-12,
        atol=1e-5 if dtype == np.float32 else 1e-12,
    )
    y_train, backprop = layer.forward_train(x)
    np.testing.assert_array_equal(y_train, y)
    dy = rng.standard_normal(y.shape)
    dx = backprop(dy)
    assert dx.shape == x.shape and dx.dtype == dtype
    flat_x, flat_dy = x.reshape(-1, 6), dy.reshape(-1, 3)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(layer.grads["weight"], flat_dy.T @ flat_x, **tol)
    np.testing.assert_allclose(layer.grads["bias"], flat_dy.sum(0), **tol)
    np.testing.assert_allclose(dx, dy @ state["weight"], **tol)


def test_linear_init_like_torch_and_seeded():
    a = nn.Linear(64, 32, seed=3).state_dict()
    b = nn.Linear(64, 32, seed=3).state_dict()
    c = nn.Linear(64, 32, seed=4).state_dict()
    np.testing.assert_array_equal(a["weight"], b["weight"])
    assert not np.array_equal(a["weight"], c["weight"])
    for key in ("weight", "bias"):
        assert np.abs(a[key]).max() <= 1 / 8
    assert np.abs(a["weight"]).max() > 0.95 / 8  # really U(-1/sqrt(in), 1/sqrt(in))
    assert abs(a["weight"].mean()) < 0.01


def test_gradients_accumulate_until_zero_grad(rng):
    layer = nn.Linear(3, 2, dtype=np.float64, seed=0)
    x, dy = rng.standard_normal((5, 3)), rng.standard_normal((5, 2))
    layer.forward_train(x)[1](dy)
    once = {k: v.copy() for k, v in layer.grads.items()}
    layer.forward_train(x)[1](dy)
    for k in once:
        np.testing.assert_allclose(layer.grads[k], 2 * once[k])
    layer.zero_grad()
    assert all(not g.any() for g in layer.grads.values())


def test_parameter_views_write_through(rng):
    layer = nn.Linear(3, 2, dtype=np.float64, seed=0)
    x = rng.standard_normal((4, 3))
    layer.params["weight"][1, 2] += 1.0  # the anchor (out, in) view of the transposed storage
    y = layer(x)
    state = layer.state_dict()
    np.testing.assert_allclose(y, x @ state["weight"].T + state["bias"])
    other = nn.Linear(3, 2, dtype=np.float64, seed=9)
    other.load_state_dict(state)
    np.testing.assert_array_equal(other(x), y)


def test_activation_values():
    z = np.array([-800.0, -30.0, -3.0, -0.5, 0.0, 0.5, 3.0, 800.0])
    erf = np.vectorize(math.erf)
    with np.errstate(all="raise"):  # sigmoid of +-800 must not overflow
        np.testing.assert_allclose(
            nn.Sigmoid()(z),
            [1 / (1 + math.exp(-v)) if v > -700 else 0.0 for v in z],
            rtol=1e-12,
            atol=1e-300,
        )
        np.testing.assert_allclose(
            nn.GELU()(z), z * 0.5 * (1 + erf(z / math.sqrt(2))), rtol=1e-12, atol=1e-12
        )
    np.testing.assert_array_equal(nn.ReLU()(z), np.maximum(z, 0))
    np.testing.assert_allclose(nn.Tanh()(z), np.tanh(z))
    np.testing.assert_array_equal(nn.Identity()(z), z)
    _, backprop = nn.ReLU().forward_train(np.array([0.0, 1.0]))
    np.testing.assert_array_equal(backprop(np.ones(2)), [0.0, 1.0])  # derivative 0 at the kink


@pytest.mark.parametrize("act", [nn.ReLU, nn.GELU, nn.Tanh, nn.Sigmoid, nn.Identity])
def test_activations_keep_float_dtype(act):
    for dtype in DTYPES:
        y, backprop = act().forward_train(np.ones((2, 3), dtype))
        assert y.dtype == dtype
        assert backprop(np.ones((2, 3))).dtype == dtype
    assert act()(np.arange(3)).dtype == np.float64
    with pytest.raises(ValueError, match="shape of y"):
        act().forward_train(np.ones((2, 3)))[1](np.ones((3, 2)))
    with pytest.raises(TypeError, match="complex"):
        act()(np.ones(3, complex))
    assert act().get_config() == {}


def test_dropout():
    x = np.ones((200, 100), np.float32)
    drop = nn.Dropout(0.25, seed=0)
    np.testing.assert_array_equal(drop(x), x)  # inference is the identity
    y, backprop = drop.forward_train(x)
    assert y.dtype == np.float32
    assert set(np.unique(y)) == {0.0, np.float32(1 / 0.75)}
    assert abs((y == 0).mean() - 0.25) < 0.01
    dy = np.full_like(x, 3.0)
    np.testing.assert_array_equal(backprop(dy), 3.0 * y)  # the same mask
    a, _ = nn.Dropout(0.5).forward_train(x, rng=np.random.default_rng(7))
    b, _ = nn.Dropout(0.5).forward_train(x, rng=np.random.default_rng(7))
    np.testing.assert_array_equal(a, b)
    c, _ = nn.Dropout(0.5, seed=1).forward_train(x)
    d, _ = nn.Dropout(0.5, seed=1).forward_train(x)
    np.testing.assert_array_equal(c, d)
    np.testing.assert_array_equal(nn.Dropout(0.0).forward_train(x)[0], x)
    with pytest.raises(ValueError, match="p must be"):
        nn.Dropout(1.0)
    with pytest.raises(TypeError, match="rng"):
        drop.forward_train(x, rng=3)
    assert drop.get_config() == {"p": 0.25}


def make_model(dtype=np.float64):
    return nn.Sequential(
        nn.Linear(5, 6, dtype=dtype, seed=0),
        nn.Dropout(0.5, seed=1),
        fastff.UltraFFF(6, 4, 2, dtype=dtype, seed=2),
        nn.ReLU(),
        nn.Linear(4, 3, dtype=dtype, seed=3),
    )


def test_sequential_names_config_and_state():
    model = make_model()
    names = [name for name, _, _ in model.named_parameters()]
    assert names == [
        "0.weight",
        "0.bias",
        "2.linear_in.weight",
        "2.linear_in.bias",
        "2.linear_out.weight",
        "4.weight",
        "4.bias",
    ]
    assert list(model.state_dict()) == names
    assert model.grads["2.linear_out.weight"].shape == (4, 7)
    config = model.get_config()
    assert [m["kind"] for m in config["modules"]] == [
        "Linear",
        "Dropout",
        "UltraFFF",
        "ReLU",
        "Linear",
    ]
    assert config["modules"][2]["config"]["depth"] == 2
    other = make_model()
    for p in other.params.values():
        p[...] = 0
    other.load_state_dict(model.state_dict())
    x = np.random.default_rng(0).standard_normal((3, 5))
    np.testing.assert_array_equal(other(x), model(x))
    assert len(model) == 5 and model[2] is model.layers[2]
    assert model.n_parameters() == sum(v.size for v in model.state_dict().values())


def test_sequential_chains_forward_and_backward(rng):
    model = make_model()
    x = rng.standard_normal((8, 5))
    y, backprop = model.forward_train(x, rng=np.random.default_rng(3))
    dy = rng.standard_normal(y.shape)
    dx = backprop(dy)
    # the same chain by hand, with the same dropout draws
    h = x
    steps = []
    for i, m in enumerate(model):
        kw = {"rng": np.random.default_rng(3)} if i == 1 else {}
        h, step = m.forward_train(h, **kw)
        steps.append(step)
    np.testing.assert_array_equal(h, y)
    model.zero_grad()
    g = dy
    for step in reversed(steps):
        g = step(g)
    np.testing.assert_array_equal(g, dx)
    # inference skips dropout
    h = x
    for i, m in enumerate(model):
        h = h if i == 1 else m(h)
    np.testing.assert_array_equal(model(x), h)


def test_sequential_options_and_errors():
    model = make_model()
    x = np.zeros((2, 5))
    with pytest.raises(TypeError, match="hardening"):  # no child takes it: a typo is caught
        model.forward_train(x, hardening=0.1)
    with pytest.raises(ValueError, match="at least one"):
        nn.Sequential()
    with pytest.raises(TypeError, match="argument 1"):
        nn.Sequential(nn.ReLU(), lambda v: v)
    relu = nn.ReLU()
    with pytest.raises(ValueError, match="twice"):
        nn.Sequential(relu, relu)
    with pytest.raises(ValueError, match="dtypes"):
        nn.Sequential(nn.Linear(2, 2, dtype=np.float32), nn.Linear(2, 2, dtype=np.float64))
    assert nn.Sequential(nn.Linear(2, 2), nn.ReLU()).dtype == np.float32


def test_stale_backprop_raises_after_optimizer_step(rng):
    model = make_model()
    y, backprop = model.forward_train(rng.standard_normal((4, 5)))
    optim.SGD(model, lr=0.1).step()
    with pytest.raises(RuntimeError, match="stale"):
        backprop(np.ones_like(y))
    y, backprop = model.forward_train(rng.standard_normal((4, 5)))
    model.load_state_dict(model.state_dict())
    with pytest.raises(RuntimeError, match="stale"):
        backprop(np.ones_like(y))


@pytest.mark.parametrize(
    "kwargs, exc, words",
    [
        (dict(input_width=0), ValueError, "input_width"),
        (dict(output_width=2.0), TypeError, "output_width"),
        (dict(bias="yes"), TypeError, "bias"),
        (dict(dtype=np.int64), TypeError, "dtype"),
    ],
)
def test_linear_constructor_errors(kwargs, exc, words):
    args = dict(input_width=3, output_width=2)
    args.update(kwargs)
    with pytest.raises(exc, match=words):
        nn.Linear(**args)


def test_linear_input_errors():
    layer = nn.Linear(3, 2)
    with pytest.raises(ValueError, match=r"\(\.\.\., 3\)"):
        layer(np.zeros((4, 2)))
    with pytest.raises(TypeError, match="bool"):
        layer(np.zeros((4, 3), bool))
    _, backprop = layer.forward_train(np.zeros((4, 3)))
    with pytest.raises(ValueError, match="shape of y"):
        backprop(np.zeros((5, 2)))


def log_softmax_reference(logits):
    out = np.empty_like(logits, dtype=np.float64)
    for i, row in enumerate(logits):
        m = max(row)
        out[i] = [v - m - math.log(sum(math.exp(u - m) for u in row)) for v in row]
    return out


@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_cross_entropy_matches_formula(dtype):
    rng = np.random.default_rng(2)
    logits = (rng.standard_normal((6, 4)) * 3).astype(dtype)
    labels = np.array([0, 3, 1, 1, 2, 0])
    loss, dlogits = nn.softmax_cross_entropy(logits, labels)
    log_p = log_softmax_reference(logits.astype(np.float64))
    expected = -np.mean(log_p[np.arange(6), labels])
    tol = 1e-6 if dtype == np.float32 else 1e-13
    assert abs(loss - expected) < tol * 10
    onehot = np.eye(4)[labels]
    assert dlogits.dtype == dtype
    np.testing.assert_allclose(dlogits, (np.exp(log_p) - onehot) / 6, atol=tol)


def test_softmax_cross_entropy_gradient_and_stability():
    rng = np.random.default_rng(3)
    logits = rng.standard_normal((3, 5))
    labels = np.array([4, 0, 2], dtype=np.uint8)
    _, dlogits = nn.softmax_cross_entropy(logits, labels)
    np.testing.assert_allclose(
        dlogits,
        numeric_grad(lambda: nn.softmax_cross_entropy(logits, labels)[0], logits),
        atol=1e-8,
    )
    with np.errstate(over="raise", invalid="raise", divide="raise"):  # underflow to 0 is fine
        loss, d = nn.softmax_cross_entropy(np.array([[1000.0, 0.0], [0.0, -1000.0]]), [1, 0])
    assert loss == pytest.approx(500.0) and np.isfinite(d).all()


@pytest.mark.parametrize(
    "logits, labels, exc, words",
    [
        (np.zeros((2, 3)), np.array([0.0, 1.0]), TypeError, "integers"),
        (np.zeros((2, 3)), np.array([True, False]), TypeError, "integers"),
        (np.zeros((2, 3)), np.array([0, 3]), ValueError, r"\[0, 3\), found 3"),
        (np.zeros((2, 3)), np.array([-1, 0]), ValueError, "found -1"),
        (np.zeros((2, 3)), np.array([0, 1, 2]), ValueError, r"shape \(2,\)"),
        (np.zeros(3), np.array([0]), ValueError, "rows, classes"),
        (np.zeros((0, 3)), np.zeros(0, int), ValueError, "rows, classes"),
        (np.zeros((2, 3), complex), np.array([0, 1]), TypeError, "real"),
    ],
)
def test_softmax_cross_entropy_errors(logits, labels, exc, words):
    with pytest.raises(exc, match=words):
        nn.softmax_cross_entropy(logits, labels)


def test_mse():
    rng = np.random.default_rng(4)
    pred, target = rng.standard_normal((4, 3)), rng.standard_normal((4, 3))
    loss, dpred = nn.mse(pred, target)
    assert loss == pytest.approx(sum((p - t) ** 2 for p, t in zip(pred.flat, target.flat)) / 12)
    np.testing.assert_allclose(
        dpred, numeric_grad(lambda: nn.mse(pred, target)[0], pred), atol=1e-8
    )
    loss32, d32 = nn.mse(pred.astype(np.float32), target)
    assert d32.dtype == np.float32 and loss32 == pytest.approx(loss, rel=1e-6)
    with pytest.raises(ValueError, match="same shape"):
        nn.mse(pred, target[:2])
    with pytest.raises(ValueError, match="empty"):
        nn.mse(np.zeros(0), np.zeros(0))
    with pytest.raises(TypeError, match="real"):
        nn.mse(pred, target.astype(complex))
