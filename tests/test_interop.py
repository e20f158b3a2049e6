"""fastff.interop with plain NumPy state dicts: no torch needed (torch tests are in
test_interop_torch.py)."""

import numpy as np
import pytest

import fastff
from fastff.interop import fff_from_torch, tree_shape, ultra_from_torch

# ---- tree shapes and plain state dicts (no torch) ----------------------------------------------


def test_tree_shape_needs_a_hint_when_ambiguous():
    assert tree_shape(1) == (1, 0)
    assert tree_shape(15, parallel_size=5) == (5, 1)
    assert tree_shape(15, depth=3) == (1, 3)
    assert tree_shape(4 * 4095, parallel_size=4) == (4, 11)
    with pytest.raises(
        ValueError,
        match=r"in 3 ways \(parallel_size=15, depth=0; "
        r"parallel_size=5, depth=1; parallel_size=1, depth=3\)",
    ):
        tree_shape(15)
    with pytest.raises(ValueError, match="not parallel_size"):
        tree_shape(15, parallel_size=4)
    with pytest.raises(ValueError, match="not parallel_size"):
        tree_shape(15, parallel_size=5, depth=3)


def test_ultra_from_a_numpy_state_dict_under_a_prefix():
    source = fastff.UltraFFF(6, 4, depth=2, parallel_size=3, activation="relu", seed=0)
    state = {f"encoder.layer.1.ffn.{k}": v for k, v in source.state_dict().items()}
    state["encoder.layer.1.attention.weight"] = np.zeros((6, 6))  # another layer's weights
    layer = ultra_from_torch(
        state, prefix="encoder.layer.1.ffn.", parallel_size=3, activation="relu"
    )
    assert (layer.input_width, layer.output_width, layer.depth, layer.parallel_size) == (6, 4, 2, 3)
    x = np.random.default_rng(0).standard_normal((5, 6)).astype(np.float32)
    np.testing.assert_array_equal(layer(x), source(x))
    with pytest.raises(ValueError, match="no linear_in.weight.*prefix="):
        ultra_from_torch(state, parallel_size=3)
    with pytest.raises(ValueError, match="in 3 ways"):  # 21 rows: 21 trees of 1, 7 of 3, 3 of 7
        ultra_from_torch(state, prefix="encoder.layer.1.ffn.")


def test_fff_from_a_numpy_state_dict_checks_the_tree():
    source = fastff.FFF(5, 3, 2, depth=2, seed=0)
    state = source.state_dict()
    layer = fff_from_torch(dict(state, depth=np.int64(2)))
    assert (layer.input_width, layer.leaf_width, layer.output_width, layer.depth) == (5, 3, 2, 2)
    x = np.random.default_rng(1).standard_normal((7, 5)).astype(np.float32)
    np.testing.assert_array_equal(layer(x), source(x))
    with pytest.raises(ValueError, match="depth 3, this layer has depth 2"):
        fff_from_torch(dict(state, depth=np.int64(3)))
    with pytest.raises(ValueError, match="2\\*\\*depth leaves, got 3"):
        fff_from_torch(
            {k: v[:3] if k in ("w1s", "b1s", "w2s", "b2s") else v for k, v in state.items()}
        )
    with pytest.raises(ValueError, match="no b2s"):
        fff_from_torch({k: v for k, v in state.items() if k != "b2s"})
    with pytest.raises(TypeError, match="torch module or a state dict"):
        fff_from_torch([1, 2, 3])


def test_float64_weights_give_a_float64_layer():
    source = fastff.FFF(4, 2, 3, depth=1, dtype=np.float64, seed=0)
    assert fff_from_torch(source.state_dict()).dtype == np.float64
    assert fff_from_torch(source.state_dict(), dtype=np.float32).dtype == np.float32
