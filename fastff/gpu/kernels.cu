// CUDA CMM kernels of fastff, compiled once per process by cupy.RawModule.
//
// Layout as on the CPU: node g = t * n_nodes + k owns the contiguous rows w_in[g] (in_w) and
// w_out_t[g] (out_w). A warp owns one input row: coalesced loads of a node's weight row, a
// shuffle reduction for the dot product, and the row's x / y kept in shared memory. Weight
// gradients are summed without atomics: visits sorted by node, cut into chunks, each chunk
// summed by one block in fixed order, then chunks reduced in fixed order (deterministic).

#include "activations.h"  // inlined by fastff.gpu.kernels

__device__ __forceinline__ float erf_t(float v) { return erff(v); }
__device__ __forceinline__ double erf_t(double v) { return erf(v); }
__device__ __forceinline__ float exp_t(float v) { return expf(v); }
__device__ __forceinline__ double exp_t(double v) { return exp(v); }

template <typename T>
__device__ __forceinline__ T act_fn(T z, int act) {
    if (act == ACT_RELU) return z <= T(0) ? T(0) : z;  // NaN propagates, as on the CPU
    if (act == ACT_GELU) return T(0.5) * z * (T(1) + erf_t(z * T(0.7071067811865476)));
    return z;
}

template <typename T>
__device__ __forceinline__ T act_grad(T z, int act) {
    if (act == ACT_RELU) return z > T(0) ? T(1) : T(0);
    if (act == ACT_GELU)
        return T(0.5) * (T(1) + erf_t(z * T(0.7071067811865476)))
               + z * exp_t(T(-0.5) * z * z) * T(0.3989422804014327);
    return T(1);
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
    // xor butterfly: every lane ends with the same, order-fixed sum
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}

// One step of a neuron-tree walk: records visit v (node g, pre-activation z) when `record`,
// and returns the child the row goes to (right iff z > 0, as on the CPU).
template <typename T>
__device__ __forceinline__ long long walk_step(long long node, T z, long long g, bool record,
                                               long long v, long long* __restrict__ visited,
                                               T* __restrict__ preact) {
    if (record) {
        visited[v] = g;
        preact[v] = z;
    }
    return 2 * node + 1 + (z > T(0));
}

// y[r] = sum over trees and path nodes of act(z) * w_out_t[g]; optionally records the path.
template <typename T>
__global__ void ultra_forward(const T* __restrict__ x, const T* __restrict__ w_in,
                              const T* __restrict__ b_in, const T* __restrict__ w_out_t,
                              T* __restrict__ y, long long* __restrict__ visited,
                              T* __restrict__ preact, long long n_rows, int in_w, int out_w,
                              int depth, int n_trees, long long n_nodes, int act, int save,
                              int use_smem) {
    extern __shared__ unsigned char smem_raw[];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const long long row = (long long)blockIdx.x * (blockDim.x >> 5) + warp;
    if (row >= n_rows) return;  // the whole warp leaves together
    const T* x_row = x + row * in_w;
    T* y_row = y + row * out_w;
    const T* xs = x_row;
    T* ys = y_row;
    if (use_smem) {
        T* base = reinterpret_cast<T*>(smem_raw) + (size_t)warp * (in_w + out_w);
        for (int i = lane; i < in_w; i += 32) base[i] = x_row[i];
        xs = base;
        ys = base + in_w;
    }
    for (int j = lane; j < out_w; j += 32) ys[j] = T(0);
    __syncwarp();
    const int path = depth + 1;
    for (int t = 0; t < n_trees; ++t) {
        long long node = 0;
        for (int level = 0; level < path; ++level) {
            const long long g = t * n_nodes + node;
            const T* w = w_in + g * in_w;
            T partial = T(0);
            for (int i = lane; i < in_w; i += 32) partial += w[i] * xs[i];
            const T z = warp_sum(partial) + b_in[g];
            const T a = act_fn(z, act);
            if (a != T(0)) {
                const T* wo = w_out_t + g * out_w;
                for (int j = lane; j < out_w; j += 32) ys[j] += a * wo[j];
            }
            node = walk_step(node, z, g, save && lane == 0, row * (long long)(n_trees * path)
                             + t * path + level, visited, preact);
        }
    }
    __syncwarp();
    if (use_smem)
        for (int j = lane; j < out_w; j += 32) y_row[j] = ys[j];
}

