// Host emulation of the CUDA features fastff/gpu/kernels.cu's warp-per-row kernels use, so
// tests/test_cuda_emulated.py can run those kernels' own source on a machine without a GPU
// and compare them with the CPU kernels. Each lane is a std::thread; a warp's lanes meet at a
// barrier for every shuffle and __syncwarp, so a lane reads its partner's value exactly as the
// hardware hands it over. Not emulated: shared memory between warps (__shared__ arrays,
// __syncthreads), atomics' ordering, and the memory system (loads and stores are plain).
#pragma once
#define FASTFF_HOST_EMULATION 1
#include <pthread.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <thread>
#include <vector>

struct dim3_ {
    unsigned x = 0, y = 0, z = 0;
};
thread_local dim3_ threadIdx, blockIdx;
dim3_ blockDim, gridDim;

struct alignas(16) float4 {
    float x, y, z, w;
};
struct alignas(16) uint4 {
    unsigned int x, y, z, w;
};
inline float4 make_float4(float a, float b, float c, float d) { return {a, b, c, d}; }

#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __restrict__ __restrict
#define __shared__
unsigned char smem_raw[1];  // the general kernels' dynamic shared memory: run with use_smem = 0

template <class T> inline T __ldg(const T* p) { return *p; }
template <class T> inline T __ldcs(const T* p) { return *p; }
template <class T> inline void __stcs(T* p, T v) { *p = v; }
inline float4 ldg_here(const float4* p) { return *p; }
inline uint4 ldg_here_u4(const uint4* p) { return *p; }
inline float __uint_as_float(unsigned int u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

// IEEE binary16 -> binary32, exact (normals, subnormals, zeros, infinities, NaNs)
inline float f16_to_f32(unsigned short h) {
    const unsigned int sign = (unsigned int)(h & 0x8000u) << 16;
    const unsigned int exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu;
    if (exp == 0x1fu) return __uint_as_float(sign | 0x7f800000u | (mant << 13));
    if (exp != 0) return __uint_as_float(sign | ((exp + 112u) << 23) | (mant << 13));
    const float magnitude = std::ldexp((float)mant, -24);  // subnormal or zero
    return sign ? -magnitude : magnitude;
}

struct Warp {
    pthread_barrier_t barrier;
    double values[32];
};
thread_local Warp* current_warp;

inline void __syncthreads() { std::abort(); }  // block-level kernels are not emulated
inline void __syncwarp(unsigned = 0xffffffffu) { pthread_barrier_wait(&current_warp->barrier); }

template <class T>
inline T __shfl_xor_sync(unsigned, T value, int lane_mask) {
    const int lane = threadIdx.x & 31;
    current_warp->values[lane] = (double)value;  // exact for float and double
    pthread_barrier_wait(&current_warp->barrier);
    const T other = (T)current_warp->values[lane ^ lane_mask];
    pthread_barrier_wait(&current_warp->barrier);
    return other;
}

// kernel<<<grid, block>>>: every block in turn, each of its warps as 32 threads.
inline void launch(unsigned grid, unsigned block, const std::function<void()>& kernel) {
    gridDim.x = grid;
    blockDim.x = block;
    const unsigned n_warps = block / 32;
    for (unsigned b = 0; b < grid; ++b) {
        std::vector<Warp> warps(n_warps);
        for (auto& w : warps) pthread_barrier_init(&w.barrier, nullptr, 32);
        std::vector<std::thread> threads;
        for (unsigned t = 0; t < block; ++t)
            threads.emplace_back([&, b, t] {
                blockIdx.x = b;
                threadIdx.x = t;
                current_warp = &warps[t / 32];
                kernel();
            });
        for (auto& t : threads) t.join();
        for (auto& w : warps) pthread_barrier_destroy(&w.barrier);
    }
}
