"""What the tree-parallel layers share: the plan of which rank owns which subtrees, the
collectives every call starts with (so that a bad input on one rank raises on all of them
instead of leaving the others waiting), the row exchange, and the initialisation stream that
lets a rank draw its own part of a layer's weights without drawing the rest."""

from __future__ import annotations

import builtins
import hashlib
from collections.abc import Iterator
from typing import Any

import numpy as np

from .._validation import check_int

_SPLIT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def default_comm(comm):
    if comm is None:
        from mpi4py import MPI

        return MPI.COMM_WORLD
    for method in ("Get_rank", "Get_size", "Alltoallv", "allgather"):
        if not hasattr(comm, method):
            raise TypeError(f"comm must be an mpi4py communicator, got {type(comm).__name__}")
    return comm


# ---- the plan: top levels on every rank, contiguous runs of subtrees per rank ----------------
class Plan:
    """Which subtrees each rank owns.

    A layer of ``n_trees`` trees (UltraFFF's parallel_size; 1 for FFF) keeps the top
    ``top_levels`` levels of every tree on every rank. Below them each tree has 2**top_levels
    subtrees, numbered ``t * 2**top_levels + j`` (j: the subtree's root among its level's nodes,
    left to right); rank r owns the contiguous run ``bounds[r]:bounds[r + 1]``, the first
    ``n_subtrees % size`` ranks one subtree more than the others."""

    def __init__(self, n_trees: int, depth: int, top_levels: int, size: int, rank: int):
        self.n_trees, self.depth, self.top_levels = n_trees, depth, top_levels
        self.size, self.rank = size, rank
        self.per_tree = 1 << top_levels
        self.n_subtrees = n_trees * self.per_tree
        base, extra = divmod(self.n_subtrees, size)
        counts = np.full(size, base, dtype=np.int64)
        counts[:extra] += 1
        self.bounds = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.first, self.stop = int(self.bounds[rank]), int(self.bounds[rank + 1])
        self.n_local = self.stop - self.first

    def of(self, rank: int) -> Plan:
        """The plan as rank `rank` sees it."""
        return Plan(self.n_trees, self.depth, self.top_levels, self.size, rank)

    def owner(self, subtree: np.ndarray) -> np.ndarray:
        """The rank owning each global subtree id."""
        return (np.searchsorted(self.bounds, subtree, side="right") - 1).astype(np.intp)

    def runs(self, first: int | None = None, stop: int | None = None) -> Iterator[tuple]:
        """(tree, j0, j1, local0) for the subtrees first..stop (default: this rank's), one run
        per tree: subtrees j0..j1 of tree `tree`, stored from local subtree local0 on."""
        first = self.first if first is None else first
        stop = self.stop if stop is None else stop
        s = first
        while s < stop:
            t = s // self.per_tree
            end = min(stop, (t + 1) * self.per_tree)
            yield t, s - t * self.per_tree, end - t * self.per_tree, s - first
            s = end


def choose_top_levels(top_levels, n_trees: int, depth: int, size: int, what: str) -> int:
    """The number of replicated levels: as given (0..depth), or by default the fewest that give
    every rank at least 4 subtrees (an even spread of the rows), at most depth. Raises the
    same ValueError on every rank when there are fewer subtrees than ranks."""
    if top_levels is None:
        top_levels = 0
        while top_levels < depth and n_trees << top_levels < 4 * size:
            top_levels += 1
    else:
        top_levels = check_int(top_levels, "top_levels", 0)
        if top_levels > depth:
            raise ValueError(
                f"top_levels must be at most the depth ({depth}) of {what}, got {top_levels}"
            )
    n_subtrees = n_trees << top_levels
    if n_subtrees < size:
        deepest = n_trees << depth
        hint = (
            f"raise top_levels (at depth {depth} there are at most {deepest} subtrees)"
            if deepest >= size
            else f"{what} has at most {deepest} subtrees: use at most {deepest} ranks"
        )
        raise ValueError(
            f"{what} with top_levels={top_levels} has {n_subtrees} subtrees below its top "
            f"levels, fewer than the {size} ranks, and every rank must own at least one: {hint}"
        )
    return top_levels


