/* Half-precision weights (bfloat16, float16) for the CMM kernels: the walk's dots and output
 * sums with the weights stored in 16 bits and widened to float32 as they are loaded; inputs,
 * accumulators and outputs are float32.
 *
 * Deep trees are bound by the bytes of the node rows they fetch, so halving those bytes is the
 * whole point; the widening costs one shift (bfloat16) or one vcvtph2ps (float16) per 8 values,
 * well under the load it follows. AVX-512 BF16's vdpbf16ps would multiply in bfloat16 and
 * need the input rows rounded to bfloat16 as well; widening keeps float32 inputs exact.
 *
 * One AVX2+FMA+F16C version (x86-64-v3 machines, AVX-512 ones included) and a portable one,
 * picked at run time by fastff_half_fast(), never by -march. The kind argument selects the
 * format: FASTFF_BF16 or FASTFF_F16.
 */
#ifndef FASTFF_HALF_H
#define FASTFF_HALF_H

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define FASTFF_BF16 1
#define FASTFF_F16 2

static inline float fastff_bf16_to_f32(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* IEEE binary16 -> binary32, exact for every input (subnormals, infinities, NaN payloads). */
static inline float fastff_f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
    uint32_t bits;
    if (exp == 0x1fu) {
        bits = sign | 0x7f800000u | (man << 13);
    } else if (exp != 0) {
        bits = sign | ((exp + 112u) << 23) | (man << 13);
    } else if (man == 0) {
        bits = sign;
    } else { /* subnormal: normalise */
        int e = -1;
        do {
            man <<= 1;
            ++e;
        } while (!(man & 0x400u));
        bits = sign | ((uint32_t)(112 - e) << 23) | ((man & 0x3ffu) << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline float fastff_half_to_f32(int kind, uint16_t h) {
    return kind == FASTFF_BF16 ? fastff_bf16_to_f32(h) : fastff_f16_to_f32(h);
}

/* Portable: out[r] = dot(x[r], w[r]) for r < nr; y[r] (+)= sum_k alpha[r*stride+k] w[r*stride+k]. */
static void fastff_dotn_half_portable(int kind, int nr, int n, const uint16_t *const *w,
                                      const float *const *x, float *out) {
    for (int r = 0; r < nr; ++r) {
        float s = 0.0f;
        for (int i = 0; i < n; ++i) s += x[r][i] * fastff_half_to_f32(kind, w[r][i]);
        out[r] = s;
    }
}

static void fastff_axpym_half_portable(int kind, int nr, const int *m, int stride, int n,
                                       const float *alpha, const uint16_t *const *w,
                                       float *const *y, int overwrite) {
    for (int r = 0; r < nr; ++r)
        for (int i = 0; i < n; ++i) {
            float s = overwrite ? 0.0f : y[r][i];
            for (int k = 0; k < m[r]; ++k)
                s += alpha[r * stride + k] * fastff_half_to_f32(kind, w[r * stride + k][i]);
            y[r][i] = s;
        }
}

/* Portable: out[r * out_stride + j] = dot(x[r], w + j * w_stride), r < nr, j < nj. */
static void fastff_dot_block_half_portable(int kind, int nr, int nj, int n,
                                           const float *const *x, const uint16_t *w,
                                           long w_stride, float *out, int out_stride) {
    for (int r = 0; r < nr; ++r)
        for (int j = 0; j < nj; ++j) {
            const uint16_t *wj = w + j * w_stride;
            float s = 0.0f;
            for (int i = 0; i < n; ++i) s += x[r][i] * fastff_half_to_f32(kind, wj[i]);
            out[r * out_stride + j] = s;
        }
}

#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
#include <immintrin.h>
#define FASTFF_HALF_ATTR __attribute__((target("avx2,fma,f16c")))

FASTFF_HALF_ATTR static inline __m256 fastff_widen8(int kind, const uint16_t *p) {
    __m128i h = _mm_loadu_si128((const __m128i *)p);
    if (kind == FASTFF_BF16)
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    return _mm256_cvtph_ps(h);
}

FASTFF_HALF_ATTR static inline float fastff_hsum8(__m256 v) {
    __m128 q = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    q = _mm_add_ps(q, _mm_movehl_ps(q, q));
    q = _mm_add_ss(q, _mm_movehdup_ps(q));
    return _mm_cvtss_f32(q);
}

/* The rows' dots advance together, 16 values a step, so their weight streams interleave
 * (several fetches in flight), as fastff_dotn does for float32 weights. */
#define FASTFF_DOTN_HALF(KIND)                                                                 \
    do {                                                                                        \
        __m256 a0[4], a1[4];                                                                    \
        for (int r = 0; r < nr; ++r) a0[r] = a1[r] = _mm256_setzero_ps();                      \
        int i = 0;                                                                              \
        for (; i + 16 <= n; i += 16)                                                            \
            for (int r = 0; r < nr; ++r) {                                                      \
                a0[r] = _mm256_fmadd_ps(_mm256_loadu_ps(x[r] + i), fastff_widen8(KIND, w[r] + i), \
                                        a0[r]);                                                 \
                a1[r] = _mm256_fmadd_ps(_mm256_loadu_ps(x[r] + i + 8),                           \
                                        fastff_widen8(KIND, w[r] + i + 8), a1[r]);              \
            }                                                                                   \
        for (; i + 8 <= n; i += 8)                                                              \
            for (int r = 0; r < nr; ++r)                                                        \
                a0[r] = _mm256_fmadd_ps(_mm256_loadu_ps(x[r] + i), fastff_widen8(KIND, w[r] + i), \
                                        a0[r]);                                                 \
        for (int r = 0; r < nr; ++r) {                                                          \
            float s = fastff_hsum8(_mm256_add_ps(a0[r], a1[r]));                                \
            for (int j = i; j < n; ++j) s += x[r][j] * fastff_half_to_f32(KIND, w[r][j]);       \
            out[r] = s;                                                                         \
        }                                                                                       \
    } while (0)

FASTFF_HALF_ATTR static void fastff_dotn_half_avx2(int kind, int nr, int n,
                                                   const uint16_t *const *w,
                                                   const float *const *x, float *out) {
    if (nr > 4) { /* the kernels pass 1..4 rows; more would overflow the accumulators */
        fastff_dotn_half_portable(kind, nr, n, w, x, out);
        return;
    }
    if (kind == FASTFF_BF16)
        FASTFF_DOTN_HALF(FASTFF_BF16);
    else
        FASTFF_DOTN_HALF(FASTFF_F16);
}

/* Each y row is loaded and stored once per 32 values, all its terms' weight rows streamed. */
#define FASTFF_AXPYM_HALF(KIND)                                                                \
    do {                                                                                        \
        for (int r = 0; r < nr; ++r) {                                                          \
            const float *ar = alpha + r * stride;                                               \
            const uint16_t *const *wr = w + r * stride;                                         \
            float *yr = y[r];                                                                   \
            int i = 0;                                                                          \
            for (; i + 32 <= n; i += 32) {                                                      \
                __m256 c[4];                                                                    \
                for (int v = 0; v < 4; ++v)                                                     \
                    c[v] = overwrite ? _mm256_setzero_ps() : _mm256_loadu_ps(yr + i + 8 * v);   \
                for (int k = 0; k < m[r]; ++k) {                                                \
                    const __m256 a = _mm256_set1_ps(ar[k]);                                     \
                    for (int v = 0; v < 4; ++v)                                                 \
                        c[v] = _mm256_fmadd_ps(a, fastff_widen8(KIND, wr[k] + i + 8 * v), c[v]); \
                }                                                                               \
                for (int v = 0; v < 4; ++v) _mm256_storeu_ps(yr + i + 8 * v, c[v]);             \
            }                                                                                   \
            for (; i + 8 <= n; i += 8) {                                                        \
                __m256 c = overwrite ? _mm256_setzero_ps() : _mm256_loadu_ps(yr + i);           \
                for (int k = 0; k < m[r]; ++k)                                                  \
                    c = _mm256_fmadd_ps(_mm256_set1_ps(ar[k]), fastff_widen8(KIND, wr[k] + i), c); \
                _mm256_storeu_ps(yr + i, c);                                                    \
            }                                                                                   \
            for (; i < n; ++i) {                                                                \
                float s = overwrite ? 0.0f : yr[i];                                             \
                for (int k = 0; k < m[r]; ++k) s += ar[k] * fastff_half_to_f32(KIND, wr[k][i]); \
                yr[i] = s;                                                                      \
            }                                                                                   \
        }                                                                                       \
    } while (0)

FASTFF_HALF_ATTR static void fastff_axpym_half_avx2(int kind, int nr, const int *m, int stride,
                                                    int n, const float *alpha,
                                                    const uint16_t *const *w, float *const *y,
                                                    int overwrite) {
    if (kind == FASTFF_BF16)
        FASTFF_AXPYM_HALF(FASTFF_BF16);
    else
        FASTFF_AXPYM_HALF(FASTFF_F16);
}

/* A register-blocked tile (the router-leaf FFF's leaves and top routers): up to 4 rows x 2
 * weight rows, so each widened weight vector serves every row of the block (the widening
 * costs as many uops as the FMAs it feeds; shared by 4 rows, it is a quarter of them).
 * 8 accumulators cover the FMA latency; larger tiles go as 4x2 pieces. */
#define FASTFF_DOT_BLOCK_HALF(KIND)                                                            \
    do {                                                                                        \
        __m256 acc[4][2];                                                                       \
        for (int r = 0; r < nr; ++r)                                                            \
            for (int j = 0; j < nj; ++j) acc[r][j] = _mm256_setzero_ps();                       \
        int i = 0;                                                                              \
        for (; i + 8 <= n; i += 8) {                                                            \
            __m256 wv[2];                                                                       \
            for (int j = 0; j < nj; ++j) wv[j] = fastff_widen8(KIND, w + j * w_stride + i);     \
            for (int r = 0; r < nr; ++r) {                                                      \
                const __m256 xv = _mm256_loadu_ps(x[r] + i);                                    \
                for (int j = 0; j < nj; ++j) acc[r][j] = _mm256_fmadd_ps(xv, wv[j], acc[r][j]); \
            }                                                                                   \
        }                                                                                       \
        for (int r = 0; r < nr; ++r)                                                            \
            for (int j = 0; j < nj; ++j) {                                                      \
                float s = fastff_hsum8(acc[r][j]);                                              \
                const uint16_t *wj = w + j * w_stride;                                          \
                for (int e = i; e < n; ++e) s += x[r][e] * fastff_half_to_f32(KIND, wj[e]);     \
                out[r * out_stride + j] = s;                                                    \
            }                                                                                   \
    } while (0)

FASTFF_HALF_ATTR static void fastff_dot_block_half_4x2(int kind, int nr, int nj, int n,
                                                       const float *const *x, const uint16_t *w,
                                                       long w_stride, float *out,
                                                       int out_stride) {
    if (kind == FASTFF_BF16)
        FASTFF_DOT_BLOCK_HALF(FASTFF_BF16);
    else
        FASTFF_DOT_BLOCK_HALF(FASTFF_F16);
}

static void fastff_dot_block_half_avx2(int kind, int nr, int nj, int n, const float *const *x,
                                       const uint16_t *w, long w_stride, float *out,
                                       int out_stride) {
    for (int r = 0; r < nr; r += 4)
        for (int j = 0; j < nj; j += 2)
            fastff_dot_block_half_4x2(kind, nr - r < 4 ? nr - r : 4, nj - j < 2 ? nj - j : 2, n,
                                      x + r, w + j * w_stride, w_stride, out + r * out_stride + j,
                                      out_stride);
}

static inline int fastff_half_fast(void) {
    static int fast = -1; /* benign race: every thread computes the same value */
    if (fast < 0)
        fast = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
               __builtin_cpu_supports("f16c") && !getenv("FASTFF_HALF_PORTABLE");
    return fast;
}
#else
static inline int fastff_half_fast(void) { return 0; }
#define fastff_dotn_half_avx2 fastff_dotn_half_portable
#define fastff_axpym_half_avx2 fastff_axpym_half_portable
#define fastff_dot_block_half_avx2 fastff_dot_block_half_portable
#endif

static inline void fastff_dot_block_half(int kind, int nr, int nj, int n, const float *const *x,
                                         const uint16_t *w, long w_stride, float *out,
                                         int out_stride) {
    if (fastff_half_fast())
        fastff_dot_block_half_avx2(kind, nr, nj, n, x, w, w_stride, out, out_stride);
    else
        fastff_dot_block_half_portable(kind, nr, nj, n, x, w, w_stride, out, out_stride);
}

static inline void fastff_dotn_half(int kind, int nr, int n, const uint16_t *const *w,
                                    const float *const *x, float *out) {
    if (fastff_half_fast())
        fastff_dotn_half_avx2(kind, nr, n, w, x, out);
    else
        fastff_dotn_half_portable(kind, nr, n, w, x, out);
}

static inline void fastff_axpym_half(int kind, int nr, const int *m, int stride, int n,
                                     const float *alpha, const uint16_t *const *w,
                                     float *const *y, int overwrite) {
    if (fastff_half_fast())
        fastff_axpym_half_avx2(kind, nr, m, stride, n, alpha, w, y, overwrite);
    else
        fastff_axpym_half_portable(kind, nr, m, stride, n, alpha, w, y, overwrite);
}

#endif
