# cython: language_level=3
"""CPU conditional-matrix-multiplication (CMM) kernels of fastff.

Every kernel walks each row's root-to-leaf path and touches only the weight rows of the nodes it
visits: O(depth * width) per row instead of O(n_nodes * width). Rows run in parallel with
OpenMP (`prange`, GIL released). Weights are stored node-major so each visited node is two
contiguous rows: `w_in[g]` (input weights) and `w_out_t[g]` (output weights, transposed).

Node g = t * n_nodes + k is node k of tree t; the children of k are 2k+1 (left) and 2k+2 (right).
"""
cimport cython
from cython cimport floating
from cython.parallel cimport prange
from libc.math cimport erf, erff, exp, expf, log, logf, sqrt, sqrtf
from libc.string cimport memcpy, memset

import os

import numpy as np

cdef extern from *:
    int FASTFF_HAVE_OPENMP

# Activation codes; fastff/ops.py and the GPU kernels use the same numbers.
cdef enum:
    ACT_IDENTITY = 0
    ACT_RELU = 1
    ACT_GELU = 2

ACTIVATIONS = {"identity": ACT_IDENTITY, "relu": ACT_RELU, "gelu": ACT_GELU}
HAVE_OPENMP = bool(FASTFF_HAVE_OPENMP)


# The most threads a kernel accepts (fastff._validation.max_threads, the public cap): more
# only oversubscribes, and OpenMP ends the process, with no Python error, once the system
# refuses to create the threads.
cdef int _MAX_THREADS = max(64, 8 * (os.cpu_count() or 1))
MAX_THREADS = _MAX_THREADS


# ---------------------------------------------------------------------------------------------
# Argument checks. The loops run without bounds checks, on pointers formed from the shapes, so an
# inconsistent shape or an out-of-range node index would read or write outside the arrays. The
# layers never pass such arguments; these O(1) checks (and the index scans of the backward
# passes) keep that true whatever a caller does, e.g. changing a layer attribute.

MAX_DEPTH = 61  # 2**(depth+1) nodes must be countable in a Py_ssize_t


cdef inline bint _rows_contiguous(Py_ssize_t width, Py_ssize_t inner_stride, size_t itemsize):
    # Row-strided weights (views into one node-record array) are fine; the dot and axpy loops
    # only need each row's own elements to be adjacent.
    return width <= 1 or inner_stride == <Py_ssize_t>itemsize


# C-level checks: a batch-1 call makes a dozen of them, and a Python-level call each cost more
# than the row's whole walk.
cdef inline int _require(bint ok, str what) except -1:
    if not ok:
        raise ValueError(f"fastff._cmm: {what}")
    return 0


cdef inline int _check_act(int act) except -1:
    return _require(act == ACT_IDENTITY or act == ACT_RELU or act == ACT_GELU,
                    "unknown activation code")


cdef int _check_fff_weights(int depth, Py_ssize_t in_w, Py_ssize_t out_w,
                            const floating[:, ::1] node_w, const floating[:, :, ::1] w1t,
                            const floating[:, :, ::1] w2) except -1:
    """The router-leaf weights of a depth-`depth` tree for rows of width in_w and out_w."""
    _require(0 <= depth <= MAX_DEPTH, "depth out of range")
    n_leaves = <object>1 << depth
    _require(node_w.shape[0] == n_leaves - 1 and node_w.shape[1] == in_w,
             "node_w must be (2**depth - 1, in)")
    _require(w1t.shape[0] == n_leaves and w1t.shape[2] == in_w, "w1t must be (2**depth, leaf, in)")
    _require(w2.shape[0] == n_leaves and w2.shape[1] == w1t.shape[1] and w2.shape[2] == out_w,
             "w2 must be (2**depth, leaf, out)")
    return 0


cdef bint _indices_below(const Py_ssize_t* values, Py_ssize_t n, Py_ssize_t bound) noexcept nogil:
    """True if every values[i] lies in [0, bound)."""
    cdef Py_ssize_t i
    for i in range(n):
        if values[i] < 0 or values[i] >= bound:
            return False
    return True


# ---------------------------------------------------------------------------------------------
# Vector primitives: fastff/_simd.h, multiversioned for AVX-512 / AVX2 / baseline at load time.

cdef extern from "_simd.h" nogil:
    float fastff_dot_f32(int n, const float* a, const float* b)
    double fastff_dot_f64(int n, const double* a, const double* b)
    void fastff_axpy_f32(int n, float alpha, const float* x, float* y)
    void fastff_axpy_f64(int n, double alpha, const double* x, double* y)
    void fastff_dotn_f32(int nr, int n, const float** a, const float** b, float* out,
                         const float* prefetch)
    void fastff_dotn_f64(int nr, int n, const double** a, const double** b, double* out,
                         const double* prefetch)
    void fastff_axpym_f32(int nr, const int* m, int stride, int n, const float* alpha,
                          const float** x, float** y, int overwrite)
    void fastff_axpym_f64(int nr, const int* m, int stride, int n, const double* alpha,
                          const double** x, double** y, int overwrite)
    int fastff_wide_registers()
    void fastff_adam_f32(long n, float* p, const float* g, float* m, float* v, int l2,
                         int decay, float wd, float keep, float b1, float omb1, float b2,
                         float omb2, float unbias2, float eps, float step)
    void fastff_adam_f64(long n, double* p, const double* g, double* m, double* v, int l2,
                         int decay, double wd, double keep, double b1, double omb1, double b2,
                         double omb2, double unbias2, double eps, double step)
    void fastff_sgd_f32(long n, float* p, const float* g, float* buf, int l2, int has_buf,
                        int nesterov, float wd, float mom, float lr)
    void fastff_sgd_f64(long n, double* p, const double* g, double* buf, int l2, int has_buf,
                        int nesterov, double wd, double mom, double lr)
    float fastff_relu_f32(float z)
    double fastff_relu_f64(double z)
    void fastff_dot_block_f32(int nr, int nj, int n, const float** x, const float* w,
                              long w_stride, float* out, int out_stride, const float* prefetch)
    void fastff_dot_block_f64(int nr, int nj, int n, const double** x, const double* w,
                              long w_stride, double* out, int out_stride,
                              const double* prefetch)


cdef inline floating _dot(int n, const floating* a, const floating* b) noexcept nogil:
    if floating is float:
        return fastff_dot_f32(n, a, b)
    else:
        return fastff_dot_f64(n, a, b)


cdef inline void _axpy(int n, floating alpha, const floating* x, floating* y) noexcept nogil:
    if floating is float:
        fastff_axpy_f32(n, alpha, x, y)
    else:
        fastff_axpy_f64(n, alpha, x, y)


cdef inline void _dotn(int nr, int n, const floating** a, const floating** b,
                       floating* out, const floating* prefetch) noexcept nogil:
    if floating is float:
        fastff_dotn_f32(nr, n, a, b, out, prefetch)
    else:
        fastff_dotn_f64(nr, n, a, b, out, prefetch)


cdef inline void _axpym(int nr, const int* m, int stride, int n, const floating* alpha,
                        const floating** x, floating** y, bint overwrite) noexcept nogil:
    if floating is float:
        fastff_axpym_f32(nr, m, stride, n, alpha, x, y, overwrite)
    else:
        fastff_axpym_f64(nr, m, stride, n, alpha, x, y, overwrite)


cdef inline void _dot_block(int nr, int nj, int n, const floating** x, const floating* w,
                            long w_stride, floating* out, int out_stride,
                            const floating* prefetch) noexcept nogil:
    if floating is float:
        fastff_dot_block_f32(nr, nj, n, x, w, w_stride, out, out_stride, prefetch)
    else:
        fastff_dot_block_f64(nr, nj, n, x, w, w_stride, out, out_stride, prefetch)


cdef inline floating _act(floating z, int act) noexcept nogil:
    if act == ACT_RELU:  # NaN propagates, as in np.maximum(z, 0)
        if floating is float:
            return fastff_relu_f32(z)
        else:
            return fastff_relu_f64(z)
    if act == ACT_GELU:
        if floating is float:
            return 0.5 * z * (1.0 + erff(z * <float>0.7071067811865476))
        else:
            return 0.5 * z * (1.0 + erf(z * 0.7071067811865476))
    return z


cdef inline floating _act_grad(floating z, int act) noexcept nogil:
    if act == ACT_RELU:
        return 1 if z > 0 else 0
    if act == ACT_GELU:
        # d/dz [z * Phi(z)] = Phi(z) + z * phi(z)
        if floating is float:
            return (0.5 * (1.0 + erff(z * <float>0.7071067811865476))
                    + z * expf(-0.5 * z * z) * <float>0.3989422804014327)
        else:
            return 0.5 * (1.0 + erf(z * 0.7071067811865476)) + z * exp(-0.5 * z * z) * 0.3989422804014327
    return 1


# ---------------------------------------------------------------------------------------------
# Threads. Every kernel takes n_threads from Python (fastff/_threads.py resolves it once per call)
# and never asks OpenMP, whose setting is per OS thread. _team lowers it for small work: waking a
# sleeping thread and joining it costs tens of microseconds (more on a shared or virtual
# machine), so a region gets one thread per _work_per_thread multiply-adds (or element updates)
# and per _ROW_CHUNK rows, at most n_threads. A batch of one chunk runs on the calling thread.

cdef enum:
    _ROW_CHUNK = 16

cdef double _work_per_thread = 1 << 18


def _set_work_per_thread(double work):
    """Set _team's work per thread (the tests use 1, so small inputs still run in parallel
    regions); returns the previous value."""
    global _work_per_thread
    if not work >= 1:
        raise ValueError(f"work per thread must be >= 1, got {work}")
    old = _work_per_thread
    _work_per_thread = work
    return old


def _team_size(int n_threads, Py_ssize_t n_rows, double work_per_row):
    """_team, for the tests."""
    return _team(n_threads, n_rows, work_per_row)


cdef inline int _check_threads(int n_threads) except -1:
    if n_threads < 1 or n_threads > _MAX_THREADS:
        raise ValueError(f"n_threads must be in [1, {_MAX_THREADS}], got {n_threads}")
    return 0


cdef inline int _team_for(int n_threads, Py_ssize_t n_tasks, double work) noexcept nogil:
    """Threads for `n_tasks` tasks of `work` multiply-adds in all."""
    cdef double by_work = work / _work_per_thread
    cdef int n = n_threads
    if n_tasks < n:
        n = <int>n_tasks
    if by_work < n:
        n = <int>by_work
    return n if n > 1 else 1


