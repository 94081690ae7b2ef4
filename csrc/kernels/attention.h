// Scaled dot-product attention in fp32, written once over the GCC vector type of activation.h so
// every ISA tree compiles it with its own -m flags (16 lanes in AVX-512, 8 in AVX2, 4 in SSE2).
//
// One task is a (batch, head) pair and a range of query rows. Its keys are transposed once into
// kt[d][j] and its values copied into rows padded to whole vectors; then query rows go in blocks
// of kRows: scores against all keys by broadcast FMAs (one vector of keys per query element, kKeys
// keys at a time), an exact softmax per row in place, and the outputs accumulated from the value
// rows. Memory per thread: keys and values once plus kRows x Sk scores. A row whose every key is
// masked (-inf) or causally hidden outputs zeros.
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "common.h"
#include "kernels/activation.h"
#include "kernels/scratch.h"

#ifndef SP_ISA_NS
#error "define SP_ISA_NS before including kernels/attention.h"
#endif

namespace sp {
namespace SP_ISA_NS {
namespace attn {

using act::kLanes;
using act::Vec;

constexpr int kRows = kLanes >= 16 ? 8 : 4;  // query rows per block: 2 * kRows accumulators fit the registers
constexpr int kKeys = 2 * kLanes;              // keys per chunk
constexpr int kDv = 2;                         // value vectors per output accumulator block

static inline int64_t round_up(int64_t n, int64_t to) { return (n + to - 1) / to * to; }
static inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

static inline Vec loadv(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

static inline void storev(float* p, Vec v) { std::memcpy(p, &v, sizeof v); }

// dst[0 .. n) = src[0 .. n) for the short rows of one head (a library memcpy call per 128-byte row
// had cost more than the copy).
static inline void copy_row(float* dst, const float* src, int64_t n) {
  int64_t e = 0;
  for (; e + kLanes <= n; e += kLanes) storev(dst + e, loadv(src + e));
  for (; e < n; ++e) dst[e] = src[e];
}

// Horizontal max and sum by halving (log2(kLanes) dependent steps, not kLanes: the serial sum of
// 16 lanes had been 8% of this kernel's time).
static inline float hmax(Vec v) {
  float lanes[kLanes];
  std::memcpy(lanes, &v, sizeof v);
  for (int w = kLanes / 2; w >= 1; w /= 2)
    for (int i = 0; i < w; ++i) lanes[i] = lanes[i + w] > lanes[i] ? lanes[i + w] : lanes[i];
  return lanes[0];
}

static inline float hsum(Vec v) {
  float lanes[kLanes];
  std::memcpy(lanes, &v, sizeof v);
  for (int w = kLanes / 2; w >= 1; w /= 2)
    for (int i = 0; i < w; ++i) lanes[i] += lanes[i + w];
  return lanes[0];
}

static thread_local Scratch tl_buffer;  // keys transposed, values padded, scores, outputs

// Scores of kRows query rows (q[r], d floats each) against keys [j0, j0 + kKeys) of kt (rows ld floats
// apart), times scale, into s[r * ld + j0 ..].
static inline void scores(const float* const* q, const float* kt, int64_t ld, int64_t d, int64_t j0, float scale,
                          float* s) {
  Vec acc[kRows][2];
  for (int r = 0; r < kRows; ++r) acc[r][0] = acc[r][1] = Vec{};
  for (int64_t e = 0; e < d; ++e) {
    const Vec k0 = loadv(kt + e * ld + j0), k1 = loadv(kt + e * ld + j0 + kLanes);
#pragma GCC unroll 8
    for (int r = 0; r < kRows; ++r) {
      const float x = q[r][e];
      acc[r][0] += x * k0;
      acc[r][1] += x * k1;
    }
  }
  for (int r = 0; r < kRows; ++r) {
    storev(s + r * ld + j0, scale * acc[r][0]);
    storev(s + r * ld + j0 + kLanes, scale * acc[r][1]);
  }
}

// o[r][:] = sum_c p[r * ld + c] v[c][:] over the first nc keys (value rows dp floats apart).
static inline void weigh_values(const float* p, int64_t ld, const float* v, int64_t dp, int64_t nc, float* o) {
  for (int64_t e = 0; e < dp; e += kDv * kLanes) {
    Vec acc[kRows][kDv];
    for (int r = 0; r < kRows; ++r)
      for (int t = 0; t < kDv; ++t) acc[r][t] = Vec{};
    for (int64_t c = 0; c < nc; ++c) {
      const Vec v0 = loadv(v + c * dp + e), v1 = loadv(v + c * dp + e + kLanes);
#pragma GCC unroll 8
      for (int r = 0; r < kRows; ++r) {
        const float w = p[r * ld + c];
        acc[r][0] += w * v0;
        acc[r][1] += w * v1;
      }
    }
    for (int r = 0; r < kRows; ++r)
      for (int t = 0; t < kDv; ++t) storev(o + r * dp + e + t * kLanes, acc[r][t]);
  }
}

// One row of scores: the mask added over the `seen` visible keys, then softmax numerators in place
// (zeros from `seen` to `end`); returns their sum (0 when no key is visible).
static inline float softmax_row(float* row, const float* mask, int64_t seen, int64_t end) {
  const float ninf = -INFINITY;
  int64_t j = 0;
  Vec top = Vec{} + ninf;
  for (; j + kLanes <= seen; j += kLanes) {
    Vec x = loadv(row + j);
    if (mask) x += loadv(mask + j);
    storev(row + j, x);
    top = x > top ? x : top;
  }
  float mx = hmax(top);
  for (; j < seen; ++j) {
    if (mask) row[j] += mask[j];
    mx = row[j] > mx ? row[j] : mx;
  }
  if (mx == ninf) seen = 0;  // nothing visible: all weights zero
  const Vec zero = {};
  Vec sum = zero;
  j = 0;
  for (; j + kLanes <= seen; j += kLanes) {
    const Vec x = loadv(row + j);
    const Vec p = x > ninf ? act::expv<Vec>(x - mx) : zero;
    storev(row + j, p);
    sum += p;
  }
  float total = hsum(sum);
  for (; j < seen; ++j) {
    row[j] = row[j] > ninf ? act::expv<float>(row[j] - mx) : 0.f;
    total += row[j];
  }
  for (j = seen; j < end; ++j) row[j] = 0.f;
  return total;
}

static void attend(const AttentionArgs& a, int64_t bh, int64_t i0, int64_t i1) {
  const AttentionPair pair = attention_pair(a, bh);
  const int64_t d = a.d, dp = round_up(d, kDv * kLanes);
  const int64_t kend = visible_keys(a, i1);  // keys any row of this task sees
  const int64_t ld = round_up(kend, kKeys);
  const size_t floats = size_t(d * ld + ld * dp + kRows * ld + kRows * dp + kend * d);
  float* buf = reinterpret_cast<float*>(tl_buffer.get(floats * sizeof(float)));
  if (!buf) std::abort();  // cannot happen for any shape a caller can allocate q, k, v for
  float* kt = buf;
  float* vp = kt + d * ld;
  float* s = vp + ld * dp;
  float* o = s + kRows * ld;
  float* kc = o + kRows * dp;
  const float *K = pair.k, *V = pair.v, *Q = pair.q, *M = pair.mask;
  // Whole strided rows first (a few vector loads each, many rows' misses in flight), then the
  // transpose from L1: transposing straight from K kept one row's scattered loads waiting at a time
  // (a third of this function's time, measured).
  for (int64_t j = 0; j < kend; ++j) {
    copy_row(kc + j * d, K + j * a.k_s, d);
    copy_row(vp + j * dp, V + j * a.v_s, d);
    std::memset(vp + j * dp + d, 0, size_t(dp - d) * sizeof(float));
  }
  for (int64_t j = kend; j < ld; ++j) std::memset(vp + j * dp, 0, size_t(dp) * sizeof(float));
  for (int64_t e = 0; e < d; ++e) {
    float* col = kt + e * ld;
    for (int64_t j = 0; j < kend; ++j) col[j] = kc[j * d + e];
    for (int64_t j = kend; j < ld; ++j) col[j] = 0.f;
  }
  for (int64_t r0 = i0; r0 < i1; r0 += kRows) {
    const int nr = int(min64(kRows, i1 - r0));
    // rows past the block's end repeat its last row (their scores are discarded)
    const float* qrows[kRows];
    for (int r = 0; r < kRows; ++r) qrows[r] = Q + (r0 + (r < nr ? r : nr - 1)) * a.q_s;
    const int64_t jend = visible_keys(a, r0 + nr);  // keys any row of the block sees
    const int64_t jpad = round_up(jend, kKeys);
    for (int64_t j0 = 0; j0 < jend; j0 += kKeys) scores(qrows, kt, ld, d, j0, a.scale, s);
    float total[kRows];
    for (int r = 0; r < kRows; ++r) {
      const int64_t i = r0 + r;
      const int64_t seen = r >= nr ? 0 : visible_keys(a, i + 1);
      total[r] = softmax_row(s + r * ld, M ? M + i * a.m_s : nullptr, seen, jpad);
    }
    weigh_values(s, ld, vp, dp, jend, o);
    for (int r = 0; r < nr; ++r) {
      const float inv = total[r] > 0.f ? 1.f / total[r] : 0.f;
      float* out = a.out + pair.b * a.o_b + pair.h * a.o_h + (r0 + r) * a.o_s;
      const float* orow = o + r * dp;
      int64_t e = 0;
      for (; e + kLanes <= d; e += kLanes) storev(out + e, loadv(orow + e) * inv);
      for (; e < d; ++e) out[e] = orow[e] * inv;
    }
  }
}

}  // namespace attn
}  // namespace SP_ISA_NS
}  // namespace sp
