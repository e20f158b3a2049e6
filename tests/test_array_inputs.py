"""Array inputs beyond NumPy: DLPack producers (torch tensors, or any object with __dlpack__ and
__dlpack_device__) go in without a copy where the layout allows, and arrays on another device are
refused with a clear error. Torch tests skip when torch is absent."""

import numpy as np
import pytest

import fastff
from fastff import nn
from fastff._validation import as_float_array, as_rows


class HostProducer:
    """A minimal DLPack producer over a NumPy array: no __array__, no buffer protocol, so only
    the DLPack path can read it."""

    def __init__(self, array):
        self._array = array

    def __dlpack__(self, **kwargs):
        return self._array.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self._array.__dlpack_device__()


class ForeignDeviceProducer:
    """Claims to live on another device (CUDA: DLPack device type 2, ROCm: 10)."""

    def __init__(self, device_type):
        self.device_type = device_type

    def __dlpack__(self, **kwargs):
        raise AssertionError("a CPU layer must not try to read a device array")

    def __dlpack_device__(self):
        return (self.device_type, 0)


class BrokenExportProducer(HostProducer):
    """A CPU producer whose DLPack export fails but which NumPy can still convert."""

    def __dlpack__(self, **kwargs):
        raise BufferError("cannot export")

    def __array__(self, dtype=None, copy=None):
        return self._array


def _layers():
    return {
        "UltraFFF": fastff.UltraFFF(8, 5, depth=3, parallel_size=2, seed=0),
        "FFF": fastff.FFF(8, 3, 5, depth=2, seed=0),
        "Sequential": nn.Sequential(nn.Linear(8, 6, seed=0), nn.GELU(), nn.Linear(6, 5, seed=1)),
    }


# ---- any DLPack producer (no torch needed) -----------------------------------------------------


def test_host_dlpack_producer_is_viewed_without_a_copy():
    base = np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)
    rows, lead = as_rows(HostProducer(base), 8, np.dtype(np.float32))
    assert lead == (4,)
    assert np.shares_memory(rows, base)
    np.testing.assert_array_equal(rows, base)


@pytest.mark.parametrize("kind", ["UltraFFF", "FFF", "Sequential"])
def test_layers_take_a_host_dlpack_producer(kind):
    layer = _layers()[kind]
    x = np.random.default_rng(1).standard_normal((2, 3, 8)).astype(np.float32)
    np.testing.assert_array_equal(layer(HostProducer(x)), layer(x))


def test_failed_dlpack_export_falls_back_to_asarray():
    x = np.random.default_rng(2).standard_normal((3, 8)).astype(np.float32)
    layer = _layers()["UltraFFF"]
    np.testing.assert_array_equal(layer(BrokenExportProducer(x)), layer(x))


@pytest.mark.parametrize("device_type, device_name", [(2, "CUDA"), (10, "ROCm")])
def test_device_producer_on_a_cpu_layer_is_refused(device_type, device_name):
    producer = ForeignDeviceProducer(device_type)
    for layer in _layers().values():
        with pytest.raises(TypeError, match=f"{device_name} device.*layer is on 'cpu'"):
            layer(producer)
    with pytest.raises(TypeError, match="layer is on 'cpu'"):
        nn.GELU()(producer)
    with pytest.raises(TypeError, match=f"DLPack device type {device_type}"):
        as_float_array(producer)


# ---- torch ---------------------------------------------------------------------------------


@pytest.fixture
def torch():
    return pytest.importorskip("torch")


@pytest.mark.parametrize("kind", ["UltraFFF", "FFF", "Sequential"])
def test_torch_tensor_gives_the_numpy_result(torch, kind):
    layer = _layers()[kind]
    t = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(0))
    y = layer(t)
    assert isinstance(y, np.ndarray) and y.shape == (2, 3, 5) and y.dtype == np.float32
    np.testing.assert_array_equal(y, layer(t.numpy()))


