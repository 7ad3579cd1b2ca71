// GroupQueryAttention (domain ai.edgetok): the decoder graph's attention with its KV cache, as ONNX
// Runtime's com.microsoft GroupQueryAttention computes it for edgetok's packed graphs — the same
// inputs, outputs and arithmetic (float32), written for one decode step's access pattern.
//
// Inputs: qkv (B, S, (H + 2·Hkv)·D) packed, past_key / past_value (B, Hkv, P, D), seqlens_k (B, 1)
// int32 (past + new − 1 per row), total_sequence_length (1,) int32, cos_cache / sin_cache
// (positions, D/2), position_ids (B, S) int64. Outputs: attention (B, S, H·D), present_key /
// present_value (B, Hkv, max(P, total), D): the past with the new tokens' K/V (rotated keys) at
// slots past..past+S−1. Bound to the past's own memory (the backend does), the new K/V land in place.
// Attributes: num_heads H, kv_num_heads Hkv, scale (0: 1/√D), local_window_size (−1: none; else
// new token at slot t sees slots t−w+1..t).
//
// Why: ONNX Runtime's kernel reads SmolLM2's fp32 cache at ~7.5 GB/s at 4K (attention is then the
// decode step's largest cost); here each KV head's slots are read once for its whole query group,
// in chunks spread over the session's threads, with the chunks' softmax partials merged.
//
// Attending through the caller (edgetok_attend_through): while a thread has set a hook, the op on
// that thread rotates the new tokens' queries and keys, writes the new K/V to present (past is
// empty then), and hands them to the hook, which attends over the caller's own cache (a tiered
// cache: chunks at their stored widths, fetched from host or disk for this layer only) and writes
// the output. A whole-model graph then never holds every layer's past at once. The hook is per
// thread because ONNX Runtime runs a graph's nodes on the thread that called Run (sequential
// execution); the layer index counts the op's calls since the hook was set.
//
// A draft tree (edgetok_draft_tree, per thread as the hook): while one is set, new token s sees the
// past and only the new tokens its row of the tree's visibility names (itself and its ancestors), at
// the positions position_ids gives (the root's plus its depth; a sliding window counts back from
// there) — speculative decoding verifies several branches of guesses in one forward.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <new>
#include <vector>

#include "ort_abi.h"

#ifndef EDGETOK_PORTABLE_ONLY
#include <immintrin.h>
#endif

// x86-64: the loops for AVX2 + FMA (every x86 CPU since 2013); the library registers this op only
// where the CPU has them (edgetok_attention_op), and graphs ask for it only where it is registered
#ifndef EDGETOK_PORTABLE_ONLY
#pragma GCC target("avx2,fma")
#endif

