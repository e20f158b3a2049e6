"""Break-even of a sparse-rows gradient exchange against one dense Allreduce, for
UltraFFF(768, 768, 11) gradients (4095 node rows of 768 + 1 + 768 float32 numbers).

Sparse: Allgather each rank's touched-row count and ids, take the sorted union, gather those
rows of every gradient into one contiguous buffer, Allreduce it, scatter back. Dense: one
Allreduce per gradient array (what fastff.distributed.allreduce_grads does). Each rank touches
a random `f` of the rows; the union is what moves.

    OMP_NUM_THREADS=1 mpiexec -n 2 python benchmarks/allreduce_sparse_rows.py
"""

import time

import numpy as np
from mpi4py import MPI

comm = MPI.COMM_WORLD
rank = comm.Get_rank()
N, W = 4095, 768
w_in = np.ones((N, W), np.float32)
b_in = np.ones(N, np.float32)
w_out_t = np.ones((N, W), np.float32)


def dense():
    for g in (w_in, b_in, w_out_t):
        comm.Allreduce(MPI.IN_PLACE, g, op=MPI.SUM)


def sparse(ids):
    counts = comm.allgather(len(ids))
    everyone = np.empty(sum(counts), np.int64)
    comm.Allgatherv(ids, [everyone, counts])
    rows = np.unique(everyone)
    buf = np.empty((len(rows), 2 * W + 1), np.float32)
    np.take(w_in, rows, axis=0, out=buf[:, :W])
    np.take(w_out_t, rows, axis=0, out=buf[:, W : 2 * W])
    buf[:, 2 * W] = b_in[rows]
    comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
    w_in[rows] = buf[:, :W]
    w_out_t[rows] = buf[:, W : 2 * W]
    b_in[rows] = buf[:, 2 * W]
    return len(rows)


def timed(fn, repeat=15):
    times = []
    for _ in range(repeat):
        comm.Barrier()
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return comm.allreduce(float(np.median(times)), MPI.MAX)


t_dense = timed(dense)
if rank == 0:
    print(f"dense Allreduce of 3 gradients: {t_dense * 1e3:.2f} ms")
for f in (0.02, 0.05, 0.1, 0.16, 0.25, 0.35, 0.5, 0.7):
    rng = np.random.default_rng(rank)
    ids = np.sort(rng.choice(N, int(f * N), replace=False)).astype(np.int64)
    union = comm.allreduce(len(np.unique(np.concatenate(comm.allgather(ids)))), MPI.MAX)
    t = timed(lambda ids=ids: sparse(ids))
    if rank == 0:
        print(
            f"touched {f:4.0%} per rank (union {union / N:4.0%}): sparse {t * 1e3:.2f} ms "
            f"= {t / t_dense:.2f} x dense"
        )
