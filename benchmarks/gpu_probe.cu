// Forward-inference variants of the UltraFFF neuron tree, for benchmarks/gpu_probe.py (issue 24).
//
// Layout (as fastff's GPU layer): node g owns w_in[g] (IN_W weights) and w_out_t[g] (OUT_W
// weights), both contiguous rows; b_in fp32; x and y fp32, row-major. Weights W are fp32 or bf16
// (stored as unsigned short, widened by a 16-bit shift, so no cuda_bf16.h is needed).
//
// All kernels share one inner step (walk_levels): a row's 16-byte weight chunks are spread over
// LPR lanes, the row's x and y live in registers in the same chunk layout, and a node's w_in and
// w_out_t chunks are both requested before the dot product's shuffle reduction (the out row does
// not depend on z, so its L2 latency hides behind the reduction). Every variant sums in the same
// order, so the grouped pipeline (top_walk + sub_walk) reproduces walk_full<W, LPR, 1> bit for bit.

#ifndef IN_W
#define IN_W 768
#endif
#ifndef OUT_W
#define OUT_W 768
#endif
#ifndef DEPTH
#define DEPTH 11
#endif

#define FULL_MASK 0xffffffffu

// MINB (blocks of 256 per SM) steers ptxas: without it, ptxas aims at ~80 registers and issues a
// node's 12 loads in two or three dependent rounds; with MINB=1 or 2 it keeps them all in flight
// (more registers, fewer warps). The probe compiles both and times both.
#ifdef MINB
#define LAUNCH_BOUNDS __launch_bounds__(256, MINB)
#else
#define LAUNCH_BOUNDS __launch_bounds__(256)
#endif

typedef unsigned short bf16_t;

template <typename W>
struct Pack;
template <>
struct Pack<float> {
    static constexpr int N = 4;  // weights per 16-byte load
};
template <>
struct Pack<bf16_t> {
    static constexpr int N = 8;
};

// Chunk geometry: chunk c of a row covers elements [c * N, c * N + N); lane `sub` of a row's
// LPR lanes owns chunks sub + LPR * k, k < K.
template <typename W, int LPR>
struct Geo {
    static constexpr int N = Pack<W>::N;
    static constexpr int KI = IN_W / (N * LPR);
    static constexpr int KO = OUT_W / (N * LPR);
    static_assert(KI * N * LPR == IN_W, "IN_W must be a multiple of N * LPR");
    static_assert(KO * N * LPR == OUT_W, "OUT_W must be a multiple of N * LPR");
};

__device__ __forceinline__ void widen(const uint4 u, float (&f)[4]) {
    f[0] = __uint_as_float(u.x);
    f[1] = __uint_as_float(u.y);
    f[2] = __uint_as_float(u.z);
    f[3] = __uint_as_float(u.w);
}

// bf16 -> fp32 is exact: the bf16 bits are the high half of the float (element 0 in the low half)
__device__ __forceinline__ void widen(const uint4 u, float (&f)[8]) {
    f[0] = __uint_as_float(u.x << 16);
    f[1] = __uint_as_float(u.x & 0xffff0000u);
    f[2] = __uint_as_float(u.y << 16);
    f[3] = __uint_as_float(u.y & 0xffff0000u);
    f[4] = __uint_as_float(u.z << 16);
    f[5] = __uint_as_float(u.z & 0xffff0000u);
    f[6] = __uint_as_float(u.w << 16);
    f[7] = __uint_as_float(u.w & 0xffff0000u);
}

__device__ __forceinline__ float gelu(float z) {
    return 0.5f * z * (1.f + erff(z * 0.7071067811865476f));
}

template <int LPR>
__device__ __forceinline__ float group_sum(float v) {
    // xor butterfly inside aligned groups of LPR lanes: every lane of the group gets the same sum
#pragma unroll
    for (int off = LPR / 2; off > 0; off >>= 1) v += __shfl_xor_sync(FULL_MASK, v, off);
    return v;
}

