# Included by fastff/_cmm.pyx (one extension module): the router-leaf FFF kernels.
# Shares _cmm.pyx's imports, argument checks, SIMD wrappers and thread helpers.

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

# _dot_block's tile, rows x leaf neurons: 4 x 4 where the CPU has 32 vector registers; with
# AVX2's 16, 4 x 2 (8 accumulators + 4 row vectors + 1 weight vector: no spill, and 6 loads per
# 8 FMAs, where 2 x 2 needs 4 per 4: the leaves are load-bound; on an AVX2 VM, 1 thread, 10,000
# rows of 784 -> 16 with 32 leaves: 12.6 ms with 2 x 2, 10.3 ms with 4 x 2).
# A row's result is the same for every tile.
cdef int _TILE_ROWS = 4
cdef int _TILE_UNITS = 4 if fastff_wide_registers() else 2


def _set_leaf_tile(int rows, int units):
    """Test hook: force the leaf tile (rows and units each 1 to 4), to check every tile gives
    the same results; returns the previous (rows, units)."""
    global _TILE_ROWS, _TILE_UNITS
    _require(1 <= rows <= 4 and 1 <= units <= 4, "the leaf tile's sides are 1 to 4")
    previous = (_TILE_ROWS, _TILE_UNITS)
    _TILE_ROWS, _TILE_UNITS = rows, units
    return previous


cdef inline int _tiled_dots(int nr, int n_units, int in_w, const floating** x_rows,
                            const weight_t* w, floating* out, int out_stride,
                            const floating** next_rows, int n_next,
                            int half_kind) noexcept nogil:
    """out[r * out_stride + j] = dot(x_rows[r], w[j * in_w:]) for r < nr <= ROWS_PER_BLOCK and
    j < n_units, in _TILE_ROWS x _TILE_UNITS register-blocked tiles; tile call k fetches
    next_rows[k] (for k < n_next) meanwhile. Returns how many of next_rows were requested
    (the half-precision tiles request none)."""
    cdef int r0 = 0, j, n_calls = 0
    if weight_t is half_bits:  # every row per call: each widened weight vector serves them all
        j = 0
        while j < n_units:
            _dot_block_w(nr, min(2, n_units - j), in_w, x_rows, w + <Py_ssize_t>j * in_w, in_w,
                         &out[j], out_stride, NULL, half_kind)
            j = j + 2
        return 0
    while r0 < nr:
        j = 0
        while j < n_units:
            _dot_block_w(min(_TILE_ROWS, nr - r0), min(_TILE_UNITS, n_units - j), in_w,
                         &x_rows[r0],
                         w + <Py_ssize_t>j * in_w, in_w, &out[r0 * out_stride + j], out_stride,
                         next_rows[n_calls] if n_calls < n_next else NULL, half_kind)
            n_calls = n_calls + 1
            j = j + _TILE_UNITS
        r0 = r0 + _TILE_ROWS
    return n_calls


cdef inline void _route_rows(int nr, int depth, int in_w, const floating** x_rows,
                             const weight_t* node_w, const weight_t* node_b,
                             Py_ssize_t* leaf, const floating** next_rows,
                             int n_next, int half_kind) noexcept nogil:
    """The leaves nr <= ROWS_PER_BLOCK rows reach at inference (right at node n iff its logit
    is >= 0), walking the routers in lockstep.

    The first two levels take the logits of all three of their routers from the register-
    blocked _dot_block: each x vector loaded serves three routers, where level-by-level dots
    load an x and a router vector per FMA (routing is load-bound; a third of the logits go
    unused). Below that, every row needs its own router. Each of these dot calls requests
    one of the n_next rows next_rows (the caller's next block) meanwhile."""
    cdef Py_ssize_t node[ROWS_PER_BLOCK]
    cdef const weight_t* w_rows[ROWS_PER_BLOCK]
    cdef floating z[ROWS_PER_BLOCK]
    cdef floating top[ROWS_PER_BLOCK * 3]
    cdef int level, i, top_levels = min(depth, 2), n_calls = 0
    cdef int n_top = (1 << top_levels) - 1
    for i in range(nr):
        node[i] = 0
    if top_levels:
        n_calls = _tiled_dots(nr, n_top, in_w, x_rows, node_w, top, 3, next_rows, n_next,
                              half_kind)
        for level in range(top_levels):
            for i in range(nr):
                node[i] = 2 * node[i] + 1 + (
                    top[i * 3 + node[i]] + <floating>_wide(node_b[node[i]], half_kind) >= 0)
    for level in range(top_levels, depth):
        for i in range(nr):
            w_rows[i] = node_w + node[i] * in_w
        _dotn_w(nr, in_w, w_rows, x_rows, z, next_rows[n_calls] if n_calls < n_next else NULL,
                half_kind)
        n_calls = n_calls + 1
        for i in range(nr):
            node[i] = 2 * node[i] + 1 + (z[i] + <floating>_wide(node_b[node[i]], half_kind) >= 0)
    for i in range(nr):
        leaf[i] = node[i] - ((<Py_ssize_t>1 << depth) - 1)
    _prefetch_rest(next_rows, 0 if weight_t is half_bits else n_calls, n_next, in_w)


