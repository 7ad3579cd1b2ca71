// The mixed-bit attention op's inner loops, compiled once per instruction set: mixed_attention.cpp
// includes this file inside a namespace under `#pragma GCC target(...)` (portable, avx2, avx512),
// with EDGETOK_ISA set to 0, 2 or 512 (the pragma does not define __AVX2__ / __AVX512F__ in C++).
// The loops are written on 16-float vectors (GCC vector extensions): one zmm register with AVX-512,
// two ymm with AVX2, four xmm on the portable path. No headers here: the includer has them. The
// contract (what each table field means) is in mixed_attention.md.

typedef float vf __attribute__((vector_size(64), aligned(4)));  // 16 floats, any alignment
typedef int32_t vi __attribute__((vector_size(64), aligned(4)));
typedef uint32_t vu __attribute__((vector_size(64), aligned(4)));
typedef uint16_t vh __attribute__((vector_size(32), aligned(2)));
typedef uint8_t vb16 __attribute__((vector_size(16), aligned(1)));

static inline vf splat(float x) { return vf{} + x; }

static inline float hsum(vf v) {
    typedef float v8 __attribute__((vector_size(32)));
    typedef float v4 __attribute__((vector_size(16)));
    v8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) + __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
    v4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
    return (b[0] + b[2]) + (b[1] + b[3]);
}

static inline float hmax(vf v) {
    float m = v[0];
    for (int i = 1; i < 16; ++i) m = v[i] > m ? v[i] : m;
    return m;
}

// fp16 → fp32, exact for normal and subnormal numbers (scales and zeros are finite): the exponent
// and mantissa moved into place, then rescaled by 2^(127 - 15) in one multiply.
static inline vf half16(const uint16_t* p) {
    vu u = __builtin_convertvector(*reinterpret_cast<const vh*>(p), vu);
    vf mag = (vf)((u & 0x7fff) << 13) * 0x1p112f;
    return (vf)((vu)mag | ((u & 0x8000) << 16));
}

static inline float half1(uint16_t h) {
    uint32_t mag_bits = uint32_t(h & 0x7fff) << 13;
    float mag;
    std::memcpy(&mag, &mag_bits, 4);
    mag *= 0x1p112f;
    uint32_t bits;
    std::memcpy(&bits, &mag, 4);
    bits |= uint32_t(h & 0x8000) << 16;
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
}

static inline void halves(const uint16_t* p, int n, float* out) {
    int i = 0;
    for (; i + 16 <= n; i += 16) *reinterpret_cast<vf*>(out + i) = half16(p + i);
    for (; i < n; ++i) out[i] = half1(p[i]);
}

// bf16 → fp32: the 16 bits moved up. GCC lowers the vector extensions' widening to 8-lane pieces
// and inserts; one vpmovzxwd per register instead (the bounds pass: 1.6x, benchmarks/bounds_loops.cpp).
static inline vf bf16x16(const uint16_t* p) {
#if EDGETOK_ISA == 512
    return (vf)_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16);
#elif EDGETOK_ISA == 2
    typedef float v8 __attribute__((vector_size(32)));
    const v8 a = (v8)_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16);
    const v8 b = (v8)_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8))), 16);
    return __builtin_shufflevector(a, b, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
#else
    return (vf)(__builtin_convertvector(*reinterpret_cast<const vh*>(p), vu) << 16);
#endif
}

// 16 codes starting at code index j of a packed row (low bits first, as kernels/quant.py packs).
// A 32-bit word holds 4 int8, 8 int4 or 16 int2 codes in order: broadcast it and shift each lane
// by its own amount (one vpsrlvd), rather than shuffling bytes (which compilers scalarize).
static inline vf codes16(const uint8_t* row, int bits, int64_t j) {
    const uint8_t* at = row + j * bits / 8;
#if EDGETOK_ISA == 512
    __m512i u;
    if (bits == 8) {
        u = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(at)));
    } else if (bits == 4) {
        const __m512i words = _mm512_castsi128_si512(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(at)));
        u = _mm512_permutexvar_epi32(_mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0), words);
        u = _mm512_and_si512(_mm512_srlv_epi32(u, _mm512_set_epi32(28, 24, 20, 16, 12, 8, 4, 0, 28, 24, 20, 16, 12, 8, 4, 0)),
                             _mm512_set1_epi32(15));
    } else {
        int32_t word;
        std::memcpy(&word, at, 4);
        u = _mm512_and_si512(_mm512_srlv_epi32(_mm512_set1_epi32(word),
                                               _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0)),
                             _mm512_set1_epi32(3));
    }
    return (vf)_mm512_cvtepi32_ps(u);
