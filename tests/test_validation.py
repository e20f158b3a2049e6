"""Validation and robustness: the gaps the reliability pass found, one test (or more) each.

Each block names the gap; the fuzz tests (test_fuzz.py) cover the same entry points with random
inputs, these pin the exact behaviour.
"""

import numpy as np
import pytest

import fastff
from fastff import nn


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
    for layer in (
        fastff.UltraFFF(3, 4, 2, activation="relu", dtype=dtype, seed=0),
        fastff.FFF(3, 5, 4, 2, activation="relu", dtype=dtype, seed=0),
        fastff.FFF(3, 5, 4, 2, activation="relu", train_hardened=True, dtype=dtype, seed=0),
    ):
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


# ---- sizes the kernels cannot handle, and attributes they trust -------------------------------
# Setting layer.depth = 30 on a depth-2 UltraFFF made the kernel walk past its weights (a
# segfault); widths >= 2**31 wrapped around the kernels' C ints; depth=2**63 made Python build a
# 2**63-bit integer before the memory check; set_num_threads(10**5) crashed OpenMP and 2**40
# raised OverflowError.


@pytest.mark.parametrize(
    "make, names",
    [
        (
            lambda: fastff.UltraFFF(4, 3, 2),
            ["input_width", "output_width", "depth", "parallel_size", "n_nodes"],
        ),
        (
            lambda: fastff.FFF(4, 2, 3, 2),
            ["input_width", "leaf_width", "output_width", "depth", "n_nodes", "n_leaves"],
        ),
    ],
)
def test_size_attributes_are_read_only(make, names):
    layer = make()
    x = np.ones((3, 4), np.float32)
    y = layer(x)
    for name in names:
        value = getattr(layer, name)
        with pytest.raises(AttributeError, match=f"{name} is fixed"):
            setattr(layer, name, 30)
        assert getattr(layer, name) == value
    np.testing.assert_array_equal(layer(x), y)