namespace {

struct Attention {
    int64_t b, s, h, hkv, d, past, out_t;  // out_t: present's slots
    float scale;
    int64_t window;                        // ≤ 0: none
    const float* qkv;
    const int32_t* seqlens;                // (B,)
    const float* cos;
    const float* sin;
    const int64_t* positions;              // (B, S)
    float* key;                            // present (B, Hkv, out_t, D)
    float* value;
    float* out;                            // (B, S, H·D)
    std::vector<float>* q;                 // rotated queries (B, S, H, D)
    const uint32_t* sees;                  // (S,) a draft tree's: bit j of token s set where s sees new token j; null: causal
    const int64_t* depths;                 // (S,) a draft tree's: token s sits at the past's end + depths[s]
};

// Slots per task, at fixed boundaries (multiples of CHUNK): a token's sums are then made in the same
// order whether it is decoded alone or verified among a draft's tokens, so a draft's logits are the
// plain step's bit for bit (greedy speculation stays exact)
constexpr int64_t CHUNK = 512;
constexpr int64_t FEW_TOKENS = 16;    // more new tokens than this (a prefill): ONNX Runtime's own kernel
constexpr int64_t PREFETCH_ROWS = 16;  // K rows requested ahead of the ones read
// keys scored at a time: 8 sums in flight keep both FMA ports busy (each FMA waits 4 cycles on its sum)
constexpr int SCORED_KEYS = 8;
constexpr int64_t WEIGH_ROWS = 64;     // value rows per pass of the weighted sums (16 KB at D = 64)
// fewer slots than this, one sequence: ONNX Runtime's own kernel too (as fast there); a batch of short
// caches (served clients) stays here: ONNX Runtime's per-row work made a 4-row step 2.4× one, 2.0× here
constexpr int64_t LONG_CACHE = 512;

// x (D) rotated at position pos: half-split pairs (i, i + D/2), as GroupQueryAttention with
// rotary_interleaved = 0
inline void rotate(const float* x, float* to, const float* cos, const float* sin, int64_t d) {
    const int64_t half = d / 2;
#pragma omp simd
    for (int64_t i = 0; i < half; ++i) {
        const float a = x[i], b = x[i + half];
        to[i] = a * cos[i] - b * sin[i];
        to[i + half] = b * cos[i] + a * sin[i];
    }
}

// 8 floats: one AVX2 register under this file's target (GCC's vector extension: portable builds too)
using F8 = float __attribute__((vector_size(32)));
inline F8 load8(const float* p) {
    F8 v;
    std::memcpy(&v, p, sizeof v);
    return v;
}
inline void store8(float* p, F8 v) { std::memcpy(p, &v, sizeof v); }
// ((v0 + v4) + (v2 + v6)) + ((v1 + v5) + (v3 + v7))
inline float lanes_sum(F8 v) {
#ifndef EDGETOK_PORTABLE_ONLY
    const __m256 x = reinterpret_cast<__m256>(v);
    const __m128 s = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
#else
    return ((v[0] + v[4]) + (v[2] + v[6])) + ((v[1] + v[5]) + (v[3] + v[7]));
#endif
}

using I8 = int32_t __attribute__((vector_size(32)));

// e^x for x ≤ 0 (scores minus their maximum), 8 at a time: 2^n · p(r), x = n·ln 2 + r, |r| ≤ ln 2 / 2,
// p Cephes' degree-6 polynomial for expf (within 2 ulp of std::exp; below −87 it is e^−87 ≈ 1.6e−38)
inline F8 exp_nonpositive(F8 x) {
    const F8 floor = F8{} - 87.0f, round = F8{} + 12582912.0f;  // 1.5·2^23: adding it rounds to an integer
    x = x < floor ? floor : x;
    const F8 n = (x * 1.44269504088896341f + round) - round;
    const F8 r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
    F8 p = F8{} + 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const I8 bits = (__builtin_convertvector(n, I8) + 127) << 23;
    F8 scale;
    std::memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

// A query's scores over n slots → their e^(score − max) in place, the max and Σ: every n summed
// alike (8 lanes, across them, then the last n mod 8 in turn), a short tail through the same loop
inline void exponentiate(float* row, int64_t n, float& max, float& total) {
    const int64_t body = n - n % 8;
    F8 m8 = F8{} - INFINITY;
    for (int64_t j = 0; j < body; j += 8) {
        const F8 x = load8(row + j);
        m8 = x > m8 ? x : m8;
    }
    float m = std::max(std::max(std::max(m8[0], m8[1]), std::max(m8[2], m8[3])),
                       std::max(std::max(m8[4], m8[5]), std::max(m8[6], m8[7])));
    for (int64_t j = body; j < n; ++j) m = std::max(m, row[j]);
    F8 sums = {};
    for (int64_t j = 0; j < body; j += 8) {
        const F8 e = exp_nonpositive(load8(row + j) - m);
        store8(row + j, e);
        sums += e;
    }
    float sum = lanes_sum(sums);
    if (body < n) {
        float tail[8] = {};
        std::copy(row + body, row + n, tail);
        const F8 e = exp_nonpositive(load8(tail) - m);
        for (int64_t j = body; j < n; ++j) sum += (row[j] = e[j - body]);
    }
    max = m, total = sum;
}

// q · key for R key rows D apart, R sums in flight (one alone waits on its own FMA's latency). Each
// is summed alike whatever R is (8 lanes over D, then across them, then D mod 8 in turn), so a
// score does not depend on how many were computed together.
template <int R>
inline void dots(const float* q, const float* keys, int64_t d, float* out) {
    F8 acc[R];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) acc[r] = F8{};
    int64_t e = 0;
    for (; e + 8 <= d; e += 8) {
        const F8 x = load8(q + e);
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) acc[r] += x * load8(keys + r * d + e);
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
        float sum = lanes_sum(acc[r]);
        for (int64_t t = e; t < d; ++t) sum += q[t] * keys[r * d + t];
        out[r] = sum;
    }
}

