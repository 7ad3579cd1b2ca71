// MatMulQ4 (domain ai.edgetok): Y (..., N) = A (..., K) · Wᵀ, with W (N, K) 4-bit block-quantized
// in MatMulNBits' layout — B (N, K/block, block/2) uint8, scales (N, K/block) float, offsets
// (K/block, N) float: w = scale·q + offset. Attributes K, N, block_size (a multiple of 32).
//
// Why: ONNX Runtime's MatMulNBits multiplies float activations on a path ~2x slower than its int8
// one, and with fractional minima (q4_1, the K-quants) the offsets need two more nodes per linear.
// This op reads each weight once for all rows of A and multiplies in float32: the reference's
// arithmetic at the int8 path's speed (edgetok's default engine keeps the fp32 reference's answers).
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>
#include <vector>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include "ort_abi.h"

namespace {

struct Q4Problem {
    int64_t m, k, n, block;
    const uint8_t* b;
    const float* scales;
    const float* offsets;
};

}  // namespace

#define EDGETOK_ISA 0
namespace scalar {
#include "q4_matmul_body.h"
}
#undef EDGETOK_ISA

#ifndef EDGETOK_PORTABLE_ONLY  // x86-64: the same loops for AVX2 and AVX-512, chosen at load
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define EDGETOK_ISA 2
namespace avx2 {
#include "q4_matmul_body.h"
}
#undef EDGETOK_ISA
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")
#define EDGETOK_ISA 512
namespace avx512 {
#include "q4_matmul_body.h"
}
#undef EDGETOK_ISA
#pragma GCC pop_options
#endif