#elif EDGETOK_ISA == 2
    __m256i lo, hi;
    if (bits == 8) {
        lo = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(at)));
        hi = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(at + 8)));
    } else if (bits == 4) {
        int32_t w[2];
        std::memcpy(w, at, 8);
        const __m256i shifts = _mm256_set_epi32(28, 24, 20, 16, 12, 8, 4, 0), mask = _mm256_set1_epi32(15);
        lo = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(w[0]), shifts), mask);
        hi = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(w[1]), shifts), mask);
    } else {
        int32_t word;
        std::memcpy(&word, at, 4);
        const __m256i all = _mm256_set1_epi32(word), mask = _mm256_set1_epi32(3);
        lo = _mm256_and_si256(_mm256_srlv_epi32(all, _mm256_set_epi32(14, 12, 10, 8, 6, 4, 2, 0)), mask);
        hi = _mm256_and_si256(_mm256_srlv_epi32(all, _mm256_set_epi32(30, 28, 26, 24, 22, 20, 18, 16)), mask);
    }
    typedef float v8 __attribute__((vector_size(32)));
    const v8 a = (v8)_mm256_cvtepi32_ps(lo), b = (v8)_mm256_cvtepi32_ps(hi);
    return __builtin_shufflevector(a, b, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
#else
    vf out;
    const int per_byte = 8 / bits, mask = (1 << bits) - 1;
    for (int i = 0; i < 16; ++i) out[i] = float((at[i / per_byte] >> (bits * (i % per_byte))) & mask);
    return out;
#endif
}

static inline float code1(const uint8_t* row, int bits, int64_t j) {
    const int per_byte = 8 / bits;
    return float((row[j / per_byte] >> (bits * (j % per_byte))) & ((1 << bits) - 1));
}

// exp(x) for x ≤ 0 (a score minus its running max): 2^k · p(r) with Cephes' degree-6 polynomial on
// r ∈ [-ln2/2, ln2/2] (relative error ≈ 2e-7); exactly 0 below -87 (and for a masked -inf).
static inline vf vexp(vf x) {
    const vi tiny = x <= -87.0f;
    x = tiny ? splat(-87.0f) : x;
    vf k = x * 1.44269504088896341f + 12582912.0f;  // + 1.5·2^23: rounds to the nearest integer
    k = k - 12582912.0f;
    const vf r = x - k * 0.693359375f + k * 2.12194440e-4f;
    vf p = splat(1.9875691500e-4f);
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const vi two_k = (__builtin_convertvector(k, vi) + 127) << 23;
    return tiny ? splat(0.0f) : p * (vf)two_k;
}

static inline float exp1(float x) {
    vf v = vexp(splat(x));
    return v[0];
}

// One float (bits 32: float32, 16: bfloat16) token row → nv vectors.
static inline __attribute__((always_inline)) void float_row(const uint8_t* base, int bits, int nv, vf* out) {
    if (bits == 32) {
        for (int k = 0; k < nv; ++k) out[k] = *reinterpret_cast<const vf*>(base + 64 * k);
    } else {
        for (int k = 0; k < nv; ++k) out[k] = bf16x16(reinterpret_cast<const uint16_t*>(base) + 16 * k);
    }
}

struct Scratch {
    float* q;       // (R, D) the queries times the softmax scale (times a key chunk's channel scales)
    float* bias;    // (R) q · the key chunk's channel zeros
    float* s;       // (R, TILE) scores, then probabilities
    float* kscale;  // (D) a key chunk's channel scales and zeros, float
    float* kzero;
    float* vscale;  // (TILE · groups) a value tile's token scales and zeros, float
    float* vzero;
    vf* acc;        // (R, D / 16) this item's unnormalized output
};

// 16 tokens' scores for RB rows (registers): s[r, :] = bias_r + Σ_c q[r, c] · code[c, j .. j + 16).
template <int RB>
static inline void key_block(const float* q, const float* bias, int d, const uint8_t* codes, int64_t row_bytes, int bits,
                             int64_t j, float* s) {
    vf acc[RB];
    for (int r = 0; r < RB; ++r) acc[r] = splat(bias[r]);
    for (int c = 0; c < d; ++c) {
        const vf code = codes16(codes + c * row_bytes, bits, j);
        for (int r = 0; r < RB; ++r) acc[r] += q[size_t(r) * d + c] * code;
    }
    for (int r = 0; r < RB; ++r) *reinterpret_cast<vf*>(s + r * TILE) = acc[r];
}

