"""Where a GPU UltraFFF training step spends its time (CUDA events per phase).

python benchmarks/gpu_phases.py [--batch 8192] [--depth 11] [--width 768]
"""

import argparse

import cupy as cp
import numpy as np

import fastff
from fastff.gpu.bench import time_events


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=8192)
    p.add_argument("--depth", type=int, default=11)
    p.add_argument("--width", type=int, default=768)
    a = p.parse_args()
    layer = fastff.UltraFFF(a.width, a.width, a.depth, seed=0).to("cuda")
    x = cp.asarray(np.random.default_rng(0).standard_normal((a.batch, a.width)), cp.float32)
    dy = cp.ones((a.batch, a.width), cp.float32)
    phases = {
        "inference": lambda: layer(x),
        "forward_train": lambda: layer.forward_train(x),
        "forward_train+backprop": lambda: layer.forward_train(x)[1](dy),
    }
    _, bp = layer.forward_train(x)
    phases["backprop only"] = lambda: bp(dy)
    for name, fn in phases.items():
        med, lo, hi = time_events(fn, 20)
        print(f"{name:<24} {med * 1e3:8.3f} ms  (min {lo * 1e3:.3f}, max {hi * 1e3:.3f})")
    ops = layer.ops
    flat = cp.asarray(np.random.default_rng(1).integers(0, 4095, a.batch * (a.depth + 1)))
    med, _, _ = time_events(lambda: cp.argsort(flat), 20)
    print(f"{'argsort of visits':<24} {med * 1e3:8.3f} ms")
    del ops
    import fastff.gpu.cmm as gpu_cmm

    for chunk in (64, 128, 256):
        gpu_cmm.CHUNK_VISITS = chunk
        med, _, _ = time_events(lambda: bp(dy), 20)
        print(f"backprop, chunk {chunk:<4}     {med * 1e3:8.3f} ms")


if __name__ == "__main__":
    main()