namespace {

constexpr int64_t TILE = 16;    // columns per task, a few rows
constexpr int64_t FEW_ROWS = 32;  // up to this many rows (a draft of up to 31 tokens), read the codes directly; more: dequantize a tile for a GEMM

struct Isa {
    const char* name;
    void (*permute)(const float*, float*, int64_t, int64_t);
    void (*tile)(const Q4Problem&, const float*, float*, int64_t, int64_t);
    void (*gemm_tile)(const Q4Problem&, const float*, float*, float*, int64_t, int64_t);
    int64_t gemm_columns;  // columns per GEMM tile
};

const Isa PORTABLE{"scalar", scalar::permute, scalar::tile, scalar::gemm_tile, scalar::TILE_N};
#ifndef EDGETOK_PORTABLE_ONLY
const Isa AVX2{"avx2", avx2::permute, avx2::tile, avx2::gemm_tile, avx2::TILE_N};
const Isa AVX512{"avx512", avx512::permute, avx512::tile, avx512::gemm_tile, avx512::TILE_N};
#endif

// The widest instruction set this CPU has; EDGETOK_Q4_ISA=avx2|scalar asks for a narrower one (tests).
const Isa* choose_isa() {
    const char* asked = std::getenv("EDGETOK_Q4_ISA");
    auto allowed = [&](const char* name) { return !asked || !*asked || std::strcmp(asked, name) == 0; };
#ifndef EDGETOK_PORTABLE_ONLY
    __builtin_cpu_init();
    bool has_avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    if (allowed("avx512") && has_avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
        return &AVX512;
    if (allowed("avx2") && has_avx2) return &AVX2;
#endif
    return &PORTABLE;
}

const OrtApi* g_api = nullptr;
// chosen when a session registers the library (sessions may compute meanwhile: one atomic pointer)
std::atomic<const Isa*> g_isa{nullptr};

struct Q4Kernel {
    int64_t k, n, block;
};

struct Job {
    const Isa* isa;
    const Q4Problem* problem;
    const float* xp;  // the rows, permuted (few rows) or as they are (a GEMM)
    float* y;
};

void run_tile(void* user, size_t i) {
    const Job& job = *static_cast<const Job*>(user);
    int64_t n0 = int64_t(i) * TILE, n1 = n0 + TILE < job.problem->n ? n0 + TILE : job.problem->n;
    job.isa->tile(*job.problem, job.xp, job.y, n0, n1);
}

void run_gemm_tile(void* user, size_t i) {
    const Job& job = *static_cast<const Job*>(user);
    const int64_t cols = job.isa->gemm_columns, n = job.problem->n;
    int64_t n0 = int64_t(i) * cols, n1 = n0 + cols < n ? n0 + cols : n;
    thread_local std::vector<float> wt;  // the tile's weights, dequantized: per worker thread
    wt.resize(size_t(job.problem->k * cols));
    job.isa->gemm_tile(*job.problem, job.xp, wt.data(), job.y, n0, n1);
}

OrtStatus* create_kernel(const OrtCustomOp*, const OrtApi* api, const OrtKernelInfo* info, void** out) {
    OrtFunctions ort(api);
    int64_t k = 0, n = 0, block = 0;
    ORT_RETURN_IF_ERROR(ort.attribute(info, "K", &k));
    ORT_RETURN_IF_ERROR(ort.attribute(info, "N", &n));
    ORT_RETURN_IF_ERROR(ort.attribute(info, "block_size", &block));
    if (k <= 0 || n <= 0 || block <= 0 || block % 32 != 0 || k % block != 0)
        return ort.status(ORT_INVALID_ARGUMENT, "MatMulQ4: K must be a positive multiple of block_size, itself a multiple of 32");
    *out = new (std::nothrow) Q4Kernel{k, n, block};
    return *out ? nullptr : ort.status(ORT_FAIL, "MatMulQ4: out of memory");
}

OrtStatus* compute(void* kernel, OrtKernelContext* context) {
    const Q4Kernel& kern = *static_cast<const Q4Kernel*>(kernel);
    OrtFunctions ort(g_api);
    const OrtValue* inputs[4];
    for (size_t i = 0; i < 4; ++i) ORT_RETURN_IF_ERROR(ort.input(context, i, &inputs[i]));

    OrtTensorTypeAndShapeInfo* info = nullptr;
    ORT_RETURN_IF_ERROR(ort.shape_info(inputs[0], &info));
    size_t rank = 0;
    OrtStatus* status = ort.rank(info, &rank);
    std::vector<int64_t> dims(rank);
    if (!status) status = ort.dims(info, dims.data(), rank);
    ort.release(info);
    if (status) return status;
    if (rank == 0 || dims[rank - 1] != kern.k)
        return ort.status(ORT_INVALID_ARGUMENT, "MatMulQ4: A's last dimension must be K");

    Q4Problem p{1, kern.k, kern.n, kern.block, nullptr, nullptr, nullptr};
    for (size_t i = 0; i + 1 < rank; ++i) p.m *= dims[i];
    void* data[4];
    for (size_t i = 0; i < 4; ++i) ORT_RETURN_IF_ERROR(ort.data(inputs[i], &data[i]));
    p.b = static_cast<const uint8_t*>(data[1]);
    p.scales = static_cast<const float*>(data[2]);
    p.offsets = static_cast<const float*>(data[3]);

    dims[rank - 1] = kern.n;
    OrtValue* output = nullptr;
    ORT_RETURN_IF_ERROR(ort.output(context, 0, dims.data(), rank, &output));
    void* y = nullptr;
    ORT_RETURN_IF_ERROR(ort.data(output, &y));
    if (p.m == 0) return nullptr;

    const float* x = static_cast<const float*>(data[0]);
    const Isa* isa = g_isa.load(std::memory_order_acquire);
    if (p.m > FEW_ROWS) {
        Job job{isa, &p, x, static_cast<float*>(y)};
        return ort.parallel_for(context, run_gemm_tile, size_t((p.n + isa->gemm_columns - 1) / isa->gemm_columns), &job);
    }
    // the permuted rows: per calling thread (one session may run on several threads at once)
    thread_local std::vector<float> xp;
    xp.resize(size_t(p.m * p.k));
    isa->permute(x, xp.data(), p.m, p.k);
    Job job{isa, &p, xp.data(), static_cast<float*>(y)};
    return ort.parallel_for(context, run_tile, size_t((p.n + TILE - 1) / TILE), &job);
}

void destroy(void* kernel) { delete static_cast<Q4Kernel*>(kernel); }

const OrtCustomOp g_matmul_q4 = cpu_op<create_kernel, compute, destroy>(
    [](const OrtCustomOp*) { return "MatMulQ4"; }, [](const OrtCustomOp*, size_t i) { return i == 1 ? ORT_ELEMENT_UINT8 : ORT_ELEMENT_FLOAT; },
    [](const OrtCustomOp*) -> size_t { return 4; }, [](const OrtCustomOp*) -> size_t { return 1; });

}  // namespace

const OrtCustomOp* edgetok_matmul_q4_op(const OrtApi* api) {
    g_api = api;
    g_isa.store(choose_isa(), std::memory_order_release);
    return &g_matmul_q4;
}

// what this CPU (and EDGETOK_Q4_ISA) chooses now, not what the last session registered with: the
// exporter and the planner ask it, and must not depend on which test or session ran before
const char* edgetok_matmul_q4_isa() { return choose_isa()->name; }
