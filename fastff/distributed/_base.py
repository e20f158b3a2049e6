"""The base of the tree-parallel layers: a fastff Module holding one rank's part of a layer
(the replicated top levels and its own subtrees), its communicator and its plan."""

from __future__ import annotations

import pickle
from typing import Any

import numpy as np

from .._validation import as_rows, check_int
from ..module import Module, initialising
from ._common import Plan, agree, agree_seed, choose_top_levels, default_comm, same_everywhere

_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))


def check_shard_dtype(dtype) -> np.dtype:
    dtype = np.dtype(dtype)
    if dtype not in _FLOATS:
        raise TypeError(f"sharded layers run in float32 or float64, got {dtype}")
    return dtype


class _Sharded(Module):
    """One rank's shard of a layer. Subclasses define KIND (the layer's class name),
    _normalize (the layer config, checked), _tree_shape and _allocate."""

    KIND = ""

    # ---- construction ----------------------------------------------------------------------
    def _build(self, comm, raw_config: dict, seed, top_levels) -> None:
        """The constructors' common part: every rank checks the config, the ranks agree on it
        and on the seed, then each allocates (and, unless fastff.load rebuilds it, draws) its
        part. An error on any rank raises on every rank."""
        kind = f"Sharded{self.KIND}"
        comm = default_comm(comm)
        error: BaseException | None = None
        config: dict = {}
        try:
            config = self._normalize(raw_config)
            n_trees, depth = self._tree_shape(config)
            top_levels = choose_top_levels(top_levels, n_trees, depth, comm.Get_size(), self.KIND)
        except (TypeError, ValueError, MemoryError) as exc:
            error = exc
        everyone = agree(comm, (kind,), error, {"config": config, "top_levels": top_levels})
        same_everywhere(everyone, kind)
        seed = agree_seed(comm, seed)
        error = None
        try:
            self._init_local(config, top_levels, comm.Get_rank(), comm.Get_size(), comm)
            self._seeded(seed)
            if initialising():
                self._draw(seed)
        except MemoryError as exc:
            error = exc
        agree(comm, (f"{kind} built",), error)

    def _backprop_rows(self, dy, version: int, call: int, lead: tuple):
        """The sharded backprops' start, collective: dy checked on every rank (the module
        unchanged since its forward, dy of y's shape), the ranks agreeing that all passed;
        returns dy as rows."""
        out_w = self.output_width
        error: BaseException | None = None
        dy_rows = None
        try:
            self._check_fresh(version, "cpu")
            dy_rows, dy_lead = as_rows(dy, out_w, self.dtype, np, name="dy")
            if dy_lead != lead:
                raise ValueError(
                    f"dy must have the shape of y, {lead + (out_w,)}, got {dy_lead + (out_w,)}"
                )
        except (TypeError, ValueError, RuntimeError, MemoryError) as exc:
            error = exc
        self._begin("backprop", error, None, call)
        assert dy_rows is not None
        return dy_rows

    @classmethod
    def _adopt(cls, comm, layer, config: dict, top_levels, error, described: dict | None):
        """The end of shard(layer): the ranks agree on the layer they were given (`described`,
        or the `error` a rank found), then each copies its part of it."""
        same_everywhere(agree(comm, (f"shard {cls.KIND}",), error, described), "shard")
        shard = cls.__new__(cls)
        error = None
        try:
            shard._init_local(config, top_levels, comm.Get_rank(), comm.Get_size(), comm)
            shard._copy_from(layer)
        except MemoryError as exc:
            error = exc
        agree(comm, (f"shard {cls.KIND} built",), error)
        return shard

    def _copy_from(self, layer) -> None:
        raise NotImplementedError

    def _seeded(self, seed) -> None:
        """Hook: state drawn from the agreed seed besides the weights."""

    def _draw(self, seed) -> None:
        raise NotImplementedError

    def _init_local(self, layer_config: dict, top_levels: int, rank: int, size: int, comm):
        Module.__init__(self, layer_config["dtype"])
        self._layer_config = dict(layer_config)
        n_trees, depth = self._tree_shape(layer_config)
        self._top_levels = top_levels
        self._plan = Plan(n_trees, depth, top_levels, size, rank)
        self._comm = comm
        self._calls = 0  # collective calls so far: every rank's count must agree
        self.traffic: dict[str, int] = {}  # bytes this rank sent, by collective
        self._allocate()

    @staticmethod
    def _tree_shape(config: dict) -> tuple[int, int]:
        raise NotImplementedError

    # ---- the layer's attributes, as the whole layer's ---------------------------------------
    @property
    def input_width(self) -> int:
        return self._layer_config["input_width"]

    @property
    def output_width(self) -> int:
        return self._layer_config["output_width"]

    @property
    def depth(self) -> int:
        return self._layer_config["depth"]

    def _allocate(self) -> None:
        raise NotImplementedError

    @classmethod
    def _normalize(cls, config: dict) -> dict:
        raise NotImplementedError

    @classmethod
    def from_config(cls, config: dict) -> Module:
        """The shard described by a shard file's metadata (``get_config()``), detached from
        any communicator until ``fastff.distributed.load_shard`` attaches it. Only for
        fastff.load: a shard's weights come from its file or from the constructor."""
        if initialising():
            raise TypeError(
                f"{cls.__name__}.from_config rebuilds a shard only from its weight file: use "
                f"fastff.distributed.load_shard(path, comm), or build it with "
                f"{cls.__name__}(..., comm=comm) or fastff.distributed.shard(layer, comm)"
            )
        if not isinstance(config, dict) or set(config) != {"layer", "top_levels", "rank", "size"}:
            raise ValueError(
                "a shard config holds exactly 'layer', 'top_levels', 'rank' and 'size', got "
                f"{sorted(config) if isinstance(config, dict) else type(config).__name__}"
            )
        if not isinstance(config["layer"], dict):
            raise TypeError("a shard config's 'layer' must be a dict")
        layer = cls._normalize(config["layer"])
        size = check_int(config["size"], "size", 1)
        rank = check_int(config["rank"], "rank", 0, size - 1)
        n_trees, depth = cls._tree_shape(layer)
        top_levels = check_int(config["top_levels"], "top_levels", 0, depth)
        if n_trees << top_levels < size:
            raise ValueError(f"{n_trees << top_levels} subtrees cannot be shared by {size} ranks")
        shard = cls.__new__(cls)
        shard._init_local(layer, top_levels, rank, size, None)
        return shard

    def get_config(self) -> dict:
        """The layer's config, the replicated levels, this rank and the rank count."""
        return {
            "layer": dict(self._layer_config),
            "top_levels": self._top_levels,
            "rank": self._plan.rank,
            "size": self._plan.size,
        }

    # ---- what a shard is ------------------------------------------------------------------
    @property
    def comm(self):
        """The communicator (None for a shard just read by fastff.load)."""
        return self._comm

    @property
    def rank(self) -> int:
        return self._plan.rank

    @property
    def size(self) -> int:
        return self._plan.size

    @property
    def top_levels(self) -> int:
        """Levels of every tree held by every rank."""
        return self._top_levels

    @property
    def layer_config(self) -> dict:
        """The config of the whole layer (``UltraFFF(**config)`` or ``FFF(**config)``)."""
        return dict(self._layer_config)

    @property
    def subtrees(self) -> range:
        """The global ids of this rank's subtrees (``t * 2**top_levels + j``)."""
        return range(self._plan.first, self._plan.stop)

    @property
    def subtree_bounds(self) -> np.ndarray:
        """Rank r owns subtrees ``subtree_bounds[r]:subtree_bounds[r + 1]``."""
        return self._plan.bounds.copy()

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._layer_config.items())
        return (
            f"{type(self).__name__}({args}, top_levels={self._top_levels}, rank "
            f"{self.rank} of {self.size}, subtrees {self._plan.first}..{self._plan.stop - 1})"
        )

    def to(self, device: str):
        """Sharded layers live on the CPU (their rows travel through MPI as host arrays)."""
        if device != "cpu":
            raise ValueError(
                f"{type(self).__name__} runs on the CPU only; to({device!r}) is not supported"
            )
        return self

    def astype(self, dtype):
        """Not for shards: their dtype is fixed when they are built."""
        raise TypeError(
            f"{type(self).__name__} keeps the dtype it was built with ({self.dtype.name}): "
            "build the shards with the dtype wanted (float32 or float64), or convert the whole "
            "layer (unshard, astype) where it fits in one process"
        )

    # ---- collectives ----------------------------------------------------------------------
    def _attached(self):
        if self._comm is None:
            raise RuntimeError(
                f"this {type(self).__name__} has no communicator (read by fastff.load): use "
                "fastff.distributed.load_shard(path, comm) to load and attach it"
            )
        return self._comm

    def _begin(self, what: str, error: BaseException | None, extra: Any = None, *tag) -> list:
        """The allgather every collective call starts with (see _common.agree)."""
        comm = self._attached()
        self._calls += 1
        tag = (what, self._calls) + tag
        message = None if error is None else (type(error).__name__, str(error))
        sent = len(pickle.dumps((tag, message, extra), pickle.HIGHEST_PROTOCOL))  # as mpi4py
        self.traffic["allgather"] = self.traffic.get("allgather", 0) + sent
        return agree(comm, tag, error, extra)

    def attach(self, comm) -> None:
        """Use `comm` (whose size and this process's rank must be the shard's) from now on;
        checks on every rank that the shards are of one layer."""
        from ._common import default_comm

        comm = default_comm(comm)
        error: BaseException | None = None
        if comm.Get_size() != self.size or comm.Get_rank() != self.rank:
            error = ValueError(
                f"this shard is rank {self.rank} of {self.size}, the communicator gives rank "
                f"{comm.Get_rank()} of {comm.Get_size()}: load the shard saved by this rank "
                "with as many ranks as saved it"
            )
        described = {
            "kind": self.KIND,
            "config": self._layer_config,
            "top_levels": self._top_levels,
        }
        same_everywhere(agree(comm, ("attach",), error, described), "load_shard")
        self._comm = comm
        self._calls = 0