// Backward pass 1, a warp per row: dz and act(z) of every visit, and dx (overwritten).
template <typename T>
__global__ void ultra_backward_rows(const T* __restrict__ dy, const T* __restrict__ w_in,
                                    const T* __restrict__ w_out_t,
                                    const long long* __restrict__ visited,
                                    const T* __restrict__ preact, T* __restrict__ dz_out,
                                    T* __restrict__ a_out, T* __restrict__ dx, long long n_rows,
                                    int in_w, int out_w, int visits_per_row, int act,
                                    int use_smem) {
    extern __shared__ unsigned char smem_raw[];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const long long row = (long long)blockIdx.x * (blockDim.x >> 5) + warp;
    if (row >= n_rows) return;
    const T* dy_row = dy + row * out_w;
    T* dx_row = dx + row * in_w;
    const T* dys = dy_row;
    T* dxs = dx_row;
    if (use_smem) {
        T* base = reinterpret_cast<T*>(smem_raw) + (size_t)warp * (in_w + out_w);
        for (int j = lane; j < out_w; j += 32) base[j] = dy_row[j];
        dys = base;
        dxs = base + out_w;
    }
    for (int i = lane; i < in_w; i += 32) dxs[i] = T(0);
    __syncwarp();
    for (int k = 0; k < visits_per_row; ++k) {
        const long long v = row * visits_per_row + k;
        const long long g = visited[v];
        const T z = preact[v];
        const T* wo = w_out_t + g * out_w;
        T partial = T(0);
        for (int j = lane; j < out_w; j += 32) partial += dys[j] * wo[j];
        const T dz = warp_sum(partial) * act_grad(z, act);
        if (lane == 0) {
            dz_out[v] = dz;
            a_out[v] = act_fn(z, act);
        }
        if (dz != T(0)) {
            const T* w = w_in + g * in_w;
            for (int i = lane; i < in_w; i += 32) dxs[i] += dz * w[i];
        }
    }
    __syncwarp();
    if (use_smem)
        for (int i = lane; i < in_w; i += 32) dx_row[i] = dxs[i];
}

// ---- float32 fast path: widths divisible by 4 and <= 32*4*K ---------------------------------
// The row's input and its output accumulators live in registers (K float4 per lane each) and
// weight rows are read with 128-bit loads: lane l reads float4 number l + 32k of a row, so a
// warp reads 512 contiguous bytes per step.

__device__ __forceinline__ float dot4(float4 a, float4 b) {
    return a.x * b.x + a.y * b.y + a.z * b.z + a.w * b.w;
}
__device__ __forceinline__ void axpy4(float a, float4 w, float4& acc) {
    acc.x += a * w.x; acc.y += a * w.y; acc.z += a * w.z; acc.w += a * w.w;
}

// A node's w_in and w_out_t chunks are requested together, before the dot's shuffle reduction:
// the output row does not depend on z, so its L2 latency hides behind the reduction instead of
// following it. __launch_bounds__(256, 1) lets ptxas keep all of a node's 2K loads in flight
// (more registers, fewer resident warps); its default register target issued them in two or
// three dependent rounds. x is read once (streaming load) and y written once (streaming store),
// which keeps L2 for the weights. Measured on an H200 (benchmarks/gpu_probe.py, gpu-ufb): 106.7
// us for the previous kernel, 51.5 us for this structure.
// A read-only 16-byte load the compiler issues exactly here. A plain __ldg whose value is used
// only inside `if (a != 0)` may be sunk into that branch, after the reduction it was meant to
// overlap; volatile asm is never moved into a conditional.
// (PTX helpers are left out under tests/cuda_emulator.h, which runs these kernels on the host
// with plain loads in their place.)
#ifndef FASTFF_HOST_EMULATION
__device__ __forceinline__ float4 ldg_here(const float4* p) {
    float4 v;
    asm volatile("ld.global.nc.v4.f32 {%0, %1, %2, %3}, [%4];"
                 : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w)
                 : "l"(p));
    return v;
}
#endif

template <int K>
__global__ void __launch_bounds__(256, 2)
    ultra_forward_f4(const float* __restrict__ x, const float* __restrict__ w_in,
                     const float* __restrict__ b_in, const float* __restrict__ w_out_t,
                     float* __restrict__ y, long long* __restrict__ visited,
                     float* __restrict__ preact, long long n_rows, int in_w, int out_w, int depth,
                     int n_trees, long long n_nodes, int act, int save) {
    const int lane = threadIdx.x & 31;
    const long long row = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= n_rows) return;
    const int in4 = in_w >> 2, out4 = out_w >> 2;
    const float4 zero = make_float4(0.f, 0.f, 0.f, 0.f);
    const float4* x4 = reinterpret_cast<const float4*>(x + row * in_w);
    float4 xr[K], yr[K];
#pragma unroll
    for (int k = 0; k < K; ++k) {
        const int q = lane + 32 * k;
        xr[k] = q < in4 ? __ldcs(x4 + q) : zero;
        yr[k] = zero;
    }
    const int path = depth + 1;
    for (int t = 0; t < n_trees; ++t) {
        long long node = 0;
#pragma unroll 1
        for (int level = 0; level < path; ++level) {
            const long long g = t * n_nodes + node;
            const float4* w4 = reinterpret_cast<const float4*>(w_in + g * in_w);
            const float4* wo4 = reinterpret_cast<const float4*>(w_out_t + g * out_w);
            float4 wi[K], wo[K];
#pragma unroll
            for (int k = 0; k < K; ++k) {
                const int q = lane + 32 * k;
                wi[k] = q < in4 ? __ldg(w4 + q) : zero;
            }
#pragma unroll
            for (int k = 0; k < K; ++k) {
                const int q = lane + 32 * k;
                wo[k] = q < out4 ? ldg_here(wo4 + q) : zero;
            }
            const float bias = __ldg(b_in + g);
            float partial = 0.f;
#pragma unroll
            for (int k = 0; k < K; ++k) partial += dot4(wi[k], xr[k]);
            const float z = warp_sum(partial) + bias;
            const float a = act_fn(z, act);
            if (a != 0.f) {  // relu zeros add nothing (and no 0 * inf from an extreme weight)
#pragma unroll
                for (int k = 0; k < K; ++k) axpy4(a, wo[k], yr[k]);
            }
            node = walk_step(node, z, g, save && lane == 0, row * (long long)(n_trees * path)
                             + t * path + level, visited, preact);
        }
    }
    float4* y4 = reinterpret_cast<float4*>(y + row * out_w);
