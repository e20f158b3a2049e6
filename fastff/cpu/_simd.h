/* Dot and axpy for the CMM kernels, compiled once per instruction set and picked at load time.
 *
 * Wheels must run on any x86-64, so there is no -march flag; instead GCC's target_clones builds
 * x86-64-v4 (AVX-512), x86-64-v3 (AVX2+FMA) and baseline versions and an ifunc resolver picks
 * one for the running CPU. Elsewhere (clang, macOS, arm64) the portable loop is compiled for
 * the default target. `omp simd` (-fopenmp-simd) vectorises the axpy; the dot keeps four accumulators.
 *
 * Why macros and not C++ templates (as fastff/gpu/kernels.cu uses): GCC 12 does multiversion
 * template instances (checked: target_clones on a function template gives each explicit
 * instance its v4/v3/default clones and resolver), so templates would work here. But they would
 * turn fastff/_cmm into a C++ extension (Cython's language="c++") on every platform and
 * compiler, for two instances (float, double) per function; the macros keep the module C and
 * stamp out the same code. Half-precision storage (bfloat16, float16) did not change that: its
 * loops widen 16-bit weights with explicit AVX2/F16C intrinsics in _half.h, and _cmm's fused
 * weight type picks them per kernel specialisation, so no third instance is stamped here.
 */
#ifndef FASTFF_SIMD_H
#define FASTFF_SIMD_H

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__) && \
    !defined(FASTFF_NO_MULTIVERSION)
#define FASTFF_MULTIVERSION \
    __attribute__((noinline, target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
/* The register-blocked primitives come in two vector widths (see fastff_use_w64 below). */
#define FASTFF_VECTOR_ATTR_64 __attribute__((noinline, target("arch=x86-64-v4")))
#define FASTFF_VECTOR_ATTR_32 \
    __attribute__((noinline, target_clones("arch=x86-64-v3", "default")))
#define FASTFF_USE_W64() __builtin_cpu_supports("x86-64-v4")
#else
#define FASTFF_MULTIVERSION
#define FASTFF_VECTOR_ATTR_64
#define FASTFF_VECTOR_ATTR_32
#define FASTFF_USE_W64() 0
#endif

#include <string.h>
#if defined(__unix__) || defined(__APPLE__)
#include <unistd.h> /* sysconf */
#endif

#if defined(__GNUC__) || defined(__clang__)
/* Sum of a 64-byte vector's lanes by halving (3 vector adds, then 4 or 2 scalars): a lane-by-
 * lane sum is a chain of 16 dependent adds, as long as the dot's main loop for short rows.
 * Every dot in this file ends with it. */
#define FASTFF_DEFINE_HSUM32(T, SUFFIX)                                                        \
    typedef T fastff_quarter_##SUFFIX __attribute__((vector_size(16)));                         \
    static inline __attribute__((always_inline)) T fastff_hsum_##SUFFIX(                       \
        const fastff_vec_##SUFFIX *c) {                                                         \
        fastff_quarter_##SUFFIX q0, q1;                                                         \
        memcpy(&q0, c, 16); memcpy(&q1, (const char *)c + 16, 16); q0 += q1;                    \
        T s = q0[0];                                                                            \
        for (unsigned k = 1; k < 16 / sizeof(T); ++k) s += q0[k];                               \
        return s;                                                                               \
    }
#define FASTFF_DEFINE_HSUM64(T, SUFFIX)                                                        \
    typedef T fastff_half_##SUFFIX __attribute__((vector_size(32)));                            \
    typedef T fastff_quarter_##SUFFIX __attribute__((vector_size(16)));                         \
    static inline __attribute__((always_inline)) T fastff_hsum_##SUFFIX(                       \
        const fastff_vec_##SUFFIX *c) {                                                         \
        fastff_half_##SUFFIX h0, h1;                                                            \
        fastff_quarter_##SUFFIX q0, q1;                                                         \
        memcpy(&h0, c, 32); memcpy(&h1, (const char *)c + 32, 32); h0 += h1;                    \
        memcpy(&q0, &h0, 16); memcpy(&q1, (const char *)&h0 + 16, 16); q0 += q1;                \
        T s = q0[0];                                                                            \
        for (unsigned k = 1; k < 16 / sizeof(T); ++k) s += q0[k];                               \
        return s;                                                                               \
    }