def blocks(n_per_tree: int, top_levels: int, levels: int, plan: Plan):
    """(global row, local subtree, count, level) of every contiguous block of this rank's
    subtree nodes: in a tree stored in heap order, the nodes of subtrees j0..j1 at `level`
    below their roots are the rows ``g0 .. g0 + (j1 - j0) * 2**level`` (subtree by subtree),
    while a rank stores each subtree in its own heap order. `levels` is the number of levels a
    subtree has (UltraFFF: depth - top_levels + 1; FFF routers: depth - top_levels)."""
    for t, j0, j1, local0 in plan.runs():
        for level in range(levels):
            width = 1 << level
            g0 = t * n_per_tree + (1 << (top_levels + level)) - 1 + j0 * width
            yield g0, local0, j1 - j0, level


def subtree_rows(local: np.ndarray, n_sub: int, local0: int, count: int, level: int):
    """The (count, 2**level, ...) view of `local` (m * n_sub rows, each subtree in heap
    order) holding level `level` of subtrees local0..local0 + count."""
    shaped = local.reshape((-1, n_sub) + local.shape[1:])
    width = 1 << level
    return shaped[local0 : local0 + count, width - 1 : 2 * width - 1]


# ---- every call starts with one small allgather -------------------------------------------
def agree(comm, tag: tuple, error: BaseException | None, extra: Any = None) -> list:
    """Every rank's `extra`, after checking that none failed and that every rank makes the same
    call (`tag`). If one failed, every rank raises: the failing rank its own exception, the
    others the same type (RuntimeError for types that are not builtin) naming that rank, so
    that no rank is left waiting in a collective the failed one never reaches."""
    message = None if error is None else (type(error).__name__, str(error))
    everyone = comm.allgather((tag, message, extra))
    # a failed argument check first: it also explains a tag that differs because of it
    for rank, (_, failed, _) in enumerate(everyone):
        if failed is None:
            continue
        if error is not None:
            raise error
        kind, text = failed
        cls = getattr(builtins, kind, None)
        if not (isinstance(cls, type) and issubclass(cls, Exception)):
            cls = RuntimeError
        raise cls(f"rank {rank} failed: {kind}: {text}")
    tags = [t for t, _, _ in everyone]
    if any(t != tags[0] for t in tags):
        raise RuntimeError(
            "the ranks made different calls on a sharded layer ("
            + "; ".join(f"rank {r}: {t}" for r, t in enumerate(tags))
            + "): every rank must make the same calls, in the same order, with its own rows "
            "(zero rows are fine)"
        )
    return [e for _, _, e in everyone]


def same_everywhere(everyone: list, what: str) -> None:
    """Raise on every rank if the ranks' descriptions (dicts: "config" -> the layer config,
    other labels -> values, fingerprints under labels ending in "weights" or "stream") differ;
    the message names what differs between rank 0 and the first rank that differs."""
    first = everyone[0]
    for rank, mine in enumerate(everyone):
        if mine == first:
            continue
        diffs = []
        for label in first:
            a, b = first[label], mine.get(label)
            if a == b:
                continue
            if label == "config":
                diffs += [
                    f"{key} {a.get(key)!r} vs {b.get(key)!r}" for key in a if a[key] != b.get(key)
                ]
            elif label.endswith(("weights", "stream")):
                diffs.append(f"their {label} differ")
            else:
                diffs.append(f"{label} {a!r} vs {b!r}")
        raise ValueError(
            f"{what}: the ranks were given different layers (rank 0 vs rank {rank}: "
            f"{'; '.join(diffs)}); every rank must give the same layer (the same config and "
            "seed, or one loaded from the same file)"
        )


def fingerprint(*arrays) -> str:
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(str((a.dtype.str, a.shape)).encode())
        h.update(a.tobytes())
    return h.hexdigest()


# ---- row exchange -----------------------------------------------------------------------------
_RECORD_TYPES: dict = {}


def _record_type(itemsize: int):
    from mpi4py import MPI

    dt = _RECORD_TYPES.get(itemsize)
    if dt is None:
        dt = MPI.BYTE.Create_contiguous(itemsize).Commit()
        _RECORD_TYPES[itemsize] = dt
    return dt