#pragma unroll
    for (int k = 0; k < K; ++k) {
        const int q = lane + 32 * k;
        if (q < out4) __stcs(y4 + q, yr[k]);
    }
}

// As the forward: a visit's w_out_t and w_in chunks are requested together, before the dot's
// reduction (the visits are known, so nothing waits on dz but the axpy itself).
template <int K>
__global__ void __launch_bounds__(256, 2)
    ultra_backward_rows_f4(const float* __restrict__ dy, const float* __restrict__ w_in,
                           const float* __restrict__ w_out_t,
                           const long long* __restrict__ visited,
                           const float* __restrict__ preact, float* __restrict__ dz_out,
                           float* __restrict__ a_out, float* __restrict__ dx, long long n_rows,
                           int in_w, int out_w, int visits_per_row, int act) {
    const int lane = threadIdx.x & 31;
    const long long row = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= n_rows) return;
    const int in4 = in_w >> 2, out4 = out_w >> 2;
    const float4 zero = make_float4(0.f, 0.f, 0.f, 0.f);
    const float4* dy4 = reinterpret_cast<const float4*>(dy + row * out_w);
    float4 dyr[K], dxr[K];
#pragma unroll
    for (int k = 0; k < K; ++k) {
        const int q = lane + 32 * k;
        dyr[k] = q < out4 ? dy4[q] : zero;
        dxr[k] = zero;
    }
#pragma unroll 1
    for (int j = 0; j < visits_per_row; ++j) {
        const long long v = row * visits_per_row + j;
        const long long g = visited[v];
        const float z = preact[v];
        const float4* wo4 = reinterpret_cast<const float4*>(w_out_t + g * out_w);
        const float4* w4 = reinterpret_cast<const float4*>(w_in + g * in_w);
        float4 wo[K], wi[K];
#pragma unroll
        for (int k = 0; k < K; ++k) {
            const int q = lane + 32 * k;
            wo[k] = q < out4 ? __ldg(wo4 + q) : zero;
        }
#pragma unroll
        for (int k = 0; k < K; ++k) {
            const int q = lane + 32 * k;
            wi[k] = q < in4 ? ldg_here(w4 + q) : zero;
        }
        float partial = 0.f;
#pragma unroll
        for (int k = 0; k < K; ++k) partial += dot4(wo[k], dyr[k]);
        const float dz = warp_sum(partial) * act_grad(z, act);
        if (lane == 0) {
            dz_out[v] = dz;
            a_out[v] = act_fn(z, act);
        }
        if (dz != 0.f) {
#pragma unroll
            for (int k = 0; k < K; ++k) axpy4(dz, wi[k], dxr[k]);
        }
    }
    float4* dx4 = reinterpret_cast<float4*>(dx + row * in_w);
#pragma unroll
    for (int k = 0; k < K; ++k) {
        const int q = lane + 32 * k;
        if (q < in4) dx4[q] = dxr[k];
    }
}

// ---- half-precision weights, inference ----------------------------------------------------
// Weights, biases included, are stored as 16-bit bits (uint16 views of the layer's arrays):
// bfloat16 (HALF_BF16) or float16 (HALF_F16), the codes of fastff._cmm.HALF_KINDS. x, y and the
// saved pre-activations are float32, each weight is widened to float32 as it is loaded, and
// every dot and sum accumulates in float32, as on the CPU.
#define HALF_BF16 1
#define HALF_F16 2

#ifndef FASTFF_HOST_EMULATION
__device__ __forceinline__ float f16_to_f32(unsigned short h) {
    float f;  // the instruction __half2float issues; inline PTX spares NVRTC the cuda_fp16.h path
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}
// ldg_here for 16-byte chunks of 16-bit weights
__device__ __forceinline__ uint4 ldg_here_u4(const uint4* p) {
    uint4 v;
    asm volatile("ld.global.nc.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p));
    return v;
}
#endif

// one 16-bit weight (the low half of `bits`) as float32; bfloat16 widens exactly by a shift
template <int KIND>
__device__ __forceinline__ float widen_half(unsigned int bits) {
    if (KIND == HALF_BF16) return __uint_as_float(bits << 16);
    return f16_to_f32((unsigned short)(bits & 0xffffu));
}

// the 8 weights of a 16-byte chunk (element 0 in the low half of u.x: little-endian)
template <int KIND>
__device__ __forceinline__ void widen8(const uint4 u, float (&f)[8]) {
    const unsigned int w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        if (KIND == HALF_BF16) {
            f[2 * i] = __uint_as_float(w[i] << 16);
            f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
        } else {
            f[2 * i] = widen_half<KIND>(w[i]);
            f[2 * i + 1] = widen_half<KIND>(w[i] >> 16);
        }
    }
}