// The loops below are templated on NV = head_dim / 16 (4, 8, 16: unrolled, a token row in
// registers; 0: any multiple of 16, read at run time).

// Scores of the R rows against tokens [t0, t0 + n) of one head of one chunk: s[r · TILE + j].
template <int NV>
static void tile_scores(const Problem& p, const int64_t* ch, int head, int64_t t0, int n, const float* q, Scratch& w) {
    const int bits = int(ch[F_BITS]), d = p.d, rows = p.rows, nv = NV ? NV : d / 16;
    if (bits >= 16) {  // token-major float rows: one row read, R dot products
        const int isz = bits / 8;
        const uint8_t* k = reinterpret_cast<const uint8_t*>(ch[F_K]) + head * ch[F_HEAD_STRIDE] * isz;
        vf row[NV ? NV : MAX_NV];
        for (int j = 0; j < n; ++j) {
            float_row(k + (t0 + j) * ch[F_TOKEN_STRIDE] * isz, bits, nv, row);
            for (int r = 0; r < rows; ++r) {
                const vf* qr = reinterpret_cast<const vf*>(q + size_t(r) * d);
                vf acc = qr[0] * row[0];
                for (int c = 1; c < nv; ++c) acc += qr[c] * row[c];
                w.s[r * TILE + j] = hsum(acc);
            }
        }
        return;
    }
    // quantized keys, channel-major: channel c's codes for every token of the chunk, then c + 1's;
    // s_j = bias + Σ_c (q_c · scale_c) · code_{c,j}, 16 tokens at a time
    const int64_t row_bytes = ch[F_LENGTH] * bits / 8;
    const uint8_t* codes = reinterpret_cast<const uint8_t*>(ch[F_K]) + head * d * row_bytes;
    int j0 = 0;
    for (; j0 + 16 <= n; j0 += 16) {
        for (int r0 = 0; r0 < rows; r0 += 4) {  // up to 4 rows' 16 scores in registers
            const float* qr = q + size_t(r0) * d;
            float* sr = w.s + r0 * TILE + j0;
            const uint8_t* cj = codes;
            switch (std::min(4, rows - r0)) {
                case 4: key_block<4>(qr, w.bias + r0, d, cj, row_bytes, bits, t0 + j0, sr); break;
                case 3: key_block<3>(qr, w.bias + r0, d, cj, row_bytes, bits, t0 + j0, sr); break;
                case 2: key_block<2>(qr, w.bias + r0, d, cj, row_bytes, bits, t0 + j0, sr); break;
                default: key_block<1>(qr, w.bias + r0, d, cj, row_bytes, bits, t0 + j0, sr);
            }
        }
    }
    for (int j = j0; j < n; ++j) {  // the tile's last tokens, one at a time
        for (int r = 0; r < rows; ++r) w.s[r * TILE + j] = w.bias[r];
        for (int c = 0; c < d; ++c) {
            const float code = code1(codes + c * row_bytes, bits, t0 + j);
            for (int r = 0; r < rows; ++r) w.s[r * TILE + j] += q[size_t(r) * d + c] * code;
        }
    }
}

// One value token's row → nv vectors: float rows converted, codes dequantized with the token's
// group scales and zeros.
static inline __attribute__((always_inline)) void value_row(const uint8_t* src, int bits, int nv, int groups, int per_group,
                                                            const float* scale, const float* zero, vf* row) {
    if (bits >= 16) {
        float_row(src, bits, nv, row);
        return;
    }
    for (int g = 0, k = 0; g < groups; ++g)
        for (int end = k + per_group; k < end; ++k) row[k] = codes16(src, bits, 16 * k) * scale[g] + zero[g];
}

