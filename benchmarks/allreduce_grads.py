"""Time fastff.distributed.allreduce_grads on UltraFFF(768, 768, 11) gradients (24 MiB float32)
against one raw MPI Allreduce of a flat buffer of the same size.

    OMP_NUM_THREADS=1 mpiexec -n 2 python benchmarks/allreduce_grads.py
"""

import time

import numpy as np
from mpi4py import MPI

import fastff
import fastff.distributed as fd


def median_time(fn, repeat=20):
    times = []
    for _ in range(repeat):
        comm.Barrier()
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return comm.allreduce(float(np.median(times)), MPI.MAX)


comm = MPI.COMM_WORLD
layer = fastff.UltraFFF(768, 768, 11, seed=0)
for g in layer.grads.values():
    g[...] = 1.0
nbytes = sum(g.nbytes for g in layer.grads.values())
for _ in range(3):
    fd.allreduce_grads(layer, comm)
ours = median_time(lambda: fd.allreduce_grads(layer, comm))
buf = np.ones(nbytes // 4, np.float32)
raw = median_time(lambda: comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM))
if comm.Get_rank() == 0:
    print(
        f"{comm.Get_size()} ranks, {nbytes / 2**20:.1f} MiB of gradients: allreduce_grads "
        f"{ours * 1e3:.1f} ms ({nbytes / ours / 1e9:.2f} GB/s), raw flat Allreduce "
        f"{raw * 1e3:.1f} ms"
    )