template <int KIND>
__device__ __forceinline__ float warp_dot_half(const unsigned short* __restrict__ w,
                                               const float* __restrict__ x, int n, int lane) {
    float s = 0.f;
    for (int i = lane; i < n; i += 32) s += widen_half<KIND>(__ldg(w + i)) * x[i];
    return warp_sum(s);
}

// Any widths: a warp per row, x read from global memory, y accumulated in place (each lane
// owns the columns lane + 32j, so no lane reads another's sums).
template <int KIND>
__global__ void ultra_forward_half(const float* __restrict__ x,
                                   const unsigned short* __restrict__ w_in,
                                   const unsigned short* __restrict__ b_in,
                                   const unsigned short* __restrict__ w_out_t,
                                   float* __restrict__ y, long long* __restrict__ visited,
                                   float* __restrict__ preact, long long n_rows, int in_w,
                                   int out_w, int depth, int n_trees, long long n_nodes, int act,
                                   int save) {
    const int lane = threadIdx.x & 31;
    const long long row = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= n_rows) return;
    const float* xr = x + row * in_w;
    float* yr = y + row * out_w;
    for (int j = lane; j < out_w; j += 32) yr[j] = 0.f;
    const int path = depth + 1;
    for (int t = 0; t < n_trees; ++t) {
        long long node = 0;
        for (int level = 0; level < path; ++level) {
            const long long g = t * n_nodes + node;
            const float z =
                warp_dot_half<KIND>(w_in + g * in_w, xr, in_w, lane) + widen_half<KIND>(b_in[g]);
            const float a = act_fn(z, act);
            if (a != 0.f) {
                const unsigned short* wo = w_out_t + g * out_w;
                for (int j = lane; j < out_w; j += 32) yr[j] += a * widen_half<KIND>(__ldg(wo + j));
            }
            node = walk_step(node, z, g, save && lane == 0, row * (long long)(n_trees * path)
                             + t * path + level, visited, preact);
        }
    }
}

// Register path, widths divisible by 8 and <= 32 * 8 * K: ultra_forward_f4's walk with a
// node's rows read as 16-byte chunks of 8 weights (lane l owns chunks l + 32k), so a visit moves
// half float32's bytes. x's and y's matching 8 floats per chunk stay in registers. Not yet
// timed: benchmarks/gpu_probe.py's nearest variant (bfloat16, widths fixed at compile time,
// a float32 bias) took 36-40 us on an H200 for gpu-ufb, against 51.5 us for float32.
template <int K, int KIND>
__global__ void __launch_bounds__(256, 2)
    ultra_forward_h8(const float* __restrict__ x, const unsigned short* __restrict__ w_in,
                     const unsigned short* __restrict__ b_in,
                     const unsigned short* __restrict__ w_out_t, float* __restrict__ y,
                     long long* __restrict__ visited, float* __restrict__ preact,
                     long long n_rows, int in_w, int out_w, int depth, int n_trees,
                     long long n_nodes, int act, int save) {
    const int lane = threadIdx.x & 31;
    const long long row = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= n_rows) return;
    const int in8 = in_w >> 3, out8 = out_w >> 3;
    const uint4 zero_u = {0u, 0u, 0u, 0u};
    const float4* x4 = reinterpret_cast<const float4*>(x + row * in_w);
    float xr[K][8], yr[K][8];
#pragma unroll
    for (int k = 0; k < K; ++k) {
        const int q = lane + 32 * k;
        float4 lo = make_float4(0.f, 0.f, 0.f, 0.f), hi = lo;
        if (q < in8) {
            lo = __ldcs(x4 + 2 * q);
            hi = __ldcs(x4 + 2 * q + 1);
        }
        xr[k][0] = lo.x; xr[k][1] = lo.y; xr[k][2] = lo.z; xr[k][3] = lo.w;
        xr[k][4] = hi.x; xr[k][5] = hi.y; xr[k][6] = hi.z; xr[k][7] = hi.w;
#pragma unroll
        for (int j = 0; j < 8; ++j) yr[k][j] = 0.f;
    }
    const int path = depth + 1;
    for (int t = 0; t < n_trees; ++t) {
        long long node = 0;
#pragma unroll 1
        for (int level = 0; level < path; ++level) {
            const long long g = t * n_nodes + node;
            const uint4* wi8 = reinterpret_cast<const uint4*>(w_in + g * in_w);
            const uint4* wo8 = reinterpret_cast<const uint4*>(w_out_t + g * out_w);
            uint4 wi[K], wo[K];
#pragma unroll
            for (int k = 0; k < K; ++k) {
                const int q = lane + 32 * k;
                wi[k] = q < in8 ? __ldg(wi8 + q) : zero_u;
            }
#pragma unroll
            for (int k = 0; k < K; ++k) {
                const int q = lane + 32 * k;
                wo[k] = q < out8 ? ldg_here_u4(wo8 + q) : zero_u;
            }
            const float bias = widen_half<KIND>(__ldg(b_in + g));
            float acc0 = 0.f, acc1 = 0.f;  // two chains: half the FMA latency, fixed order
#pragma unroll
            for (int k = 0; k < K; ++k) {
                float f[8];
                widen8<KIND>(wi[k], f);
#pragma unroll
                for (int j = 0; j < 8; j += 2) {
                    acc0 = fmaf(f[j], xr[k][j], acc0);
                    acc1 = fmaf(f[j + 1], xr[k][j + 1], acc1);
                }
            }
            const float z = warp_sum(acc0 + acc1) + bias;
            const float a = act_fn(z, act);
            if (a != 0.f) {  // as ultra_forward_f4
#pragma unroll
                for (int k = 0; k < K; ++k) {
                    float f[8];
                    widen8<KIND>(wo[k], f);
#pragma unroll
                    for (int j = 0; j < 8; ++j) yr[k][j] = fmaf(a, f[j], yr[k][j]);
                }
            }
            node = walk_step(node, z, g, save && lane == 0, row * (long long)(n_trees * path)
                             + t * path + level, visited, preact);
        }
    }
    float4* y4 = reinterpret_cast<float4*>(y + row * out_w);