// acc_r += Σ_j p[r, j] · v_{t0+j} for the R rows.
template <int NV>
static void tile_values(const Problem& p, const int64_t* ch, int head, int64_t t0, int n, Scratch& w) {
    const int bits = int(ch[F_BITS]), d = p.d, rows = p.rows, nv = NV ? NV : d / 16, groups = d / p.vgroup;
    const int per_group = p.vgroup / 16;
    const int64_t len = ch[F_LENGTH];
    vf row[NV ? NV : MAX_NV];
    const uint8_t* vbase;
    int64_t token_bytes;
    if (bits >= 16) {
        const int isz = bits / 8;
        vbase = reinterpret_cast<const uint8_t*>(ch[F_V]) + head * ch[F_HEAD_STRIDE] * isz;
        token_bytes = ch[F_TOKEN_STRIDE] * isz;
    } else {  // token-major codes; one fp16 scale and zero per group of vgroup channels of a token
        token_bytes = int64_t(d) * bits / 8;
        vbase = reinterpret_cast<const uint8_t*>(ch[F_V]) + head * len * token_bytes;
        const int64_t at = (head * len + t0) * groups;
        halves(reinterpret_cast<const uint16_t*>(ch[F_V_SCALE]) + at, n * groups, w.vscale);
        halves(reinterpret_cast<const uint16_t*>(ch[F_V_ZERO]) + at, n * groups, w.vzero);
    }
    if (NV) {  // a block of rows' outputs in registers over the tile's tokens
        constexpr int RB = NV ? (16 / NV > 0 ? 16 / NV : 1) : 1;  // 4 rows at D = 64, 2 at 128, 1 at 256
        for (int r0 = 0; r0 < rows; r0 += RB) {
            const int rb = std::min(RB, rows - r0);
            vf acc[RB][NV ? NV : 1];
            for (int r = 0; r < RB; ++r)
                for (int k = 0; k < NV; ++k) acc[r][k] = r < rb ? w.acc[size_t(r0 + r) * NV + k] : splat(0.0f);
            for (int j = 0; j < n; ++j) {
                value_row(vbase + (t0 + j) * token_bytes, bits, NV, groups, per_group, w.vscale + j * groups, w.vzero + j * groups, row);
                for (int r = 0; r < RB; ++r) {
                    const float pr = r < rb ? w.s[(r0 + r) * TILE + j] : 0.0f;
                    for (int k = 0; k < NV; ++k) acc[r][k] += pr * row[k];
                }
            }
            for (int r = 0; r < rb; ++r)
                for (int k = 0; k < NV; ++k) w.acc[size_t(r0 + r) * NV + k] = acc[r][k];
        }
        return;
    }
    for (int j = 0; j < n; ++j) {
        value_row(vbase + (t0 + j) * token_bytes, bits, nv, groups, per_group, w.vscale + j * groups, w.vzero + j * groups, row);
        for (int r = 0; r < rows; ++r) {
            const float pr = w.s[r * TILE + j];
            if (pr == 0.0f) continue;  // masked, or underflowed
            vf* ar = w.acc + size_t(r) * nv;
            for (int k = 0; k < nv; ++k) ar[k] += pr * row[k];
        }
    }
}

// The queries for a key chunk: q · scale per channel (quantized keys), and q · zero.
static void prepare_queries(const Problem& p, const int64_t* ch, int head, const float* q_scaled, float* q, Scratch& w) {
    const int d = p.d, rows = p.rows;
    if (ch[F_BITS] >= 16) {
        std::memcpy(q, q_scaled, sizeof(float) * size_t(rows) * d);
        return;
    }
    halves(reinterpret_cast<const uint16_t*>(ch[F_K_SCALE]) + head * d, d, w.kscale);
    halves(reinterpret_cast<const uint16_t*>(ch[F_K_ZERO]) + head * d, d, w.kzero);
    for (int r = 0; r < rows; ++r) {
        vf bias = splat(0.0f);
        for (int c = 0; c < d; c += 16) {
            const vf qc = *reinterpret_cast<const vf*>(q_scaled + size_t(r) * d + c);
            *reinterpret_cast<vf*>(q + size_t(r) * d + c) = qc * *reinterpret_cast<const vf*>(w.kscale + c);
            bias += qc * *reinterpret_cast<const vf*>(w.kzero + c);
        }
        w.bias[r] = hsum(bias);
    }
}