def _kernel_calls():
    """(label, call) pairs handing a _cmm kernel arguments that disagree with each other."""
    from fastff import _cmm

    f, z = np.float32, np.zeros
    x, y = z((5, 4), f), z((5, 3), f)
    w_in, b_in, w_out_t = z((7, 4), f), z(7, f), z((7, 3), f)  # one tree of depth 2
    visited, preact = z((5, 3), np.intp), z((5, 3), f)
    ultra_grads = (z((7, 4), f), z(7, f), z((7, 3), f))
    nw, nb, w1t, b1, w2, b2 = (
        z((3, 4), f),
        z(3, f),
        z((4, 2, 4), f),
        z((4, 2), f),
        z((4, 2, 3), f),
        z((4, 3), f),
    )  # depth-2 FFF
    path, z_path, leaf, hpre, ent = (
        z((5, 2), np.intp),
        z((5, 2), f),
        z(5, np.intp),
        z((5, 2), f),
        z(5, f),
    )
    no_u8, no_f = z((0, 0), np.uint8), z((0, 0), f)
    fff_grads = (
        z((3, 4), f),
        z(3, f),
        z((4, 2, 4), f),
        z((4, 2), f),
        z((4, 2, 3), f),
        z((4, 3), f),
    )
    bad_visit = visited.copy()
    bad_visit[4, 2] = 7
    bad_leaf = leaf.copy()
    bad_leaf[0] = -1
    bad_path = path.copy()
    bad_path[3, 1] = 3
    return [
        (
            "ultra depth",
            lambda: _cmm.ultra_forward(
                x, w_in, b_in, w_out_t, 5, 1, 0, y, visited, preact, False, 1
            ),
        ),
        (
            "ultra trees",
            lambda: _cmm.ultra_forward(
                x, w_in, b_in, w_out_t, 2, 2, 0, y, visited, preact, False, 1
            ),
        ),
        (
            "ultra width",
            lambda: _cmm.ultra_forward(
                z((5, 6), f), w_in, b_in, w_out_t, 2, 1, 0, y, visited, preact, False, 1
            ),
        ),
        (
            "ultra y",
            lambda: _cmm.ultra_forward(
                x, w_in, b_in, w_out_t, 2, 1, 0, z((4, 3), f), visited, preact, False, 1
            ),
        ),
        (
            "ultra path",
            lambda: _cmm.ultra_forward(
                x, w_in, b_in, w_out_t, 2, 1, 0, y, z((5, 2), np.intp), z((5, 2), f), True, 1
            ),
        ),
        (
            "ultra act",
            lambda: _cmm.ultra_forward(
                x, w_in, b_in, w_out_t, 2, 1, 9, y, visited, preact, False, 1
            ),
        ),
        (
            "ultra visit",
            lambda: _cmm.ultra_backward(
                x, y, w_in, w_out_t, bad_visit, preact, 0, z((5, 4), f), *ultra_grads, 1
            ),
        ),
        (
            "ultra grad",
            lambda: _cmm.ultra_backward(
                x,
                y,
                w_in,
                w_out_t,
                visited,
                preact,
                0,
                z((5, 4), f),
                z((6, 4), f),
                *ultra_grads[1:],
                1,
            ),
        ),
        ("fff depth", lambda: _cmm.fff_infer(x, nw, nb, w1t, b1, w2, b2, 3, 0, y, 1)),
        ("fff width", lambda: _cmm.fff_infer(z((5, 5), f), nw, nb, w1t, b1, w2, b2, 2, 0, y, 1)),
        ("fff b2", lambda: _cmm.fff_infer(x, nw, nb, w1t, b1, w2, z((4, 2), f), 2, 0, y, 1)),
        (
            "fff swap",
            lambda: _cmm.fff_hard_train_forward(
                x,
                nw,
                nb,
                w1t,
                b1,
                w2,
                b2,
                2,
                0,
                z((5, 1), np.uint8),
                True,
                no_f,
                False,
                y,
                path,
                z_path,
                leaf,
                hpre,
                ent,
                1,
            ),
        ),
        (
            "fff drop",
            lambda: _cmm.fff_hard_train_forward(
                x,
                nw,
                nb,
                w1t,
                b1,
                w2,
                b2,
                2,
                0,
                no_u8,
                False,
                z((5, 3), f),
                True,
                y,
                path,
                z_path,
                leaf,
                hpre,
                ent,
                1,
            ),
        ),
        (
            "fff leaf index",
            lambda: _cmm.fff_hard_train_backward(
                x,
                y,
                nw,
                w1t,
                w2,
                path,
                z_path,
                bad_leaf,
                no_u8,
                False,
                no_f,
                False,
                hpre,
                0,
                1.0,
                z((5, 4), f),
                *fff_grads,
                1,
            ),
        ),
        (
            "fff path index",
            lambda: _cmm.fff_hard_train_backward(
                x,
                y,
                nw,
                w1t,
                w2,
                bad_path,
                z_path,
                leaf,
                no_u8,
                False,
                no_f,
                False,
                hpre,
                0,
                1.0,
                z((5, 4), f),
                *fff_grads,
                1,
            ),
        ),
        (
            "soft reach",
            lambda: _cmm.fff_soft_mixture(
                z((5, 3), f), no_u8, False, z((5, 3), f), z((5, 6), f), ent, 1
            ),
        ),
        (
            "soft router",
            lambda: _cmm.fff_soft_router_backward(
                z((5, 3), f),
                z((5, 3), f),
                z((5, 7), f),
                no_u8,
                False,
                0.0,
                z((5, 7), f),
                z((5, 3), f),
                1,
            ),
        ),
        (
            "soft leaves",
            lambda: _cmm.fff_soft_leaf_activate(
                z((5, 8), f), b1, z((5, 3), f), no_f, False, 0, z((5, 8), f), z((5, 8), f), 1
            ),
        ),
        (
            "soft leaf backward",
            lambda: _cmm.fff_soft_leaf_backward(
                z((5, 8), f),
                z((5, 8), f),
                z((5, 8), f),
                z((5, 0), f),
                no_f,
                False,
                0,
                z((5, 0), f),
                1,
            ),
        ),
    ]


@pytest.mark.parametrize("label, call", _kernel_calls(), ids=[c[0] for c in _kernel_calls()])
def test_kernels_refuse_inconsistent_arguments(label, call):
    with pytest.raises(ValueError, match="fastff._cmm"):
        call()


