"""fastff past one process, on MPI: data-parallel and tree-parallel (expert-parallel) training.

``import fastff.distributed`` (needs mpi4py and an MPI, ``pip install "fastff[mpi]"``: the
``mpich`` wheel brings ``mpiexec``); a plain ``import fastff`` does not import this package.
Run scripts with ``mpiexec -n R python script.py``.

Data parallel: every rank holds the whole model and trains on its part of every batch::

    from mpi4py import MPI
    import fastff, fastff.distributed as fd
    comm = MPI.COMM_WORLD
    fd.broadcast_parameters(model, comm)        # every rank starts from rank 0's weights
    for xb, tb in batches:                      # each rank: its own part of the global batch
        y, backprop = model.forward_train(xb); model.zero_grad(); backprop(dloss(y, tb))
        fd.allreduce_grads(model, comm)         # mean over the ranks, in place
        opt.step()                              # same update on every rank

With equal local batches and a loss that is a mean over the local rows, ``op="mean"`` gives
every rank the full batch's gradient, so R ranks end with the weights one process would reach
on the whole batches (to rounding: the sums are associated differently). The result is
deterministic for a given rank count: each gradient is one ``MPI_Allreduce`` of fixed size on
every step, whose reduction order MPI fixes per size. Collectives run over every parameter (and
gradient) array in ``named_parameters`` order, on the module's own storage; float16/bfloat16
arrays are reduced in float32 and rounded back, GPU arrays go through host copies. Before moving
any data the ranks compare their parameter names, shapes and dtypes (one small ``allgather``):
a mismatch raises the same ``ValueError`` on every rank instead of hanging.

Tree parallel: a layer too large for one process, split by subtrees::

    layer = fd.ShardedUltraFFF(768, 768, depth=20, seed=0, comm=comm)  # never whole anywhere
    layer = fd.shard(fastff.UltraFFF(768, 768, 11, seed=0), comm)     # or from a whole layer
    y = layer(x_local)                        # collective: every rank, its own rows
    y, backprop = layer.forward_train(x_local); dx = backprop(dy_local)
    opt = fastff.optim.AdamW(layer, lr=1e-3); opt.step()           # each rank its own part
    fd.save_shard(layer, "tree.safetensors")  # tree.rank0-of-2.safetensors, ...
    layer = fd.load_shard("tree.safetensors", comm)

``shard`` / ``ShardedUltraFFF`` / ``ShardedFFF`` keep the top ``top_levels`` levels on every
rank and give each rank a contiguous run of the subtrees below (see their docstrings). Their
outputs are bitwise the whole layer's, and training follows the whole layer's to rounding.
Every call on a sharded layer is collective and starts with one small ``allgather`` in which
the ranks compare the call and report their errors: a bad input on one rank raises on every
rank (the same exception type) rather than leaving the others waiting. A rank must still make
every call (with zero rows if it has none): MPI cannot tell a rank that never calls from a slow
one. ``allreduce_grads`` and ``broadcast_parameters`` leave sharded layers out, so a model
mixing replicated and sharded layers can use both; the sharded layer's gradients are those
of the sum over ranks of each rank's ``sum(y * dy)``, so pass dy of the loss averaged over the
global batch and use ``allreduce_grads(model, comm, op="sum")`` for the replicated layers.
How this carries to many machines: docs/distributed.md.
"""

from __future__ import annotations

import os

import numpy as np

from .. import io as _io
from ..layers import FFF, UltraFFF
from ..module import uninitialised_parameters
from ._base import _Sharded
from ._common import agree, default_comm
from ._data_parallel import allreduce_grads, broadcast_parameters
from ._fff import ShardedFFF, shard_fff
from ._ultra import ShardedUltraFFF, shard_ultra

__all__ = [
    "ShardedFFF",
    "ShardedUltraFFF",
    "allreduce_grads",
    "broadcast_parameters",
    "gather_state_dict",
    "load_shard",
    "save_shard",
    "shard",
    "shard_path",
    "unshard",
]


