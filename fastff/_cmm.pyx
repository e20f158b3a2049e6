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
from libc.math cimport erf, erff, exp, expf
from libc.string cimport memset

import numpy as np

cdef extern from "_omp_shim.h":
    int omp_get_max_threads() nogil
    void omp_set_num_threads(int) nogil

cdef extern from *:
    int FASTFF_HAVE_OPENMP

# Activation codes; fastff/ops.py and the GPU kernels use the same numbers.
cdef enum:
    ACT_IDENTITY = 0
    ACT_RELU = 1
    ACT_GELU = 2

ACTIVATIONS = {"identity": ACT_IDENTITY, "relu": ACT_RELU, "gelu": ACT_GELU}
HAVE_OPENMP = bool(FASTFF_HAVE_OPENMP)


def get_num_threads():
    """Threads the kernels use (OpenMP's max threads)."""
    return omp_get_max_threads()


def set_num_threads(int n):
    """Set the OpenMP thread count of the kernels (n >= 1)."""
    if n < 1:
        raise ValueError(f"number of threads must be >= 1, got {n}")
    omp_set_num_threads(n)


# ---------------------------------------------------------------------------------------------
# Vector primitives: fastff/_simd.h, multiversioned for AVX-512 / AVX2 / baseline at load time.

cdef extern from "_simd.h" nogil:
    float fastff_dot_f32(int n, const float* a, const float* b)
    double fastff_dot_f64(int n, const double* a, const double* b)
    void fastff_axpy_f32(int n, float alpha, const float* x, float* y)
    void fastff_axpy_f64(int n, double alpha, const double* x, double* y)


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


cdef inline floating _act(floating z, int act) noexcept nogil:
    if act == ACT_RELU:
        return z if z > 0 else 0
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
# Neuron-tree FFF (UltraFastBERT)

cdef enum:
    ROWS_PER_BLOCK = 4


cdef void _ultra_forward_block(const floating[:, ::1] x, const floating[:, ::1] w_in,
                               const floating[::1] b_in, const floating[:, ::1] w_out_t,
                               int depth, int n_trees, int act, floating[:, ::1] y,
                               Py_ssize_t[:, ::1] visited, floating[:, ::1] preact,
                               bint save_path, Py_ssize_t r0, Py_ssize_t r1) noexcept nogil:
    """Rows r0..r1 (at most ROWS_PER_BLOCK) walk their trees level by level together: while one
    row waits for its next node's weights to arrive, the others compute."""
    cdef int in_w = <int>x.shape[1], out_w = <int>y.shape[1]
    cdef Py_ssize_t n_nodes = (<Py_ssize_t>1 << (depth + 1)) - 1
    cdef int t, level, i, n = <int>(r1 - r0), path_len = depth + 1
    cdef Py_ssize_t g, r
    cdef Py_ssize_t node[ROWS_PER_BLOCK]
    cdef floating z[ROWS_PER_BLOCK]
    cdef floating a
    for i in range(n):
        memset(&y[r0 + i, 0], 0, out_w * sizeof(floating))
    for t in range(n_trees):
        for i in range(n):
            node[i] = 0
        for level in range(path_len):
            for i in range(n):
                g = t * n_nodes + node[i]
                z[i] = b_in[g] + _dot(in_w, &w_in[g, 0], &x[r0 + i, 0])
            for i in range(n):
                r = r0 + i
                g = t * n_nodes + node[i]
                a = _act(z[i], act)
                if a != 0:  # relu zeros skip the output row entirely
                    _axpy(out_w, a, &w_out_t[g, 0], &y[r, 0])
                if save_path:
                    visited[r, t * path_len + level] = g
                    preact[r, t * path_len + level] = z[i]
                node[i] = 2 * node[i] + 1 + (z[i] > 0)