def test_torch_float32_contiguous_tensor_is_not_copied(torch):
    t = torch.randn(6, 8)
    rows, _ = as_rows(t, 8, np.dtype(np.float32))
    assert np.shares_memory(rows, t.numpy())
    assert rows.ctypes.data == t.data_ptr()
    # A layout the kernels cannot use is copied, and the result is still right.
    strided = torch.randn(8, 6).T
    rows, _ = as_rows(strided, 8, np.dtype(np.float32))
    assert rows.flags.c_contiguous and not np.shares_memory(rows, strided.numpy())
    np.testing.assert_array_equal(rows, strided.numpy())


def test_torch_dtypes_are_cast_or_refused(torch):
    layer = _layers()["UltraFFF"]
    x = np.arange(16, dtype=np.float64).reshape(2, 8) / 16
    np.testing.assert_array_equal(layer(torch.from_numpy(x)), layer(x))
    ints = torch.arange(16, dtype=torch.int64).reshape(2, 8)
    np.testing.assert_array_equal(layer(ints), layer(ints.numpy()))
    with pytest.raises(TypeError, match="dtype bool"):
        layer(torch.ones(2, 8, dtype=torch.bool))


def test_torch_tensors_in_training(torch):
    layer = _layers()["Sequential"]
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))
    dy = torch.randn(4, 5, generator=torch.Generator().manual_seed(2))
    y_t, backprop_t = layer.forward_train(x)
    dx_t = backprop_t(dy)
    grads_t = {k: g.copy() for k, g in layer.grads.items()}
    layer.zero_grad()
    y_n, backprop_n = layer.forward_train(x.numpy())
    dx_n = backprop_n(dy.numpy())
    np.testing.assert_array_equal(y_t, y_n)
    np.testing.assert_array_equal(dx_t, dx_n)
    for key, g in layer.grads.items():
        np.testing.assert_array_equal(grads_t[key], g)


# ---- CUDA (skipped without CuPy and a device) --------------------------------------------------


def _have_cuda():
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # no CuPy, no driver, no device
        return False


@pytest.mark.gpu
@pytest.mark.skipif(not _have_cuda(), reason="needs CuPy and a CUDA device")
def test_cuda_layer_takes_cuda_dlpack_producers_and_refuses_host_ones():
    import cupy as cp

    class CudaProducer(HostProducer):
        """A CuPy array seen only through DLPack (no __cuda_array_interface__)."""

    layer = fastff.UltraFFF(8, 5, depth=3, parallel_size=2, seed=0).to("cuda")
    x = cp.asarray(np.random.default_rng(3).standard_normal((4, 8)).astype(np.float32))
    y = layer(CudaProducer(x))
    assert isinstance(y, cp.ndarray)
    cp.testing.assert_array_equal(y, layer(x))
    with pytest.raises(TypeError, match="host array"):
        layer(HostProducer(cp.asnumpy(x)))


@pytest.mark.gpu
@pytest.mark.skipif(not _have_cuda(), reason="needs CuPy and a CUDA device")
def test_torch_cuda_tensors_follow_the_layer_device(torch):
    if not torch.cuda.is_available():
        pytest.skip("this torch has no CUDA")
    import cupy as cp

    layer = fastff.UltraFFF(8, 5, depth=3, parallel_size=2, seed=0)
    x = torch.randn(4, 8, device="cuda")
    with pytest.raises(TypeError, match="layer is on 'cpu'"):
        layer(x)
    y_cpu = layer(x.cpu())
    layer.to("cuda")
    y = layer(x)
    assert isinstance(y, cp.ndarray)
    np.testing.assert_allclose(cp.asnumpy(y), y_cpu, rtol=1e-5, atol=1e-6)


# ---- JAX (skipped without it) ----------------------------------------------------------------


def test_jax_arrays():
    jax = pytest.importorskip("jax")
    x = np.random.default_rng(4).standard_normal((3, 8)).astype(np.float32)
    x_jax = jax.device_put(x, jax.devices("cpu")[0])
    for layer in _layers().values():
        np.testing.assert_array_equal(layer(x_jax), layer(x))
    if any(d.platform == "gpu" for d in jax.devices()):
        on_gpu = jax.device_put(x, jax.devices("gpu")[0])
        with pytest.raises(TypeError, match="layer is on 'cpu'"):
            _layers()["FFF"](on_gpu)