// acc[e] += Σ_j p[j] · values[j, e] for 8·V of a row's D columns from e0, rows j in turn: each column's
// sum in registers over the rows (in memory it would wait on a store and a load per row)
template <int V>
inline void weigh(const float* p, const float* values, int64_t n, int64_t d, int64_t e0, float* acc) {
    F8 sums[V];
    for (int u = 0; u < V; ++u) sums[u] = load8(acc + e0 + 8 * u);
    for (int64_t j = 0; j < n; ++j) {
        const F8 w = F8{} + p[j];
        for (int u = 0; u < V; ++u) sums[u] += w * load8(values + j * d + e0 + 8 * u);
    }
    for (int u = 0; u < V; ++u) store8(acc + e0 + 8 * u, sums[u]);
}

// row b's past length (tokens before this run's)
inline int64_t past_of(const Attention& a, int64_t b) { return int64_t(a.seqlens[b]) + 1 - a.s; }

// A draft tree's token s sees new token j: an ancestor (or itself) within its window by depth
inline bool sees_new(const Attention& a, int64_t s, int64_t j) {
    return ((a.sees[s] >> j) & 1u) && (a.window <= 0 || a.depths[j] > a.depths[s] - a.window);
}

// Step 1, one task per (row, new token): rotate the queries into a.q, write the rotated key and the
// value at their slot
void place(const Attention& a, int64_t bs) {
    const int64_t b = bs / a.s, s = bs % a.s, d = a.d;
    const int64_t pos = a.positions[b * a.s + s], slot = past_of(a, b) + s;
    const float* row = a.qkv + (b * a.s + s) * (a.h + 2 * a.hkv) * d;
    const float *cos = a.cos + pos * (d / 2), *sin = a.sin + pos * (d / 2);
    for (int64_t h = 0; h < a.h; ++h) rotate(row + h * d, a.q->data() + ((b * a.s + s) * a.h + h) * d, cos, sin, d);
    for (int64_t k = 0; k < a.hkv; ++k) {
        const int64_t at = ((b * a.hkv + k) * a.out_t + slot) * d;
        rotate(row + (a.h + k) * d, a.key + at, cos, sin, d);
        std::memcpy(a.value + at, row + (a.h + a.hkv + k) * d, size_t(d) * sizeof(float));
    }
}

// The softmax partial of one query group over slots [lo, hi): its max, sum of exponentials and
// weighted values, per query head of the group (G = H / Hkv)
struct Partial {
    float* acc;  // (G, D)
    float* max;  // (G,)
    float* sum;  // (G,)
};

