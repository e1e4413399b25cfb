/* N:M mask kernel for CPU tensors, loaded through ctypes (no Python or torch headers needed).
 *
 * The contiguous weight is viewed as [rows, m, inner]; every (row, inner) position ("lane") holds one
 * group of m values spaced `inner` elements apart. Magnitudes are compared on the IEEE bit patterns
 * with the sign bit cleared, as signed integers of the same width: for finite floats that order equals
 * the order of |w| at every width. Ties keep the lower in-group index, the same rule as a stable
 * descending sort.
 *
 * m = 2, 4, 8, 16 (the common patterns): rank by comparison. Element i is kept iff fewer than n members
 * of its group beat it (j beats i when |w_j| > |w_i|, or equal and j < i). With m a compile-time
 * constant these are branch-free straight-line comparisons on a few registers, and the loop over
 * groups (inner == 1: groups are m consecutive values) or over the contiguous inner positions
 * (inner > 1: each of the m rows is a contiguous run) is auto-vectorized (SIMD, no per-lane division,
 * one pass: the mask and the masked weight are written together).
 *
 * Other m (up to NM_MAX_M): lanes are processed LANES at a time in a transposed L1 buffer so that every
 * inner loop runs across lanes and vectorizes: a branch-free insertion network finds each group's k-th
 * largest (or smallest) magnitude, then one sweep keeps everything above it and as many ties as are
 * still needed.
 *
 * With `wout` not NULL the masked weight (kept values bit for bit, +0 elsewhere) is written in the same
 * pass, so the SR-STE forward needs no separate masking pass. Returns the number of non-finite values
 * seen (the caller raises when it is not zero).
 *
 * nm_decay_*: grad += lam * w where the mask is 0 (the SR-STE term), one pass, in place.
 *
 * nm_apply_*: out = w where the mask is 1, +0 elsewhere (kept bits exactly, -0.0 included), one pass: what
 * torch.where(mask, w, 0) computes, at the speed of a copy.
 */
#include <stdint.h>

#define NM_MAX_M 256
#define LANES 32

#define NM_DEFINE(NAME, T)                                                                          \
static int64_t NAME(const T *w, uint8_t *out, T *wout, int64_t lane_begin, int64_t lane_end, int64_t inner, \
             int64_t n, int64_t m, T absmask, T expmask) {                                          \
    T v[NM_MAX_M][LANES];                                                                           \
    T raw[NM_MAX_M][LANES]; /* the weights as read, for the masked-weight output */                 \
    T sel[NM_MAX_M / 2 + 1][LANES];                                                                 \
    T x[LANES], thr[LANES];                                                                         \
    int32_t need[LANES];                                                                            \
    int64_t base[LANES];                                                                            \
    int64_t nonfinite = 0;                                                                          \
    const int keep_side = (n <= m - n); /* track the smaller side: n kept or m-n dropped */         \
    const int64_t k = keep_side ? n : m - n;                                                        \
    for (int64_t l0 = lane_begin; l0 < lane_end; l0 += LANES) {                                     \
        const int nb = (int)((lane_end - l0) < LANES ? (lane_end - l0) : LANES);                    \
        {   /* lane -> offset of its first element, without a division per lane */                 \
            int64_t row = l0 / inner, c = l0 % inner;                                               \
            for (int b = 0; b < nb; ++b) {                                                          \
                base[b] = row * m * inner + c;                                                      \
                if (++c == inner) { c = 0; ++row; }                                                 \
            }                                                                                       \
        }                                                                                           \
        for (int64_t j = 0; j < m; ++j) {                                                           \
            for (int b = 0; b < nb; ++b) {                                                          \
                const T bits = w[base[b] + j * inner];                                              \
                nonfinite += ((bits & expmask) == expmask);                                         \
                raw[j][b] = bits;                                                                   \
                v[j][b] = bits & absmask;                                                           \
            }                                                                                       \
        }                                                                                           \
        for (int64_t s = 0; s < k; ++s)                                                             \
            for (int b = 0; b < LANES; ++b) sel[s][b] = keep_side ? (T)0 : absmask;                 \
        for (int64_t j = 0; j < m; ++j) {                                                           \
            for (int b = 0; b < LANES; ++b) x[b] = v[j][b];                                         \
            for (int64_t s = 0; s < k; ++s) {                                                       \
                for (int b = 0; b < LANES; ++b) {                                                   \
                    const T a = sel[s][b], y = x[b];                                                \
                    const int up = keep_side ? (y > a) : (y < a);                                   \
                    sel[s][b] = up ? y : a;                                                         \
                    x[b] = up ? a : y;                                                              \
                }                                                                                   \
            }                                                                                       \
        }                                                                                           \
        for (int b = 0; b < LANES; ++b) { thr[b] = sel[k - 1][b]; need[b] = (int32_t)k; }           \
        for (int64_t j = 0; j < m; ++j)                                                             \
            for (int b = 0; b < LANES; ++b)                                                         \
                need[b] -= keep_side ? (v[j][b] > thr[b]) : (v[j][b] < thr[b]);                     \
        if (keep_side) {                                                                            \
            for (int64_t j = 0; j < m; ++j)                                                         \
                for (int b = 0; b < LANES; ++b) {                                                   \
                    const int take = (v[j][b] == thr[b]) & (need[b] > 0);                           \
                    need[b] -= take;                                                                \
                    v[j][b] = (T)((v[j][b] > thr[b]) | take);                                       \
                }                                                                                   \
        } else {                                                                                    \
            for (int64_t j = m - 1; j >= 0; --j)                                                    \
                for (int b = 0; b < LANES; ++b) {                                                   \
                    const int take = (v[j][b] == thr[b]) & (need[b] > 0);                           \
                    need[b] -= take;                                                                \
                    v[j][b] = (T)(!((v[j][b] < thr[b]) | take));                                    \
                }                                                                                   \
        }                                                                                           \
        if (wout) {                                                                                 \
            for (int64_t j = 0; j < m; ++j)                                                         \
                for (int b = 0; b < nb; ++b) {                                                      \
                    const int64_t at = base[b] + j * inner;                                         \
                    out[at] = (uint8_t)v[j][b];                                                     \
                    wout[at] = (T)(raw[j][b] & (T)(0 - v[j][b])); /* kept bits or +0 */             \
                }                                                                                   \
        } else {                                                                                    \
            for (int64_t j = 0; j < m; ++j)                                                         \
                for (int b = 0; b < nb; ++b) out[base[b] + j * inner] = (uint8_t)v[j][b];           \
        }                                                                                           \
    }                                                                                               \
    return nonfinite;                                                                               \
}