def shard(layer, comm=None, *, top_levels=None):
    """Split a whole UltraFFF or FFF over the ranks of ``comm`` (default MPI.COMM_WORLD):
    a ShardedUltraFFF or ShardedFFF holding this rank's part (copies; ``layer`` may be
    dropped afterwards). Collective: every rank passes the same layer (same config and
    weights: built with the same seed, or loaded from one file; compared through the config
    and a fingerprint of a few rows of each level).

    ``top_levels``: the levels every rank holds (0 .. depth). Default: the fewest that give
    each rank at least 4 subtrees (capped at the depth), which spreads the rows more evenly
    than one subtree each. With ``parallel_size * 2**top_levels`` subtrees and R ranks, the
    first ``n % R`` ranks own one subtree more; fewer subtrees than ranks is a ValueError on
    every rank. To build a layer larger than one process's memory, use the
    ``ShardedUltraFFF`` / ``ShardedFFF`` constructors instead: they draw each rank's part of
    the weights the whole layer's constructor would draw for the same seed."""
    comm = default_comm(comm)
    error: BaseException | None = None
    kind = type(layer).__name__
    try:
        if not isinstance(layer, (UltraFFF, FFF)):
            raise TypeError(f"shard takes an UltraFFF or an FFF, got {kind}")
        if layer.device != "cpu":
            raise ValueError(f"shard takes a layer on the CPU, got device {layer.device!r}")
    except (TypeError, ValueError) as exc:
        error = exc
    kinds = agree(comm, ("shard",), error, kind)
    if any(k != kinds[0] for k in kinds):
        raise TypeError(f"shard: the ranks passed different kinds of layer: {kinds}")
    if isinstance(layer, UltraFFF):
        return shard_ultra(layer, comm, top_levels)
    return shard_fff(layer, comm, top_levels)


def shard_path(path, rank: int, size: int) -> str:
    """The file of rank ``rank``'s shard: ``path`` with ``{rank}`` and ``{size}`` replaced
    where it names them, else with ``.rank<rank>-of-<size>`` before its extension
    (``tree.safetensors`` -> ``tree.rank0-of-2.safetensors``)."""
    path = os.fspath(path)
    if not isinstance(path, str):
        raise TypeError(f"path must be a str or os.PathLike of str, got {path!r}")
    if "{rank}" in path:
        return path.replace("{rank}", str(rank)).replace("{size}", str(size))
    root, ext = os.path.splitext(path)
    return f"{root}.rank{rank}-of-{size}{ext}"


def _check_sharded(layer) -> None:
    if not isinstance(layer, _Sharded):
        raise TypeError(f"expected a ShardedUltraFFF or ShardedFFF, got {type(layer).__name__}")


def save_shard(layer, path, *, format=None) -> str:
    """Write this rank's shard to its own file (``shard_path(path, rank, size)``) with
    fastff.save: ``.safetensors`` or ``.npz`` by the extension or ``format``, the shard's
    arrays plus its config (the layer's, top_levels, rank, size), nothing pickled. Collective:
    if any rank fails, every rank raises. Returns this rank's file."""
    _check_sharded(layer)
    error: BaseException | None = None
    target = None
    try:
        target = shard_path(path, layer.rank, layer.size)
        _io.save(layer, target, format=format)
    except (OSError, ValueError, TypeError) as exc:
        error = exc
    layer._begin("save_shard", error)
    assert target is not None
    return target


def load_shard(path, comm=None, *, format=None):
    """Read the shard of this rank (``shard_path(path, rank, size)``, as save_shard wrote it)
    with fastff.load, whose checks apply (nothing unpickled; names, shapes and dtypes checked
    before reading), and attach it to ``comm``, whose size must be the saving run's rank
    count. Collective: if any rank's file is missing or does not match the others', every
    rank raises."""
    comm = default_comm(comm)
    error: BaseException | None = None
    layer = None
    try:
        layer = _io.load(shard_path(path, comm.Get_rank(), comm.Get_size()), format=format)
        if not isinstance(layer, _Sharded):
            raise _io.WeightFileError(
                f"{shard_path(path, comm.Get_rank(), comm.Get_size())} holds a "
                f"{type(layer).__name__}, not a shard (fastff.load reads whole layers)"
            )
    except (OSError, ValueError, TypeError, MemoryError) as exc:
        error = exc
    agree(comm, ("load_shard",), error)
    assert layer is not None
    layer.attach(comm)
    return layer