void attend(const Attention& a, int64_t b, int64_t k, int64_t s, int64_t lo, int64_t hi, Partial part,
            std::vector<float>& scores) {
    const int64_t d = a.d, g = a.h / a.hkv, n = hi - lo;
    const float* q = a.q->data() + ((b * a.s + s) * a.h + k * g) * d;  // the group's G queries
    const float* keys = a.key + ((b * a.hkv + k) * a.out_t + lo) * d;
    const float* values = a.value + ((b * a.hkv + k) * a.out_t + lo) * d;
    scores.resize(size_t(g * std::max<int64_t>(n, 1)));
    float some[SCORED_KEYS];
    int64_t j = 0;
    for (; j + SCORED_KEYS <= n; j += SCORED_KEYS) {  // each key read once for the group
        // the rows a few ahead, requested now: one step's attention is a stream through memory
        for (int64_t line = 0; line < SCORED_KEYS * d; line += 16) __builtin_prefetch(keys + (j + PREFETCH_ROWS) * d + line);
        for (int64_t i = 0; i < g; ++i) {
            dots<SCORED_KEYS>(q + i * d, keys + j * d, d, some);
            for (int r = 0; r < SCORED_KEYS; ++r) scores[i * n + j + r] = some[r] * a.scale;
        }
    }
    for (; j < n; ++j)
        for (int64_t i = 0; i < g; ++i) {
            dots<1>(q + i * d, keys + j * d, d, some);
            scores[i * n + j] = some[0] * a.scale;
        }
    // a draft tree: the new tokens off this token's branch, or out of its window by depth, are not
    // seen (their weights made 0 below)
    const int64_t past = past_of(a, b), first_new = std::max(lo, past);
    bool any_seen = true;
    if (a.sees) {
        any_seen = first_new > lo;
        for (int64_t slot = first_new; slot < hi; ++slot) {
            const bool seen = sees_new(a, s, slot - past);
            any_seen |= seen;
            if (!seen)
                for (int64_t i = 0; i < g; ++i) scores[i * n + slot - lo] = -INFINITY;
        }
    }
    if (!any_seen) {  // a chunk of other branches' tokens only: nothing to add
        for (int64_t i = 0; i < g; ++i) part.max[i] = -INFINITY, part.sum[i] = 0.f;
        std::fill(part.acc, part.acc + g * d, 0.f);
        return;
    }
    for (int64_t i = 0; i < g; ++i) {
        exponentiate(scores.data() + i * n, n, part.max[i], part.sum[i]);
        std::fill(part.acc + i * d, part.acc + (i + 1) * d, 0.f);
    }
    if (a.sees)  // (e^−87 where a score was −∞: exactly 0 instead; the sums, ≥ 1, do not hold its trace)
        for (int64_t slot = first_new; slot < hi; ++slot)
            if (!sees_new(a, s, slot - past))
                for (int64_t i = 0; i < g; ++i) scores[i * n + slot - lo] = 0.f;
    // the values in passes of WEIGH_ROWS rows, which stay in the L1 cache while the group's queries
    // pass over them
    for (int64_t j0 = 0; j0 < n; j0 += WEIGH_ROWS) {
        const int64_t rows = std::min(WEIGH_ROWS, n - j0);
        for (int64_t i = 0; i < g; ++i) {
            const float* p = scores.data() + i * n + j0;
            const float* v = values + j0 * d;
            float* acc = part.acc + i * d;
            int64_t e = 0;
            for (; e + 64 <= d; e += 64) weigh<8>(p, v, rows, d, e, acc);
            for (; e + 8 <= d; e += 8) weigh<1>(p, v, rows, d, e, acc);
            for (; e < d; ++e)
                for (int64_t r = 0; r < rows; ++r) acc[e] += p[r] * v[r * d + e];
        }
    }
}

// The slots new token s of row b attends: [lo, hi) (a draft tree's node sits at the past's end plus its
// depth: a sliding window counts back from there; its branch's slots are masked in attend)
inline void visible(const Attention& a, int64_t b, int64_t s, int64_t& lo, int64_t& hi) {
    hi = past_of(a, b) + s + 1;
    const int64_t at = a.depths ? past_of(a, b) + a.depths[s] + 1 : hi;
    lo = a.window > 0 ? std::max<int64_t>(0, at - a.window) : 0;
}

struct Job {
    const Attention* a;
    int64_t chunks;             // per (row, KV head): tasks over CHUNK-slot spans of the visible slots
    std::vector<float>* parts;  // per (row, KV head, new token, chunk): G·D sums, G maxima, G sums
};

void run_place(void* user, size_t i) {
    const Job& job = *static_cast<const Job*>(user);
    place(*job.a, int64_t(i));
}

// The first chunk (a multiple of CHUNK) a row's new tokens see, and how many they span
inline void chunks_of(const Attention& a, int64_t b, int64_t& first, int64_t& count) {
    int64_t lo, hi, last_lo, last_hi;
    visible(a, b, 0, lo, hi);
    visible(a, b, a.s - 1, last_lo, last_hi);
    first = lo / CHUNK;
    count = (last_hi - 1) / CHUNK - first + 1;
}

// One task: a (row, KV head)'s chunk of slots for every new token; its K/V rows are read from
// memory once for all of them (a draft's verification reads the cache once, not once per token)
void run_attend(void* user, size_t i) {
    const Job& job = *static_cast<const Job*>(user);
    const Attention& a = *job.a;
    const int64_t g = a.h / a.hkv, per = g * (a.d + 2), c = int64_t(i) % job.chunks, rest = int64_t(i) / job.chunks;
    const int64_t k = rest % a.hkv, b = rest / a.hkv;
    int64_t first, count;
    chunks_of(a, b, first, count);
    const int64_t from = (first + c) * CHUNK, to = from + CHUNK;
    thread_local std::vector<float> scores;
    for (int64_t s = 0; s < a.s; ++s) {
        int64_t lo, hi;
        visible(a, b, s, lo, hi);
        lo = std::max(lo, from), hi = std::min(hi, to);
        float* base = job.parts->data() + (((b * a.hkv + k) * a.s + s) * job.chunks + c) * per;
        Partial part{base, base + g * a.d, base + g * a.d + g};
        if (c >= count || lo >= hi) {  // an empty chunk: nothing to add
            for (int64_t e = 0; e < g; ++e) part.max[e] = -INFINITY, part.sum[e] = 0.f;
            std::fill(part.acc, part.acc + g * a.d, 0.f);
            continue;
        }
        attend(a, b, k, s, lo, hi, part, scores);
    }
}

