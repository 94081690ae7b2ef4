// AVX2 tree, float weights: 8 columns per mask byte; vpermd indices from a table
// place the stored values, a compare on the mask bits zeroes the dropped columns.
#include <immintrin.h>

#include "kernels/avx2/tree.h"
#include "kernels/avx2/tables.h"
#include "kernels/decl.h"
#include "kernels/generic.h"

namespace sp {
namespace SP_ISA_NS {
namespace {

constexpr int64_t kPrefetchBytes = 1024;

template <typename T>
static inline __m256 load8(const T* vals, int64_t p, int64_t len) {
  alignas(32) T tmp[8] = {};
  const T* src = vals + p;
  if (p + 8 > len) {
    if (len > p) std::memcpy(tmp, vals + p, size_t(len - p) * sizeof(T));
    src = tmp;
  }
  if constexpr (sizeof(T) == 4) {
    return _mm256_loadu_ps(reinterpret_cast<const float*>(src));
  } else {
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
  }
}

// 8 weights of columns [c, c+8) from mask byte b.
template <typename T>
static inline __m256 weights(const T* vals, int64_t& p, unsigned b, int64_t len) {
  _mm_prefetch(reinterpret_cast<const char*>(vals + p) + kPrefetchBytes, _MM_HINT_T0);
  const __m256i idx = _mm256_load_si256(reinterpret_cast<const __m256i*>(kLanePermutes.idx[b]));
  const __m256i bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  const __m256i keep = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(int(b)), bit), bit);
  const __m256 w = _mm256_permutevar8x32_ps(load8<T>(vals, p, len), idx);
  p += _mm_popcnt_u32(b);
  return _mm256_and_ps(w, _mm256_castsi256_ps(keep));
}

static inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <int NB, typename T>
static inline void row_tile(const LinearArgs& a, int64_t r, int64_t b0) {
  constexpr int U = NB >= 4 ? 1 : 4 / NB;
  const T* vals = static_cast<const T*>(a.values);
  const uint8_t* m = a.mask + r * a.mask_stride;
  const float* x = a.x + b0 * a.x_stride;
  const int64_t xs = a.x_stride;
  const int64_t in = a.in, len = a.values_len;
  int64_t p = a.row_offsets[r];
  __m256 acc[U][NB];
  for (int u = 0; u < U; ++u)
    for (int i = 0; i < NB; ++i) acc[u][i] = _mm256_setzero_ps();
  int64_t c = 0;
  for (; c + 8 * U <= in; c += 8 * U) {
    for (int u = 0; u < U; ++u) {
      const int64_t cu = c + 8 * u;
      const __m256 w = weights<T>(vals, p, m[cu / 8], len);
      for (int i = 0; i < NB; ++i) acc[u][i] = _mm256_fmadd_ps(_mm256_loadu_ps(x + i * xs + cu), w, acc[u][i]);
    }
  }
  for (; c < in; c += 8) {
    const unsigned b = m[c / 8] & ((1u << generic::imin(8, in - c)) - 1);
    const __m256 w = weights<T>(vals, p, b, len);
    for (int i = 0; i < NB; ++i) {
      alignas(32) float xt[8] = {};
      std::memcpy(xt, x + i * xs + c, size_t(generic::imin(8, in - c)) * 4);
      acc[0][i] = _mm256_fmadd_ps(_mm256_load_ps(xt), w, acc[0][i]);
    }
  }
  const float bias = a.bias ? a.bias[r] : 0.f;
  for (int i = 0; i < NB; ++i) {
    for (int u = 1; u < U; ++u) acc[0][i] = _mm256_add_ps(acc[0][i], acc[u][i]);
    a.y[(b0 + i) * a.out + r] = hsum(acc[0][i]) + bias;
  }
}

template <typename T>
static void rows(const LinearArgs& a, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    int64_t b = 0;
    for (; b + 8 <= a.batch; b += 8) row_tile<8, T>(a, r, b);
    if (a.batch - b >= 4) { row_tile<4, T>(a, r, b); b += 4; }
    if (a.batch - b >= 2) { row_tile<2, T>(a, r, b); b += 2; }
    if (a.batch - b >= 1) row_tile<1, T>(a, r, b);
  }
}

}  // namespace

void masked_f32(const LinearArgs& a, int64_t r0, int64_t r1) { rows<float>(a, r0, r1); }
void masked_bf16(const LinearArgs& a, int64_t r0, int64_t r1) { rows<uint16_t>(a, r0, r1); }
void csr_f32(const LinearArgs& a, int64_t r0, int64_t r1) { generic::csr_f32(a, r0, r1); }

}  // namespace SP_ISA_NS
}  // namespace sp