def gather_state_dict(layer, root: int = 0):
    """The whole layer's state dict (the UltraFFF's or FFF's keys and shapes) on rank
    ``root``, None on the others; collective. It needs the whole layer's memory on root."""
    _check_sharded(layer)
    error: BaseException | None = None
    try:
        if isinstance(root, bool) or not isinstance(root, (int, np.integer)):
            raise TypeError(f"root must be an int, got {type(root).__name__}")
        if not 0 <= root < layer.size:
            raise ValueError(f"root must be a rank (0..{layer.size - 1}), got {root}")
    except (TypeError, ValueError) as exc:
        error = exc
    roots = layer._begin("gather_state_dict", error, int(root) if error is None else None)
    if any(r != roots[0] for r in roots):
        raise ValueError(f"gather_state_dict: the ranks gave different roots: {roots}")
    comm, root = layer.comm, int(root)
    p = layer._params
    if isinstance(layer, ShardedUltraFFF):
        config = layer.layer_config
        n = config["parallel_size"] * ((1 << (config["depth"] + 1)) - 1)
        keys = ("w_in", "b_in", "w_out_t")
        full = _gather_rows(comm, {k: p[k] for k in keys}, lambda r: layer.node_ids(r)[1], n, root)
        if full is None:
            return None
        for k in keys:
            full[k][layer.node_ids()[0]] = p["top_" + k]
        return {
            "linear_in.weight": full["w_in"],
            "linear_in.bias": full["b_in"],
            "linear_out.weight": np.ascontiguousarray(full["w_out_t"].T),
        }
    assert isinstance(layer, ShardedFFF)
    depth = layer.depth
    nodes = _gather_rows(
        comm,
        {k: p[k] for k in ("node_w", "node_b")},
        lambda r: layer.node_ids(r)[1],
        (1 << depth) - 1,
        root,
    )
    leaves = _gather_rows(
        comm,
        {k: p[k] for k in ("w1t", "b1", "w2", "b2")},
        lambda r: layer.node_ids(r)[2],
        1 << depth,
        root,
    )
    if nodes is None or leaves is None:
        return None
    for k in ("node_w", "node_b"):
        nodes[k][: layer._n_top] = p["top_" + k]
    return {
        "node_weights": nodes["node_w"],
        "node_biases": nodes["node_b"],
        "w1s": np.ascontiguousarray(leaves["w1t"].transpose(0, 2, 1)),
        "b1s": leaves["b1"],
        "w2s": leaves["w2"],
        "b2s": leaves["b2"],
    }


def _gather_rows(comm, arrays: dict, ids_of, n: int, root: int) -> dict | None:
    """On root, for each array: the whole layer's (n rows), every rank's rows placed at their
    node ids (ids_of(rank)); None on the other ranks. Point-to-point sends of the buffers."""
    rank, size = comm.Get_rank(), comm.Get_size()
    if rank != root:
        for key in sorted(arrays):
            comm.Send(np.ascontiguousarray(arrays[key]), dest=root, tag=17)
        return None
    out: dict = {}
    for key in sorted(arrays):
        mine = arrays[key]
        whole = np.zeros((n,) + mine.shape[1:], dtype=mine.dtype)
        for r in range(size):
            ids = ids_of(r)
            if r == rank:
                rows = np.ascontiguousarray(mine)
            else:
                rows = np.empty((len(ids),) + mine.shape[1:], dtype=mine.dtype)
                comm.Recv(rows, source=r, tag=17)
            whole[ids] = rows
        out[key] = whole
    return out


def unshard(layer, root: int = 0):
    """The whole UltraFFF or FFF on rank ``root`` (None on the others); collective. For
    checks and for saving a trained layer whole, where it fits in one process."""
    state = gather_state_dict(layer, root)
    if state is None:
        return None
    kind = UltraFFF if isinstance(layer, ShardedUltraFFF) else FFF
    with uninitialised_parameters():
        whole = kind(**layer.layer_config)
    whole.load_state_dict(state)
    if isinstance(layer, ShardedFFF) and isinstance(whole, FFF):
        whole._train_rng.bit_generator.state = layer._train_rng.bit_generator.state
    return whole