// One work item: head `head` over chunks [c0, c1) with online softmax; writes the unnormalized
// partial result: m (R) the running max, l (R) the sum of exp(s - m), out (R, D).
template <int NV>
static void run_item_nv(const Problem& p, int head, int64_t c0, int64_t c1, float* m, float* l, float* out, float* scratch) {
    const int d = p.d, rows = p.rows, nv = NV ? NV : d / 16;
    // scratch layout (floats): acc (R·D, then R·16 for key scores), q_scaled (R·D), q (R·D), bias (R),
    // s (R·TILE), kscale, kzero (D each), vscale, vzero (TILE·groups each)
    Scratch w;
    w.acc = reinterpret_cast<vf*>(scratch);
    float* q_scaled = scratch + size_t(rows) * (d + 16);
    w.q = q_scaled + size_t(rows) * d;
    w.bias = w.q + size_t(rows) * d;
    w.s = w.bias + rows;
    w.kscale = w.s + size_t(rows) * TILE;
    w.kzero = w.kscale + d;
    w.vscale = w.kzero + d;
    w.vzero = w.vscale + size_t(TILE) * (d / p.vgroup);
    const float* qh = p.q + size_t(head) * rows * d;
    for (int i = 0; i < rows * d; ++i) q_scaled[i] = qh[i] * p.scale;
    for (int r = 0; r < rows; ++r) {
        m[r] = -INFINITY;
        l[r] = 0.0f;
        w.bias[r] = 0.0f;
    }
    for (int i = 0; i < rows * nv; ++i) w.acc[i] = splat(0.0f);
    for (int64_t ci = c0; ci < c1; ++ci) {
        const int64_t* ch = p.table + ci * N_FIELDS;
        const int64_t len = ch[F_LENGTH];
        prepare_queries(p, ch, head, q_scaled, w.q, w);
        for (int64_t t0 = 0; t0 < len; t0 += TILE) {
            const int n = int(std::min<int64_t>(TILE, len - t0));
            tile_scores<NV>(p, ch, head, t0, n, w.q, w);
            for (int r = 0; r < rows; ++r) {
                float* sr = w.s + r * TILE;
                if (ch[F_CAUSAL] > 0) {  // the chunk's last T tokens are the queries': row r is token r % T of them
                    const int64_t visible = len - p.t + (r % p.t) + 1;  // tokens [0, visible) of the chunk
                    for (int j = int(std::max<int64_t>(0, visible - t0)); j < n; ++j) sr[j] = -INFINITY;
                } else if (ch[F_CAUSAL] < 0) {  // a sliding window's past: tokens [first, len) of the chunk
                    const int64_t first = len + (r % p.t) - (-ch[F_CAUSAL] - 1);
                    for (int j = 0; j < int(std::min<int64_t>(n, first - t0)); ++j) sr[j] = -INFINITY;
                }
                float mx = -INFINITY;
                int j = 0;
                if (n >= 16) {
                    vf vm = *reinterpret_cast<const vf*>(sr);
                    for (j = 16; j + 16 <= n; j += 16) {
                        const vf x = *reinterpret_cast<const vf*>(sr + j);
                        vm = x > vm ? x : vm;
                    }
                    mx = hmax(vm);
                }
                for (; j < n; ++j) mx = std::max(mx, sr[j]);
                const float m_new = std::max(m[r], mx);
                if (m_new == -INFINITY) {  // nothing visible yet
                    std::memset(sr, 0, sizeof(float) * n);
                    continue;
                }
                vf vsum = splat(0.0f);
                for (j = 0; j + 16 <= n; j += 16) {
                    const vf e = vexp(*reinterpret_cast<const vf*>(sr + j) - m_new);
                    *reinterpret_cast<vf*>(sr + j) = e;
                    vsum += e;
                }
                float sum = hsum(vsum);
                for (; j < n; ++j) {
                    sr[j] = exp1(sr[j] - m_new);
                    sum += sr[j];
                }
                if (m_new > m[r]) {
                    const float alpha = exp1(m[r] - m_new);
                    vf* ar = w.acc + size_t(r) * nv;
                    for (int k = 0; k < nv; ++k) ar[k] *= alpha;
                    l[r] *= alpha;
                    m[r] = m_new;
                }
                l[r] += sum;
            }
            if (!p.scores_only) tile_values<NV>(p, ch, head, t0, n, w);
        }
    }
    std::memcpy(out, w.acc, sizeof(float) * size_t(rows) * d);
}

static void run_item(const Problem& p, int head, int64_t c0, int64_t c1, float* m, float* l, float* out, float* scratch) {
    switch (p.d) {
        case 64: return run_item_nv<4>(p, head, c0, c1, m, l, out, scratch);
        case 128: return run_item_nv<8>(p, head, c0, c1, m, l, out, scratch);
        case 256: return run_item_nv<16>(p, head, c0, c1, m, l, out, scratch);
        default: return run_item_nv<0>(p, head, c0, c1, m, l, out, scratch);
    }
}

