"""Where the host time of a GPU UltraFFF inference call goes (cProfile over many calls).

With the device kernel at ~50 us for gpu-ufb, back-to-back calls are bound by the host's Python
and CuPy work per call; this lists the functions that take it.

python benchmarks/gpu_host_profile.py [--calls 2000]
"""

import argparse
import cProfile
import pstats
import time

import cupy as cp
import numpy as np

import fastff


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--calls", type=int, default=2000)
    a = p.parse_args()
    layer = fastff.UltraFFF(768, 768, 11, seed=0).to("cuda")
    x = cp.asarray(np.random.default_rng(0).standard_normal((8192, 768)), cp.float32)
    small = x[:1]
    for name, batch in (("batch 8192", x), ("batch 1", small)):
        layer(batch)
        cp.cuda.Device().synchronize()
        t0 = time.perf_counter()
        for _ in range(a.calls):
            layer(batch)
        host = (time.perf_counter() - t0) / a.calls
        cp.cuda.Device().synchronize()
        total = (time.perf_counter() - t0) / a.calls
        print(f"{name}: host {host * 1e6:.1f} us per call issued, {total * 1e6:.1f} us in all")
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(a.calls):
        layer(small)
    profile.disable()
    cp.cuda.Device().synchronize()
    pstats.Stats(profile).sort_stats("tottime").print_stats(18)


if __name__ == "__main__":
    main()
