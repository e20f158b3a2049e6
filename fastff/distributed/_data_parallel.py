"""Data-parallel training on MPI: ``broadcast_parameters`` and ``allreduce_grads`` (see the
package's docstring)."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..module import Module
from ._base import _Sharded

__all__ = ["allreduce_grads", "broadcast_parameters"]

_MPI_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))


def _comm(comm):
    if comm is None:
        from mpi4py import MPI

        return MPI.COMM_WORLD
    return comm


def _arrays(module: Module, which: str):
    """(name, array) of the module's storage, contiguous, each array once, in the order of
    named_parameters (anchor names; transposed anchors share their internal array). Sharded
    layers are left out: their subtrees differ by rank, and their backprop has already summed
    their replicated top levels' gradients over the ranks."""
    for prefix, m in module._prefixed_modules():
        if not m._params or isinstance(m, _Sharded):
            continue
        store = m._params if which == "params" else m._allocate_grads()
        seen: set[str] = set()
        for key, (internal, _) in m._anchor.items():
            if internal not in seen:
                seen.add(internal)
                yield prefix + key, store[internal]


def _check_same_layout(module: Module, comm, what: str) -> None:
    """Raise the same ValueError on every rank if the ranks' parameters differ in name, shape
    or dtype (one small allgather; every rank takes part, so none is left waiting)."""
    mine = [(n, tuple(a.shape), str(a.dtype)) for n, a in _arrays(module, "params")]
    layouts = comm.allgather(mine)
    for rank, theirs in enumerate(layouts):
        if theirs != layouts[0]:
            diff = next(
                (f"{a} vs {b}" for a, b in zip(layouts[0], theirs) if a != b),
                f"{len(layouts[0])} arrays vs {len(theirs)}",
            )
            raise ValueError(
                f"{what}: the ranks' {type(module).__name__} parameters differ (rank 0 vs "
                f"rank {rank}: {diff}); build the same model config on every rank"
            )


def _check_module(module) -> None:
    if not isinstance(module, Module):
        raise TypeError(f"module must be a fastff Module, got {type(module).__name__}")


def _host(arr) -> tuple[Any, bool]:
    """(NumPy array MPI can use in place, whether it is a copy to write back)."""
    if isinstance(arr, np.ndarray) and arr.dtype in _MPI_FLOATS and arr.flags.c_contiguous:
        return arr, False
    host = arr.get() if hasattr(arr, "get") and not isinstance(arr, np.ndarray) else arr
    host = np.ascontiguousarray(host)
    if host.dtype not in _MPI_FLOATS:
        host = host.astype(np.float32)
    return host, True


def _write_back(arr, host) -> None:
    if isinstance(arr, np.ndarray):
        arr[...] = host.astype(arr.dtype, copy=False)
    else:  # CuPy
        import cupy

        arr[...] = cupy.asarray(host).astype(arr.dtype, copy=False)


def broadcast_parameters(module: Module, comm=None, root: int = 0) -> None:
    """Copy rank ``root``'s parameters into ``module`` on every rank (``comm.Bcast`` of each
    parameter array in ``named_parameters`` order, into the existing arrays). ``comm``: an
    mpi4py communicator, default ``MPI.COMM_WORLD``. Pending backprops go stale, as after
    ``load_state_dict``."""
    _check_module(module)
    comm = _comm(comm)
    if not 0 <= root < comm.Get_size():
        raise ValueError(f"root must be a rank of comm (0..{comm.Get_size() - 1}), got {root}")
    _check_same_layout(module, comm, "broadcast_parameters")
    for _, arr in _arrays(module, "params"):
        if isinstance(arr, np.ndarray) and arr.flags.c_contiguous:
            comm.Bcast(arr.reshape(-1).view(np.uint8), root=root)  # bytes: any float dtype
        else:
            host = np.ascontiguousarray(arr.get() if hasattr(arr, "get") else arr)
            comm.Bcast(host.reshape(-1).view(np.uint8), root=root)
            _write_back(arr, host)
    module.mark_updated()


def allreduce_grads(module: Module, comm=None, op: str = "mean") -> None:
    """Sum (``op="sum"``) or average (``op="mean"``, the sum divided by the rank count) every
    accumulated gradient of ``module`` over the ranks of ``comm``, in place: one dense
    ``MPI_Allreduce`` per gradient array. Call it on every rank after backprop and before the
    optimizer step. Deterministic for a given rank count. ``comm`` default: MPI.COMM_WORLD."""
    _check_module(module)
    if op not in ("mean", "sum"):
        raise ValueError(f'op must be "mean" or "sum", got {op!r}')
    comm = _comm(comm)
    from mpi4py import MPI

    _check_same_layout(module, comm, "allreduce_grads")
    size = comm.Get_size()
    for _, arr in _arrays(module, "grads"):
        host, copied = _host(arr)
        if size > 1:
            comm.Allreduce(MPI.IN_PLACE, host, op=MPI.SUM)
        if op == "mean" and size > 1:
            host /= size
        if copied:
            _write_back(arr, host)