def ultra_forward(const floating[:, ::1] x, const floating[:, ::1] w_in, const floating[::1] b_in,
                  const floating[:, ::1] w_out_t, int depth, int n_trees, int act,
                  floating[:, ::1] y, Py_ssize_t[:, ::1] visited, floating[:, ::1] preact,
                  bint save_path):
    """Hard-path forward of the neuron-tree FFF.

    x (B, in), w_in (T*n, in), b_in (T*n,), w_out_t (T*n, out) -> y (B, out), overwritten.
    With save_path, visited[r, t*(depth+1)+l] gets the global node index of row r's level-l node in
    tree t and preact[r, ...] its pre-activation z; both are (B, T*(depth+1)).
    Rows go to threads in blocks of ROWS_PER_BLOCK.
    """
    cdef Py_ssize_t n_rows = x.shape[0], block, r0
    cdef Py_ssize_t n_blocks = (n_rows + ROWS_PER_BLOCK - 1) // ROWS_PER_BLOCK
    with nogil:
        for block in prange(n_blocks, schedule="static"):
            r0 = block * ROWS_PER_BLOCK
            _ultra_forward_block(x, w_in, b_in, w_out_t, depth, n_trees, act, y, visited, preact,
                                 save_path, r0, min(r0 + ROWS_PER_BLOCK, n_rows))
    return None


def ultra_backward(const floating[:, ::1] x, const floating[:, ::1] dy,
                   const floating[:, ::1] w_in, const floating[:, ::1] w_out_t,
                   const Py_ssize_t[:, ::1] visited, const floating[:, ::1] preact, int act,
                   floating[:, ::1] dx, floating[:, ::1] grad_w_in, floating[::1] grad_b_in,
                   floating[:, ::1] grad_w_out_t):
    """Hard-path backward of the neuron-tree FFF; adds into the three gradient arrays.

    Pass 1, parallel over rows: dz of every visit and dx (B, in), overwritten.
    Pass 2, parallel over nodes: visits are counting-sorted by node, so each gradient row is summed
    by one thread in row order. No atomics, no per-thread copies of the weights, and the result is
    bitwise the same for any thread count.
    """
    cdef Py_ssize_t n_rows = x.shape[0], visits_per_row = visited.shape[1]
    cdef Py_ssize_t n_visits = n_rows * visits_per_row, n_total = w_in.shape[0]
    cdef int in_w = <int>x.shape[1], out_w = <int>dy.shape[1]
    cdef Py_ssize_t r, v, g, i, k, start, stop
    cdef floating z, dz

    dz_arr = np.empty((n_rows, visits_per_row), dtype=np.asarray(preact).dtype)
    cdef floating[:, ::1] dzs = dz_arr
    with nogil:
        for r in prange(n_rows, schedule="static"):
            memset(&dx[r, 0], 0, in_w * sizeof(floating))
            for v in range(visits_per_row):
                g = visited[r, v]
                z = preact[r, v]
                dz = _dot(out_w, &dy[r, 0], &w_out_t[g, 0]) * _act_grad(z, act)
                dzs[r, v] = dz
                if dz != 0:
                    _axpy(in_w, dz, &w_in[g, 0], &dx[r, 0])

    # Counting sort of visits by node: offsets[g]..offsets[g+1] index into `order` (flat visit
    # ids, ascending, hence rows in order within each node).
    offsets_arr = np.zeros(n_total + 1, dtype=np.intp)
    order_arr = np.empty(n_visits, dtype=np.intp)
    cdef Py_ssize_t[::1] offsets = offsets_arr
    cdef Py_ssize_t[::1] order = order_arr
    cdef const Py_ssize_t* flat_visited = &visited[0, 0] if n_visits > 0 else NULL
    cdef Py_ssize_t n_active
    with nogil:
        for i in range(n_visits):
            offsets[flat_visited[i] + 1] += 1
        for g in range(n_total):
            offsets[g + 1] += offsets[g]
    # Only nodes some row visited get a task: the parallel loop runs over this list.
    active_arr = np.flatnonzero(np.diff(offsets_arr)).astype(np.intp)
    cdef Py_ssize_t[::1] active = active_arr
    n_active = active.shape[0]
    cursor_arr = offsets_arr[:-1].copy()
    cdef Py_ssize_t[::1] cursor = cursor_arr
    with nogil:
        for i in range(n_visits):
            g = flat_visited[i]
            order[cursor[g]] = i
            cursor[g] += 1
        for k in prange(n_active, schedule="dynamic"):
            g = active[k]
            start = offsets[g]
            stop = offsets[g + 1]
            for i in range(start, stop):
                v = order[i]
                r = v // visits_per_row
                dz = dzs[r, v - r * visits_per_row]
                if dz != 0:
                    _axpy(in_w, dz, &x[r, 0], &grad_w_in[g, 0])
                    grad_b_in[g] += dz
                z = _act(preact[r, v - r * visits_per_row], act)
                if z != 0:
                    _axpy(out_w, z, &dy[r, 0], &grad_w_out_t[g, 0])
    return None
