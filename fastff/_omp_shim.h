/* OpenMP runtime calls that also exist in a serial build (compiler without OpenMP). */
#ifndef FASTFF_OMP_SHIM_H
#define FASTFF_OMP_SHIM_H
#if defined(_OPENMP)
#include <omp.h>
#else
static inline int omp_get_max_threads(void) { return 1; }
static inline void omp_set_num_threads(int n) { (void)n; }
static inline int omp_get_thread_num(void) { return 0; }
#endif
#endif