// Chunk selection's shares (kernels/selection.py: chunk_shares) for one KV head of a layer, in two
// steps so a head's chunks can be bounded in parts on several threads: chunk_bounds gives chunks
// [c0, c1) their bound at scale `inv` (1 / (√D · temperature)), the max over the head's G queries of
// Σ_d q⁺_d·M_d,c + q⁻_d·m_d,c; chunk_softmax turns a head's bounds into its softmax over its chunks.
// q (G, D); ab (2D, stride) bf16: each chunk's max keys, then its min keys (after the K/V itself,
// a step's largest read). scratch: 2·G·D floats.
static inline float bf16_1(uint16_t x) {
    const uint32_t bits = uint32_t(x) << 16;
    float f;
    __builtin_memcpy(&f, &bits, 4);
    return f;
}

static void chunk_bounds(const float* q, int g, int d, const uint16_t* ab, int64_t stride, int64_t c0, int64_t c1, float inv,
                         float* o, float* scratch) {
    float* up = scratch;          // (G, D) q⁺
    float* down = scratch + g * d;  // (G, D) q⁻
    for (int i = 0; i < g * d; ++i) up[i] = q[i] > 0.0f ? q[i] : 0.0f, down[i] = q[i] < 0.0f ? q[i] : 0.0f;
    // 32 chunks (one cache line of each abstract row) at a time, for up to 4 queries of the
    // group in registers: each line is read once per 4 queries
    auto block = [&](int64_t c, float* dst) {
        // the next block's line of each of the 2·D abstract rows, requested now: rows a stride apart
        // are more streams than the hardware prefetcher follows (abstracts out of cache: 1.2-1.3x)
        if (c + 64 <= stride)
            for (int r = 0; r < 2 * d; ++r) __builtin_prefetch(ab + int64_t(r) * stride + c + 32);
        vf best0 = splat(-INFINITY), best1 = splat(-INFINITY);
        for (int g0 = 0; g0 < g; g0 += 4) {
            const int n = g - g0 < 4 ? g - g0 : 4;
            vf a[4][2] = {};
            for (int dd = 0; dd < d; ++dd) {
                const uint16_t* hi = ab + int64_t(dd) * stride + c;
                const uint16_t* lo = ab + int64_t(d + dd) * stride + c;
                const vf h0 = bf16x16(hi), h1 = bf16x16(hi + 16), l0 = bf16x16(lo), l1 = bf16x16(lo + 16);
                for (int j = 0; j < n; ++j) {
                    const float u = up[(g0 + j) * d + dd], w = down[(g0 + j) * d + dd];
                    a[j][0] += h0 * u + l0 * w;
                    a[j][1] += h1 * u + l1 * w;
                }
            }
            for (int j = 0; j < n; ++j) {
                best0 = a[j][0] > best0 ? a[j][0] : best0;
                best1 = a[j][1] > best1 ? a[j][1] : best1;
            }
        }
        *reinterpret_cast<vf*>(dst) = best0 * inv;
        *reinterpret_cast<vf*>(dst + 16) = best1 * inv;
    };
    int64_t c = c0;
    for (; c + 32 <= c1; c += 32) block(c, o + c);
    if (c < c1 && c + 32 <= stride) {  // the last few chunks, as a block whose spare columns the rows have (their bounds unused)
        float last[32];
        block(c, last);
        for (int64_t i = c; i < c1; ++i) o[i] = last[i - c];
        return;
    }
    for (; c < c1; ++c) {  // (or one at a time, where the rows end first)
        float best = -INFINITY;
        for (int gi = 0; gi < g; ++gi) {
            float acc = 0.0f;
            for (int dd = 0; dd < d; ++dd)
                acc += bf16_1(ab[int64_t(dd) * stride + c]) * up[gi * d + dd] + bf16_1(ab[int64_t(d + dd) * stride + c]) * down[gi * d + dd];
            best = acc > best ? acc : best;
        }
        o[c] = best * inv;
    }
}

static void chunk_softmax(float* o, int64_t count) {
    float big = -INFINITY, total = 0.0f;
    int64_t c = 0;
    for (c = 0; c < count; ++c) big = o[c] > big ? o[c] : big;
    for (c = 0; c + 16 <= count; c += 16) {
        vf* x = reinterpret_cast<vf*>(o + c);
        *x = vexp(*x - big);
        total += hsum(*x);
    }
    for (; c < count; ++c) total += (o[c] = exp1(o[c] - big));
    const float scale = 1.0f / total;
    for (c = 0; c < count; ++c) o[c] *= scale;
}

