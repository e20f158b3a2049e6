"""CUDA twin of fastff.ops.CPUOps: CuPy arrays, RawKernels from kernels.cu."""

from __future__ import annotations

from ..ops import ACTIVATIONS, Ops
from . import cmm, kernels
from .kernels import F4_KS, cp

WARPS_PER_BLOCK = 8
SMEM_LIMIT = 48 * 1024  # default dynamic shared memory without an opt-in
CHUNK_VISITS = 128  # visits a block sums serially in the weight-gradient pass (<= CHUNK_MAX)
COL_BLOCK = 256


class GPUOps(Ops):
    """Kernels compiled once per process (lazily, on first CUDA use)."""

    name = "cuda"
    xp = cp
    cmm = cmm  # the router-leaf kernels, same signatures as fastff._cmm
    _instance = None

    @classmethod
    def instance(cls) -> GPUOps:
        if cls._instance is None:
            if cp is None:
                raise RuntimeError(
                    "device 'cuda' needs CuPy and a CUDA GPU: `pip install fastff[gpu]` (or the "
                    "cupy-cudaXXx wheel of your CUDA version)"
                )
            try:
                n_devices = cp.cuda.runtime.getDeviceCount()
            except cp.cuda.runtime.CUDARuntimeError as exc:
                raise RuntimeError(f"device 'cuda' needs a CUDA GPU: {exc}") from exc
            if n_devices == 0:
                raise RuntimeError("device 'cuda' needs a CUDA GPU; none was found")
            cls._instance = cls()
        return cls._instance

    _no_paths: dict = {}

    @classmethod
    def _no_path(cls, dtype):
        """(0, 0) visited and preact stand-ins for an inference call."""
        key = cp.dtype(dtype).char
        if key not in cls._no_paths:
            cls._no_paths[key] = (cp.empty((0, 0), cp.int64), cp.empty((0, 0), dtype))
        return cls._no_paths[key]

    @staticmethod
    def _f4_lanes(x, in_w, out_w):
        """K of the float32 register path when it applies (else None)."""
        if x.dtype != cp.float32 or in_w % 4 or out_w % 4:
            return None
        need = -(-max(in_w, out_w) // 128)
        return next((k for k in F4_KS if k >= need), None)

    def asarray(self, a, dtype=None):
        return cp.asarray(a, dtype=dtype)

    def to_numpy(self, a):
        return cp.asnumpy(a)

    @staticmethod
    def _row_launch(n_rows, per_row_elems, itemsize):
        """Grid, block, shared bytes and smem flag for the warp-per-row kernels."""
        per_warp = per_row_elems * itemsize
        warps = WARPS_PER_BLOCK
        use_smem = 1
        if per_warp * warps > SMEM_LIMIT:
            warps = max(1, SMEM_LIMIT // per_warp)
            if per_warp > SMEM_LIMIT:  # rows too wide for shared memory: work in global memory
                warps, use_smem = WARPS_PER_BLOCK, 0
        grid = (n_rows + warps - 1) // warps
        return (grid,), (32 * warps,), (per_warp * warps if use_smem else 0), use_smem

    def ultra_forward(self, x, p, depth, n_trees, act, save_path, n_threads):
        w_in, b_in, w_out_t = p["w_in"], p["b_in"], p["w_out_t"]
        n_rows, in_w = x.shape
        out_w = w_out_t.shape[1]
        y = cp.empty((n_rows, out_w), dtype=x.dtype)
        if save_path:
            path = n_trees * (depth + 1)
            visited = cp.empty((n_rows, path), dtype=cp.int64)
            preact = cp.empty((n_rows, path), dtype=x.dtype)
        else:  # the kernels do not touch them: shared empty arrays, no allocation per call
            visited, preact = self._no_path(x.dtype)
        n_nodes = w_in.shape[0] // n_trees
        k = self._f4_lanes(x, in_w, out_w)
        if n_rows and k is not None:
            grid = ((n_rows + WARPS_PER_BLOCK - 1) // WARPS_PER_BLOCK,)
            kernels.get("ultra_forward_f4", k=k)(
                grid,
                (32 * WARPS_PER_BLOCK,),
                (
                    x,
                    w_in,
                    b_in,
                    w_out_t,
                    y,
                    visited,
                    preact,
                    cp.int64(n_rows),
                    cp.int32(in_w),
                    cp.int32(out_w),
                    cp.int32(depth),
                    cp.int32(n_trees),
                    cp.int64(n_nodes),
                    cp.int32(ACTIVATIONS[act]),
                    cp.int32(save_path),
                ),
            )
        elif n_rows:
            grid, block, smem, use_smem = self._row_launch(n_rows, in_w + out_w, x.dtype.itemsize)
            kernels.get("ultra_forward", x.dtype)(
                grid,
                block,
                (
                    x,
                    w_in,
                    b_in,
                    w_out_t,
                    y,
                    visited,
                    preact,
                    cp.int64(n_rows),
                    cp.int32(in_w),
                    cp.int32(out_w),
                    cp.int32(depth),
                    cp.int32(n_trees),
                    cp.int64(n_nodes),
                    cp.int32(ACTIVATIONS[act]),
                    cp.int32(save_path),
                    cp.int32(use_smem),
                ),
                shared_mem=smem,
            )
        return y, visited, preact

    def ultra_backward(self, x, dy, p, g, visited, preact, act, n_threads):
        w_in, w_out_t = p["w_in"], p["w_out_t"]
        grad_w_in, grad_b_in, grad_w_out_t = g["w_in"], g["b_in"], g["w_out_t"]
        n_rows, in_w = x.shape
        out_w = dy.shape[1]
        visits_per_row = visited.shape[1]
        dx = cp.empty_like(x)
        if n_rows == 0:
            return dx
        dz = cp.empty_like(preact)
        a = cp.empty_like(preact)
        k = self._f4_lanes(x, in_w, out_w)
        if k is not None:
            grid = ((n_rows + WARPS_PER_BLOCK - 1) // WARPS_PER_BLOCK,)
            kernels.get("ultra_backward_rows_f4", k=k)(
                grid,
                (32 * WARPS_PER_BLOCK,),
                (
                    dy,
                    w_in,
                    w_out_t,
                    visited,
                    preact,
                    dz,
                    a,
                    dx,
                    cp.int64(n_rows),
                    cp.int32(in_w),
                    cp.int32(out_w),
                    cp.int32(visits_per_row),
                    cp.int32(ACTIVATIONS[act]),
                ),
            )
        else:
            grid, block, smem, use_smem = self._row_launch(n_rows, in_w + out_w, x.dtype.itemsize)
            kernels.get("ultra_backward_rows", x.dtype)(
                grid,
                block,
                (
                    dy,
                    w_in,
                    w_out_t,
                    visited,
                    preact,
                    dz,
                    a,
                    dx,
                    cp.int64(n_rows),
                    cp.int32(in_w),
                    cp.int32(out_w),
                    cp.int32(visits_per_row),
                    cp.int32(ACTIVATIONS[act]),
                    cp.int32(use_smem),
                ),
                shared_mem=smem,
            )

        # Weight gradients: visits sorted by node, cut into chunks (see kernels.cu). int32 keys
        # halve the radix-sort passes; the chunk count never leaves the device.
        n_visits = visited.size
        if n_visits >= 2**31 or w_in.shape[0] >= 2**31:
            raise MemoryError(
                "the CUDA gradient pass indexes visits with int32: "
                f"{n_visits:,} visits is too many; use smaller batches"
            )
        visited_flat = visited.ravel()
        order = cp.argsort(visited_flat.astype(cp.int32)).astype(cp.int32)
        row_sorted = cp.empty(n_visits, dtype=cp.int32)
        dz_sorted = cp.empty(n_visits, dtype=x.dtype)
        a_sorted = cp.empty(n_visits, dtype=x.dtype)
        flags = cp.empty(n_visits, dtype=cp.int32)
        threads = 256
        visit_grid = ((n_visits + threads - 1) // threads,)
        kernels.get("ultra_sorted_visits", x.dtype)(
            visit_grid,
            (threads,),
            (
                order,
                visited_flat,
                dz,
                a,
                cp.int64(n_visits),
                cp.int32(visits_per_row),
                cp.int32(CHUNK_VISITS),
                row_sorted,
                dz_sorted,
                a_sorted,
                flags,
            ),
        )
        scan = cp.cumsum(flags, dtype=cp.int32)
        max_chunks = -(-n_visits // CHUNK_VISITS) + min(n_visits, w_in.shape[0])
        chunk_start = cp.empty(max_chunks, dtype=cp.int32)
        chunk_node = cp.empty(max_chunks, dtype=cp.int64)
        kernels.get("ultra_chunk_table")(
            visit_grid,
            (threads,),
            (flags, scan, order, visited_flat, cp.int64(n_visits), chunk_start, chunk_node),
        )
        n_chunks = scan[-1:]  # device scalar read by the kernels

        width = in_w + out_w + 1
        col_blocks = (width + COL_BLOCK - 1) // COL_BLOCK
        partial = cp.empty((max_chunks, width), dtype=x.dtype)
        kernels.get("ultra_grad_chunks", x.dtype)(
            (max_chunks, col_blocks),
            (COL_BLOCK,),
            (
                x,
                dy,
                row_sorted,
                dz_sorted,
                a_sorted,
                chunk_start,
                n_chunks,
                cp.int64(n_visits),
                cp.int32(in_w),
                cp.int32(out_w),
                partial,
            ),
        )
        kernels.get("ultra_grad_reduce", x.dtype)(
            (max_chunks, col_blocks),
            (COL_BLOCK,),
            (
                partial,
                chunk_node,
                n_chunks,
                cp.int32(in_w),
                cp.int32(out_w),
                grad_w_in,
                grad_b_in,
                grad_w_out_t,
            ),
        )
        return dx