#pragma unroll
    for (int k = 0; k < K; ++k) {
        const int q = lane + 32 * k;
        if (q < out8) {
            __stcs(y4 + 2 * q, make_float4(yr[k][0], yr[k][1], yr[k][2], yr[k][3]));
            __stcs(y4 + 2 * q + 1, make_float4(yr[k][4], yr[k][5], yr[k][6], yr[k][7]));
        }
    }
}

// Router-leaf FFF inference with 16-bit weights: fff_hard_forward's mode 0 (right iff z >= 0),
// a warp per row.
template <int KIND>
__global__ void fff_infer_half(const float* __restrict__ x,
                               const unsigned short* __restrict__ node_w,
                               const unsigned short* __restrict__ node_b,
                               const unsigned short* __restrict__ w1t,
                               const unsigned short* __restrict__ b1,
                               const unsigned short* __restrict__ w2,
                               const unsigned short* __restrict__ b2, float* __restrict__ y,
                               long long n_rows, int in_w, int leaf_w, int out_w, int depth,
                               int act) {
    const int lane = threadIdx.x & 31;
    const long long row = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= n_rows) return;
    const float* xr = x + row * in_w;
    const long long n_nodes = (1LL << depth) - 1;
    long long node = 0;
    for (int level = 0; level < depth; ++level) {
        const float z = warp_dot_half<KIND>(node_w + node * in_w, xr, in_w, lane)
                        + widen_half<KIND>(node_b[node]);
        node = 2 * node + 1 + (z >= 0.f);
    }
    const long long l = node - n_nodes;
    float* yr = y + row * out_w;
    for (int j = lane; j < out_w; j += 32) yr[j] = widen_half<KIND>(b2[l * out_w + j]);
    for (int k = 0; k < leaf_w; ++k) {
        const long long unit = l * leaf_w + k;
        const float h = warp_dot_half<KIND>(w1t + unit * in_w, xr, in_w, lane)
                        + widen_half<KIND>(b1[unit]);
        const float a = act_fn(h, act);
        if (a != 0.f) {
            const unsigned short* w2r = w2 + unit * out_w;
            for (int j = lane; j < out_w; j += 32) yr[j] += a * widen_half<KIND>(__ldg(w2r + j));
        }
    }
}

// ---- weight gradients, race-free and deterministic ----------------------------------------
// Visits are sorted by node (order = a stable argsort of the node ids). They are cut into chunks:
// a new chunk starts at a new node or every `chunk` visits, so each chunk lies within one node's
// run and the root's B visits spread over many blocks. Each chunk is summed in order by one
// block, then each node's chunks are added in order. No atomics and no host synchronisation:
// the chunk count stays on the device and the grids are launched at their upper bound.

// Gather per sorted visit: its row, dz and act(z); flag chunk starts.
template <typename T>
__global__ void ultra_sorted_visits(const int* __restrict__ order,
                                    const long long* __restrict__ visited_flat,
                                    const T* __restrict__ dz, const T* __restrict__ a,
                                    long long n_visits, int visits_per_row, int chunk,
                                    int* __restrict__ row_sorted, T* __restrict__ dz_sorted,
                                    T* __restrict__ a_sorted, int* __restrict__ flags) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n_visits) return;
    const int v = order[i];
    row_sorted[i] = v / visits_per_row;
    dz_sorted[i] = dz[v];
    a_sorted[i] = a[v];
    flags[i] = (i == 0) || (visited_flat[v] != visited_flat[order[i - 1]]) || (i % chunk == 0);
}

// chunk_start[c] / chunk_node[c] of the c-th chunk (c = inclusive scan of flags - 1).
__global__ void ultra_chunk_table(const int* __restrict__ flags, const int* __restrict__ scan,
                                  const int* __restrict__ order,
                                  const long long* __restrict__ visited_flat, long long n_visits,
                                  int* __restrict__ chunk_start, long long* __restrict__ chunk_node) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n_visits || !flags[i]) return;
    const int c = scan[i] - 1;
    chunk_start[c] = (int)i;
    chunk_node[c] = visited_flat[order[i]];
}

