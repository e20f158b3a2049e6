# Included by fastff/_cmm.pyx (one extension module): the neuron-tree FFF (UltraFastBERT) kernels.
# Shares _cmm.pyx's imports, argument checks, SIMD wrappers and thread helpers.

# Neuron-tree FFF (UltraFastBERT)

cdef enum:
    ROWS_PER_BLOCK = 4  # rows one thread walks in lockstep
    MAX_PATH = 62  # MAX_DEPTH + 1: the most levels one walk visits
    MIN_ROWS_PER_SUBTREE = 16  # below this, grouping rows by subtree saves too little
    MIN_SPLIT = 3  # fewer than 2**MIN_SPLIT subtrees: regrouping costs more than it saves
    NO_CARRY = 0  # a walk adds its terms into y
    GIVE_CARRY = 1  # a top walk leaves its terms in the carry buffer
    TAKE_CARRY = 2  # a subtree walk adds the carried terms, then its own

# The weights of a subtree that rows walk together (forward), or the x and dy rows that a
# subtree's gradient task reads (backward): half a core's L2, so they stay there while the rows'
# own x and y stream through the other half. On a 512 KiB-L2 Zen 3 VM (768 -> 768, 4096 rows,
# minima of 5 rounds), 256 KiB subtrees against 1 MiB: depth 8 3.81 against 4.26 ms (2 threads)
# and 6.31 against 7.06 ms (1 thread); depth 11 5.76 against 6.02 ms (2 threads), the same on
# 1 thread. 512 KiB where the C library does not report the L2; at most 1 MiB (the fixed size
# before), as a reported L2 may be shared by a cluster of cores.
cdef Py_ssize_t SUBTREE_BYTES = min(max((fastff_l2_cache_bytes() // 2) or (1 << 19), 1 << 16),
                                    1 << 20)


def _subtree_bytes():
    """The subtree size that _split_level and _backward_schedule aim for, in bytes."""
    return SUBTREE_BYTES


def _set_subtree_bytes(Py_ssize_t n_bytes):
    """Sets that size and returns the previous one: for tests, which then take the regrouped
    paths on any CPU. Not for use while kernels run."""
    global SUBTREE_BYTES
    if n_bytes < 1:
        raise ValueError(f"the subtree size must be at least 1 byte, got {n_bytes}")
    previous, SUBTREE_BYTES = SUBTREE_BYTES, n_bytes
    return previous


# The terms a row's top walk hands to its subtree walk: row r's k-th nonzero activation at
# coef[r * stride + k] (of the layer's dtype) and its global node at node[r * stride + k].
cdef struct _Carry:
    void* coef
    Py_ssize_t* node
    int* n
    Py_ssize_t stride


cdef void _walk(const floating[:, ::1] x, const weight_t[:, :] w_in, const weight_t[::1] b_in,
                const weight_t[:, :] w_out_t, int act, floating[:, ::1] y,
                Py_ssize_t[:, ::1] visited, floating[:, ::1] preact, bint save_path,
                const Py_ssize_t* rows, int n, Py_ssize_t* node, int t, Py_ssize_t n_nodes,
                int level0, int level1, int path_len, const Py_ssize_t* next_rows,
                int n_next, _Carry carry, int carry_mode, bint overwrite,
                int half_kind) noexcept nogil:
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
    cdef const weight_t* w_rows[ROWS_PER_BLOCK]
    cdef const floating* x_rows[ROWS_PER_BLOCK]
    cdef floating* y_rows[ROWS_PER_BLOCK]
    # per row: the nonzero activations of its walk and their output rows, in path order
    cdef floating coef[ROWS_PER_BLOCK * MAX_PATH]
    cdef const weight_t* out_rows[ROWS_PER_BLOCK * MAX_PATH]
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
        _dotn_w(n, in_w, w_rows, x_rows, z,
                &x[next_rows[level - level0], 0] if level - level0 < n_next else NULL, half_kind)
        for i in range(n):
            r = rows[i]
            g = t * n_nodes + node[i]
            z[i] = z[i] + <floating>_wide(b_in[g], half_kind)
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
    _axpym_w(n, n_terms, MAX_PATH, out_w, coef, out_rows, y_rows, overwrite, half_kind)


cdef void _walk_top(const floating[:, ::1] x, const weight_t[:, :] w_in,
                    const weight_t[::1] b_in, const weight_t[:, :] w_out_t, int act,
                    floating[:, ::1] y, Py_ssize_t[:, ::1] visited, floating[:, ::1] preact,
                    bint save_path, Py_ssize_t r0, int n, int t, Py_ssize_t n_nodes, int split,
                    int path_len, Py_ssize_t* split_node, _Carry carry, int carry_mode,
                    bint overwrite, int half_kind) noexcept nogil:
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
          0, split, path_len, next_rows, n_next, carry, carry_mode, overwrite, half_kind)
    if split_node != NULL:
        for j in range(n):
            split_node[rows[j]] = node[j] - ((<Py_ssize_t>1 << split) - 1)


cdef void _walk_subtree(const floating[:, ::1] x, const weight_t[:, :] w_in,
                        const weight_t[::1] b_in, const weight_t[:, :] w_out_t, int act,
                        floating[:, ::1] y, Py_ssize_t[:, ::1] visited,
                        floating[:, ::1] preact, bint save_path, const Py_ssize_t* order,
                        Py_ssize_t start, Py_ssize_t stop, Py_ssize_t root, int t,
                        Py_ssize_t n_nodes, int split, int path_len, _Carry carry,
                        bint overwrite, int half_kind) noexcept nogil:
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
              overwrite, half_kind)
        start = start + n