NM_DEFINE(nm_generic_u16, uint16_t)
NM_DEFINE(nm_generic_u32, uint32_t)
NM_DEFINE(nm_generic_u64, uint64_t)

/* Rank by comparison for a compile-time M. ONE_GROUP ranks the M values v[] (sign-cleared bits as signed
 * ints) and writes keep[i] = 1 if kept. */
#define NM_RANK(T, S, M, SUF)                                                                        \
/* one group: its M values at src[0], src[stride], ...; keep = fewer than n members beat it */           \
static inline __attribute__((always_inline)) int64_t nm_group_##SUF##_##M(                          \
        const T *src, uint8_t *dst, T *wdst, int64_t stride, int nn, T absmask, T expmask,            \
        const int with_w) {                                                                          \
    int64_t nonfinite = 0;                                                                           \
    T r[M]; S v[M];                                                                                  \
    for (int j = 0; j < M; ++j) {                                                                    \
        r[j] = src[j * stride];                                                                      \
        v[j] = (S)(r[j] & absmask);                                                                  \
        nonfinite += ((r[j] & expmask) == expmask);                                                  \
    }                                                                                                \
    for (int i = 0; i < M; ++i) {                                                                    \
        int cnt = 0;                                                                                 \
        for (int j = 0; j < i; ++j) cnt += (v[j] >= v[i]);                                           \
        for (int j = i + 1; j < M; ++j) cnt += (v[j] > v[i]);                                        \
        const T keep = (T)(cnt < nn);                                                                \
        dst[i * stride] = (uint8_t)keep;                                                             \
        if (with_w) wdst[i * stride] = r[i] & (T)(0 - keep);                                         \
    }                                                                                                \
    return nonfinite;                                                                                \
}                                                                                                    \
static inline __attribute__((always_inline)) int64_t nm_rank_body_##SUF##_##M(                      \
        const T *w, uint8_t *out, T *wout, int64_t lane_begin, int64_t lane_end, int64_t inner,       \
        int64_t n, T absmask, T expmask, const int with_w) {                                         \
    int64_t nonfinite = 0;                                                                           \
    const int nn = (int)n;                                                                           \
    if (inner == 1) { /* groups of M consecutive values: a constant stride the compiler vectorizes */ \
        for (int64_t g = lane_begin; g < lane_end; ++g)                                              \
            nonfinite += nm_group_##SUF##_##M(w + g * M, out + g * M, with_w ? wout + g * M : wout, 1, \
                                              nn, absmask, expmask, with_w);                         \
        return nonfinite;                                                                            \
    }                                                                                                \
    int64_t row = lane_begin / inner, c = lane_begin % inner, left = lane_end - lane_begin;          \
    while (left > 0) {                                                                               \
        const int64_t cend = (inner - c) < left ? inner : c + left;                                  \
        const int64_t base = row * M * inner;                                                        \
        for (int64_t x = c; x < cend; ++x)                                                           \
            nonfinite += nm_group_##SUF##_##M(w + base + x, out + base + x,                          \
                                              with_w ? wout + base + x : wout, inner, nn, absmask,    \
                                              expmask, with_w);                                      \
        left -= cend - c;                                                                            \
        c = 0;                                                                                       \
        ++row;                                                                                       \
    }                                                                                                \
    return nonfinite;                                                                                \
}                                                                                                    \
static __attribute__((unused)) int64_t nm_rank_##SUF##_##M(const T *w, uint8_t *out, T *wout,        \
                                   int64_t lane_begin,                                               \
                                   int64_t lane_end, int64_t inner, int64_t n, T absmask, T expmask) { \
    if (wout) return nm_rank_body_##SUF##_##M(w, out, wout, lane_begin, lane_end, inner, n, absmask, expmask, 1); \
    return nm_rank_body_##SUF##_##M(w, out, wout, lane_begin, lane_end, inner, n, absmask, expmask, 0); \
}


