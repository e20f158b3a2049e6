/* How fast can this machine read node records from DRAM? The floor under a deep UltraFFF.
 *
 * A depth-20 tree (768 -> 768, float32) keeps 2**21 records of 6 KB (input row | output row);
 * a batch of 4096 rows reads about 210 MB of distinct records below level 12, in random order.
 * This probe reads the same kind of traffic outside fastff: `nread` random records (or
 * consecutive ones) from a pool of `pool_mb`, `streams` records at a time per thread (fastff
 * walks 4 rows in lockstep), summing every float so no load can be skipped.
 *
 *   gcc -O3 -march=native -fopenmp benchmarks/record_bandwidth.c -o /tmp/record_bandwidth
 *   OMP_NUM_THREADS=2 /tmp/record_bandwidth [pool_mb=12288] [record_kb=6] [streams=4] [random=1]
 *
 * (-march=native is fine for a probe run where it was built, never for fastff's own build: with
 * AVX-512 one load covers a cache line, and fewer loads per line keep more lines in flight.)
 * Prints the best of 10 passes in GB/s. On the project's 2-core VM (2 threads): random 6 KB
 * records 27 GB/s with 4 streams, 29 GB/s with 8; random 3 KB records (input rows alone) 23 GB/s;
 * consecutive records 33 GB/s; one thread alone reads random 6 KB records at 14 GB/s; from a
 * 256 MB pool, which the host's L3 partly holds, random 6 KB records 36 GB/s. */
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

enum { MAX_STREAMS = 8, LINE = 16 };
typedef float line_t __attribute__((vector_size(64))); /* one cache line */

static unsigned long long next_random(unsigned long long *state) {
    *state = *state * 6364136223846793005ULL + 1442695040888963407ULL;
    return *state >> 17;
}

/* Sum of `streams` records read line by line in lockstep (constant S: the accumulators stay
 * in registers, so the loop is bound by memory, not by the adds). */
static inline __attribute__((always_inline)) double sum_records(const float *pool,
                                                                const size_t *order,
                                                                size_t record_floats, int S) {
    line_t acc[MAX_STREAMS] = {0}, v;
    for (size_t j = 0; j < record_floats; j += LINE)
        for (int s = 0; s < S; ++s) {
            memcpy(&v, pool + order[s] * record_floats + j, sizeof v);
            acc[s] += v;
        }
    double sum = 0;
    for (int s = 0; s < S; ++s)
        for (int k = 0; k < LINE; ++k) sum += acc[s][k];
    return sum;
}

int main(int argc, char **argv) {
    size_t pool_mb = argc > 1 ? strtoul(argv[1], 0, 10) : 12288;
    size_t record_floats = (argc > 2 ? strtoul(argv[2], 0, 10) : 6) * 1024 / sizeof(float);
    int streams = argc > 3 ? atoi(argv[3]) : 4;
    int random_order = argc > 4 ? atoi(argv[4]) : 1;
    if ((streams != 1 && streams != 2 && streams != 4 && streams != 8) || record_floats == 0) {
        fprintf(stderr, "streams must be 1, 2, 4 or 8 and record_kb at least 1\n");
        return 2;
    }
    size_t n_records = pool_mb * 1024 * 1024 / (record_floats * sizeof(float));
    size_t bytes = n_records * record_floats * sizeof(float);
    size_t nread = 210u * 1000 * 1000 / (record_floats * sizeof(float));
    nread -= nread % (size_t)streams;
    float *pool = mmap(0, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    size_t *order = malloc(nread * sizeof(size_t));
    if (pool == MAP_FAILED || !order || n_records < nread) {
        fprintf(stderr, "cannot allocate a pool of %zu MB holding %zu records\n", pool_mb, nread);
        return 1;
    }
    madvise(pool, bytes, MADV_HUGEPAGE); /* as NumPy does for large arrays */
#pragma omp parallel for
    for (size_t i = 0; i < n_records * record_floats; ++i) pool[i] = 1.0f;
    unsigned long long state = 1;
    double best = 1e30, checksum = 0;
    for (int pass = 0; pass < 12; ++pass) {
        for (size_t i = 0; i < nread; ++i)
            order[i] = random_order ? next_random(&state) % n_records
                                    : ((size_t)pass * nread + i) % n_records;
        double t = omp_get_wtime(), sum = 0;
#pragma omp parallel for reduction(+ : sum) schedule(static)
        for (size_t i = 0; i < nread; i += (size_t)streams) {
            switch (streams) {
            case 1: sum += sum_records(pool, order + i, record_floats, 1); break;
            case 2: sum += sum_records(pool, order + i, record_floats, 2); break;
            case 4: sum += sum_records(pool, order + i, record_floats, 4); break;
            default: sum += sum_records(pool, order + i, record_floats, 8); break;
            }
        }
        t = omp_get_wtime() - t;
        checksum += sum;
        if (pass >= 2 && t < best) best = t; /* the first passes fault pages in */
    }
    printf("%s %zu KB records, pool %zu MB, %d streams x %d threads: %.1f GB/s (%.0f)\n",
           random_order ? "random" : "consecutive", record_floats * sizeof(float) / 1024, pool_mb,
           streams, omp_get_max_threads(), nread * record_floats * sizeof(float) / best / 1e9,
           checksum);
    return 0;
}