cdef inline int _team(int n_threads, Py_ssize_t n_rows, double work_per_row) noexcept nogil:
    """Threads for a loop over rows, handed out _ROW_CHUNK at a time."""
    return _team_for(n_threads, n_rows // _ROW_CHUNK, n_rows * work_per_row)


# Neuron-tree FFF (UltraFastBERT)

cdef enum:
    ROWS_PER_BLOCK = 4  # rows one thread walks in lockstep
    MAX_PATH = 62  # MAX_DEPTH + 1: the most levels one walk visits
    SUBTREE_BYTES = 1 << 20  # weights of a subtree that rows walk together: fits a core's L2
    MIN_ROWS_PER_SUBTREE = 16  # below this, grouping rows by subtree saves too little
    NO_CARRY = 0  # a walk adds its terms into y
    GIVE_CARRY = 1  # a top walk leaves its terms in the carry buffer
    TAKE_CARRY = 2  # a subtree walk adds the carried terms, then its own


# The terms a row's top walk hands to its subtree walk: row r's k-th nonzero activation at
# coef[r * stride + k] (of the layer's dtype) and its global node at node[r * stride + k].
cdef struct _Carry:
    void* coef
    Py_ssize_t* node
    int* n
    Py_ssize_t stride


cdef void _walk(const floating[:, ::1] x, const floating[:, :] w_in, const floating[::1] b_in,
                const floating[:, :] w_out_t, int act, floating[:, ::1] y,
                Py_ssize_t[:, ::1] visited, floating[:, ::1] preact, bint save_path,
                const Py_ssize_t* rows, int n, Py_ssize_t* node, int t, Py_ssize_t n_nodes,
                int level0, int level1, int path_len, const Py_ssize_t* next_rows,
                int n_next, _Carry carry, int carry_mode, bint overwrite) noexcept nogil:
    """Rows rows[0..n) (n <= ROWS_PER_BLOCK) of tree t walk levels level0..level1 in lockstep
    from node[i] (index within the tree; updated to the node at level1), then add their
    visited nodes' outputs into y (into zeros with overwrite).

    With carry_mode GIVE_CARRY the outputs are not added but handed on: each row's terms go
    to the carry buffer, and the walk that finishes the row (TAKE_CARRY) adds them first, in
    path order. A row's y is then written once, by its last walk: a batch's y is larger than
    L2, and each extra pass over it is a trip through L3.

    Each level's dots run over the n rows at once: their interleaved weight streams keep
    several fetches in flight (software prefetching on top measured slower: it competes with
    the hardware prefetchers for fill buffers and load slots). The output rows wait until the
    walk is done: a level's axpy between two dependent dots stalls on its own fetch, whereas
    all of a walk's output rows are independent streams, and y is read and written once.
    Meanwhile the first dots fetch the input rows next_rows[0..n_next) of the caller's next
    block: rows regrouped by subtree come in an order the hardware prefetchers cannot follow."""
    cdef int in_w = <int>x.shape[1], out_w = <int>y.shape[1]
    cdef int level, i, k, j
    cdef Py_ssize_t g, r
    cdef floating z[ROWS_PER_BLOCK]
    cdef floating act_z
    cdef const floating* w_rows[ROWS_PER_BLOCK]
    cdef const floating* x_rows[ROWS_PER_BLOCK]
    cdef floating* y_rows[ROWS_PER_BLOCK]
    # per row: the nonzero activations of its walk and their output rows, in path order
    cdef floating coef[ROWS_PER_BLOCK * MAX_PATH]
    cdef const floating* out_rows[ROWS_PER_BLOCK * MAX_PATH]
    cdef int n_terms[ROWS_PER_BLOCK]
    for i in range(n):
        x_rows[i] = &x[rows[i], 0]
        n_terms[i] = 0
        if carry_mode == TAKE_CARRY:
            r = rows[i]
            for j in range(carry.n[r]):
                coef[i * MAX_PATH + j] = (<floating*>carry.coef)[r * carry.stride + j]
                out_rows[i * MAX_PATH + j] = &w_out_t[carry.node[r * carry.stride + j], 0]
            n_terms[i] = carry.n[r]
    for level in range(level0, level1):
        for i in range(n):
            w_rows[i] = &w_in[t * n_nodes + node[i], 0]
        # the first levels' dots fetch the next block's input rows, one each
        _dotn(n, in_w, w_rows, x_rows, z,
              &x[next_rows[level - level0], 0] if level - level0 < n_next else NULL)
        for i in range(n):
            r = rows[i]
            g = t * n_nodes + node[i]
            z[i] = z[i] + b_in[g]
            act_z = _act(z[i], act)
            if act_z != 0:  # relu zeros skip the output row entirely
                k = n_terms[i]
                if carry_mode == GIVE_CARRY:
                    (<floating*>carry.coef)[r * carry.stride + k] = act_z
                    carry.node[r * carry.stride + k] = g
                else:
                    coef[i * MAX_PATH + k] = act_z
                    out_rows[i * MAX_PATH + k] = &w_out_t[g, 0]
                n_terms[i] += 1
            if save_path:
                visited[r, t * path_len + level] = g
                preact[r, t * path_len + level] = z[i]
            node[i] = 2 * node[i] + 1 + (z[i] > 0)
    if carry_mode == GIVE_CARRY:
        for i in range(n):
            carry.n[rows[i]] = n_terms[i]
        return
    for i in range(n):
        y_rows[i] = &y[rows[i], 0]
    _axpym(n, n_terms, MAX_PATH, out_w, coef, out_rows, y_rows, overwrite)


cdef void _walk_top(const floating[:, ::1] x, const floating[:, :] w_in,
                    const floating[::1] b_in, const floating[:, :] w_out_t, int act,
                    floating[:, ::1] y, Py_ssize_t[:, ::1] visited, floating[:, ::1] preact,
                    bint save_path, Py_ssize_t r0, int n, int t, Py_ssize_t n_nodes, int split,
                    int path_len, Py_ssize_t* split_node, _Carry carry, int carry_mode,
                    bint overwrite) noexcept nogil:
    """Rows r0..r0+n walk tree t from its root down to level `split`; with split_node, record
    where each stopped (index among the split level's nodes)."""
    cdef Py_ssize_t rows[ROWS_PER_BLOCK]
    cdef Py_ssize_t node[ROWS_PER_BLOCK]
    cdef Py_ssize_t next_rows[ROWS_PER_BLOCK]
    cdef int j, n_next = <int>min(ROWS_PER_BLOCK, x.shape[0] - r0 - n)
    for j in range(n):
        rows[j] = r0 + j
        node[j] = 0
    for j in range(n_next):
        next_rows[j] = r0 + n + j
    _walk(x, w_in, b_in, w_out_t, act, y, visited, preact, save_path, rows, n, node, t, n_nodes,
          0, split, path_len, next_rows, n_next, carry, carry_mode, overwrite)
    if split_node != NULL:
        for j in range(n):
            split_node[rows[j]] = node[j] - ((<Py_ssize_t>1 << split) - 1)


cdef void _walk_subtree(const floating[:, ::1] x, const floating[:, :] w_in,
                        const floating[::1] b_in, const floating[:, :] w_out_t, int act,
                        floating[:, ::1] y, Py_ssize_t[:, ::1] visited,
                        floating[:, ::1] preact, bint save_path, const Py_ssize_t* order,
                        Py_ssize_t start, Py_ssize_t stop, Py_ssize_t root, int t,
                        Py_ssize_t n_nodes, int split, int path_len, _Carry carry,
                        bint overwrite) noexcept nogil:
    """Rows order[start..stop), which all reached node `root` of tree t at level `split`, walk
    the rest of the way together, ROWS_PER_BLOCK at a time, and add their whole paths' outputs
    (the top walk's carried terms first) into y."""
    cdef Py_ssize_t rows[ROWS_PER_BLOCK]
    cdef Py_ssize_t node[ROWS_PER_BLOCK]
    cdef int j, n, n_next
    while start < stop:
        n = <int>min(stop - start, ROWS_PER_BLOCK)
        n_next = <int>min(stop - start - n, ROWS_PER_BLOCK)
        for j in range(n):
            rows[j] = order[start + j]
            node[j] = root
        _walk(x, w_in, b_in, w_out_t, act, y, visited, preact, save_path, rows, n, node, t,
              n_nodes, split, path_len, path_len, &order[start + n], n_next, carry, TAKE_CARRY,
              overwrite)
        start = start + n


cdef int _split_level(Py_ssize_t n_rows, int depth, int in_w, int out_w,
                      Py_ssize_t itemsize) noexcept:
    """Level at which rows are regrouped by node, or depth + 1 for no regrouping.

    Below the split every subtree's weights fit in SUBTREE_BYTES, and rows that share a subtree
    walk it together, so each subtree is fetched from L3/DRAM once per batch instead of once per
    row. The split is no deeper than leaves MIN_ROWS_PER_SUBTREE rows per subtree on average."""
    cdef Py_ssize_t node_bytes = (<Py_ssize_t>in_w + out_w) * itemsize
    cdef int levels_below = 0, split
    while levels_below < depth + 1 and ((<Py_ssize_t>1 << (levels_below + 1)) - 1) * node_bytes <= SUBTREE_BYTES:
        levels_below += 1
    split = depth + 1 - levels_below
    while split > 0 and (n_rows >> split) < MIN_ROWS_PER_SUBTREE:
        split -= 1
    return depth + 1 if split == 0 else split


def _subtree_split(Py_ssize_t n_rows, int depth, int in_w, int out_w, int itemsize):
    """_split_level, for Python callers (the backward's row order, the tests)."""
    return _split_level(n_rows, depth, in_w, out_w, itemsize)


def ultra_forward(const floating[:, ::1] x, const floating[:, :] w_in, const floating[::1] b_in,
                  const floating[:, :] w_out_t, int depth, int n_trees, int act,
                  floating[:, ::1] y, Py_ssize_t[:, ::1] visited, floating[:, ::1] preact,
                  bint save_path, int n_threads):
    """Hard-path forward of the neuron-tree FFF.

    x (B, in), w_in (T*n, in), b_in (T*n,), w_out_t (T*n, out) -> y (B, out), overwritten.
    With save_path, visited[r, t*(depth+1)+l] gets the global node index of row r's level-l node in
    tree t and preact[r, ...] its pre-activation z; both are (B, T*(depth+1)).

    Per tree: every row walks the top levels (blocks of ROWS_PER_BLOCK rows per task); for large
    batches of deep trees the rows are then counting-sorted by their node at the split level and
    each subtree is walked by its rows together (see _subtree_split). Each row still adds its
    nodes in path order, tree by tree, so the result does not depend on the grouping or threads.
    Runs on at most n_threads threads (fewer for small batches, see _team).
    """
    cdef Py_ssize_t n_rows = x.shape[0], block, r0, i, k, n_groups
    cdef int out_w = <int>y.shape[1], path_len = depth + 1, t
    cdef Py_ssize_t n_nodes = (<Py_ssize_t>1 << (depth + 1)) - 1
    cdef Py_ssize_t n_blocks = (n_rows + ROWS_PER_BLOCK - 1) // ROWS_PER_BLOCK
    _require(0 <= depth <= MAX_DEPTH and n_trees >= 1, "depth or n_trees out of range")
    _check_act(act)
    _check_threads(n_threads)
    n_total = n_trees * ((<object>1 << (depth + 1)) - 1)  # a Python int: cannot overflow
    _require(w_in.shape[0] == n_total and b_in.shape[0] == n_total
             and w_out_t.shape[0] == n_total,
             "w_in, b_in and w_out_t must have n_trees * (2**(depth+1) - 1) rows")
    _require(w_in.shape[1] == x.shape[1], "w_in and x must have the same width")
    _require(_rows_contiguous(w_in.shape[1], w_in.strides[1], sizeof(floating))
             and _rows_contiguous(w_out_t.shape[1], w_out_t.strides[1], sizeof(floating)),
             "the rows of w_in and w_out_t must be contiguous")
    _require(y.shape[0] == n_rows and y.shape[1] == w_out_t.shape[1], "y must be (rows, out)")
    if save_path:
        _require(visited.shape[0] == n_rows and visited.shape[1] == n_trees * (depth + 1)
                 and preact.shape[0] == n_rows and preact.shape[1] == visited.shape[1],
                 "visited and preact must be (rows, n_trees * (depth + 1))")
    cdef int split = _split_level(n_rows, depth, <int>x.shape[1], out_w, sizeof(floating))
    n_groups = (<Py_ssize_t>1 << split) if split < path_len else 0
    cdef Py_ssize_t[::1] split_node, offsets, order
    cdef Py_ssize_t* split_node_ptr = NULL
    cdef _Carry carry
    carry.coef = NULL
    carry.node = NULL
    carry.n = NULL
    carry.stride = split
    cdef floating[:, ::1] carry_coef
    cdef Py_ssize_t[:, ::1] carry_node
    cdef int[::1] carry_n
    if n_groups:  # only then: a batch of one row allocates nothing but y
        split_node = np.empty(n_rows, dtype=np.intp)
        offsets = np.zeros(n_groups + 1, dtype=np.intp)
        order = np.empty(n_rows, dtype=np.intp)
        split_node_ptr = &split_node[0]
        carry_coef = np.empty((n_rows, split), dtype=np.asarray(x).dtype)
        carry_node = np.empty((n_rows, split), dtype=np.intp)
        carry_n = np.empty(n_rows, dtype=np.intc)
        carry.coef = &carry_coef[0, 0]
        carry.node = &carry_node[0, 0]
        carry.n = &carry_n[0]
    cdef int team = _team(n_threads, n_rows,
                          <double>n_trees * path_len * (x.shape[1] + out_w))
    # Row blocks are handed out dynamically, a few at a time: a static half per thread waits
    # for a thread the OS has descheduled (another process, or BLAS workers still spinning).
    with nogil:
        if not n_groups:
            # one parallel region: each block of rows walks every tree, top to leaf; the first
            # tree's outputs overwrite y
            for block in prange(n_blocks, schedule="dynamic", chunksize=4, num_threads=team):
                r0 = block * ROWS_PER_BLOCK
                for t in range(n_trees):
                    _walk_top(x, w_in, b_in, w_out_t, act, y, visited, preact, save_path, r0,
                              <int>(min(r0 + ROWS_PER_BLOCK, n_rows) - r0), t, n_nodes,
                              path_len, path_len, NULL, carry, NO_CARRY, t == 0)
        else:
            for t in range(n_trees):
                for block in prange(n_blocks, schedule="dynamic", chunksize=4, num_threads=team):
                    _walk_top(x, w_in, b_in, w_out_t, act, y, visited, preact, save_path,
                              block * ROWS_PER_BLOCK,
                              <int>(min((block + 1) * ROWS_PER_BLOCK, n_rows) - block * ROWS_PER_BLOCK),
                              t, n_nodes, split, path_len, split_node_ptr, carry, GIVE_CARRY,
                              False)
                # counting sort of rows by subtree (rows stay ascending within one)
                for k in range(n_groups + 1):
                    offsets[k] = 0
                for i in range(n_rows):
                    offsets[split_node[i] + 1] += 1
                for k in range(n_groups):
                    offsets[k + 1] += offsets[k]
                for i in range(n_rows):
                    order[offsets[split_node[i]]] = i
                    offsets[split_node[i]] += 1
                for k in range(n_groups - 1, -1, -1):  # each cursor ended at the next start
                    offsets[k + 1] = offsets[k]
                offsets[0] = 0
                for k in prange(n_groups, schedule="dynamic", num_threads=team):
                    _walk_subtree(x, w_in, b_in, w_out_t, act, y, visited, preact, save_path,
                                  &order[0], offsets[k], offsets[k + 1],
                                  ((<Py_ssize_t>1 << split) - 1) + k, t, n_nodes, split,
                                  path_len, carry, t == 0)
    return None


cdef enum:
    BACKWARD_TERMS = 64  # terms one _axpym call adds into a dx or gradient row


cdef void _backward_row(const floating[:, ::1] dy, const floating[:, :] w_in,
                        const floating[:, :] w_out_t, const Py_ssize_t[:, ::1] visited,
                        const floating[:, ::1] preact, int act, floating[:, ::1] dx,
                        floating[:, ::1] dzs, floating[:, ::1] hs, Py_ssize_t r, Py_ssize_t v0,
                        Py_ssize_t v1) noexcept nogil:
    """Visits v0..v1 of row r (at most BACKWARD_TERMS): dz and act(z) of each into dzs and
    hs (the gradient pass reuses both), and dx[r] += sum of dz * w_in[node] in visit order
    (dx[r] = that sum for the row's first chunk, v0 == 0: no separate zeroing of dx).
    The visits' output rows are independent, so their dots run four at a time (four fetches
    in flight), and dx is loaded and stored once for all of them instead of once per visit."""
    cdef int in_w = <int>dx.shape[1], out_w = <int>dy.shape[1]
    cdef int j, n, m = 0
    cdef Py_ssize_t v
    cdef floating z[4]
    cdef floating dz
    cdef const floating* a[4]
    cdef const floating* b[4]
    cdef floating coef[BACKWARD_TERMS]
    cdef const floating* rows[BACKWARD_TERMS]
    cdef floating* dx_row = &dx[r, 0]
    for v in range(v0, v1, 4):
        n = <int>min(4, v1 - v)
        for j in range(n):
            a[j] = &w_out_t[visited[r, v + j], 0]
            b[j] = &dy[r, 0]
        _dotn(n, out_w, a, b, z, NULL)
        for j in range(n):
            dz = z[j] * _act_grad(preact[r, v + j], act)
            dzs[r, v + j] = dz
            hs[r, v + j] = _act(preact[r, v + j], act)
            if dz != 0:  # relu zeros add nothing
                coef[m] = dz
                rows[m] = &w_in[visited[r, v + j], 0]
                m = m + 1
    _axpym(1, &m, 0, in_w, coef, rows, &dx_row, v0 == 0)


cdef void _backward_node(const floating[:, ::1] x, const floating[:, ::1] dy,
                         const floating[:, ::1] dzs, const floating[:, ::1] hs,
                         const Py_ssize_t* order, Py_ssize_t i0, Py_ssize_t i1,
                         Py_ssize_t visits_per_row, floating* grad_in, floating* grad_b,
                         floating* grad_out) noexcept nogil:
    """One node's visits order[i0..i1) (flat visit ids, at most BACKWARD_TERMS, rows
    ascending): grad_in += sum of dz * x[row], grad_b += sum of dz and grad_out += sum of
    act(z) * dy[row], each added in row order, with one load and store of the gradient rows."""
    cdef int in_w = <int>x.shape[1], out_w = <int>dy.shape[1]
    cdef int m_in = 0, m_out = 0
    cdef Py_ssize_t i, v, r, col
    cdef floating dz, h
    cdef floating coef_in[BACKWARD_TERMS]
    cdef floating coef_out[BACKWARD_TERMS]
    cdef const floating* rows_in[BACKWARD_TERMS]
    cdef const floating* rows_out[BACKWARD_TERMS]
    for i in range(i0, i1):
        v = order[i]
        r = v // visits_per_row
        col = v - r * visits_per_row
        dz = dzs[r, col]
        if dz != 0:
            coef_in[m_in] = dz
            rows_in[m_in] = &x[r, 0]
            m_in = m_in + 1
            grad_b[0] += dz
        h = hs[r, col]
        if h != 0:
            coef_out[m_out] = h
            rows_out[m_out] = &dy[r, 0]
            m_out = m_out + 1
    _axpym(1, &m_in, 0, in_w, coef_in, rows_in, &grad_in, False)
    _axpym(1, &m_out, 0, out_w, coef_out, rows_out, &grad_out, False)


def _tree_shape(Py_ssize_t visits_per_row, Py_ssize_t n_total):
    """(n_trees, depth) of a forest with n_total nodes whose rows visit visits_per_row nodes
    (n_trees * (depth + 1)), or (0, -1) when no forest has that shape."""
    cdef Py_ssize_t t, levels
    # by levels (at most MAX_DEPTH + 1), not by trees: O(1) whatever visits_per_row is
    # (10**12 visit columns spun here); the shape is unique, so the order does not matter
    for levels in range(MAX_DEPTH + 1, 0, -1):
        if visits_per_row > 0 and visits_per_row % levels == 0:
            t = visits_per_row // levels
            if t * ((<object>1 << levels) - 1) == n_total:
                return t, levels - 1
    return 0, -1


def _backward_row_order(visited, Py_ssize_t n_total, int in_w, int out_w, int itemsize):
    """The order in which the dx pass takes the rows: by the node they visit (in the first
    tree) at the forward's subtree split, so that consecutive rows share the weights of their
    lower levels and find them in L2 (see _subtree_split); rows in order where there is no
    split."""
    n_rows, visits_per_row = visited.shape[0], visited.shape[1]
    n_trees, depth = _tree_shape(visits_per_row, n_total)
    split = _subtree_split(n_rows, depth, in_w, out_w, itemsize) if depth >= 0 else 0
    if depth < 0 or split > depth:
        return np.arange(n_rows, dtype=np.intp)
    return np.argsort(visited[:, split], kind="stable").astype(np.intp)


def _backward_schedule(counts, Py_ssize_t visits_per_row, Py_ssize_t n_total, Py_ssize_t n_rows,
                       Py_ssize_t row_bytes, int n_threads):
    """(nodes, tasks): the nodes with visits (counts > 0) in the order the gradient pass runs
    them, task k being nodes[tasks[k]:tasks[k+1]].

    A node's gradient rows sum the x and dy rows of the rows that visited it, so node by node
    every level re-reads all of x and dy. Instead, each tree's nodes below a split level go by
    subtree, level by level, one task per subtree: a subtree's rows' x and dy (within
    SUBTREE_BYTES) are read from L3 for its root and from L2 for the nodes below. The levels
    above the split are one task per node. Arrays not shaped like trees (n_total is not
    n_trees * (2**(depth+1) - 1) with visits_per_row = n_trees * (depth + 1)) keep one task
    per node."""
    n_trees, depth = _tree_shape(visits_per_row, n_total)
    if depth < 0:
        active = np.flatnonzero(counts)
        return active, np.arange(active.shape[0] + 1, dtype=np.intp)
    split = 0
    while split < depth and ((n_rows * row_bytes) >> split > SUBTREE_BYTES
                             or (1 << split) < 4 * n_threads):
        split += 1
    n_nodes = (1 << (depth + 1)) - 1
    subtrees = np.concatenate(  # row k: subtree k's nodes, level by level
        [np.arange((1 << level) - 1, (1 << (level + 1)) - 1).reshape(1 << split, -1)
         for level in range(split, depth + 1)], axis=1)
    local = np.concatenate([np.arange((1 << split) - 1), subtrees.ravel()])
    sizes = np.concatenate([np.ones((1 << split) - 1, np.intp),
                            np.full(1 << split, subtrees.shape[1], np.intp)])
    nodes = (np.arange(n_trees)[:, None] * n_nodes + local).ravel()
    task_of = np.repeat(np.arange(n_trees * sizes.shape[0]), np.tile(sizes, n_trees))
    visited_nodes = counts[nodes] > 0
    nodes, task_of = nodes[visited_nodes], task_of[visited_nodes]
    starts = np.flatnonzero(np.diff(task_of, prepend=-1))  # where each (nonempty) task begins
    return nodes.astype(np.intp), np.append(starts, task_of.shape[0]).astype(np.intp)


def ultra_backward(const floating[:, ::1] x, const floating[:, ::1] dy,
                   const floating[:, :] w_in, const floating[:, :] w_out_t,
                   const Py_ssize_t[:, ::1] visited, const floating[:, ::1] preact, int act,
                   floating[:, ::1] dx, floating[:, ::1] grad_w_in, floating[::1] grad_b_in,
                   floating[:, ::1] grad_w_out_t, int n_threads):
    """Hard-path backward of the neuron-tree FFF; adds into the three gradient arrays.

    Pass 1, parallel over rows: dz of every visit and dx (B, in), overwritten (_backward_row).
    Pass 2, parallel over nodes: visits are counting-sorted by node, so each gradient row is summed
    by one thread in row order (_backward_node). No atomics, no per-thread copies of the weights,
    and the result is bitwise the same for any thread count.
    """
    cdef Py_ssize_t n_rows = x.shape[0], visits_per_row = visited.shape[1]
    cdef Py_ssize_t n_visits = n_rows * visits_per_row, n_total = w_in.shape[0]
    cdef int in_w = <int>x.shape[1], out_w = <int>dy.shape[1]
    cdef Py_ssize_t r, v, g, i, k, start, stop
    _check_act(act)
    _check_threads(n_threads)
    _require(dy.shape[0] == n_rows and dx.shape[0] == n_rows and dx.shape[1] == in_w
             and visited.shape[0] == n_rows and preact.shape[0] == n_rows
             and preact.shape[1] == visits_per_row, "x, dy, dx, visited, preact: row counts")
    _require(w_in.shape[1] == in_w and w_out_t.shape[0] == n_total and w_out_t.shape[1] == out_w,
             "w_in must be (n, in) and w_out_t (n, out)")
    _require(_rows_contiguous(w_in.shape[1], w_in.strides[1], sizeof(floating))
             and _rows_contiguous(w_out_t.shape[1], w_out_t.strides[1], sizeof(floating)),
             "the rows of w_in and w_out_t must be contiguous")
    _require(grad_w_in.shape[0] == n_total and grad_w_in.shape[1] == in_w
             and grad_b_in.shape[0] == n_total and grad_w_out_t.shape[0] == n_total
             and grad_w_out_t.shape[1] == out_w, "gradients must have the parameters' shapes")
    cdef bint in_range = True
    if n_visits > 0:
        with nogil:
            in_range = _indices_below(&visited[0, 0], n_visits, n_total)
    _require(in_range, "visited holds a node index outside the tree")
    cdef int team = _team(n_threads, n_rows, 2.0 * visits_per_row * (in_w + out_w))

    dz_arr = np.empty((n_rows, visits_per_row), dtype=np.asarray(preact).dtype)
    h_arr = np.empty_like(dz_arr)
    cdef floating[:, ::1] dzs = dz_arr
    cdef floating[:, ::1] hs = h_arr
    row_order_arr = _backward_row_order(np.asarray(visited), n_total, in_w, out_w,
                                        sizeof(floating))
    cdef Py_ssize_t[::1] row_order = row_order_arr
    with nogil:
        for k in prange(n_rows, schedule="dynamic", chunksize=_ROW_CHUNK, num_threads=team):
            r = row_order[k]
            if visits_per_row == 0:  # otherwise the first _backward_row overwrites dx[r]
                memset(&dx[r, 0], 0, in_w * sizeof(floating))
            v = 0
            while v < visits_per_row:
                _backward_row(dy, w_in, w_out_t, visited, preact, act, dx, dzs, hs, r, v,
                              min(v + BACKWARD_TERMS, visits_per_row))
                v = v + BACKWARD_TERMS

    # Counting sort of visits by node: offsets[g]..offsets[g+1] index into `order` (flat visit
    # ids, ascending, hence rows in order within each node).
    offsets_arr = np.zeros(n_total + 1, dtype=np.intp)
    order_arr = np.empty(n_visits, dtype=np.intp)
    cdef Py_ssize_t[::1] offsets = offsets_arr
    cdef Py_ssize_t[::1] order = order_arr
    cdef const Py_ssize_t* flat_visited = &visited[0, 0] if n_visits > 0 else NULL
    with nogil:
        for i in range(n_visits):
            offsets[flat_visited[i] + 1] += 1
        for g in range(n_total):
            offsets[g + 1] += offsets[g]
    # Pass 2's tasks: runs of nodes (only those some row visited), see _backward_schedule
    nodes_arr, tasks_arr = _backward_schedule(np.diff(offsets_arr), visits_per_row, n_total,
                                              n_rows, (in_w + out_w) * sizeof(floating),
                                              team)
    cdef Py_ssize_t[::1] nodes = nodes_arr
    cdef Py_ssize_t[::1] tasks = tasks_arr
    cdef Py_ssize_t n_tasks = tasks.shape[0] - 1, j
    cursor_arr = offsets_arr[:n_total].copy()
    cdef Py_ssize_t[::1] cursor = cursor_arr
    with nogil:
        for i in range(n_visits):
            g = flat_visited[i]
            order[cursor[g]] = i
            cursor[g] += 1
        for k in prange(n_tasks, schedule="dynamic", num_threads=team):
            for j in range(tasks[k], tasks[k + 1]):
                g = nodes[j]
                start = offsets[g]
                while start < offsets[g + 1]:
                    stop = min(start + BACKWARD_TERMS, offsets[g + 1])
                    _backward_node(x, dy, dzs, hs, &order[0], start, stop,
                                   visits_per_row, &grad_w_in[g, 0], &grad_b_in[g],
                                   &grad_w_out_t[g, 0])
                    start = stop
    return None


# ---------------------------------------------------------------------------------------------
# Router-leaf FFF (Belcak & Wattenhofer, "Fast Feedforward Networks"; the `fastfeedforward` package)
#
# n_nodes = 2**depth - 1 routers in heap order (children of n: 2n+1 left, 2n+2 right) and
# n_leaves = 2**depth leaf MLPs; leaf l is heap index n_nodes + l. Internal layouts, one
# contiguous row per visited unit: node_w (n_nodes, in), node_b (n_nodes,), w1t (n_leaves, leaf, in)
# (the package's w1s transposed), b1 (n_leaves, leaf), w2 (n_leaves, leaf, out), b2 (n_leaves, out).
# A leaf hidden unit whose activation (after dropout) is 0 skips its output row: relu zeros are
# common.
#
# Row loops hand out chunks of _ROW_CHUNK rows dynamically rather than one static half per
# thread: on a small shared machine one thread is often descheduled (another process, or BLAS
# workers still spinning after a NumPy GEMM), and a static split then waits for it. A batch of
# one chunk runs on one thread.
#
# `q` is a router's right-child weight after region leak: sigmoid(z), or 1 - sigmoid(z) where the
# leak swapped the children for that row; q * (1 - q) = p * (1 - p) either way.



cdef inline floating _sigmoid(floating z) noexcept nogil:
    if floating is float:
        return 1 / (1 + expf(-z))
    else:
        return 1 / (1 + exp(-z))


cdef inline floating _clamp_prob(floating v, bint* inside) noexcept nogil:
    """v clamped to [eps, 1 - eps], eps = 1e-6 as in the package's compute_entropy_safe; inside
    is False where the clamp cut (torch passes no gradient there)."""
    cdef floating eps = <floating>1e-6
    cdef floating top = 1 - eps
    inside[0] = True
    if v < eps:
        inside[0] = False
        return eps
    if v > top:
        inside[0] = False
        return top
    return v


cdef inline floating _log(floating v) noexcept nogil:
    if floating is float:
        return logf(v)
    else:
        return log(v)


cdef inline floating _entropy(floating q, floating* dh_dq) noexcept nogil:
    """The package's clamped Bernoulli entropy -p log p - m log m, p = clamp(q), m = clamp(1 - q),
    and its derivative in q (written to dh_dq, which may be NULL)."""
    cdef bint in_p, in_m
    cdef floating p = _clamp_prob(q, &in_p)
    cdef floating m = _clamp_prob(1 - q, &in_m)
    cdef floating lp = _log(p), lm = _log(m), d = 0
    if dh_dq != NULL:
        if in_p:
            d = d - (lp + 1)
        if in_m:
            d = d + (lm + 1)
        dh_dq[0] = d
    return -p * lp - m * lm


cdef inline void _leaf_row(int in_w, int leaf_w, int out_w, const floating* x,
                           const floating* w1t_l, const floating* b1_l,
                           const floating* w2_l, const floating* b2_l, int act,
                           const floating* drop, floating* hpre, floating* y) noexcept nogil:
    """y = act(w1t_l @ x + b1_l) * drop @ w2_l + b2_l for one row and one leaf; the hidden
    pre-activations go to hpre unless it is NULL, no dropout where drop is NULL."""
    cdef int j
    cdef floating h, a
    memcpy(y, b2_l, out_w * sizeof(floating))
    for j in range(leaf_w):
        h = _dot(in_w, w1t_l + <Py_ssize_t>j * in_w, x) + b1_l[j]
        if hpre != NULL:
            hpre[j] = h
        a = _act(h, act)
        if drop != NULL:
            a = a * drop[j]
        if a != 0:
            _axpy(out_w, a, w2_l + <Py_ssize_t>j * out_w, y)


cdef enum:
    LEAF_CHUNK = 64  # leaf neurons whose hidden values one block of rows keeps at a time

# _dot_block's tile: 4 rows x 4 leaf neurons where the CPU has 32 vector registers, else 2 x 2
# (more would spill); a row's result is the same either way.
cdef int _TILE = 4 if fastff_wide_registers() else 2


def _set_leaf_tile(int tile):
    """Test hook: force the leaf tile (2 or 4), to check both give the same results; returns
    the previous one."""
    global _TILE
    _require(tile == 2 or tile == 4, "the leaf tile is 2 or 4")
    previous, _TILE = _TILE, tile
    return previous


cdef inline int _tiled_dots(int nr, int n_units, int in_w, const floating** x_rows,
                            const floating* w, floating* out, int out_stride,
                            const floating** next_rows, int n_next) noexcept nogil:
    """out[r * out_stride + j] = dot(x_rows[r], w[j * in_w:]) for r < nr <= ROWS_PER_BLOCK and
    j < n_units, in _TILE x _TILE register-blocked tiles; tile call k fetches next_rows[k] (for
    k < n_next) meanwhile. Returns the number of tile calls."""
    cdef int r0 = 0, j, n_calls = 0
    while r0 < nr:
        j = 0
        while j < n_units:
            _dot_block(min(_TILE, nr - r0), min(_TILE, n_units - j), in_w, &x_rows[r0],
                       w + <Py_ssize_t>j * in_w, in_w, &out[r0 * out_stride + j], out_stride,
                       next_rows[n_calls] if n_calls < n_next else NULL)
            n_calls = n_calls + 1
            j = j + _TILE
        r0 = r0 + _TILE
    return n_calls


cdef inline void _route_rows(int nr, int depth, int in_w, const floating** x_rows,
                             const floating* node_w, const floating* node_b,
                             Py_ssize_t* leaf, const floating** next_rows,
                             int n_next) noexcept nogil:
    """The leaves nr <= ROWS_PER_BLOCK rows reach at inference (right at node n iff its logit
    is >= 0), walking the routers in lockstep.

    The first two levels take the logits of all three of their routers from the register-
    blocked _dot_block: each x vector loaded serves three routers, where level-by-level dots
    load an x and a router vector per FMA (routing is load-bound; a third of the logits go
    unused). Below that, every row needs its own router. Each of these dot calls requests
    one of the n_next rows next_rows (the caller's next block) meanwhile."""
    cdef Py_ssize_t node[ROWS_PER_BLOCK]
    cdef const floating* w_rows[ROWS_PER_BLOCK]
    cdef floating z[ROWS_PER_BLOCK]
    cdef floating top[ROWS_PER_BLOCK * 3]
    cdef int level, i, top_levels = min(depth, 2), n_calls = 0
    cdef int n_top = (1 << top_levels) - 1
    for i in range(nr):
        node[i] = 0
    if top_levels:
        n_calls = _tiled_dots(nr, n_top, in_w, x_rows, node_w, top, 3, next_rows, n_next)
        for level in range(top_levels):
            for i in range(nr):
                node[i] = 2 * node[i] + 1 + (top[i * 3 + node[i]] + node_b[node[i]] >= 0)
    for level in range(top_levels, depth):
        for i in range(nr):
            w_rows[i] = node_w + node[i] * in_w
        _dotn(nr, in_w, w_rows, x_rows, z, next_rows[n_calls] if n_calls < n_next else NULL)
        n_calls = n_calls + 1
        for i in range(nr):
            node[i] = 2 * node[i] + 1 + (z[i] + node_b[node[i]] >= 0)
    for i in range(nr):
        leaf[i] = node[i] - ((<Py_ssize_t>1 << depth) - 1)


cdef inline void _leaf_rows(int nr, int in_w, int leaf_w, int out_w, const floating** x_rows,
                            const floating* w1t_l, const floating* b1_l, const floating* w2_l,
                            const floating* b2_l, int act, floating** y_rows,
                            const floating** next_rows, int n_next) noexcept nogil:
    """y[r] = act(w1t_l @ x[r] + b1_l) @ w2_l + b2_l for nr <= ROWS_PER_BLOCK rows that share
    one leaf: the hidden units come from the register-blocked _dot_block, LEAF_CHUNK at a time.
    Meanwhile the n_next rows next_rows (the caller's next block) are fetched, one per tile."""
    cdef floating h[ROWS_PER_BLOCK * LEAF_CHUNK]
    cdef floating a
    cdef int j0, j, width, r, n
    # per row: the chunk's nonzero activations and their output rows, added by one _axpym
    cdef floating coef[ROWS_PER_BLOCK * LEAF_CHUNK]
    cdef const floating* out_rows[ROWS_PER_BLOCK * LEAF_CHUNK]
    cdef int n_terms[ROWS_PER_BLOCK]
    for r in range(nr):
        memcpy(y_rows[r], b2_l, out_w * sizeof(floating))
    j0 = 0
    while j0 < leaf_w:
        width = min(LEAF_CHUNK, leaf_w - j0)
        # the first chunk's tiles fetch the next block's rows
        _tiled_dots(nr, width, in_w, x_rows, w1t_l + <Py_ssize_t>j0 * in_w, h, LEAF_CHUNK,
                    next_rows, n_next if j0 == 0 else 0)
        for r in range(nr):
            for j in range(width):
                h[r * LEAF_CHUNK + j] = _act(h[r * LEAF_CHUNK + j] + b1_l[j0 + j], act)
            # Branch-free compaction of the nonzero units: each is written, and a zero (relu's
            # half of the units, at random) is then overwritten. Testing the activation in
            # the same loop compiles to a branch that mispredicts for half the units.
            n = 0
            for j in range(width):
                a = h[r * LEAF_CHUNK + j]
                coef[r * LEAF_CHUNK + n] = a
                out_rows[r * LEAF_CHUNK + n] = w2_l + <Py_ssize_t>(j0 + j) * out_w
                n = n + (a != 0)
            n_terms[r] = n
        _axpym(nr, n_terms, LEAF_CHUNK, out_w, coef, out_rows, y_rows, False)
        j0 = j0 + width


cdef void _infer_rows(const floating[:, ::1] x, const floating* node_w, const floating* node_b,
                      const floating[:, :, ::1] w1t, const floating[:, ::1] b1,
                      const floating[:, :, ::1] w2, const floating[:, ::1] b2, int depth,
                      int act, floating[:, ::1] y, Py_ssize_t r0, int nr) noexcept nogil:
    """Rows r0..r0+nr (nr <= ROWS_PER_BLOCK): route together, then each evaluates its leaf."""
    cdef Py_ssize_t leaves[ROWS_PER_BLOCK]
    cdef const floating* x_rows[ROWS_PER_BLOCK]
    cdef floating* y_rows[ROWS_PER_BLOCK]
    cdef int in_w = <int>x.shape[1], leaf_w = <int>w1t.shape[1], out_w = <int>y.shape[1], j
    cdef Py_ssize_t l
    for j in range(nr):
        x_rows[j] = &x[r0 + j, 0]
        y_rows[j] = &y[r0 + j, 0]
    _route_rows(nr, depth, in_w, x_rows, node_w, node_b, leaves, NULL, 0)
    for j in range(nr):
        l = leaves[j]
        _leaf_rows(1, in_w, leaf_w, out_w, &x_rows[j], &w1t[l, 0, 0], &b1[l, 0], &w2[l, 0, 0],
                   &b2[l, 0], act, &y_rows[j], NULL, 0)


cdef void _route_block(const floating[:, ::1] x, const floating* node_w,
                       const floating* node_b, int depth, Py_ssize_t r0, int nr,
                       Py_ssize_t* leaf) noexcept nogil:
    """leaf[0..nr) = the leaves of rows r0..r0+nr (nr <= ROWS_PER_BLOCK)."""
    cdef const floating* x_rows[ROWS_PER_BLOCK]
    cdef const floating* next_rows[ROWS_PER_BLOCK]
    cdef int j, n_next = <int>min(ROWS_PER_BLOCK, x.shape[0] - r0 - nr)
    for j in range(nr):
        x_rows[j] = &x[r0 + j, 0]
    for j in range(n_next):  # the next block: rows from DRAM, the first touch of each
        next_rows[j] = &x[r0 + nr + j, 0]
    _route_rows(nr, depth, <int>x.shape[1], x_rows, node_w, node_b, leaf, next_rows, n_next)


cdef void _leaf_block(const floating[:, ::1] x, const floating[:, :, ::1] w1t,
                      const floating[:, ::1] b1, const floating[:, :, ::1] w2,
                      const floating[:, ::1] b2, int act, floating[:, ::1] y,
                      const Py_ssize_t* order, const Py_ssize_t* leaf, Py_ssize_t i,
                      Py_ssize_t n_rows) noexcept nogil:
    """The rows order[i], order[i+1], ... (up to ROWS_PER_BLOCK, while they share a leaf)
    evaluate their leaf together."""
    cdef const floating* x_rows[ROWS_PER_BLOCK]
    cdef floating* y_rows[ROWS_PER_BLOCK]
    cdef Py_ssize_t l = leaf[order[i]]
    cdef int nr = 0
    while nr < ROWS_PER_BLOCK and i + nr < n_rows and leaf[order[i + nr]] == l:
        x_rows[nr] = &x[order[i + nr], 0]
        y_rows[nr] = &y[order[i + nr], 0]
        nr = nr + 1
    # The next block starts at row order[i + nr]: its rows come in leaf order, which the
    # hardware prefetchers cannot foresee, and the first tile would wait for them from L3.
    cdef const floating* next_rows[ROWS_PER_BLOCK]
    cdef int n_next = 0
    while n_next < ROWS_PER_BLOCK and i + nr + n_next < n_rows:
        next_rows[n_next] = &x[order[i + nr + n_next], 0]
        n_next = n_next + 1
    _leaf_rows(nr, <int>x.shape[1], <int>w1t.shape[1], <int>y.shape[1], x_rows, &w1t[l, 0, 0],
               &b1[l, 0], &w2[l, 0, 0], &b2[l, 0], act, y_rows, next_rows, n_next)


def fff_infer(const floating[:, ::1] x, const floating[:, ::1] node_w,
              const floating[::1] node_b, const floating[:, :, ::1] w1t,
              const floating[:, ::1] b1, const floating[:, :, ::1] w2, const floating[:, ::1] b2,
              int depth, int act, floating[:, ::1] y, int n_threads):
    """Hard inference: each row goes right at node n iff x @ node_w[n] + node_b[n] >= 0 (the
    package's eval_forward), then evaluates only the reached leaf. y (B, out) is overwritten.
    O(depth * in + leaf * (in + out)) per row.

    Rows are routed ROWS_PER_BLOCK at a time. A batch with rows to spare per leaf then
    evaluates the leaves with the rows counting-sorted by leaf, in blocks of rows that share
    one leaf, so each leaf weight loaded serves several rows; smaller batches evaluate each
    row's leaf as they go. Every row's arithmetic is the same either way.
    """
    cdef Py_ssize_t n_rows = x.shape[0], n_leaves = w1t.shape[0], r, k, l, b, n_blocks
    cdef int leaf_w = <int>w1t.shape[1], out_w = <int>y.shape[1]
    _check_act(act)
    _check_fff_weights(depth, x.shape[1], y.shape[1], node_w, w1t, w2)
    _require(node_b.shape[0] == node_w.shape[0] and b1.shape[0] == w1t.shape[0]
             and b1.shape[1] == leaf_w and b2.shape[0] == w1t.shape[0] and b2.shape[1] == out_w
             and y.shape[0] == n_rows, "node_b, b1, b2 and y must match the weights")
    _check_threads(n_threads)
    cdef int team = _team(n_threads, n_rows,
                          <double>depth * x.shape[1] + <double>leaf_w * (x.shape[1] + out_w))
    cdef const floating* nw = &node_w[0, 0] if depth > 0 else NULL
    cdef const floating* nb = &node_b[0] if depth > 0 else NULL
    cdef Py_ssize_t n_row_blocks = (n_rows + ROWS_PER_BLOCK - 1) // ROWS_PER_BLOCK
    if n_rows < 2 * n_leaves:
        with nogil:
            for b in prange(n_row_blocks, schedule="dynamic", chunksize=4, num_threads=team):
                _infer_rows(x, nw, nb, w1t, b1, w2, b2, depth, act, y, b * ROWS_PER_BLOCK,
                            <int>min(ROWS_PER_BLOCK, n_rows - b * ROWS_PER_BLOCK))
        return None
    leaf_arr = np.empty(n_rows, dtype=np.intp)
    order_arr = np.empty(n_rows, dtype=np.intp)
    offsets_arr = np.zeros(n_leaves + 1, dtype=np.intp)
    block_arr = np.empty(n_rows // ROWS_PER_BLOCK + 1 + n_leaves, dtype=np.intp)  # block starts
    cdef Py_ssize_t[::1] leaf = leaf_arr
    cdef Py_ssize_t[::1] order = order_arr
    cdef Py_ssize_t[::1] offsets = offsets_arr
    cdef Py_ssize_t[::1] block_start = block_arr
    with nogil:
        for b in prange(n_row_blocks, schedule="dynamic", chunksize=4, num_threads=team):
            _route_block(x, nw, nb, depth, b * ROWS_PER_BLOCK,
                         <int>min(ROWS_PER_BLOCK, n_rows - b * ROWS_PER_BLOCK),
                         &leaf[b * ROWS_PER_BLOCK])
        # counting sort by leaf; blocks of up to ROWS_PER_BLOCK rows that share a leaf
        for r in range(n_rows):
            offsets[leaf[r] + 1] += 1
        n_blocks = 0
        for l in range(n_leaves):
            k = offsets[l]
            while k < offsets[l] + offsets[l + 1]:
                block_start[n_blocks] = k
                n_blocks = n_blocks + 1
                k = k + ROWS_PER_BLOCK
            offsets[l + 1] += offsets[l]
        for r in range(n_rows):
            order[offsets[leaf[r]]] = r
            offsets[leaf[r]] += 1
        # chunks of blocks: a block prefetches the next one's rows, best done by the same thread
        for b in prange(n_blocks, schedule="dynamic", chunksize=16, num_threads=team):
            _leaf_block(x, w1t, b1, w2, b2, act, y, &order[0], &leaf[0], block_start[b], n_rows)
    return None


# ---- soft (mixture) training: the router part; the leaves are GEMMs in fastff/ops.py ---------

cdef inline floating _soft_mixture_row(Py_ssize_t n_nodes, const floating* z,
                                       const unsigned char* swap, floating* q,
                                       floating* reach) noexcept nogil:
    """Right weights q and reach weights (heap order, n_nodes + n_leaves) of one row; returns the
    row's summed node entropy."""
    cdef Py_ssize_t n
    cdef floating p, total = 0
    reach[0] = 1
    for n in range(n_nodes):
        p = _sigmoid(z[n])
        if swap != NULL and swap[n]:
            p = 1 - p
        q[n] = p
        total = total + _entropy(p, <floating*>NULL)
        reach[2 * n + 1] = reach[n] * (1 - p)
        reach[2 * n + 2] = reach[n] * p
    return total


def fff_soft_mixture(const floating[:, ::1] z, const unsigned char[:, ::1] swap, bint has_swap,
                     floating[:, ::1] q, floating[:, ::1] reach, floating[::1] entropy,
                     int n_threads):
    """Router logits z (B, n_nodes) -> right weights q (B, n_nodes), reach (B, n_nodes +
    n_leaves) = product of the branch weights from the root (the last n_leaves columns are the
    leaf mixture), entropy (B,) = summed node entropies of each row. swap (B, n_nodes) marks
    the region-leak swaps (has_swap False: none)."""
    cdef Py_ssize_t n_rows = z.shape[0], n_nodes = z.shape[1], r
    _require(q.shape[0] == n_rows and q.shape[1] == n_nodes and reach.shape[0] == n_rows
             and reach.shape[1] == 2 * n_nodes + 1 and entropy.shape[0] == n_rows,
             "q must be (rows, n_nodes), reach (rows, 2 * n_nodes + 1), entropy (rows,)")
    _require(not has_swap or (swap.shape[0] == n_rows and swap.shape[1] == n_nodes),
             "swap must be (rows, n_nodes)")
    _check_threads(n_threads)
    # a sigmoid, a log-based entropy and two products per node: ~32 multiply-adds' worth
    cdef int team = _team(n_threads, n_rows, 32.0 * n_nodes)
    with nogil:
        for r in prange(n_rows, schedule="dynamic", chunksize=_ROW_CHUNK, num_threads=team):
            entropy[r] = _soft_mixture_row(
                n_nodes, &z[r, 0] if n_nodes > 0 else NULL,
                &swap[r, 0] if has_swap and n_nodes > 0 else NULL,
                &q[r, 0] if n_nodes > 0 else NULL, &reach[r, 0])
    return None


cdef inline floating _soft_router_row(Py_ssize_t n_nodes, Py_ssize_t n_leaves,
                                      const floating* dmix, const floating* q,
                                      const floating* reach, const unsigned char* swap,
                                      floating entropy_weight, floating* dreach,
                                      floating* dz) noexcept nogil:
    """Backward of _soft_mixture_row: from d(objective)/d(mixture) to dz (n_nodes,), bottom up
    through the products; entropy_weight * d(entropy)/dz is added (the hardening loss)."""
    cdef Py_ssize_t n
    cdef floating qn, left, right, g, dh_dq, slope
    memcpy(dreach + n_nodes, dmix, n_leaves * sizeof(floating))
    for n in range(n_nodes - 1, -1, -1):
        qn = q[n]
        left = dreach[2 * n + 1]
        right = dreach[2 * n + 2]
        g = reach[n] * (right - left)
        if entropy_weight != 0:
            _entropy(qn, &dh_dq)
            g = g + entropy_weight * dh_dq
        slope = qn * (1 - qn)  # dp/dz of the sigmoid; a swap flips the sign of dq/dp
        if swap != NULL and swap[n]:
            slope = -slope
        dz[n] = g * slope
        dreach[n] = left * (1 - qn) + right * qn
    return 0


def fff_soft_router_backward(const floating[:, ::1] dmix, const floating[:, ::1] q,
                             const floating[:, ::1] reach, const unsigned char[:, ::1] swap,
                             bint has_swap, double entropy_weight, floating[:, ::1] dreach,
                             floating[:, ::1] dz, int n_threads):
    """dmix (B, n_leaves) -> dz (B, n_nodes), overwritten; dreach (B, n_nodes + n_leaves) is
    scratch. entropy_weight multiplies each node's entropy gradient (hardening / (B * n_nodes)
    for a mean-entropy loss)."""
    cdef Py_ssize_t n_rows = dmix.shape[0], n_leaves = dmix.shape[1], n_nodes = q.shape[1], r
    cdef floating w = <floating>entropy_weight
    _require(n_leaves == n_nodes + 1 and q.shape[0] == n_rows and reach.shape[0] == n_rows
             and reach.shape[1] == n_nodes + n_leaves and dreach.shape[0] == n_rows
             and dreach.shape[1] == reach.shape[1] and dz.shape[0] == n_rows
             and dz.shape[1] == n_nodes,
             "dmix (rows, n_nodes + 1), q and dz (rows, n_nodes), reach and dreach "
             "(rows, 2 * n_nodes + 1)")
    _require(not has_swap or (swap.shape[0] == n_rows and swap.shape[1] == n_nodes),
             "swap must be (rows, n_nodes)")
    _check_threads(n_threads)
    if n_nodes == 0:
        return None
    cdef int team = _team(n_threads, n_rows, 32.0 * n_nodes)
    with nogil:
        for r in prange(n_rows, schedule="dynamic", chunksize=_ROW_CHUNK, num_threads=team):
            _soft_router_row(n_nodes, n_leaves, &dmix[r, 0], &q[r, 0], &reach[r, 0],
                             &swap[r, 0] if has_swap else NULL, w, &dreach[r, 0], &dz[r, 0])
    return None


def fff_soft_leaf_activate(floating[:, ::1] hpre, const floating[:, ::1] b1,
                           const floating[:, ::1] mix, const floating[:, ::1] drop,
                           bint has_drop, int act, floating[:, ::1] a, floating[:, ::1] mixed,
                           int n_threads):
    """Leaf hidden units of all leaves, column k = l * leaf + j: hpre (B, n_leaves * leaf) +=
    b1 (n_leaves, leaf) in place; a = act(hpre) * drop (dropout keep mask with its 1/(1-rate)
    scale); mixed = a * mix[:, l] (mix (B, n_leaves))."""
    cdef Py_ssize_t n_rows = hpre.shape[0], n_leaves = b1.shape[0], r, l, k
    cdef int leaf_w = <int>b1.shape[1], j
    cdef floating h, v, m
    _check_act(act)
    _require(hpre.shape[1] == n_leaves * b1.shape[1] and mix.shape[0] == n_rows
             and mix.shape[1] == n_leaves and a.shape[0] == n_rows and a.shape[1] == hpre.shape[1]
             and mixed.shape[0] == n_rows and mixed.shape[1] == hpre.shape[1],
             "hpre, a and mixed must be (rows, n_leaves * leaf), mix (rows, n_leaves)")
    _require(not has_drop or (drop.shape[0] == n_rows and drop.shape[1] == hpre.shape[1]),
             "drop must be (rows, n_leaves * leaf)")
    _check_threads(n_threads)
    # per hidden unit an activation (GELU: an erf) and a few products
    cdef int team = _team(n_threads, n_rows, (16.0 if act == ACT_GELU else 4.0) * hpre.shape[1])
    with nogil:
        for r in prange(n_rows, schedule="dynamic", chunksize=_ROW_CHUNK, num_threads=team):
            for l in range(n_leaves):
                m = mix[r, l]
                for j in range(leaf_w):
                    k = l * leaf_w + j
                    h = hpre[r, k] + b1[l, j]
                    hpre[r, k] = h
                    v = _act(h, act)
                    if has_drop:
                        v = v * drop[r, k]
                    a[r, k] = v
                    mixed[r, k] = v * m
    return None


def fff_soft_leaf_backward(const floating[:, ::1] hpre, const floating[:, ::1] a,
                           floating[:, ::1] g, const floating[:, ::1] mix,
                           const floating[:, ::1] drop, bint has_drop, int act,
                           floating[:, ::1] dmix, int n_threads):
    """g (B, K) = dy @ w2^T on entry (the gradient of each unmixed hidden unit's output) becomes
    the pre-activation gradient mix * g * drop * act'(hpre); dmix (B, n_leaves), holding
    dy @ b2^T on entry, gets each leaf's sum of a * g added (d objective / d mixture weight)."""
    cdef Py_ssize_t n_rows = hpre.shape[0], n_leaves = mix.shape[1], r, l, k
    _check_act(act)
    _require(n_leaves >= 1 and hpre.shape[1] % n_leaves == 0, "mix must be (rows, n_leaves >= 1)")
    cdef int leaf_w = <int>(hpre.shape[1] // n_leaves), j
    cdef floating s, m, d
    _require(mix.shape[0] == n_rows and a.shape[0] == n_rows and a.shape[1] == hpre.shape[1]
             and g.shape[0] == n_rows and g.shape[1] == hpre.shape[1]
             and dmix.shape[0] == n_rows and dmix.shape[1] == n_leaves,
             "hpre, a and g must be (rows, n_leaves * leaf), mix and dmix (rows, n_leaves)")
    _require(not has_drop or (drop.shape[0] == n_rows and drop.shape[1] == hpre.shape[1]),
             "drop must be (rows, n_leaves * leaf)")
    _check_threads(n_threads)
    cdef int team = _team(n_threads, n_rows, (16.0 if act == ACT_GELU else 4.0) * hpre.shape[1])
    with nogil:
        for r in prange(n_rows, schedule="dynamic", chunksize=_ROW_CHUNK, num_threads=team):
            for l in range(n_leaves):
                s = 0
                m = mix[r, l]
                for j in range(leaf_w):
                    k = l * leaf_w + j
                    s = s + a[r, k] * g[r, k]
                    d = m * g[r, k] * _act_grad(hpre[r, k], act)
                    if has_drop:
                        d = d * drop[r, k]
                    g[r, k] = d
                dmix[r, l] = dmix[r, l] + s
    return None


# ---- hardened training: one path and one leaf per row -----------------------------------------

cdef inline floating _hard_train_row(int depth, int in_w, int leaf_w, int out_w,
                                     const floating* x, const floating* node_w,
                                     const floating* node_b, const floating* w1t,
                                     const floating* b1, const floating* w2, const floating* b2,
                                     int act, const unsigned char* swap, const floating* drop,
                                     Py_ssize_t* path, floating* z_path, Py_ssize_t* leaf,
                                     floating* hpre, floating* y) noexcept nogil:
    """Walk one row down its rounded decisions, record the path and logits, evaluate the leaf;
    returns the summed entropy of the visited nodes. w1t, b1, w2, b2 point at leaf 0."""
    cdef Py_ssize_t node = 0, n_nodes = (<Py_ssize_t>1 << depth) - 1, l
    cdef int level
    cdef floating z, q, total = 0
    cdef bint swapped
    for level in range(depth):
        z = _dot(in_w, node_w + node * in_w, x) + node_b[node]
        swapped = swap != NULL and swap[level]
        q = _sigmoid(z)
        if swapped:
            q = 1 - q
        total = total + _entropy(q, <floating*>NULL)
        path[level] = node
        z_path[level] = z
        # torch.round(q) of the package, exactly: right iff q > 1/2 (a tie, z == 0, goes left)
        node = 2 * node + 1 + ((z < 0) if swapped else (z > 0))
    l = node - n_nodes
    leaf[0] = l
    _leaf_row(in_w, leaf_w, out_w, x, w1t + l * leaf_w * in_w, b1 + l * leaf_w,
              w2 + l * leaf_w * out_w, b2 + l * out_w, act, drop, hpre, y)
    return total


def fff_hard_train_forward(const floating[:, ::1] x, const floating[:, ::1] node_w,
                           const floating[::1] node_b, const floating[:, :, ::1] w1t,
                           const floating[:, ::1] b1, const floating[:, :, ::1] w2,
                           const floating[:, ::1] b2, int depth, int act,
                           const unsigned char[:, ::1] swap, bint has_swap,
                           const floating[:, ::1] drop, bint has_drop,
                           floating[:, ::1] y, Py_ssize_t[:, ::1] path, floating[:, ::1] z_path,
                           Py_ssize_t[::1] leaf, floating[:, ::1] hpre, floating[::1] entropy,
                           int n_threads):
    """Hardened training forward (train_hardened): decisions rounded, right iff the (possibly
    swapped) right weight q > 1/2. Writes y (B, out), path (B, depth) node ids, z_path
    (B, depth) their logits, leaf (B,), hpre (B, leaf) and entropy (B,) summed over the
    visited nodes. swap (B, depth) is per level: one visit per level."""
    cdef Py_ssize_t n_rows = x.shape[0], r
    cdef int in_w = <int>x.shape[1], leaf_w = <int>w1t.shape[1], out_w = <int>y.shape[1]
    _check_act(act)
    _check_fff_weights(depth, in_w, out_w, node_w, w1t, w2)
    _require(node_b.shape[0] == node_w.shape[0] and b1.shape[0] == w1t.shape[0]
             and b1.shape[1] == leaf_w and b2.shape[0] == w1t.shape[0] and b2.shape[1] == out_w
             and y.shape[0] == n_rows, "node_b, b1, b2 and y must match the weights")
    _require(path.shape[0] == n_rows and path.shape[1] == depth and z_path.shape[0] == n_rows
             and z_path.shape[1] == depth and leaf.shape[0] == n_rows
             and hpre.shape[0] == n_rows and hpre.shape[1] == leaf_w
             and entropy.shape[0] == n_rows,
             "path and z_path must be (rows, depth), leaf and entropy (rows,), hpre (rows, leaf)")
    _require(not has_swap or (swap.shape[0] == n_rows and swap.shape[1] == depth),
             "swap must be (rows, depth)")
    _require(not has_drop or (drop.shape[0] == n_rows and drop.shape[1] == leaf_w),
             "drop must be (rows, leaf)")
    _check_threads(n_threads)
    cdef const floating* nw = &node_w[0, 0] if depth > 0 else NULL
    cdef const floating* nb = &node_b[0] if depth > 0 else NULL
    cdef int team = _team(n_threads, n_rows,
                          <double>depth * in_w + <double>leaf_w * (in_w + out_w))
    with nogil:
        for r in prange(n_rows, schedule="dynamic", chunksize=_ROW_CHUNK, num_threads=team):
            entropy[r] = _hard_train_row(
                depth, in_w, leaf_w, out_w, &x[r, 0], nw, nb, &w1t[0, 0, 0], &b1[0, 0],
                &w2[0, 0, 0], &b2[0, 0], act,
                &swap[r, 0] if has_swap and depth > 0 else NULL,
                &drop[r, 0] if has_drop else NULL,
                &path[r, 0] if depth > 0 else NULL, &z_path[r, 0] if depth > 0 else NULL,
                &leaf[r], &hpre[r, 0], &y[r, 0])
    return None


def _group_rows(keys, Py_ssize_t n_keys):
    """Counting sort of `keys` (n,) in 0..n_keys-1: (order, offsets, active). order lists the
    positions key by key, ascending within a key, so per-key sums run in a fixed order whatever
    the thread count; active lists the keys that occur."""
    keys = np.asarray(keys).reshape(-1)
    order = np.argsort(keys, kind="stable").astype(np.intp)
    offsets = np.zeros(n_keys + 1, dtype=np.intp)
    np.cumsum(np.bincount(keys, minlength=n_keys), out=offsets[1:])
    active = np.flatnonzero(np.diff(offsets)).astype(np.intp)
    return order, offsets, active


cdef inline floating _hard_backward_row(int depth, int in_w, int leaf_w, int out_w,
                                        const floating* dy, const floating* node_w,
                                        const floating* w1t_l, const floating* w2_l,
                                        const Py_ssize_t* path, const floating* z_path,
                                        const unsigned char* swap, const floating* drop,
                                        const floating* hpre, int act, floating entropy_weight,
                                        floating* dh, floating* dz, floating* dx) noexcept nogil:
    """Per-row part of the hardened backward: leaf pre-activation gradients dh (leaf,), router
    logit gradients dz (depth,) from the entropy term only (rounding passes no gradient), and dx."""
    cdef int j, level
    cdef floating d, q, dh_dq, slope
    cdef bint swapped
    memset(dx, 0, in_w * sizeof(floating))
    for j in range(leaf_w):
        d = _dot(out_w, dy, w2_l + <Py_ssize_t>j * out_w) * _act_grad(hpre[j], act)
        if drop != NULL:
            d = d * drop[j]
        dh[j] = d
        if d != 0:
            _axpy(in_w, d, w1t_l + <Py_ssize_t>j * in_w, dx)
    if entropy_weight != 0:
        for level in range(depth):
            swapped = swap != NULL and swap[level]
            q = _sigmoid(z_path[level])
            if swapped:
                q = 1 - q
            _entropy(q, &dh_dq)
            slope = q * (1 - q)
            if swapped:
                slope = -slope
            d = entropy_weight * dh_dq * slope
            dz[level] = d
            if d != 0:
                _axpy(in_w, d, node_w + path[level] * in_w, dx)
    return 0


def fff_hard_train_backward(const floating[:, ::1] x, const floating[:, ::1] dy,
                            const floating[:, ::1] node_w, const floating[:, :, ::1] w1t,
                            const floating[:, :, ::1] w2, const Py_ssize_t[:, ::1] path,
                            const floating[:, ::1] z_path, const Py_ssize_t[::1] leaf,
                            const unsigned char[:, ::1] swap, bint has_swap,
                            const floating[:, ::1] drop, bint has_drop,
                            const floating[:, ::1] hpre, int act, double entropy_weight,
                            floating[:, ::1] dx, floating[:, ::1] grad_node_w,
                            floating[::1] grad_node_b, floating[:, :, ::1] grad_w1t,
                            floating[:, ::1] grad_b1, floating[:, :, ::1] grad_w2,
                            floating[:, ::1] grad_b2, int n_threads):
    """Hardened backward; adds into the grad_* arrays, dx (B, in) is overwritten.

    Pass 1, parallel over rows: dh, dz and dx. Pass 2, parallel over leaves, and pass 3, over
    nodes (only with an entropy weight): rows are counting-sorted by leaf / node so each gradient
    row is summed by one thread in row order: race-free, the same for any thread count.
    """
    cdef Py_ssize_t n_rows = x.shape[0], n_leaves = w1t.shape[0], r, i, k, l, node
    cdef int in_w = <int>x.shape[1], leaf_w = <int>w1t.shape[1], out_w = <int>dy.shape[1]
    cdef int depth = <int>path.shape[1], j, level
    cdef floating w = <floating>entropy_weight
    cdef floating d, a, one = 1
    _check_act(act)
    _check_fff_weights(depth, in_w, out_w, node_w, w1t, w2)
    _require(dy.shape[0] == n_rows and dx.shape[0] == n_rows and dx.shape[1] == in_w
             and path.shape[0] == n_rows and z_path.shape[0] == n_rows
             and z_path.shape[1] == depth and leaf.shape[0] == n_rows
             and hpre.shape[0] == n_rows and hpre.shape[1] == leaf_w,
             "x, dy, dx, path, z_path, leaf and hpre must have one row per input row")
    _require(not has_swap or (swap.shape[0] == n_rows and swap.shape[1] == depth),
             "swap must be (rows, depth)")
    _require(not has_drop or (drop.shape[0] == n_rows and drop.shape[1] == leaf_w),
             "drop must be (rows, leaf)")
    _require(grad_node_w.shape[0] == node_w.shape[0] and grad_node_w.shape[1] == in_w
             and grad_node_b.shape[0] == node_w.shape[0]
             and grad_w1t.shape[0] == n_leaves and grad_w1t.shape[1] == leaf_w
             and grad_w1t.shape[2] == in_w and grad_b1.shape[0] == n_leaves
             and grad_b1.shape[1] == leaf_w and grad_w2.shape[0] == n_leaves
             and grad_w2.shape[1] == leaf_w and grad_w2.shape[2] == out_w
             and grad_b2.shape[0] == n_leaves and grad_b2.shape[1] == out_w,
             "gradients must have the parameters' shapes")
    _check_threads(n_threads)
    cdef const floating* nw = &node_w[0, 0] if depth > 0 else NULL
    if n_rows == 0:
        return None
    cdef int team = _team(n_threads, n_rows,
                          2.0 * (<double>depth * in_w + <double>leaf_w * (in_w + out_w)))
    cdef bint in_range
    with nogil:
        in_range = _indices_below(&leaf[0], n_rows, n_leaves) and (
            depth == 0 or _indices_below(&path[0, 0], n_rows * depth, node_w.shape[0]))
    _require(in_range, "leaf or path holds an index outside the tree")
    dtype = np.asarray(x).dtype
    dh_arr = np.empty((n_rows, leaf_w), dtype=dtype)
    dz_arr = np.zeros((n_rows, depth), dtype=dtype)
    cdef floating[:, ::1] dh = dh_arr
    cdef floating[:, ::1] dz = dz_arr
    with nogil:
        for r in prange(n_rows, schedule="dynamic", chunksize=_ROW_CHUNK, num_threads=team):
            _hard_backward_row(depth, in_w, leaf_w, out_w, &dy[r, 0], nw,
                               &w1t[leaf[r], 0, 0], &w2[leaf[r], 0, 0],
                               &path[r, 0] if depth > 0 else NULL,
                               &z_path[r, 0] if depth > 0 else NULL,
                               &swap[r, 0] if has_swap and depth > 0 else NULL,
                               &drop[r, 0] if has_drop else NULL, &hpre[r, 0], act, w,
                               &dh[r, 0], &dz[r, 0] if depth > 0 else NULL, &dx[r, 0])

    order_arr, offsets_arr, active_arr = _group_rows(leaf, n_leaves)
    cdef Py_ssize_t[::1] order = order_arr
    cdef Py_ssize_t[::1] offsets = offsets_arr
    cdef Py_ssize_t[::1] active = active_arr
    with nogil:
        for k in prange(active.shape[0], schedule="dynamic", num_threads=team):
            l = active[k]
            for i in range(offsets[l], offsets[l + 1]):
                r = order[i]
                for j in range(leaf_w):
                    d = dh[r, j]
                    if d != 0:
                        _axpy(in_w, d, &x[r, 0], &grad_w1t[l, j, 0])
                        grad_b1[l, j] += d
                    a = _act(hpre[r, j], act)
                    if has_drop:
                        a = a * drop[r, j]
                    if a != 0:
                        _axpy(out_w, a, &dy[r, 0], &grad_w2[l, j, 0])
                _axpy(out_w, one, &dy[r, 0], &grad_b2[l, 0])

    if w == 0 or depth == 0:
        return None
    order_arr, offsets_arr, active_arr = _group_rows(path, node_w.shape[0])
    order = order_arr
    offsets = offsets_arr
    active = active_arr
    with nogil:
        for k in prange(active.shape[0], schedule="dynamic", num_threads=team):
            node = active[k]
            for i in range(offsets[node], offsets[node + 1]):
                r = order[i] // depth
                level = <int>(order[i] - r * depth)
                d = dz[r, level]
                if d != 0:
                    _axpy(in_w, d, &x[r, 0], &grad_node_w[node, 0])
                    grad_node_b[node] += d
    return None



# ---------------------------------------------------------------------------------------------
# Optimizer updates (fastff/optim.py): one pass over a parameter, its gradient and its state
# instead of NumPy's dozen passes with temporaries (an Adam step over UltraFFF's two 12.6 MB
# weight arrays took about 3x a whole training step). Every element gets the operations of the
# NumPy expressions in optim.py, in their order and precision, without fused multiply-adds
# (fastff_adam / fastff_sgd in _simd.h), so both give the same bits.
#
# Arrays are (rows, cols) views whose rows are contiguous (any row stride: the node records);
# a task is one row's run of at most UPDATE_CHUNK columns.

cdef enum:
    UPDATE_CHUNK = 1 << 14  # columns per task at most
    RULE_SGD = 0
    RULE_ADAM = 1


# An update's scalars, in double as optim.py forms them from Python floats; each is rounded to
# the arrays' dtype once, as NumPy does with a Python-float operand.
cdef struct _UpdateScalars:
    bint l2  # g = g + wd * p
    bint decay  # p *= keep (AdamW)
    bint has_buf  # SGD's momentum buffer
    bint nesterov
    double wd, keep, b1, one_minus_b1, b2, one_minus_b2, unbias2, eps, step_size, mom, lr


cdef inline void _adam(long n, floating* p, const floating* g, floating* m, floating* v,
                       _UpdateScalars c) noexcept nogil:
    if floating is float:
        fastff_adam_f32(n, p, g, m, v, c.l2, c.decay, c.wd, c.keep, c.b1, c.one_minus_b1,
                        c.b2, c.one_minus_b2, c.unbias2, c.eps, c.step_size)
    else:
        fastff_adam_f64(n, p, g, m, v, c.l2, c.decay, c.wd, c.keep, c.b1, c.one_minus_b1,
                        c.b2, c.one_minus_b2, c.unbias2, c.eps, c.step_size)


cdef inline void _sgd(long n, floating* p, const floating* g, floating* buf,
                      _UpdateScalars c) noexcept nogil:
    if floating is float:
        fastff_sgd_f32(n, p, g, buf, c.l2, c.has_buf, c.nesterov, c.wd, c.mom, c.lr)
    else:
        fastff_sgd_f64(n, p, g, buf, c.l2, c.has_buf, c.nesterov, c.wd, c.mom, c.lr)


cdef int _check_update_array(const floating[:, :] a, const floating[:, :] p) except -1:
    _require(a.shape[0] == p.shape[0] and a.shape[1] == p.shape[1],
             "a parameter, its gradient and its state must have one shape")
    return _require(_rows_contiguous(a.shape[1], a.strides[1], sizeof(floating))
                    and a.strides[0] % <Py_ssize_t>sizeof(floating) == 0,
                    "update arrays need contiguous rows")


cdef int _update(int rule, floating[:, :] p, const floating[:, :] g, floating[:, :] s1,
                 floating[:, :] s2, _UpdateScalars c, int n_threads) except -1:
    """Runs `rule` over (rows, cols) arrays p, g and state s1, s2 (SGD: s1 the momentum buffer,
    s2 unused; Adam: m, v), one task per row's run of at most UPDATE_CHUNK columns."""
    _check_update_array(p, p)
    _check_update_array(g, p)
    _check_update_array(s1, p)
    _check_update_array(s2, p)
    _check_threads(n_threads)
    cdef Py_ssize_t n_rows = p.shape[0], n_cols = p.shape[1], n = n_rows * n_cols
    if n == 0:
        return 0
    # row strides in elements; rows are contiguous (checked above)
    cdef Py_ssize_t sp = p.strides[0] // <Py_ssize_t>sizeof(floating)
    cdef Py_ssize_t sg = g.strides[0] // <Py_ssize_t>sizeof(floating)
    cdef Py_ssize_t s1s = s1.strides[0] // <Py_ssize_t>sizeof(floating)
    cdef Py_ssize_t s2s = s2.strides[0] // <Py_ssize_t>sizeof(floating)
    cdef floating* pp = &p[0, 0]
    cdef const floating* gp = &g[0, 0]
    cdef floating* s1p = &s1[0, 0]
    cdef floating* s2p = &s2[0, 0]
    cdef Py_ssize_t blocks = (n_cols + UPDATE_CHUNK - 1) // UPDATE_CHUNK, k, r, c0
    cdef long width
    # a few loads, multiplies and a square root per element: ~4 multiply-adds' worth
    cdef int team = _team_for(n_threads, n_rows * blocks, 4.0 * n)
    with nogil:
        for k in prange(n_rows * blocks, schedule="dynamic", num_threads=team):
            r = k // blocks
            c0 = (k - r * blocks) * UPDATE_CHUNK
            width = min(UPDATE_CHUNK, n_cols - c0)
            if rule == RULE_ADAM:
                _adam(width, pp + r * sp + c0, gp + r * sg + c0, s1p + r * s1s + c0,
                      s2p + r * s2s + c0, c)
            else:
                _sgd(width, pp + r * sp + c0, gp + r * sg + c0, s1p + r * s1s + c0, c)
    return 0


def adam_update(floating[:, :] p, const floating[:, :] g, floating[:, :] m, floating[:, :] v,
                double weight_decay, bint decoupled, double lr, double beta1, double beta2,
                double eps, long step, int n_threads):
    """One Adam / AdamW step in place (optim.Adam._update, fused): p, m, v updated from g,
    all (rows, cols); step is t, the 1-based step number."""
    cdef _UpdateScalars c
    # step 0 (or betas of 1) would divide by 1 - beta**step = 0: NaN parameters
    _require(step >= 1, "step must be >= 1 (the 1-based step number)")
    _require(0 <= beta1 < 1 and 0 <= beta2 < 1, "beta1 and beta2 must be in [0, 1)")
    c.l2 = weight_decay != 0 and not decoupled
    c.decay = weight_decay != 0 and decoupled
    c.has_buf = c.nesterov = False
    c.wd = weight_decay
    c.keep = 1 - lr * weight_decay
    c.b1, c.one_minus_b1 = beta1, 1 - beta1
    c.b2, c.one_minus_b2 = beta2, 1 - beta2
    c.unbias2 = 1 / sqrt(1 - beta2 ** step)
    c.eps = eps
    c.step_size = lr / (1 - beta1 ** step)
    c.mom = c.lr = 0
    _update(RULE_ADAM, p, g, m, v, c, n_threads)


def sgd_update(floating[:, :] p, const floating[:, :] g, floating[:, :] buf, bint has_buf,
               double lr, double weight_decay, double momentum, bint nesterov, int n_threads):
    """One SGD step in place (optim.SGD._update, fused): p from g, with the momentum buffer
    buf when has_buf (buf is ignored otherwise); all (rows, cols)."""
    cdef _UpdateScalars c
    c.l2 = weight_decay != 0
    c.decay = False
    c.has_buf = has_buf
    c.nesterov = nesterov
    c.wd = weight_decay
    c.mom = momentum
    c.lr = lr
    c.keep = c.b1 = c.one_minus_b1 = c.b2 = c.one_minus_b2 = c.unbias2 = c.eps = 0
    c.step_size = 0
    _update(RULE_SGD, p, g, buf, buf, c, n_threads)
