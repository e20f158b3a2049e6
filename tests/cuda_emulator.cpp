// Runs one of fastff/gpu/kernels.cu's inference kernels on the host (tests/cuda_emulator.h),
// with the launch geometry of fastff/gpu/cmm.py (a warp per row, 8 rows per block). Driven by
// tests/test_cuda_emulated.py, which writes the inputs as raw files into DIR and reads y.bin
// (and visited.bin / preact.bin) back:
//   emulator ultra DIR KERNEL K KIND n_rows in_w out_w depth n_trees act save
//       KERNEL: half (ultra_forward_half<KIND>), h8 (ultra_forward_h8<K, KIND>),
//               f4 (ultra_forward_f4<K>, float32 weights)
//   emulator fff DIR KIND n_rows in_w leaf_w out_w depth act      (fff_infer_half<KIND>)
//   emulator backward DIR K n_rows in_w out_w visits_per_row act   (ultra_backward_rows_f4<K>)
#include "cuda_emulator.h"

#include <algorithm>
#include <cstdio>
#include <string>

#include "../fastff/gpu/kernels.cu"

template <class T>
static std::vector<T> read_file(const std::string& path, size_t n) {
    std::vector<T> v(n);  // exact sizes: AddressSanitizer then catches any access past them
    FILE* f = std::fopen(path.c_str(), "rb");
    if (!f || std::fread(v.data(), sizeof(T), n, f) != n) {
        std::fprintf(stderr, "cannot read %zu items from %s\n", n, path.c_str());
        std::exit(2);
    }
    std::fclose(f);
    return v;
}

template <class T>
static void write_file(const std::string& path, const std::vector<T>& v, size_t n) {
    FILE* f = std::fopen(path.c_str(), "wb");
    std::fwrite(v.data(), sizeof(T), n, f);
    std::fclose(f);
}

static const unsigned WARPS = 8;  // fastff.gpu.cmm.WARPS

template <int K, int KIND>
static void h8(unsigned grid, const float* x, const unsigned short* wi, const unsigned short* b,
               const unsigned short* wo, float* y, long long* vis, float* pre, long long n,
               int in_w, int out_w, int depth, int trees, long long nodes, int act, int save) {
    launch(grid, 32 * WARPS, [&] {
        ultra_forward_h8<K, KIND>(x, wi, b, wo, y, vis, pre, n, in_w, out_w, depth, trees, nodes,
                                  act, save);
    });
}

template <int K>
static void f4(unsigned grid, const float* x, const float* wi, const float* b, const float* wo,
               float* y, long long* vis, float* pre, long long n, int in_w, int out_w, int depth,
               int trees, long long nodes, int act, int save) {
    launch(grid, 32 * WARPS, [&] {
        ultra_forward_f4<K>(x, wi, b, wo, y, vis, pre, n, in_w, out_w, depth, trees, nodes, act,
                            save);
    });
}

static int ultra(char** argv) {
    const std::string dir = argv[2], kernel = argv[3];
    const int k = std::atoi(argv[4]), kind = std::atoi(argv[5]);
    const long long n = std::atoll(argv[6]);
    const int in_w = std::atoi(argv[7]), out_w = std::atoi(argv[8]), depth = std::atoi(argv[9]);
    const int trees = std::atoi(argv[10]), act = std::atoi(argv[11]), save = std::atoi(argv[12]);
    const long long nodes = (1LL << (depth + 1)) - 1, total = nodes * trees;
    const size_t path = (size_t)n * trees * (depth + 1);
    const unsigned grid = (unsigned)((n + WARPS - 1) / WARPS);
    auto x = read_file<float>(dir + "/x.bin", (size_t)n * in_w);
    std::vector<float> y((size_t)n * out_w, NAN), pre(path, NAN);
    std::vector<long long> vis(path, -1);
    if (kernel == "f4") {
        auto wi = read_file<float>(dir + "/w_in.bin", (size_t)total * in_w);
        auto b = read_file<float>(dir + "/b_in.bin", (size_t)total);
        auto wo = read_file<float>(dir + "/w_out_t.bin", (size_t)total * out_w);
        decltype(&f4<1>) by_k[] = {f4<1>, f4<2>, f4<3>, f4<4>, f4<5>, f4<6>, f4<7>, f4<8>};
        if (k < 1 || k > 8) return 2;
        by_k[k - 1](grid, x.data(), wi.data(), b.data(), wo.data(), y.data(), vis.data(), pre.data(), n,
           in_w, out_w, depth, trees, nodes, act, save);
    } else {
        auto wi = read_file<unsigned short>(dir + "/w_in.bin", (size_t)total * in_w);
        auto b = read_file<unsigned short>(dir + "/b_in.bin", (size_t)total);
        auto wo = read_file<unsigned short>(dir + "/w_out_t.bin", (size_t)total * out_w);
        if (kernel == "half") {
            auto go = kind == HALF_BF16 ? ultra_forward_half<HALF_BF16> : ultra_forward_half<HALF_F16>;
            launch(grid, 32 * WARPS, [&] {
                go(x.data(), wi.data(), b.data(), wo.data(), y.data(), vis.data(), pre.data(), n,
                   in_w, out_w, depth, trees, nodes, act, save);
            });
        } else {
            auto go = kind == HALF_BF16
                          ? (k == 1 ? h8<1, 1> : k == 2 ? h8<2, 1> : k == 3 ? h8<3, 1> : h8<4, 1>)
                          : (k == 1 ? h8<1, 2> : k == 2 ? h8<2, 2> : k == 3 ? h8<3, 2> : h8<4, 2>);
            go(grid, x.data(), wi.data(), b.data(), wo.data(), y.data(), vis.data(), pre.data(),
               n, in_w, out_w, depth, trees, nodes, act, save);
        }
    }
    write_file(dir + "/y.bin", y, (size_t)n * out_w);
    write_file(dir + "/visited.bin", vis, path);
    write_file(dir + "/preact.bin", pre, path);
    return 0;
}

