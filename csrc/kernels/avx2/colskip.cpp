// AVX2 trees, column skipping (layout in csrc/colskip.h). Four listed columns at a time, each 64-row
// block as two 32-row halves: per half and column, four products of the u8 weights with the token's
// activation byte in one byte of each lane add into four accumulators of 8 rows. With AVX-VNNI
// (avx2vnni) a product is one vpdpbusd; without, vpmaddubsw then vpmaddwd by 1 (no saturation: the
// lane's other three bytes meet zeros, and 255 * 127 < 2^15). Sparse chunks expand each mask byte's
// values with a pshufb control from kByteShuffles, then flip sign bits to get w + 128.
#include <immintrin.h>

#include "kernels/avx2/tree.h"
#include "kernels/byte_shuffles.h"
#include "kernels/colskip_generic.h"

namespace sp {
namespace SP_ISA_NS {
namespace {

constexpr int64_t kAhead = 512;  // bytes ahead of each chunk's read position to prefetch

static inline __m256i mul_add(__m256i acc, __m256i w, __m256i x) {
#if SP_AVX2_VNNI
#if defined(__AVXVNNI__)
  return _mm256_dpbusd_avx_epi32(acc, w, x);
#else
  return _mm256_dpbusd_epi32(acc, w, x);
#endif
#else
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), _mm256_set1_epi16(1)));
#endif
}

// 32 positions of a sparse block: mask bytes mb[0..3], their values from v; u8 = w + 128.
static inline __m256i expand32(const uint8_t* v, uint32_t bits) {
  const uint32_t b0 = bits & 0xFF, b1 = (bits >> 8) & 0xFF, b2 = (bits >> 16) & 0xFF, b3 = bits >> 24;
  const int64_t n01 = _mm_popcnt_u32(bits & 0xFFFF);
  const uint64_t c1 = kByteShuffles.ctrl[b1] + uint64_t(_mm_popcnt_u32(b0)) * kOnes;
  const uint64_t c3 = kByteShuffles.ctrl[b3] + uint64_t(_mm_popcnt_u32(b2)) * kOnes;
  const __m128i c_lo = _mm_insert_epi64(_mm_cvtsi64_si128(int64_t(kByteShuffles.ctrl[b0])), int64_t(c1), 1);
  const __m128i c_hi = _mm_insert_epi64(_mm_cvtsi64_si128(int64_t(kByteShuffles.ctrl[b2])), int64_t(c3), 1);
  const __m256i vals = _mm256_loadu2_m128i(reinterpret_cast<const __m128i*>(v + n01),
                                           reinterpret_cast<const __m128i*>(v));
  return _mm256_xor_si256(_mm256_shuffle_epi8(vals, _mm256_set_m128i(c_hi, c_lo)), _mm256_set1_epi8(char(0x80)));
}

// The two 32-position halves of the block at p; advances p past it.
template <bool kSparse>
static inline void load_block(const uint8_t*& p, __m256i& lo, __m256i& hi) {
  if constexpr (kSparse) {
    uint64_t m;
    std::memcpy(&m, p, 8);
    const uint32_t m_lo = uint32_t(m), m_hi = uint32_t(m >> 32);
    lo = expand32(p + 8, m_lo);
    hi = expand32(p + 8 + _mm_popcnt_u32(m_lo), m_hi);
    p += 8 + _mm_popcnt_u64(m);
  } else {
    lo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    hi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32));
    p += kColBlock;
  }
}

// Listed columns j .. j + NC - 1 into acc; NB tokens (0: c.batch, known at run time).
template <bool kSparse, int NC, int NB>
static void add_group(const ColSkipArgs& c, int64_t j, int32_t* acc) {
  const int64_t batch = NB ? NB : c.batch, blocks = c.out_pad / kColBlock;
  const uint8_t* p[NC];
  for (int n = 0; n < NC; ++n) p[n] = c.data + c.col_off[c.cols[j + n]];
  alignas(32) uint32_t xk[kColSkipMaxBatch * NC * 4];  // as in the AVX-512 tree
  for (int64_t b = 0; b < batch; ++b)
    for (int n = 0; n < NC; ++n)
      for (int k = 0; k < 4; ++k) xk[(b * NC + n) * 4 + k] = uint32_t(c.xv[(j + n) * c.batch + b]) << (8 * k);
  for (int64_t blk = 0; blk < blocks; ++blk) {
    __m256i w[2][NC];
    for (int n = 0; n < NC; ++n) {
      _mm_prefetch(reinterpret_cast<const char*>(p[n] + kAhead), _MM_HINT_T0);
      load_block<kSparse>(p[n], w[0][n], w[1][n]);
    }
    for (int64_t b = 0; b < batch; ++b) {
      int32_t* a = acc + b * c.out_pad + blk * kColBlock;
      const uint32_t* x = xk + b * NC * 4;
      for (int h = 0; h < 2; ++h) {  // half h: rows 16k + 8h + i
        __m256i s[4];
        for (int k = 0; k < 4; ++k) s[k] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + 16 * k + 8 * h));
        for (int n = 0; n < NC; ++n)
          for (int k = 0; k < 4; ++k) s[k] = mul_add(s[k], w[h][n], _mm256_set1_epi32(int(x[n * 4 + k])));
        for (int k = 0; k < 4; ++k) _mm256_storeu_si256(reinterpret_cast<__m256i*>(a + 16 * k + 8 * h), s[k]);
      }
    }
  }
}

template <bool kSparse, int NB>
static void add_columns_t(const ColSkipArgs& c, int64_t j0, int64_t j1, int32_t* acc) {
  int64_t j = j0;
  for (; j + 4 <= j1; j += 4) add_group<kSparse, 4, NB>(c, j, acc);
  for (; j < j1; ++j) add_group<kSparse, 1, NB>(c, j, acc);
}

static void add_columns(const ColSkipArgs& c, int64_t j0, int64_t j1, int32_t* acc) {
  if (c.batch == 1)
    c.sparse ? add_columns_t<true, 1>(c, j0, j1, acc) : add_columns_t<false, 1>(c, j0, j1, acc);
  else
    c.sparse ? add_columns_t<true, 0>(c, j0, j1, acc) : add_columns_t<false, 0>(c, j0, j1, acc);
}

static void accumulate(const ColSkipArgs& c, int64_t j0, int64_t j1, int32_t* acc, float* facc) {
  colgeneric::for_group_runs(
      c, j0, j1, [&](int64_t a, int64_t b) { add_columns(c, a, b, acc); },
      [&](int64_t g, int64_t a, int64_t b) { colgeneric::flush_group(c, g, a, b, acc, facc); });
}

}  // namespace

// Densities (listed columns / in) up to which skipping beats the row kernels, by token count
// (index 0 unused): where the ratio row kernels / skipping of benchmarks/activation_kernels.py
// --crossover crosses ~1.05 on a 4096 x 4096 int8 layer (the AVX2 tree on AMD EPYC Zen 4, 2 threads,
// 2026-12-07); from 2 tokens on dense weights it does not pay at 30% listed columns.
const ColSkipKernels& colskip() {
  static const ColSkipKernels k = {accumulate, colgeneric::finish,
                                   {0.f, 0.48f, 0.25f, 0.25f, 0.2f, 0.2f, 0.2f, 0.2f, 0.2f},
                                   {0.f, 0.33f, 0.3f, 0.25f, 0.2f, 0.2f, 0.2f, 0.2f, 0.2f}};
  return k;
}

}  // namespace SP_ISA_NS
}  // namespace sp
