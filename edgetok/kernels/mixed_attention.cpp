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
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace {

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
};

}  // namespace

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

struct Isa {
    const char* name;
    ItemFn run;
    bool supported;
};

Isa isas[3];

void detect_isas() {
#ifdef EDGETOK_PORTABLE_ONLY
    isas[0] = isas[1] = {"none", scalar::run_item, false};
#else
    __builtin_cpu_init();
    isas[0] = {"avx512", avx512::run_item,
               __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
                   __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")};
    isas[1] = {"avx2", avx2::run_item, __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")};
#endif
    isas[2] = {"scalar", scalar::run_item, true};
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

// out (Hkv, R, D), lse (Hkv, R): the attention of every row over every chunk.
void attend(const Problem& p, const Isa& isa, int threads, float* out, float* lse) {
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
    if (threads > 1 && items > 1) {
        if (pool == nullptr) pool = new Pool();
        pool->run(items, threads, item);
    } else {
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
        if (ch[F_CAUSAL] && !check(len >= p.t, "the causal chunk holds the queries' own tokens: at least T of them")) return false;
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

// A graph's decode step attended from tables the caller prepared (edgetok's GroupQueryAttention
// hook, kernels/attention_op.cpp; ort_ops.ATTEND_HOOK's signature): for each layer, the selected
// chunks and the window as table rows — one table for all KV heads, or one per KV head (per-head
// selection, rows pointing at that head) — to which the new tokens' own K/V (the operator's
// present) is added as the causal row. No Python runs between the layers.
//
// `user` is an int64 descriptor: [layers, n_kv, head_dim, vgroup, threads, isa (0 best, 1 avx2,
// 2 scalar), query heads per KV head, the new tokens' bits (32, or 16: rounded to bfloat16 as the
// cache stores them, so attention reads what a later step will), then per layer: groups (1 or n_kv), the address of its
// (groups, 2) array of (table address, rows), the address of its float32 (Hq, D) buffer for the
// step's last query] (mixed_attention.py: StepTables).
extern "C" __attribute__((visibility("default"))) int edgetok_attend_from_tables(void* user, int64_t layer, const float* q,
                                                                              const float* k, const float* v, int64_t s,
                                                                              float scale, float* out) {
    const int64_t* desc = static_cast<const int64_t*>(user);
    const int64_t layers = desc[0], n_kv = desc[1], d = desc[2], vgroup = desc[3], threads = desc[4], g = desc[6];
    const int64_t own_bits = desc[7];
    if (layer < 0 || layer >= layers || s <= 0) return 1;
    const Isa* isa = desc[5] == 0 ? find_isa("auto") : find_isa(desc[5] == 1 ? "avx2" : "scalar");
    if (!isa) return 1;
    const int64_t* entry = desc + 8 + 3 * layer;
    const int64_t groups = entry[0];
    const int64_t* tables = reinterpret_cast<const int64_t*>(entry[1]);
    float* q_last = reinterpret_cast<float*>(entry[2]);
    if (groups != 1 && groups != n_kv) return 1;
    const int64_t hq = g * n_kv;
    thread_local std::vector<float> qt, ot, lse;
    thread_local std::vector<int64_t> table;
    qt.resize(size_t(hq * s * d));
    ot.resize(size_t(hq * s * d));
    lse.resize(size_t(hq * s));
    for (int64_t t = 0; t < s; ++t)  // (S, H, D) → (H, S, D): each KV head's query rows together
        for (int64_t h = 0; h < hq; ++h) std::memcpy(&qt[(h * s + t) * d], q + (t * hq + h) * d, sizeof(float) * d);
    // the last query as the cache keeps it: scaled to attend at 1/√D, as attend() would have it
    const float to_cache = scale * std::sqrt(float(d));
    for (int64_t h = 0; h < hq; ++h)
        for (int64_t i = 0; i < d; ++i) q_last[h * d + i] = qt[(h * s + s - 1) * d + i] * to_cache;
    const int64_t heads = n_kv / groups;  // KV heads per table
    thread_local std::vector<uint16_t> own_k, own_v;
    const void *k_own = k, *v_own = v;
    if (own_bits == 16) {  // round to nearest even, as torch's float → bfloat16
        own_k.resize(size_t(n_kv * s * d));
        own_v.resize(size_t(n_kv * s * d));
        for (int64_t i = 0; i < n_kv * s * d; ++i) {
            uint32_t a, b;
            std::memcpy(&a, k + i, 4);
            std::memcpy(&b, v + i, 4);
            own_k[size_t(i)] = uint16_t((a + 0x7FFFu + ((a >> 16) & 1u)) >> 16);
            own_v[size_t(i)] = uint16_t((b + 0x7FFFu + ((b >> 16) & 1u)) >> 16);
        }
        k_own = own_k.data(), v_own = own_v.data();
    }
    const int64_t own_size = own_bits / 8;
    for (int64_t grp = 0; grp < groups; ++grp) {
        const int64_t* rows = reinterpret_cast<const int64_t*>(tables[2 * grp]);
        const int64_t n = tables[2 * grp + 1];
        table.assign(rows, rows + n * N_FIELDS);
        const int64_t first = grp * heads;  // the group's first KV head
        const int64_t offset = first * s * d * own_size;  // bytes
        const int64_t own[N_FIELDS] = {own_bits, s, reinterpret_cast<int64_t>(k_own) + offset, reinterpret_cast<int64_t>(v_own) + offset,
                                       0, 0, 0, 0, s * d, d, 1};
        table.insert(table.end(), own, own + N_FIELDS);
        Problem p{};
        p.q = qt.data() + first * g * s * d;
        p.table = table.data();
        p.n_chunks = n + 1;
        p.n_kv = int(heads), p.rows = int(g * s), p.t = int(s), p.d = int(d), p.vgroup = int(vgroup);
        p.scale = scale;
        attend(p, *isa, int(threads), ot.data() + first * g * s * d, lse.data() + first * g * s);
    }
    for (int64_t t = 0; t < s; ++t)  // (H, S, D) → (S, H·D)
        for (int64_t h = 0; h < hq; ++h) std::memcpy(out + (t * hq + h) * d, &ot[(h * s + t) * d], sizeof(float) * d);
    return 0;
}

namespace {

PyMethodDef methods[] = {
    {"attend", py_attend, METH_VARARGS,
     "attend(q, out, lse, table, n_kv, rows, t, head_dim, vgroup, scale, threads, isa): the mixed-bit attention op."},
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