cdef int _split_level(Py_ssize_t n_rows, int depth, int in_w, int out_w,
                      Py_ssize_t itemsize) noexcept:
    """Level at which rows are regrouped by node, or depth + 1 for no regrouping.

    Below the split every subtree's weights fit in SUBTREE_BYTES, and rows that share a subtree
    walk it together, so each subtree is fetched from L3/DRAM once per batch instead of once per
    row. The split is no deeper than leaves MIN_ROWS_PER_SUBTREE rows per subtree on average,
    and no regrouping happens above MIN_SPLIT: each tree's regrouped walk reads the batch's x
    twice (top walk, subtree walk) where the row-by-row walk reads it once for all trees, and
    a tree of a few subtrees mostly stays in L2 anyway (Fashion-MNIST's UltraFFF, 784->10,
    depth 6 x 4 trees, 10,000 rows, 2 threads: 24.9 ms regrouped at level 1, 14.0 ms not)."""
    cdef Py_ssize_t node_bytes = (<Py_ssize_t>in_w + out_w) * itemsize
    cdef int levels_below = 0, split
    while levels_below < depth + 1 and ((<Py_ssize_t>1 << (levels_below + 1)) - 1) * node_bytes <= SUBTREE_BYTES:
        levels_below += 1
    split = depth + 1 - levels_below
    while split > 0 and (n_rows >> split) < MIN_ROWS_PER_SUBTREE:
        split -= 1
    return depth + 1 if split < MIN_SPLIT else split


def _subtree_split(Py_ssize_t n_rows, int depth, int in_w, int out_w, int itemsize):
    """_split_level, for Python callers (the backward's row order, the tests)."""
    return _split_level(n_rows, depth, in_w, out_w, itemsize)


def ultra_forward(const floating[:, ::1] x, const floating[:, :] w_in, const floating[::1] b_in,
                  const floating[:, :] w_out_t, int depth, int n_trees, int act,
                  floating[:, ::1] y, Py_ssize_t[:, ::1] visited, floating[:, ::1] preact,
                  bint save_path, int n_threads):
    """Hard-path forward of the neuron-tree FFF.

    x (B, in), w_in (T*n, in), b_in (T*n,), w_out_t (T*n, out) -> y (B, out), overwritten
    (ultra_forward_add: added into).
    With save_path, visited[r, t*(depth+1)+l] gets the global node index of row r's level-l node in
    tree t and preact[r, ...] its pre-activation z; both are (B, T*(depth+1)).

    Per tree: every row walks the top levels (blocks of ROWS_PER_BLOCK rows per task); for large
    batches of deep trees the rows are then counting-sorted by their node at the split level and
    each subtree is walked by its rows together (see _subtree_split). Each row still adds its
    nodes in path order, tree by tree, so the result does not depend on the grouping or threads.
    Runs on at most n_threads threads (fewer for small batches, see _team).
    """
    _ultra_forward(x, w_in, b_in, w_out_t, depth, n_trees, act, y, visited, preact, save_path,
                   0, False, n_threads)


def ultra_forward_add(const floating[:, ::1] x, const floating[:, :] w_in,
                      const floating[::1] b_in, const floating[:, :] w_out_t, int depth,
                      int n_trees, int act, floating[:, ::1] y, Py_ssize_t[:, ::1] visited,
                      floating[:, ::1] preact, bint save_path, int n_threads):
    """As ultra_forward, but the walk adds into y: each row's sum starts from its value in y
    and goes on adding the walk's terms in path order, tree by tree, exactly as one walk adds
    a later node's. So a walk split in two calls (the top levels of a tree, then with the
    weights of the subtree below the node they reach) gives bitwise the y of one call: the
    tree-parallel layers of fastff.distributed walk a row's subtree on another process."""
    _ultra_forward(x, w_in, b_in, w_out_t, depth, n_trees, act, y, visited, preact, save_path,
                   0, True, n_threads)


