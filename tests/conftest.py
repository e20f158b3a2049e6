"""Shared test helpers: hypothesis profiles, tolerances, data whose routing is exact, the
--runslow option and the fuzz case counter."""

import collections
import json
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=True,
    print_blob=True,
)
settings.register_profile(
    "thorough",
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("FASTFF_HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture
def subtree_bytes():
    """set(n): the UltraFFF kernels aim for n-byte subtrees (fastff._cmm) until the test ends,
    so which batches are regrouped by subtree does not depend on this CPU's L2 size."""
    from fastff import _cmm

    original = _cmm._subtree_bytes()
    yield _cmm._set_subtree_bytes
    _cmm._set_subtree_bytes(original)


@pytest.fixture(autouse=True, scope="session")
def small_inputs_run_in_parallel():
    """The kernels give a small call one thread (fastff/_cmm.pyx, _team), and the tests' inputs
    are small: with one multiply-add per thread, their calls still run parallel regions on
    every thread they are given, so the thread-count tests compare real team sizes."""
    from fastff import _cmm

    before = _cmm._set_work_per_thread(1)
    yield
    _cmm._set_work_per_thread(before)


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


# ---- small IDX datasets (the format of MNIST / Fashion-MNIST) --------------------------------


def write_idx(path, array, magic, gz=False):
    """Write a uint8 array as an IDX file: big-endian magic, dimensions, then the bytes."""
    import gzip

    array = np.asarray(array, dtype=np.uint8)
    payload = np.array([magic, *array.shape], dtype=">u4").tobytes() + array.tobytes()
    opener = gzip.open if gz else open
    with opener(path, "wb") as f:
        f.write(payload)
    return path


def synthetic_fashion_mnist(n_train, n_test, seed=0):
    """Images whose class c shows as a bright band at rows 2c..2c+2 over low noise, so that a
    small model learns it in an epoch: ((x_train, y_train), (x_test, y_test))."""
    rng = np.random.default_rng(seed)

    def split(n):
        labels = rng.integers(0, 10, n)
        images = rng.integers(0, 60, (n, 28, 28))
        for c in range(10):
            images[labels == c, 2 * c : 2 * c + 3, :] = 220
        return images.astype(np.uint8), labels

    return split(n_train), split(n_test)


def write_fashion_mnist(folder, n_train=300, n_test=100, gz=False, seed=0):
    """The four Fashion-MNIST files, synthetic, in folder; returns the arrays written."""
    folder.mkdir(parents=True, exist_ok=True)
    data = synthetic_fashion_mnist(n_train, n_test, seed)
    suffix = ".gz" if gz else ""
    for prefix, (images, labels) in zip(("train", "t10k"), data):
        write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}", images, 2051, gz)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", labels, 2049, gz)
    return data


# ---- slow tests: skipped unless --runslow ---------------------------------------------------
# `python -m pytest` runs everything else (nothing is deselected); the heavy fuzzing, soak and
# sanitizer-sized tests carry @pytest.mark.slow and run with `python -m pytest --runslow`
# (or only them: `python -m pytest --runslow -m slow`).


def pytest_addoption(parser):
    parser.addoption(
        "--runslow",
        action="store_true",
        default=False,
        help="also run the tests marked slow (thorough fuzzing, memory soak)",
    )


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


# ---- fuzz case counter -------------------------------------------------------------------------
# Every call that test_fuzz.py makes to a public entry point is counted here; the totals are
# printed at the end of the run and, with FASTFF_FUZZ_REPORT=path, written there as JSON.

FUZZ_CASES = collections.Counter()


@pytest.fixture(scope="session")
def fuzz_cases():
    return FUZZ_CASES


def pytest_terminal_summary(terminalreporter):
    if not FUZZ_CASES:
        return
    total = sum(FUZZ_CASES.values())
    terminalreporter.write_sep(
        "-", f"fuzz: {total:,} calls to {len(FUZZ_CASES)} public entry points"
    )
    for name, count in sorted(FUZZ_CASES.items()):
        terminalreporter.write_line(f"  {name:<44}{count:>8,}")
    report = os.environ.get("FASTFF_FUZZ_REPORT")
    if report:
        with open(report, "w") as f:
            json.dump(
                {"total": total, "by_entry_point": dict(sorted(FUZZ_CASES.items()))}, f, indent=2
            )
