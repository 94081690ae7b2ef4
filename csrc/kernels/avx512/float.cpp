// AVX-512 tree, float weights: 16 columns per step, stored values expanded into
// their columns (vexpandps; bf16 bits via vpexpandw, then widened to fp32).
#include <immintrin.h>

#define SP_ISA_NS avx512
#include "kernels/decl.h"
#include "kernels/generic.h"

namespace sp {
namespace avx512 {
namespace {

constexpr int64_t kPrefetchBytes = 1024;

static inline uint32_t mask16(const uint8_t* m, int64_t c, int64_t in) {
  uint16_t v = 0;
  if (c + 16 <= in) {
    std::memcpy(&v, m + c / 8, 2);
    return v;
  }
  std::memcpy(&v, m + c / 8, size_t((in - c + 7) / 8));
  return _bzhi_u32(v, unsigned(in - c));
}

static inline __mmask16 tail16(int64_t n) { return n >= 16 ? 0xFFFF : __mmask16(_bzhi_u32(0xFFFF, unsigned(n))); }

// 16 weights of columns [c, c+16), expanded from the stream at p.
template <typename T>
static inline __m512 weights(const T* vals, int64_t& p, uint32_t k, int64_t len) {
  _mm_prefetch(reinterpret_cast<const char*>(vals + p) + kPrefetchBytes, _MM_HINT_T0);
  const __mmask16 avail = p + 16 <= len ? __mmask16(0xFFFF) : tail16(len - p > 0 ? len - p : 0);
  __m512 w;
  if constexpr (sizeof(T) == 4) {
    w = _mm512_maskz_expand_ps(__mmask16(k), _mm512_maskz_loadu_ps(avail, vals + p));
  } else {
    const __m256i raw = _mm256_maskz_loadu_epi16(avail, vals + p);
    const __m256i e = _mm256_maskz_expand_epi16(__mmask16(k), raw);
    w = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(e), 16));
  }
  p += _mm_popcnt_u32(k);
  return w;
}

template <int NB, typename T>
static inline void row_tile(const LinearArgs& a, int64_t r, int64_t b0) {
  constexpr int U = NB >= 4 ? 1 : 4 / NB;  // independent FMA chains for small batches
  const T* vals = static_cast<const T*>(a.values);
  const uint8_t* m = a.mask + r * a.mask_stride;
  const float* x = a.x + b0 * a.x_stride;
  const int64_t xs = a.x_stride;
  const int64_t in = a.in, len = a.values_len;
  int64_t p = a.row_offsets[r];
  __m512 acc[U][NB];
  for (int u = 0; u < U; ++u)
    for (int i = 0; i < NB; ++i) acc[u][i] = _mm512_setzero_ps();
  int64_t c = 0;
  for (; c + 16 * U <= in; c += 16 * U) {
    for (int u = 0; u < U; ++u) {
      const int64_t cu = c + 16 * u;
      const __m512 w = weights<T>(vals, p, mask16(m, cu, in), len);
      for (int i = 0; i < NB; ++i) acc[u][i] = _mm512_fmadd_ps(_mm512_loadu_ps(x + i * xs + cu), w, acc[u][i]);
    }
  }
  for (; c < in; c += 16) {
    const __m512 w = weights<T>(vals, p, mask16(m, c, in), len);
    const __mmask16 xm = tail16(in - c);
    for (int i = 0; i < NB; ++i)
      acc[0][i] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(xm, x + i * xs + c), w, acc[0][i]);
  }
  const float bias = a.bias ? a.bias[r] : 0.f;
  for (int i = 0; i < NB; ++i) {
    for (int u = 1; u < U; ++u) acc[0][i] = _mm512_add_ps(acc[0][i], acc[u][i]);
    a.y[(b0 + i) * a.out + r] = _mm512_reduce_add_ps(acc[0][i]) + bias;
  }
}

template <typename T>
static void rows(const LinearArgs& a, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    int64_t b = 0;
    for (; b + 16 <= a.batch; b += 16) row_tile<16, T>(a, r, b);
    if (a.batch - b >= 8) { row_tile<8, T>(a, r, b); b += 8; }
    if (a.batch - b >= 4) { row_tile<4, T>(a, r, b); b += 4; }
    if (a.batch - b >= 2) { row_tile<2, T>(a, r, b); b += 2; }
    if (a.batch - b >= 1) row_tile<1, T>(a, r, b);
  }
}

}  // namespace

void masked_f32(const LinearArgs& a, int64_t r0, int64_t r1) { rows<float>(a, r0, r1); }
void masked_bf16(const LinearArgs& a, int64_t r0, int64_t r1) { rows<uint16_t>(a, r0, r1); }
void csr_f32(const LinearArgs& a, int64_t r0, int64_t r1) { generic::csr_f32(a, r0, r1); }

}  // namespace avx512
}  // namespace sp
