// edgetok.kernels._mixed_attention: the mixed-bit attention op on the CPU (contract: mixed_attention.md).
//
// A CPython extension over plain buffers (no torch): the queries, the output and the chunk table
// come in through the buffer protocol; the table's rows point at the chunks' own memory (codes,
// scales, float rows), which the caller keeps alive for the call. The inner loops
// (mixed_attention_body.h) are compiled three times — portable, AVX2+FMA, AVX-512 — and the best one
// the CPU supports runs (chosen once, at import). Work is split over (KV head, run of chunks)
// items on a small persistent thread pool; each item runs an online softmax over its chunks and the
// partial results are merged by their log-sum-exp.

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <pthread.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <mutex>
#include <numeric>
#include <thread>
#include <vector>

#include "mixed_attention_problem.h"

#define EDGETOK_ISA 0
namespace scalar {
#include "mixed_attention_body.h"
}
#undef EDGETOK_ISA

#ifndef EDGETOK_PORTABLE_ONLY  // x86-64: the same loops for AVX2 and AVX-512, chosen at import
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define EDGETOK_ISA 2
namespace avx2 {
#include "mixed_attention_body.h"
}
#undef EDGETOK_ISA
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
#define EDGETOK_ISA 512
namespace avx512 {
#include "mixed_attention_body.h"
}
#undef EDGETOK_ISA
#pragma GCC pop_options
#endif

