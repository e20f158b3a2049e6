"""Data-parallel training of `python -m fastff train`'s `ultra` model on Fashion-MNIST over MPI.

    mpiexec -n 2 python examples/mpi_train_fashion_mnist.py            # 20 epochs
    mpiexec -n 2 python examples/mpi_train_fashion_mnist.py --quick    # CI-sized run
    mpiexec -n 2 python examples/mpi_train_fashion_mnist.py --json out.json

The model and recipe are `fastff train --model ultra`'s: UltraFFF(784 -> 10, depth 6, 4 trees,
gelu), Adam at 1e-3 with a cosine schedule, global batches of 128. Every rank draws the same
shuffled batches and trains on its slice of each (64 rows on 2 ranks); after each backprop
``fastff.distributed.allreduce_grads`` averages the gradients, so every rank takes the step
one process would take on the whole batch (to rounding). Rank 0 reports the loss, the
validation accuracy per epoch and the test accuracy at the end. Data: Debian's
/usr/share/datasets/fashion-mnist, $FASTFF_DATA/fashion-mnist or --data; without it the
example says so and exits 0. Threads: one fastff thread per rank unless OMP_NUM_THREADS says
otherwise (ranks on a 2-core machine should not each start 2).
"""

import argparse
import json
import os
import sys
import time

import numpy as np
from mpi4py import MPI

os.environ.setdefault("OMP_NUM_THREADS", "1")

import fastff  # noqa: E402 - after the thread default
import fastff.distributed as fd  # noqa: E402
from fastff import nn  # noqa: E402
from fastff.train import DEFAULTS, build_model, build_optimizer, prepare_data  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="2 epochs on 6,000 images (CI)")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--data", default=None, help="folder of the four IDX files")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="rank 0 writes the results here")
    args = parser.parse_args(argv)
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    options = dict(DEFAULTS["ultra"], model="ultra", seed=args.seed, data=args.data)
    options["val_size"] = 5000
    if args.quick:
        options["epochs"] = 2
    if args.epochs is not None:
        options["epochs"] = args.epochs
    dtype = np.dtype(np.float32)
    try:
        (x_train, y_train), (x_val, y_val), (x_test, y_test), _ = prepare_data(options, dtype)
    except (OSError, ValueError) as exc:  # FileNotFoundError, DatasetError
        if rank == 0:
            print(f"skipped: no Fashion-MNIST ({exc})")
        return 0
    if args.quick:
        x_train, y_train = x_train[:6000], y_train[:6000]
    batch = options["batch_size"]
    if batch % size:
        raise SystemExit(f"the global batch ({batch}) must split evenly over {size} ranks")
    local = batch // size
    model, _, _, _ = build_model(options, dtype)
    fd.broadcast_parameters(model, comm)  # the same start everywhere (seeded alike anyway)
    steps = len(x_train) // batch  # whole global batches only: every rank the same count
    opt, sched = build_optimizer(model, options, steps)
    rng = np.random.default_rng(args.seed)  # the same order on every rank
    history, start = [], time.perf_counter()
    for epoch in range(1, options["epochs"] + 1):
        order = rng.permutation(len(x_train))
        loss_sum = 0.0
        for step in range(steps):
            rows = order[step * batch + rank * local : step * batch + (rank + 1) * local]
            opt.zero_grad()
            logits, backprop = model.forward_train(x_train[rows], input_grad=False)
            loss, dlogits = nn.softmax_cross_entropy(logits, y_train[rows])
            backprop(dlogits)  # the mean over this rank's rows ...
            fd.allreduce_grads(model, comm, op="mean")  # ... averaged: the global batch's
            opt.step()
            sched.step()
            loss_sum += comm.allreduce(loss) / size
        val = float((model(x_val).argmax(axis=1) == y_val).mean())
        history.append({"epoch": epoch, "train_loss": loss_sum / steps, "val_accuracy": val})
        if rank == 0:
            print(
                f"epoch {epoch}/{options['epochs']}  loss {loss_sum / steps:.4f}  "
                f"val acc {val:.4f}  ({time.perf_counter() - start:.1f} s)",
                flush=True,
            )
    test = float((model(x_test).argmax(axis=1) == y_test).mean())
    # every rank holds the same weights
    digest = fastff.distributed._common.fingerprint(*model.state_dict().values())
    same = len(set(comm.allgather(digest))) == 1
    if rank == 0:
        print(f"test accuracy {test:.4f} on {size} ranks; identical weights on every rank: {same}")
        if args.json:
            result = {"ranks": size, "history": history, "test_accuracy": test, "same": same}
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
