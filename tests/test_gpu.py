"""CUDA backend against fastff.reference and the CPU kernels. Skipped without CuPy or a GPU."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import fastff
from fastff import reference as R

from conftest import assert_close, dyadic, dyadic_state

cp = pytest.importorskip("cupy", reason="CuPy is not installed")
try:
    HAVE_GPU = cp.cuda.runtime.getDeviceCount() > 0
except Exception:  # no driver, no device
    HAVE_GPU = False
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not HAVE_GPU, reason="no CUDA device")]

ACTS = ["gelu", "relu", "identity"]
DTYPES = [np.float32, np.float64]
WIDTHS = st.one_of(st.sampled_from([1, 31, 32, 33, 1000]), st.integers(1, 300))


def _ultra_case(seed, in_w, out_w, depth, trees, batch, dtype, act):
    rng = np.random.default_rng(seed)
    layer = fastff.UltraFFF(in_w, out_w, depth, trees, act, dtype=dtype, seed=seed)
    state = dyadic_state(layer, rng)
    x = dyadic(rng, (batch, in_w), denom=8)
    return layer, state, x, rng


@given(
    in_w=WIDTHS,
    out_w=WIDTHS,
    depth=st.integers(0, 10),
    trees=st.integers(1, 4),
    batch=st.integers(0, 300),
    dtype=st.sampled_from(DTYPES),
    act=st.sampled_from(ACTS),
    seed=st.integers(0, 2**32 - 1),
)
def test_ultra_inference_matches_reference(in_w, out_w, depth, trees, batch, dtype, act, seed):
    batch = min(batch, max(1, 200_000 // (trees * 2 ** (depth + 1))))
    layer, state, x, _ = _ultra_case(seed, in_w, out_w, depth, trees, batch, dtype, act)
    y_cpu = layer(x)
    layer.to("cuda")
    y = layer(cp.asarray(x))
    assert isinstance(y, cp.ndarray) and y.dtype == dtype and y.shape == (batch, out_w)
    y_ref, _ = R.ultra_forward(x, state, depth, trees, act)
    assert_close(cp.asnumpy(y), y_ref, dtype, trees * (depth + 1) * in_w, "gpu y")
    assert_close(cp.asnumpy(y), y_cpu, dtype, trees * (depth + 1) * in_w, "gpu vs cpu")


@given(
    in_w=WIDTHS,
    out_w=WIDTHS,
    depth=st.integers(0, 8),
    trees=st.integers(1, 3),
    batch=st.integers(0, 200),
    dtype=st.sampled_from(DTYPES),
    act=st.sampled_from(ACTS),
    seed=st.integers(0, 2**32 - 1),
)
def test_ultra_gradients_match_reference(in_w, out_w, depth, trees, batch, dtype, act, seed):
    layer, state, x, rng = _ultra_case(seed, in_w, out_w, depth, trees, batch, dtype, act)
    dy = dyadic(rng, (batch, out_w), denom=8)
    layer.to("cuda")
    _, backprop = layer.forward_train(cp.asarray(x))
    dx = backprop(cp.asarray(dy))
    _, cache = R.ultra_forward(x, state, depth, trees, act)
    dx_ref, grads_ref = R.ultra_backward(dy, cache, state, act)
    terms = max(in_w, out_w, batch) * trees * (depth + 1)
    assert_close(cp.asnumpy(dx), dx_ref, dtype, terms, "dx")
    for key, g in layer.grads.items():
        assert_close(cp.asnumpy(g), grads_ref[key], dtype, terms, key)


@given(
    in_w=st.integers(1, 64),
    out_w=st.integers(1, 32),
    depth=st.integers(0, 6),
    trees=st.integers(1, 3),
    batch=st.integers(0, 150),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**32 - 1),
)
def test_ultra_balancing_matches_reference(in_w, out_w, depth, trees, batch, dtype, seed):
    """UltraFFF's load-balancing term on CUDA (fastff._balance on CuPy arrays, cupyx sparse
    products) against the dense reference."""
    layer, state, x, rng = _ultra_case(seed, in_w, out_w, depth, trees, batch, dtype, "gelu")
    dy = dyadic(rng, (batch, out_w), denom=8)
    layer.to("cuda")
    _, backprop = layer.forward_train(cp.asarray(x), load_balancing=2.0)
    dx = backprop(cp.asarray(dy))
    _, cache = R.ultra_forward(x, state, depth, trees, "gelu")
    loss, _ = R.ultra_balance(cache[1], depth, trees)
    dx_ref, grads_ref = R.ultra_backward(dy, cache, state, "gelu", 2.0, depth, trees)
    terms = max(in_w, out_w, batch) * trees * (depth + 1) * 16
    np.testing.assert_allclose(layer.last_balance_loss, loss, rtol=1e-5)
    assert_close(cp.asnumpy(dx), dx_ref, dtype, terms, "dx")
    for key, g in layer.grads.items():
        assert_close(cp.asnumpy(g), grads_ref[key], dtype, terms, key)


def test_ultra_gradients_deterministic_and_accumulate():
    layer, _, x, rng = _ultra_case(3, 200, 150, 6, 2, 2000, np.float32, "gelu")
    dy = rng.standard_normal((2000, 150)).astype(np.float32)
    layer.to("cuda")
    xg, dyg = cp.asarray(x), cp.asarray(dy)
    runs = []
    for _ in range(2):
        layer.zero_grad()
        layer.forward_train(xg)[1](dyg)
        runs.append({k: cp.asnumpy(v) for k, v in layer.grads.items()})
    for k in runs[0]:
        np.testing.assert_array_equal(runs[0][k], runs[1][k])
    layer.forward_train(xg)[1](dyg)  # accumulates on top
    for k in runs[0]:
        np.testing.assert_allclose(cp.asnumpy(layer.grads[k]), 2 * runs[0][k], rtol=1e-5, atol=1e-5)


def test_device_mismatch_and_round_trip():
    layer = fastff.UltraFFF(8, 4, 3, seed=0)
    x = np.random.default_rng(0).standard_normal((5, 8)).astype(np.float32)
    y_cpu = layer(x)
    with pytest.raises(TypeError, match="CUDA array"):
        layer(cp.asarray(x))
    layer.to("cuda")
    with pytest.raises(TypeError, match="host array"):
        layer(x)
    y_gpu = cp.asnumpy(layer(cp.asarray(x)))
    np.testing.assert_allclose(y_gpu, y_cpu, rtol=1e-5, atol=1e-6)
    state = layer.state_dict()
    assert all(isinstance(v, np.ndarray) for v in state.values())
    _, backprop = layer.forward_train(cp.asarray(x))
    layer.forward_train(cp.asarray(x))[1](cp.ones((5, 4), dtype=cp.float32))  # GPU gradients
    layer.to("cpu")
    # gradients come back as host arrays, 64-byte aligned like those allocated on the CPU
    assert all(isinstance(g, np.ndarray) and g.ctypes.data % 64 == 0 for g in layer._grads.values())
    with pytest.raises(RuntimeError, match="stale"):
        backprop(cp.ones((5, 4), dtype=cp.float32))
    np.testing.assert_array_equal(layer(x), y_cpu)


@pytest.fixture
def launched(monkeypatch):
    """Names of the kernels the GPU ops ask for, in order (the ops look them up per call)."""
    from fastff.gpu import kernels

    names = []
    real = kernels.get

    def recording(name, dtype=None, k=None, half_kind=None):
        names.append(name)
        return real(name, dtype, k, half_kind)

    monkeypatch.setattr(kernels, "get", recording)
    return names


def test_wide_rows_fall_back_to_global_memory(monkeypatch):
    # in + out beyond the 48 KiB shared-memory budget of one warp (float64: > 6144 elements)
    from fastff.gpu import cmm

    layer, state, x, _ = _ultra_case(5, 5000, 3000, 2, 1, 40, np.float64, "relu")
    layer.to("cuda")
    launches = []
    real = cmm._row_launch
    monkeypatch.setattr(cmm, "_row_launch", lambda *a: launches.append(real(*a)) or launches[-1])
    y_ref, _ = R.ultra_forward(x, state, 2, 1, "relu")
    assert_close(cp.asnumpy(layer(cp.asarray(x))), y_ref, np.float64, 3 * 5000, "wide")
    assert launches and all(use_smem == 0 for *_, use_smem in launches)  # the path ran


@pytest.mark.parametrize("in_w, out_w", [(768, 768), (4, 1000), (128, 36), (1024, 8), (1028, 4)])
@pytest.mark.parametrize("act", ACTS)
def test_float32_register_path_matches_reference(in_w, out_w, act, launched):
    """float32 with widths divisible by 4 (<= 1024) takes the float4 register kernels;
    1028 is just past them and takes the general kernels."""
    register_path = max(in_w, out_w) <= 1024
    layer, state, x, rng = _ultra_case(11, in_w, out_w, 5, 2, 257, np.float32, act)
    dy = dyadic(rng, (257, out_w), denom=8)
    layer.to("cuda")
    y_ref, cache = R.ultra_forward(x, state, 5, 2, act)
    assert_close(cp.asnumpy(layer(cp.asarray(x))), y_ref, np.float32, 12 * in_w, "y")
    _, backprop = layer.forward_train(cp.asarray(x))
    dx = backprop(cp.asarray(dy))
    dx_ref, grads_ref = R.ultra_backward(dy, cache, state, act)
    terms = max(in_w, out_w, 257) * 12
    assert_close(cp.asnumpy(dx), dx_ref, np.float32, terms, "dx")
    for key, g in layer.grads.items():
        assert_close(cp.asnumpy(g), grads_ref[key], np.float32, terms, key)
    f4 = {"ultra_forward_f4", "ultra_backward_rows_f4"}
    if register_path:  # the path the test is named after ran, forward and backward
        assert f4 <= set(launched) and not {"ultra_forward", "ultra_backward_rows"} & set(launched)
    else:
        assert not f4 & set(launched)


def test_rows_off_16_bytes_take_the_general_kernels(launched):
    """An input view that starts 4 bytes into its buffer (a torch storage offset, a slice)
    cannot be read as float4: it takes the general kernels, with the same result."""
    layer, state, x, rng = _ultra_case(12, 768, 768, 4, 1, 33, np.float32, "gelu")
    layer.to("cuda")
    buf = cp.zeros(1 + x.size, dtype=cp.float32)
    offset = buf[1:].reshape(x.shape)
    offset[...] = cp.asarray(x)
    assert offset.data.ptr % 16 and offset.flags.c_contiguous
    y_ref, _ = R.ultra_forward(x, state, 4, 1, "gelu")
    assert_close(cp.asnumpy(layer(offset)), y_ref, np.float32, 5 * 768, "y")
    assert "ultra_forward" in launched and "ultra_forward_f4" not in launched


def test_ultra_forward_add_checks_y_and_adds():
    """Ops.ultra_forward(..., y=y) adds the walk into y (the tree-parallel layers' split walk);
    a y the kernel cannot write row by row in x's dtype is refused, not silently misread."""
    layer, state, x, _ = _ultra_case(13, 40, 24, 3, 2, 17, np.float32, "relu")
    layer.to("cuda")
    ops, p, xd = layer.ops, layer._params, cp.asarray(x, dtype=cp.float32)
    y0 = cp.asarray(dyadic(np.random.default_rng(1), (17, 24), denom=8)).astype(cp.float32)
    y = y0.copy()
    ops.ultra_forward(xd, p, 3, 2, "relu", False, 1, y=y)
    y_ref, _ = R.ultra_forward(x, state, 3, 2, "relu")
    assert_close(cp.asnumpy(y - y0), y_ref, np.float32, 8 * 40, "added")
    for bad in (y.astype(cp.float64), cp.asfortranarray(y), y[:5]):
        with pytest.raises(ValueError, match="C-contiguous"):
            ops.ultra_forward(xd, p, 3, 2, "relu", False, 1, y=bad)


# ---- half-precision weights: the GPU against the CPU's half kernels ---------------------------

HALVES = ["bfloat16", "float16"]
HALF_WIDTHS = WIDTHS | st.sampled_from([8, 64, 256, 768, 1024, 1032])


def _half_or_skip(half):
    """bfloat16 arrays need CuPy 14 with ml_dtypes (Module.to says so; tests/test_half.py);
    on CuPy 14 a refusal is a failure, not a skip."""
    try:
        cp.asarray(np.zeros(1, dtype=half))
    except (TypeError, ValueError, NotImplementedError):
        if int(cp.__version__.split(".")[0]) >= 14:
            raise
        pytest.skip(f"this CuPy holds no {half} arrays")


@given(
    in_w=HALF_WIDTHS,
    out_w=HALF_WIDTHS,
    depth=st.integers(0, 8),
    trees=st.integers(1, 3),
    batch=st.integers(0, 300),
    half=st.sampled_from(HALVES),
    act=st.sampled_from(ACTS),
    seed=st.integers(0, 2**32 - 1),
)
def test_half_ultra_inference_matches_the_cpu(in_w, out_w, depth, trees, batch, half, act, seed):
    """Dyadic values: both devices route alike and differ by float32 summation order only."""
    _half_or_skip(half)
    layer, _, x, _ = _ultra_case(seed, in_w, out_w, depth, trees, batch, np.float32, act)
    half_layer = layer.astype(half)
    x32 = x.astype(np.float32)
    y_cpu, stats_cpu = half_layer(x32), half_layer.routing_stats(x32)
    half_layer.to("cuda")
    assert half_layer.dtype == np.dtype(half) and half_layer.device == "cuda"
    y = half_layer(cp.asarray(x32))
    assert isinstance(y, cp.ndarray) and y.dtype == cp.float32 and y.shape == (batch, out_w)
    assert_close(cp.asnumpy(y), y_cpu, np.float32, trees * (depth + 1) * in_w, "gpu half y")
    stats = half_layer.routing_stats(cp.asarray(x32))  # the half kernels' saved paths
    np.testing.assert_array_equal(stats["node_counts"], stats_cpu["node_counts"])


@pytest.mark.parametrize("half", HALVES)
@pytest.mark.parametrize(
    "in_w, out_w, offset, kernel",
    [
        (768, 768, 0, "ultra_forward_h8"),
        (1024, 8, 0, "ultra_forward_h8"),
        (40, 1000, 0, "ultra_forward_h8"),
        (36, 20, 0, "ultra_forward_half"),  # widths not whole 16-byte chunks
        (1032, 8, 0, "ultra_forward_half"),  # past the register path
        (768, 768, 1, "ultra_forward_half"),  # x 4 bytes off 16
    ],
)
def test_half_register_path_and_fallbacks(in_w, out_w, offset, kernel, half, launched):
    _half_or_skip(half)
    layer, _, x, _ = _ultra_case(14, in_w, out_w, 5, 2, 257, np.float32, "gelu")
    half_layer = layer.astype(half)
    x32 = x.astype(np.float32)
    y_cpu = half_layer(x32)
    half_layer.to("cuda")
    buf = cp.zeros(offset + x32.size, dtype=cp.float32)
    xd = buf[offset:].reshape(x32.shape)
    xd[...] = cp.asarray(x32)
    assert_close(cp.asnumpy(half_layer(xd)), y_cpu, np.float32, 12 * in_w, kernel)
    assert kernel in launched
    assert not {"ultra_forward_h8", "ultra_forward_half"} - {kernel} & set(launched)


@given(
    in_w=WIDTHS,
    leaf_w=st.integers(1, 8) | st.sampled_from([33, 64]),
    out_w=WIDTHS,
    depth=st.integers(0, 8),
    batch=st.integers(0, 300),
    half=st.sampled_from(HALVES),
    act=st.sampled_from(ACTS),
    seed=st.integers(0, 2**32 - 1),
)
def test_half_fff_inference_matches_the_cpu(in_w, leaf_w, out_w, depth, batch, half, act, seed):
    _half_or_skip(half)
    rng = np.random.default_rng(seed)
    layer = fastff.FFF(in_w, leaf_w, out_w, depth, act, seed=seed)
    dyadic_state(layer, rng)
    half_layer = layer.astype(half)
    x = dyadic(rng, (batch, in_w), denom=8, dtype=np.float32)
    y_cpu = half_layer(x)
    half_layer.to("cuda")
    y = half_layer(cp.asarray(x))
    assert isinstance(y, cp.ndarray) and y.dtype == cp.float32 and y.shape == (batch, out_w)
    assert_close(cp.asnumpy(y), y_cpu, np.float32, depth * in_w + leaf_w * (in_w + out_w), "y")


@pytest.mark.parametrize("half", HALVES)
def test_half_model_with_linear_and_master_leaf_matches_the_cpu(half):
    """The paths around the tree kernels: nn.Linear widens its 16-bit weights with CuPy's
    astype, the master leaf mixes through CuPy arithmetic."""
    _half_or_skip(half)
    rng = np.random.default_rng(3)
    model = fastff.nn.Sequential(
        fastff.nn.Linear(24, 16, seed=0), fastff.FFF(16, 4, 8, 3, master_leaf=True, seed=1)
    )
    dyadic_state(model, rng)
    half_model = model.astype(half)
    x = dyadic(rng, (37, 24), denom=8, dtype=np.float32)
    y_cpu = half_model(x)
    y = half_model.to("cuda")(cp.asarray(x))
    assert isinstance(y, cp.ndarray) and y.dtype == cp.float32
    assert_close(cp.asnumpy(y), y_cpu, np.float32, 24 + 16 * 7, "model y")


def test_half_layers_move_back_bit_exact_and_refuse_training():
    layer = fastff.UltraFFF(24, 16, 3, 2, seed=0).astype("float16")
    state = layer.state_dict()
    layer.to("cuda").to("cpu")
    for k, v in layer.state_dict().items():
        np.testing.assert_array_equal(v.view(np.uint16), state[k].view(np.uint16))
    layer.to("cuda")
    with pytest.raises(TypeError, match="half-precision layers are for inference"):
        layer.forward_train(cp.zeros((2, 24), dtype=cp.float32))


# ---- router-leaf FFF: GPU against the CPU kernels (themselves held to the reference) ----------


def _fff_pair(seed, in_w, leaf_w, out_w, depth, dtype, act, **kwargs):
    rng = np.random.default_rng(seed)
    cpu = fastff.FFF(in_w, leaf_w, out_w, depth, act, dtype=dtype, seed=seed, **kwargs)
    state = dyadic_state(cpu, rng)
    gpu = fastff.FFF(in_w, leaf_w, out_w, depth, act, dtype=dtype, seed=seed, **kwargs)
    gpu.load_state_dict(state)
    gpu.to("cuda")
    return cpu, gpu, state, rng


@given(
    in_w=WIDTHS,
    leaf_w=st.integers(1, 8),
    out_w=WIDTHS,
    depth=st.integers(0, 8),
    batch=st.integers(0, 300),
    dtype=st.sampled_from(DTYPES),
    act=st.sampled_from(["relu", "gelu"]),
    seed=st.integers(0, 2**32 - 1),
)
def test_fff_inference_matches_reference(in_w, leaf_w, out_w, depth, batch, dtype, act, seed):
    cpu, gpu, state, rng = _fff_pair(seed, in_w, leaf_w, out_w, depth, dtype, act)
    x = dyadic(rng, (batch, in_w), denom=8)
    y = gpu(cp.asarray(x))
    assert isinstance(y, cp.ndarray) and y.shape == (batch, out_w) and y.dtype == dtype
    y_ref = R.fff_infer(x, state, act)
    assert_close(cp.asnumpy(y), y_ref, dtype, depth * in_w + leaf_w * (in_w + out_w), "fff y")


@given(
    in_w=WIDTHS,
    leaf_w=st.integers(1, 8),
    out_w=WIDTHS,
    depth=st.integers(0, 6),
    batch=st.integers(0, 200),
    dtype=st.sampled_from(DTYPES),
    act=st.sampled_from(["relu", "gelu"]),
    hardened=st.booleans(),
    leak=st.sampled_from([0.0, 0.3]),
    dropout=st.sampled_from([0.0, 0.25]),
    hardening=st.sampled_from([0.0, 0.7]),
    seed=st.integers(0, 2**32 - 1),
)
def test_fff_training_matches_cpu(
    in_w, leaf_w, out_w, depth, batch, dtype, act, hardened, leak, dropout, hardening, seed
):
    kwargs = dict(train_hardened=hardened, region_leak=leak, dropout=dropout)
    cpu, gpu, _, rng = _fff_pair(seed, in_w, leaf_w, out_w, depth, dtype, act, **kwargs)
    x = dyadic(rng, (batch, in_w), denom=8)
    dy = dyadic(rng, (batch, out_w), denom=8)
    y_c, bp_c = cpu.forward_train(x, rng=np.random.default_rng(seed), hardening=hardening)
    y_g, bp_g = gpu.forward_train(
        cp.asarray(x), rng=np.random.default_rng(seed), hardening=hardening
    )
    terms = max(in_w, out_w, batch) * (depth + leaf_w + 1) * (2**depth if not hardened else 1)
    assert_close(cp.asnumpy(y_g), y_c, dtype, terms, "y")
    np.testing.assert_allclose(gpu.last_mean_entropy, cpu.last_mean_entropy, rtol=1e-4, atol=1e-6)
    dx_c, dx_g = bp_c(dy), bp_g(cp.asarray(dy))
    assert_close(cp.asnumpy(dx_g), dx_c, dtype, terms, "dx")
    for key, g in gpu.grads.items():
        assert_close(cp.asnumpy(g), cpu.grads[key], dtype, terms, key)


@given(
    in_w=st.integers(1, 64),
    leaf_w=st.integers(1, 8),
    out_w=st.integers(1, 16),
    depth=st.integers(0, 6),
    batch=st.integers(0, 200),
    dtype=st.sampled_from(DTYPES),
    hardened=st.booleans(),
    leak=st.sampled_from([0.0, 0.3]),
    balancing=st.sampled_from([0.0, 1.5]),
    seed=st.integers(0, 2**32 - 1),
)
def test_fff_balancing_and_master_leaf_match_cpu(
    in_w, leaf_w, out_w, depth, batch, dtype, hardened, leak, balancing, seed
):
    """Issue 23's options on CUDA: the balancing term's gradients (soft: into the mixture
    weights; hardened: cupyx sparse products), the master leaf, routing_stats."""
    kwargs = dict(train_hardened=hardened, region_leak=leak, master_leaf=True)
    cpu, gpu, state, rng = _fff_pair(seed, in_w, leaf_w, out_w, depth, dtype, "gelu", **kwargs)
    x = dyadic(rng, (batch, in_w), denom=8)
    dy = dyadic(rng, (batch, out_w), denom=8)
    kw = dict(hardening=0.5, load_balancing=balancing)
    y_c, bp_c = cpu.forward_train(x, rng=np.random.default_rng(seed), **kw)
    y_g, bp_g = gpu.forward_train(cp.asarray(x), rng=np.random.default_rng(seed), **kw)
    terms = max(in_w, out_w, batch) * (depth + 2 * leaf_w + 1) * (2**depth if not hardened else 1)
    assert_close(cp.asnumpy(y_g), y_c, dtype, terms, "y")
    np.testing.assert_allclose(gpu.last_balance_loss, cpu.last_balance_loss, rtol=1e-4, atol=1e-6)
    dx_c, dx_g = bp_c(dy), bp_g(cp.asarray(dy))
    assert_close(cp.asnumpy(dx_g), dx_c, dtype, terms, "dx")
    for key, g in gpu.grads.items():
        assert_close(cp.asnumpy(g), cpu.grads[key], dtype, terms, key)
    y = gpu(cp.asarray(x))
    assert_close(cp.asnumpy(y), R.fff_infer(x, state, "gelu"), dtype, terms, "inference")
    stats_c, stats_g = cpu.routing_stats(x), gpu.routing_stats(cp.asarray(x))
    for key in ("leaf_counts", "node_counts"):
        np.testing.assert_array_equal(stats_g[key], stats_c[key])


def test_ultra_routing_stats_on_cuda(rng):
    layer = fastff.UltraFFF(24, 3, 5, 2, seed=0)
    x = dyadic(rng, (300, 24), denom=8).astype(np.float32)
    dyadic_state(layer, rng)
    stats_c = layer.routing_stats(x)
    stats_g = layer.to("cuda").routing_stats(cp.asarray(x))
    np.testing.assert_array_equal(stats_g["node_counts"], stats_c["node_counts"])
    assert stats_g["routing_entropy"] == pytest.approx(stats_c["routing_entropy"])


def test_fff_device_round_trip_and_usage():
    cpu, gpu, _, rng = _fff_pair(1, 20, 4, 6, 4, np.float32, "relu", usage_mode="hard")
    x = rng.standard_normal((64, 20)).astype(np.float32)
    gpu.forward_train(cp.asarray(x))
    assert float(cp.asnumpy(gpu.leaf_usage).sum()) == 64
    gpu.to("cpu")
    np.testing.assert_allclose(gpu(x), cpu(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(TypeError, match="CUDA array"):
        gpu(cp.asarray(x))


def test_whole_model_trains_on_cuda_like_on_cpu():
    from fastff import nn, optim

    def model():
        return nn.Sequential(
            nn.Linear(12, 16, seed=1),
            nn.GELU(),
            fastff.UltraFFF(16, 16, 3, 2, seed=2),
            fastff.FFF(16, 4, 5, 2, train_hardened=True, seed=3),
        )

    cpu, gpu = model(), model().to("cuda")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 12)).astype(np.float32)
    labels = rng.integers(0, 5, 64)
    opts = optim.Adam(cpu, lr=1e-2), optim.Adam(gpu, lr=1e-2)
    for _ in range(3):
        for m, opt, xs, ls in (
            (cpu, opts[0], x, labels),
            (gpu, opts[1], cp.asarray(x), cp.asarray(labels)),
        ):
            opt.zero_grad()
            logits, backprop = m.forward_train(xs)
            _, dlogits = nn.softmax_cross_entropy(logits, ls)
            backprop(dlogits)
            opt.step()
    for k, v in cpu.state_dict().items():
        np.testing.assert_allclose(gpu.state_dict()[k], v, rtol=2e-3, atol=2e-4, err_msg=k)


def test_cuda_torch_tensor_goes_in_without_conversion():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch without CUDA")
    from fastff.gpu.ops import GPUOps

    layer = fastff.UltraFFF(16, 8, 3, seed=0).to("cuda")
    t = torch.randn(5, 16, device="cuda")
    seen = []
    real = GPUOps.ultra_forward

    def spy(self, x, *args):
        seen.append(x.data.ptr)
        return real(self, x, *args)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(GPUOps, "ultra_forward", spy)
        y = layer(t)
    assert seen == [t.data_ptr()]  # the kernel read the tensor's own memory: no copy
    assert isinstance(y, cp.ndarray)
    np.testing.assert_allclose(
        cp.asnumpy(y), cp.asnumpy(layer(cp.asarray(t.cpu().numpy()))), rtol=1e-6, atol=1e-6
    )


@pytest.mark.parametrize("kind", ["ultra", "fff-soft", "fff-hardened"])
def test_input_grad_false_gives_the_same_gradients_on_cuda(kind):
    """forward_train(x, input_grad=False) on CUDA: backprop returns None and the parameter
    gradients are bitwise those of the full backward (the soft FFF skips dx's products; the
    UltraFFF and hardened kernels still form dx and drop it)."""
    rng = np.random.default_rng(3)
    x = cp.asarray(rng.standard_normal((300, 40)).astype(np.float32))
    dy = cp.asarray(rng.standard_normal((300, 12)).astype(np.float32))
    grads = []
    for input_grad in (True, False):
        if kind == "ultra":
            layer, kw = fastff.UltraFFF(40, 12, 5, 2, seed=3), {}
        else:
            layer = fastff.FFF(
                40,
                4,
                12,
                3,
                train_hardened=kind == "fff-hardened",
                region_leak=0.2,
                master_leaf=True,
                seed=3,
            )
            kw = dict(rng=np.random.default_rng(4), hardening=0.5, load_balancing=0.1)
        layer.to("cuda")
        y, backprop = layer.forward_train(x, input_grad=input_grad, **kw)
        result = backprop(dy)
        assert (result is None) == (not input_grad)
        grads.append({key: cp.asnumpy(g) for key, g in layer.grads.items()})
    for key in grads[0]:
        np.testing.assert_array_equal(grads[1][key], grads[0][key], err_msg=key)
