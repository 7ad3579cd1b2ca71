// The 4-bit matmul's loops, included once per instruction set (q4_matmul.cpp): EDGETOK_ISA is
// 512 (AVX-512), 2 (AVX2 + FMA) or 0 (portable C++).
//
// Weights: MatMulNBits' 4-bit layout — row n of B holds K/2 bytes, block after block; byte j of a
// block holds code 2j in its low nibble and code 2j+1 in its high one; w = scale·q + offset per
// (row, block). A vector of W bytes unpacks to W even codes (low nibbles) and W odd ones (high
// nibbles), so x is read permuted the same way: in each group of 2W inputs, the even ones, then the
// odd ones (permute()).

#if EDGETOK_ISA == 512
constexpr int W = 16;
using V = __m512;
inline V zero() { return _mm512_setzero_ps(); }
inline V splat(float v) { return _mm512_set1_ps(v); }
inline V load(const float* p) { return _mm512_loadu_ps(p); }
inline V fmadd(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
inline V add(V a, V b) { return _mm512_add_ps(a, b); }
inline void store(float* p, V a) { _mm512_storeu_ps(p, a); }
inline float sum(V a) { return _mm512_reduce_add_ps(a); }
inline V broadcast(const float* p) { return _mm512_set1_ps(*p); }
// Keeps v in a register: the compiler would otherwise fold its load into every FMA that reads it
inline void pin(V& v) { asm volatile("" : "+v"(v)); }
// A block's 16 possible weights, scale·q + offset for q = 0..15: a code is an index into them.
struct Table {
    V w;
    Table(float scale, float offset)
        : w(_mm512_fmadd_ps(_mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), _mm512_set1_ps(scale),
                            _mm512_set1_ps(offset))) {}
};
// W bytes → the weights of their W even codes (low nibbles) and W odd ones (high nibbles): the
// permute reads only an index's low 4 bits, so the low nibble needs no mask.
inline void weights(const uint8_t* p, const Table& t, V& even, V& odd) {
    __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    even = _mm512_permutexvar_ps(v, t.w);
    odd = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), t.w);
}
#elif EDGETOK_ISA == 2
constexpr int W = 8;
using V = __m256;
inline V zero() { return _mm256_setzero_ps(); }
inline V splat(float v) { return _mm256_set1_ps(v); }
inline V load(const float* p) { return _mm256_loadu_ps(p); }
inline V fmadd(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
inline V add(V a, V b) { return _mm256_add_ps(a, b); }
inline void store(float* p, V a) { _mm256_storeu_ps(p, a); }
inline float sum(V a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
inline V broadcast(const float* p) { return _mm256_broadcast_ss(p); }
inline void pin(V& v) { asm volatile("" : "+v"(v)); }
struct Table {  // AVX2 has no 16-entry permute: the scale and offset, applied after converting
    V scale, offset;
    Table(float s, float o) : scale(_mm256_set1_ps(s)), offset(_mm256_set1_ps(o)) {}
};
inline void weights(const uint8_t* p, const Table& t, V& even, V& odd) {
    __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
    even = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(v, _mm256_set1_epi32(15))), t.scale, t.offset);
    odd = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4)), t.scale, t.offset);
}
#else
constexpr int W = 8;
struct V {
    float v[W];
};
inline V zero() { return V{}; }
inline V splat(float x) {
    V r;
    for (float& e : r.v) e = x;
    return r;
}
inline V load(const float* p) {
    V r;
    for (int i = 0; i < W; ++i) r.v[i] = p[i];
    return r;
}
inline V fmadd(V a, V b, V c) {
    for (int i = 0; i < W; ++i) c.v[i] += a.v[i] * b.v[i];
    return c;
}
inline V add(V a, V b) {
    for (int i = 0; i < W; ++i) a.v[i] += b.v[i];
    return a;
}
inline void store(float* p, V a) {
    for (int i = 0; i < W; ++i) p[i] = a.v[i];
}
inline float sum(V a) {
    float s = 0;
    for (float e : a.v) s += e;
    return s;
}
inline V broadcast(const float* p) { return splat(*p); }
inline void pin(V&) {}
struct Table {
    float scale, offset;
    Table(float s, float o) : scale(s), offset(o) {}
};
inline void weights(const uint8_t* p, const Table& t, V& even, V& odd) {
    for (int i = 0; i < W; ++i) {
        even.v[i] = float(p[i] & 15) * t.scale + t.offset;
        odd.v[i] = float(p[i] >> 4) * t.scale + t.offset;
    }
}
#endif

