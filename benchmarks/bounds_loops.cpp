// The chunk selection's bounds pass alone (mixed_attention_body.h: chunk_bounds), one thread, no
// Python: ms per 90 head-layers (SmolLM2 at 8K: 30 layers × 3 KV heads, 512 chunks, G = 3, D = 64),
// the abstracts drawn in turn from a 600-head-layer pool (~79 MB) so that they come from memory, as
// in a decode step (BENCHMARKS.md, "Session 9: the same step on another machine").
//
//   g++ -O3 -std=c++17 -fopenmp-simd -ffp-contract=fast -fno-math-errno -Wno-aggressive-loop-optimizations -o /tmp/bounds_loops benchmarks/bounds_loops.cpp && /tmp/bounds_loops
#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "../edgetok/kernels/mixed_attention_problem.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
#define EDGETOK_ISA 512
namespace avx512 {
#include "../edgetok/kernels/mixed_attention_body.h"
}
#pragma GCC pop_options

int main() {
    const int g = 3, d = 64, heads = 90, pool = 600;
    const int64_t stride = 512;
    std::vector<uint16_t> abstracts(size_t(pool) * 2 * d * stride);
    for (auto& x : abstracts) x = uint16_t(0x3f00 + rand() % 256);  // bf16 around 0.5..1
    std::vector<float> q(g * d), bounds(stride), scratch(2 * g * d);
    for (auto& x : q) x = (rand() % 200 - 100) * 0.01f;
    int next = 0;
    for (int round = 0; round < 5; ++round) {
        double best = 1e9;
        for (int rep = 0; rep < 15; ++rep) {
            auto t = std::chrono::steady_clock::now();
            for (int h = 0; h < heads; ++h, next = (next + 1) % pool)
                avx512::chunk_bounds(q.data(), g, d, abstracts.data() + size_t(next) * 2 * d * stride, stride, 0, stride, 0.125f,
                                     bounds.data(), scratch.data());
            best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count());
        }
        printf("round %d: %.3f ms per 90 head-layers\n", round, best * 1e3);
    }
}
