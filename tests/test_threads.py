"""Thread safety and thread counts: the kernels release the GIL, so Python threads run them
concurrently; the thread count each kernel is given is resolved in Python, process-wide.

Guaranteed, and tested here: calling one layer's inference from many threads at once gives
bitwise the results of serial calls, and training different layers in different threads at
once gives bitwise the gradients of training them one after the other. Training one layer from
several threads at once is not supported (its gradients are shared accumulators).
"""

import os
import subprocess
import sys
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


# ---- which thread count a kernel is given ----------------------------------------------------


@pytest.fixture
def recorded_kernel_threads(monkeypatch):
    """The n_threads argument of every fastff._cmm.ultra_forward call, in call order."""
    from fastff import _cmm

    seen = []
    kernel = _cmm.ultra_forward

    def recording(*args):
        seen.append(args[-1])
        return kernel(*args)

    monkeypatch.setattr(_cmm, "ultra_forward", recording)
    return seen


@pytest.fixture
def default_threads():
    """No process-wide setting during the test, and none left behind."""
    fastff._threads.reset_num_threads()
    yield
    fastff._threads.reset_num_threads()


def _in_new_thread(fn):
    out = []
    thread = threading.Thread(target=lambda: out.append(fn()))
    thread.start()
    thread.join()
    return out[0]


def _call_and_count(layer, x):
    return fastff.get_num_threads(), layer(x).shape


def test_set_num_threads_reaches_threads_started_later(recorded_kernel_threads, default_threads):
    layer = fastff.UltraFFF(16, 8, 3, seed=0)
    x = np.ones((64, 16), np.float32)
    fastff.set_num_threads(1)
    assert _in_new_thread(lambda: _call_and_count(layer, x)) == (1, (64, 8))
    with ThreadPoolExecutor(2) as pool:
        assert pool.submit(_call_and_count, layer, x).result()[0] == 1
    assert recorded_kernel_threads == [1, 1]
    fastff.set_num_threads(3)  # and it changes for threads that already exist
    with ThreadPoolExecutor(1) as pool:
        pool.submit(layer, x).result()
        fastff.set_num_threads(2)
        pool.submit(layer, x).result()
    assert recorded_kernel_threads[2:] == [3, 2]


def test_threadpool_limits_govern_every_thread(recorded_kernel_threads, default_threads):
    threadpoolctl = pytest.importorskip("threadpoolctl")
    layer = fastff.UltraFFF(16, 8, 3, seed=0)
    x = np.ones((64, 16), np.float32)
    fastff.set_num_threads(2)
    with threadpoolctl.threadpool_limits(1):
        assert fastff.get_num_threads() == 1
        layer(x)
        assert _in_new_thread(lambda: _call_and_count(layer, x))[0] == 1
    assert fastff.get_num_threads() == 2
    layer(x)
    assert recorded_kernel_threads == [1, 1, 2]
    apis = {info["user_api"] for info in threadpoolctl.threadpool_info()}
    assert "fastff" in apis
    with threadpoolctl.threadpool_limits(1, user_api="fastff"):
        assert fastff.get_num_threads() == 1
    with fastff.num_threads(3):  # a scope in force is not what the limit restores afterwards
        with threadpoolctl.threadpool_limits(1):
            pass
        assert fastff._threads._process_wide == 2


def test_num_threads_scope_stays_in_its_thread(recorded_kernel_threads, default_threads):
    layer = fastff.UltraFFF(16, 8, 3, seed=0)
    x = np.ones((64, 16), np.float32)
    fastff.set_num_threads(2)
    with fastff.num_threads(1):
        layer(x)
        assert fastff.get_num_threads() == 1
        assert _in_new_thread(fastff.get_num_threads) == 2  # the process-wide setting there
        with fastff.num_threads(3):
            assert fastff.get_num_threads() == 3
        assert fastff.get_num_threads() == 1
    layer(x)
    assert recorded_kernel_threads == [1, 2]
    with pytest.raises(ValueError, match="n must be >= 1"):
        with fastff.num_threads(0):
            pass
    with pytest.raises(TypeError):
        with fastff.num_threads(1.5):
            pass


