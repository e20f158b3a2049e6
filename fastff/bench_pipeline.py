"""The `pipeline` bench group: fastff's kernels inside real pipelines, 1 thread against all.

A kernel that wins alone and loses beside NumPy has not won. Each case runs in two fresh
processes, one with 1 thread and one with all threads (OpenMP, BLAS and fastff set alike through
OMP_NUM_THREADS / OPENBLAS_NUM_THREADS / fastff.set_num_threads), and reports both times and
their ratio (all threads / 1 thread: below 1 is a gain). ../shared/BENCHMARKS.md, "Inside a
pipeline":

- pipe-fff-soft: a soft FFF training step (784 -> 10, depth 5, leaf 16, batch 256; softmax
  cross-entropy, AdamW): NumPy GEMMs and fastff's OpenMP kernels alternate;
- pipe-mlp: a training step of Sequential(Linear(768, 768), GELU(), UltraFFF(768, 768, 11),
  Linear(768, 768)) + AdamW, batch 1024, and the sum of its parts timed alone;
- pipe-ufb-loaded: ufb inference while a busy competitor process runs on the machine;
- pipe-threads: ufb inference from 4 Python threads at once over one layer (time per round of
  4 calls).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import numpy as np

from ._timing import median_min_max

PIPELINE = ["pipe-fff-soft", "pipe-mlp", "pipe-ufb-loaded", "pipe-threads"]


def _fff_soft_step(rng):
    import fastff
    from fastff import nn, optim

    layer = fastff.FFF(784, 16, 10, depth=5, seed=0)
    x = rng.standard_normal((256, 784)).astype(np.float32)
    labels = rng.integers(0, 10, 256)
    opt = optim.AdamW(layer, lr=1e-3)

    def step():
        opt.zero_grad()
        y, backprop = layer.forward_train(x, hardening=1.0)
        _, dy = nn.softmax_cross_entropy(y, labels)
        backprop(dy)
        opt.step()

    return {"step": step}


def _mlp_step(rng):
    import fastff
    from fastff import nn, optim

    parts: list = [
        nn.Linear(768, 768, seed=1),
        nn.GELU(),
        fastff.UltraFFF(768, 768, 11, seed=2),
        nn.Linear(768, 768, seed=3),
    ]
    model = nn.Sequential(*parts)
    x = rng.standard_normal((1024, 768)).astype(np.float32)
    target = rng.standard_normal((1024, 768)).astype(np.float32)
    opt = optim.AdamW(model, lr=1e-4)

    def step():
        opt.zero_grad()
        y, backprop = model.forward_train(x)
        _, dy = nn.mse(y, target)
        backprop(dy)
        opt.step()

    # each part alone: its forward_train + backprop on the activations it sees in the step
    inputs = [x]
    for part in parts[:-1]:
        inputs.append(part(inputs[-1]))
    dy = np.ones((1024, 768), np.float32) / 1024

    def part_step(part, h):
        def run():
            _, backprop = part.forward_train(h)
            backprop(dy)

        return run

    alone = {
        f"{type(p).__name__}#{i}": part_step(p, h) for i, (p, h) in enumerate(zip(parts, inputs))
    }
    y = model(x)  # the step's other parts: its loss and the gradients' zeroing
    alone["mse"] = lambda: nn.mse(y, target)
    alone["zero_grad"] = opt.zero_grad
    alone["AdamW.step"] = opt.step
    return {"step": step, "alone": alone}


def _ufb(rng):
    import fastff

    layer = fastff.UltraFFF(768, 768, 11, seed=0)
    x = rng.standard_normal((4096, 768)).astype(np.float32)
    return layer, x


def _competitor() -> subprocess.Popen:
    """A busy process (one core's worth of pure Python), ended by the caller through its pid."""
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def child(case: str, threads: int, repeat: int) -> dict:
    """Time `case` in this process with `threads` threads (fastff and BLAS)."""
    import fastff

    fastff.set_num_threads(threads)
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(threads, user_api="blas")
    except ImportError:  # OPENBLAS_NUM_THREADS, set by the parent, holds
        pass
    rng = np.random.default_rng(0)
    result: dict = {"case": case, "threads": threads}
    if case == "pipe-fff-soft":
        fns = _fff_soft_step(rng)
        result["s"] = median_min_max(fns["step"], repeat)
    elif case == "pipe-mlp":
        fns = _mlp_step(rng)
        result["s"] = median_min_max(fns["step"], repeat)
        alone = {name: median_min_max(fn, repeat)[0] for name, fn in fns["alone"].items()}
        result["parts_alone_s"] = alone
        result["sum_alone_s"] = sum(alone.values())
    elif case == "pipe-ufb-loaded":
        layer, x = _ufb(rng)
        busy = _competitor()
        try:
            time.sleep(0.5)  # let it take its core
            result["s"] = median_min_max(lambda: layer(x), repeat)
        finally:
            busy.kill()
            busy.wait()
    elif case == "pipe-threads":
        layer, x = _ufb(rng)
        barrier = threading.Barrier(5)
        done = threading.Barrier(5)
        stop = False

        def worker():
            while True:
                barrier.wait()
                if stop:
                    return
                layer(x)
                done.wait()

        workers = [threading.Thread(target=worker, daemon=True) for _ in range(4)]
        for w in workers:
            w.start()

        def round_of_four():
            barrier.wait()
            done.wait()

        result["s"] = median_min_max(round_of_four, repeat)
        stop = True
        barrier.wait()
        for w in workers:
            w.join()
    else:
        raise SystemExit(f"unknown pipeline case {case!r}; choose from {PIPELINE}")
    return result


def _spawn(case: str, threads: int, repeat: int) -> dict:
    env = dict(os.environ)
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[name] = str(threads)
    code = (
        "import json, sys; from fastff.bench_pipeline import child; "
        f"print('RESULT', json.dumps(child({case!r}, {threads}, {repeat})))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=1800
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{case} with {threads} threads failed:\n{proc.stderr[-2000:]}")
    line = next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


def run(cases: list[str], *, threads: int, repeat: int, out=print) -> list[dict]:
    """Each case with 1 and with `threads` threads, each in a fresh process."""
    out(
        f"fastff pipeline bench, {os.cpu_count()} cpus: 1 thread vs {threads} "
        f"(fresh processes, median of {repeat}; ratio = {threads} threads / 1 thread)"
    )
    out(f"{'case':<18}{'1 thread ms':>13}{f'{threads} threads ms':>16}{'ratio':>8}   notes")
    results = []
    for case in cases:
        one = _spawn(case, 1, repeat)
        many = _spawn(case, threads, repeat) if threads > 1 else one
        ratio = many["s"][0] / one["s"][0]
        notes = ""
        row = {
            "config": case,
            "threads": threads,
            "one_thread_s": one["s"][0],
            "one_thread_min_max_s": one["s"][1:],
            "all_threads_s": many["s"][0],
            "all_threads_min_max_s": many["s"][1:],
            "ratio": ratio,
        }
        if "sum_alone_s" in many:
            row["sum_alone_s"] = {"1": one["sum_alone_s"], str(threads): many["sum_alone_s"]}
            row["parts_alone_s"] = {"1": one["parts_alone_s"], str(threads): many["parts_alone_s"]}
            over = many["s"][0] / many["sum_alone_s"]
            row["step_over_sum_alone"] = over
            notes = (
                f"sum of parts alone {many['sum_alone_s'] * 1e3:.1f} ms ({threads} thr): "
                f"step / sum = {over:.2f}"
            )
        out(
            f"{case:<18}{one['s'][0] * 1e3:>13.2f}{many['s'][0] * 1e3:>16.2f}"
            f"{ratio:>7.2f}x   {notes}"
        )
        results.append(row)
    return results
