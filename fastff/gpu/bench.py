"""GPU side of `python -m fastff bench --device cuda`: the dense FF through cuBLAS, CUDA events."""

from __future__ import annotations

import cupy as cp
from cupyx.scipy.special import erf


def device_name() -> str:
    props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    return f"{name}, CUDA runtime {cp.cuda.runtime.runtimeGetVersion()}, CuPy {cp.__version__}"


def synchronize() -> None:
    cp.cuda.Device().synchronize()


def time_events(fn, repeat: int, calls: int = 10):
    """Median, min and max seconds per call of `fn` by CUDA events, after one warm-up call.

    Each sample times `calls` back-to-back calls, as a pipeline issues them: the host's work
    for the next call (Python, argument checks, the launch) overlaps the device's work on the
    current one, so a sample measures the device, not one call's host latency. A single call
    alone adds that latency (about 30 us of Python and CuPy on the H200 machine)."""
    fn()
    synchronize()
    times = []
    for _ in range(repeat):
        start, stop = cp.cuda.Event(), cp.cuda.Event()
        start.record()
        for _ in range(calls):
            fn()
        stop.record()
        stop.synchronize()
        times.append(cp.cuda.get_elapsed_time(start, stop) / 1e3 / calls)
    times.sort()
    return times[len(times) // 2], times[0], times[-1]


def _act(name, z):
    if name == "relu":
        return cp.maximum(z, 0)
    if name == "gelu":
        return 0.5 * z * (1 + erf(z * 0.7071067811865476))
    return z


def _act_grad(name, z):
    if name == "relu":
        return (z > 0).astype(z.dtype)
    if name == "gelu":
        return (
            0.5 * (1 + erf(z * 0.7071067811865476)) + z * cp.exp(-0.5 * z * z) * 0.3989422804014327
        )
    return cp.ones_like(z)


def cuda_pair(layer, x, dense_weights, activation, train, float32_layer=None):
    """(dense_fn, fastff_fn, rows, info, float32_fn) on the GPU. cuBLAS runs in plain float32
    (CuPy uses TF32 only when CUPY_TF32=1). float32_layer: the layer a half-precision `layer`
    was rounded from; float32_fn runs it on the same input (None without one)."""
    layer.to("cuda")
    xg = cp.asarray(x)
    float32_fn = None
    if float32_layer is not None:
        float32_layer.to("cuda")

        def float32_fn():
            float32_layer(xg)

    w1, b1, w2 = (cp.asarray(w) for w in dense_weights)
    dy = cp.ones((x.shape[0], w2.shape[1]), dtype=xg.dtype)
    if train:

        def fff():
            _, backprop = layer.forward_train(xg)
            backprop(dy)

        def dense():
            z = xg @ w1 + b1
            h = _act(activation, z)
            _ = h @ w2
            dw2 = h.T @ dy
            dz = (dy @ w2.T) * _act_grad(activation, z)
            dw1 = xg.T @ dz
            db1 = dz.sum(axis=0)
            return dz @ w1.T, dw1, db1, dw2
    else:

        def fff():
            layer(xg)

        def dense():
            return _act(activation, xg @ w1 + b1) @ w2

    info = {
        "dense_width": layer.training_width,
        "neurons_per_row": layer.neurons_per_inference,
        "gpu": device_name(),
    }
    return dense, fff, x.shape[0], info, float32_fn