def test_kernel_checks_accept_what_the_layers_pass():
    """The checks above are not too strict: every layer path (depth 0 included) still runs."""
    x = np.linspace(-1, 1, 30, dtype=np.float32).reshape(5, 6)
    for layer in (
        fastff.UltraFFF(6, 3, 0),
        fastff.UltraFFF(6, 3, 3, 2),
        fastff.FFF(6, 2, 3, 0),
        fastff.FFF(6, 2, 3, 3, region_leak=0.2, dropout=0.2),
        fastff.FFF(6, 2, 3, 3, train_hardened=True, region_leak=0.2, dropout=0.2),
    ):
        assert layer(x).shape == (5, 3)
        y, backprop = layer.forward_train(x)
        assert backprop(np.ones_like(y)).shape == x.shape


@pytest.mark.parametrize(
    "make, exc, words",
    [
        (lambda: fastff.UltraFFF(2**31, 4, 1), ValueError, "input_width must be <= 2147483647"),
        (lambda: fastff.UltraFFF(4, 2**31, 1), ValueError, "output_width"),
        (lambda: fastff.FFF(4, 2**31, 3, 1), ValueError, "leaf_width"),
        (lambda: fastff.UltraFFF(4, 3, 2**63), MemoryError, "bytes"),
        (lambda: fastff.FFF(4, 2, 3, 10**30), MemoryError, "bytes"),
        (lambda: fastff.UltraFFF(4, 3, 65), MemoryError, "bytes"),
        (lambda: fastff.set_num_threads(10**5), ValueError, "n must be <="),
        (lambda: fastff.set_num_threads(2**70), ValueError, "n must be <="),
    ],
)
def test_sizes_beyond_the_kernels(make, exc, words):
    with pytest.raises(exc, match=words):
        make()


def test_bench_cli_refuses_thread_counts_openmp_cannot_create(capsys):
    from fastff.__main__ import main

    assert main(["bench", "--threads", "100000"]) == 2  # a usage error, exit code 2
    assert "--threads must be <=" in capsys.readouterr().err


# ---- memory: refused before allocating, with the byte count ------------------------------------
# The limit ignored container (cgroup) limits, past which the kernel kills the process instead
# of failing an allocation; forward passes allocated outputs and saved paths unchecked; an IDX
# (or gzip) file was read whole whatever its header said.


def test_memory_limit_follows_the_container(monkeypatch, tmp_path):
    from fastff import _validation

    limit_file = tmp_path / "memory.max"
    monkeypatch.setattr(_validation, "CGROUP_LIMIT_FILES", (str(limit_file),))
    try:
        _validation.physical_memory_bytes.cache_clear()
        limit_file.write_text("max\n")
        physical = _validation.physical_memory_bytes()
        assert physical > 2**20
        _validation.physical_memory_bytes.cache_clear()
        limit_file.write_text("1048576\n")
        assert _validation.physical_memory_bytes() == 2**20
        with pytest.raises(MemoryError, match=r"needs [\d,]+ bytes .* 1,048,576 bytes"):
            fastff.UltraFFF(64, 64, 10)  # 2047 * 129 * 4 bytes
    finally:
        _validation.physical_memory_bytes.cache_clear()


@pytest.mark.parametrize(
    "call, words",
    [
        (lambda: fastff.UltraFFF(2, 5000, 1)(np.ones((100, 2))), "inference of UltraFFF"),
        (lambda: fastff.UltraFFF(2, 1, 1, 400).forward_train(np.ones((100, 2))), "forward_train"),
        (lambda: fastff.FFF(2, 1, 5000, 1)(np.ones((100, 2))), "inference of FFF"),
        (
            lambda: fastff.FFF(2, 1000, 1, 1, train_hardened=True).forward_train(np.ones((100, 2))),
            "hardened training",
        ),
    ],
)
def test_forward_passes_refuse_outputs_beyond_memory(monkeypatch, call, words):
    from fastff import _validation

    monkeypatch.setattr(_validation, "physical_memory_bytes", lambda: 200_000)
    with pytest.raises(MemoryError, match=rf"{words}.*needs [\d,]+ bytes"):
        call()


