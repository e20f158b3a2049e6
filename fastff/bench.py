"""`python -m fastff bench`: fastff kernels against the dense feedforward layer they replace.

Protocol (../shared/BENCHMARKS.md): same dtype and thread count on both sides, one warm-up, the
median and min-max of >= 5 timed repetitions, ratio = dense time / fastff time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from . import reference


@dataclass
class Case:
    """One measured comparison: `make()` returns (dense_fn, fastff_fn, rows, info)."""

    name: str
    kind: str
    make: Callable
    params: dict = field(default_factory=dict)


def _time(fn, repeat: int):
    fn()  # warm-up (also triggers lazy allocations)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), min(times), max(times)


def _dense_ff(rng, in_w, width, out_w, dtype):
    """Weights of the baseline act(x @ w1 + b1) @ w2, pre-transposed so both are plain GEMMs."""
    w1 = (rng.standard_normal((in_w, width)) / np.sqrt(in_w)).astype(dtype)
    b1 = np.zeros(width, dtype)
    w2 = (rng.standard_normal((width, out_w)) / np.sqrt(width)).astype(dtype)
    return w1, b1, w2


def _dense_train_step(x, w1, b1, w2, activation):
    """Forward + backward of the dense FF (all three gradients and dx)."""
    z = x @ w1
    z += b1
    h = reference.act(activation, z)
    y = h @ w2
    dy = y  # any dy of the right shape: the cost is what is measured
    dw2 = h.T @ dy
    dz = (dy @ w2.T) * reference.act_grad(activation, z)
    dw1 = x.T @ dz
    db1 = dz.sum(axis=0)
    return dz @ w1.T, dw1, db1, dw2


def make_ultra(
    in_w,
    out_w,
    depth,
    batch,
    *,
    parallel_size=1,
    activation="gelu",
    train=False,
    dtype=np.float32,
    device="cpu",
):
    from .layers import UltraFFF

    def make():
        rng = np.random.default_rng(0)
        layer = UltraFFF(in_w, out_w, depth, parallel_size, activation, dtype=dtype, seed=0)
        width = layer.training_width
        x = rng.standard_normal((batch, in_w)).astype(dtype)
        w1, b1, w2 = _dense_ff(rng, in_w, width, out_w, dtype)
        if device == "cuda":
            return _make_cuda_pair(layer, x, (w1, b1, w2), activation, train)
        if train:
            dy = rng.standard_normal((batch, out_w)).astype(dtype)

            def fff():
                _, backprop = layer.forward_train(x)
                backprop(dy)

            def dense():
                _dense_train_step(x, w1, b1, w2, activation)
        else:

            def fff():
                layer(x)

            def dense():
                reference.dense_forward(x, w1, b1, w2, activation)

        return (
            dense,
            fff,
            batch,
            {"dense_width": width, "neurons_per_row": layer.neurons_per_inference},
        )

    return make


def _make_cuda_pair(layer, x, dense_weights, activation, train):
    from .gpu.bench import cuda_pair

    return cuda_pair(layer, x, dense_weights, activation, train)


CONFIGS: dict[str, list[Case]] = {
    "ufb": [Case("ufb", "neuron tree", make_ultra(768, 768, 11, 4096))],
    "ufb-b1": [Case("ufb-b1", "neuron tree", make_ultra(768, 768, 11, 1))],
    "ufb-train": [
        Case("ufb-train", "neuron tree fwd+bwd", make_ultra(768, 768, 11, 4096, train=True))
    ],
    "scaling": [
        Case(f"scaling-d{d}", "neuron tree", make_ultra(768, 768, d, 4096), {"depth": d})
        for d in (6, 8, 10, 12, 14)
    ],
}
GPU_CONFIGS: dict[str, list[Case]] = {
    "gpu-ufb": [
        Case("gpu-ufb", "neuron tree", make_ultra(768, 768, 11, 8192, device="cuda")),
        Case(
            "gpu-ufb-train",
            "neuron tree fwd+bwd",
            make_ultra(768, 768, 11, 8192, train=True, device="cuda"),
        ),
    ],
}
DEFAULT_CPU = ["ufb", "ufb-b1", "ufb-train"]


def _limit_threads(threads: int):
    """Pin OpenMP (fastff) and BLAS (dense baseline) to the same thread count."""
    from . import set_num_threads

    set_num_threads(threads)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        print(
            "note: threadpoolctl is not installed; BLAS threads follow OPENBLAS_NUM_THREADS / "
            "OMP_NUM_THREADS (pip install fastff[bench])"
        )
        return None
    return threadpool_limits(limits=threads)


def run(
    config_names: list[str],
    *,
    threads: int,
    repeat: int,
    device: str = "cpu",
    json_path: str | None = None,
    out=print,
) -> list[dict]:
    table = GPU_CONFIGS if device == "cuda" else CONFIGS
    unknown = [c for c in config_names if c not in table]
    if unknown:
        raise SystemExit(
            f"unknown config(s) {unknown} for device {device!r}; choose from {sorted(table)}"
        )
    limiter = _limit_threads(threads) if device == "cpu" else None
    machine = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus, {threads} threads"
    )
    if device == "cuda":
        from .gpu.bench import device_name

        machine = device_name()
    out(
        f"fastff bench on {machine} (median of {repeat}, dense = NumPy/BLAS"
        f"{' via cuBLAS' if device == 'cuda' else ''})"
    )
    header = (
        f"{'config':<16}{'kind':<22}{'dense ms':>12}{'fastff ms':>12}{'speedup':>10}{'rows/s':>14}"
    )
    out(header)
    results = []
    for name in config_names:
        for case in table[name]:
            dense, fff, rows, info = case.make()
            if device == "cuda":
                from .gpu.bench import time_events as timer
            else:
                timer = _time
            d_med, d_min, d_max = timer(dense, repeat)
            f_med, f_min, f_max = timer(fff, repeat)
            ratio = d_med / f_med
            out(
                f"{case.name:<16}{case.kind:<22}{d_med * 1e3:>12.3f}{f_med * 1e3:>12.3f}"
                f"{ratio:>9.1f}x{rows / f_med:>14.3g}"
            )
            results.append(
                {
                    "config": case.name,
                    "kind": case.kind,
                    "device": device,
                    "threads": threads,
                    "dense_s": d_med,
                    "dense_min_s": d_min,
                    "dense_max_s": d_max,
                    "fastff_s": f_med,
                    "fastff_min_s": f_min,
                    "fastff_max_s": f_max,
                    "speedup": ratio,
                    "rows_per_s": rows / f_med,
                    "rows": rows,
                    **case.params,
                    **info,
                }
            )
    if limiter is not None:
        limiter.unregister() if hasattr(limiter, "unregister") else None
    if json_path:
        os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
        with open(json_path, "w") as f:
            json.dump({"machine": machine, "repeat": repeat, "results": results}, f, indent=2)
        out(f"wrote {json_path}")
    return results


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "configs",
        nargs="*",
        help=f"configurations to run (default: {' '.join(DEFAULT_CPU)}; cuda: gpu-ufb)",
    )
    parser.add_argument("--threads", type=int, default=2, help="OpenMP and BLAS threads (2)")
    parser.add_argument("--repeat", type=int, default=5, help="timed repetitions (>= 5)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument(
        "--json",
        dest="json_path",
        default=None,
        help="write results as JSON (e.g. results/bench.json)",
    )


def main(args: argparse.Namespace) -> int:
    if args.repeat < 1 or args.threads < 1:
        raise SystemExit("--repeat and --threads must be >= 1")
    configs = args.configs or (["gpu-ufb"] if args.device == "cuda" else DEFAULT_CPU)
    run(
        configs,
        threads=args.threads,
        repeat=args.repeat,
        device=args.device,
        json_path=args.json_path,
    )
    return 0