// Each (row, KV head, new token)'s chunks merged: the output is Σ e^(m_c − m) acc_c / Σ e^(m_c − m) sum_c
void merge(const Job& job) {
    const Attention& a = *job.a;
    const int64_t g = a.h / a.hkv, d = a.d, per = g * (d + 2);
    for (int64_t b = 0; b < a.b; ++b)
        for (int64_t k = 0; k < a.hkv; ++k)
            for (int64_t s = 0; s < a.s; ++s) {
                const float* first = job.parts->data() + ((b * a.hkv + k) * a.s + s) * job.chunks * per;
                for (int64_t i = 0; i < g; ++i) {
                    float m = -INFINITY;
                    for (int64_t c = 0; c < job.chunks; ++c) m = std::max(m, first[c * per + g * d + i]);
                    float* o = a.out + ((b * a.s + s) * a.h + k * g + i) * d;
                    std::fill(o, o + d, 0.f);
                    float total = 0.f;
                    for (int64_t c = 0; c < job.chunks; ++c) {
                        const float* part = first + c * per;
                        const float w = part[g * d + g + i] > 0.f ? std::exp(part[g * d + i] - m) : 0.f;
                        total += w * part[g * d + g + i];
#pragma omp simd
                        for (int64_t e = 0; e < d; ++e) o[e] += w * part[i * d + e];
                    }
                    const float inv = 1.f / total;
#pragma omp simd
                    for (int64_t e = 0; e < d; ++e) o[e] *= inv;
                }
            }
}

// The caller's attention: layer, q (S, H, D) rotated, k / v (Hkv, S, D) the new tokens' (rotated
// keys), S, the scale, out (S, H·D) → 0, or non-zero when it failed (the caller keeps the reason)
using AttendHook = int (*)(void* user, int64_t layer, const float* q, const float* k, const float* v, int64_t s,
                           float scale, float* out);

struct Through {
    AttendHook hook = nullptr;
    void* user = nullptr;
    int64_t calls = 0;  // the op's calls since the hook was set: the layer of the next one
    const OrtKernelContext* context = nullptr;  // while the hook runs: the op's (its intra-op threads)
};
thread_local Through g_through;

// This thread's draft tree (edgetok_draft_tree): per new token, the new tokens it sees, and its depth
// (its ancestors: the tokens it sees but itself); empty: none
thread_local std::vector<uint32_t> g_tree;
thread_local std::vector<int64_t> g_depths;

const OrtApi* g_api = nullptr;

struct Kernel {
    int64_t h, hkv, window;
    float scale;
    OrtOp* onnxruntime = nullptr;  // ONNX Runtime's own GroupQueryAttention: prefill runs there
    ~Kernel() {
        if (onnxruntime) OrtFunctions(g_api).release(onnxruntime);
    }
};

// ONNX Runtime's com.microsoft GroupQueryAttention with these attributes, rotating (do_rotary)
OrtStatus* create_onnxruntime_op(const OrtFunctions& ort, const OrtKernelInfo* info, Kernel& k) {
    const int64_t one = 1, zero = 0;
    struct Attr {
        const char* name;
        const void* data;
        OrtOpAttrType type;
    };
    std::vector<Attr> wanted = {{"num_heads", &k.h, ORT_OP_ATTR_INT}, {"kv_num_heads", &k.hkv, ORT_OP_ATTR_INT},
                                {"do_rotary", &one, ORT_OP_ATTR_INT}, {"rotary_interleaved", &zero, ORT_OP_ATTR_INT}};
    if (k.scale != 0.f) wanted.push_back({"scale", &k.scale, ORT_OP_ATTR_FLOAT});
    if (k.window > 0) wanted.push_back({"local_window_size", &k.window, ORT_OP_ATTR_INT});
    std::vector<OrtOpAttr*> attrs;
    OrtStatus* status = nullptr;
    for (const Attr& a : wanted) {
        OrtOpAttr* attr = nullptr;
        if ((status = ort.create_attr(a.name, a.data, 1, a.type, &attr))) break;
        attrs.push_back(attr);
    }
    if (!status) {
        const char* names[] = {"T", "M"};
        const OrtTensorElementType types[] = {ORT_ELEMENT_FLOAT, ORT_ELEMENT_INT32};
        status = ort.create_op(info, "GroupQueryAttention", "com.microsoft", 1, names, types, 2, attrs.data(), int(attrs.size()),
                               10, 3, &k.onnxruntime);
    }
    for (OrtOpAttr* attr : attrs) ort.release(attr);
    return status;
}

