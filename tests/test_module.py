"""Module base class behaviour shared by every layer."""

import numpy as np

import fastff
from fastff import nn


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


def test_gradients_start_on_cache_lines_and_accumulate():
    """CPU gradients are 64-byte aligned like the weights (the backward's row updates then
    never split a cache line), start at zero, and stay in place through zero_grad()."""
    rng = np.random.default_rng(0)
    layers = [
        fastff.UltraFFF(20, 12, 3, 2, seed=0),
        fastff.FFF(20, 4, 12, 2, seed=0),
        nn.Linear(20, 12, seed=0),
    ]
    for layer in layers:
        x = rng.standard_normal((9, 20)).astype(np.float32)
        assert all(float(np.abs(g).sum()) == 0 for g in layer.grads.values())
        y, backprop = layer.forward_train(x)
        backprop(np.ones_like(y))
        internal = layer._grads
        assert all(g.ctypes.data % 64 == 0 for g in internal.values()), type(layer).__name__
        assert any(float(np.abs(g).sum()) > 0 for g in layer.grads.values())
        layer.zero_grad()
        assert layer._grads is internal and all(g.ctypes.data % 64 == 0 for g in internal.values())
        assert all(float(np.abs(g).sum()) == 0 for g in layer.grads.values())


# ---- Issue 18: the submodules from a plain `import fastff` -----------------------------------
# fastff.nn.Linear raised AttributeError after `import fastff`, and fastff.load of a saved
# Sequential failed with "unknown module kind 'Sequential'" unless fastff.nn had been imported.


def _fresh_python(code: str) -> str:
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_submodules_are_reachable_from_import_fastff():
    out = _fresh_python(
        "import fastff\n"
        "print(type(fastff.nn.Linear(2, 3)).__name__, fastff.optim.Adam.__name__,"
        " fastff.data.DatasetError.__name__, 'nn' in dir(fastff))"
    )
    assert out.split() == ["Linear", "Adam", "DatasetError", "True"]


def test_load_of_a_sequential_in_a_fresh_process(tmp_path):
    path = tmp_path / "model.npz"
    model = nn.Sequential(nn.Linear(3, 4, seed=0), nn.ReLU(), fastff.UltraFFF(4, 2, 1, seed=1))
    fastff.save(model, path)
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    out = _fresh_python(
        f"import numpy as np, fastff\nm = fastff.load({str(path)!r})\n"
        "print(repr(m(np.arange(6, dtype=np.float32).reshape(2, 3)).tolist()))"
    )
    assert out.strip() == repr(model(x).tolist())


def test_import_fastff_does_not_import_mpi_or_dask():
    """fastff.distributed and fastff.dask are opt-in: a plain import needs neither engine."""
    import subprocess
    import sys

    code = (
        "import sys, fastff; banned = ('mpi4py', 'dask', 'distributed', 'fastff.distributed', "
        "'fastff.dask'); assert not [m for m in banned if m in sys.modules], sys.modules.keys()"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
