// Host emulation of benchmarks/gpu_probe.cu (no GPU): each warp is 32 std::threads and a
// shuffle is a barrier exchange. Build: g++ -std=c++17 -O2 -pthread -o /tmp/emu emu.cpp
// Driven by check.py (compares every kernel with the float64 reference, forces overflow).
#include <pthread.h>
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <vector>
using std::min;
struct dim3_ { unsigned x = 0, y = 0, z = 0; };
thread_local dim3_ threadIdx, blockIdx;
dim3_ blockDim, gridDim;
struct alignas(16) uint4 { unsigned x, y, z, w; };
struct alignas(16) float4 { float x, y, z, w; };
inline float4 make_float4(float a, float b, float c, float d) { return {a, b, c, d}; }
template <class T> inline T __ldg(const T* p) { return *p; }
template <class T> inline T __ldcs(const T* p) { return *p; }
template <class T> inline void __stcs(T* p, T v) { *p = v; }
inline float __uint_as_float(unsigned u) { float f; memcpy(&f, &u, 4); return f; }
inline int atomicAdd(int* p, int v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
inline long long clock64() { return 0; }
struct Warp { pthread_barrier_t bar; float vals[32]; };
thread_local Warp* cur_warp;
inline float __shfl_xor_sync(unsigned, float v, int off) {
    int lane = threadIdx.x & 31;
    cur_warp->vals[lane] = v;
    pthread_barrier_wait(&cur_warp->bar);
    float r = cur_warp->vals[lane ^ off];
    pthread_barrier_wait(&cur_warp->bar);
    return r;
}
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __restrict__ __restrict
#include "../gpu_probe.cu"

template <class F>
void launch(unsigned grid, unsigned block, F f) {
    gridDim.x = grid; blockDim.x = block;
    const unsigned nw = block / 32;
    const unsigned par = 8;  // blocks concurrently
    for (unsigned b0 = 0; b0 < grid; b0 += par) {
        std::vector<std::thread> th;
        std::vector<Warp> warps(par * nw);
        for (auto& w : warps) pthread_barrier_init(&w.bar, nullptr, 32);
        for (unsigned b = b0; b < std::min(grid, b0 + par); ++b)
            for (unsigned t = 0; t < block; ++t)
                th.emplace_back([&, b, t] {
                    blockIdx.x = b; threadIdx.x = t;
                    cur_warp = &warps[(b - b0) * nw + t / 32];
                    f();
                });
        for (auto& t : th) t.join();
        for (auto& w : warps) pthread_barrier_destroy(&w.bar);
    }
}
template <class T> std::vector<T> rd(const std::string& p, size_t n) {
    std::vector<T> v(n); FILE* f = fopen(p.c_str(), "rb");
    if (!f || fread(v.data(), sizeof(T), n, f) != n) { fprintf(stderr, "read %s\n", p.c_str()); exit(1); }
    fclose(f); return v;
}
template <class T> void wr(const std::string& p, const std::vector<T>& v) {
    FILE* f = fopen(p.c_str(), "wb"); fwrite(v.data(), sizeof(T), v.size(), f); fclose(f);
}
template <class W>
void run(const std::string& dir, const char* dt, int n, int argc, char** argv) {
    const int NN = (1 << (DEPTH + 1)) - 1;
    auto x = rd<float>(dir + "/x.bin", (size_t)n * IN_W);
    auto wi = rd<W>(dir + "/wi_" + dt + ".bin", (size_t)NN * IN_W);
    auto wo = rd<W>(dir + "/wo_" + dt + ".bin", (size_t)NN * OUT_W);
    auto bi = rd<float>(dir + "/b.bin", NN);
    std::string mode = argv[4];
    std::vector<float> y((size_t)n * OUT_W, NAN);
    if (mode == "full") {
        int lpr = atoi(argv[5]), r = atoi(argv[6]);
        int rpb = 8 * (32 / lpr) * r, grid = (n + rpb - 1) / rpb;
        auto go = [&](auto k) { launch(grid, 256, [&] { k(x.data(), wi.data(), bi.data(), wo.data(), y.data(), n); }); };
        if (lpr == 32 && r == 1) go(walk_full<W, 32, 1>);
        else if (lpr == 32 && r == 2) go(walk_full<W, 32, 2>);
        else go(walk_full<W, 16, 1>);
    } else {  // grouped: L chunk warps lpr cap cpb ob grid2 calls
        int L = atoi(argv[5]), chunk = atoi(argv[6]), warps = atoi(argv[7]), lpr = atoi(argv[8]);
        int cap = atoi(argv[9]), cpb = atoi(argv[10]), ob = atoi(argv[11]), grid2 = atoi(argv[12]);
        int calls = atoi(argv[13]);
        int nb = 1 << L;
        std::vector<int> cnt[2] = {std::vector<int>(nb + 1, 0), std::vector<int>(nb + 1, 7)};
        std::vector<int> table((size_t)nb * cap, -1), over(n, -1), nodeL(n), st(3);
        std::vector<float> acts((size_t)n * L);
        for (int c = 0; c < calls; ++c) {
            std::fill(y.begin(), y.end(), NAN);
            int* cur = cnt[c % 2].data(); int* nxt = cnt[(c + 1) % 2].data();
            launch((n + 7) / 8, 256, [&] { top_walk<W, 32>(x.data(), wi.data(), bi.data(), n, L, cap, cur, table.data(), over.data(), nodeL.data(), acts.data(), nxt, nb + 1); });
            auto sub = lpr == 32 ? sub_walk<W, 32> : sub_walk<W, 16>;
            launch(grid2, 32 * warps, [&] { sub(x.data(), wi.data(), bi.data(), wo.data(), y.data(), L, cap, chunk, cpb, ob, cur, table.data(), over.data(), nodeL.data(), acts.data()); });
            st[0] = *std::max_element(cur, cur + nb); st[1] = cur[nb];
        }
        wr(dir + "/stats.bin", st);
    }
    wr(dir + "/y.bin", y);
}
int main(int argc, char** argv) {
    std::string dir = argv[1], dt = argv[2]; int n = atoi(argv[3]);
    if (dt == "fp32") run<float>(dir, "fp32", n, argc, argv); else run<bf16_t>(dir, "bf16", n, argc, argv);
}
