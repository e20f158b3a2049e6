"""`mpiexec -n R python -m fastff bench --distributed`: training and inference steps over MPI.

On UltraFFF(768, 768, depth) float32 (depth 11 by default: UltraFastBERT's 4095 neurons, 24 MiB
of gradients) with a global batch of 4096 rows split evenly over the R ranks, it times per step
(median of --repeat after a warm-up, the slowest rank's):

- data-parallel training: forward_train + backprop on the rank's rows, then
  ``allreduce_grads`` (timed on its own too), then an AdamW step;
- tree-parallel inference and training with ``ShardedUltraFFF`` (top levels replicated,
  subtrees spread over the ranks; with R = 1 the same code, every exchange with itself);

and the bytes each collective moved: per rank and step, what it sent to other ranks through
``Alltoallv`` and ``Allgather``, and the payload it contributed to ``Allreduce`` (what goes on
the wire depends on MPI's algorithm: a ring sends about 2 (R - 1) / R of it per rank). Each
rank uses --threads // R fastff and BLAS threads (at least 1), so that every R uses the same
cores. Run it for R = 1 and R = 2 and compare; see docs/distributed.md for how to read it.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from typing import Any

import numpy as np

BATCH = 4096
WIDTH = 768


def _timed(comm, fn, repeat: int) -> float:
    """Seconds per call of fn() (collective): median over `repeat` after a warm-up, of the
    slowest rank."""
    from mpi4py import MPI

    fn()
    times = []
    for _ in range(repeat):
        comm.Barrier()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return comm.allreduce(statistics.median(times), op=MPI.MAX)


def _data_parallel(comm, x, dy, depth: int, repeat: int) -> tuple[float, float, int]:
    """(train step, allreduce_grads) seconds and gradient bytes, the whole layer per rank."""
    from .distributed import allreduce_grads
    from .layers import UltraFFF
    from .optim import AdamW

    layer = UltraFFF(WIDTH, WIDTH, depth, seed=0)
    opt = AdamW(layer, lr=1e-4)

    def step():
        _, backprop = layer.forward_train(x)
        layer.zero_grad()
        backprop(dy)
        allreduce_grads(layer, comm, op="sum")
        opt.step()

    seconds = _timed(comm, step, repeat)
    reduce = _timed(comm, lambda: allreduce_grads(layer, comm, op="sum"), repeat)
    return seconds, reduce, sum(g.nbytes for g in layer.grads.values())


def run(*, threads: int, repeat: int, depth: int = 11, json_path=None, out=print) -> dict:
    from mpi4py import MPI

    from . import set_num_threads
    from .distributed import ShardedUltraFFF
    from .optim import AdamW

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    per_rank = max(1, threads // size)
    set_num_threads(per_rank)
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(limits=per_rank)
    except ImportError:
        pass
    rows = np.array_split(np.arange(BATCH), size)[rank]
    rng = np.random.default_rng(rank)
    x = rng.standard_normal((len(rows), WIDTH)).astype(np.float32)
    dy = (rng.standard_normal((len(rows), WIDTH)) / BATCH).astype(np.float32)

    dp, allreduce, grad_bytes = _data_parallel(comm, x, dy, depth, repeat)

    # tree parallel: each rank its subtrees
    sharded = ShardedUltraFFF(WIDTH, WIDTH, depth, seed=0, comm=comm)
    sopt = AdamW(sharded, lr=1e-4)

    def tp_step():
        _, backprop = sharded.forward_train(x)
        sharded.zero_grad()
        backprop(dy)
        sopt.step()

    def per_step(fn) -> tuple[float, dict]:
        before = dict(sharded.traffic)
        seconds = _timed(comm, fn, repeat)
        moved = {k: (v - before.get(k, 0)) // (repeat + 1) for k, v in sharded.traffic.items()}
        return seconds, moved

    infer, infer_moved = per_step(lambda: sharded(x))
    train, train_moved = per_step(tp_step)
    result: dict[str, Any] = {
        "ranks": size,
        "threads_per_rank": per_rank,
        "layer": f"UltraFFF({WIDTH}, {WIDTH}, {depth}) float32",
        "global_batch": BATCH,
        "data_parallel": {
            "step_ms": dp * 1e3,
            "allreduce_ms": allreduce * 1e3,
            "allreduce_payload_bytes": grad_bytes if size > 1 else 0,
        },
        "tree_parallel": {
            "top_levels": sharded.top_levels,
            "subtrees_per_rank": comm.allgather(len(sharded.subtrees)),
            "inference_ms": infer * 1e3,
            "inference_bytes": comm.allgather(infer_moved),
            "train_step_ms": train * 1e3,
            "train_step_bytes": comm.allgather(train_moved),
        },
        "machine": {"cpus": os.cpu_count()},
    }
    if rank == 0:
        dpr: dict[str, Any] = result["data_parallel"]
        tpr: dict[str, Any] = result["tree_parallel"]
        out(
            f"{size} rank(s) x {per_rank} thread(s), {result['layer']}, global batch {BATCH} "
            f"({len(rows)} rows on rank 0), median of {repeat}, slowest rank:"
        )
        out(
            f"  data parallel   train step {dpr['step_ms']:8.1f} ms   of which allreduce_grads "
            f"{dpr['allreduce_ms']:.1f} ms; Allreduce payload "
            f"{dpr['allreduce_payload_bytes'] / 2**20:.1f} MiB per rank"
        )
        out(
            f"  tree parallel   inference  {tpr['inference_ms']:8.1f} ms   train step "
            f"{tpr['train_step_ms']:.1f} ms   (top_levels {tpr['top_levels']}, subtrees per "
            f"rank {tpr['subtrees_per_rank']})"
        )
        for what in ("inference", "train_step"):
            for r, moved in enumerate(tpr[what + "_bytes"]):
                text = ", ".join(f"{k} {v / 2**20:.2f} MiB" for k, v in sorted(moved.items()))
                out(f"    {what:10s} rank {r} sent per step: {text}")
        if json_path:
            with open(json_path, "w") as f:
                json.dump(result, f, indent=1)
            out(f"wrote {json_path}")
    return result