cdef inline void _prefetch_rest(const floating** next_rows, int done, int n_next,
                                int in_w) noexcept nogil:
    """Requests next_rows[done..n_next), the next block's rows that fewer dot calls than rows
    (shallow trees, narrow leaves, wide tiles) did not request on their way."""
    cdef int k
    for k in range(done, n_next):
        fastff_prefetch_l2(next_rows[k], in_w * sizeof(floating))


cdef inline void _leaf_rows(int nr, int in_w, int leaf_w, int out_w, const floating** x_rows,
                            const weight_t* w1t_l, const weight_t* b1_l, const weight_t* w2_l,
                            const weight_t* b2_l, int act, floating** y_rows,
                            const floating** next_rows, int n_next,
                            int half_kind) noexcept nogil:
    """y[r] = act(w1t_l @ x[r] + b1_l) @ w2_l + b2_l for nr <= ROWS_PER_BLOCK rows that share
    one leaf: the hidden units come from the register-blocked _dot_block, LEAF_CHUNK at a time.
    Meanwhile the n_next rows next_rows (the caller's next block) are fetched, one per tile."""
    cdef floating h[ROWS_PER_BLOCK * LEAF_CHUNK]
    cdef floating a
    cdef int j0, j, width, r, n
    # per row: the chunk's nonzero activations and their output rows, added by one _axpym
    cdef floating coef[ROWS_PER_BLOCK * LEAF_CHUNK]
    cdef const weight_t* out_rows[ROWS_PER_BLOCK * LEAF_CHUNK]
    cdef int n_terms[ROWS_PER_BLOCK]
    for r in range(nr):
        if weight_t is half_bits:
            for j in range(out_w):
                y_rows[r][j] = <floating>_wide(b2_l[j], half_kind)
        else:
            memcpy(y_rows[r], b2_l, out_w * sizeof(floating))
    j0 = 0
    while j0 < leaf_w:
        width = min(LEAF_CHUNK, leaf_w - j0)
        # the first chunk's tiles fetch the next block's rows
        n = _tiled_dots(nr, width, in_w, x_rows, w1t_l + <Py_ssize_t>j0 * in_w, h, LEAF_CHUNK,
                        next_rows, n_next if j0 == 0 else 0, half_kind)
        if j0 == 0:
            _prefetch_rest(next_rows, n, n_next, in_w)
        for r in range(nr):
            for j in range(width):
                h[r * LEAF_CHUNK + j] = _act(
                    h[r * LEAF_CHUNK + j] + <floating>_wide(b1_l[j0 + j], half_kind), act)
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
        _axpym_w(nr, n_terms, LEAF_CHUNK, out_w, coef, out_rows, y_rows, False, half_kind)
        j0 = j0 + width


cdef void _infer_rows(const floating[:, ::1] x, const weight_t* node_w, const weight_t* node_b,
                      const weight_t[:, :, ::1] w1t, const weight_t[:, ::1] b1,
                      const weight_t[:, :, ::1] w2, const weight_t[:, ::1] b2, int depth,
                      int act, floating[:, ::1] y, Py_ssize_t r0, int nr,
                      int half_kind) noexcept nogil:
    """Rows r0..r0+nr (nr <= ROWS_PER_BLOCK): route together, then each evaluates its leaf."""
    cdef Py_ssize_t leaves[ROWS_PER_BLOCK]
    cdef const floating* x_rows[ROWS_PER_BLOCK]
    cdef floating* y_rows[ROWS_PER_BLOCK]
    cdef int in_w = <int>x.shape[1], leaf_w = <int>w1t.shape[1], out_w = <int>y.shape[1], j
    cdef Py_ssize_t l
    for j in range(nr):
        x_rows[j] = &x[r0 + j, 0]
        y_rows[j] = &y[r0 + j, 0]
    _route_rows(nr, depth, in_w, x_rows, node_w, node_b, leaves, NULL, 0, half_kind)
    for j in range(nr):
        l = leaves[j]
        _leaf_rows(1, in_w, leaf_w, out_w, &x_rows[j], &w1t[l, 0, 0], &b1[l, 0], &w2[l, 0, 0],
                   &b2[l, 0], act, &y_rows[j], NULL, 0, half_kind)