/* 2:4-style groups (m = 4, any n) of 32-bit values with AVX-512 (F, BW, VL), when the compiler targets it
 * (-march=native on such a CPU); the same masks, bit for bit, as the portable code below.
 * inner == 1: a 512-bit register holds four whole groups (one per 128-bit lane); each element is compared
 * with the three others by rotating within the lanes, the tie rule (the lower index wins) picked per
 * position. inner > 1: the m rows of a group block are contiguous runs; 16 lanes at a time, compared
 * vertically. "kept" = fewer than n of the three comparisons beat the element, as mask-register logic. */
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
static inline __mmask16 nm_keep3(__mmask16 a, __mmask16 b, __mmask16 c, int64_t n) {
    if (n == 1) return (__mmask16)~(a | b | c);
    if (n == 2) return (__mmask16)~((a & b) | (c & (a | b)));
    return (__mmask16)~(a & b & c);
}
static inline __mmask16 nm_beats(__m512i other, __m512i v, __mmask16 lower) {
    /* other beats v: other > v, or other == v where other's index is the lower one */
    return (__mmask16)((_mm512_cmpgt_epi32_mask(other, v) & (__mmask16)~lower) |
                       (_mm512_cmpge_epi32_mask(other, v) & lower));
}
static inline int64_t nm_block4(const uint32_t *src, uint8_t *dst, uint32_t *wdst, __mmask16 lm, int64_t n,
                                __m512i am, __m512i em) {
    const __m512i raw = _mm512_maskz_loadu_epi32(lm, src);
    const int64_t bad = __builtin_popcount(_mm512_mask_cmpeq_epi32_mask(lm, _mm512_and_si512(raw, em), em));
    const __m512i v = _mm512_and_si512(raw, am);
    const __mmask16 a = nm_beats(_mm512_shuffle_epi32(v, _MM_PERM_ADCB), v, (__mmask16)0x8888);
    const __mmask16 b = nm_beats(_mm512_shuffle_epi32(v, _MM_PERM_BADC), v, (__mmask16)0xCCCC);
    const __mmask16 c = nm_beats(_mm512_shuffle_epi32(v, _MM_PERM_CBAD), v, (__mmask16)0xEEEE);
    const __mmask16 keep = nm_keep3(a, b, c, n);
    _mm_mask_storeu_epi8(dst, lm, _mm_maskz_set1_epi8(keep, 1));
    if (wdst) _mm512_mask_storeu_epi32(wdst, lm, _mm512_maskz_mov_epi32(keep, raw));
    return bad;
}
static int64_t nm_rank4_avx512_u32(const uint32_t *w, uint8_t *out, uint32_t *wout, int64_t lane_begin,
                                   int64_t lane_end, int64_t inner, int64_t n, uint32_t absmask,
                                   uint32_t expmask) {
    const __m512i am = _mm512_set1_epi32((int)absmask), em = _mm512_set1_epi32((int)expmask);
    int64_t nonfinite = 0;
    if (inner == 1) {
        int64_t e = lane_begin * 4;
        const int64_t end = lane_end * 4;
        for (; e + 16 <= end; e += 16)
            nonfinite += nm_block4(w + e, out + e, wout ? wout + e : 0, (__mmask16)0xFFFF, n, am, em);
        if (e < end)
            nonfinite += nm_block4(w + e, out + e, wout ? wout + e : 0, (__mmask16)((1u << (end - e)) - 1u), n,
                                   am, em);
        return nonfinite;
    }
    int64_t row = lane_begin / inner, c = lane_begin % inner, left = lane_end - lane_begin;
    while (left > 0) {
        const int64_t cend = (inner - c) < left ? inner : c + left;
        const uint32_t *src = w + row * 4 * inner;
        uint8_t *dst = out + row * 4 * inner;
        uint32_t *wdst = wout ? wout + row * 4 * inner : 0;
        for (int64_t x = c; x < cend; x += 16) {
            const __mmask16 lm = (cend - x) >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (cend - x)) - 1u);
            __m512i raw[4], v[4];
            for (int j = 0; j < 4; ++j) {
                raw[j] = _mm512_maskz_loadu_epi32(lm, src + j * inner + x);
                nonfinite += __builtin_popcount(_mm512_mask_cmpeq_epi32_mask(lm, _mm512_and_si512(raw[j], em), em));
                v[j] = _mm512_and_si512(raw[j], am);
            }
            for (int i = 0; i < 4; ++i) {
                __mmask16 beat[3];
                int k = 0;
                for (int j = 0; j < 4; ++j) {
                    if (j == i) continue;
                    beat[k++] = j < i ? _mm512_cmpge_epi32_mask(v[j], v[i]) : _mm512_cmpgt_epi32_mask(v[j], v[i]);
                }
                const __mmask16 keep = nm_keep3(beat[0], beat[1], beat[2], n);
                _mm_mask_storeu_epi8(dst + i * inner + x, lm, _mm_maskz_set1_epi8(keep, 1));
                if (wdst) _mm512_mask_storeu_epi32(wdst + i * inner + x, lm, _mm512_maskz_mov_epi32(keep, raw[i]));
            }
        }
        left -= cend - c;
        c = 0;
        ++row;
    }
    return nonfinite;
}
#define NM_RANK4_u32 nm_rank4_avx512_u32
#else
#define NM_RANK4_u32 nm_rank_u32_4
#endif
#define NM_RANK4_u16 nm_rank_u16_4
#define NM_RANK4_u64 nm_rank_u64_4