def test_idx_reader_reads_no_more_than_the_header_promises(tmp_path):
    import gzip

    from fastff.data import DatasetError, read_idx

    header = np.array([2049, 10], ">u4").tobytes()
    bomb = tmp_path / "labels.gz"  # 10 labels, then 8 MB of zeros compressed to a few KB
    with gzip.open(bomb, "wb") as f:
        f.write(header + bytes(10) + bytes(8 * 2**20))
    assert bomb.stat().st_size < 2**16
    with pytest.raises(DatasetError, match="longer than its header says"):
        read_idx(bomb, 2049, ())
    short = tmp_path / "short-labels"  # a 12-byte file whose header claims 2**32 - 1 labels
    short.write_bytes(np.array([2049, 2**32 - 1], ">u4").tobytes() + bytes(4))
    with pytest.raises(DatasetError, match="truncated: 12 bytes"):
        read_idx(short, 2049, ())
    huge = tmp_path / "huge-images"  # claims 2**31 images of 28 x 28: 1.7 TB
    huge.write_bytes(np.array([2051, 2**31, 28, 28], ">u4").tobytes())
    with pytest.raises(MemoryError, match="1,683,627,180,032 bytes"):
        read_idx(huge, 2051, (28, 28))


# ---- inputs that were silently misread ---------------------------------------------------------
# A masked array's mask was dropped (the hidden values were used); float64 values beyond the
# float32 range became inf, so a finite input gave an inf/NaN output; dtype=None meant float64
# (numpy's reading of None); negative or NaN usage counters were loaded and stalled
# local_batch_size updates for good.


def _masked(shape):
    return np.ma.masked_array(np.ones(shape), mask=np.eye(*shape, dtype=bool))


@pytest.mark.parametrize(
    "call",
    [
        lambda: fastff.UltraFFF(3, 2, 1)(_masked((4, 3))),
        lambda: fastff.FFF(3, 2, 2, 1).forward_train(_masked((4, 3))),
        lambda: nn.Linear(3, 2)(_masked((4, 3))),
        lambda: nn.GELU()(_masked((4, 3))),
        lambda: nn.Dropout(0.5).forward_train(_masked((4, 3))),
        lambda: nn.mse(_masked((4, 3)), np.ones((4, 3))),
        lambda: nn.mse(np.ones((4, 3)), _masked((4, 3))),
        lambda: nn.softmax_cross_entropy(_masked((4, 3)), np.zeros(4, int)),
        lambda: nn.softmax_cross_entropy(
            np.ones((4, 3)), np.ma.masked_array(np.zeros(4, int), mask=[1, 0, 0, 0])
        ),
        lambda: fastff.UltraFFF(3, 2, 1).forward_train(np.ones((4, 3)))[1](_masked((4, 2))),
    ],
)
def test_masked_arrays_are_refused(call):
    with pytest.raises(TypeError, match="masked array"):
        call()


def test_float64_values_beyond_float32_are_refused_not_made_inf():
    x = np.array([[1.0, 2.0], [3e38, -1e300]])
    for layer in (fastff.UltraFFF(2, 3, 1), fastff.FFF(2, 2, 3, 1), nn.Linear(2, 3)):
        with pytest.raises(ValueError, match=r"x has values beyond the range of float32 .*1e\+300"):
            layer(x)
        with pytest.raises(ValueError, match="beyond the range"):
            layer.forward_train(x)
        assert np.isfinite(layer(x[:1])).all()
        with np.errstate(invalid="ignore"):  # inf * 0 in NumPy's matmul warns
            layer(np.array([[np.inf, 0.0]]))  # an infinite input is data, not an overflow
    wide = fastff.UltraFFF(2, 3, 1, dtype=np.float64)
    assert wide(x).shape == (2, 3)  # float64 layers take any float64
    layer = fastff.UltraFFF(2, 3, 1)
    _, backprop = layer.forward_train(np.ones((1, 2)))
    with pytest.raises(ValueError, match="dy has values beyond"):
        backprop(np.array([[1e39, 0.0, 0.0]]))
    big_ints = np.array([[2**63 - 1, -(2**63)]])  # integers always fit float32's range
    assert np.isfinite(layer(big_ints)).all()


def test_non_finite_inputs_pass_through():
    """Refusing overflow is not refusing non-finite data: inf and NaN inputs are the caller's
    and propagate (the NaN policy)."""
    layer = fastff.UltraFFF(2, 3, 1, activation="identity", seed=0)
    y = layer(np.array([[np.inf, 1.0], [np.nan, 1.0]]))
    assert not np.isfinite(y).any()


@pytest.mark.parametrize(
    "make",
    [
        lambda: fastff.UltraFFF(4, 3, 2, dtype=None),
        lambda: fastff.FFF(4, 2, 3, 2, dtype=None),
        lambda: nn.Linear(4, 3, dtype=None),
    ],
)
def test_dtype_none_is_refused(make):
    with pytest.raises(TypeError, match=r"dtype must be numpy.float32.* got None"):
        make()


