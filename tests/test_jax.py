"""fastff.jax: ultra_fff and fff under jax.jit, jax.grad and jax.vmap against fastff.reference
and the layers. Dyadic weights and inputs make routing exact (conftest.dyadic)."""

import subprocess
import sys

import numpy as np
import pytest

import fastff
from fastff import reference as R

from conftest import assert_close, dyadic

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")
fj = pytest.importorskip("fastff.jax")

DTYPES = [np.float32, np.float64]
ACTS = ["gelu", "relu", "identity"]


def x64(dtype):
    """The jax_enable_x64 scope a dtype needs (float64 arrays are float32 without it)."""
    enable = jax.enable_x64 if hasattr(jax, "enable_x64") else jax.experimental.enable_x64
    return enable(dtype == np.float64)


def ultra_params(rng, in_w, out_w, depth, trees, dtype):
    n = trees * (2 ** (depth + 1) - 1)
    shapes = {
        "linear_in.weight": (n, in_w),
        "linear_in.bias": (n,),
        "linear_out.weight": (out_w, n),
    }
    return {k: dyadic(rng, s, dtype=dtype) for k, s in shapes.items()}


def fff_params(rng, in_w, leaf_w, out_w, depth, dtype):
    layer = fastff.FFF(in_w, leaf_w, out_w, depth, dtype=dtype, seed=0)
    return {k: dyadic(rng, v.shape, dtype=dtype) for k, v in layer.state_dict().items()}


def f64(params):
    return {k: np.asarray(v, np.float64) for k, v in params.items()}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ACTS)
def test_ultra_grad_under_jit_matches_reference(rng, dtype, act):
    depth, trees, in_w, out_w = 3, 2, 12, 5
    with x64(dtype):
        params = ultra_params(rng, in_w, out_w, depth, trees, dtype)
        x = dyadic(rng, (2, 7, in_w), denom=8, dtype=dtype)  # leading dims (2, 7)
        target = dyadic(rng, (2, 7, out_w), dtype=dtype)

        def loss(p, x):
            y = fj.ultra_fff(p, x, depth=depth, parallel_size=trees, activation=act)
            return jnp.sum(y * target)

        value, (gp, gx) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(params, x)
        assert gx.dtype == dtype and gp["linear_in.weight"].dtype == dtype
    rows = np.asarray(x, np.float64).reshape(-1, in_w)
    y_ref, cache = R.ultra_forward(rows, f64(params), depth, trees, act)
    dy = np.asarray(target, np.float64).reshape(-1, out_w)
    dx_ref, g_ref = R.ultra_backward(dy, cache, f64(params), act)
    terms = trees * (depth + 1) * max(in_w, out_w) * rows.shape[0]
    assert_close(value, (y_ref * dy).sum(), dtype, terms * out_w, "loss")
    assert_close(gx, dx_ref.reshape(x.shape), dtype, terms, "dx")
    for key, expected in g_ref.items():
        assert gp[key].shape == params[key].shape
        assert_close(gp[key], expected, dtype, terms, key)


@pytest.mark.parametrize("dtype", DTYPES)
def test_ultra_matches_layer(rng, dtype):
    layer = fastff.UltraFFF(10, 4, 4, 3, "gelu", dtype=dtype, seed=1)
    layer.load_state_dict({k: dyadic(rng, v.shape) for k, v in layer.state_dict().items()})
    x = dyadic(rng, (9, 10), denom=8, dtype=dtype)
    with x64(dtype):
        y = jax.jit(lambda p, x: fj.ultra_fff(p, x, depth=4, parallel_size=3))(
            layer.state_dict(), x
        )
        np.testing.assert_array_equal(np.asarray(y), layer(x))


def test_ultra_vmap_equals_loop(rng):
    depth, trees, in_w, out_w = 2, 2, 6, 3
    params = ultra_params(rng, in_w, out_w, depth, trees, np.float32)
    xs = dyadic(rng, (4, 5, in_w), denom=8, dtype=np.float32)
    target = dyadic(rng, (5, out_w), dtype=np.float32)

    def f(p, x):
        return fj.ultra_fff(p, x, depth=depth, parallel_size=trees)

    def loss(p, x):
        return jnp.sum(f(p, x) * target)

    # a batch over x, parameters shared
    ys = jax.jit(jax.vmap(f, in_axes=(None, 0)))(params, xs)
    np.testing.assert_array_equal(np.asarray(ys), np.stack([np.asarray(f(params, x)) for x in xs]))
    # per-example gradients: vmap of grad
    gs = jax.jit(jax.vmap(jax.grad(loss, argnums=(0, 1)), in_axes=(None, 0)))(params, xs)
    for i, x in enumerate(xs):
        gp, gx = jax.grad(loss, argnums=(0, 1))(params, x)
        np.testing.assert_array_equal(np.asarray(gs[1][i]), np.asarray(gx))
        for key in params:
            np.testing.assert_array_equal(np.asarray(gs[0][key][i]), np.asarray(gp[key]))
    # a batch over the parameters, x shared
    stacked = {k: np.stack([v, v * 0.5, -v]) for k, v in params.items()}
    ys = jax.vmap(f, in_axes=(0, None))(stacked, xs[0])
    for i in range(3):
        p = {k: v[i] for k, v in stacked.items()}
        np.testing.assert_array_equal(np.asarray(ys[i]), np.asarray(f(p, xs[0])))


