// The mixed-bit attention op's inner loops, compiled once per instruction set: mixed_attention.cpp
// includes this file inside a namespace under `#pragma GCC target(...)` (scalar, avx2, avx512), and
// the compiler vectorizes the `omp simd` loops for that set. No headers here: the includer has them.
// The contract (what each table field means) is in mixed_attention.md.

static inline float bf16_to_float(uint16_t h) {
    uint32_t bits = uint32_t(h) << 16;
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
}

static inline float half_to_float(uint16_t h) {  // IEEE fp16 → fp32 (scales and zeros: a few per chunk)
    uint32_t sign = uint32_t(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, mant = h & 0x3ff, bits;
    if (exp == 0) {
        if (mant == 0) {
            bits = sign;
        } else {  // subnormal: normalize
            int e = -1;
            do { mant <<= 1; ++e; } while (!(mant & 0x400));
            bits = sign | uint32_t(127 - 15 - e) << 23 | (mant & 0x3ff) << 13;
        }
    } else if (exp == 31) {
        bits = sign | 0x7f800000u | mant << 13;
    } else {
        bits = sign | (exp + 127 - 15) << 23 | mant << 13;
    }
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
}

// exp(x) for x ≤ 0 (scores minus their running max), in plain arithmetic so it vectorizes:
// 2^k · p(r) with a degree-6 polynomial on r ∈ [-ln2/2, ln2/2] (Cephes' expf; relative error
// ≈ 2e-7); exactly 0 below -87 (and for the -inf of a masked score).
static inline float exp_nonpositive(float x) {
    const bool tiny = !(x > -87.0f);
    x = tiny ? -87.0f : x;
    const float k = __builtin_floorf(x * 1.44269504088896341f + 0.5f);
    const float r = x - k * 0.693359375f + k * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const int32_t bits = (int32_t(k) + 127) << 23;
    float two_k;
    std::memcpy(&two_k, &bits, 4);
    return tiny ? 0.0f : p * two_k;
}

// n codes of `bits` bits (packed low bits first, as kernels/quant.py packs them) → floats.
static inline void unpack(const uint8_t* codes, int bits, int n, float* out) {
    if (bits == 8) {
#pragma omp simd
        for (int j = 0; j < n; ++j) out[j] = float(codes[j]);
    } else if (bits == 4) {
#pragma omp simd
        for (int j = 0; j < n / 2; ++j) {
            out[2 * j] = float(codes[j] & 15);
            out[2 * j + 1] = float(codes[j] >> 4);
        }
        if (n & 1) out[n - 1] = float(codes[n / 2] & 15);
    } else {  // 2
#pragma omp simd
        for (int j = 0; j < n / 4; ++j) {
            out[4 * j] = float(codes[j] & 3);
            out[4 * j + 1] = float((codes[j] >> 2) & 3);
            out[4 * j + 2] = float((codes[j] >> 4) & 3);
            out[4 * j + 3] = float(codes[j] >> 6);
        }
        for (int j = n & ~3; j < n; ++j) out[j] = float((codes[j / 4] >> (2 * (j & 3))) & 3);
    }
}

// One float token row (bits 32: float32, 16: bfloat16) → D floats.
static inline void load_row(const uint8_t* base, int bits, int d, float* out) {
    if (bits == 32) {
        std::memcpy(out, base, size_t(d) * 4);
    } else {
        const uint16_t* h = reinterpret_cast<const uint16_t*>(base);
#pragma omp simd
        for (int c = 0; c < d; ++c) out[c] = bf16_to_float(h[c]);
    }
}

// Scores of the R query rows against tokens [t0, t0 + n) of one head of one chunk:
// s[r * TILE + j] = (q_r · k_{t0+j}) (q is already multiplied by the softmax scale).
static void tile_scores(const Problem& p, const int64_t* ch, int head, int64_t t0, int n, const float* q, float* s,
                        float* row) {
    const int bits = int(ch[F_BITS]), d = p.d, rows = p.rows;
    const int64_t len = ch[F_LENGTH];
    if (bits >= 16) {  // token-major float rows: one row read, R dot products
        const int isz = bits / 8;
        const uint8_t* k = reinterpret_cast<const uint8_t*>(ch[F_K]) + head * ch[F_HEAD_STRIDE] * isz;
        for (int j = 0; j < n; ++j) {
            load_row(k + (t0 + j) * ch[F_TOKEN_STRIDE] * isz, bits, d, row);
            for (int r = 0; r < rows; ++r) {
                const float* qr = q + size_t(r) * d;
                float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
                for (int c = 0; c < d; ++c) acc += qr[c] * row[c];
                s[r * TILE + j] = acc;
            }
        }
        return;
    }
    // quantized keys, channel-major: channel c's codes for every token of the chunk, then c + 1's;
    // one fp16 scale and zero per channel (per head)
    const int64_t row_bytes = len * bits / 8;
    const uint8_t* codes = reinterpret_cast<const uint8_t*>(ch[F_K]) + head * d * row_bytes + t0 * bits / 8;
    const uint16_t* ks = reinterpret_cast<const uint16_t*>(ch[F_K_SCALE]) + head * d;
    const uint16_t* kz = reinterpret_cast<const uint16_t*>(ch[F_K_ZERO]) + head * d;
    for (int r = 0; r < rows; ++r) std::memset(s + r * TILE, 0, size_t(n) * 4);
    for (int c = 0; c < d; ++c) {
        unpack(codes + c * row_bytes, bits, n, row);
        const float scale = half_to_float(ks[c]), zero = half_to_float(kz[c]);
#pragma omp simd
        for (int j = 0; j < n; ++j) row[j] = row[j] * scale + zero;  // channel c of n keys, dequantized
        for (int r = 0; r < rows; ++r) {
            const float qc = q[size_t(r) * d + c];
            float* sr = s + r * TILE;
#pragma omp simd
            for (int j = 0; j < n; ++j) sr[j] += qc * row[j];
        }
    }
}

// acc_r += Σ_j p[r, j] · v_{t0+j} for the R rows.
static void tile_values(const Problem& p, const int64_t* ch, int head, int64_t t0, int n, const float* s, float* acc,
                        float* row) {
    const int bits = int(ch[F_BITS]), d = p.d, rows = p.rows;
    const int64_t len = ch[F_LENGTH];
    const uint8_t* vbase;
    const uint16_t *vs = nullptr, *vz = nullptr;
    const int groups = d / p.vgroup;
    int64_t token_bytes;
    if (bits >= 16) {
        const int isz = bits / 8;
        vbase = reinterpret_cast<const uint8_t*>(ch[F_V]) + head * ch[F_HEAD_STRIDE] * isz;
        token_bytes = ch[F_TOKEN_STRIDE] * isz;
    } else {  // token-major codes; one fp16 scale and zero per group of vgroup channels of a token
        token_bytes = int64_t(d) * bits / 8;
        vbase = reinterpret_cast<const uint8_t*>(ch[F_V]) + head * len * token_bytes;
        vs = reinterpret_cast<const uint16_t*>(ch[F_V_SCALE]) + head * len * groups;
        vz = reinterpret_cast<const uint16_t*>(ch[F_V_ZERO]) + head * len * groups;
    }
    for (int j = 0; j < n; ++j) {
        const int64_t t = t0 + j;
        if (bits >= 16) {
            load_row(vbase + t * token_bytes, bits, d, row);
        } else {
            unpack(vbase + t * token_bytes, bits, d, row);
            for (int g = 0; g < groups; ++g) {
                const float scale = half_to_float(vs[t * groups + g]), zero = half_to_float(vz[t * groups + g]);
                float* rg = row + g * p.vgroup;
#pragma omp simd
                for (int c = 0; c < p.vgroup; ++c) rg[c] = rg[c] * scale + zero;
            }
        }
        for (int r = 0; r < rows; ++r) {
            const float w = s[r * TILE + j];
            if (w == 0.0f) continue;  // masked, or underflowed
            float* ar = acc + size_t(r) * d;
#pragma omp simd
            for (int c = 0; c < d; ++c) ar[c] += w * row[c];
        }
    }
}

// One work item: head `head` over chunks [c0, c1) with online softmax; writes the unnormalized
// partial result: m (R) the running max, l (R) the sum of exp(s - m), acc (R, D).
static void run_item(const Problem& p, int head, int64_t c0, int64_t c1, float* m, float* l, float* acc, float* scratch) {
    const int d = p.d, rows = p.rows;
    float* q = scratch;                  // (R, D) the queries times the softmax scale
    float* s = q + size_t(rows) * d;     // (R, TILE) scores, then probabilities
    float* row = s + size_t(rows) * TILE; // (max(TILE, D)) one dequantized row
    const float* qh = p.q + size_t(head) * rows * d;
    for (int i = 0; i < rows * d; ++i) q[i] = qh[i] * p.scale;
    for (int r = 0; r < rows; ++r) {
        m[r] = -INFINITY;
        l[r] = 0.0f;
    }
    std::memset(acc, 0, sizeof(float) * size_t(rows) * d);
    for (int64_t ci = c0; ci < c1; ++ci) {
        const int64_t* ch = p.table + ci * N_FIELDS;
        const int64_t len = ch[F_LENGTH];
        for (int64_t t0 = 0; t0 < len; t0 += TILE) {
            const int n = int(std::min<int64_t>(TILE, len - t0));
            tile_scores(p, ch, head, t0, n, q, s, row);
            for (int r = 0; r < rows; ++r) {
                float* sr = s + r * TILE;
                if (ch[F_CAUSAL]) {  // the chunk's last T tokens are the queries': row r is token r % T of them
                    const int64_t visible = len - p.t + (r % p.t) + 1;  // tokens [0, visible) of the chunk
                    for (int j = 0; j < n; ++j)
                        if (t0 + j >= visible) sr[j] = -INFINITY;
                }
                float mx = -INFINITY;
#pragma omp simd reduction(max : mx)
                for (int j = 0; j < n; ++j) mx = std::max(mx, sr[j]);
                const float m_new = std::max(m[r], mx);
                if (m_new == -INFINITY) {  // nothing visible yet
                    for (int j = 0; j < n; ++j) sr[j] = 0.0f;
                    continue;
                }
                float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
                for (int j = 0; j < n; ++j) {
                    sr[j] = exp_nonpositive(sr[j] - m_new);
                    sum += sr[j];
                }
                if (m_new > m[r]) {
                    const float alpha = exp_nonpositive(m[r] - m_new);
                    float* ar = acc + size_t(r) * d;
#pragma omp simd
                    for (int c = 0; c < d; ++c) ar[c] *= alpha;
                    l[r] *= alpha;
                    m[r] = m_new;
                }
                l[r] += sum;
            }
            tile_values(p, ch, head, t0, n, s, acc, row);
        }
    }
}