#define NM_ENTRY(SUF, T, S)                                                                          \
NM_RANK(T, S, 2, SUF)                                                                                \
NM_RANK(T, S, 4, SUF)                                                                                \
NM_RANK(T, S, 8, SUF)                                                                                \
NM_RANK(T, S, 16, SUF)                                                                               \
int64_t nm_mask_##SUF(const T *w, uint8_t *out, T *wout, int64_t lane_begin, int64_t lane_end,       \
                      int64_t inner, int64_t n, int64_t m, T absmask, T expmask) {                   \
    switch (m) {                                                                                     \
    case 2: return nm_rank_##SUF##_2(w, out, wout, lane_begin, lane_end, inner, n, absmask, expmask); \
    case 4: return NM_RANK4_##SUF(w, out, wout, lane_begin, lane_end, inner, n, absmask, expmask);  \
    case 8: return nm_rank_##SUF##_8(w, out, wout, lane_begin, lane_end, inner, n, absmask, expmask); \
    case 16: return nm_rank_##SUF##_16(w, out, wout, lane_begin, lane_end, inner, n, absmask, expmask); \
    default: return nm_generic_##SUF(w, out, wout, lane_begin, lane_end, inner, n, m, absmask, expmask); \
    }                                                                                                \
}

NM_ENTRY(u16, uint16_t, int16_t)
NM_ENTRY(u32, uint32_t, int32_t)
NM_ENTRY(u64, uint64_t, int64_t)

#define NM_DECAY(NAME, F)                                                                           \
void NAME(F *grad, const F *w, const uint8_t *mask, int64_t begin, int64_t end, F lam) {            \
    for (int64_t i = begin; i < end; ++i) grad[i] += mask[i] ? (F)0 : lam * w[i];                  \
}

NM_DECAY(nm_decay_f32, float)
NM_DECAY(nm_decay_f64, double)

#define NM_APPLY(NAME, T)                                                                           \
void NAME(const T *w, const uint8_t *mask, T *out, int64_t begin, int64_t end) {                    \
    for (int64_t i = begin; i < end; ++i) out[i] = w[i] & (T)(0 - (T)mask[i]);                      \
}

NM_APPLY(nm_apply_u16, uint16_t)
NM_APPLY(nm_apply_u32, uint32_t)
NM_APPLY(nm_apply_u64, uint64_t)