def send_order(dest: np.ndarray, *keys: np.ndarray) -> np.ndarray:
    """The order in which rows go out: by destination, then by `keys` (the first most
    significant), then by row; a stable sort."""
    return np.lexsort(tuple(reversed(keys)) + (dest,)) if keys else np.argsort(dest, kind="stable")


def sources(counts: np.ndarray) -> np.ndarray:
    """The source rank of each received row (they come by source rank)."""
    return np.repeat(np.arange(len(counts)), counts).astype(np.intp)


MAX_ROWS = 2**31 - 1  # MPI counts are C ints


def exchange(comm, dest: np.ndarray, arrays, order=None, traffic: dict | None = None):
    """Send row i of each array in `arrays` to rank dest[i]: one Allgather of the counts, then
    one Alltoallv per array, rows as whole units. The rows go out in `order` (default
    ``send_order(dest)``; it must list them by destination; None where they already are);
    every rank receives its rows by source rank, each source's in the order it sent them.
    Returns (order, received counts by source, received arrays)."""
    size = comm.Get_size()
    dest = np.asarray(dest, dtype=np.intp)
    if order is None and len(dest) and np.any(dest[1:] < dest[:-1]):
        order = np.argsort(dest, kind="stable")
    send_counts = np.bincount(dest, minlength=size).astype(np.int64)
    # every rank's counts to every rank: the size check below then reads the same matrix on
    # every rank, and all ranks raise or none does (a lone rank raising would leave the others
    # waiting in Alltoallv)
    counts = np.empty((size, size), dtype=np.int64)
    comm.Allgather(send_counts, counts)
    recv_counts = np.ascontiguousarray(counts[:, comm.Get_rank()])
    if size and max(int(counts.sum(axis=0).max()), int(counts.sum(axis=1).max())) > MAX_ROWS:
        raise OverflowError(f"more than {MAX_ROWS} rows in one exchange: split the batch")
    send_displ = np.concatenate([[0], np.cumsum(send_counts)[:-1]])
    recv_displ = np.concatenate([[0], np.cumsum(recv_counts)[:-1]])
    out = []
    mine = int(send_counts[comm.Get_rank()])
    for arr in arrays:
        send = np.ascontiguousarray(arr if order is None else np.take(arr, order, axis=0))
        row_bytes = int(np.prod(send.shape[1:], dtype=np.int64)) * send.dtype.itemsize
        received = np.empty((int(recv_counts.sum()),) + send.shape[1:], dtype=send.dtype)
        if row_bytes:
            dt = _record_type(row_bytes)
            comm.Alltoallv(
                [send.reshape(-1).view(np.uint8), (send_counts.tolist(), send_displ.tolist()), dt],
                [
                    received.reshape(-1).view(np.uint8),
                    (recv_counts.tolist(), recv_displ.tolist()),
                    dt,
                ],
            )
        if traffic is not None:
            moved = (len(send) - mine) * row_bytes
            traffic["alltoallv"] = traffic.get("alltoallv", 0) + moved
        out.append(received)
    return order, recv_counts, out


def _check_count(n: int) -> int:
    if n > 2**31 - 1:
        raise OverflowError("more than 2**31 - 1 numbers in one collective: split the batch")
    return int(n)


def allgather_rows(comm, rows: np.ndarray, counts, traffic: dict | None = None) -> np.ndarray:
    """Every rank's rows (counts[r] of them from rank r), stacked in rank order."""
    width = int(np.prod(rows.shape[1:], dtype=np.int64))
    out = np.empty((int(sum(counts)),) + rows.shape[1:], dtype=rows.dtype)
    sizes = [_check_count(c * width) for c in counts]
    displ = np.concatenate([[0], np.cumsum(sizes)[:-1]]).tolist()
    _check_count(sum(sizes))
    comm.Allgatherv(np.ascontiguousarray(rows), [out, (sizes, displ)])
    if traffic is not None:
        traffic["allgatherv"] = traffic.get("allgatherv", 0) + rows.nbytes
    return out