constexpr int GROUP = 2 * W;  // weights per vector of codes

// x (rows, K) → xp (rows, K): each group of GROUP inputs as its even inputs, then its odd ones.
inline void permute(const float* x, float* xp, int64_t rows, int64_t k) {
    for (int64_t i = 0; i < rows * k; i += GROUP)
        for (int j = 0; j < W; ++j) {
            xp[i + j] = x[i + 2 * j];
            xp[i + W + j] = x[i + 2 * j + 1];
        }
}

// y[r, n] = Σ_k xp[r, k] · w[n, k] for R rows and the columns [n0, n1); y's rows are N apart.
// Two columns at a time: four independent sums per row keep the FMA units busy at one row.
constexpr int64_t PREFETCH_COLUMNS = 16;

template <int R>
void columns(const Q4Problem& p, const float* xp, float* y, int64_t n0, int64_t n1) {
    const int64_t blocks = p.k / p.block, groups = p.block / GROUP, stride = p.k / 2;
    int64_t n = n0;
    for (; n + 2 <= n1; n += 2) {
        V acc[2][R][2];
        for (auto& c : acc)
            for (auto& r : c) r[0] = r[1] = zero();
        const uint8_t* b[2] = {p.b + n * stride, p.b + (n + 1) * stride};
        // the codes of the columns a few pairs ahead, requested now: at one row the loop is bound
        // by memory, and the hardware prefetcher alone keeps too few lines in flight
        if (n + PREFETCH_COLUMNS + 2 <= p.n)
            for (int64_t line = 0; line < 2 * stride; line += 64)
                __builtin_prefetch(p.b + (n + PREFETCH_COLUMNS) * stride + line);
        for (int64_t blk = 0; blk < blocks; ++blk) {
            const Table t[2] = {{p.scales[n * blocks + blk], p.offsets[blk * p.n + n]},
                                {p.scales[(n + 1) * blocks + blk], p.offsets[blk * p.n + n + 1]}};
            for (int64_t g = 0; g < groups; ++g) {
                const float* xg = xp + (blk * groups + g) * GROUP;
                V even[2], odd[2];
                for (int c = 0; c < 2; ++c) {
                    weights(b[c], t[c], even[c], odd[c]);
                    b[c] += W;
                }
                // each row's inputs loaded once for both columns: with a load folded into every
                // FMA, a few rows were bound by loads, not FMAs (4 rows 1.4x slower on Zen 4)
                for (int r = 0; r < R; ++r) {
                    V xe = load(xg + r * p.k), xo = load(xg + r * p.k + W);
                    pin(xe);
                    pin(xo);
                    for (int c = 0; c < 2; ++c) {
                        acc[c][r][0] = fmadd(even[c], xe, acc[c][r][0]);
                        acc[c][r][1] = fmadd(odd[c], xo, acc[c][r][1]);
                    }
                }
            }
        }
        for (int c = 0; c < 2; ++c)
            for (int r = 0; r < R; ++r) y[r * p.n + n + c] = sum(add(acc[c][r][0], acc[c][r][1]));
    }
    for (; n < n1; ++n) {  // an odd last column
        V acc[R];
        for (auto& a : acc) a = zero();
        const uint8_t* b = p.b + n * stride;
        for (int64_t blk = 0; blk < blocks; ++blk) {
            const Table t(p.scales[n * blocks + blk], p.offsets[blk * p.n + n]);
            for (int64_t g = 0; g < groups; ++g) {
                const float* xg = xp + (blk * groups + g) * GROUP;
                V even, odd;
                weights(b, t, even, odd);
                b += W;
                for (int r = 0; r < R; ++r) acc[r] = fmadd(odd, load(xg + r * p.k + W), fmadd(even, load(xg + r * p.k), acc[r]));
            }
        }
        for (int r = 0; r < R; ++r) y[r * p.n + n] = sum(acc[r]);
    }
}

// Many rows (a prefill): a tile of TILE_N columns is dequantized once, transposed to (K, TILE_N),
// and multiplied as a float GEMM: each k adds w[k, tile] · x[r, k] to GEMM_ROWS rows' sums, the
// x values broadcast from memory (x in its own order: no permute).
constexpr int64_t TILE_N = 2 * W;
constexpr int GEMM_ROWS = W == 16 ? 12 : 6;  // 2 vectors of sums per row in registers, with room for w and x