// Block (chunk, column block): partial[chunk] = [sum dz*x | sum a*dy | sum dz] over the chunk's
// visits in order (width in_w + out_w + 1). The chunk's rows and scalars are staged in shared
// memory so the loop issues only independent, coalesced row loads.
#define CHUNK_MAX 256
template <typename T>
__global__ void ultra_grad_chunks(const T* __restrict__ x, const T* __restrict__ dy,
                                  const int* __restrict__ row_sorted,
                                  const T* __restrict__ dz_sorted, const T* __restrict__ a_sorted,
                                  const int* __restrict__ chunk_start,
                                  const int* __restrict__ n_chunks_ptr, long long n_visits,
                                  int in_w, int out_w, T* __restrict__ partial) {
    __shared__ int rows[CHUNK_MAX];
    __shared__ T dzs[CHUNK_MAX], as[CHUNK_MAX];
    const int n_chunks = *n_chunks_ptr;
    const int chunk = blockIdx.x;
    if (chunk >= n_chunks) return;
    const int start = chunk_start[chunk];
    const int stop = chunk + 1 < n_chunks ? chunk_start[chunk + 1] : (int)n_visits;
    const int n = stop - start;
    for (int k = threadIdx.x; k < n; k += blockDim.x) {
        rows[k] = row_sorted[start + k];
        dzs[k] = dz_sorted[start + k];
        as[k] = a_sorted[start + k];
    }
    __syncthreads();
    const int width = in_w + out_w + 1;
    const int col = blockIdx.y * blockDim.x + threadIdx.x;
    if (col >= width) return;
    T acc = T(0);
    if (col < in_w) {
#pragma unroll 4
        for (int k = 0; k < n; ++k) acc += dzs[k] * x[(long long)rows[k] * in_w + col];
    } else if (col < in_w + out_w) {
        const int c = col - in_w;
#pragma unroll 4
        for (int k = 0; k < n; ++k) acc += as[k] * dy[(long long)rows[k] * out_w + c];
    } else {
        for (int k = 0; k < n; ++k) acc += dzs[k];
    }
    partial[(long long)chunk * width + col] = acc;
}

// The first chunk of each node's run adds the run's chunks, in order, into the gradient rows.
template <typename T>
__global__ void ultra_grad_reduce(const T* __restrict__ partial,
                                  const long long* __restrict__ chunk_node,
                                  const int* __restrict__ n_chunks_ptr, int in_w, int out_w,
                                  T* __restrict__ grad_w_in, T* __restrict__ grad_b_in,
                                  T* __restrict__ grad_w_out_t) {
    const int n_chunks = *n_chunks_ptr;
    const int c0 = blockIdx.x;
    if (c0 >= n_chunks) return;
    const long long g = chunk_node[c0];
    if (c0 > 0 && chunk_node[c0 - 1] == g) return;
    const int width = in_w + out_w + 1;
    const int col = blockIdx.y * blockDim.x + threadIdx.x;
    if (col >= width) return;
    T acc = T(0);
    for (int c = c0; c < n_chunks && chunk_node[c] == g; ++c)
        acc += partial[(long long)c * width + col];
    if (col < in_w) grad_w_in[g * in_w + col] += acc;
    else if (col < in_w + out_w) grad_w_out_t[g * out_w + (col - in_w)] += acc;
    else grad_b_in[g] += acc;
}

// ---- router-leaf FFF ---------------------------------------------------------------------------
// Same layouts and semantics as the CPU kernels in fastff/_cmm.pyx (see there): node_w
// (n_nodes, in), w1t (n_leaves, leaf, in), b1 (n_leaves, leaf), w2 (n_leaves, leaf, out),
// b2 (n_leaves, out). A warp per row for the hard paths; a thread per row or element for the
// soft-mixture bookkeeping around cuBLAS GEMMs.

__device__ __forceinline__ float sigmoid_t(float z) { return 1.f / (1.f + expf(-z)); }
__device__ __forceinline__ double sigmoid_t(double z) { return 1.0 / (1.0 + exp(-z)); }
__device__ __forceinline__ float log_t(float v) { return logf(v); }
__device__ __forceinline__ double log_t(double v) { return log(v); }

// The package's clamped Bernoulli entropy (eps 1e-6) and its derivative in q.
template <typename T>
__device__ __forceinline__ T entropy_t(T q, T* dh_dq) {
    const T eps = T(1e-6), top = T(1) - eps;
    bool in_p = true, in_m = true;
    T p = q, m = T(1) - q;
    if (p < eps) { p = eps; in_p = false; } else if (p > top) { p = top; in_p = false; }
    if (m < eps) { m = eps; in_m = false; } else if (m > top) { m = top; in_m = false; }
    const T lp = log_t(p), lm = log_t(m);
    if (dh_dq) {
        T d = T(0);
        if (in_p) d -= lp + T(1);
        if (in_m) d += lm + T(1);
        *dh_dq = d;
    }
    return -p * lp - m * lm;
}

template <typename T>
__device__ __forceinline__ T warp_dot(const T* __restrict__ a, const T* __restrict__ b, int n,
                                      int lane) {
    T s = T(0);
    for (int i = lane; i < n; i += 32) s += a[i] * b[i];
    return warp_sum(s);
}

