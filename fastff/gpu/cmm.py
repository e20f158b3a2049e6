"""The CUDA kernel module: one launcher per kernel of kernels.cu, with the signature of its twin
in fastff._cmm (the CPU's trailing n_threads is accepted and ignored), so the Ops code is
written once against an array module and a kernel module (fastff.ops.Ops).

Each launcher checks nothing the layers have not checked, sizes the grid and launches on the
current stream through `_launch`; each kernel's argument list is written here once.
"""

from __future__ import annotations

from . import kernels
from .kernels import F4_KS, H8_KS, HALF_KIND_CODES, cp

THREADS = 256  # one thread per element or row
WARPS = 8  # warp-per-row kernels: rows per block
SMEM_LIMIT = 48 * 1024  # default dynamic shared memory without an opt-in
CHUNK_VISITS = 128  # visits a block sums serially in the weight-gradient pass (<= CHUNK_MAX)
COL_BLOCK = 256


def _launch(name, config, *args, dtype=None, k=None, half_kind=None, shared_mem=0):
    """Launch kernel `name` (name<T> for dtype, name<K> for k, name<KIND> / name<K, KIND> for
    16-bit weights; compiled once) with config = (grid, block) and the kernel's arguments in
    its C order."""
    grid, block = config
    kernels.get(name, dtype, k, half_kind)(grid, block, args, shared_mem=shared_mem)