OrtStatus* create_kernel(const OrtCustomOp*, const OrtApi* api, const OrtKernelInfo* info, void** out) {
    OrtFunctions ort(api);
    int64_t h = 0, hkv = 0, window = -1;
    float scale = 0.f;
    ORT_RETURN_IF_ERROR(ort.attribute(info, "num_heads", &h));
    ORT_RETURN_IF_ERROR(ort.attribute(info, "kv_num_heads", &hkv));
    if (OrtStatus* missing = ort.attribute(info, "local_window_size", &window)) ort.release(missing), window = -1;
    if (OrtStatus* missing = ort.attribute(info, "scale", &scale)) ort.release(missing), scale = 0.f;
    if (h <= 0 || hkv <= 0 || h % hkv != 0)
        return ort.status(ORT_INVALID_ARGUMENT, "GroupQueryAttention: num_heads must be a positive multiple of kv_num_heads");
    Kernel* kernel = new (std::nothrow) Kernel{h, hkv, window, scale};
    if (!kernel) return ort.status(ORT_FAIL, "GroupQueryAttention: out of memory");
    if (OrtStatus* status = create_onnxruntime_op(ort, info, *kernel)) {
        delete kernel;
        return status;
    }
    *out = kernel;
    return nullptr;
}

OrtStatus* shape(const OrtFunctions& ort, const OrtValue* value, std::vector<int64_t>& dims) {
    OrtTensorTypeAndShapeInfo* info = nullptr;
    ORT_RETURN_IF_ERROR(ort.shape_info(value, &info));
    size_t rank = 0;
    OrtStatus* status = ort.rank(info, &rank);
    dims.assign(rank, 0);
    if (!status) status = ort.dims(info, dims.data(), rank);
    ort.release(info);
    return status;
}

