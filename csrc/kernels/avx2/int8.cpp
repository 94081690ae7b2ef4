// AVX2 tree, int8 weights. No VNNI here: vpmaddubsw takes |xq| (u8) against
// sign(w, xq) (s8) so every pair sum stays below 2^15 (127 * 127 * 2), then vpmaddwd
// widens to int32. Masked rows place stored values with pshufb controls from a table.
#include <immintrin.h>

#include <cstdlib>

#define SP_ISA_NS avx2
#include "kernels/avx2/tables.h"
#include "kernels/decl.h"
#include "kernels/generic.h"
#include "kernels/scratch.h"

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
  const __m128i ctrl = _mm_set_epi64x(int64_t(kByteShuffles.ctrl[b1] + n0 * kOnes),
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
  // the value position stays a local (a lambda capturing it by reference kept it in memory: a
  // store-to-load round trip on the serial chain of every 16 columns)
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
    for (; c < c1; c += 32 * U) {
#pragma GCC unroll 2
      for (int u = 0; u < U; ++u) {
        const int64_t cc = c + 32 * u;
        if (U > 1 && cc >= c1) break;
        const __m256i w = weights<kMasked>(vals, p, m, cc, in, len);
#pragma GCC unroll 8
        for (int i = 0; i < NB; ++i) {
          const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + i * xs + cc));
          const __m256i prod = _mm256_maddubs_epi16(_mm256_abs_epi8(xv), _mm256_sign_epi8(w, xv));
          acc[u][i] = _mm256_add_epi32(acc[u][i], _mm256_madd_epi16(prod, ones));
        }
      }
    }
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

// ---------------------------------------------------------------------------------------------
// Batch 1, masked, one scale per row. The mask bits are the cost here, not the bytes: without
// vpexpandb each mask byte needs its own pshufb control from the table (kByteShuffles), so the step
// is built for the fewest micro-ops per 32 columns: the four mask bytes of a step are read
// straight from memory (movzx, no shifts), their controls and popcounts are independent of the
// value position, the position chain is one add per step, the controls of the upper 8 columns of
// each 16-column lane take their offset from a table of multiples, and |x| comes from a copy made
// once per call (absx), not recomputed per row. Two steps per iteration with independent sums.
// Needs 32 readable bytes past the row's values (checked per row by the caller).
static inline __m256i expand32(const int8_t* v, int64_t p, const uint8_t* mb, int64_t& adv) {
  const uint32_t b0 = mb[0], b1 = mb[1], b2 = mb[2], b3 = mb[3];
  uint16_t lo16;
  std::memcpy(&lo16, mb, 2);
  const int64_t n01 = _mm_popcnt_u32(lo16);
  // the upper byte's control shifted by the lower byte's count
  const uint64_t c1 = kByteShuffles.ctrl[b1] + uint64_t(_mm_popcnt_u32(b0)) * kOnes;
  const uint64_t c3 = kByteShuffles.ctrl[b3] + uint64_t(_mm_popcnt_u32(b2)) * kOnes;
  const __m128i c_lo = _mm_insert_epi64(_mm_cvtsi64_si128(int64_t(kByteShuffles.ctrl[b0])), int64_t(c1), 1);
  const __m128i c_hi = _mm_insert_epi64(_mm_cvtsi64_si128(int64_t(kByteShuffles.ctrl[b2])), int64_t(c3), 1);
  const __m256i vals = _mm256_loadu2_m128i(reinterpret_cast<const __m128i*>(v + p + n01),
                                           reinterpret_cast<const __m128i*>(v + p));
  adv = n01 + _mm_popcnt_u32(b2 | (b3 << 8));
  return _mm256_shuffle_epi8(vals, _mm256_set_m128i(c_hi, c_lo));
}

constexpr int64_t kPrefetch1 = 1024;

