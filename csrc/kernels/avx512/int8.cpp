// AVX-512 tree, int8 weights. The u8 x s8 product of vpdpbusd takes xu = xq + 128
// (unsigned) against the signed weights; the surplus 128 * sum(q) is taken off per
// row from rowsum, precomputed when the weight was prepared. Masked rows expand 64
// stored values into their columns with vpexpandb (VBMI2), so zeros cost no bytes.
#include <immintrin.h>

#define SP_ISA_NS avx512
#include "kernels/decl.h"
#include "kernels/generic.h"

namespace sp {
namespace avx512 {
namespace {

constexpr int64_t kPrefetch = 1024;  // bytes ahead in the value stream

// 64 stored bytes from absolute position p, never reading past the buffer.
static inline __m512i load_stream(const int8_t* base, int64_t p, int64_t len) {
  if (p + 64 <= len) return _mm512_loadu_si512(base + p);
  const int64_t rem = len - p;
  return _mm512_maskz_loadu_epi8(rem <= 0 ? 0 : _bzhi_u64(~0ull, unsigned(rem)), base + p);
}

// Mask bits of columns [c, c + 64) of one row (c is a multiple of 64).
static inline uint64_t mask_bits(const uint8_t* m, int64_t c, int64_t in) {
  uint64_t v = 0;
  if (c + 64 <= in) {
    std::memcpy(&v, m + c / 8, 8);
    return v;
  }
  std::memcpy(&v, m + c / 8, size_t((in - c + 7) / 8));
  return _bzhi_u64(v, unsigned(in - c));
}

// Weight vector of columns [c, c + 64) of the current row; advances p past its values.
template <bool kMasked>
static inline __m512i weights(const int8_t* vals, int64_t& p, const uint8_t* m, int64_t c, int64_t in,
                              int64_t len) {
  if constexpr (kMasked) {
    const uint64_t k = mask_bits(m, c, in);
    _mm_prefetch(reinterpret_cast<const char*>(vals + p + kPrefetch), _MM_HINT_T0);
    const __m512i w = _mm512_maskz_expand_epi8(k, load_stream(vals, p, len));
    p += int64_t(_mm_popcnt_u64(k));
    return w;
  } else {
    _mm_prefetch(reinterpret_cast<const char*>(vals + p + c + kPrefetch), _MM_HINT_T0);
    return c + 64 <= in ? _mm512_loadu_si512(vals + p + c)
                        : _mm512_maskz_loadu_epi8(_bzhi_u64(~0ull, unsigned(in - c)), vals + p + c);
  }
}

// y[b0 .. b0+NB, r] with one scale per row: exact int32 dots. U accumulator sets
// cover the vpdpbusd latency when NB is small. Kept free of the grouped path so GCC
// holds the whole tile in registers.
template <int NB, bool kMasked>
static inline void row_tile(const LinearArgs& a, int64_t r, int64_t b0) {
  constexpr int U = NB >= 4 ? 1 : 4 / NB;
  const int8_t* vals = static_cast<const int8_t*>(a.values);
  const uint8_t* m = kMasked ? a.mask + r * a.mask_stride : nullptr;
  const uint8_t* x = a.xu + b0 * a.x_stride;
  const int64_t xs = a.x_stride, in = a.in, len = a.values_len;
  int64_t p = kMasked ? a.row_offsets[r] : r * in;
  __m512i acc[U * NB];
#pragma GCC unroll 16
  for (int i = 0; i < U * NB; ++i) acc[i] = _mm512_setzero_si512();
  int64_t c = 0;
  for (; c + 64 * U <= in; c += 64 * U) {
#pragma GCC unroll 4
    for (int u = 0; u < U; ++u) {
      const __m512i w = weights<kMasked>(vals, p, m, c + 64 * u, in, len);
#pragma GCC unroll 16
      for (int i = 0; i < NB; ++i)
        acc[u * NB + i] = _mm512_dpbusd_epi32(acc[u * NB + i], _mm512_loadu_si512(x + i * xs + c + 64 * u), w);
    }
  }
  for (; c < in; c += 64) {
    const __m512i w = weights<kMasked>(vals, p, m, c, in, len);
#pragma GCC unroll 16
    for (int i = 0; i < NB; ++i) acc[i] = _mm512_dpbusd_epi32(acc[i], _mm512_loadu_si512(x + i * xs + c), w);
  }
  const float s = a.scales[r];
  const int32_t surplus = 128 * a.rowsum[r];
  const float bias = a.bias ? a.bias[r] : 0.f;
#pragma GCC unroll 16
  for (int i = 0; i < NB; ++i) {
#pragma GCC unroll 4
    for (int u = 1; u < U; ++u) acc[i] = _mm512_add_epi32(acc[i], acc[u * NB + i]);
    a.y[(b0 + i) * a.out + r] = float(_mm512_reduce_add_epi32(acc[i]) - surplus) * s * a.sx[b0 + i] + bias;
  }
}

// Grouped scales (group_size a multiple of 64): the surplus 128 * q is tracked lane by
// lane per group, so each lane converts to float as a small exact integer (a per-row
// rowsum would cancel only across lanes, after rounding).
template <int NB, bool kMasked>
static inline void row_tile_grouped(const LinearArgs& a, int64_t r, int64_t b0) {
  const int8_t* vals = static_cast<const int8_t*>(a.values);
  const uint8_t* m = kMasked ? a.mask + r * a.mask_stride : nullptr;
  const uint8_t* x = a.xu + b0 * a.x_stride;
  const int64_t xs = a.x_stride, in = a.in, len = a.values_len;
  const float* s = a.scales + r * a.n_groups;
  int64_t p = kMasked ? a.row_offsets[r] : r * in;
  const __m512i u128 = _mm512_set1_epi8(char(0x80));
  __m512 facc[NB];
  for (int i = 0; i < NB; ++i) facc[i] = _mm512_setzero_ps();
  for (int64_t g = 0; g < a.n_groups; ++g) {
    __m512i acc[NB];
    for (int i = 0; i < NB; ++i) acc[i] = _mm512_setzero_si512();
    __m512i surplus = _mm512_setzero_si512();
    const int64_t c1 = generic::imin(in, (g + 1) * a.group_size);
    for (int64_t c = g * a.group_size; c < c1; c += 64) {
      const __m512i w = weights<kMasked>(vals, p, m, c, in, len);
      surplus = _mm512_dpbusd_epi32(surplus, u128, w);
      for (int i = 0; i < NB; ++i) acc[i] = _mm512_dpbusd_epi32(acc[i], _mm512_loadu_si512(x + i * xs + c), w);
    }
    const __m512 sg = _mm512_set1_ps(s[g]);
    for (int i = 0; i < NB; ++i)
      facc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(acc[i], surplus)), sg, facc[i]);
  }
  const float bias = a.bias ? a.bias[r] : 0.f;
  for (int i = 0; i < NB; ++i) a.y[(b0 + i) * a.out + r] = _mm512_reduce_add_ps(facc[i]) * a.sx[b0 + i] + bias;
}

template <bool kMasked>
static void rows(const LinearArgs& a, int64_t r0, int64_t r1) {
  if (a.n_groups > 1 && a.group_size % 64 != 0) {
    if (kMasked) generic::masked_i8(a, r0, r1); else generic::dense_i8(a, r0, r1);
    return;
  }
  if (a.n_groups > 1) {
    for (int64_t r = r0; r < r1; ++r) {
      int64_t b = 0;
      for (; b + 8 <= a.batch; b += 8) row_tile_grouped<8, kMasked>(a, r, b);
      for (; b < a.batch; ++b) row_tile_grouped<1, kMasked>(a, r, b);
    }
    return;
  }
  for (int64_t r = r0; r < r1; ++r) {
    int64_t b = 0;
    for (; b + 16 <= a.batch; b += 16) row_tile<16, kMasked>(a, r, b);
    if (a.batch - b >= 8) { row_tile<8, kMasked>(a, r, b); b += 8; }
    if (a.batch - b >= 4) { row_tile<4, kMasked>(a, r, b); b += 4; }
    if (a.batch - b >= 2) { row_tile<2, kMasked>(a, r, b); b += 2; }
    if (a.batch - b >= 1) row_tile<1, kMasked>(a, r, b);
  }
}

}  // namespace

void masked_i8(const LinearArgs& a, int64_t r0, int64_t r1) { rows<true>(a, r0, r1); }
void dense_i8(const LinearArgs& a, int64_t r0, int64_t r1) { rows<false>(a, r0, r1); }
void csr_i8(const LinearArgs& a, int64_t r0, int64_t r1) { generic::csr_i8(a, r0, r1); }

}  // namespace avx512
}  // namespace sp
