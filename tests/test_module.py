"""Module base class behaviour shared by every layer."""

import numpy as np

import fastff


def test_state_dict_holds_copies():
    """Changing a layer after state_dict() must not change the returned arrays, contiguous
    parameters included (np.ascontiguousarray would hand those back uncopied)."""
    layer = fastff.UltraFFF(3, 2, 1, seed=1)
    state = layer.state_dict()
    before = {k: v.copy() for k, v in state.items()}
    for p in layer.params.values():
        p += 1
    for k in state:
        np.testing.assert_array_equal(state[k], before[k], err_msg=k)
        assert state[k].flags.c_contiguous