// (not inlined: in the caller's register allocation its loop state went to the stack)
__attribute__((noinline)) static void row1_masked(const LinearArgs& a, const uint8_t* absx, int64_t r) {
  const int8_t* v = static_cast<const int8_t*>(a.values) + a.row_offsets[r];
  const uint8_t* m = a.mask + r * a.mask_stride;
  const int8_t* x = a.xq;
  const int64_t n32 = a.in / 32;
  const __m256i ones = _mm256_set1_epi16(1);
  // one sum: the steps' products are independent, only the vpaddd chain (1 cycle) is serial
  __m256i acc = _mm256_setzero_si256();
  int64_t p = 0;
  auto dot = [&](__m256i w, int64_t c) {
    const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + c));
    const __m256i xa = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(absx + c));
    acc = _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(xa, _mm256_sign_epi8(w, xv)), ones));
  };
  int64_t q = 0;
  for (; q + 2 <= n32; q += 2) {  // a step uses at most 32 value bytes: one prefetch per two
    _mm_prefetch(reinterpret_cast<const char*>(v + p + kPrefetch1), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(m + 4 * q + kPrefetch1), _MM_HINT_T0);
    int64_t adv;
    const __m256i w0 = expand32(v, p, m + 4 * q, adv);
    p += adv;
    dot(w0, 32 * q);
    const __m256i w1 = expand32(v, p, m + 4 * q + 4, adv);
    p += adv;
    dot(w1, 32 * q + 32);
  }
  for (; q < n32; ++q) {
    int64_t adv;
    const __m256i w = expand32(v, p, m + 4 * q, adv);
    p += adv;
    dot(w, 32 * q);
  }
  if (n32 * 32 < a.in) {  // x_stride >= in rounded up to 64: padding xq = 0 meets w = 0
    const uint32_t k = mask32(m, n32 * 32, a.in);
    uint8_t mb[4];
    std::memcpy(mb, &k, 4);
    int64_t adv;
    dot(expand32(v, p, mb, adv), 32 * n32);
  }
  const float bias = a.bias ? a.bias[r] : 0.f;
  a.y[r] = float(hsum(acc)) * a.scales[r] * a.sx[0] + bias;
}

thread_local Scratch tl_absx;  // |xq| of the current batch-1 call

// Token 0 of rows [r0, r1), masked: row1_masked where it may read 32 bytes past the row's values.
static inline void rows1_masked(const LinearArgs& a, int64_t r0, int64_t r1) {
  uint8_t* absx = reinterpret_cast<uint8_t*>(tl_absx.get(size_t(a.x_stride)));
  if (!absx) {
    for (int64_t r = r0; r < r1; ++r) row_tile<1, true>(a, r, 0);
    return;
  }
  for (int64_t c = 0; c + 32 <= a.x_stride; c += 32)
    _mm256_store_si256(reinterpret_cast<__m256i*>(absx + c),
                       _mm256_abs_epi8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.xq + c))));
  for (int64_t r = r0; r < r1; ++r) {
    if (a.row_offsets[r + 1] + 32 <= a.values_len) row1_masked(a, absx, r);
    else row_tile<1, true>(a, r, 0);
  }
}

template <bool kMasked>
static void rows(const LinearArgs& a, int64_t r0, int64_t r1) {
  if (a.n_groups > 1 && a.group_size % 32 != 0) {
    if (kMasked) generic::masked_i8(a, r0, r1); else generic::dense_i8(a, r0, r1);
    return;
  }
  if constexpr (kMasked) {
    if (a.batch == 1 && a.n_groups == 1 && a.xq) {
      rows1_masked(a, r0, r1);
      return;
    }
  }
  for (int64_t r = r0; r < r1; ++r) {
    int64_t b = 0;
    for (; b + 8 <= a.batch; b += 8) row_tile<8, kMasked>(a, r, b);
    if (a.batch - b >= 4) { row_tile<4, kMasked>(a, r, b); b += 4; }
    if (a.batch - b >= 2) { row_tile<2, kMasked>(a, r, b); b += 2; }
    if (a.batch - b >= 1) row_tile<1, kMasked>(a, r, b);
  }
}

// ---------------------------------------------------------------------------------------------
// GEMM for many tokens. vpmaddubsw would saturate on u8 x s8 pairs (255 * 127 * 2 > 2^15) and the
// sign trick costs an extra op per product, so this path widens both sides to int16 and uses
// vpmaddwd (exact, signed, no rowsum correction): per tile of 16 output rows the packed weights
// are expanded once into a panel buf[k2][16 rows][2 x int16] (one ymm = 8 rows x 2 k), and the
// micro-kernel broadcasts a pair of int16 activations (a.xw) per token.

thread_local Scratch tl_panel;  // per-thread panel buffer

constexpr int kTile = 16;  // output rows per panel