#else
#define FASTFF_DEFINE_HSUM32(T, SUFFIX)
#define FASTFF_DEFINE_HSUM64(T, SUFFIX)
#endif

#if defined(__GNUC__) || defined(__clang__)
/* Four independent 64-byte accumulators: a single accumulator (what `omp simd reduction`
 * gives) makes a 768-long float dot a chain of 48 dependent FMAs, about 4x its throughput
 * bound; this form measured 1.8x faster on L1-resident rows. memcpy compiles to unaligned
 * vector loads. Each target clone maps the 64-byte vectors onto its own registers (one zmm,
 * two ymm or four xmm). */
#define FASTFF_DEFINE_DOT(T, SUFFIX, VB)                                                       \
    typedef T fastff_vec_##SUFFIX __attribute__((vector_size(VB)));                            \
    FASTFF_DEFINE_HSUM##VB(T, SUFFIX)                                                           \
    FASTFF_VECTOR_ATTR_##VB static T fastff_dot_##SUFFIX(int n, const T *a, const T *b) {     \
        enum { VBYTES = VB, L = VB / sizeof(T) };                                               \
        fastff_vec_##SUFFIX c0 = {0}, c1 = {0}, c2 = {0}, c3 = {0}, u0, u1, u2, u3, v0, v1,    \
                            v2, v3;                                                             \
        int i = 0;                                                                              \
        for (; i + 4 * L <= n; i += 4 * L) {                                                    \
            memcpy(&u0, a + i, VBYTES); memcpy(&u1, a + i + L, VBYTES);                                 \
            memcpy(&u2, a + i + 2 * L, VBYTES); memcpy(&u3, a + i + 3 * L, VBYTES);                     \
            memcpy(&v0, b + i, VBYTES); memcpy(&v1, b + i + L, VBYTES);                                 \
            memcpy(&v2, b + i + 2 * L, VBYTES); memcpy(&v3, b + i + 3 * L, VBYTES);                     \
            c0 += u0 * v0; c1 += u1 * v1; c2 += u2 * v2; c3 += u3 * v3;                         \
        }                                                                                       \
        for (; i + L <= n; i += L) {                                                            \
            memcpy(&u0, a + i, VBYTES); memcpy(&v0, b + i, VBYTES);                                     \
            c0 += u0 * v0;                                                                      \
        }                                                                                       \
        c0 = (c0 + c1) + (c2 + c3);                                                             \
        T s = fastff_hsum_##SUFFIX(&c0);                                                        \
        for (; i < n; ++i) s += a[i] * b[i];                                                    \
        return s;                                                                               \
    }
#else
#define FASTFF_DEFINE_DOT(T, SUFFIX, VB)                                                       \
    static T fastff_dot_##SUFFIX(int n, const T *a, const T *b) {                              \
        T s = 0;                                                                                \
        for (int i = 0; i < n; ++i) s += a[i] * b[i];                                           \
        return s;                                                                               \
    }
#endif