OrtStatus* compute(void* kernel, OrtKernelContext* context) {
    const Kernel& kern = *static_cast<const Kernel*>(kernel);
    OrtFunctions ort(g_api);
    const OrtValue* in[8];
    for (size_t i = 0; i < 8; ++i) ORT_RETURN_IF_ERROR(ort.input(context, i, &in[i]));
    std::vector<int64_t> qkv_dims, past_dims;
    ORT_RETURN_IF_ERROR(shape(ort, in[0], qkv_dims));
    ORT_RETURN_IF_ERROR(shape(ort, in[1], past_dims));
    if (qkv_dims.size() != 3 || past_dims.size() != 4 || past_dims[1] != kern.hkv)
        return ort.status(ORT_INVALID_ARGUMENT, "GroupQueryAttention: qkv must be (B, S, width) and the past (B, kv heads, slots, D)");
    void* data[8];
    for (size_t i = 0; i < 8; ++i) ORT_RETURN_IF_ERROR(ort.data(in[i], &data[i]));
    Attention a{};
    a.b = qkv_dims[0], a.s = qkv_dims[1], a.h = kern.h, a.hkv = kern.hkv, a.d = past_dims[3], a.past = past_dims[2];
    if (qkv_dims[2] != (a.h + 2 * a.hkv) * a.d)
        return ort.status(ORT_INVALID_ARGUMENT, "GroupQueryAttention: qkv's width must be (num_heads + 2·kv_num_heads)·head size");
    const int64_t total = *static_cast<const int32_t*>(data[4]);
    a.out_t = std::max(a.past, total);
    a.scale = kern.scale != 0.f ? kern.scale : 1.f / std::sqrt(float(a.d));
    a.window = kern.window;
    a.qkv = static_cast<const float*>(data[0]);
    a.seqlens = static_cast<const int32_t*>(data[3]);
    a.cos = static_cast<const float*>(data[5]);
    a.sin = static_cast<const float*>(data[6]);
    a.positions = static_cast<const int64_t*>(data[7]);
    for (int64_t b = 0; b < a.b; ++b)
        if (past_of(a, b) < 0 || past_of(a, b) + a.s > a.out_t)
            return ort.status(ORT_INVALID_ARGUMENT, "GroupQueryAttention: seqlens_k does not fit the past and total lengths");
    std::vector<int64_t> table_dims;
    ORT_RETURN_IF_ERROR(shape(ort, in[5], table_dims));
    if (table_dims.size() != 2 || table_dims[1] * 2 != a.d)
        return ort.status(ORT_INVALID_ARGUMENT, "GroupQueryAttention: cos_cache must be (positions, head size / 2)");
    for (int64_t i = 0; i < a.b * a.s; ++i)
        if (a.positions[i] < 0 || a.positions[i] >= table_dims[0])
            return ort.status(ORT_INVALID_ARGUMENT, "GroupQueryAttention: a position is outside the rotary tables");

    const int64_t out_dims[3] = {a.b, a.s, a.h * a.d}, kv_dims[4] = {a.b, a.hkv, a.out_t, a.d};
    OrtValue *out = nullptr, *key = nullptr, *value = nullptr;
    ORT_RETURN_IF_ERROR(ort.output(context, 0, out_dims, 3, &out));
    ORT_RETURN_IF_ERROR(ort.output(context, 1, kv_dims, 4, &key));
    ORT_RETURN_IF_ERROR(ort.output(context, 2, kv_dims, 4, &value));
    void *o = nullptr, *k = nullptr, *v = nullptr;
    ORT_RETURN_IF_ERROR(ort.data(out, &o));
    ORT_RETURN_IF_ERROR(ort.data(key, &k));
    ORT_RETURN_IF_ERROR(ort.data(value, &v));
    a.out = static_cast<float*>(o), a.key = static_cast<float*>(k), a.value = static_cast<float*>(v);
    if (g_through.hook) {
        if (a.b != 1 || a.past != 0)
            return ort.status(ORT_INVALID_ARGUMENT, "GroupQueryAttention: attending through the caller takes one "
                                                    "sequence and no past (the caller's cache holds it)");
        thread_local std::vector<float> rotated;
        rotated.resize(size_t(a.s * a.h * a.d));
        a.q = &rotated;
        Job job{&a, 1, nullptr};
        if (a.s <= 2)
            for (int64_t i = 0; i < a.s; ++i) place(a, i);
        else
            ORT_RETURN_IF_ERROR(ort.parallel_for(context, run_place, size_t(a.s), &job));
        const int64_t layer = g_through.calls++;
        g_through.context = context;  // (edgetok_hook_parallel_for)
        const int failed = g_through.hook(g_through.user, layer, rotated.data(), a.key, a.value, a.s, a.scale, a.out);
        g_through.context = nullptr;
        if (failed) return ort.status(ORT_FAIL, "GroupQueryAttention: the caller's attention failed");
        return nullptr;
    }
    if (!g_tree.empty()) {
        if (a.b != 1 || a.s != int64_t(g_tree.size()))
            return ort.status(ORT_INVALID_ARGUMENT, "GroupQueryAttention: a draft tree runs as one sequence of its nodes");
        a.sees = g_tree.data(), a.depths = g_depths.data();
    }
    int64_t longest = 0;
    for (int64_t b = 0; b < a.b; ++b) longest = std::max(longest, past_of(a, b) + a.s);
    // a prefill, or one short cache: ONNX Runtime's kernel (its GEMMs; under 512 slots as fast), on
    // the same inputs and outputs (a draft tree: here, which masks its branches)
    if (a.s > FEW_TOKENS || (longest < LONG_CACHE && a.b == 1 && !a.sees)) {
        const OrtValue* inputs[10] = {in[0], nullptr, nullptr, in[1], in[2], in[3], in[4], in[5], in[6], in[7]};
        OrtValue* outputs[3] = {out, key, value};
        return ort.invoke(context, kern.onnxruntime, inputs, 10, outputs, 3);
    }
    // present is the past's memory when the caller bound it so; otherwise the past is copied in
    for (int which = 0; which < 2; ++which) {
        const float* past = static_cast<const float*>(data[1 + which]);
        float* present = which == 0 ? a.key : a.value;
        if (present == past || a.past == 0) continue;
        for (int64_t r = 0; r < a.b * a.hkv; ++r)
            std::memcpy(present + r * a.out_t * a.d, past + r * a.past * a.d, size_t(a.past * a.d) * sizeof(float));
    }
    if (a.b * a.s == 0) return nullptr;

    thread_local std::vector<float> queries, parts;
    queries.resize(size_t(a.b * a.s * a.h * a.d));
    a.q = &queries;
    // few new tokens (decode, a draft): each query group's slots in chunks for the threads
    int64_t chunks = 1;
    for (int64_t b = 0; b < a.b; ++b) {
        int64_t first, count;
        chunks_of(a, b, first, count);
        chunks = std::max(chunks, count);
    }
    const int64_t tasks = a.b * a.hkv * chunks;
    parts.resize(size_t(tasks * a.s * (a.h / a.hkv) * (a.d + 2)));
    Job job{&a, chunks, &parts};
    if (a.b * a.s <= 2)  // a decode step or two: not worth waking the threads
        for (int64_t i = 0; i < a.b * a.s; ++i) place(a, i);
    else
        ORT_RETURN_IF_ERROR(ort.parallel_for(context, run_place, size_t(a.b * a.s), &job));
    ORT_RETURN_IF_ERROR(ort.parallel_for(context, run_attend, size_t(tasks), &job));
    merge(job);
    return nullptr;
}