@pytest.mark.parametrize(
    "bad", [np.array([1.0, -1.0, 0.0]), np.array([np.nan, 0.0, 0.0]), np.array([np.inf, 0.0, 0.0])]
)
def test_fff_usage_counters_must_be_finite_counts(bad):
    layer = fastff.FFF(4, 2, 3, 2, usage_mode="hard", seed=0)
    layer.forward_train(np.ones((5, 4)))
    before_usage = layer.node_usage.copy()
    state = {**layer.state_dict(), "node_usage": bad}
    with pytest.raises(ValueError, match="node_usage.*finite counts >= 0"):
        layer.load_state_dict(state)
    np.testing.assert_array_equal(layer.node_usage, before_usage)
    layer.load_state_dict({**state, "node_usage": np.array([3.0, 1.0, 2.0])})
    np.testing.assert_array_equal(layer.node_usage, [3, 1, 2])


def test_losses_compute_float16_inputs_in_float64():
    """mse squared float16 differences in float16: a difference of 300 gave an inf loss."""
    pred = np.array([[300.0, -300.0]], np.float16)
    loss, grad = nn.mse(pred, np.zeros((1, 2)))
    assert loss == 90000.0 and grad.dtype == np.float64
    loss, grad = nn.softmax_cross_entropy(np.array([[300.0, 0.0]], np.float16), [1])
    assert loss == 300.0 and np.isfinite(grad).all()
    with pytest.raises(ValueError, match="pred has values beyond the range of float64"):
        nn.mse(np.array([np.finfo(np.longdouble).max]), np.zeros(1))


@pytest.mark.parametrize("path", [3, b"/tmp", ["/tmp"]])
def test_dataset_path_must_be_a_path(path):
    from fastff.data import load_fashion_mnist

    with pytest.raises(TypeError, match="path must be a str, an os.PathLike or None"):
        load_fashion_mnist(path)


# ---- optimizers: found by the fuzz tests under tox -e asan -------------------------------------
# Adam's eps below float32's range is 0 in a float32 update, so a parameter row with a zero
# gradient (an FFF leaf no row reached) became 0/0 = NaN even with lr=0; a growing StepLR
# raised OverflowError from float ** (Python raises instead of returning inf).


def test_adam_eps_that_vanishes_in_float32_is_refused():
    from fastff import optim

    layer = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="eps must be >= 1.17"):
        optim.Adam(layer, eps=1e-300)
    opt = optim.Adam(layer, lr=0.0, eps=np.finfo(np.float32).tiny)  # the smallest accepted
    layer.forward_train(np.ones((1, 2)))[1](np.zeros((1, 2)))  # zero gradients
    opt.step()
    assert all(np.isfinite(p).all() for p in layer.params.values())


def test_step_lr_overflow_is_a_value_error():
    from fastff import optim

    opt = optim.SGD(nn.Linear(2, 2), lr=0.5)
    schedule = optim.StepLR(opt, step_size=1, gamma=1e300)
    schedule.step()
    with pytest.raises(ValueError, match="StepLR: the learning rate overflows"):
        for _ in range(3):
            schedule.step()
    frozen = optim.StepLR(optim.SGD(nn.Linear(2, 2), lr=0.0), step_size=1, gamma=1e300)
    for _ in range(5):
        frozen.step()
    assert frozen.optimizer.lr == 0.0


# ---- Issue 18: gradients that depended on what the caller did between forward and backprop ---
# forward_train kept a C-contiguous input by reference, so a loader writing the next batch into
# the same buffer (or an input that was a view of layer.grads, which backprop adds into) changed
# the gradients; in-place edits through layer.params and reassigning layer.activation did too,
# and a second backprop call added the gradients twice. All silently.