// Hard walk + reached leaf. mode 0: inference (right iff z >= 0, the package's eval_forward);
// mode 1: hardened training (right iff the possibly swapped sigmoid > 1/2; records the path,
// logits, leaf, hidden pre-activations and summed entropy; applies the dropout mask).
template <typename T>
__global__ void fff_hard_forward(const T* __restrict__ x, const T* __restrict__ node_w,
                                 const T* __restrict__ node_b, const T* __restrict__ w1t,
                                 const T* __restrict__ b1, const T* __restrict__ w2,
                                 const T* __restrict__ b2, long long n_rows, int in_w,
                                 int leaf_w, int out_w, int depth, int act, int mode,
                                 const unsigned char* __restrict__ swap, int has_swap,
                                 const T* __restrict__ drop, int has_drop, T* __restrict__ y,
                                 long long* __restrict__ path, T* __restrict__ z_path,
                                 long long* __restrict__ leaf, T* __restrict__ hpre,
                                 T* __restrict__ entropy) {
    const int lane = threadIdx.x & 31;
    const long long row = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= n_rows) return;
    const T* xr = x + row * in_w;
    const long long n_nodes = (1LL << depth) - 1;
    long long node = 0;
    T total = T(0);
    for (int level = 0; level < depth; ++level) {
        const T z = warp_dot(node_w + node * in_w, xr, in_w, lane) + node_b[node];
        if (mode == 0) {
            node = 2 * node + 1 + (z >= T(0));
        } else {
            const bool swapped = has_swap && swap[row * depth + level];
            T q = sigmoid_t(z);
            if (swapped) q = T(1) - q;
            total += entropy_t(q, (T*)nullptr);
            if (lane == 0) {
                path[row * depth + level] = node;
                z_path[row * depth + level] = z;
            }
            node = 2 * node + 1 + (swapped ? (z < T(0)) : (z > T(0)));
        }
    }
    const long long l = node - n_nodes;
    T* yr = y + row * out_w;
    const T* b2l = b2 + l * out_w;
    for (int j = lane; j < out_w; j += 32) yr[j] = b2l[j];
    __syncwarp();
    for (int k = 0; k < leaf_w; ++k) {
        const T h = warp_dot(w1t + (l * leaf_w + k) * in_w, xr, in_w, lane) + b1[l * leaf_w + k];
        T a = act_fn(h, act);
        if (has_drop) a *= drop[row * leaf_w + k];
        if (mode == 1 && lane == 0) hpre[row * leaf_w + k] = h;
        if (a != T(0)) {
            const T* w2r = w2 + (l * leaf_w + k) * out_w;
            for (int j = lane; j < out_w; j += 32) yr[j] += a * w2r[j];
        }
    }
    if (mode == 1 && lane == 0) {
        leaf[row] = l;
        entropy[row] = total;
    }
}

// Hardened backward, a warp per row: leaf hidden gradients, router gradients from the entropy
// term, dx, and the parameter gradients of the row's leaf and path (atomics: rows of one leaf
// add into the same rows, so float sums are not bitwise reproducible here; see the README).
template <typename T>
__global__ void fff_hard_backward(const T* __restrict__ x, const T* __restrict__ dy,
                                  const T* __restrict__ node_w, const T* __restrict__ w1t,
                                  const T* __restrict__ w2, const long long* __restrict__ path,
                                  const T* __restrict__ z_path, const long long* __restrict__ leaf,
                                  const unsigned char* __restrict__ swap, int has_swap,
                                  const T* __restrict__ drop, int has_drop,
                                  const T* __restrict__ hpre, long long n_rows, int in_w,
                                  int leaf_w, int out_w, int depth, int act, T entropy_weight,
                                  T* __restrict__ dx, T* __restrict__ grad_node_w,
                                  T* __restrict__ grad_node_b, T* __restrict__ grad_w1t,
                                  T* __restrict__ grad_b1, T* __restrict__ grad_w2,
                                  T* __restrict__ grad_b2) {
    const int lane = threadIdx.x & 31;
    const long long row = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= n_rows) return;
    const T* xr = x + row * in_w;
    const T* dyr = dy + row * out_w;
    T* dxr = dx + row * in_w;
    const long long l = leaf[row];
    for (int i = lane; i < in_w; i += 32) dxr[i] = T(0);
    for (int j = lane; j < out_w; j += 32) atomicAdd(grad_b2 + l * out_w + j, dyr[j]);
    __syncwarp();
    for (int k = 0; k < leaf_w; ++k) {
        const long long unit = l * leaf_w + k;
        const T h = hpre[row * leaf_w + k];
        const T keep = has_drop ? drop[row * leaf_w + k] : T(1);
        T d = warp_dot(w2 + unit * out_w, dyr, out_w, lane) * act_grad(h, act) * keep;
        const T a = act_fn(h, act) * keep;
        if (a != T(0))
            for (int j = lane; j < out_w; j += 32) atomicAdd(grad_w2 + unit * out_w + j, a * dyr[j]);
        if (d != T(0)) {
            const T* w = w1t + unit * in_w;
            for (int i = lane; i < in_w; i += 32) {
                dxr[i] += d * w[i];
                atomicAdd(grad_w1t + unit * in_w + i, d * xr[i]);
            }
            if (lane == 0) atomicAdd(grad_b1 + unit, d);
        }
    }
    if (entropy_weight == T(0)) return;
    for (int level = 0; level < depth; ++level) {
        const bool swapped = has_swap && swap[row * depth + level];
        T q = sigmoid_t(z_path[row * depth + level]);
        if (swapped) q = T(1) - q;
        T dh_dq;
        entropy_t(q, &dh_dq);
        T slope = q * (T(1) - q);
        if (swapped) slope = -slope;
        const T d = entropy_weight * dh_dq * slope;
        if (d == T(0)) continue;
        const long long node = path[row * depth + level];
        const T* w = node_w + node * in_w;
        for (int i = lane; i < in_w; i += 32) {
            dxr[i] += d * w[i];
            atomicAdd(grad_node_w + node * in_w + i, d * xr[i]);
        }
        if (lane == 0) atomicAdd(grad_node_b + node, d);
    }
}

