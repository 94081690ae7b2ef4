// AVX2 tree, int8 weights. No VNNI here: vpmaddubsw takes |xq| (u8) against
// sign(w, xq) (s8) so every pair sum stays below 2^15 (127 * 127 * 2), then vpmaddwd
// widens to int32. Masked rows place stored values with pshufb controls from a table.
#include <immintrin.h>

#define SP_ISA_NS avx2
#include "kernels/avx2/tables.h"
#include "kernels/decl.h"
#include "kernels/generic.h"

namespace sp {
namespace avx2 {
namespace {

constexpr int64_t kPrefetch = 1024;

static inline __m128i load16(const int8_t* base, int64_t p, int64_t len) {
  if (p + 16 <= len) return _mm_loadu_si128(reinterpret_cast<const __m128i*>(base + p));
  alignas(16) int8_t tmp[16] = {};
  if (len > p) std::memcpy(tmp, base + p, size_t(len - p));
  return _mm_load_si128(reinterpret_cast<const __m128i*>(tmp));
}

static inline uint32_t mask32(const uint8_t* m, int64_t c, int64_t in) {
  uint32_t v = 0;
  if (c + 32 <= in) {
    std::memcpy(&v, m + c / 8, 4);
    return v;
  }
  std::memcpy(&v, m + c / 8, size_t((in - c + 7) / 8));
  return _bzhi_u32(v, unsigned(in - c));
}

// 16 weights from two mask bytes, values from the stream at p.
static inline __m128i expand16(const int8_t* vals, int64_t& p, uint32_t bits16, int64_t len) {
  const uint32_t b0 = bits16 & 0xFF, b1 = bits16 >> 8;
  const uint64_t n0 = uint64_t(_mm_popcnt_u32(b0));
  const __m128i ctrl = _mm_set_epi64x(int64_t(kByteShuffles.ctrl[b1] + n0 * 0x0101010101010101ull),
                                      int64_t(kByteShuffles.ctrl[b0]));
  const __m128i w = _mm_shuffle_epi8(load16(vals, p, len), ctrl);
  p += int64_t(_mm_popcnt_u32(bits16));
  return w;
}

template <bool kMasked>
static inline __m256i weights(const int8_t* vals, int64_t& p, const uint8_t* m, int64_t c, int64_t in,
                              int64_t len) {
  if constexpr (kMasked) {
    const uint32_t k = mask32(m, c, in);
    _mm_prefetch(reinterpret_cast<const char*>(vals + p + kPrefetch), _MM_HINT_T0);
    const __m128i lo = expand16(vals, p, k & 0xFFFF, len);
    const __m128i hi = expand16(vals, p, k >> 16, len);
    return _mm256_set_m128i(hi, lo);
  } else {
    _mm_prefetch(reinterpret_cast<const char*>(vals + p + c + kPrefetch), _MM_HINT_T0);
    if (c + 32 <= in) return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(vals + p + c));
    alignas(32) int8_t tmp[32] = {};
    std::memcpy(tmp, vals + p + c, size_t(in - c));
    return _mm256_load_si256(reinterpret_cast<const __m256i*>(tmp));
  }
}

static inline int32_t hsum(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

static inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <int NB, bool kMasked>
static inline void row_tile(const LinearArgs& a, int64_t r, int64_t b0) {
  constexpr int U = NB >= 2 ? 1 : 2;
  const int8_t* vals = static_cast<const int8_t*>(a.values);
  const uint8_t* m = kMasked ? a.mask + r * a.mask_stride : nullptr;
  const int8_t* x = a.xq + b0 * a.x_stride;
  const int64_t xs = a.x_stride, in = a.in, len = a.values_len;
  const float* s = a.scales + r * a.n_groups;
  int64_t p = kMasked ? a.row_offsets[r] : r * in;
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i acc[U][NB];
  __m256 facc[NB];
  for (int i = 0; i < NB; ++i) facc[i] = _mm256_setzero_ps();
  for (int64_t g = 0; g < a.n_groups; ++g) {
    for (int u = 0; u < U; ++u)
      for (int i = 0; i < NB; ++i) acc[u][i] = _mm256_setzero_si256();
    const int64_t c1 = generic::imin(in, (g + 1) * a.group_size);
    int64_t c = g * a.group_size;
    auto step = [&](int u, int64_t cc) {
      const __m256i w = weights<kMasked>(vals, p, m, cc, in, len);
      for (int i = 0; i < NB; ++i) {
        const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + i * xs + cc));
        const __m256i prod = _mm256_maddubs_epi16(_mm256_abs_epi8(xv), _mm256_sign_epi8(w, xv));
        acc[u][i] = _mm256_add_epi32(acc[u][i], _mm256_madd_epi16(prod, ones));
      }
    };
    for (; c + 32 * U <= c1; c += 32 * U)
      for (int u = 0; u < U; ++u) step(u, c + 32 * u);
    for (; c < c1; c += 32) step(0, c);
    for (int u = 1; u < U; ++u)
      for (int i = 0; i < NB; ++i) acc[0][i] = _mm256_add_epi32(acc[0][i], acc[u][i]);
    if (a.n_groups == 1) {  // exact int32 dot, one scale
      const float bias = a.bias ? a.bias[r] : 0.f;
      for (int i = 0; i < NB; ++i)
        a.y[(b0 + i) * a.out + r] = float(hsum(acc[0][i])) * s[0] * a.sx[b0 + i] + bias;
      return;
    }
    const __m256 sg = _mm256_set1_ps(s[g]);
    for (int i = 0; i < NB; ++i) facc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[0][i]), sg, facc[i]);
  }
  const float bias = a.bias ? a.bias[r] : 0.f;
  for (int i = 0; i < NB; ++i) a.y[(b0 + i) * a.out + r] = hsum(facc[i]) * a.sx[b0 + i] + bias;
}

template <bool kMasked>
static void rows(const LinearArgs& a, int64_t r0, int64_t r1) {
  if (a.n_groups > 1 && a.group_size % 32 != 0) {
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

}  // namespace avx2
}  // namespace sp