SETUPS = {
    "ultra-gelu": lambda: fastff.UltraFFF(6, 5, 3, dtype=np.float64, seed=0),
    "ultra-relu-2trees": lambda: fastff.UltraFFF(6, 5, 2, 2, "relu", dtype=np.float64, seed=0),
    "ultra-float32": lambda: fastff.UltraFFF(6, 5, 3, seed=0),
    "fff-soft": lambda: fastff.FFF(6, 3, 5, 2, dtype=np.float64, seed=0),
    "fff-hardened": lambda: fastff.FFF(6, 3, 5, 2, train_hardened=True, dtype=np.float64, seed=0),
    "linear": lambda: nn.Linear(6, 5, dtype=np.float64, seed=0),
    "sequential": lambda: nn.Sequential(
        nn.Identity(),
        nn.Linear(6, 6, dtype=np.float64, seed=0),
        nn.ReLU(),
        fastff.UltraFFF(6, 5, 2, dtype=np.float64, seed=1),
    ),
    "relu": nn.ReLU,
}


def _grads_after(make, x_forward, mutate=None):
    """(dx, grads) of one forward_train on x_forward, with mutate(x_forward, module) run
    between the forward and the backprop."""
    module = make()
    y, backprop = module.forward_train(x_forward)
    if mutate is not None:
        mutate(x_forward, module)
    dx = backprop(np.ones_like(y))
    return dx, {k: v.copy() for k, v in module.grads.items()}


@pytest.mark.parametrize("setup", sorted(SETUPS))
def test_reusing_the_input_buffer_keeps_the_gradients(setup, rng):
    x, next_batch = rng.standard_normal((2, 8, 6))
    want_dx, want = _grads_after(SETUPS[setup], x.copy())
    dtype = np.float32 if setup == "ultra-float32" else np.float64
    buf = x.astype(dtype)  # the layer's dtype: kept without a cast, as a loader would give it

    def refill(b, _):
        b[:] = next_batch

    dx, got = _grads_after(SETUPS[setup], buf, refill)
    np.testing.assert_allclose(dx, want_dx, rtol=1e-6, atol=1e-6)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-6, err_msg=k)


def test_an_input_aliasing_the_gradients_keeps_the_gradients(rng):
    values = rng.standard_normal((7, 7))  # linear_in.weight of the tree below is (7, 7)

    def added(alias):
        layer = fastff.UltraFFF(7, 3, 2, dtype=np.float64, seed=0)
        grad = layer.grads["linear_in.weight"]
        grad[...] = values
        y, backprop = layer.forward_train(grad if alias else values.copy())
        backprop(np.ones_like(y))  # adds into grad, i.e. into the input when aliased
        return layer.grads["linear_in.weight"] - values

    np.testing.assert_allclose(added(True), added(False), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("setup", ["ultra-gelu", "fff-soft", "linear", "sequential"])
def test_editing_params_between_forward_and_backprop_raises(setup, rng):
    module = SETUPS[setup]()
    y, backprop = module.forward_train(rng.standard_normal((4, 6)))
    first = next(iter(module.params.values()))
    first[...] *= 2
    with pytest.raises(RuntimeError, match="stale"):
        backprop(np.ones_like(y))


@pytest.mark.parametrize("kind", ["ultra", "fff-soft", "fff-hardened"])
def test_reassigning_activation_before_backprop_keeps_the_forward_activation(kind, rng):
    def make(act):
        if kind == "ultra":
            return fastff.UltraFFF(6, 5, 3, activation=act, dtype=np.float64, seed=0)
        return fastff.FFF(
            6, 3, 5, 2, act, train_hardened=kind == "fff-hardened", dtype=np.float64, seed=0
        )

    x = rng.standard_normal((8, 6))
    want_dx, want = _grads_after(lambda: make("gelu"), x)

    def switch(_, layer):
        layer.activation = "relu"

    dx, got = _grads_after(lambda: make("gelu"), x, switch)
    np.testing.assert_allclose(dx, want_dx, rtol=1e-12)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-12, err_msg=k)


@pytest.mark.parametrize("setup", sorted(SETUPS))
def test_backprop_runs_once(setup, rng):
    module = SETUPS[setup]()
    y, backprop = module.forward_train(rng.standard_normal((4, 6)))
    backprop(np.ones_like(y))
    once = {k: v.copy() for k, v in module.grads.items()}
    with pytest.raises(RuntimeError, match="already ran"):
        backprop(np.ones_like(y))
    for k in once:
        np.testing.assert_array_equal(module.grads[k], once[k])


def test_writing_into_y_before_backprop_keeps_the_gradient(rng):
    x = rng.standard_normal((4, 3))
    for act in (nn.Tanh(), nn.Sigmoid(), nn.GELU()):
        _, clean = act.forward_train(x)
        y, backprop = act.forward_train(x)
        y += 5.0
        np.testing.assert_array_equal(backprop(np.ones_like(y)), clean(np.ones_like(y)))


