// NEON trees, int8 weights. Masked rows expand 16 stored values at a time into their columns with tbl
// and the byte-shuffle controls of kernels/byte_shuffles.h (one per mask byte, the upper one shifted
// by the lower one's count). Products: sdot (int8 x int8 -> int32, exact) in the neondot tree; in
// the plain one smull/smlal2 form two int8 products per int16 lane (at most 2 * 127 * 127 < 2^15)
// and sadalp widens them pairwise into int32. Signed x signed: no +128 offset, no row-sum correction.
#include <arm_neon.h>

#include "kernels/neon/tree.h"
#include "kernels/byte_shuffles.h"
#include "kernels/decl.h"
#include "kernels/generic.h"

namespace sp {
namespace SP_ISA_NS {
namespace {

// 16 stored bytes from position p, never reading past the buffer.
static inline int8x16_t load16(const int8_t* base, int64_t p, int64_t len) {
  if (p + 16 <= len) return vld1q_s8(base + p);
  int8_t tmp[16] = {};
  if (len > p) std::memcpy(tmp, base + p, size_t(len - p));
  return vld1q_s8(tmp);
}

// Mask bits of columns [c, c + 16) of one row (c a multiple of 16).
static inline uint32_t mask16(const uint8_t* m, int64_t c, int64_t in) {
  uint32_t v = 0;
  if (c + 16 <= in) {
    std::memcpy(&v, m + c / 8, 2);
    return v;
  }
  std::memcpy(&v, m + c / 8, size_t((in - c + 7) / 8));
  return v & ((1u << (in - c)) - 1);
}

// Weights of columns [c, c + 16) of the current row; advances p past its values.
template <bool kMasked>
static inline int8x16_t weights(const int8_t* vals, int64_t& p, const uint8_t* m, int64_t c, int64_t in,
                                int64_t len) {
  if constexpr (kMasked) {
    const uint32_t k = mask16(m, c, in);
    const uint32_t b0 = k & 0xFF, b1 = k >> 8;
    const uint64_t lo = kByteShuffles.ctrl[b0];
    const uint64_t hi = kByteShuffles.ctrl[b1] + uint64_t(__builtin_popcount(b0)) * kOnes;
    const int8x16_t w = vqtbl1q_s8(load16(vals, p, len), vcombine_u8(vcreate_u8(lo), vcreate_u8(hi)));
    p += __builtin_popcount(k);
    return w;
  } else {
    if (c + 16 <= in) return vld1q_s8(vals + p + c);
    int8_t tmp[16] = {};
    std::memcpy(tmp, vals + p + c, size_t(in - c));
    return vld1q_s8(tmp);
  }
}

// acc + the dot products of x and w, four int32 lanes.
static inline int32x4_t dot16(int32x4_t acc, int8x16_t x, int8x16_t w) {
#if defined(__ARM_FEATURE_DOTPROD)
  return vdotq_s32(acc, x, w);
#else
  return vpadalq_s16(acc, vmlal_high_s8(vmull_s8(vget_low_s8(x), vget_low_s8(w)), x, w));
#endif
}

// y[b0 .. b0+NB, r]: each 16-column piece of the row is expanded once for the NB tokens.
template <int NB, bool kMasked>
static inline void row_tile(const LinearArgs& a, int64_t r, int64_t b0) {
  const int8_t* vals = static_cast<const int8_t*>(a.values);
  const uint8_t* m = kMasked ? a.mask + r * a.mask_stride : nullptr;
  const int8_t* x = a.xq + b0 * a.x_stride;
  const int64_t xs = a.x_stride, in = a.in, len = a.values_len;
  const float* s = a.scales + r * a.n_groups;
  int64_t p = kMasked ? a.row_offsets[r] : r * in;
  float facc[NB];
  for (int i = 0; i < NB; ++i) facc[i] = 0.f;
  const float bias = a.bias ? a.bias[r] : 0.f;
  for (int64_t g = 0; g < a.n_groups; ++g) {
    int32x4_t acc[NB];
    for (int i = 0; i < NB; ++i) acc[i] = vdupq_n_s32(0);
    const int64_t c1 = generic::imin(in, (g + 1) * a.group_size);
    for (int64_t c = g * a.group_size; c < c1; c += 16) {  // x_stride >= in rounded up to 64 (xq = 0)
      const int8x16_t w = weights<kMasked>(vals, p, m, c, in, len);
      for (int i = 0; i < NB; ++i) acc[i] = dot16(acc[i], vld1q_s8(x + i * xs + c), w);
    }
    if (a.n_groups == 1) {  // exact int32 dot, one scale
      for (int i = 0; i < NB; ++i) a.y[(b0 + i) * a.out + r] = float(vaddvq_s32(acc[i])) * s[0] * a.sx[b0 + i] + bias;
      return;
    }
    for (int i = 0; i < NB; ++i) facc[i] += float(vaddvq_s32(acc[i])) * s[g];
  }
  for (int i = 0; i < NB; ++i) a.y[(b0 + i) * a.out + r] = facc[i] * a.sx[b0 + i] + bias;
}

template <bool kMasked>
static void rows(const LinearArgs& a, int64_t r0, int64_t r1) {
  if (a.n_groups > 1 && a.group_size % 16 != 0) {
    if (kMasked) generic::masked_i8(a, r0, r1); else generic::dense_i8(a, r0, r1);
    return;
  }
  for (int64_t r = r0; r < r1; ++r) {
    int64_t b = 0;
    for (; b + 8 <= a.batch; b += 8) row_tile<8, kMasked>(a, r, b);
    if (a.batch - b >= 4) { row_tile<4, kMasked>(a, r, b); b += 4; }
    if (a.batch - b >= 2) { row_tile<2, kMasked>(a, r, b); b += 2; }
    if (a.batch - b >= 1) row_tile<1, kMasked>(a, r, b);
  }
}

}  // namespace

void masked_i8(const LinearArgs& a, int64_t r0, int64_t r1) { rows<true>(a, r0, r1); }
void dense_i8(const LinearArgs& a, int64_t r0, int64_t r1) { rows<false>(a, r0, r1); }
void csr_i8(const LinearArgs& a, int64_t r0, int64_t r1) { generic::csr_i8(a, r0, r1); }

void quantize(const float* x, int64_t b0, int64_t b1, int64_t in, int64_t stride, int8_t* xq, uint8_t* xu,
              float* sx) {
  const float32x4_t lim = vdupq_n_f32(127.f), nlim = vdupq_n_f32(-127.f);
  const uint8x8_t flip = vdup_n_u8(0x80);
  const int64_t in8 = in / 8 * 8;
  for (int64_t b = b0; b < b1; ++b) {
    const float* row = x + b * in;
    float32x4_t mx = vdupq_n_f32(0.f);
    int64_t j = 0;
    for (; j + 4 <= in; j += 4) mx = vmaxq_f32(mx, vabsq_f32(vld1q_f32(row + j)));
    float amax = vmaxvq_f32(mx);
    for (; j < in; ++j) amax = __builtin_fabsf(row[j]) > amax ? __builtin_fabsf(row[j]) : amax;
    const float s = amax == 0.f ? 1.f : amax / 127.f;
    sx[b] = s;
    const float32x4_t sv = vdupq_n_f32(s);
    int8_t* q = xq + b * stride;
    uint8_t* u = xu + b * stride;
    for (j = 0; j < in8; j += 8) {
      int32x4_t w[2];
      for (int h = 0; h < 2; ++h) {
        // division, not a reciprocal multiply, and frintn (ties to even): rounds like torch
        const float32x4_t v = vrndnq_f32(vdivq_f32(vld1q_f32(row + j + 4 * h), sv));
        w[h] = vcvtq_s32_f32(vminq_f32(lim, vmaxq_f32(nlim, v)));
      }
      const int8x8_t q8 = vqmovn_s16(vcombine_s16(vqmovn_s32(w[0]), vqmovn_s32(w[1])));
      vst1_s8(q + j, q8);
      vst1_u8(u + j, veor_u8(vreinterpret_u8_s8(q8), flip));
    }
    generic::quantize_row_from(row, s, in8, in, stride, q, u);
  }
}

}  // namespace SP_ISA_NS
}  // namespace sp