#define FASTFF_DEFINE_PRIMITIVES(T, SUFFIX)                                                    \
    FASTFF_DEFINE_DOT(T, SUFFIX##_w64, 64)                                                      \
    FASTFF_DEFINE_DOT(T, SUFFIX##_w32, 32)                                                      \
    FASTFF_MULTIVERSION static void fastff_axpy_##SUFFIX(int n, T alpha, const T *x, T *y) {  \
        _Pragma("omp simd")                                                                     \
        for (int i = 0; i < n; ++i) y[i] += alpha * x[i];                                       \
    }


/* Dots of up to four rows at once, for rows that walk a tree in lockstep: their weight
 * rows are read as interleaved streams, so a block of rows whose nodes come from DRAM keeps
 * several fetches in flight instead of one. Each row's arithmetic is the same whatever the
 * block size, so a row's result does not depend on which rows share its block. */
#if defined(__GNUC__) || defined(__clang__)
#define FASTFF_DOTN_BODY(T, SUFFIX, N)                                                         \
    do {                                                                                        \
        enum { VBYTES = sizeof(fastff_vec_##SUFFIX), L = VBYTES / sizeof(T) };                                                       \
        fastff_vec_##SUFFIX c0[N], c1[N], u, v;                                                 \
        memset(c0, 0, sizeof(c0));                                                              \
        memset(c1, 0, sizeof(c1));                                                              \
        int i = 0;                                                                              \
        for (; i + 2 * L <= n; i += 2 * L) {                                                    \
            if (prefetch) {                                                                     \
                __builtin_prefetch((const char *)(prefetch + i), 0, 2);                         \
                __builtin_prefetch((const char *)(prefetch + i + L), 0, 2);                     \
            }                                                                                   \
            _Pragma("GCC unroll 4") for (int r = 0; r < N; ++r) {                               \
                memcpy(&u, a[r] + i, VBYTES); memcpy(&v, b[r] + i, VBYTES); c0[r] += u * v;             \
                memcpy(&u, a[r] + i + L, VBYTES); memcpy(&v, b[r] + i + L, VBYTES); c1[r] += u * v;     \
            }                                                                                   \
        }                                                                                       \
        for (; i + L <= n; i += L) {                                                            \
            _Pragma("GCC unroll 4") for (int r = 0; r < N; ++r) {                               \
                memcpy(&u, a[r] + i, VBYTES); memcpy(&v, b[r] + i, VBYTES); c0[r] += u * v;             \
            }                                                                                   \
        }                                                                                       \
        for (int r = 0; r < N; ++r) {                                                           \
            fastff_vec_##SUFFIX c = c0[r] + c1[r];                                              \
            T s = fastff_hsum_##SUFFIX(&c);                                                     \
            for (int j = i; j < n; ++j) s += a[r][j] * b[r][j];                                 \
            out[r] = s;                                                                         \
        }                                                                                       \
    } while (0)
#else
#define FASTFF_DOTN_BODY(T, SUFFIX, N)                                                         \
    do {                                                                                        \
        (void)prefetch;                                                                         \
        for (int r = 0; r < N; ++r) out[r] = fastff_dot_##SUFFIX(n, a[r], b[r]);                \
    } while (0)
#endif

/* out[r] = dot(a[r], b[r]) for r < nr (1..4), rows of length n.
 * The dots request prefetch[0..n) (unless NULL), a row the caller needs next, into L2 as they
 * go, two lines per step (see fastff_dot_block). */
#define FASTFF_DEFINE_BLOCK_PRIMITIVES(T, SUFFIX, VB)                                          \
    FASTFF_VECTOR_ATTR_##VB static void fastff_dotn_##SUFFIX(int nr, int n, const T *const *a,      \
                                                         const T *const *b, T *out,             \
                                                         const T *prefetch) {                   \
        switch (nr) {                                                                           \
        case 4: FASTFF_DOTN_BODY(T, SUFFIX, 4); break;                                          \
        case 3: FASTFF_DOTN_BODY(T, SUFFIX, 3); break;                                          \
        case 2: FASTFF_DOTN_BODY(T, SUFFIX, 2); break;                                          \
        default: FASTFF_DOTN_BODY(T, SUFFIX, 1); break;                                         \
        }                                                                                       \
    }

/* out[r * out_stride + j] = dot(x[r], w + j * w_stride) for r < nr (1..4) rows and j < nj
 * (1..4) weight rows, all of length n: a register-blocked micro-kernel, so each loaded x
 * vector serves nj weight rows and each weight vector nr rows (4x4: one load per two FMAs,
 * against two per FMA for separate dots). One accumulator per (row, weight row) pair, summed
 * the same way for any nr and nj, so a result does not depend on the block it was computed
 * in. 4x4 needs 16 accumulators + 5 operands: AVX-512's 32 registers; fastff_wide_registers()
 * tells the caller whether to use 4x2 blocks instead (8 + 5, within AVX2's 16). prefetch, unless NULL, is a row of n
 * elements the caller needs next: one of its cache lines is requested into L2 per step, so its
 * fetch overlaps this block's arithmetic instead of stalling the next block (rows a caller
 * visits in a data-dependent order are beyond the hardware prefetchers). */
/* Requests bytes [p, p + n) into L2, a cache line at a time, without waiting for them: the
 * next block's input rows that no dot call of this block requested on its way. */
static inline void fastff_prefetch_l2(const void *p, long n) {
#if defined(__GNUC__) || defined(__clang__)
    for (long k = 0; k < n; k += 64) __builtin_prefetch((const char *)p + k, 0, 2);
#else
    (void)p;
    (void)n;
#endif
}

/* Bytes of the L2 cache as the C library reports it (glibc reads CPUID), 0 where it does not
 * say (MSVC, musl). It may be a cluster's shared L2: callers bound what they derive from it. */
static inline long fastff_l2_cache_bytes(void) {
#if defined(_SC_LEVEL2_CACHE_SIZE)
    long n = sysconf(_SC_LEVEL2_CACHE_SIZE);
    return n > 0 ? n : 0;
#else
    return 0;
#endif
}

static inline int fastff_wide_registers(void) {
#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
    return __builtin_cpu_supports("avx512f");
#else
    return 0;
#endif
}

#if defined(__GNUC__) || defined(__clang__)
#define FASTFF_DOT_BLOCK_BODY(T, SUFFIX, NR, NJ)                                               \
    do {                                                                                        \
        enum { VBYTES = sizeof(fastff_vec_##SUFFIX), L = VBYTES / sizeof(T) };                                                       \
        fastff_vec_##SUFFIX c[NR][NJ], u[NR], v;                                                \
        memset(c, 0, sizeof(c));                                                                \
        int i = 0;                                                                              \
        for (; i + L <= n; i += L) {                                                            \
            if (prefetch) __builtin_prefetch((const char *)prefetch + i * sizeof(T), 0, 2);     \
            _Pragma("GCC unroll 4") for (int r = 0; r < NR; ++r) memcpy(&u[r], x[r] + i, VBYTES);   \
            _Pragma("GCC unroll 4") for (int j = 0; j < NJ; ++j) {                              \
                memcpy(&v, w + j * w_stride + i, VBYTES);                                           \
                _Pragma("GCC unroll 4") for (int r = 0; r < NR; ++r) c[r][j] += u[r] * v;       \
            }                                                                                   \
        }                                                                                       \
        for (int r = 0; r < NR; ++r) {                                                          \
            for (int j = 0; j < NJ; ++j) {                                                      \
                T s = fastff_hsum_##SUFFIX(&c[r][j]);                                           \
                for (int m = i; m < n; ++m) s += x[r][m] * w[j * w_stride + m];                 \
                out[r * out_stride + j] = s;                                                    \
            }                                                                                   \
        }                                                                                       \
    } while (0)
#define FASTFF_DOT_BLOCK_CASE(T, SUFFIX, NR)                                                   \
    case NR:                                                                                    \
        switch (nj) {                                                                           \
        case 4: FASTFF_DOT_BLOCK_BODY(T, SUFFIX, NR, 4); break;                                 \
        case 3: FASTFF_DOT_BLOCK_BODY(T, SUFFIX, NR, 3); break;                                 \
        case 2: FASTFF_DOT_BLOCK_BODY(T, SUFFIX, NR, 2); break;                                 \
        default: FASTFF_DOT_BLOCK_BODY(T, SUFFIX, NR, 1); break;                                \
        }                                                                                       \
        break;
#define FASTFF_DEFINE_DOT_BLOCK(T, SUFFIX, VB)                                                 \
    FASTFF_VECTOR_ATTR_##VB static void fastff_dot_block_##SUFFIX(                                  \
        int nr, int nj, int n, const T *const *x, const T *w, long w_stride, T *out,           \
        int out_stride, const T *prefetch) {                                                    \
        switch (nr) {                                                                           \
            FASTFF_DOT_BLOCK_CASE(T, SUFFIX, 4)                                                 \
            FASTFF_DOT_BLOCK_CASE(T, SUFFIX, 3)                                                 \
            FASTFF_DOT_BLOCK_CASE(T, SUFFIX, 2)                                                 \
            default: FASTFF_DOT_BLOCK_CASE(T, SUFFIX, 1)                                        \
        }                                                                                       \
    }
#else
#define FASTFF_DEFINE_DOT_BLOCK(T, SUFFIX, VB)                                                 \
    static void fastff_dot_block_##SUFFIX(int nr, int nj, int n, const T *const *x,             \
                                          const T *w, long w_stride, T *out, int out_stride,    \
                                          const T *prefetch) {                                  \
        (void)prefetch;                                                                         \
        for (int r = 0; r < nr; ++r)                                                            \
            for (int j = 0; j < nj; ++j)                                                        \
                out[r * out_stride + j] = fastff_dot_##SUFFIX(n, x[r], w + j * w_stride);       \
    }
#endif

/* For r < nr: y[r][i] += alpha[r][0] * x[r][0][i] + ... + alpha[r][m[r]-1] * x[r][m[r]-1][i],
 * added in k order (row r's terms at alpha + r * stride and x + r * stride); with overwrite,
 * the sums start from 0 instead of y (the same bits as zeroing y first, without reading it:
 * a batch's y is larger than L2, and a separate zeroing pass costs a trip through L3).
 * The same sums as m[r] axpys one after another, but each y row is loaded and stored once,
 * and all the weight rows are independent streams whose fetches can be in flight at once (a
 * walk's output rows are all known before the first is needed). The rows advance together,
 * chunk by chunk, so their streams interleave; eight accumulators cover the FMA latency. */
#if defined(__GNUC__) || defined(__clang__)
#define FASTFF_DEFINE_AXPYM(T, SUFFIX, VB)                                                     \
    FASTFF_VECTOR_ATTR_##VB static void fastff_axpym_##SUFFIX(                                      \
        int nr, const int *m, int stride, int n, const T *alpha, const T *const *x,             \
        T *const *y, int overwrite) {                                                           \
        enum { VBYTES = sizeof(fastff_vec_##SUFFIX), L = VBYTES / sizeof(T), W = 8 };                                              \
        fastff_vec_##SUFFIX c[W], u;                                                            \
        int i = 0;                                                                              \
        for (; i + W * L <= n; i += W * L) {                                                    \
            for (int r = 0; r < nr; ++r) {                                                      \
                const T *ar = alpha + r * stride;                                               \
                const T *const *xr = x + r * stride;                                            \
                if (overwrite)                                                                  \
                    memset(c, 0, sizeof(c));                                                    \
                else                                                                            \
                    memcpy(c, y[r] + i, sizeof(c));                                             \
                for (int k = 0; k < m[r]; ++k) {                                                \
                    const T a = ar[k], *xk = xr[k] + i;                                         \
                    _Pragma("GCC unroll 8") for (int w = 0; w < W; ++w) {                       \
                        memcpy(&u, xk + w * L, VBYTES); c[w] += a * u;                              \
                    }                                                                           \
                }                                                                               \
                memcpy(y[r] + i, c, sizeof(c));                                                 \
            }                                                                                   \
        }                                                                                       \
        for (int r = 0; r < nr; ++r) {                                                          \
            const T *ar = alpha + r * stride;                                                   \
            const T *const *xr = x + r * stride;                                                \
            int j = i;                                                                          \
            for (; j + L <= n; j += L) {                                                        \
                if (overwrite)                                                                  \
                    memset(&c[0], 0, VBYTES);                                                       \
                else                                                                            \
                    memcpy(&c[0], y[r] + j, VBYTES);                                                \
                for (int k = 0; k < m[r]; ++k) {                                                \
                    memcpy(&u, xr[k] + j, VBYTES); c[0] += ar[k] * u;                               \
                }                                                                               \
                memcpy(y[r] + j, &c[0], VBYTES);                                                    \
            }                                                                                   \
            if (j < n) { /* under one vector left (all of a short row: an FFF leaf's 10     \
                          * outputs): term by term in a buffer, so the partial vector loop  \
                          * still vectorises (GCC's narrower epilogue) */                    \
                T tail[L];                                                                      \
                const int left = n - j;                                                         \
                if (overwrite)                                                                  \
                    memset(tail, 0, left * sizeof(T));                                          \
                else                                                                            \
                    memcpy(tail, y[r] + j, left * sizeof(T));                                   \
                for (int k = 0; k < m[r]; ++k) {                                                \
                    const T a = ar[k], *xk = xr[k] + j;                                         \
                    _Pragma("omp simd") for (int e = 0; e < left; ++e) tail[e] += a * xk[e];    \
                }                                                                               \
                memcpy(y[r] + j, tail, left * sizeof(T));                                       \
            }                                                                                   \
        }                                                                                       \
    }
#else
#define FASTFF_DEFINE_AXPYM(T, SUFFIX, VB)                                                     \
    static void fastff_axpym_##SUFFIX(int nr, const int *m, int stride, int n, const T *alpha,  \
                                      const T *const *x, T *const *y, int overwrite) {          \
        for (int r = 0; r < nr; ++r)                                                            \
            for (int i = 0; i < n; ++i) {                                                       \
                T s = overwrite ? (T)0 : y[r][i];                                               \
                for (int k = 0; k < m[r]; ++k) s += alpha[r * stride + k] * x[r * stride + k][i]; \
                y[r][i] = s;                                                                    \
            }                                                                                   \
    }
#endif

/* relu(z) = (0 > z ? 0 : z), NaN propagated: x86's maxss / maxsd, which return the second
 * operand when unordered. Written as a C conditional, GCC compiles it to a branch, which
 * mispredicts for half of random inputs. z = -0.0 stays -0.0 (it compares equal to 0). */
#if defined(__x86_64__) || defined(_M_X64)
#include <emmintrin.h>
static inline float fastff_relu_f32(float z) {
    return _mm_cvtss_f32(_mm_max_ss(_mm_setzero_ps(), _mm_set_ss(z)));
}
static inline double fastff_relu_f64(double z) {
    return _mm_cvtsd_f64(_mm_max_sd(_mm_setzero_pd(), _mm_set_sd(z)));
}
#else
static inline float fastff_relu_f32(float z) { return 0.0f > z ? 0.0f : z; }
static inline double fastff_relu_f64(double z) { return 0.0 > z ? 0.0 : z; }
#endif

/* Optimizer updates of one run of n elements (fastff._cmm.adam_update / sgd_update): the
 * operations of fastff/optim.py's NumPy expressions, each rounded, in their order. Contraction
 * is off (an FMA would round once less than NumPy). Built per target like the rest: gradients
 * from GELU's tails and decaying moments are often subnormal, each vector instruction that meets
 * one costs a microcode assist, and wider vectors take fewer of them per element. */
#if defined(__GNUC__) && !defined(__clang__)
#define FASTFF_NO_CONTRACT __attribute__((optimize("fp-contract=off")))
#define FASTFF_NO_CONTRACT_BODY
#elif defined(__clang__)
#define FASTFF_NO_CONTRACT
#define FASTFF_NO_CONTRACT_BODY _Pragma("clang fp contract(off)")
#else
#define FASTFF_NO_CONTRACT
#define FASTFF_NO_CONTRACT_BODY
#endif

#define FASTFF_DEFINE_UPDATES(T, SUFFIX, SQRT)                                                 \
    FASTFF_MULTIVERSION FASTFF_NO_CONTRACT static void fastff_adam_##SUFFIX(                    \
        long n, T *p, const T *g, T *m, T *v, int l2, int decay, T wd, T keep, T b1, T omb1,    \
        T b2, T omb2, T unbias2, T eps, T step) {                                               \
        FASTFF_NO_CONTRACT_BODY                                                                 \
        for (long i = 0; i < n; ++i) {                                                          \
            T gi = g[i], pi = p[i];                                                             \
            if (l2) /* g = g + weight_decay * p */                                              \
                gi = gi + wd * pi;                                                              \
            else if (decay) /* p *= 1 - lr * weight_decay */                                    \
                pi = pi * keep;                                                                 \
            T mi = m[i] * b1;                                                                   \
            mi = mi + omb1 * gi;                                                                \
            m[i] = mi;                                                                          \
            T vi = v[i] * b2;                                                                   \
            vi = vi + omb2 * (gi * gi);                                                         \
            v[i] = vi;                                                                          \
            T d = SQRT(vi) * unbias2;                                                           \
            d = d + eps;                                                                        \
            p[i] = pi - step * (mi / d);                                                        \
        }                                                                                       \
    }                                                                                           \
    FASTFF_MULTIVERSION FASTFF_NO_CONTRACT static void fastff_sgd_##SUFFIX(                     \
        long n, T *p, const T *g, T *buf, int l2, int has_buf, int nesterov, T wd, T mom,       \
        T lr) {                                                                                 \
        FASTFF_NO_CONTRACT_BODY                                                                 \
        for (long i = 0; i < n; ++i) {                                                          \
            T gi = g[i];                                                                        \
            if (l2) /* g = g + weight_decay * p */                                              \
                gi = gi + wd * p[i];                                                            \
            if (has_buf) { /* buf = momentum * buf + g; g = g + momentum * buf, or buf */       \
                T bi = buf[i] * mom;                                                            \
                bi = bi + gi;                                                                   \
                buf[i] = bi;                                                                    \
                gi = nesterov ? gi + mom * bi : bi;                                             \
            }                                                                                   \
            p[i] = p[i] - lr * gi;                                                              \
        }                                                                                       \
    }