def test_every_kernel_refuses_a_thread_count_out_of_range():
    from fastff import _cmm

    layer = fastff.UltraFFF(4, 3, 1, seed=0)
    p = layer._params
    x = np.ones((2, 4), np.float32)
    y = np.empty((2, 3), np.float32)
    no_path = np.empty((0, 0), np.intp), np.empty((0, 0), np.float32)
    for bad in (0, -1, _cmm.MAX_THREADS + 1, 5000):
        with pytest.raises(ValueError, match="n_threads must be in"):
            _cmm.ultra_forward(
                x, p["w_in"], p["b_in"], p["w_out_t"], 1, 1, 2, y, *no_path, False, bad
            )
    a = np.zeros((2, 3), np.float32)
    with pytest.raises(ValueError, match="n_threads must be in"):
        _cmm.sgd_update(a, a, a, False, 0.1, 0.0, 0.0, False, 0)


def test_small_work_runs_on_the_calling_thread():
    from fastff import _cmm

    before = _cmm._set_work_per_thread(1 << 18)  # the shipped grain, not the tests' one
    try:
        assert _cmm._team_size(2, 64, 100.0) == 1  # a soft FFF kernel on a small batch
        assert _cmm._team_size(2, 16, 1e9) == 1  # one chunk of rows
        assert _cmm._team_size(2, 4096, 12 * 1536.0) == 2  # ufb's forward
        assert _cmm._team_size(8, 4096, 12 * 1536.0) == 8
        assert _cmm._team_size(8, 48, 1e9) == 3  # at most one thread per chunk of 16 rows
    finally:
        _cmm._set_work_per_thread(before)


def _fresh_process(code, **env):
    settings = ("OMP_NUM_THREADS", "GOMP_SPINCOUNT", "OMP_WAIT_POLICY", "OPENBLAS_THREAD_TIMEOUT")
    environ = {k: v for k, v in os.environ.items() if k not in settings}
    environ.update(env)
    result = subprocess.run(
        [sys.executable, "-c", code], env=environ, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


def test_defaults_follow_omp_num_threads_and_set_short_spins():
    code = (
        "import os, fastff; print(fastff.get_num_threads(), "
        "os.environ.get('GOMP_SPINCOUNT'), os.environ.get('OPENBLAS_THREAD_TIMEOUT'))"
    )
    n, spin, timeout = _fresh_process(code, OMP_NUM_THREADS="1")
    assert n == "1" and spin == fastff._spin.GOMP_SPINCOUNT
    assert timeout == fastff._spin.OPENBLAS_THREAD_TIMEOUT  # fastff imported before NumPy
    n, _, _ = _fresh_process(code, OMP_NUM_THREADS="3,2")
    assert n == "3"
    n, spin, _ = _fresh_process(code, OMP_WAIT_POLICY="active")
    assert int(n) == fastff._threads.available_cpus() and spin == "None"  # the user's choice
    n, spin, timeout = _fresh_process(
        code, OMP_NUM_THREADS="zero", GOMP_SPINCOUNT="5", OPENBLAS_THREAD_TIMEOUT="20"
    )
    assert int(n) == fastff._threads.available_cpus() and (spin, timeout) == ("5", "20")
    # NumPy first: its OpenBLAS is loaded already, and fastff leaves the setting alone
    _, _, timeout = _fresh_process("import numpy\n" + code)
    assert timeout == "None"


def test_a_bundled_libgomp_of_another_package_does_not_stop_the_short_spin():
    """scikit-learn's wheel maps its own libgomp-<hash>.so; fastff's libgomp.so.1 still reads
    the environment when it loads, so fastff still sets its short spin (it did not: in an
    estimator's predict, 2 threads ran at half the speed of 1)."""
    pytest.importorskip("sklearn")
    code = (
        "import sklearn.neural_network\n"
        "maps = open('/proc/self/maps').read()\n"
        "bundled = any('libgomp' in l and '/libgomp.so' not in l for l in maps.splitlines())\n"
        "import os, fastff\n"
        "print(bundled, os.environ.get('GOMP_SPINCOUNT'))"
    )
    bundled, spin = _fresh_process(code)
    if bundled != "True":
        pytest.skip("this scikit-learn maps no libgomp of its own")
    assert spin == fastff._spin.GOMP_SPINCOUNT