// Token scores (kernels/token_scores.py, its oracle) for one KV head: each token's logit estimated
// on R of its D channels. The chunks' tokens from the sketch — 4-bit codes, channel-major (D rows
// of sketch_stride bytes, token 2j in byte j's low half) — so 16 tokens of a channel are one 8-byte
// load and each query's 16 scores build up lane by lane, no sum across lanes; the tokens after
// the chunks (the window) from the bf16 keys (n, D). qs (G, R): each query on the channels `picked`,
// times the channel's step and the query's SparQ scale; bias (G,): the queries on the channels'
// lows (what every sketched token adds); qk (G, R) the queries with the SparQ scale only (for the
// window). Tokens [t0, t1) (t0 even) → their logits into scratch (G, n), each query's largest into top (G,).
static inline vf nibbles16(const uint8_t* p) {  // 16 tokens' codes from 8 bytes, as floats
#if EDGETOK_ISA == 512
    const __m128i x = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)), low = _mm_set1_epi8(15);
    const __m128i t = _mm_unpacklo_epi8(_mm_and_si128(x, low), _mm_and_si128(_mm_srli_epi16(x, 4), low));
    return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(t));
#else
    vf out;
    for (int i = 0; i < 16; ++i) out[i] = float((p[i / 2] >> (4 * (i % 2))) & 15);
    return out;
#endif
}

#if EDGETOK_ISA == 512
// 64 tokens' codes from 32 bytes, as four vectors of 16 (one load and one unpack for the four)
static inline void nibbles64(const uint8_t* p, vf x[4]) {
    const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)), low = _mm256_set1_epi8(15);
    const __m256i even = _mm256_and_si256(b, low), odd = _mm256_and_si256(_mm256_srli_epi16(b, 4), low);
    // (unpacking works within 128-bit lanes: tokens 0-15 | 32-47, and 16-31 | 48-63)
    const __m256i first = _mm256_unpacklo_epi8(even, odd), second = _mm256_unpackhi_epi8(even, odd);
    x[0] = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_castsi256_si128(first)));
    x[1] = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_castsi256_si128(second)));
    x[2] = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_extracti128_si256(first, 1)));
    x[3] = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_extracti128_si256(second, 1)));
}
#endif

static inline float nibble1(const uint8_t* row, int64_t u) { return float((row[u / 2] >> (4 * (u % 2))) & 15); }

#if EDGETOK_ISA == 512
// M queries' scores of 64 tokens (32 bytes of each channel's row): 4·M accumulators in registers.
// (AVX2's 16 ymm hold 8 such vectors at most: it takes 16 tokens and one query.)
template <int M>
static inline void scores64(const float* qs, const float* bias, const int32_t* picked, int r, const uint8_t* rows,
                            int64_t stride, float* out, int64_t n, vf* big) {
    vf a[M][4];
    for (int j = 0; j < M; ++j)
        for (int b = 0; b < 4; ++b) a[j][b] = splat(bias[j]);
    for (int i = 0; i < r; ++i) {
        vf x[4];
        nibbles64(rows + int64_t(picked[i]) * stride, x);
        for (int j = 0; j < M; ++j) {
            const float w = qs[j * r + i];
            for (int b = 0; b < 4; ++b) a[j][b] += x[b] * w;
        }
    }
    for (int j = 0; j < M; ++j)
        for (int b = 0; b < 4; ++b) {
            *reinterpret_cast<vf*>(out + j * n + 16 * b) = a[j][b];
            big[j] = a[j][b] > big[j] ? a[j][b] : big[j];
        }
}
#endif