#include <math.h>
FASTFF_DEFINE_UPDATES(float, f32, sqrtf)
FASTFF_DEFINE_UPDATES(double, f64, sqrt)

FASTFF_DEFINE_PRIMITIVES(float, f32)
FASTFF_DEFINE_PRIMITIVES(double, f64)

/* The register-blocked primitives in two vector widths. They keep up to 16 (dot_block 4x4) or
 * 10 (dotn, axpym) vector accumulators and operands live: 64-byte vectors fit AVX-512's 32 zmm
 * registers, but on AVX2 each is two of only 16 ymm registers, and GCC spilled most of them to
 * the stack (measured on an AVX2 VM, calls through the clones, operands in L1: dotn 3.8 and
 * axpym 1.5 GMAC/s with 64-byte vectors, 14.2 and 5.7 with 32-byte ones). So x86-64-v4 runs the
 * 64-byte family and everything else the 32-byte one; fastff_use_w64 picks per call (a cached
 * CPU-feature test). A result does not depend on the block it was computed in, as before, but
 * it does on the width: CPUs with and without AVX-512 sum in different orders. */
#define FASTFF_DEFINE_VECTOR_KERNELS(T, SUFFIX, VB)                                            \
    FASTFF_DEFINE_BLOCK_PRIMITIVES(T, SUFFIX, VB)                                               \
    FASTFF_DEFINE_DOT_BLOCK(T, SUFFIX, VB)                                                      \
    FASTFF_DEFINE_AXPYM(T, SUFFIX, VB)
