"""Reproducibility on the CPU (docs/reliability.md, "Reproducibility and NaN policy").

- Same seeds, same thread counts: training is bitwise reproducible (weights after N steps).
- The fastff kernels are thread-count independent: rows are independent in the forward passes
  and gradient rows are summed by one thread each, in row order. So UltraFFF and FFF give
  bitwise the same outputs, dx and gradients with 1, 2 or 3 threads. The BLAS products that
  Linear and soft FFF training use are BLAS's business: with its thread count held fixed, a
  whole model trains bitwise the same whatever fastff's thread count.
"""

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

import fastff
from fastff import nn, optim

THREAD_COUNTS = (1, 2, 3)


def _model(seed):
    return nn.Sequential(
        nn.Linear(12, 16, seed=seed),
        nn.GELU(),
        fastff.UltraFFF(16, 16, 3, 2, seed=seed + 1),
        nn.Dropout(0.1, seed=seed + 2),
        fastff.FFF(16, 4, 5, 2, "gelu", dropout=0.1, region_leak=0.1, seed=seed + 3),
    )


def _train(seed, steps=6):
    """A few Adam steps on random data; every random stream is seeded."""
    model = _model(seed)
    opt = optim.Adam(model, lr=1e-2)
    data = np.random.default_rng(seed + 100)
    for _ in range(steps):
        x = data.standard_normal((64, 12)).astype(np.float32)
        labels = data.integers(0, 5, 64)
        opt.zero_grad()
        logits, backprop = model.forward_train(x, hardening=0.1)
        _, dlogits = nn.softmax_cross_entropy(logits, labels)
        backprop(dlogits)
        opt.step()
    return model.state_dict()


@pytest.fixture
def restore_threads():
    before = fastff.get_num_threads()
    yield
    fastff.set_num_threads(before)


def test_same_seed_same_threads_gives_bitwise_the_same_weights(restore_threads):
    fastff.set_num_threads(2)
    first, second = _train(7), _train(7)
    for key in first:
        assert np.array_equal(first[key], second[key]), key
    other = _train(8)
    assert any(not np.array_equal(first[k], other[k]) for k in first)  # the seed matters


def test_training_is_bitwise_the_same_for_any_kernel_thread_count(restore_threads):
    results = []
    with threadpool_limits(limits=1):  # BLAS (Linear, soft FFF GEMMs) held at one thread
        for threads in THREAD_COUNTS:
            fastff.set_num_threads(threads)
            results.append(_train(7))
    for threads, state in zip(THREAD_COUNTS[1:], results[1:]):
        for key in state:
            assert np.array_equal(state[key], results[0][key]), (threads, key)


@pytest.mark.parametrize(
    "make",
    [
        lambda: fastff.UltraFFF(33, 17, 6, 3, "gelu", seed=1),
        lambda: fastff.UltraFFF(33, 17, 4, 1, "relu", dtype=np.float64, seed=2),
        lambda: fastff.FFF(
            33, 5, 17, 4, "gelu", train_hardened=True, region_leak=0.2, dropout=0.2, seed=3
        ),
        lambda: fastff.FFF(33, 5, 17, 3, "relu", region_leak=0.2, dropout=0.2, seed=4),
    ],
    ids=["ultra32", "ultra64", "fff-hardened", "fff-soft"],
)
def test_layers_are_thread_count_independent(make, restore_threads):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((1000, 33)).astype(np.float32)
    dy = rng.standard_normal((1000, 17)).astype(np.float32)
    layer = make()
    results = []
    with threadpool_limits(limits=1):
        for threads in THREAD_COUNTS:
            fastff.set_num_threads(threads)
            layer.zero_grad()
            options = (
                {"rng": np.random.default_rng(6), "hardening": 0.3}
                if isinstance(layer, fastff.FFF)
                else {}
            )
            y, backprop = layer.forward_train(x, **options)
            dx = backprop(dy)
            results.append((layer(x), y, dx, {k: g.copy() for k, g in layer.grads.items()}))
    inference, y, dx, grads = results[0]
    for threads, (inference_t, y_t, dx_t, grads_t) in zip(THREAD_COUNTS[1:], results[1:]):
        assert np.array_equal(inference_t, inference), threads
        assert np.array_equal(y_t, y), threads
        assert np.array_equal(dx_t, dx), threads
        for key in grads:
            assert np.array_equal(grads_t[key], grads[key]), (threads, key)
