"""Validation and robustness: the gaps the reliability pass found, one test (or more) each.

Each block names the gap; the fuzz tests (test_fuzz.py) cover the same entry points with random
inputs, these pin the exact behaviour.
"""
import numpy as np
import pytest

import fastff


def _fff_state(layer, **overrides):
    """FFF state dict with every parameter zero, then `overrides`."""
    state = {k: np.zeros_like(v) for k, v in layer.state_dict().items()}
    state.update(overrides)
    return state


# ---- NaN policy ---------------------------------------------------------------------------------
# NaN propagates through every activation (the kernels' ReLU used to map NaN to 0, unlike
# np.maximum and torch.relu, so an UltraFFF or FFF with ReLU hid NaN inputs behind finite outputs).
# Routing: a NaN decision is false, so the row goes left: UltraFFF `z > 0`, FFF inference
# `z >= 0`, FFF hardened training `sigmoid(z) > 1/2` (also under a region-leak swap).

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_relu_propagates_nan(dtype):
    x = np.array([[np.nan, 1.0, 2.0], [0.5, 1.0, 2.0]], dtype)
    for layer in (fastff.UltraFFF(3, 4, 2, activation="relu", dtype=dtype, seed=0),
                  fastff.FFF(3, 5, 4, 2, activation="relu", dtype=dtype, seed=0),
                  fastff.FFF(3, 5, 4, 2, activation="relu", train_hardened=True, dtype=dtype,
                             seed=0)):
        for y in (layer(x), layer.forward_train(x)[0]):
            assert np.isnan(y[0]).all(), layer
            assert np.isfinite(y[1]).all(), layer


def test_fff_nan_router_logit_goes_left():
    """A NaN router weight makes the logit NaN for a finite x. The leaves ignore x (zero
    weights), so the output is the reached leaf's bias."""
    x = np.array([[0.5, -2.0]], np.float32)
    left, right = np.array([1.0, 0.0]), np.array([0.0, 1.0])
    nan_router = dict(node_weights=np.array([[np.nan, 1.0]]), b2s=np.stack([left, right]))
    for hardened in (False, True):
        layer = fastff.FFF(2, 1, 2, 1, activation="identity", train_hardened=hardened)
        layer.load_state_dict(_fff_state(layer, **nan_router))
        np.testing.assert_array_equal(layer(x), [left])  # inference: NaN >= 0 is false
        if hardened:
            y, backprop = layer.forward_train(x)
            np.testing.assert_array_equal(y, [left])
            backprop(np.ones((1, 2), np.float32))
            assert layer.grads["b2s"][1].sum() == 0 and layer.grads["b2s"][0].sum() == 2
        else:  # soft training mixes by sigmoid(NaN): the row is NaN
            assert np.isnan(layer.forward_train(x)[0]).all()
    layer = fastff.FFF(2, 1, 2, 1, activation="identity", train_hardened=True, region_leak=0.5)
    layer.load_state_dict(_fff_state(layer, **nan_router))
    for seed in range(8):  # swapped or not, a NaN decision goes left
        y, _ = layer.forward_train(x, rng=np.random.default_rng(seed))
        np.testing.assert_array_equal(y, [left])