// x row -> registers; `stream` marks a last use (evict-first), else x stays cached for a reread.
template <int N, int K, int LPR>
__device__ __forceinline__ void load_x(const float* __restrict__ xrow, int sub, bool stream,
                                       float (&xr)[K][N]) {
#pragma unroll
    for (int k = 0; k < K; ++k) {
        const float4* p = reinterpret_cast<const float4*>(xrow + (sub + LPR * k) * N);
#pragma unroll
        for (int h = 0; h < N / 4; ++h) {
            const float4 v = stream ? __ldcs(p + h) : __ldg(p + h);
            xr[k][4 * h] = v.x;
            xr[k][4 * h + 1] = v.y;
            xr[k][4 * h + 2] = v.z;
            xr[k][4 * h + 3] = v.w;
        }
    }
}

template <int N, int K>
__device__ __forceinline__ void zero_y(float (&yr)[K][N]) {
#pragma unroll
    for (int k = 0; k < K; ++k)
#pragma unroll
        for (int j = 0; j < N; ++j) yr[k][j] = 0.f;
}

// y is written once and never reread here: streaming stores keep L2 for the weights.
template <int N, int K, int LPR>
__device__ __forceinline__ void store_y(float* __restrict__ yrow, int sub, const float (&yr)[K][N]) {
#pragma unroll
    for (int k = 0; k < K; ++k) {
        float4* p = reinterpret_cast<float4*>(yrow + (sub + LPR * k) * N);
#pragma unroll
        for (int h = 0; h < N / 4; ++h)
            __stcs(p + h, make_float4(yr[k][4 * h], yr[k][4 * h + 1], yr[k][4 * h + 2],
                                      yr[k][4 * h + 3]));
    }
}

template <int N, int K>
__device__ __forceinline__ float dot_chunks(const uint4 (&w)[K], const float (&xr)[K][N]) {
    float acc0 = 0.f, acc1 = 0.f;  // two chains: half the FMA latency, fixed order
#pragma unroll
    for (int k = 0; k < K; ++k) {
        float f[N];
        widen(w[k], f);
#pragma unroll
        for (int j = 0; j < N; j += 2) {
            acc0 = fmaf(f[j], xr[k][j], acc0);
            acc1 = fmaf(f[j + 1], xr[k][j + 1], acc1);
        }
    }
    return acc0 + acc1;
}

template <int N, int K>
__device__ __forceinline__ void axpy_chunks(float a, const uint4 (&w)[K], float (&yr)[K][N]) {
#pragma unroll
    for (int k = 0; k < K; ++k) {
        float f[N];
        widen(w[k], f);
#pragma unroll
        for (int j = 0; j < N; ++j) yr[k][j] = fmaf(a, f[j], yr[k][j]);
    }
}

template <typename W, int LPR, int K>
__device__ __forceinline__ void load_row(const W* __restrict__ base, long long node, int width,
                                         int sub, uint4 (&w)[K]) {
    const uint4* p = reinterpret_cast<const uint4*>(base + node * width);
#pragma unroll
    for (int k = 0; k < K; ++k) w[k] = __ldg(p + sub + LPR * k);
}

// `levels` steps of the walk for R independent rows held by this lane group (interleaved: the
// R rows' loads are all in flight together). node[r] advances to the child.
template <typename W, int LPR, int R>
__device__ __forceinline__ void walk_levels(const W* __restrict__ w_in, const float* __restrict__ b_in,
                                            const W* __restrict__ w_out_t, int sub, int levels,
                                            int (&node)[R],
                                            const float (&xr)[R][Geo<W, LPR>::KI][Geo<W, LPR>::N],
                                            float (&yr)[R][Geo<W, LPR>::KO][Geo<W, LPR>::N]) {
    using G = Geo<W, LPR>;
#pragma unroll 1
    for (int l = 0; l < levels; ++l) {
        uint4 wi[R][G::KI], wo[R][G::KO];
        float bias[R], p[R];
#pragma unroll
        for (int r = 0; r < R; ++r) load_row<W, LPR, G::KI>(w_in, node[r], IN_W, sub, wi[r]);
#pragma unroll
        for (int r = 0; r < R; ++r) {
            load_row<W, LPR, G::KO>(w_out_t, node[r], OUT_W, sub, wo[r]);
            bias[r] = __ldg(b_in + node[r]);
        }
#pragma unroll
        for (int r = 0; r < R; ++r) p[r] = dot_chunks<G::N, G::KI>(wi[r], xr[r]);
#pragma unroll
        for (int r = 0; r < R; ++r) p[r] = group_sum<LPR>(p[r]);
#pragma unroll
        for (int r = 0; r < R; ++r) {
            const float z = p[r] + bias[r];
            axpy_chunks<G::N, G::KO>(gelu(z), wo[r], yr[r]);
            node[r] = 2 * node[r] + 1 + (z > 0.f);
        }
    }
}