def ultra_forward_half(const float[:, ::1] x, const half_bits[:, :] w_in,
                       const half_bits[::1] b_in, const half_bits[:, :] w_out_t, int depth,
                       int n_trees, int act, float[:, ::1] y, Py_ssize_t[:, ::1] visited,
                       float[:, ::1] preact, bint save_path, int half_kind, int n_threads):
    """ultra_forward with half-precision weights: w_in, b_in and w_out_t hold bfloat16
    (half_kind 1) or float16 (2) bits, viewed as uint16; x, y and preact are float32 and every
    dot and sum accumulates in float32."""
    _require(half_kind == 1 or half_kind == 2, "half_kind must be 1 (bfloat16) or 2 (float16)")
    _ultra_forward(x, w_in, b_in, w_out_t, depth, n_trees, act, y, visited, preact, save_path,
                   half_kind, False, n_threads)


cdef _ultra_forward(const floating[:, ::1] x, const weight_t[:, :] w_in,
                    const weight_t[::1] b_in, const weight_t[:, :] w_out_t, int depth,
                    int n_trees, int act, floating[:, ::1] y, Py_ssize_t[:, ::1] visited,
                    floating[:, ::1] preact, bint save_path, int half_kind, bint accumulate,
                    int n_threads):
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
    _require(_rows_contiguous(w_in.shape[1], w_in.strides[1], sizeof(weight_t))
             and _rows_contiguous(w_out_t.shape[1], w_out_t.strides[1], sizeof(weight_t)),
             "the rows of w_in and w_out_t must be contiguous")
    _require(y.shape[0] == n_rows and y.shape[1] == w_out_t.shape[1], "y must be (rows, out)")
    if save_path:
        _require(visited.shape[0] == n_rows and visited.shape[1] == n_trees * (depth + 1)
                 and preact.shape[0] == n_rows and preact.shape[1] == visited.shape[1],
                 "visited and preact must be (rows, n_trees * (depth + 1))")
    cdef int split = _split_level(n_rows, depth, <int>x.shape[1], out_w, sizeof(weight_t))
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
                              path_len, path_len, NULL, carry, NO_CARRY,
                              t == 0 and not accumulate, half_kind)
        else:
            for t in range(n_trees):
                for block in prange(n_blocks, schedule="dynamic", chunksize=4, num_threads=team):
                    _walk_top(x, w_in, b_in, w_out_t, act, y, visited, preact, save_path,
                              block * ROWS_PER_BLOCK,
                              <int>(min((block + 1) * ROWS_PER_BLOCK, n_rows) - block * ROWS_PER_BLOCK),
                              t, n_nodes, split, path_len, split_node_ptr, carry, GIVE_CARRY,
                              False, half_kind)
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
                                  path_len, carry, t == 0 and not accumulate, half_kind)
    return None


cdef enum:
    BACKWARD_TERMS = 64  # terms one _axpym call adds into a dx or gradient row


cdef void _backward_row(const floating[:, ::1] dy, const floating[:, :] w_in,
                        const floating[:, :] w_out_t, const Py_ssize_t[:, ::1] visited,
                        const floating[:, ::1] preact, int act, floating[:, ::1] dx,
                        floating[:, ::1] dzs, floating[:, ::1] hs, Py_ssize_t r, Py_ssize_t v0,
                        Py_ssize_t v1, bint need_dx) noexcept nogil:
    """Visits v0..v1 of row r (at most BACKWARD_TERMS): dz and act(z) of each into dzs and
    hs (the gradient pass reuses both), and with need_dx dx[r] += sum of dz * w_in[node] in
    visit order (dx[r] = that sum for the row's first chunk, v0 == 0: no separate zeroing).
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
    cdef floating* dx_row = &dx[r, 0] if need_dx else NULL
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
            if dz != 0 and need_dx:  # relu zeros add nothing
                coef[m] = dz
                rows[m] = &w_in[visited[r, v + j], 0]
                m = m + 1
    if need_dx:
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

    Pass 1, parallel over rows: dz of every visit and dx (B, in), overwritten (_backward_row);
    a dx of no rows, (0, in), skips it (an input that needs no gradient: its w_in reads and
    FMAs are most of this pass when in >> out).
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
    cdef bint need_dx = dx.shape[0] != 0
    _require(dy.shape[0] == n_rows and (dx.shape[0] == n_rows or not need_dx)
             and dx.shape[1] == in_w
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
            if visits_per_row == 0 and need_dx:  # else the first _backward_row overwrites dx[r]
                memset(&dx[r, 0], 0, in_w * sizeof(floating))
            v = 0
            while v < visits_per_row:
                _backward_row(dy, w_in, w_out_t, visited, preact, act, dx, dzs, hs, r, v,
                              min(v + BACKWARD_TERMS, visits_per_row), need_dx)
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
