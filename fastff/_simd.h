/* Dot and axpy for the CMM kernels, compiled once per instruction set and picked at load time.
 *
 * Wheels must run on any x86-64, so there is no -march flag; instead GCC's target_clones builds
 * x86-64-v4 (AVX-512), x86-64-v3 (AVX2+FMA) and baseline versions and an ifunc resolver picks
 * one for the running CPU. Elsewhere (clang, macOS, arm64) the portable loop is compiled for
 * the default target. `omp simd` (-fopenmp-simd) vectorises the axpy; the dot keeps four accumulators.
 */
#ifndef FASTFF_SIMD_H
#define FASTFF_SIMD_H

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__) && \
    !defined(FASTFF_NO_MULTIVERSION)
#define FASTFF_MULTIVERSION \
    __attribute__((noinline, target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FASTFF_MULTIVERSION
#endif

#include <string.h>

#if defined(__GNUC__) || defined(__clang__)
/* Four independent 64-byte accumulators: a single accumulator (what `omp simd reduction`
 * gives) makes a 768-long float dot a chain of 48 dependent FMAs, about 4x its throughput
 * bound; this form measured 1.8x faster on L1-resident rows. memcpy compiles to unaligned
 * vector loads. Each target clone maps the 64-byte vectors onto its own registers (one zmm,
 * two ymm or four xmm). */
#define FASTFF_DEFINE_DOT(T, SUFFIX)                                                           \
    typedef T fastff_vec_##SUFFIX __attribute__((vector_size(64)));                            \
    FASTFF_MULTIVERSION static T fastff_dot_##SUFFIX(int n, const T *a, const T *b) {         \
        enum { L = 64 / sizeof(T) };                                                            \
        fastff_vec_##SUFFIX c0 = {0}, c1 = {0}, c2 = {0}, c3 = {0}, u0, u1, u2, u3, v0, v1,    \
                            v2, v3;                                                             \
        int i = 0;                                                                              \
        for (; i + 4 * L <= n; i += 4 * L) {                                                    \
            memcpy(&u0, a + i, 64); memcpy(&u1, a + i + L, 64);                                 \
            memcpy(&u2, a + i + 2 * L, 64); memcpy(&u3, a + i + 3 * L, 64);                     \
            memcpy(&v0, b + i, 64); memcpy(&v1, b + i + L, 64);                                 \
            memcpy(&v2, b + i + 2 * L, 64); memcpy(&v3, b + i + 3 * L, 64);                     \
            c0 += u0 * v0; c1 += u1 * v1; c2 += u2 * v2; c3 += u3 * v3;                         \
        }                                                                                       \
        for (; i + L <= n; i += L) {                                                            \
            memcpy(&u0, a + i, 64); memcpy(&v0, b + i, 64);                                     \
            c0 += u0 * v0;                                                                      \
        }                                                                                       \
        c0 = (c0 + c1) + (c2 + c3);                                                             \
        T s = 0;                                                                                \
        for (int k = 0; k < L; ++k) s += c0[k];                                                 \
        for (; i < n; ++i) s += a[i] * b[i];                                                    \
        return s;                                                                               \
    }
#else
#define FASTFF_DEFINE_DOT(T, SUFFIX)                                                           \
    static T fastff_dot_##SUFFIX(int n, const T *a, const T *b) {                              \
        T s = 0;                                                                                \
        for (int i = 0; i < n; ++i) s += a[i] * b[i];                                           \
        return s;                                                                               \
    }
#endif

#define FASTFF_DEFINE_PRIMITIVES(T, SUFFIX)                                                    \
    FASTFF_DEFINE_DOT(T, SUFFIX)                                                                \
    FASTFF_MULTIVERSION static void fastff_axpy_##SUFFIX(int n, T alpha, const T *x, T *y) {  \
        _Pragma("omp simd")                                                                     \
        for (int i = 0; i < n; ++i) y[i] += alpha * x[i];                                       \
    }

FASTFF_DEFINE_PRIMITIVES(float, f32)
FASTFF_DEFINE_PRIMITIVES(double, f64)

#endif