FASTFF_DEFINE_VECTOR_KERNELS(float, f32_w64, 64)
FASTFF_DEFINE_VECTOR_KERNELS(float, f32_w32, 32)
FASTFF_DEFINE_VECTOR_KERNELS(double, f64_w64, 64)
FASTFF_DEFINE_VECTOR_KERNELS(double, f64_w32, 32)

static inline int fastff_use_w64(void) { return FASTFF_USE_W64(); }

#define FASTFF_DEFINE_DISPATCH(T, SUFFIX)                                                      \
    static inline T fastff_dot_##SUFFIX(int n, const T *a, const T *b) {                       \
        return fastff_use_w64() ? fastff_dot_##SUFFIX##_w64(n, a, b)                            \
                                : fastff_dot_##SUFFIX##_w32(n, a, b);                           \
    }                                                                                           \
    static inline void fastff_dotn_##SUFFIX(int nr, int n, const T *const *a, const T *const *b, \
                                            T *out, const T *prefetch) {                        \
        if (fastff_use_w64())                                                                   \
            fastff_dotn_##SUFFIX##_w64(nr, n, a, b, out, prefetch);                             \
        else                                                                                    \
            fastff_dotn_##SUFFIX##_w32(nr, n, a, b, out, prefetch);                             \
    }                                                                                           \
    static inline void fastff_dot_block_##SUFFIX(int nr, int nj, int n, const T *const *x,      \
                                                 const T *w, long w_stride, T *out,             \
                                                 int out_stride, const T *prefetch) {           \
        if (fastff_use_w64())                                                                   \
            fastff_dot_block_##SUFFIX##_w64(nr, nj, n, x, w, w_stride, out, out_stride,         \
                                            prefetch);                                          \
        else                                                                                    \
            fastff_dot_block_##SUFFIX##_w32(nr, nj, n, x, w, w_stride, out, out_stride,         \
                                            prefetch);                                          \
    }                                                                                           \
    static inline void fastff_axpym_##SUFFIX(int nr, const int *m, int stride, int n,           \
                                             const T *alpha, const T *const *x, T *const *y,    \
                                             int overwrite) {                                   \
        if (fastff_use_w64())                                                                   \
            fastff_axpym_##SUFFIX##_w64(nr, m, stride, n, alpha, x, y, overwrite);              \
        else                                                                                    \
            fastff_axpym_##SUFFIX##_w32(nr, m, stride, n, alpha, x, y, overwrite);              \
    }
FASTFF_DEFINE_DISPATCH(float, f32)
FASTFF_DEFINE_DISPATCH(double, f64)

#endif