// 8 x 8 dword transpose.
static inline void transpose8(__m256i v[8]) {
  __m256i t[8], u[8];
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_epi32(v[2 * i], v[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_epi32(v[2 * i], v[2 * i + 1]);
  }
  for (int g = 0; g < 2; ++g) {
    u[4 * g + 0] = _mm256_unpacklo_epi64(t[4 * g], t[4 * g + 2]);
    u[4 * g + 1] = _mm256_unpackhi_epi64(t[4 * g], t[4 * g + 2]);
    u[4 * g + 2] = _mm256_unpacklo_epi64(t[4 * g + 1], t[4 * g + 3]);
    u[4 * g + 3] = _mm256_unpackhi_epi64(t[4 * g + 1], t[4 * g + 3]);
  }
  for (int j = 0; j < 4; ++j) {
    v[j] = _mm256_permute2x128_si256(u[j], u[4 + j], 0x20);
    v[4 + j] = _mm256_permute2x128_si256(u[j], u[4 + j], 0x31);
  }
}

// Panel of rows [n0, n0 + nr), nr <= 16, columns [0, kpad) (kpad a multiple of 32).
// rowbuf: [16][kpad] int8 scratch; buf: [kpad / 2][16][2] int16.
template <bool kMasked>
static void pack_panel(const LinearArgs& a, int64_t n0, int nr, int64_t kpad, int8_t* rowbuf, int16_t* buf) {
  const int8_t* vals = static_cast<const int8_t*>(a.values);
  const int64_t in = a.in, len = a.values_len;
  for (int i = 0; i < kTile; ++i) {
    int8_t* dst = rowbuf + i * kpad;
    if (i >= nr) {
      std::memset(dst, 0, size_t(kpad));
      continue;
    }
    const int64_t r = n0 + i;
    int64_t p = kMasked ? a.row_offsets[r] : r * in;
    const uint8_t* m = kMasked ? a.mask + r * a.mask_stride : nullptr;
    for (int64_t c = 0; c < kpad; c += 32)
      _mm256_store_si256(reinterpret_cast<__m256i*>(dst + c), weights<kMasked>(vals, p, m, c, in, len));
  }
  for (int64_t c = 0; c < kpad; c += 16) {  // 16 columns = 8 k-pairs
    for (int h = 0; h < 2; ++h) {
      __m256i v[8];
      for (int i = 0; i < 8; ++i)
        v[i] = _mm256_cvtepi8_epi16(_mm_load_si128(reinterpret_cast<const __m128i*>(rowbuf + (8 * h + i) * kpad + c)));
      transpose8(v);  // v[t]: pair c/2 + t of rows 8h .. 8h+7
      int16_t* dst = buf + (c / 2) * (kTile * 2) + h * 16;
      for (int t = 0; t < 8; ++t) _mm256_store_si256(reinterpret_cast<__m256i*>(dst + t * kTile * 2), v[t]);
    }
  }
}

template <int MR>
static inline void micro(const LinearArgs& a, const int16_t* buf, int64_t k2n, int64_t m0, int64_t n0, int nr) {
  __m256i acc[MR][2];
  for (int i = 0; i < MR; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_si256();
  const int16_t* x = a.xw + m0 * a.x_stride;
  const int64_t xs = a.x_stride;
  for (int64_t k = 0; k < k2n; ++k) {
    const __m256i w0 = _mm256_load_si256(reinterpret_cast<const __m256i*>(buf + k * 32));
    const __m256i w1 = _mm256_load_si256(reinterpret_cast<const __m256i*>(buf + k * 32 + 16));
    for (int i = 0; i < MR; ++i) {
      int32_t xv;
      std::memcpy(&xv, x + i * xs + 2 * k, 4);
      const __m256i xb = _mm256_set1_epi32(xv);
      acc[i][0] = _mm256_add_epi32(acc[i][0], _mm256_madd_epi16(xb, w0));
      acc[i][1] = _mm256_add_epi32(acc[i][1], _mm256_madd_epi16(xb, w1));
    }
  }
  alignas(32) float s[16] = {}, bias[16] = {};
  for (int n = 0; n < nr; ++n) {
    s[n] = a.scales[n0 + n];
    bias[n] = a.bias ? a.bias[n0 + n] : 0.f;
  }
  for (int i = 0; i < MR; ++i) {
    alignas(32) float out[16];
    const __m256 sx = _mm256_set1_ps(a.sx[m0 + i]);
    for (int j = 0; j < 2; ++j) {
      const __m256 f = _mm256_cvtepi32_ps(acc[i][j]);
      const __m256 v = _mm256_add_ps(_mm256_mul_ps(_mm256_mul_ps(f, _mm256_load_ps(s + 8 * j)), sx),
                                     _mm256_load_ps(bias + 8 * j));
      _mm256_store_ps(out + 8 * j, v);
    }
    float* y = a.y + (m0 + i) * a.out + n0;
    if (nr == kTile) {
      _mm256_storeu_ps(y, _mm256_load_ps(out));
      _mm256_storeu_ps(y + 8, _mm256_load_ps(out + 8));
    } else {
      for (int n = 0; n < nr; ++n) y[n] = out[n];
    }
  }
}

constexpr int kMR = 4;

template <bool kMasked>
static void gemm(const LinearArgs& a, int64_t r0, int64_t r1) {
  const int64_t kpad = (a.in + 31) / 32 * 32;
  int8_t* scratch = a.n_groups == 1 && a.xw ? tl_panel.get(size_t(kpad * kTile * 3)) : nullptr;
  if (!scratch) {
    rows<kMasked>(a, r0, r1);
    return;
  }
  int8_t* rowbuf = scratch;
  int16_t* buf = reinterpret_cast<int16_t*>(scratch + kpad * kTile);
  const int64_t mc = generic::imin(a.batch, ((int64_t(256) << 10) / (2 * a.x_stride) / kMR + 1) * kMR);
  for (int64_t m0 = 0; m0 < a.batch; m0 += mc) {
    const int64_t m1 = generic::imin(a.batch, m0 + mc);
    for (int64_t n0 = r0; n0 < r1; n0 += kTile) {
      const int nr = int(generic::imin(kTile, r1 - n0));
      pack_panel<kMasked>(a, n0, nr, kpad, rowbuf, buf);
      int64_t m = m0;
      for (; m + kMR <= m1; m += kMR) micro<kMR>(a, buf, kpad / 2, m, n0, nr);
      switch (m1 - m) {
        case 3: micro<3>(a, buf, kpad / 2, m, n0, nr); break;
        case 2: micro<2>(a, buf, kpad / 2, m, n0, nr); break;
        case 1: micro<1>(a, buf, kpad / 2, m, n0, nr); break;
        default: break;
      }
    }
  }
}

}  // namespace

void masked_i8(const LinearArgs& a, int64_t r0, int64_t r1) { rows<true>(a, r0, r1); }
void dense_i8(const LinearArgs& a, int64_t r0, int64_t r1) { rows<false>(a, r0, r1); }
void csr_i8(const LinearArgs& a, int64_t r0, int64_t r1) { generic::csr_i8(a, r0, r1); }
void masked_gemm_i8(const LinearArgs& a, int64_t r0, int64_t r1) { gemm<true>(a, r0, r1); }
void dense_gemm_i8(const LinearArgs& a, int64_t r0, int64_t r1) { gemm<false>(a, r0, r1); }

void quantize(const float* x, int64_t b0, int64_t b1, int64_t in, int64_t stride, int8_t* xq, uint8_t* xu,
              float* sx) {
  const __m256 lim = _mm256_set1_ps(127.f), nlim = _mm256_set1_ps(-127.f);
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  const __m128i flip = _mm_set1_epi8(char(0x80));
  const int64_t in8 = in / 8 * 8;
  for (int64_t b = b0; b < b1; ++b) {
    const float* row = x + b * in;
    __m256 mx = _mm256_setzero_ps();
    for (int64_t j = 0; j < in8; j += 8) mx = _mm256_max_ps(mx, _mm256_and_ps(_mm256_loadu_ps(row + j), absmask));
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, mx);
    float amax = 0.f;
    for (int i = 0; i < 8; ++i) amax = lanes[i] > amax ? lanes[i] : amax;
    for (int64_t j = in8; j < in; ++j) {
      const float v = __builtin_fabsf(row[j]);
      amax = v > amax ? v : amax;
    }
    const float s = amax == 0.f ? 1.f : amax / 127.f;
    sx[b] = s;
    const __m256 sv = _mm256_set1_ps(s);
    int8_t* q = xq + b * stride;
    uint8_t* u = xu + b * stride;
    for (int64_t j = 0; j < in8; j += 8) {
      __m256 v = _mm256_div_ps(_mm256_loadu_ps(row + j), sv);  // division: rounds like torch
      v = _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      v = _mm256_min_ps(lim, _mm256_max_ps(nlim, v));
      const __m256i qi = _mm256_cvtps_epi32(v);
      const __m128i w16 = _mm_packs_epi32(_mm256_castsi256_si128(qi), _mm256_extracti128_si256(qi, 1));
      const __m128i b8 = _mm_packs_epi16(w16, w16);
      _mm_storel_epi64(reinterpret_cast<__m128i*>(q + j), b8);
      _mm_storel_epi64(reinterpret_cast<__m128i*>(u + j), _mm_xor_si128(b8, flip));
    }
    generic::quantize_row_from(row, s, in8, in, stride, q, u);
  }
}


}  // namespace avx2
}  // namespace sp