cdef void _route_block(const floating[:, ::1] x, const weight_t* node_w,
                       const weight_t* node_b, int depth, Py_ssize_t r0, int nr,
                       Py_ssize_t* leaf, int half_kind) noexcept nogil:
    """leaf[0..nr) = the leaves of rows r0..r0+nr (nr <= ROWS_PER_BLOCK)."""
    cdef const floating* x_rows[ROWS_PER_BLOCK]
    cdef const floating* next_rows[ROWS_PER_BLOCK]
    cdef int j, n_next = <int>min(ROWS_PER_BLOCK, x.shape[0] - r0 - nr)
    for j in range(nr):
        x_rows[j] = &x[r0 + j, 0]
    for j in range(n_next):  # the next block: rows from DRAM, the first touch of each
        next_rows[j] = &x[r0 + nr + j, 0]
    _route_rows(nr, depth, <int>x.shape[1], x_rows, node_w, node_b, leaf, next_rows, n_next,
                half_kind)


cdef void _leaf_block(const floating[:, ::1] x, const weight_t[:, :, ::1] w1t,
                      const weight_t[:, ::1] b1, const weight_t[:, :, ::1] w2,
                      const weight_t[:, ::1] b2, int act, floating[:, ::1] y,
                      const Py_ssize_t* order, const Py_ssize_t* leaf, Py_ssize_t i,
                      Py_ssize_t n_rows, int half_kind) noexcept nogil:
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
               &b1[l, 0], &w2[l, 0, 0], &b2[l, 0], act, y_rows, next_rows, n_next, half_kind)


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
    _fff_infer(x, node_w, node_b, w1t, b1, w2, b2, depth, act, y, 0, n_threads)


def fff_infer_half(const float[:, ::1] x, const half_bits[:, ::1] node_w,
                   const half_bits[::1] node_b, const half_bits[:, :, ::1] w1t,
                   const half_bits[:, ::1] b1, const half_bits[:, :, ::1] w2,
                   const half_bits[:, ::1] b2, int depth, int act, float[:, ::1] y,
                   int half_kind, int n_threads):
    """fff_infer with half-precision weights (bfloat16 bits for half_kind 1, float16 for 2,
    viewed as uint16); x and y are float32 and every dot and sum accumulates in float32."""
    _require(half_kind == 1 or half_kind == 2, "half_kind must be 1 (bfloat16) or 2 (float16)")
    _fff_infer(x, node_w, node_b, w1t, b1, w2, b2, depth, act, y, half_kind, n_threads)


cdef _fff_infer(const floating[:, ::1] x, const weight_t[:, ::1] node_w,
                const weight_t[::1] node_b, const weight_t[:, :, ::1] w1t,
                const weight_t[:, ::1] b1, const weight_t[:, :, ::1] w2,
                const weight_t[:, ::1] b2, int depth, int act, floating[:, ::1] y,
                int half_kind, int n_threads):
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
    cdef const weight_t* nw = &node_w[0, 0] if depth > 0 else NULL
    cdef const weight_t* nb = &node_b[0] if depth > 0 else NULL
    cdef Py_ssize_t n_row_blocks = (n_rows + ROWS_PER_BLOCK - 1) // ROWS_PER_BLOCK
    if n_rows < 2 * n_leaves:
        with nogil:
            for b in prange(n_row_blocks, schedule="dynamic", chunksize=4, num_threads=team):
                _infer_rows(x, nw, nb, w1t, b1, w2, b2, depth, act, y, b * ROWS_PER_BLOCK,
                            <int>min(ROWS_PER_BLOCK, n_rows - b * ROWS_PER_BLOCK), half_kind)
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
                         &leaf[b * ROWS_PER_BLOCK], half_kind)
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
            _leaf_block(x, w1t, b1, w2, b2, act, y, &order[0], &leaf[0], block_start[b], n_rows,
                        half_kind)
    return None


# ---- soft (mixture) training: the router part; the leaves are GEMMs in fastff/ops.py -----

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
    logit gradients dz (depth,) from the entropy term only (rounding passes no gradient), and dx
    unless dx is NULL (an input that needs no gradient: the leaf's w1t rows, most of this pass's
    reads, are then not touched)."""
    cdef int j, level
    cdef floating d, q, dh_dq, slope
    cdef bint swapped
    if dx != NULL:
        memset(dx, 0, in_w * sizeof(floating))
    for j in range(leaf_w):
        d = _dot(out_w, dy, w2_l + <Py_ssize_t>j * out_w) * _act_grad(hpre[j], act)
        if drop != NULL:
            d = d * drop[j]
        dh[j] = d
        if d != 0 and dx != NULL:
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
            if d != 0 and dx != NULL:
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
    """Hardened backward; adds into the grad_* arrays, dx (B, in) is overwritten; a dx of no
    rows skips it (the input needs no gradient).

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
    cdef bint need_dx = dx.shape[0] != 0
    _require(dy.shape[0] == n_rows and (dx.shape[0] == n_rows or not need_dx)
             and dx.shape[1] == in_w and path.shape[0] == n_rows and z_path.shape[0] == n_rows
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
                               &dh[r, 0], &dz[r, 0] if depth > 0 else NULL,
                               &dx[r, 0] if need_dx else NULL)

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
