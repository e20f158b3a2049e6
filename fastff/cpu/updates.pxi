# Included by fastff/_cmm.pyx (one extension module): the fused optimizer updates.
# Shares _cmm.pyx's imports, argument checks, SIMD wrappers and thread helpers.

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