// Soft mixture, a thread per row: right weights q, heap-order reach products, summed entropy.
template <typename T>
__global__ void fff_soft_mixture(const T* __restrict__ z, const unsigned char* __restrict__ swap,
                                 int has_swap, long long n_rows, long long n_nodes,
                                 T* __restrict__ q, T* __restrict__ reach, T* __restrict__ entropy) {
    const long long r = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= n_rows) return;
    const long long width = 2 * n_nodes + 1;
    T* re = reach + r * width;
    T total = T(0);
    re[0] = T(1);
    for (long long n = 0; n < n_nodes; ++n) {
        T p = sigmoid_t(z[r * n_nodes + n]);
        if (has_swap && swap[r * n_nodes + n]) p = T(1) - p;
        q[r * n_nodes + n] = p;
        total += entropy_t(p, (T*)nullptr);
        re[2 * n + 1] = re[n] * (T(1) - p);
        re[2 * n + 2] = re[n] * p;
    }
    entropy[r] = total;
}

template <typename T>
__global__ void fff_soft_router_backward(const T* __restrict__ dmix, const T* __restrict__ q,
                                         const T* __restrict__ reach,
                                         const unsigned char* __restrict__ swap, int has_swap,
                                         long long n_rows,
                                         long long n_nodes, T entropy_weight,
                                         T* __restrict__ dreach, T* __restrict__ dz) {
    const long long r = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= n_rows) return;
    const long long n_leaves = n_nodes + 1, width = 2 * n_nodes + 1;
    const T* re = reach + r * width;
    T* dre = dreach + r * width;
    for (long long l = 0; l < n_leaves; ++l) dre[n_nodes + l] = dmix[r * n_leaves + l];
    for (long long n = n_nodes - 1; n >= 0; --n) {
        const T qn = q[r * n_nodes + n];
        const T left = dre[2 * n + 1], right = dre[2 * n + 2];
        T g = re[n] * (right - left);
        if (entropy_weight != T(0)) {
            T dh_dq;
            entropy_t(qn, &dh_dq);
            g += entropy_weight * dh_dq;
        }
        // dp/dz of the sigmoid; a region-leak swap (q = 1 - p) flips the sign of dq/dz
        const T slope = qn * (T(1) - qn);
        dz[r * n_nodes + n] = (has_swap && swap[r * n_nodes + n]) ? -g * slope : g * slope;
        dre[n] = left * (T(1) - qn) + right * qn;
    }
}

// Element (row, k = leaf * leaf_w + j): bias, activation, dropout and mixture weight.
template <typename T>
__global__ void fff_soft_leaf_activate(T* __restrict__ hpre, const T* __restrict__ b1,
                                       const T* __restrict__ mix, const T* __restrict__ drop,
                                       int has_drop, long long n_rows, long long n_units,
                                       int leaf_w, int act, T* __restrict__ a, T* __restrict__ mixed) {
    const long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= n_rows * n_units) return;
    const long long r = e / n_units, k = e - r * n_units;
    const T h = hpre[e] + b1[k];
    hpre[e] = h;
    T v = act_fn(h, act);
    if (has_drop) v *= drop[e];
    a[e] = v;
    mixed[e] = v * mix[r * (n_units / leaf_w) + k / leaf_w];
}

// (row, leaf): dmix += sum_j a * g; g becomes the pre-activation gradient mix * g * drop * act'.
template <typename T>
__global__ void fff_soft_leaf_backward(const T* __restrict__ hpre, const T* __restrict__ a,
                                       T* __restrict__ g, const T* __restrict__ mix,
                                       const T* __restrict__ drop, int has_drop, long long n_rows,
                                       long long n_leaves, int leaf_w, int act,
                                       T* __restrict__ dmix) {
    const long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= n_rows * n_leaves) return;
    const long long r = e / n_leaves, l = e - r * n_leaves;
    const T m = mix[e];
    T s = T(0);
    for (int j = 0; j < leaf_w; ++j) {
        const long long k = (r * n_leaves + l) * leaf_w + j;
        s += a[k] * g[k];
        T d = m * g[k] * act_grad(hpre[k], act);
        if (has_drop) d *= drop[k];
        g[k] = d;
    }
    dmix[e] += s;
}