def reduce_scatter_rows(comm, rows: np.ndarray, counts, traffic: dict | None = None) -> np.ndarray:
    """The sum over ranks of `rows` (every rank's rows, stacked in rank order), of which each
    rank receives its own counts[rank] rows."""
    from mpi4py import MPI

    width = int(np.prod(rows.shape[1:], dtype=np.int64))
    sizes = [_check_count(c * width) for c in counts]
    _check_count(sum(sizes))
    out = np.empty((counts[comm.Get_rank()],) + rows.shape[1:], dtype=rows.dtype)
    comm.Reduce_scatter(np.ascontiguousarray(rows), out, recvcounts=sizes, op=MPI.SUM)
    if traffic is not None:
        traffic["reduce_scatter"] = traffic.get("reduce_scatter", 0) + rows.nbytes
    return out


def allreduce_sum(comm, arrays, traffic: dict | None = None) -> None:
    """Sum each float array over the ranks, in place (one Allreduce of their concatenation)."""
    from mpi4py import MPI

    arrays = [a for a in arrays if a.size]
    if not arrays or comm.Get_size() == 1:
        return
    flat = np.concatenate([a.reshape(-1) for a in arrays])
    comm.Allreduce(MPI.IN_PLACE, flat, op=MPI.SUM)
    if traffic is not None:
        traffic["allreduce"] = traffic.get("allreduce", 0) + flat.nbytes
    start = 0
    for a in arrays:
        a.reshape(-1)[...] = flat[start : start + a.size]
        start += a.size


# ---- initialisation without the whole layer ---------------------------------------------------
def check_seed(seed):
    """A seed every rank can reproduce: None, an int >= 0 or a sequence of them (what
    numpy.random.SeedSequence takes); Generators and BitGenerators carry state that cannot be
    skipped along, and are refused."""
    if seed is None:
        return None
    if isinstance(seed, (np.random.Generator, np.random.BitGenerator)):
        raise TypeError(
            "seed must be None, an int or a sequence of ints for a sharded layer built from "
            f"its config (every rank draws its own part of one stream), got {type(seed).__name__}"
        )
    try:
        np.random.SeedSequence(seed)
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"seed: {exc}") from exc
    return seed


class InitStream:
    """The random stream of an UltraFFF or FFF constructor (``numpy.random.default_rng(seed)``,
    whose draws fill the parameters one after another in C order), readable at any position:
    PCG64 jumps ahead in O(log n) (``advance``), so a rank draws only its own part. A float32
    draw takes half of one 64-bit output (the other half is kept for the next draw), a float64
    draw a whole one."""

    def __init__(self, seed, dtype: np.dtype):
        self._state = np.random.PCG64(seed).state
        self._bits = np.random.PCG64()
        self._gen = np.random.Generator(self._bits)
        self.dtype = dtype

    def uniform(self, pos: int, n: int, bound: float) -> np.ndarray:
        """The stream's draws pos .. pos + n, made U(-bound, bound) exactly as the
        constructors' _uniform makes them (in the layer's dtype)."""
        dtype = self.dtype
        self._seek(pos)
        out = np.empty(n, dtype=dtype)
        self._gen.random(dtype=dtype, out=out)
        out *= dtype.type(2 * bound)
        out -= dtype.type(bound)
        return out

    def _seek(self, pos: int) -> None:
        self._bits.state = self._state
        if self.dtype.itemsize == 4:
            self._bits.advance(pos // 2)
            if pos % 2:
                self._gen.random(1, dtype=np.float32)  # the low half; the high half is next
        else:
            self._bits.advance(pos)


def agree_seed(comm, seed) -> Any:
    """The seed every rank uses: the ranks' own if they all gave the same, else an error on
    every rank; with None everywhere, fresh entropy drawn on rank 0."""
    error = None
    try:
        seed = check_seed(seed)
    except (TypeError, ValueError) as exc:
        error = exc
    seeds = agree(comm, ("seed",), error, repr(seed))
    if any(s != seeds[0] for s in seeds):
        raise ValueError(
            f"the ranks were given different seeds ({', '.join(seeds)}); give every rank the "
            "same seed, or None everywhere"
        )
    if seed is None:
        seed = comm.bcast(np.random.SeedSequence().entropy if comm.Get_rank() == 0 else None)
    return seed