// wt (K, TILE_N): one block of k at a time across the tile's columns, so the transposed stores
// land in a few KB that stay in L1
inline void dequantize(const Q4Problem& p, int64_t n0, int64_t n1, float* wt) {
    const int64_t blocks = p.k / p.block, groups = p.block / GROUP, stride = p.k / 2;
    alignas(64) float w[GROUP];
    for (int64_t blk = 0; blk < blocks; ++blk)
        for (int64_t c = 0; c < TILE_N; ++c) {
            const int64_t n = n0 + c;
            float* to = wt + blk * p.block * TILE_N + c;
            if (n >= n1) {  // a short last tile: zero columns
                for (int64_t k = 0; k < p.block; ++k) to[k * TILE_N] = 0.f;
                continue;
            }
            const Table t(p.scales[n * blocks + blk], p.offsets[blk * p.n + n]);
            const uint8_t* b = p.b + n * stride + blk * p.block / 2;
            for (int64_t g = 0; g < groups; ++g, b += W, to += GROUP * TILE_N) {
                V even, odd;
                weights(b, t, even, odd);
                store(w, even);
                store(w + W, odd);
                for (int j = 0; j < W; ++j) {
                    to[(2 * j) * TILE_N] = w[j];
                    to[(2 * j + 1) * TILE_N] = w[W + j];
                }
            }
        }
}

template <int R>
void gemm_rows(const Q4Problem& p, const float* x, const float* wt, float* y, int64_t columns) {
    V acc[R][2];
    for (auto& r : acc) r[0] = r[1] = zero();
    for (int64_t k = 0; k < p.k; ++k) {
        const V w0 = load(wt + k * TILE_N), w1 = load(wt + k * TILE_N + W);
        for (int r = 0; r < R; ++r) {
            const V xr = broadcast(x + r * p.k + k);
            acc[r][0] = fmadd(w0, xr, acc[r][0]);
            acc[r][1] = fmadd(w1, xr, acc[r][1]);
        }
    }
    alignas(64) float out[TILE_N];
    for (int r = 0; r < R; ++r) {
        if (columns == TILE_N) {
            store(y + r * p.n, acc[r][0]);
            store(y + r * p.n + W, acc[r][1]);
            continue;
        }
        store(out, acc[r][0]);
        store(out + W, acc[r][1]);
        for (int64_t c = 0; c < columns; ++c) y[r * p.n + c] = out[c];
    }
}

// wt: room for K × TILE_N floats
inline void gemm_tile(const Q4Problem& p, const float* x, float* wt, float* y, int64_t n0, int64_t n1) {
    dequantize(p, n0, n1, wt);
    int64_t r = 0;
    for (; r + GEMM_ROWS <= p.m; r += GEMM_ROWS) gemm_rows<GEMM_ROWS>(p, x + r * p.k, wt, y + r * p.n + n0, n1 - n0);
    for (; r + 4 <= p.m; r += 4) gemm_rows<4>(p, x + r * p.k, wt, y + r * p.n + n0, n1 - n0);
    for (; r < p.m; ++r) gemm_rows<1>(p, x + r * p.k, wt, y + r * p.n + n0, n1 - n0);
}

// Rows per pass over a task's columns: each pass unpacks the codes again, so a few rows are split
// into as few passes as the registers allow (2 columns · R rows · 2 sums, the codes' and the inputs'
// vectors: R = 6 fills AVX-512's 32; AVX2's 16 hold R = 2, and spill a little at 4)
constexpr int64_t PASS_ROWS = W == 16 ? 6 : 4;

// One task: the columns [n0, n1) for every row, in passes of as even a number of rows as fits (9
// rows: 5 + 4, not 4 + 4 + 1; a tile of codes stays in the L1 cache while the passes go over it).
inline void tile(const Q4Problem& p, const float* xp, float* y, int64_t n0, int64_t n1) {
    for (int64_t r = 0; r < p.m;) {
        const int64_t left = p.m - r, passes = (left + PASS_ROWS - 1) / PASS_ROWS, rows = (left + passes - 1) / passes;
        const float* x = xp + r * p.k;
        float* out = y + r * p.n;
        switch (rows) {
            case 6: columns<6>(p, x, out, n0, n1); break;
            case 5: columns<5>(p, x, out, n0, n1); break;
            case 4: columns<4>(p, x, out, n0, n1); break;
            case 3: columns<3>(p, x, out, n0, n1); break;
            case 2: columns<2>(p, x, out, n0, n1); break;
            default: columns<1>(p, x, out, n0, n1); break;
        }
        r += rows;
    }
}
