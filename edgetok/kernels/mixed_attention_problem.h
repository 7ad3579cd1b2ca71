// What the mixed-bit attention op's loops (mixed_attention_body.h) take: a table row's fields and
// one call's problem. mixed_attention.cpp includes it before the loops; so does the loops'
// microbenchmark (benchmarks/bounds_loops.cpp). The contract is in mixed_attention.md.
#pragma once

#include <cstdint>

namespace {

// F_CAUSAL: 0, every query sees the whole row; 1, the row's last T tokens are the queries' own (row r
// is token r % T of them, seeing those up to itself); −W, a sliding window of W tokens' past (a float
// row): query token s of T sees the row's tokens from length + s − (W − 1) on (a draft's later
// tokens have slid past the oldest)
enum Field { F_BITS, F_LENGTH, F_K, F_V, F_K_SCALE, F_K_ZERO, F_V_SCALE, F_V_ZERO, F_HEAD_STRIDE, F_TOKEN_STRIDE, F_CAUSAL, N_FIELDS };
constexpr int TILE = 256;  // tokens scored at a time (a chunk longer than this is read in tiles)
constexpr int MAX_D = 512;  // head_dim: a multiple of 16 up to this
constexpr int MAX_NV = MAX_D / 16;

struct Problem {
    const float* q;        // (Hkv, R, D): R = G·T rows per KV head, row r = query head g = r / T, token t = r % T
    const int64_t* table;  // (n_chunks, N_FIELDS)
    int64_t n_chunks;
    int n_kv, rows, t, d, vgroup;
    float scale;
    bool scores_only;  // the log-sum-exps alone: no value is read, out stays unwritten
};

}  // namespace