void destroy(void* kernel) { delete static_cast<Kernel*>(kernel); }

const OrtCustomOp g_op = cpu_op<create_kernel, compute, destroy>(
    [](const OrtCustomOp*) { return "GroupQueryAttention"; }, [](const OrtCustomOp*, size_t i) {
        return i == 3 || i == 4 ? ORT_ELEMENT_INT32 : i == 7 ? ORT_ELEMENT_INT64 : ORT_ELEMENT_FLOAT;
    },
    [](const OrtCustomOp*) -> size_t { return 8; }, [](const OrtCustomOp*) -> size_t { return 3; });

}  // namespace

// Set (hook non-null) or clear this thread's hook; → the op's calls since it was last set.
extern "C" __attribute__((visibility("default"))) int64_t edgetok_attend_through(AttendHook hook, void* user) {
    const int64_t calls = g_through.calls;
    g_through = Through{hook, user, 0};
    return calls;
}

// Set (n > 0: visible (n, n) bool, row s the new tokens token s sees) or clear (n = 0) this thread's
// draft tree. → 0, or 1 when n is more than a tree may have.
extern "C" __attribute__((visibility("default"))) int edgetok_draft_tree(const uint8_t* visible, int64_t n) {
    if (n < 0 || n > FEW_TOKENS) return 1;
    g_tree.assign(size_t(n), 0u);
    g_depths.assign(size_t(n), -1);
    for (int64_t s = 0; s < n; ++s)
        for (int64_t j = 0; j < n; ++j)
            if (visible[s * n + j]) g_tree[size_t(s)] |= 1u << j, ++g_depths[size_t(s)];
    return 0;
}

// For a hook's own parallel work: fn(user, i) for i in [0, n) on the session's intra-op threads (the
// op's, idle while the hook runs) when called from inside a hook, else in turn on this thread.
// → 0, or 1 when ONNX Runtime refused.
extern "C" __attribute__((visibility("default"))) int edgetok_hook_parallel_for(void (*fn)(void*, size_t), size_t n,
                                                                               void* user) {
    if (g_through.context == nullptr || g_api == nullptr || n <= 1) {
        for (size_t i = 0; i < n; ++i) fn(user, i);
        return 0;
    }
    const OrtFunctions ort(g_api);
    OrtStatus* status = ort.parallel_for(g_through.context, fn, n, user);
    if (status == nullptr) return 0;
    ort.release(status);
    return 1;
}

// For the library's registration (q4_matmul.cpp's RegisterCustomOps).
const OrtCustomOp* edgetok_attention_op(const OrtApi* api) {
#ifndef EDGETOK_PORTABLE_ONLY
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma")) return nullptr;
#endif
    g_api = api;
    return &g_op;
}
