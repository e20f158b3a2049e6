"""Shared test helpers: hypothesis profiles, tolerances, and data whose routing is exact."""
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow],
    derandomize=True, print_blob=True,
)
settings.register_profile(
    "thorough", max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("FASTFF_HYPOTHESIS_PROFILE", "ci"))


def dyadic(rng, shape, levels=8, denom=16, dtype=np.float64):
    """Values k/denom with |k| <= levels. Dot products of such arrays are exact in float32 for
    widths up to a few thousand, so a kernel and the reference take identical routing decisions
    (ties z == 0 included) whatever their summation order."""
    return (rng.integers(-levels, levels + 1, size=shape) / denom).astype(dtype)


def dyadic_state(layer, rng):
    """Replace every parameter of `layer` by dyadic values; returns the float64 state dict."""
    state = {k: dyadic(rng, v.shape) for k, v in layer.state_dict().items()}
    layer.load_state_dict(state)
    return state


def tolerance(dtype, terms):
    """Absolute tolerance for a sum of `terms` products of O(1) magnitude, in `dtype`."""
    eps = np.finfo(dtype).eps
    return 16 * eps * np.sqrt(terms + 1) * (1 if dtype == np.float64 else 4)


def assert_close(actual, expected, dtype, terms, what=""):
    """Compare a kernel result with the float64 reference, scaled to dtype and sum length."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    scale = max(1.0, float(np.abs(expected).max(initial=0.0)))
    err = float(np.abs(actual - expected).max(initial=0.0))
    tol = tolerance(dtype, terms) * scale
    assert err <= tol, f"{what}: max abs error {err:.3g} > tolerance {tol:.3g} (scale {scale:.3g})"


@pytest.fixture
def rng():
    return np.random.default_rng(12345)