// Variants A' / C / D-plain: one launch, the whole walk. A warp holds (32 / LPR) * R rows:
// 32 / LPR lane groups, each walking R rows interleaved.
template <typename W, int LPR, int R>
__global__ void LAUNCH_BOUNDS
    walk_full(const float* __restrict__ x, const W* __restrict__ w_in, const float* __restrict__ b_in,
              const W* __restrict__ w_out_t, float* __restrict__ y, int n_rows) {
    using G = Geo<W, LPR>;
    constexpr int GROUPS = 32 / LPR;
    const int lane = threadIdx.x & 31, group = lane / LPR, sub = lane % LPR;
    const long long base = (((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5) * (GROUPS * R);
    if (base >= n_rows) return;  // whole warp leaves together
    int node[R];
    long long row[R];
    bool valid[R];
    float xr[R][G::KI][G::N], yr[R][G::KO][G::N];
#pragma unroll
    for (int r = 0; r < R; ++r) {
        row[r] = base + r * GROUPS + group;
        valid[r] = row[r] < n_rows;
        if (!valid[r]) row[r] = n_rows - 1;  // compute a duplicate (shuffles need every lane)
        node[r] = 0;
        load_x<G::N, G::KI, LPR>(x + row[r] * IN_W, sub, true, xr[r]);
        zero_y<G::N, G::KO>(yr[r]);
    }
    walk_levels<W, LPR, R>(w_in, b_in, w_out_t, sub, DEPTH + 1, node, xr, yr);
#pragma unroll
    for (int r = 0; r < R; ++r)
        if (valid[r]) store_y<G::N, G::KO, LPR>(y + row[r] * OUT_W, sub, yr[r]);
}

// Variant B, phase 1: the top L levels (w_in only). Records the row's node at level L and its L
// activations, and drops the row into its bucket (node at level L): slot = atomicAdd(count);
// slots >= cap go to one overflow list. Block 0 also zeroes the *other* counter buffer, which
// the next call uses (ping-pong: no memset launch).
template <typename W, int LPR>
__global__ void LAUNCH_BOUNDS
    top_walk(const float* __restrict__ x, const W* __restrict__ w_in, const float* __restrict__ b_in,
             int n_rows, int L, int cap, int* __restrict__ counts, int* __restrict__ table,
             int* __restrict__ overflow_rows, int* __restrict__ node_at_L, float* __restrict__ acts,
             int* __restrict__ clear, int n_clear) {
    using G = Geo<W, LPR>;
    constexpr int GROUPS = 32 / LPR;
    if (blockIdx.x == 0)
        for (int i = threadIdx.x; i < n_clear; i += blockDim.x) clear[i] = 0;
    const int lane = threadIdx.x & 31, group = lane / LPR, sub = lane % LPR;
    const long long base = (((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5) * GROUPS;
    if (base >= n_rows) return;
    long long row = base + group;
    const bool valid = row < n_rows;
    if (!valid) row = n_rows - 1;
    float xr[G::KI][G::N];
    load_x<G::N, G::KI, LPR>(x + row * IN_W, sub, false, xr);  // phase 2 reads x again
    int node = 0;
#pragma unroll 1
    for (int l = 0; l < L; ++l) {
        uint4 wi[G::KI];
        load_row<W, LPR, G::KI>(w_in, node, IN_W, sub, wi);
        const float bias = __ldg(b_in + node);
        const float z = group_sum<LPR>(dot_chunks<G::N, G::KI>(wi, xr)) + bias;
        if (sub == 0 && valid) acts[row * L + l] = gelu(z);
        node = 2 * node + 1 + (z > 0.f);
    }
    if (sub == 0 && valid) {
        const int nb = 1 << L;
        const int b = node - (nb - 1);
        node_at_L[row] = node;
        const int slot = atomicAdd(counts + b, 1);
        if (slot < cap)
            table[b * cap + slot] = (int)row;
        else
            overflow_rows[atomicAdd(counts + nb, 1)] = (int)row;
    }
}

// Variant B, phase 2: blocks [0, nb * cpb) take chunk j = blockIdx % cpb of bucket
// blockIdx / cpb; the rest take chunks of the overflow list (grid-stride). A block's rows share
// the top path and the subtree below it, so its warps hit L1 on the shared node rows. y starts
// as the top L terms (activations from phase 1, out rows shared by the block), then the walk
// continues from level L; y is written once.
template <typename W, int LPR>
__global__ void LAUNCH_BOUNDS
    sub_walk(const float* __restrict__ x, const W* __restrict__ w_in, const float* __restrict__ b_in,
             const W* __restrict__ w_out_t, float* __restrict__ y, int L, int cap, int chunk,
             int cpb, int overflow_blocks, const int* __restrict__ counts,
             const int* __restrict__ table, const int* __restrict__ overflow_rows,
             const int* __restrict__ node_at_L, const float* __restrict__ acts) {
    using G = Geo<W, LPR>;
    constexpr int GROUPS = 32 / LPR;
    const int nb = 1 << L;
    const int bucket_blocks = nb * cpb;
    const int* list;
    int count, j, stride;
    if ((int)blockIdx.x < bucket_blocks) {
        const int b = blockIdx.x / cpb;
        j = blockIdx.x % cpb;
        count = min(counts[b], cap);
        list = table + b * cap;
        stride = cap;  // one chunk per block
    } else {
        j = blockIdx.x - bucket_blocks;
        count = counts[nb];
        list = overflow_rows;
        stride = overflow_blocks * chunk;
    }
    const int lane = threadIdx.x & 31, group = lane / LPR, sub = lane % LPR;
    const int warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    for (int start = j * chunk; start < count; start += stride) {
        const int end = min(count, start + chunk);
        for (int pos0 = start + warp * GROUPS; pos0 < end; pos0 += warps * GROUPS) {
            const int pos = pos0 + group;
            const bool valid = pos < end;
            const long long row = list[valid ? pos : pos0];
            float xr[1][G::KI][G::N], yr[1][G::KO][G::N];
            load_x<G::N, G::KI, LPR>(x + row * IN_W, sub, true, xr[0]);
            zero_y<G::N, G::KO>(yr[0]);
            int node[1] = {node_at_L[row]};
#pragma unroll 1
            for (int l = 0; l < L; ++l) {
                const int anc = ((node[0] + 1) >> (L - l)) - 1;  // ancestor at level l
                uint4 wo[G::KO];
                load_row<W, LPR, G::KO>(w_out_t, anc, OUT_W, sub, wo);
                axpy_chunks<G::N, G::KO>(__ldg(acts + row * L + l), wo, yr[0]);
            }
            walk_levels<W, LPR, 1>(w_in, b_in, w_out_t, sub, DEPTH + 1 - L, node, xr, yr);
            if (valid) store_y<G::N, G::KO, LPR>(y + row * OUT_W, sub, yr[0]);
        }
    }
}

// Busy-waits `cycles` SM clocks: queued before a timed region so that the host has enqueued the
// region's launches before it starts, keeping host launch overhead out of the event times.
__global__ void spin(long long cycles) {
    const long long t0 = clock64();
    while (clock64() - t0 < cycles) {
    }
}
