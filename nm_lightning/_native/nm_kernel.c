/* N:M mask kernel for CPU tensors, loaded through ctypes (no Python or torch headers needed).
 *
 * The contiguous weight is viewed as [rows, m, inner]; every (row, inner) position ("lane") holds one
 * group of m values spaced `inner` elements apart. Magnitudes are compared on the IEEE bit patterns
 * with the sign bit cleared: for finite floats that order equals the order of |w| at every width.
 * Ties keep the lower in-group index, the same rule as a stable descending sort.
 *
 * Lanes are processed LANES at a time in a transposed L1 buffer so that every inner loop runs across
 * lanes and vectorizes: a branch-free insertion network finds each group's k-th largest (or smallest)
 * magnitude, then one sweep keeps everything above it and as many ties as are still needed.
 *
 * With `wout` not NULL the masked weight (kept values, +0 elsewhere) is written in the same pass, so
 * the SR-STE forward needs no separate masking pass. Returns the number of non-finite values seen (the
 * caller raises when it is not zero).
 *
 * nm_decay_*: grad += lam * w where the mask is 0 (the SR-STE term), one pass, in place.
 */
#include <stdint.h>

#define NM_MAX_M 256
#define LANES 32

#define NM_DEFINE(NAME, T)                                                                          \
int64_t NAME(const T *w, uint8_t *out, T *wout, int64_t lane_begin, int64_t lane_end, int64_t inner, \
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

NM_DEFINE(nm_mask_u16, uint16_t)
NM_DEFINE(nm_mask_u32, uint32_t)
NM_DEFINE(nm_mask_u64, uint64_t)

#define NM_DECAY(NAME, F)                                                                           \
void NAME(F *grad, const F *w, const uint8_t *mask, int64_t begin, int64_t end, F lam) {            \
    for (int64_t i = begin; i < end; ++i) grad[i] += mask[i] ? (F)0 : lam * w[i];                  \
}

NM_DECAY(nm_decay_f32, float)
NM_DECAY(nm_decay_f64, double)
