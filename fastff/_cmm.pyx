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

# Activation codes, shared with the CUDA kernels through the header.
cdef extern from "activations.h":
    enum:
        ACT_IDENTITY
        ACT_RELU
        ACT_GELU

ACTIVATIONS = {"identity": ACT_IDENTITY, "relu": ACT_RELU, "gelu": ACT_GELU}
HAVE_OPENMP = bool(FASTFF_HAVE_OPENMP)

# Half-precision storage: bfloat16 or float16 bits (which one: the kernels' half_kind).
ctypedef unsigned short half_bits
HALF_KINDS = {"bfloat16": 1, "float16": 2}  # FASTFF_BF16, FASTFF_F16 of _half.h

# The element type of a kernel's weights: its input's type, or half-precision bits (with
# float32 inputs). The entry points pair them; other pairs are compiled but never called.
ctypedef fused weight_t:
    float
    double
    half_bits


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
                            const weight_t[:, ::1] node_w, const weight_t[:, :, ::1] w1t,
                            const weight_t[:, :, ::1] w2) except -1:
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
# Vector primitives: fastff/cpu/_simd.h, multiversioned for AVX-512 / AVX2 / baseline at load time.

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
    long fastff_l2_cache_bytes()
    void fastff_prefetch_l2(const void* p, long n)
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


cdef extern from "_half.h" nogil:
    float fastff_half_to_f32(int kind, unsigned short h)
    void fastff_dotn_half(int kind, int nr, int n, const unsigned short** w, const float** x,
                          float* out)
    void fastff_axpym_half(int kind, int nr, const int* m, int stride, int n,
                           const float* alpha, const unsigned short** w, float** y,
                           int overwrite)
    void fastff_dot_block_half(int kind, int nr, int nj, int n, const float** x,
                               const unsigned short* w, long w_stride, float* out,
                               int out_stride)

cdef inline double _wide(weight_t v, int half_kind) noexcept nogil:
    if weight_t is half_bits:
        return fastff_half_to_f32(half_kind, v)
    else:
        return v


cdef inline void _dotn_w(int nr, int n, const weight_t** w, const floating** x, floating* out,
                         const floating* prefetch, int half_kind) noexcept nogil:
    """out[r] = dot(w[r], x[r]), r < nr, with w of the weights' storage type."""
    if weight_t is half_bits:
        if floating is float:
            fastff_dotn_half(half_kind, nr, n, w, x, out)
    elif weight_t is float:
        if floating is float:
            fastff_dotn_f32(nr, n, w, x, out, prefetch)
    else:
        if floating is double:
            fastff_dotn_f64(nr, n, w, x, out, prefetch)


cdef inline void _axpym_w(int nr, const int* m, int stride, int n, const floating* alpha,
                          const weight_t** w, floating** y, bint overwrite,
                          int half_kind) noexcept nogil:
    """y[r] (+)= sum_k alpha[r*stride+k] * w[r*stride+k], with w of the storage type."""
    if weight_t is half_bits:
        if floating is float:
            fastff_axpym_half(half_kind, nr, m, stride, n, alpha, w, y, overwrite)
    elif weight_t is float:
        if floating is float:
            fastff_axpym_f32(nr, m, stride, n, alpha, w, y, overwrite)
    else:
        if floating is double:
            fastff_axpym_f64(nr, m, stride, n, alpha, w, y, overwrite)


cdef inline void _dot_block_w(int nr, int nj, int n, const floating** x, const weight_t* w,
                              Py_ssize_t w_stride, floating* out, int out_stride,
                              const floating* prefetch, int half_kind) noexcept nogil:
    """_dot_block with w of the weights' storage type."""
    if weight_t is half_bits:
        if floating is float:
            fastff_dot_block_half(half_kind, nr, nj, n, x, w, w_stride, out, out_stride)
    elif weight_t is float:
        if floating is float:
            fastff_dot_block_f32(nr, nj, n, x, w, w_stride, out, out_stride, prefetch)
    else:
        if floating is double:
            fastff_dot_block_f64(nr, nj, n, x, w, w_stride, out, out_stride, prefetch)


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


# ---------------------------------------------------------------------------------------------
# The kernels, one file per concern (fastff/cpu/), compiled into this one module.

include "cpu/ultra.pxi"
include "cpu/fff.pxi"
include "cpu/updates.pxi"