static int fff(char** argv) {
    const std::string dir = argv[2];
    const int kind = std::atoi(argv[3]);
    const long long n = std::atoll(argv[4]);
    const int in_w = std::atoi(argv[5]), leaf_w = std::atoi(argv[6]), out_w = std::atoi(argv[7]);
    const int depth = std::atoi(argv[8]), act = std::atoi(argv[9]);
    const size_t n_nodes = ((size_t)1 << depth) - 1, n_leaves = (size_t)1 << depth;
    auto x = read_file<float>(dir + "/x.bin", (size_t)n * in_w);
    auto node_w = read_file<unsigned short>(dir + "/node_w.bin", n_nodes * in_w);
    auto node_b = read_file<unsigned short>(dir + "/node_b.bin", n_nodes);
    auto w1t = read_file<unsigned short>(dir + "/w1t.bin", n_leaves * leaf_w * in_w);
    auto b1 = read_file<unsigned short>(dir + "/b1.bin", n_leaves * leaf_w);
    auto w2 = read_file<unsigned short>(dir + "/w2.bin", n_leaves * leaf_w * out_w);
    auto b2 = read_file<unsigned short>(dir + "/b2.bin", n_leaves * out_w);
    std::vector<float> y((size_t)n * out_w, NAN);
    auto go = kind == HALF_BF16 ? fff_infer_half<HALF_BF16> : fff_infer_half<HALF_F16>;
    launch((unsigned)((n + WARPS - 1) / WARPS), 32 * WARPS, [&] {
        go(x.data(), node_w.data(), node_b.data(), w1t.data(), b1.data(), w2.data(), b2.data(),
           y.data(), n, in_w, leaf_w, out_w, depth, act);
    });
    write_file(dir + "/y.bin", y, (size_t)n * out_w);
    return 0;
}

template <int K>
static void backward_f4(unsigned grid, const float* dy, const float* wi, const float* wo,
                        const long long* vis, const float* pre, float* dz, float* a, float* dx,
                        long long n, int in_w, int out_w, int visits, int act) {
    launch(grid, 32 * WARPS, [&] {
        ultra_backward_rows_f4<K>(dy, wi, wo, vis, pre, dz, a, dx, n, in_w, out_w, visits, act);
    });
}

static int backward(char** argv) {
    const std::string dir = argv[2];
    const int k = std::atoi(argv[3]);
    const long long n = std::atoll(argv[4]);
    const int in_w = std::atoi(argv[5]), out_w = std::atoi(argv[6]);
    const int visits = std::atoi(argv[7]), act = std::atoi(argv[8]);
    const size_t n_visits = (size_t)n * visits;
    auto dy = read_file<float>(dir + "/dy.bin", (size_t)n * out_w);
    auto vis = read_file<long long>(dir + "/visited.bin", n_visits);
    auto pre = read_file<float>(dir + "/preact.bin", n_visits);
    long long n_nodes = 0;
    for (size_t v = 0; v < n_visits; ++v) n_nodes = std::max(n_nodes, vis[v] + 1);
    auto wi = read_file<float>(dir + "/w_in.bin", (size_t)n_nodes * in_w);
    auto wo = read_file<float>(dir + "/w_out_t.bin", (size_t)n_nodes * out_w);
    std::vector<float> dz(n_visits, NAN), a(n_visits, NAN), dx((size_t)n * in_w, NAN);
    decltype(&backward_f4<1>) by_k[] = {backward_f4<1>, backward_f4<2>, backward_f4<3>,
                                        backward_f4<4>, backward_f4<5>, backward_f4<6>,
                                        backward_f4<7>, backward_f4<8>};
    if (k < 1 || k > 8) return 2;
    by_k[k - 1]((unsigned)((n + WARPS - 1) / WARPS), dy.data(), wi.data(), wo.data(), vis.data(),
       pre.data(), dz.data(), a.data(), dx.data(), n, in_w, out_w, visits, act);
    write_file(dir + "/dz.bin", dz, n_visits);
    write_file(dir + "/a.bin", a, n_visits);
    write_file(dir + "/dx.bin", dx, (size_t)n * in_w);
    return 0;
}

int main(int argc, char** argv) {
    const std::string what = argc > 1 ? argv[1] : "";
    if (what == "ultra" && argc == 13) return ultra(argv);
    if (what == "fff" && argc == 10) return fff(argv);
    if (what == "backward" && argc == 9) return backward(argv);
    std::fprintf(stderr, "usage: see the head of tests/cuda_emulator.cpp\n");
    return 2;
}
