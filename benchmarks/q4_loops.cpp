// MatMulQ4's few-row loops alone, one thread, no ONNX Runtime: ms per pass over 65,536 x 576 4-bit
// weights (~28 MB with scales and offsets) at 1, 2, 4 and 8 rows, AVX-512 loops (BENCHMARKS.md,
// "Session 9: another machine").
//
//   g++ -O3 -std=c++17 -ffp-contract=fast -o /tmp/q4_loops benchmarks/q4_loops.cpp && /tmp/q4_loops
#include <immintrin.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

// the operator's own source: its loops, compiled per instruction set (namespace avx512), and its
// Q4Problem; the ONNX Runtime parts are compiled but not called
#include "../edgetok/kernels/q4_matmul.cpp"

int main() {
    const int64_t k = 576, n = 65536, block = 32, tile = 16;
    std::vector<uint8_t> codes(n * k / 2);
    std::vector<float> scales(n * k / block), offsets(n * k / block), x(8 * k), y(8 * n);
    for (auto& v : codes) v = uint8_t(rand());
    for (auto& v : scales) v = (rand() % 100) * 1e-3f;
    for (auto& v : offsets) v = (rand() % 100) * 1e-3f - 0.05f;
    for (auto& v : x) v = (rand() % 100) * 1e-2f;
    Q4Problem p{1, k, n, block, codes.data(), scales.data(), offsets.data()};
    for (int rows : {1, 2, 4, 8}) {
        p.m = rows;
        double best = 1e9;
        for (int rep = 0; rep < 9; ++rep) {
            auto t = std::chrono::steady_clock::now();
            for (int64_t n0 = 0; n0 < n; n0 += tile) avx512::tile(p, x.data(), y.data(), n0, n0 + tile);
            double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
            best = s < best ? s : best;
        }
        printf("rows %d: %.2f ms, %.1f GMAC/s (y[0] %g)\n", rows, best * 1e3, double(k) * n * rows / best / 1e9, y[0]);
    }
}