def test_jit_traces_once(rng):
    params = ultra_params(rng, 6, 3, 2, 1, np.float32)
    traces = []

    @jax.jit
    def step(p, x):
        traces.append(1)  # runs only while tracing
        loss, g = jax.value_and_grad(lambda p: jnp.sum(fj.ultra_fff(p, x, depth=2) ** 2))(p)
        return jax.tree_util.tree_map(lambda a, b: a - 0.01 * b, p, g), loss

    for _ in range(4):
        params, _ = step(params, dyadic(rng, (8, 6), dtype=np.float32))
    assert len(traces) == 1


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ["relu", "gelu"])
def test_fff_inference_matches_layer(rng, dtype, act):
    layer = fastff.FFF(7, 4, 3, 3, act, dtype=dtype, seed=2)
    state = {k: dyadic(rng, v.shape) for k, v in layer.state_dict().items()}
    layer.load_state_dict(state)
    x = dyadic(rng, (3, 11, 7), denom=8, dtype=dtype)  # ties z == 0 occur: they go right
    with x64(dtype):
        y = jax.jit(lambda p, x: fj.fff(p, x, depth=3, activation=act))(layer.state_dict(), x)
        np.testing.assert_array_equal(np.asarray(y), layer(x))
        ys = jax.vmap(lambda x: fj.fff(layer.state_dict(), x, depth=3, activation=act))(x)
        np.testing.assert_array_equal(np.asarray(ys), layer(x))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_fff_grad_matches_reference(rng, dtype, mode):
    depth, in_w, leaf_w, out_w, hardening = 3, 6, 4, 3, 0.5
    params = fff_params(rng, in_w, leaf_w, out_w, depth, dtype)
    x = dyadic(rng, (10, in_w), denom=8, dtype=dtype)
    target = dyadic(rng, (10, out_w), dtype=dtype)
    with x64(dtype):

        def loss(p, x):
            y, ent = fj.fff(p, x, depth=depth, mode=mode, return_entropy=True)
            return jnp.sum(y * target) + hardening * ent, ent

        (_, ent), (gp, gx) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(
            params, x
        )
    hard = mode == "hard"
    x64_ = np.asarray(x, np.float64)
    _, ent_ref, cache = R.fff_train_forward(x64_, f64(params), "relu", hardened=hard)
    dx_ref, g_ref = R.fff_train_backward(
        np.asarray(target, np.float64), cache, f64(params), "relu", hardening
    )
    terms = (2**depth) * leaf_w * max(in_w, out_w) * x.shape[0]
    assert_close(ent, ent_ref, dtype, terms, "entropy")
    assert_close(gx, dx_ref, dtype, terms, "dx")
    for key, expected in g_ref.items():
        assert_close(gp[key], expected, dtype, terms, key)


def test_errors(rng):
    params = ultra_params(rng, 6, 3, 2, 1, np.float32)
    x = np.zeros((2, 6), np.float32)
    with pytest.raises(KeyError, match="linear_in.bias"):
        fj.ultra_fff({k: v for k, v in params.items() if k != "linear_in.bias"}, x, depth=2)
    with pytest.raises(ValueError, match="linear_in.weight"):
        fj.ultra_fff(params, x, depth=3)
    with pytest.raises(ValueError, match="activation"):
        fj.ultra_fff(params, x, depth=2, activation="tanh")
    with pytest.raises(TypeError, match="float32 or float64"):
        fj.ultra_fff({k: v.astype(np.int32) for k, v in params.items()}, x, depth=2)
    with pytest.raises(ValueError, match="mode"):
        fj.fff(fff_params(rng, 6, 2, 3, 1, np.float32), x, depth=1, mode="soft-ish")
    # the input is blamed for a wrong width, as the layers do; bool and complex are refused
    for call in (
        lambda x: fj.ultra_fff(params, x, depth=2),
        lambda x: fj.fff(fff_params(rng, 6, 2, 3, 1, np.float32), x, depth=1),
    ):
        with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., 6\), got \(2, 5\)"):
            call(np.zeros((2, 5), np.float32))
        with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., 6\), got \(\)"):
            call(np.float32(1))
        for bad in (np.zeros((2, 6), bool), np.zeros((2, 6), np.complex64)):
            with pytest.raises(TypeError, match="x must hold real numbers"):
                call(bad)


def test_import_fastff_does_not_import_jax():
    code = "import sys, fastff; assert 'jax' not in sys.modules and 'fastff.jax' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
