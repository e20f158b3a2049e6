"""Thread safety: the kernels release the GIL, so Python threads run them concurrently.

Guaranteed, and tested here: calling one layer's inference from many threads at once gives
bitwise the results of serial calls, and training different layers in different threads at
once gives bitwise the gradients of training them one after the other. Training one layer from
several threads at once is not supported (its gradients are shared accumulators).
"""

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import fastff

N_THREADS = 8
CALLS_PER_THREAD = 6


@pytest.fixture
def two_kernel_threads():
    """Two OpenMP threads per call whatever the environment, restored afterwards."""
    before = fastff.get_num_threads()
    fastff.set_num_threads(2)
    yield
    fastff.set_num_threads(before)


def _inference_layers():
    return [fastff.UltraFFF(48, 32, 6, 2, "gelu", seed=1), fastff.FFF(48, 8, 32, 5, "relu", seed=2)]


@pytest.mark.parametrize("layer", _inference_layers(), ids=["UltraFFF", "FFF"])
def test_one_layer_from_eight_threads_matches_serial_calls(layer, two_kernel_threads):
    rng = np.random.default_rng(0)
    inputs = [rng.standard_normal((200 + 17 * i, 48)).astype(np.float32) for i in range(N_THREADS)]
    expected = [layer(x) for x in inputs]
    start = threading.Barrier(N_THREADS)

    def worker(i):
        start.wait()  # all threads enter the kernels together
        return [layer(inputs[i]) for _ in range(CALLS_PER_THREAD)]

    with ThreadPoolExecutor(N_THREADS) as pool:
        results = list(pool.map(worker, range(N_THREADS)))
    for i, outputs in enumerate(results):
        for y in outputs:
            assert np.array_equal(y, expected[i]), f"thread {i} differs from the serial call"


def _train(layer, batches, rng_seed):
    """forward_train + backprop over `batches` (accumulating); returns (outputs, dxs, grads)."""
    layer.zero_grad()
    rng = np.random.default_rng(rng_seed)
    outputs, dxs = [], []
    for x, dy in batches:
        options = {"rng": rng, "hardening": 0.5} if isinstance(layer, fastff.FFF) else {}
        y, backprop = layer.forward_train(x, **options)
        outputs.append(y)
        dxs.append(backprop(dy))
    return outputs, dxs, {k: v.copy() for k, v in layer.grads.items()}


def test_two_layers_trained_in_two_threads_match_serial_training(two_kernel_threads):
    rng = np.random.default_rng(1)
    ultra = fastff.UltraFFF(40, 24, 5, 2, "gelu", seed=3)
    fff = fastff.FFF(
        40, 6, 24, 4, "gelu", train_hardened=True, region_leak=0.1, dropout=0.1, seed=4
    )
    batches = [
        (
            rng.standard_normal((300, 40)).astype(np.float32),
            rng.standard_normal((300, 24)).astype(np.float32),
        )
        for _ in range(8)
    ]
    serial = [_train(ultra, batches, 10), _train(fff, batches, 11)]
    start = threading.Barrier(2)

    def worker(layer, seed):
        start.wait()
        return _train(layer, batches, seed)

    with ThreadPoolExecutor(2) as pool:
        concurrent = [
            f.result() for f in [pool.submit(worker, ultra, 10), pool.submit(worker, fff, 11)]
        ]
    for name, (ys, dxs, grads), (ys0, dxs0, grads0) in zip(["UltraFFF", "FFF"], concurrent, serial):
        for y, y0 in zip(ys, ys0):
            assert np.array_equal(y, y0), name
        for dx, dx0 in zip(dxs, dxs0):
            assert np.array_equal(dx, dx0), name
        for key in grads0:
            assert np.array_equal(grads[key], grads0[key]), (name, key)


@pytest.mark.parametrize("kernel", ["ultra inference", "ultra backward", "fff inference"])
def test_kernels_release_the_gil(kernel):
    """While one thread is inside a kernel, the main thread keeps running Python. With the GIL
    held, the main thread would stall for the whole call: its longest pause would be about the
    call's duration. Measured up to three times, as the machine may be busy."""
    before = fastff.get_num_threads()
    fastff.set_num_threads(1)  # the kernel takes one core, the main thread another
    try:
        rng = np.random.default_rng(2)
        if kernel.startswith("ultra"):
            layer = fastff.UltraFFF(256, 256, 8, 4, seed=5)
        else:
            layer = fastff.FFF(256, 64, 256, 6, seed=5)
        x = rng.standard_normal((20000, 256)).astype(np.float32)  # calls of ~0.1-0.3 s
        if kernel == "ultra backward":
            # a backprop runs once: one forward for each of the (up to) four calls below
            pending = [layer.forward_train(x) for _ in range(4)]
            dy = np.ones_like(pending[0][0])
            call = lambda: pending.pop()[1](dy)  # noqa: E731
        else:
            call = lambda: layer(x)  # noqa: E731
        call()  # warm-up
        for _ in range(3):
            done = threading.Event()
            times = []

            def worker(done=done):
                call()
                done.set()

            thread = threading.Thread(target=worker)
            t0 = time.perf_counter()
            thread.start()
            while not done.is_set():
                times.append(time.perf_counter())
            thread.join()
            duration = time.perf_counter() - t0
            gaps = np.diff([t0] + times)
            # With the GIL released the pauses are switch intervals (5 ms) and scheduling
            if gaps.max() < duration / 3:
                return
        pytest.fail(
            f"{kernel}: the main thread paused {gaps.max() * 1e3:.0f} ms during a "
            f"{duration * 1e3:.0f} ms kernel call: the GIL seems held"
        )
    finally:
        fastff.set_num_threads(before)