static void token_scores(const float* qs, const float* bias, const float* qk, const int32_t* picked, int g, int r,
                         const uint8_t* sketch, int64_t sketch_stride, const uint16_t* keys, int64_t d, int64_t n,
                         int64_t sketched, int64_t t0, int64_t t1, float* scratch, float* top) {
    vf big[16];
    for (int j = 0; j < g; ++j) big[j] = splat(-INFINITY);
    const int64_t s1 = t1 < sketched ? t1 : sketched;
    int64_t t = t0;
#if EDGETOK_ISA == 512
    // Blocks of 64 tokens (32 bytes of each channel's row) for 4 queries at a time: 16 accumulators
    // in registers. (AVX2's 16 ymm hold 8 such vectors at most: it takes 16 tokens and one query.)
    for (; t + 64 <= s1; t += 64)
        for (int g0 = 0; g0 < g; g0 += 4) {
            const uint8_t* rows = sketch + t / 2;
            switch (g - g0) {  // (a count known when compiled: no branch per channel, every accumulator in a register)
                case 1: scores64<1>(qs + g0 * r, bias + g0, picked, r, rows, sketch_stride, scratch + g0 * n + t, n, big + g0); break;
                case 2: scores64<2>(qs + g0 * r, bias + g0, picked, r, rows, sketch_stride, scratch + g0 * n + t, n, big + g0); break;
                case 3: scores64<3>(qs + g0 * r, bias + g0, picked, r, rows, sketch_stride, scratch + g0 * n + t, n, big + g0); break;
                default: scores64<4>(qs + g0 * r, bias + g0, picked, r, rows, sketch_stride, scratch + g0 * n + t, n, big + g0);
            }
        }
#elif EDGETOK_ISA == 2
    // 16 tokens for one query at a time, in two ymm accumulators (GCC lowers 16-lane byte → float
    // conversions of the vector extensions to scalar code for AVX2: intrinsics here)
    __m256 top_lo[16], top_hi[16];
    for (int j = 0; j < g; ++j) top_lo[j] = top_hi[j] = _mm256_set1_ps(-INFINITY);
    const __m128i low = _mm_set1_epi8(15);
    for (; t + 16 <= s1; t += 16)
        for (int j = 0; j < g; ++j) {
            __m256 lo = _mm256_set1_ps(bias[j]), hi = lo;
            for (int i = 0; i < r; ++i) {
                const __m128i x = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(sketch + int64_t(picked[i]) * sketch_stride + t / 2));
                const __m128i c = _mm_unpacklo_epi8(_mm_and_si128(x, low), _mm_and_si128(_mm_srli_epi16(x, 4), low));
                const __m256 w = _mm256_set1_ps(qs[j * r + i]);
                lo = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(c)), w, lo);
                hi = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(c, 8))), w, hi);
            }
            _mm256_storeu_ps(scratch + j * n + t, lo);
            _mm256_storeu_ps(scratch + j * n + t + 8, hi);
            top_lo[j] = _mm256_max_ps(top_lo[j], lo), top_hi[j] = _mm256_max_ps(top_hi[j], hi);
        }
    for (int j = 0; j < g; ++j) {
        float both[16];
        _mm256_storeu_ps(both, top_lo[j]);
        _mm256_storeu_ps(both + 8, top_hi[j]);
        std::memcpy(&big[j], both, sizeof(both));
    }
#endif
    for (; t + 16 <= s1; t += 16)
        for (int j = 0; j < g; ++j) {
            vf a = splat(bias[j]);
            for (int i = 0; i < r; ++i) a += nibbles16(sketch + int64_t(picked[i]) * sketch_stride + t / 2) * qs[j * r + i];
            *reinterpret_cast<vf*>(scratch + j * n + t) = a;
            big[j] = a > big[j] ? a : big[j];
        }
    for (int j = 0; j < g; ++j) {
        float best = hmax(big[j]);
        for (int64_t u = t; u < t1; ++u) {  // one at a time: the sketch's last tokens, then the window's
            float acc = 0.0f;
            if (u < sketched) {
                acc = bias[j];
                for (int i = 0; i < r; ++i) acc += nibble1(sketch + int64_t(picked[i]) * sketch_stride, u) * qs[j * r + i];
            } else {
                for (int i = 0; i < r; ++i) acc += bf16_1(keys[u * d + picked[i]]) * qk[j * r + i];
            }
            scratch[j * n + u] = acc;
            best = acc > best ? acc : best;
        }
        top[j] = best;
    }
}

// Chunks [c0, c1) of the head's `chunks` (of `size` tokens): each query's Σ exp(logit − top) per
// chunk into masses (G, chunks), unnormalized; with window non-null the tokens after the last
// chunk too, into window (G,).
static void chunk_exps(const float* scratch, int g, int64_t n, const float* top, int64_t chunks, int64_t size, int64_t c0,
                       int64_t c1, float* masses, float* window) {
    for (int j = 0; j < g; ++j) {
        const float* x = scratch + j * n;
        for (int64_t c = c0; c < c1; ++c) {
            const float* xc = x + c * size;
            vf acc = {};
            int64_t k = 0;
            for (; k + 16 <= size; k += 16) acc += vexp(*reinterpret_cast<const vf*>(xc + k) - top[j]);
            float sum = hsum(acc);
            for (; k < size; ++k) sum += exp1(xc[k] - top[j]);
            masses[j * chunks + c] = sum;
        }
        if (window) {
            vf acc = {};
            int64_t k = chunks * size;
            for (; k + 16 <= n; k += 16) acc += vexp(*reinterpret_cast<const vf*>(x + k) - top[j]);
            float rest = hsum(acc);
            for (; k < n; ++k) rest += exp1(x[k] - top[j]);
            window[j] = rest;
        }
    }
}