# ---- Issue 18: attributes the kernels read, checked on assignment -------------------------------
# layer.activation = "x" gave KeyError: 'x' at the next call; FFF.dropout = 1.0 gave
# ZeroDivisionError; usage_mode = "soft" on a layer built without usage crashed on None counters.


def test_attribute_assignments_are_checked(rng):
    ultra = fastff.UltraFFF(4, 2, 1)
    with pytest.raises(ValueError, match="activation must be one of"):
        ultra.activation = "x"
    fff = fastff.FFF(4, 2, 2, 1)
    for name, value, error in [
        ("activation", "x", ValueError),
        ("dropout", 1.0, ValueError),
        ("region_leak", -0.1, ValueError),
        ("train_hardened", 1, TypeError),
        ("usage_mode", "both", ValueError),
    ]:
        with pytest.raises(error, match=name):
            setattr(fff, name, value)
    fff.dropout = 0.5
    fff.usage_mode = "hard"
    fff.forward_train(rng.standard_normal((3, 4)))
    assert fff.node_usage.sum() == 3 and fff.get_config()["dropout"] == 0.5
    dropout = nn.Dropout(0.1)
    with pytest.raises(ValueError, match="p must be in"):
        dropout.p = 1.0
    linear = nn.Linear(3, 2)
    with pytest.raises(AttributeError, match="fixed at construction"):
        linear.input_width = 5


# ---- Issue 18: load_state_dict and masked arrays ---------------------------------------------
# Layer inputs refused masked arrays, but load_state_dict loaded their hidden values (a masked
# 1e30 came back as 1e30).


@pytest.mark.parametrize("key", ["linear_in.bias", "linear_out.weight"])
def test_load_state_dict_refuses_masked_arrays(key):
    layer = fastff.UltraFFF(3, 2, 1, seed=0)
    before = layer.state_dict()
    state = dict(before)
    state[key] = np.ma.masked_array(np.full_like(state[key], 1e30), mask=True)
    with pytest.raises(TypeError, match="masked array"):
        layer.load_state_dict(state)
    for k, v in layer.state_dict().items():
        np.testing.assert_array_equal(v, before[k])
    fff = fastff.FFF(3, 2, 2, 1, usage_mode="soft")
    state = {**fff.state_dict(), "node_usage": np.ma.masked_array([5.0], mask=[True])}
    with pytest.raises(TypeError, match="masked array"):
        fff.load_state_dict(state)


# ---- Issue 18: raw fastff._cmm entry points, bounded -------------------------------------------
# _tree_shape(10**12, 7), and ultra_backward with 0 rows and 10**12 visit columns (which calls
# it), looped over 10**12 tree counts; adam_update with step=0 divided by 1 - beta**0 = 0.


def test_raw_tree_shape_and_backward_are_bounded_in_the_visit_count():
    import subprocess
    import sys

    code = (
        "import numpy as np\n"
        "from fastff import _cmm\n"
        "assert _cmm._tree_shape(10**12, 7) == (0, -1)\n"
        "assert _cmm._tree_shape(2 * 12, 2 * (2**12 - 1)) == (2, 11)\n"
        "f = lambda *s: np.zeros(s, np.float32)\n"
        "_cmm.ultra_backward(f(0, 3), f(0, 3), f(7, 3), f(7, 3), np.zeros((0, 10**12), np.intp),"
        " f(0, 10**12), 0, f(0, 3), f(7, 3), f(7), f(7, 3), 1)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_raw_adam_update_refuses_step_zero():
    from fastff import _cmm

    p = np.ones((2, 3), np.float32)
    g, m, v = np.ones_like(p), np.zeros_like(p), np.zeros_like(p)
    for step, beta2 in ((0, 0.999), (-1, 0.999), (1, 1.0)):
        with pytest.raises(ValueError, match="step must be >= 1|beta1 and beta2"):
            _cmm.adam_update(p, g, m, v, 0.0, False, 1e-3, 0.9, beta2, 1e-8, step, 1)
    np.testing.assert_array_equal(p, 1.0)  # untouched
    _cmm.adam_update(p, g, m, v, 0.0, False, 1e-3, 0.9, 0.999, 1e-8, 1, 1)
    assert np.isfinite(p).all() and (p < 1).all()