namespace {

using ItemFn = void (*)(const Problem&, int, int64_t, int64_t, float*, float*, float*, float*);
using BoundsFn = void (*)(const float*, int, int, const uint16_t*, int64_t, int64_t, int64_t, float, float*, float*);
using SoftmaxFn = void (*)(float*, int64_t);
using ScoresFn = void (*)(const float*, const float*, const float*, const int32_t*, int, int, const uint8_t*, int64_t,
                          const uint16_t*, int64_t, int64_t, int64_t, int64_t, int64_t, float*, float*);
using ExpsFn = void (*)(const float*, int, int64_t, const float*, int64_t, int64_t, int64_t, int64_t, float*, float*);

struct Isa {
    const char* name;
    ItemFn run;
    BoundsFn bounds;
    SoftmaxFn softmax;
    ScoresFn scores;
    ExpsFn exps;
    bool supported;
};

Isa isas[3];

void detect_isas() {
#ifdef EDGETOK_PORTABLE_ONLY
    isas[0] = isas[1] = {"none", scalar::run_item, scalar::chunk_bounds, scalar::chunk_softmax, scalar::token_scores, scalar::chunk_exps, false};
#else
    __builtin_cpu_init();
    isas[0] = {"avx512", avx512::run_item, avx512::chunk_bounds, avx512::chunk_softmax, avx512::token_scores, avx512::chunk_exps,
               __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
                   __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")};
    isas[1] = {"avx2", avx2::run_item, avx2::chunk_bounds, avx2::chunk_softmax, avx2::token_scores, avx2::chunk_exps, __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")};
#endif
    isas[2] = {"scalar", scalar::run_item, scalar::chunk_bounds, scalar::chunk_softmax, scalar::token_scores, scalar::chunk_exps, true};
}

const Isa* find_isa(const char* name) {
    for (const Isa& isa : isas)
        if (isa.supported && (std::strcmp(name, "auto") == 0 || std::strcmp(name, isa.name) == 0)) return &isa;
    return nullptr;
}

// A persistent pool: `run(n, threads, f)` calls f(0..n-1) on up to `threads` threads (the caller
// is one of them) and returns when all are done. One job at a time (callers are serialized).
class Pool {
  public:
    void run(int n, int threads, const std::function<void(int)>& f) {
        threads = std::max(1, std::min(threads, n));
        if (threads == 1) {
            for (int i = 0; i < n; ++i) f(i);
            return;
        }
        std::lock_guard<std::mutex> serial(call_mu_);
        while (int(workers_.size()) < threads - 1) {
            const int index = int(workers_.size());
            workers_.emplace_back([this, index] { work(index); });
            workers_.back().detach();  // blocked workers never hold up the process's exit
        }
        {
            std::lock_guard<std::mutex> lock(mu_);
            job_ = &f;
            n_items_ = n;
            next_.store(0);
            helpers_ = threads - 1;
            pending_ = threads - 1;
            ++generation_;
        }
        wake_.notify_all();
        drain();
        std::unique_lock<std::mutex> lock(mu_);
        done_.wait(lock, [this] { return pending_ == 0; });
        job_ = nullptr;
    }

  private:
    void drain() {
        for (int i; (i = next_.fetch_add(1)) < n_items_;) (*job_)(i);
    }

    void work(int index) {
        uint64_t seen = 0;
        for (;;) {
            {
                std::unique_lock<std::mutex> lock(mu_);
                wake_.wait(lock, [&] { return generation_ != seen; });
                seen = generation_;
                if (index >= helpers_) continue;  // this job needs fewer threads
            }
            drain();
            std::lock_guard<std::mutex> lock(mu_);
            if (--pending_ == 0) done_.notify_all();
        }
    }

    std::vector<std::thread> workers_;
    std::mutex call_mu_, mu_;
    std::condition_variable wake_, done_;
    const std::function<void(int)>* job_ = nullptr;
    int n_items_ = 0, helpers_ = 0, pending_ = 0;
    std::atomic<int> next_{0};
    uint64_t generation_ = 0;
};

Pool* pool = nullptr;  // leaked on purpose: its threads may outlive any static destructor

void forget_pool_in_child() { pool = nullptr; }  // a forked child has none of the parent's threads

// Another runtime's threads: fn(user, i) for i in [0, n) (edgetok's GroupQueryAttention lends its
// session's, kernels/attention_op.cpp: edgetok_hook_parallel_for) → 0, or non-zero when refused.
using ParallelFor = int (*)(void (*)(void*, size_t), size_t, void*);

// Chunks best first (descending score, ties to the lower index: a stable sort's order), found
// only as far as asked: a selection reads a fifth of a layer's chunks or so, and sorting all of
// them cost it more than scoring them. take(k) puts the k best first, in no order (what a
// selection reads anyway need not be ordered); past them, [i] sorts as far as it is read;
// ascending() hands the first k over by id. Each score and its index are one integer key (the
// score's bits made to order as floats do). Both selections (by bounds, by token scores) and the
// channel choice rank with it.
class BestFirst {
  public:
    void reset(const float* scores, int64_t c) {
        keys_.resize(size_t(c));
        for (int64_t i = 0; i < c; ++i) {
            uint32_t bits;
            std::memcpy(&bits, &scores[i], 4);
            bits ^= bits >> 31 ? 0xFFFFFFFFu : 0x80000000u;           // ascending as the floats
            keys_[size_t(i)] = uint64_t(~bits) << 32 | uint64_t(i);  // descending score, then ascending index
        }
        ordered_ = 0;
    }
    void take(int64_t k) {  // (at most once, first)
        k = std::min<int64_t>(k, int64_t(keys_.size()));
        if (k > 0 && k < int64_t(keys_.size())) std::nth_element(keys_.begin(), keys_.begin() + k, keys_.end());
        ordered_ = std::max<int64_t>(k, 0);
    }
    int64_t operator[](int64_t i) {  // the i-th best chunk (i ≥ take's k), or one of take's
        if (i >= ordered_) sort_to(std::max({i + 1, 2 * ordered_, int64_t(32)}));  // (a few rounds of partitioning, not one a read)
        return int64_t(keys_[size_t(i)] & 0xFFFFFFFFu);
    }
    void ascending(int64_t k, int64_t* out) {  // the first k (taken or read) by id
        marks_.assign(keys_.size(), 0);
        for (int64_t i = 0; i < k; ++i) marks_[keys_[size_t(i)] & 0xFFFFFFFFu] = 1;
        for (size_t i = 0, taken = 0; i < marks_.size(); ++i)
            if (marks_[i]) out[taken++] = int64_t(i);
    }
    void sort_to(int64_t k) {  // the first k in order (past take's)
        const auto first = keys_.begin() + ordered_, end = keys_.begin() + std::min<int64_t>(k, int64_t(keys_.size()));
        if (end <= first) return;
        if (end < keys_.end()) std::nth_element(first, end, keys_.end());
        std::sort(first, end);
        ordered_ = end - keys_.begin();
    }

  private:
    std::vector<uint64_t> keys_;
    std::vector<uint8_t> marks_;
    int64_t ordered_ = 0;
};

// out (Hkv, R, D), lse (Hkv, R): the attention of every row over every chunk. Items run on
// `parallel_for` when given (threads: how many it has), else on the pool.
void attend(const Problem& p, const Isa& isa, int threads, float* out, float* lse, ParallelFor parallel_for = nullptr) {
    const int rows = p.rows, d = p.d;
    // Items: each KV head's chunks split into `parts` runs, enough for every thread to have work.
    int64_t parts = std::max<int64_t>(1, std::min<int64_t>(p.n_chunks, (2 * threads + p.n_kv - 1) / p.n_kv));
    if (threads <= 1) parts = 1;
    const int items = int(p.n_kv * parts);
    const size_t part_floats = size_t(rows) * (d + 2);
    const size_t groups = size_t(d / p.vgroup);  // (run_item's layout)
    const size_t scratch_floats = size_t(rows) * (d + 16) + 2 * size_t(rows) * d + rows + size_t(rows) * TILE + 2 * size_t(d) +
                                  2 * TILE * groups;
    std::vector<float> partial(part_floats * items), scratch(scratch_floats * items);
    auto item = [&](int i) {
        const int head = int(i / parts);
        const int64_t part = i % parts;
        const int64_t c0 = p.n_chunks * part / parts, c1 = p.n_chunks * (part + 1) / parts;
        float* m = partial.data() + part_floats * i;
        isa.run(p, head, c0, c1, m, m + rows, m + 2 * rows, scratch.data() + scratch_floats * i);
    };
    auto each = [](void* f, size_t i) { (*static_cast<decltype(item)*>(f))(int(i)); };
    const bool lent = parallel_for != nullptr && items > 1 && parallel_for(each, size_t(items), &item) == 0;
    if (!lent && threads > 1 && items > 1) {
        if (pool == nullptr) pool = new Pool();
        pool->run(items, threads, item);
    } else if (!lent) {
        for (int i = 0; i < items; ++i) item(i);
    }
    // Merge each head's parts: o = Σ_p e^{m_p - M} acc_p / Σ_p e^{m_p - M} l_p.
    for (int head = 0; head < p.n_kv; ++head) {
        for (int r = 0; r < rows; ++r) {
            float big = -INFINITY;
            for (int64_t part = 0; part < parts; ++part) big = std::max(big, partial[part_floats * (head * parts + part) + r]);
            float* o = out + (size_t(head) * rows + r) * d;
            std::memset(o, 0, sizeof(float) * d);
            if (big == -INFINITY) {  // no token at all: zeros, and a log-sum-exp of -inf
                lse[head * rows + r] = -INFINITY;
                continue;
            }
            float total = 0.0f;
            for (int64_t part = 0; part < parts; ++part) {
                const float* m = partial.data() + part_floats * (head * parts + part);
                if (m[r] == -INFINITY) continue;
                const float w = std::exp(m[r] - big);
                total += w * m[rows + r];
                const float* acc = m + 2 * rows + size_t(r) * d;
                for (int c = 0; c < d; ++c) o[c] += w * acc[c];
            }
            for (int c = 0; c < d; ++c) o[c] /= total;
            lse[head * rows + r] = big + std::log(total);
        }
    }
}

// -- chunk selection (kernels/selection.py: select_chunks, for one layer; that is its oracle) ------

struct Selection {
    const float* q;          // (Hq, D): the query as the cache keeps it (attention at 1/√D)
    const uint16_t* abstracts;  // (Hkv, 2D, stride) bf16: each chunk's max keys, then its min keys
    const uint8_t* pinned;   // (count,) or null: chunks always read
    int64_t stride, count, keep, sinks, recent;
    int n_kv, g, d;
    float temperature, coverage;  // coverage ≤ 0: keep exactly `keep` chunks
    bool per_head;                // each KV head ranks and keeps its own chunks
};

// The chunks to read: ids (groups, row) with row ≥ count, of which each group's first n[group]
// count, ascending (groups = Hkv per head, else 1). Returns the estimated coverage: the least covered head's share
// of the bounds' softmax. Ties rank the lower id first (torch's stable sort).
float select_layer(const Selection& s, const Isa& isa, int64_t* ids, int64_t row, int64_t* n, ParallelFor parallel_for = nullptr) {
    const int64_t c = s.count, hkv = s.n_kv, groups = s.per_head ? hkv : 1;
    if (c == 0) {
        for (int64_t grp = 0; grp < groups; ++grp) n[grp] = 0;
        return 1.0f;
    }
    thread_local std::vector<float> shares, scores;
    thread_local BestFirst order;
    shares.resize(size_t(hkv * c));
    scores.resize(size_t(groups * c));
    // each KV head's shares (the pass over the abstracts: most of the work), on the lent threads if any
    float* out = shares.data();
    // Items: each head's chunks in two runs of whole 32-chunk blocks, so that a few heads spread
    // evenly over the threads (3 heads on 2 threads: 6 items, not 2 + 1); split alike on one thread
    const int64_t blocks = (c + 31) / 32, parts = std::min<int64_t>(2, blocks);
    auto bound = [&](size_t i) {
        const int64_t h = int64_t(i) / parts, part = int64_t(i) % parts;
        const int64_t c0 = std::min(c, blocks * part / parts * 32), c1 = std::min(c, blocks * (part + 1) / parts * 32);
        thread_local std::vector<float> scratch;
        scratch.resize(size_t(2 * s.g * s.d));
        isa.bounds(s.q + h * s.g * s.d, s.g, s.d, s.abstracts + h * 2 * s.d * s.stride, s.stride, c0, c1,
                   1.0f / (std::sqrt(float(s.d)) * s.temperature), out + h * c, scratch.data());
    };
    auto each = [](void* f, size_t i) { (*static_cast<decltype(bound)*>(f))(i); };
    const size_t items = size_t(hkv * parts);
    if (parallel_for == nullptr || items == 1 || parallel_for(each, items, &bound) != 0)
        for (size_t i = 0; i < items; ++i) bound(i);
    for (int64_t h = 0; h < hkv; ++h) isa.softmax(out + h * c, c);
    auto forced = [&](int64_t i) { return i < s.sinks || i >= c - s.recent || (s.pinned && s.pinned[i]); };
    int64_t n_forced = 0;
    for (int64_t i = 0; i < c; ++i) n_forced += forced(i);
    for (int64_t grp = 0; grp < groups; ++grp) {  // scores: a head's shares, or the max over heads
        float* sc = scores.data() + grp * c;
        for (int64_t i = 0; i < c; ++i) {
            float best = shares[size_t(grp * c + i)];
            if (!s.per_head)
                for (int64_t h = 1; h < hkv; ++h) best = std::max(best, shares[size_t(h * c + i)]);
            sc[i] = forced(i) ? INFINITY : best;
        }
    }
    int64_t keep = std::min(s.keep, c);
    const bool auto_keep = s.coverage > 0.0f;
    if (auto_keep) {  // as many as cover `coverage` of every head's shares along its group's order
        int64_t need = 1;
        for (int64_t grp = 0; grp < groups; ++grp) {  // (past keep, the order cannot change keep)
            order.reset(scores.data() + grp * c, c);
            for (int64_t h = s.per_head ? grp : 0; h < (s.per_head ? grp + 1 : hkv); ++h) {
                const float* x = shares.data() + h * c;
                float covered = 0.0f;
                int64_t below = 0;
                while (below < keep && (covered += x[order[below]]) < s.coverage) ++below;
                need = std::max(need, std::min(below, c - 1) + 1);
            }
        }
        keep = std::min(std::max(need, n_forced), keep);
    }
    float estimated = INFINITY;
    for (int64_t grp = 0; grp < groups; ++grp) {
        const float* sc = scores.data() + grp * c;
        int64_t* out = ids + grp * row;
        const int64_t k = std::max<int64_t>(keep, 1);  // (keep 0 reads nothing; its estimate is the best chunk's)
        order.reset(sc, c);
        order.take(k);
        order.ascending(k, out);
        n[grp] = keep;
        for (int64_t h = s.per_head ? grp : 0; h < (s.per_head ? grp + 1 : hkv); ++h) {
            const float* x = shares.data() + h * c;
            float covered = 0.0f;
            for (int64_t j = 0; j < k; ++j) covered += x[out[j]];
            estimated = std::min(estimated, covered);
        }
    }
    return estimated;
}

bool check(bool ok, const char* message) {
    if (!ok) PyErr_SetString(PyExc_ValueError, message);
    return ok;
}

// The table's rows must describe chunks the loops can read (the pointers are the caller's word).
bool check_table(const Problem& p) {
    if (!check(p.d > 0 && p.d <= MAX_D && p.d % 16 == 0, "head_dim must be a multiple of 16 up to 512")) return false;
    if (!check(p.vgroup > 0 && p.vgroup % 16 == 0 && p.d % p.vgroup == 0, "vgroup must be a multiple of 16 dividing head_dim")) return false;
    if (!check(p.n_kv > 0 && p.rows > 0 && p.t > 0 && p.rows % p.t == 0, "rows must be a positive multiple of the query tokens")) return false;
    for (int64_t i = 0; i < p.n_chunks; ++i) {
        const int64_t* ch = p.table + i * N_FIELDS;
        const int64_t bits = ch[F_BITS], len = ch[F_LENGTH];
        if (!check(bits == 32 || bits == 16 || bits == 8 || bits == 4 || bits == 2, "a chunk's bits must be 32, 16, 8, 4 or 2")) return false;
        if (!check(len >= 0 && ch[F_K] != 0 && ch[F_V] != 0, "a chunk needs a length and its K and V")) return false;
        if (bits < 16) {
            if (!check(len * bits % 8 == 0, "a quantized chunk's codes fill whole bytes per channel")) return false;
            if (!check(ch[F_K_SCALE] && ch[F_K_ZERO] && ch[F_V_SCALE] && ch[F_V_ZERO], "a quantized chunk needs its scales and zeros")) return false;
            if (!check(!ch[F_CAUSAL], "only a float chunk (the window) can hold the queries' own tokens")) return false;
        }
        if (ch[F_CAUSAL] > 0 && !check(len >= p.t, "the causal chunk holds the queries' own tokens: at least T of them")) return false;
        if (ch[F_CAUSAL] < 0 && !check(-ch[F_CAUSAL] > p.t, "a sliding window must be wider than the query tokens")) return false;
    }
    return true;
}

PyObject* py_attend(PyObject*, PyObject* args) {
    Py_buffer q, out, lse, table;
    Problem p{};
    int threads;
    const char* isa_name;
    if (!PyArg_ParseTuple(args, "y*w*w*y*iiiiifis", &q, &out, &lse, &table, &p.n_kv, &p.rows, &p.t, &p.d, &p.vgroup, &p.scale,
                          &threads, &isa_name))
        return nullptr;
    PyObject* result = nullptr;
    const Isa* isa = find_isa(isa_name);
    const Py_ssize_t values = Py_ssize_t(p.n_kv) * p.rows * p.d;
    if (!isa) {
        PyErr_Format(PyExc_ValueError, "instruction set %s is not available on this CPU", isa_name);
    } else if (check(q.len == values * 4 && out.len == values * 4, "q and out must be float32 (Hkv, R, D)") &&
               check(lse.len == Py_ssize_t(p.n_kv) * p.rows * 4, "lse must be float32 (Hkv, R)") &&
               check(table.len % (N_FIELDS * 8) == 0, "the table must be int64 (n, fields)")) {
        p.q = static_cast<const float*>(q.buf);
        p.table = static_cast<const int64_t*>(table.buf);
        p.n_chunks = table.len / (N_FIELDS * 8);
        if (check_table(p)) {
            Py_BEGIN_ALLOW_THREADS
            attend(p, *isa, threads, static_cast<float*>(out.buf), static_cast<float*>(lse.buf));
            Py_END_ALLOW_THREADS
            result = Py_NewRef(Py_None);
        }
    }
    PyBuffer_Release(&q);
    PyBuffer_Release(&out);
    PyBuffer_Release(&lse);
    PyBuffer_Release(&table);
    return result;
}

PyObject* py_select(PyObject*, PyObject* args) {
    Py_buffer q, abstracts, pinned, plans, temperatures, ids, n, estimated;
    int n_kv, g, d, per_head;
    long long stride;
    float coverage;
    const char* isa_name;
    if (!PyArg_ParseTuple(args, "y*y*y*y*y*w*w*w*iiiLfps", &q, &abstracts, &pinned, &plans, &temperatures, &ids, &n, &estimated,
                          &n_kv, &g, &d, &stride, &coverage, &per_head, &isa_name))
        return nullptr;
    PyObject* result = nullptr;
    const Isa* isa = find_isa(isa_name);
    const int64_t layers = plans.len / (4 * 8), groups = per_head ? n_kv : 1;
    const int64_t row = layers ? ids.len / (8 * layers * groups) : 0;
    const int64_t layer_values = int64_t(n_kv) * 2 * d * stride;
    bool ok = isa != nullptr || check(false, "no such instruction set here");
    ok = ok && check(n_kv > 0 && g > 0 && d > 0 && stride >= 0, "n_kv, g, d must be positive") &&
         check(plans.len == layers * 4 * 8, "plans must be int64 (L, 4): count, keep, sinks, recent") &&
         check(q.len == layers * n_kv * g * d * 4, "q must be float32 (L, Hq, D)") &&
         check(abstracts.len >= layers * layer_values * 2, "abstracts must be bf16 (L, Hkv, 2D, stride)") &&
         check(pinned.len == 0 || pinned.len >= layers * stride, "pinned must be bool (L, stride), or empty") &&
         check(temperatures.len == layers * 4 && estimated.len == layers * 4, "temperatures and estimated are float32 (L,)") &&
         check(n.len == layers * groups * 8 && ids.len == layers * groups * row * 8, "ids (L, groups, row) and n (L, groups) are int64");
    const int64_t* plan = static_cast<const int64_t*>(plans.buf);
    for (int64_t l = 0; ok && l < layers; ++l)
        ok = check(plan[4 * l] >= 0 && plan[4 * l] <= std::min<int64_t>(stride, row), "a layer's chunk count must fit its abstracts and ids");
    if (ok) {
        Py_BEGIN_ALLOW_THREADS
        for (int64_t l = 0; l < layers; ++l) {
            const int64_t* p = plan + 4 * l;
            if (p[1] < 0) continue;  // (a layer that reads every chunk: nothing to select)
            Selection s{};
            s.q = static_cast<const float*>(q.buf) + l * n_kv * g * d;
            s.abstracts = static_cast<const uint16_t*>(abstracts.buf) + l * layer_values;
            s.pinned = pinned.len ? static_cast<const uint8_t*>(pinned.buf) + l * stride : nullptr;
            s.stride = stride, s.count = p[0], s.keep = p[1], s.sinks = p[2], s.recent = p[3];
            s.n_kv = n_kv, s.g = g, s.d = d;
            s.temperature = static_cast<const float*>(temperatures.buf)[l], s.coverage = coverage;
            s.per_head = per_head;
            static_cast<float*>(estimated.buf)[l] =
                select_layer(s, *isa, static_cast<int64_t*>(ids.buf) + l * groups * row, row, static_cast<int64_t*>(n.buf) + l * groups);
        }
        Py_END_ALLOW_THREADS
        result = Py_NewRef(Py_None);
    }
    for (Py_buffer* b : {&q, &abstracts, &pinned, &plans, &temperatures, &ids, &n, &estimated}) PyBuffer_Release(b);
    return result;
}

// Chunk selection by token scores (kernels/token_scores.py: token_masses over KeySketch.keys, then
// select_by_masses, its oracle) for one layer. The first count × size tokens are in chunks, read
// from the sketch (Hkv, D, sketch_stride bytes: packed 4-bit codes) with its lows and steps (Hkv, D);
// the rest, the window, from the keys (Hkv, head_stride) bf16, each head's first n rows of D. Each KV head picks the R channels
// where its group's |q| sums largest and estimates every token's logit on them (SparQ's scale);
// each query head's softmax gives its mass per chunk. A group (a KV head, or the whole layer)
// ranks chunks by the most any of its query heads puts there (forced ones first) and reads keep,
// or under a coverage target as many as its neediest query head needs (the window counts), from
// max(forced, least) up to keep. → ids (groups, row) ascending, n (groups); the least covered
// query head's estimated share.
struct TokenSelection {
    const float* q;            // (Hq, D)
    const uint16_t* keys;      // (Hkv, head_stride) bf16: the window's
    const uint8_t* sketch;     // (Hkv, D, sketch_stride bytes): the chunks' 4-bit codes (token_scores.KeySketch)
    const float* sketch_low;   // (Hkv, D)
    const float* sketch_step;  // (Hkv, D)
    const uint8_t* pinned;     // (count,) or null
    int64_t head_stride, sketch_stride, n, count, size, keep, sinks, recent, least;
    int n_kv, g, d, channels;
    float coverage;            // ≤ 0: read exactly keep
    bool per_head;
};

// f(0 .. items-1) on the lent threads (parallel_for), or here.
template <typename F>
void run_items(size_t items, F& f, ParallelFor parallel_for) {
    auto each = [](void* fn, size_t i) { (*static_cast<F*>(fn))(i); };
    if (parallel_for == nullptr || items == 1 || parallel_for(each, items, &f) != 0)
        for (size_t i = 0; i < items; ++i) f(i);
}

float select_by_tokens(const TokenSelection& s, const Isa& isa, int64_t* ids, int64_t row, int64_t* n,
                       ParallelFor parallel_for = nullptr) {
    const int64_t c = s.count, hkv = s.n_kv, g = s.g, groups = s.per_head ? hkv : 1, heads = hkv * g / groups;
    if (c == 0) {  // no chunk yet: nothing to score or miss
        for (int64_t grp = 0; grp < groups; ++grp) n[grp] = 0;
        return 1.0f;
    }
    const int r = std::max(1, std::min(s.channels, s.d));
    thread_local std::vector<float> masses, window, scratch, qs, qk, bias, weight, top, lowest;
    thread_local std::vector<int32_t> picked;
    thread_local BestFirst channels;
    masses.resize(size_t(hkv * g * c));
    window.resize(size_t(hkv * g));
    weight.resize(size_t(s.d));
    picked.resize(size_t(hkv * s.d));
    qs.resize(size_t(hkv * g * r));
    qk.resize(size_t(hkv * g * r));
    bias.resize(size_t(hkv * g));
    scratch.resize(size_t(hkv * g * s.n));
    for (int64_t h = 0; h < hkv; ++h) {  // each KV head's channels and its queries on them
        const float* qh = s.q + h * g * s.d;
        const float *low = s.sketch_low + h * s.d, *step = s.sketch_step + h * s.d;
        int32_t* ph = picked.data() + h * s.d;
        std::fill(weight.begin(), weight.end(), 0.0f);
        for (int64_t j = 0; j < g; ++j)
            for (int dd = 0; dd < s.d; ++dd) weight[size_t(dd)] += std::fabs(qh[j * s.d + dd]);
        channels.reset(weight.data(), s.d);  // the R largest, largest first
        channels.sort_to(r);
        for (int i = 0; i < r; ++i) ph[i] = int32_t(channels[i]);
        for (int64_t j = 0; j < g; ++j) {
            float all = 0.0f, kept = 0.0f;
            for (int dd = 0; dd < s.d; ++dd) all += std::fabs(qh[j * s.d + dd]);
            for (int i = 0; i < r; ++i) kept += std::fabs(qh[j * s.d + ph[i]]);
            const float sparq = 1.0f / std::sqrt(float(s.d) * std::max(all > 0.0f ? kept / all : 1.0f, 1e-6f));
            float b = 0.0f;
            for (int i = 0; i < r; ++i) {
                qk[size_t((h * g + j) * r + i)] = qh[j * s.d + ph[i]] * sparq;
                qs[size_t((h * g + j) * r + i)] = qh[j * s.d + ph[i]] * sparq * step[ph[i]];
                b += qh[j * s.d + ph[i]] * sparq * low[ph[i]];
            }
            bias[size_t(h * g + j)] = b;
        }
    }
    // Items, on the lent threads: first each KV head's chunks in two runs (3 heads on 2 threads: 6
    // items, not 2 + 1), their tokens' scores and each chunk's exponentials against the run's own
    // maximum; then each group's softmax (the runs brought to the head's maximum) and ranking.
    const int64_t parts = c >= 2 ? 2 : 1;  // (c ≥ 1 here)
    // runs split where a chunk starts on a multiple of 16 tokens (a sketch byte holds two tokens,
    // and whole blocks go faster); the last one has the window's tokens too
    const int64_t align = 16 / std::gcd<int64_t>(s.size, 16);
    auto chunk_at = [&](int64_t part) { return part == parts ? c : c * part / parts / align * align; };
    top.assign(size_t(hkv * parts * g), -INFINITY);
    auto forced = [&](int64_t i) { return i < s.sinks || i >= c - s.recent || (s.pinned && s.pinned[i]); };
    int64_t n_forced = 0;
    for (int64_t i = 0; i < c; ++i) n_forced += forced(i);
    lowest.assign(size_t(groups), INFINITY);  // each group's least covered query head
    // (the items may run on other threads: they see this thread's buffers through these pointers)
    const float *qsp = qs.data(), *qkp = qk.data(), *bp = bias.data();
    const int32_t* pp = picked.data();
    float *scr = scratch.data(), *tp = top.data(), *ms = masses.data(), *wn = window.data(), *lp = lowest.data();
    auto score = [&](size_t i) {
        const int64_t h = int64_t(i) / parts, part = int64_t(i) % parts, c0 = chunk_at(part), c1 = chunk_at(part + 1);
        const int64_t t1 = part + 1 == parts ? s.n : c1 * s.size;
        float* top_run = tp + (h * parts + part) * g;
        isa.scores(qsp + h * g * r, bp + h * g, qkp + h * g * r, pp + h * s.d, int(g), r, s.sketch + h * s.d * s.sketch_stride,
                   s.sketch_stride, s.keys + h * s.head_stride, s.d, s.n, c * s.size, c0 * s.size, t1, scr + h * g * s.n, top_run);
        isa.exps(scr + h * g * s.n, int(g), s.n, top_run, c, s.size, c0, c1, ms + h * g * c, part + 1 == parts ? wn + h * g : nullptr);
    };
    auto rank_group = [&](size_t grp_) {
        const int64_t grp = int64_t(grp_);
        float* m = ms + grp * heads * c;  // (heads, C): the group's query heads
        float* w = wn + grp * heads;
        for (int64_t j = 0; j < heads; ++j) {  // each query head's softmax: its exponentials over their sum
            const int64_t hj = grp * heads + j, h = hj / g;
            float best = -INFINITY;
            for (int64_t part = 0; part < parts; ++part) best = std::max(best, tp[(h * parts + part) * g + hj % g]);
            float total = 0.0f;
            for (int64_t part = 0; part < parts; ++part) {  // (a run's exponentials are against its own maximum)
                const float run = tp[(h * parts + part) * g + hj % g], to = run == best ? 1.0f : std::exp(run - best);
                for (int64_t i = chunk_at(part), end = chunk_at(part + 1); i < end; ++i) total += (m[j * c + i] *= to);
                if (part + 1 == parts) total += (w[j] *= to);
            }
            const float inv = 1.0f / total;
            for (int64_t i = 0; i < c; ++i) m[j * c + i] *= inv;
            w[j] *= inv;
        }
        thread_local std::vector<float> rank;
        thread_local BestFirst order;
        rank.resize(size_t(c));
        for (int64_t i = 0; i < c; ++i) {
            float best = -INFINITY;
            for (int64_t j = 0; j < heads; ++j) best = std::max(best, m[j * c + i]);
            rank[size_t(i)] = forced(i) ? INFINITY : best;
        }
        order.reset(rank.data(), c);
        const int64_t most = std::max<int64_t>(1, std::min(s.keep, c));  // (past keep the order cannot change what is read)
        int64_t k = most;
        if (s.coverage > 0.0f) {  // each query head's coverage along the order, as far as it takes
            const int64_t first = std::min(most, std::max(n_forced, s.least));  // (read anyway)
            order.take(first);
            int64_t need = 1;
            for (int64_t j = 0; j < heads; ++j) {
                float sum = w[j];
                for (int64_t i = 0; i < first; ++i) sum += m[j * c + order[i]];
                if (sum >= s.coverage) continue;  // (it needs `first` or fewer)
                int64_t below = first;  // positions whose running sum is short of the target
                while (below < most && (sum += m[j * c + order[below]]) < s.coverage) ++below;
                need = std::max(need, std::min(below, c - 1) + 1);
            }
            k = std::min(std::max(need, first), k);
        } else {
            order.take(k);
        }
        for (int64_t j = 0; j < heads; ++j) {
            float sum = w[j];
            for (int64_t i = 0; i < k; ++i) sum += m[j * c + order[i]];
            lp[grp] = std::min(lp[grp], sum);
        }
        order.ascending(k, ids + grp * row);
        n[grp] = k;
    };
    run_items(size_t(hkv * parts), score, parallel_for);
    run_items(size_t(groups), rank_group, parallel_for);
    return *std::min_element(lowest.begin(), lowest.end());
}

PyObject* py_select_tokens(PyObject*, PyObject* args) {
    Py_buffer q, keys, sketch, sketch_low, sketch_step, pinned, ids, n;
    long long head_stride, sketch_stride, tokens, count, size, keep, sinks, recent, least;
    int n_kv, g, d, channels, per_head;
    float coverage;
    const char* isa_name;
    if (!PyArg_ParseTuple(args, "y*y*y*y*y*y*w*w*LLLLLLLLLiiiifps", &q, &keys, &sketch, &sketch_low, &sketch_step, &pinned, &ids, &n,
                          &head_stride, &sketch_stride, &tokens, &count, &size, &keep, &sinks, &recent, &least, &n_kv, &g, &d,
                          &channels, &coverage, &per_head, &isa_name))
        return nullptr;
    PyObject* result = nullptr;
    const Isa* isa = find_isa(isa_name);
    const int64_t groups = per_head ? n_kv : 1;
    bool ok = isa != nullptr || check(false, "no such instruction set here");
    ok = ok && check(n_kv > 0 && g > 0 && g <= 16 && d > 0 && channels > 0, "n_kv, g (at most 16), d and channels must be positive") &&
         check(size > 0 && count >= 0 && count * size <= tokens && tokens <= head_stride / d, "chunks must fit the tokens, the tokens a head's rows") &&
         check(q.len == int64_t(n_kv) * g * d * 4, "q must be float32 (Hq, D)") &&
         check(keys.len >= (n_kv - 1) * head_stride * 2 + tokens * d * 2, "keys must be bf16 (Hkv, head_stride)") &&
         check(2 * sketch_stride >= count * size && sketch.len >= int64_t(n_kv) * d * sketch_stride,
               "the sketch must be uint8 (Hkv, D, ≥ count × size / 2)") &&
         check(sketch_low.len == int64_t(n_kv) * d * 4 && sketch_step.len == sketch_low.len,
               "the sketch's lows and steps must be float32 (Hkv, D)") &&
         check(pinned.len == 0 || pinned.len >= count, "pinned must be bool (≥ count,), or empty") &&
         check(n.len == groups * 8 && ids.len >= groups * std::max<int64_t>(count, 1) * 8, "ids (groups, ≥ count) and n (groups,) are int64") &&
         check(sinks >= 0 && recent >= 0 && sinks <= count && recent <= count && keep >= 0, "sinks and recent must be chunk counts");
    if (ok) {
        TokenSelection s{};
        s.q = static_cast<const float*>(q.buf), s.keys = static_cast<const uint16_t*>(keys.buf);
        s.sketch = static_cast<const uint8_t*>(sketch.buf), s.sketch_low = static_cast<const float*>(sketch_low.buf);
        s.sketch_step = static_cast<const float*>(sketch_step.buf);
        s.sketch_stride = sketch_stride;
        s.pinned = pinned.len ? static_cast<const uint8_t*>(pinned.buf) : nullptr;
        s.head_stride = head_stride, s.n = tokens, s.count = count, s.size = size, s.keep = keep, s.sinks = sinks, s.recent = recent;
        s.least = least, s.n_kv = n_kv, s.g = g, s.d = d, s.channels = channels, s.coverage = coverage, s.per_head = per_head;
        const int64_t row = ids.len / (8 * groups);
        float estimated = 1.0f;
        Py_BEGIN_ALLOW_THREADS
        estimated = select_by_tokens(s, *isa, static_cast<int64_t*>(ids.buf), row, static_cast<int64_t*>(n.buf));
        Py_END_ALLOW_THREADS
        result = PyFloat_FromDouble(estimated);
    }
    for (Py_buffer* b : {&q, &keys, &sketch, &sketch_low, &sketch_step, &pinned, &ids, &n}) PyBuffer_Release(b);
    return result;
}

PyObject* py_isas(PyObject*, PyObject*) {
    PyObject* names = PyList_New(0);
    for (const Isa& isa : isas) {
        if (!isa.supported) continue;
        PyObject* name = PyUnicode_FromString(isa.name);
        PyList_Append(names, name);
        Py_DECREF(name);
    }
    return names;
}

}  // namespace

namespace {

// bfloat16 as torch rounds float32 to it (to nearest, ties to even)
inline uint16_t to_bf16(float x) {
    uint32_t a;
    std::memcpy(&a, &x, 4);
    return uint16_t((a + 0x7FFFu + ((a >> 16) & 1u)) >> 16);
}

// A float row (mixed_attention.md): `length` tokens from `k`, `v` (token stride D), heads `head_stride` apart.
void float_row(int64_t* row, int64_t bits, int64_t length, int64_t k, int64_t v, int64_t head_stride, int64_t d, bool causal) {
    const int64_t r[N_FIELDS] = {bits, length, k, v, 0, 0, 0, 0, head_stride, d, causal};
    std::memcpy(row, r, sizeof(r));
}

// One layer of a step (attend_from_tables): the attention of the KV heads first..first+heads-1 over
// `table` (n rows), their query rows at qt → ot, lse.
void attend_rows(const std::vector<int64_t>& table, int64_t first, int64_t heads, int64_t g, int64_t s, int64_t d,
                 int64_t vgroup, float scale, const Isa& isa, int threads, ParallelFor parallel_for, const float* qt, float* ot,
                 float* lse, bool scores_only = false) {
    Problem p{};
    p.scores_only = scores_only;
    p.q = qt + first * g * s * d;
    p.table = table.data();
    p.n_chunks = int64_t(table.size()) / N_FIELDS;
    p.n_kv = int(heads), p.rows = int(g * s), p.t = int(s), p.d = int(d), p.vgroup = int(vgroup);
    p.scale = scale;
    attend(p, isa, threads, ot + first * g * s * d, lse + first * g * s, parallel_for);
}

// Slab mode (a layer whose K/V lives in float slabs in RAM, storage.py's ResidentStorage): the
// layer's record, int64, fields in this order (mixed_attention.py: SLAB_FIELDS).
enum SlabField { S_K, S_V, S_HEAD_STRIDE, S_N, S_CHUNK_SIZE, S_N_CHUNKS, S_ABSTRACTS, S_STRIDE, S_PINNED, S_KEEP, S_SINKS,
                 S_RECENT, S_PER_HEAD, S_SAMPLED, S_IO, S_CHANNELS, S_LEAST, S_SKETCH, S_SKETCH_STRIDE, S_SKETCH_LOW, S_SKETCH_STEP,
                 N_SLAB_FIELDS };
// Its float32 io row (mixed_attention.py: IO_FIELDS): in, the selection's temperature and coverage
// target (≤ 0: keep exactly `keep`); out, the estimated coverage, the chunks and the tokens read per
// KV head, the microseconds spent selecting, attending and measuring, then (sampled steps) each
// query head's captured mass (Hq of them).
enum IoField { IO_TEMPERATURE, IO_COVERAGE, IO_ESTIMATED, IO_CHUNKS, IO_TOKENS, IO_SELECT_US, IO_ATTEND_US, IO_MEASURE_US, N_IO_FIELDS };

inline float since_us(std::chrono::steady_clock::time_point t0) {
    return std::chrono::duration<float, std::micro>(std::chrono::steady_clock::now() - t0).count();
}

// The new tokens stored at the slab's end, then the layer's chunks selected with its last query
// (select_layer: the step's own, not the last step's) and attended in place, with the window and
// the new tokens as the causal row; at sampled steps the captured mass too (the selection's
// log-sum-exp against the whole slab's).
int attend_slab(const int64_t* rec, const Isa& isa, int64_t n_kv, int64_t g, int64_t s, int64_t d, int64_t vgroup,
                int64_t bits, int threads, ParallelFor parallel_for, float scale, const float* q_last, const float* qt, const float* k, const float* v,
                float* ot, float* lse) {
    const int64_t size = bits / 8, hs = rec[S_HEAD_STRIDE], n = rec[S_N], cs = rec[S_CHUNK_SIZE], chunks = rec[S_N_CHUNKS];
    char* slab_k = reinterpret_cast<char*>(rec[S_K]);
    char* slab_v = reinterpret_cast<char*>(rec[S_V]);
    float* io = reinterpret_cast<float*>(rec[S_IO]);
    if (!slab_k || !slab_v || !io || (bits != 16 && bits != 32) || cs <= 0 || chunks * cs > n) return 1;
    for (int64_t h = 0; h < n_kv; ++h)  // the new tokens, as the cache stores them (the caller made room)
        for (int64_t t = 0; t < s; ++t) {
            const int64_t at = (h * hs + (n + t) * d) * size;
            const float *src_k = k + (h * s + t) * d, *src_v = v + (h * s + t) * d;
            if (bits == 32) {
                std::memcpy(slab_k + at, src_k, 4 * d);
                std::memcpy(slab_v + at, src_v, 4 * d);
            } else {
                uint16_t *dk = reinterpret_cast<uint16_t*>(slab_k + at), *dv = reinterpret_cast<uint16_t*>(slab_v + at);
                for (int64_t i = 0; i < d; ++i) dk[i] = to_bf16(src_k[i]), dv[i] = to_bf16(src_v[i]);
            }
        }
    const int64_t total = n + s, ks = reinterpret_cast<int64_t>(slab_k), vs = reinterpret_cast<int64_t>(slab_v);
    thread_local std::vector<int64_t> table, ids, counts;
    const bool every = rec[S_KEEP] < 0 || chunks == 0;  // (a budget that covers the layer)
    const int64_t groups = !every && rec[S_PER_HEAD] ? n_kv : 1;
    const int64_t heads = n_kv / groups, window = chunks * cs;
    float estimated = 1.0f;
    auto t0 = std::chrono::steady_clock::now();
    if (!every && rec[S_CHANNELS] > 0 && rec[S_SKETCH] && bits == 16 && g <= 16) {  // by token scores (select_by_tokens)
        TokenSelection ts{};
        ts.q = q_last, ts.keys = reinterpret_cast<const uint16_t*>(slab_k);
        ts.sketch = reinterpret_cast<const uint8_t*>(rec[S_SKETCH]), ts.sketch_stride = rec[S_SKETCH_STRIDE];
        ts.sketch_low = reinterpret_cast<const float*>(rec[S_SKETCH_LOW]);
        ts.sketch_step = reinterpret_cast<const float*>(rec[S_SKETCH_STEP]);
        ts.pinned = reinterpret_cast<const uint8_t*>(rec[S_PINNED]);
        ts.head_stride = hs, ts.n = n, ts.count = chunks, ts.size = cs, ts.keep = rec[S_KEEP], ts.sinks = rec[S_SINKS];
        ts.recent = rec[S_RECENT], ts.least = rec[S_LEAST], ts.n_kv = int(n_kv), ts.g = int(g), ts.d = int(d);
        ts.channels = int(rec[S_CHANNELS]), ts.coverage = io[IO_COVERAGE], ts.per_head = groups > 1;
        ids.resize(size_t(groups * chunks));
        counts.resize(size_t(groups));
        estimated = select_by_tokens(ts, isa, ids.data(), chunks, counts.data(), parallel_for);
    } else if (!every) {
        Selection sel{};
        sel.q = q_last;
        sel.abstracts = reinterpret_cast<const uint16_t*>(rec[S_ABSTRACTS]);
        sel.pinned = reinterpret_cast<const uint8_t*>(rec[S_PINNED]);
        sel.stride = rec[S_STRIDE], sel.count = chunks, sel.keep = rec[S_KEEP], sel.sinks = rec[S_SINKS], sel.recent = rec[S_RECENT];
        sel.n_kv = int(n_kv), sel.g = int(g), sel.d = int(d);
        sel.temperature = io[IO_TEMPERATURE], sel.coverage = io[IO_COVERAGE];
        sel.per_head = groups > 1;
        ids.resize(size_t(groups * chunks));
        counts.resize(size_t(groups));
        estimated = select_layer(sel, isa, ids.data(), chunks, counts.data(), parallel_for);
    }
    io[IO_SELECT_US] = since_us(t0);
    t0 = std::chrono::steady_clock::now();
    int64_t read = 0;
    for (int64_t grp = 0; grp < groups; ++grp) {
        const int64_t first = grp * heads, off = first * hs * size;  // the group's first KV head
        const int64_t m = every ? 0 : counts[size_t(grp)];
        table.resize(size_t((m + 1) * N_FIELDS));
        for (int64_t j = 0; j < m; ++j) {
            const int64_t at = ids[size_t(grp * chunks + j)] * cs * d * size + off;
            float_row(&table[size_t(j * N_FIELDS)], bits, cs, ks + at, vs + at, hs, d, false);
        }
        const int64_t from = every ? 0 : window, at = from * d * size + off;
        float_row(&table[size_t(m * N_FIELDS)], bits, total - from, ks + at, vs + at, hs, d, true);
        attend_rows(table, first, heads, g, s, d, vgroup, scale, isa, threads, parallel_for, qt, ot, lse);
        read += every ? chunks : m;
    }
    io[IO_ATTEND_US] = since_us(t0);
    io[IO_ESTIMATED] = estimated;
    io[IO_CHUNKS] = float(read) / float(groups);
    io[IO_TOKENS] = every ? float(total) : float(read) / float(groups) * float(cs) + float(total - window);
    io[IO_MEASURE_US] = 0.0f;
    if (rec[S_SAMPLED]) {  // every query head's captured mass: its selection's share of the whole slab's softmax
        t0 = std::chrono::steady_clock::now();
        // exp(lse_read − lse_all) = 1 / (1 + exp(lse_rest − lse_read)), lse_rest over the chunks not
        // read: their keys' scores alone (no value, no chunk read twice)
        for (int64_t h = 0; h < n_kv * g; ++h) io[N_IO_FIELDS + h] = 1.0f;
        thread_local std::vector<float> ot_rest, lse_rest;
        thread_local std::vector<uint8_t> read_mark;
        lse_rest.resize(size_t(n_kv * g * s));
        ot_rest.resize(size_t(n_kv * g * s * d));
        for (int64_t grp = 0; grp < groups && !every; ++grp) {
            const int64_t first = grp * heads, off = first * hs * size, m = counts[size_t(grp)];
            read_mark.assign(size_t(chunks), 0);
            for (int64_t j = 0; j < m; ++j) read_mark[size_t(ids[size_t(grp * chunks + j)])] = 1;
            table.clear();
            for (int64_t c = 0; c < chunks; ++c) {
                if (read_mark[size_t(c)]) continue;
                const int64_t at = c * cs * d * size + off;
                table.resize(table.size() + N_FIELDS);
                float_row(&table[table.size() - N_FIELDS], bits, cs, ks + at, vs + at, hs, d, false);
            }
            if (table.empty()) continue;
            attend_rows(table, first, heads, g, s, d, vgroup, scale, isa, threads, parallel_for, qt, ot_rest.data(), lse_rest.data(), true);
            for (int64_t h = first * g; h < (first + heads) * g; ++h) {  // (the last token's row)
                const size_t r = size_t(h * s + s - 1);
                io[N_IO_FIELDS + h] = 1.0f / (1.0f + std::exp(lse_rest[r] - lse[r]));
            }
        }
        io[IO_MEASURE_US] = since_us(t0);
    }
    return 0;
}

}  // namespace

// A graph's decode step attended natively (edgetok's GroupQueryAttention hook, kernels/attention_op.cpp;
// ort_ops.ATTEND_HOOK's signature), with no Python between the layers. Per layer, either
//  - tables the caller prepared: the selected chunks and the window as table rows — one table for all
//    KV heads, or one per KV head (per-head selection, rows pointing at that head) — to which the
//    new tokens' own K/V (the operator's present) is added as the causal row; or
//  - a slab (attend_slab): the layer's selection made here, with the step's own query.
//
// `user` is an int64 descriptor: [layers, n_kv, head_dim, vgroup, threads, isa (0 best, 1 avx2,
// 2 scalar), query heads per KV head, the new tokens' bits (32, or 16: rounded to bfloat16 as the
// cache stores them, so attention reads what a later step will), the address of a ParallelFor to
// run the op's items on (0: this extension's pool, `threads` wide), the step's tokens (T), then per layer: groups (1 or n_kv; 0: a slab), the address of its (groups, 2) array of (table
// address, rows) or of its slab record, the address of its float32 (T, Hq, D) buffer for the step's
// queries (a draft's, for the cache's rollback; the last selects)] (mixed_attention.py: StepTables).
extern "C" __attribute__((visibility("default"))) int edgetok_attend_from_tables(void* user, int64_t layer, const float* q,
                                                                              const float* k, const float* v, int64_t s,
                                                                              float scale, float* out) {
    const int64_t* desc = static_cast<const int64_t*>(user);
    const int64_t layers = desc[0], n_kv = desc[1], d = desc[2], vgroup = desc[3], threads = desc[4], g = desc[6];
    const int64_t own_bits = desc[7];
    const ParallelFor parallel_for = reinterpret_cast<ParallelFor>(desc[8]);
    if (layer < 0 || layer >= layers || s <= 0 || s != desc[9]) return 1;
    const Isa* isa = desc[5] == 0 ? find_isa("auto") : find_isa(desc[5] == 1 ? "avx2" : "scalar");
    if (!isa) return 1;
    const int64_t* entry = desc + 10 + 3 * layer;
    const int64_t groups = entry[0];
    float* queries = reinterpret_cast<float*>(entry[2]);
    if (groups != 0 && groups != 1 && groups != n_kv) return 1;
    const int64_t hq = g * n_kv;
    thread_local std::vector<float> qt, ot, lse;
    qt.resize(size_t(hq * s * d));
    ot.resize(size_t(hq * s * d));
    lse.resize(size_t(hq * s));
    for (int64_t t = 0; t < s; ++t)  // (S, H, D) → (H, S, D): each KV head's query rows together
        for (int64_t h = 0; h < hq; ++h) std::memcpy(&qt[(h * s + t) * d], q + (t * hq + h) * d, sizeof(float) * d);
    // the queries as the cache keeps them: scaled to attend at 1/√D, as attend() would have them
    const float to_cache = scale * std::sqrt(float(d));
    for (int64_t t = 0; t < s; ++t)
        for (int64_t h = 0; h < hq; ++h)
            for (int64_t i = 0; i < d; ++i) queries[(t * hq + h) * d + i] = qt[(h * s + t) * d + i] * to_cache;
    const float* q_last = queries + (s - 1) * hq * d;
    if (groups == 0) {
        const int64_t* rec = reinterpret_cast<const int64_t*>(entry[1]);
        if (attend_slab(rec, *isa, n_kv, g, s, d, vgroup, own_bits, int(threads), parallel_for, scale, q_last, qt.data(), k, v, ot.data(), lse.data()))
            return 1;
    } else {
        const int64_t* tables = reinterpret_cast<const int64_t*>(entry[1]);
        const int64_t heads = n_kv / groups;  // KV heads per table
        thread_local std::vector<uint16_t> own_k, own_v;
        thread_local std::vector<int64_t> table;
        const void *k_own = k, *v_own = v;
        if (own_bits == 16) {  // as the cache will store them
            own_k.resize(size_t(n_kv * s * d));
            own_v.resize(size_t(n_kv * s * d));
            for (int64_t i = 0; i < n_kv * s * d; ++i) own_k[size_t(i)] = to_bf16(k[i]), own_v[size_t(i)] = to_bf16(v[i]);
            k_own = own_k.data(), v_own = own_v.data();
        }
        const int64_t own_size = own_bits / 8;
        for (int64_t grp = 0; grp < groups; ++grp) {
            const int64_t* rows = reinterpret_cast<const int64_t*>(tables[2 * grp]);
            const int64_t n = tables[2 * grp + 1];
            table.assign(rows, rows + n * N_FIELDS);
            const int64_t first = grp * heads;  // the group's first KV head
            const int64_t offset = first * s * d * own_size;  // bytes
            table.resize(size_t((n + 1) * N_FIELDS));
            float_row(&table[size_t(n * N_FIELDS)], own_bits, s, reinterpret_cast<int64_t>(k_own) + offset,
                      reinterpret_cast<int64_t>(v_own) + offset, s * d, d, true);
            attend_rows(table, first, heads, g, s, d, vgroup, scale, *isa, int(threads), parallel_for, qt.data(), ot.data(),
                        lse.data());
        }
    }
    for (int64_t t = 0; t < s; ++t)  // (H, S, D) → (S, H·D)
        for (int64_t h = 0; h < hq; ++h) std::memcpy(out + (t * hq + h) * d, &ot[(h * s + t) * d], sizeof(float) * d);
    return 0;
}

namespace {

PyMethodDef methods[] = {
    {"attend", py_attend, METH_VARARGS,
     "attend(q, out, lse, table, n_kv, rows, t, head_dim, vgroup, scale, threads, isa): the mixed-bit attention op."},
    {"select", py_select, METH_VARARGS,
     "select(q, abstracts, pinned, plans, temperatures, ids, n, estimated, n_kv, g, d, stride, coverage, per_head, isa): "
     "every layer's chunks (selection.select_chunks)."},
    {"select_tokens", py_select_tokens, METH_VARARGS,
     "select_tokens(q, keys, sketch, sketch_low, sketch_step, pinned, ids, n, head_stride, sketch_stride, tokens, count, size, keep, "
     "sinks, recent, least, n_kv, g, d, channels, coverage, per_head, isa): one layer's chunks by token scores "
     "(token_scores.select_by_masses) → estimated."},
    {"isas", py_isas, METH_NOARGS, "The instruction sets this CPU can run, best first ('auto' picks the first)."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "_mixed_attention", "The mixed-bit attention op (native CPU kernel).", -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__mixed_attention() {
    detect_isas();
    pthread_atfork(nullptr, nullptr, forget_pool_in_child);
    PyObject* m = PyModule_Create(&module);
    if (m) PyModule_AddIntConstant(m, "FIELDS", N_FIELDS);
    return m;
}
