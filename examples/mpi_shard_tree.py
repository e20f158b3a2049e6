"""A neuron tree too large for one process, split over MPI ranks (tree parallelism).

    mpiexec -n 2 python examples/mpi_shard_tree.py                 # depth 18 (3.2 GB), 768 wide
    mpiexec -n 2 python examples/mpi_shard_tree.py --depth 20 --train-steps 0   # 12.9 GB
    mpiexec -n 2 python examples/mpi_shard_tree.py --quick          # CI-sized, checked
    mpiexec -n 1 python examples/mpi_shard_tree.py --depth 16       # one process, to compare

Each rank builds only its part of ``UltraFFF(width, width, depth, seed=0)`` with
``fastff.distributed.ShardedUltraFFF`` (the top levels, replicated, and its own subtrees, drawn
exactly as the whole layer's constructor would draw them), so the whole tree never exists in
one process. Then every rank scores its own rows (``--batch`` rows in all, split over the
ranks) through the sharded layer, ``--repeat`` times, and takes ``--train-steps`` steps of SGD
on a regression target. Rank 0 prints each rank's build time, the median time per call, the
bytes each rank sent and its peak resident memory; ``--json`` writes them. ``--check`` (and
``--quick``) also builds the whole layer on every rank and compares: the sharded outputs must
be bitwise the whole layer's. One fastff thread per rank unless OMP_NUM_THREADS says more.
"""

import argparse
import json
import os
import resource
import statistics
import sys
import time

import numpy as np
from mpi4py import MPI

os.environ.setdefault("OMP_NUM_THREADS", "1")

import fastff  # noqa: E402 - after the thread default
import fastff.distributed as fd  # noqa: E402
from fastff.optim import SGD  # noqa: E402


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--depth", type=int, default=18)
    parser.add_argument("--width", type=int, default=768, help="input and output width")
    parser.add_argument("--top-levels", type=int, default=None)
    parser.add_argument("--batch", type=int, default=4096, help="rows over all ranks")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--train-steps", type=int, default=2)
    parser.add_argument("--check", action="store_true", help="compare with the whole layer")
    parser.add_argument("--quick", action="store_true", help="depth 10, width 64, checked")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.depth, args.width, args.batch, args.check = 10, 64, 512, True
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    width, depth = args.width, args.depth
    whole_bytes = (2 ** (depth + 1) - 1) * (2 * width + 1) * 4

    comm.Barrier()
    t0 = time.perf_counter()
    layer = fd.ShardedUltraFFF(width, width, depth, seed=0, comm=comm, top_levels=args.top_levels)
    build = time.perf_counter() - t0
    rows = np.array_split(np.arange(args.batch), size)[rank]
    x = np.random.default_rng(rank).standard_normal((len(rows), width)).astype(np.float32)

    times = []
    for _ in range(args.repeat + 1):  # the first call warms up
        comm.Barrier()
        t0 = time.perf_counter()
        y = layer(x)
        times.append(time.perf_counter() - t0)
    per_call = statistics.median(times[1:] or times)
    sent = dict(layer.traffic)

    losses = []
    if args.train_steps:
        opt = SGD(layer, lr=0.05)
        target = np.zeros_like(x)  # shrink the outputs: a loss that must go down
        n_total = comm.allreduce(len(x))
        for _ in range(args.train_steps):
            out, backprop = layer.forward_train(x)
            layer.zero_grad()
            backprop((out - target) / n_total)  # the mean over the global batch of |y|^2 / 2
            opt.step()
            losses.append(
                comm.allreduce(float(0.5 * np.sum(out.astype(np.float64) ** 2))) / n_total
            )

    same = None
    if args.check:
        whole = fastff.UltraFFF(width, width, depth, seed=0)
        same = bool(np.array_equal(y, whole(x)))
        same = all(comm.allgather(same))

    report = {
        "ranks": size,
        "depth": depth,
        "width": width,
        "top_levels": layer.top_levels,
        "whole_layer_gb": whole_bytes / 1e9,
        "batch": args.batch,
        "per_rank": comm.gather(
            {
                "rank": rank,
                "subtrees": [layer.subtrees.start, layer.subtrees.stop],
                "rows": len(x),
                "build_s": build,
                "call_ms": per_call * 1e3,
                "sent_bytes_per_call": {k: v // (args.repeat + 1) for k, v in sent.items()},
                "peak_rss_gb": peak_rss_bytes() / 1e9,
            }
        ),
        "call_ms": comm.allreduce(per_call, MPI.MAX) * 1e3,
        "train_losses": losses,
        "bitwise_equal_to_whole": same,
    }
    if rank == 0:
        print(
            f"UltraFFF({width}, {width}, depth={depth}) float32, {whole_bytes / 1e9:.1f} GB whole, "
            f"on {size} ranks (top_levels {layer.top_levels}); {args.batch} rows per call: "
            f"{report['call_ms']:.1f} ms (slowest rank, median of {args.repeat})"
        )
        for r in report["per_rank"]:
            print(
                f"  rank {r['rank']}: subtrees {r['subtrees'][0]}..{r['subtrees'][1] - 1}, "
                f"{r['rows']} rows, built in {r['build_s']:.1f} s, {r['call_ms']:.1f} ms per "
                f"call, sent {r['sent_bytes_per_call']} bytes per call, peak RSS "
                f"{r['peak_rss_gb']:.2f} GB"
            )
        if losses:
            print("  SGD steps, loss: " + " ".join(f"{v:.4g}" for v in losses))
        if same is not None:
            print(f"  bitwise equal to the whole layer: {same}")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(report, f, indent=1)
    return 0 if same in (None, True) else 1


if __name__ == "__main__":
    sys.exit(main())