def _warp_grid(n_rows):
    return ((n_rows + WARPS - 1) // WARPS,), (32 * WARPS,)


def _thread_grid(n):
    return ((n + THREADS - 1) // THREADS,), (THREADS,)


def _row_launch(n_rows, per_row_elems, itemsize):
    """Grid, block, shared bytes and smem flag for the general warp-per-row kernels."""
    per_warp = per_row_elems * itemsize
    warps = WARPS
    use_smem = 1
    if per_warp * warps > SMEM_LIMIT:
        warps = max(1, SMEM_LIMIT // per_warp)
        if per_warp > SMEM_LIMIT:  # rows too wide for shared memory: work in global memory
            warps, use_smem = WARPS, 0
    grid = (n_rows + warps - 1) // warps
    return (grid,), (32 * warps,), (per_warp * warps if use_smem else 0), use_smem


def _address(a) -> int:
    """The device address of a CuPy array's first element."""
    return a.data.ptr


def _f4_lanes(x, in_w, out_w, args=()):
    """K of the float32 register path when it applies (else None). Its rows are read and
    written as float4: every float32 array must start on 16 bytes (a C-contiguous view at an
    odd offset, e.g. a torch tensor's storage offset, would fault and lose the CUDA context)."""
    if x.dtype != cp.float32 or in_w % 4 or out_w % 4:
        return None
    if any(
        _address(a) % 16 for a in (x, *args) if isinstance(a, cp.ndarray) and a.dtype == cp.float32
    ):
        return None
    need = -(-max(in_w, out_w) // 128)
    return next((k for k in F4_KS if k >= need), None)


def _row_kernel(name, x, in_w, out_w, *args):
    """Launch the float4 register twin `name_f4` where it applies, else the general kernel
    (which takes a trailing use_smem flag and shared memory)."""
    n_rows = x.shape[0]
    k = _f4_lanes(x, in_w, out_w, args)
    if k is not None:
        _launch(f"{name}_f4", _warp_grid(n_rows), *args, k=k)
    else:
        grid, block, smem, use_smem = _row_launch(n_rows, in_w + out_w, x.dtype.itemsize)
        _launch(name, (grid, block), *args, cp.int32(use_smem), dtype=x.dtype, shared_mem=smem)


# ---- neuron tree ---------------------------------------------------------------------------


def ultra_forward(
    x, w_in, b_in, w_out_t, depth, n_trees, act, y, visited, preact, save_path, n_threads=None
):
    n_rows, in_w = x.shape
    out_w = w_out_t.shape[1]
    if n_rows == 0:
        return
    _row_kernel(
        "ultra_forward",
        x,
        in_w,
        out_w,
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
        cp.int64(w_in.shape[0] // n_trees),
        cp.int32(act),
        cp.int32(save_path),
    )


def ultra_forward_add(
    x, w_in, b_in, w_out_t, depth, n_trees, act, y, visited, preact, save_path, n_threads=None
):
    """ultra_forward's walk, its sums added into y (the kernels start each row's sum from zero:
    not bitwise a split walk, as on the CPU)."""
    if y.dtype != x.dtype or not y.flags.c_contiguous or y.shape != (x.shape[0], w_out_t.shape[1]):
        raise ValueError("y must be a C-contiguous (rows, out) array of x's dtype")
    walked = cp.empty(y.shape, dtype=x.dtype)
    args = (depth, n_trees, act, walked, visited, preact, save_path, n_threads)
    ultra_forward(x, w_in, b_in, w_out_t, *args)
    y += walked


def _h8_lanes(x, in_w, out_w, arrays):
    """K of the 16-bit register path (ultra_forward_h8) when it applies, else None: widths
    divisible by 8 (a row is whole 16-byte chunks) and every array starting on 16 bytes."""
    if in_w % 8 or out_w % 8 or any(_address(a) % 16 for a in (x, *arrays)):
        return None
    need = -(-max(in_w, out_w) // 256)
    return next((k for k in H8_KS if k >= need), None)


def ultra_forward_half(
    x,
    w_in,
    b_in,
    w_out_t,
    depth,
    n_trees,
    act,
    y,
    visited,
    preact,
    save_path,
    half_kind,
    n_threads=None,
):
    """ultra_forward with 16-bit weights (uint16 views; half_kind 1 bfloat16, 2 float16): x, y
    and preact float32, as fastff._cmm.ultra_forward_half."""
    n_rows, in_w = x.shape
    out_w = w_out_t.shape[1]
    if half_kind not in HALF_KIND_CODES:
        raise ValueError("half_kind must be 1 (bfloat16) or 2 (float16)")
    if n_rows == 0:
        return
    arrays = (x, w_in, b_in, w_out_t, y, visited, preact)
    sizes = (cp.int64(n_rows), cp.int32(in_w), cp.int32(out_w), cp.int32(depth))
    tree = (cp.int32(n_trees), cp.int64(w_in.shape[0] // n_trees), cp.int32(act))
    args = (*arrays, *sizes, *tree, cp.int32(save_path))
    k = _h8_lanes(x, in_w, out_w, (w_in, w_out_t, y))
    name = "ultra_forward_half" if k is None else "ultra_forward_h8"
    _launch(name, _warp_grid(n_rows), *args, k=k, half_kind=half_kind)


def fff_infer_half(x, node_w, node_b, w1t, b1, w2, b2, depth, act, y, half_kind, n_threads=None):
    """fff_infer with 16-bit weights (uint16 views; half_kind 1 bfloat16, 2 float16): x and y
    float32, as fastff._cmm.fff_infer_half."""
    n_rows, in_w = x.shape
    if half_kind not in HALF_KIND_CODES:
        raise ValueError("half_kind must be 1 (bfloat16) or 2 (float16)")
    if n_rows == 0:
        return
    sizes = (cp.int64(n_rows), cp.int32(in_w), cp.int32(w1t.shape[1]), cp.int32(y.shape[1]))
    args = (x, node_w, node_b, w1t, b1, w2, b2, y, *sizes, cp.int32(depth), cp.int32(act))
    _launch("fff_infer_half", _warp_grid(n_rows), *args, half_kind=half_kind)


def ultra_backward(
    x,
    dy,
    w_in,
    w_out_t,
    visited,
    preact,
    act,
    dx,
    grad_w_in,
    grad_b_in,
    grad_w_out_t,
    n_threads=None,
):
    n_rows, in_w = x.shape
    out_w = dy.shape[1]
    visits_per_row = visited.shape[1]
    if n_rows == 0:
        return
    dz = cp.empty_like(preact)
    a = cp.empty_like(preact)
    _row_kernel(
        "ultra_backward_rows",
        x,
        in_w,
        out_w,
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
        cp.int32(act),
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
    by_visit = _thread_grid(n_visits)
    _launch(
        "ultra_sorted_visits",
        by_visit,
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
        dtype=x.dtype,
    )
    scan = cp.cumsum(flags, dtype=cp.int32)
    max_chunks = -(-n_visits // CHUNK_VISITS) + min(n_visits, w_in.shape[0])
    chunk_start = cp.empty(max_chunks, dtype=cp.int32)
    chunk_node = cp.empty(max_chunks, dtype=cp.int64)
    _launch(
        "ultra_chunk_table",
        by_visit,
        flags,
        scan,
        order,
        visited_flat,
        cp.int64(n_visits),
        chunk_start,
        chunk_node,
    )
    n_chunks = scan[-1:]  # device scalar read by the kernels

    width = in_w + out_w + 1
    by_chunk = (max_chunks, (width + COL_BLOCK - 1) // COL_BLOCK), (COL_BLOCK,)
    partial = cp.empty((max_chunks, width), dtype=x.dtype)
    _launch(
        "ultra_grad_chunks",
        by_chunk,
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
        dtype=x.dtype,
    )
    _launch(
        "ultra_grad_reduce",
        by_chunk,
        partial,
        chunk_node,
        n_chunks,
        cp.int32(in_w),
        cp.int32(out_w),
        grad_w_in,
        grad_b_in,
        grad_w_out_t,
        dtype=x.dtype,
    )


# ---- router-leaf FFF -----------------------------------------------------------------------


def _hard_forward(
    mode,
    x,
    node_w,
    node_b,
    w1t,
    b1,
    w2,
    b2,
    depth,
    act,
    swap,
    has_swap,
    drop,
    has_drop,
    y,
    path,
    z_path,
    leaf,
    hpre,
    entropy,
):
    """fff_hard_forward<T>: mode 0 is inference (path arrays empty, untouched), 1 training."""
    n_rows, in_w = x.shape
    if n_rows == 0:
        return
    sizes = (cp.int64(n_rows), cp.int32(in_w), cp.int32(w1t.shape[1]), cp.int32(y.shape[1]))
    weights = (node_w, node_b, w1t, b1, w2, b2)
    masks = (swap, cp.int32(has_swap), drop, cp.int32(has_drop))
    flags = (cp.int32(depth), cp.int32(act), cp.int32(mode))
    outputs = (y, path, z_path, leaf, hpre, entropy)
    _launch(
        "fff_hard_forward",
        _warp_grid(n_rows),
        *(x, *weights, *sizes, *flags, *masks, *outputs),
        dtype=x.dtype,
    )


def fff_infer(x, node_w, node_b, w1t, b1, w2, b2, depth, act, y, n_threads=None):
    none_f = cp.empty(0, dtype=x.dtype)
    none_i = cp.empty(0, dtype=cp.int64)
    no_mask = (cp.empty(0, cp.uint8), 0, none_f, 0)
    weights = (node_w, node_b, w1t, b1, w2, b2)
    _hard_forward(0, x, *weights, depth, act, *no_mask, y, none_i, none_f, none_i, none_f, none_f)


def fff_hard_train_forward(*args):
    """fastff._cmm.fff_hard_train_forward's arguments (x, node_w, ..., entropy, n_threads)."""
    _hard_forward(1, *args[:19])


def fff_hard_train_backward(
    x,
    dy,
    node_w,
    w1t,
    w2,
    path,
    z_path,
    leaf,
    swap,
    has_swap,
    drop,
    has_drop,
    hpre,
    act,
    entropy_weight,
    dx,
    grad_node_w,
    grad_node_b,
    grad_w1t,
    grad_b1,
    grad_w2,
    grad_b2,
    n_threads=None,
):
    n_rows, in_w = x.shape
    if n_rows == 0:
        return
    widths = (cp.int32(in_w), cp.int32(w1t.shape[1]), cp.int32(dy.shape[1]))
    sizes = (cp.int64(n_rows), *widths, cp.int32(path.shape[1]))
    saved = (path, z_path, leaf, swap, cp.int32(has_swap), drop, cp.int32(has_drop), hpre)
    grads = (grad_node_w, grad_node_b, grad_w1t, grad_b1, grad_w2, grad_b2)
    entropy = (cp.int32(act), x.dtype.type(entropy_weight))
    _launch(
        "fff_hard_backward",
        _warp_grid(n_rows),
        *(x, dy, node_w, w1t, w2, *saved, *sizes, *entropy, dx, *grads),
        dtype=x.dtype,
    )


def _per_thread(name, n, *args, dtype):
    """Launch an elementwise kernel with one thread per item (n of them; none for n = 0)."""
    if n:
        _launch(name, _thread_grid(n), *args, dtype=dtype)


def fff_soft_mixture(z, swap, has_swap, q, reach, entropy, n_threads=None):
    n_rows, n_nodes = z.shape
    sizes = cp.int64(n_rows), cp.int64(n_nodes)
    args = (z, swap, cp.int32(has_swap), *sizes, q, reach, entropy)
    _per_thread("fff_soft_mixture", n_rows, *args, dtype=reach.dtype)


def fff_soft_router_backward(
    dmix, q, reach, swap, has_swap, entropy_weight, dreach, dz, n_threads=None
):
    n_rows, n_nodes = q.shape
    sizes = cp.int64(n_rows), cp.int64(n_nodes)
    args = (dmix, q, reach, swap, cp.int32(has_swap), *sizes, q.dtype.type(entropy_weight))
    _per_thread(
        "fff_soft_router_backward", n_rows * (n_nodes > 0), *args, dreach, dz, dtype=q.dtype
    )


def fff_soft_leaf_activate(hpre, b1, mix, drop, has_drop, act, a, mixed, n_threads=None):
    n_rows, n_units = hpre.shape
    sizes = cp.int64(n_rows), cp.int64(n_units), cp.int32(b1.shape[1])
    args = (hpre, b1, mix, drop, cp.int32(has_drop), *sizes, cp.int32(act), a, mixed)
    _per_thread("fff_soft_leaf_activate", n_rows * n_units, *args, dtype=hpre.dtype)


def fff_soft_leaf_backward(hpre, a, g, mix, drop, has_drop, act, dmix, n_threads=None):
    n_rows, n_leaves = mix.shape
    sizes = cp.int64(n_rows), cp.int64(n_leaves), cp.int32(hpre.shape[1] // max(n_leaves, 1))
    args = (hpre, a, g, mix, drop, cp.int32(has_drop), *sizes, cp.int32(act), dmix)
    _per_thread("fff_soft_leaf_backward", n_rows * n_leaves, *args, dtype=hpre.dtype)
