/* Dot and axpy for the CMM kernels, compiled once per instruction set and picked at load time.
 *
 * Wheels must run on any x86-64, so there is no -march flag; instead GCC's target_clones builds
 * x86-64-v4 (AVX-512), x86-64-v3 (AVX2+FMA) and baseline versions and an ifunc resolver picks
 * one for the running CPU. Elsewhere (clang, macOS, arm64) the portable loop is compiled for
 * the default target. `omp simd` (-fopenmp-simd) lets the compiler reassociate the dot product's sum.
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

#define FASTFF_DEFINE_PRIMITIVES(T, SUFFIX)                                                    \
    FASTFF_MULTIVERSION static T fastff_dot_##SUFFIX(int n, const T *a, const T *b) {         \
        T s = 0;                                                                                \
        _Pragma("omp simd reduction(+:s)")                                                      \
        for (int i = 0; i < n; ++i) s += a[i] * b[i];                                           \
        return s;                                                                               \
    }                                                                                           \
    FASTFF_MULTIVERSION static void fastff_axpy_##SUFFIX(int n, T alpha, const T *x, T *y) {  \
        _Pragma("omp simd")                                                                     \
        for (int i = 0; i < n; ++i) y[i] += alpha * x[i];                                       \
    }

FASTFF_DEFINE_PRIMITIVES(float, f32)
FASTFF_DEFINE_PRIMITIVES(double, f64)

#endif
