"""Memory soak (slow): resident memory stays flat over 10,000 inference calls and 10,000
training steps, after a warm-up.

Two measures at checkpoints every 1,000 calls: the process's resident set (RSS, from
/proc/self/statm) and the bytes Python and NumPy hold according to tracemalloc (started after
the warm-up, so it sees only what the loop allocates and keeps). A leak of one small array
per call would show in both: 10,000 calls of 100 bytes is 1 MB.

Run: python -m pytest --runslow tests/test_memory.py -s   (prints the figures)
"""

import gc
import os
import tracemalloc

import numpy as np
import pytest

import fastff
from fastff import nn, optim

CALLS = int(os.environ.get("FASTFF_SOAK_CALLS", "10000"))
WARM_UP = 300
CHECKPOINTS = 10
RSS_TOLERANCE = 4 * 2**20  # allocator noise: freed pages are not always returned at once
TRACED_TOLERANCE = 256 * 2**10  # bytes still held by the loop after CALLS calls


def _under_asan() -> bool:
    """AddressSanitizer keeps freed memory in quarantine (256 MB by default), so RSS grows
    under it whatever the code does."""
    try:
        with open("/proc/self/maps") as f:
            return "libasan" in f.read()
    except OSError:
        return False


pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not os.path.exists("/proc/self/statm"), reason="reads RSS from /proc/self/statm (Linux)"
    ),
    pytest.mark.skipif(_under_asan(), reason="RSS under ASan measures its quarantine"),
]


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def soak(step, label):
    """Run step() WARM_UP times, then CALLS times with checkpoints; assert both measures flat
    and return them (MiB) for the report."""
    for _ in range(WARM_UP):
        step()
    gc.collect()
    tracemalloc.start()
    try:
        rss = [rss_bytes()]
        traced = [tracemalloc.get_traced_memory()[0]]
        for i in range(1, CALLS + 1):
            step()
            if i % (CALLS // CHECKPOINTS) == 0:
                gc.collect()
                rss.append(rss_bytes())
                traced.append(tracemalloc.get_traced_memory()[0])
    finally:
        tracemalloc.stop()
    mib = [r / 2**20 for r in rss]
    print(
        f"\n{label}: {CALLS} calls; RSS after warm-up {mib[0]:.1f} MiB, then "
        f"{', '.join(f'{m:.1f}' for m in mib[1:])} MiB (max growth "
        f"{(max(rss) - rss[0]) / 2**20:+.2f} MiB); tracemalloc growth "
        f"{(traced[-1] - traced[0]) / 2**10:+.1f} KiB"
    )
    assert max(rss) - rss[0] <= RSS_TOLERANCE, (label, mib)
    assert traced[-1] - traced[0] <= TRACED_TOLERANCE, (label, traced)


def test_inference_memory_is_flat():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 128)).astype(np.float32)
    ultra = fastff.UltraFFF(128, 128, 8, 2, seed=0)
    fff = fastff.FFF(128, 16, 128, 6, seed=0)
    soak(lambda: ultra(x), "UltraFFF inference")
    soak(lambda: fff(x), "FFF inference")


def test_training_memory_is_flat():
    rng = np.random.default_rng(1)
    model = nn.Sequential(
        nn.Linear(64, 64, seed=0),
        nn.GELU(),
        fastff.UltraFFF(64, 64, 6, seed=1),
        nn.Dropout(0.1, seed=2),
        fastff.FFF(64, 8, 64, 3, "gelu", region_leak=0.1, seed=3),
        fastff.FFF(64, 8, 10, 4, train_hardened=True, usage_mode="hard", seed=4),
    )
    opt = optim.Adam(model, lr=1e-3)
    x = rng.standard_normal((32, 64)).astype(np.float32)
    labels = rng.integers(0, 10, 32)

    def step():
        opt.zero_grad()
        logits, backprop = model.forward_train(x, hardening=0.1)
        _, dlogits = nn.softmax_cross_entropy(logits, labels)
        backprop(dlogits)
        opt.step()

    soak(step, "training step (Linear, UltraFFF, soft and hardened FFF, Adam)")


def test_save_load_memory_is_flat(tmp_path):
    layer = fastff.FFF(32, 4, 8, 3, seed=0)
    path = str(tmp_path / "m.safetensors")
    fastff.save(layer, path)
    soak(lambda: fastff.load(path), "fastff.load")
