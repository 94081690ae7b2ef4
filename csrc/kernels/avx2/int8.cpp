// AVX2 tree, int8 weights. No VNNI here: vpmaddubsw takes one side's magnitude (u8) against the
// other carrying both signs (psignb, s8), so every pair sum stays below 2^15 (127 * 127 * 2), then
// vpmaddwd widens to int32. Masked rows place stored values with pshufb controls from a table; many
// tokens run on quad panels (below).
#include <immintrin.h>

#include <cstdlib>

#include "kernels/avx2/tree.h"
#include "kernels/avx2/tables.h"
#include "kernels/decl.h"
#include "kernels/generic.h"
#include "kernels/scratch.h"

namespace sp {
namespace SP_ISA_NS {
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

#if SP_AVX2_VNNI
// acc + the u8 x s8 dot products of four bytes per lane (vpdpbusd: exact in int32, no saturation)
static inline __m256i dpbusd(__m256i acc, __m256i u, __m256i s) {
#if defined(__AVXVNNI__)
  return _mm256_dpbusd_avx_epi32(acc, u, s);
#else
  return _mm256_dpbusd_epi32(acc, u, s);
#endif
}
#endif

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

// A 32-column step's weights when every mask byte keeps four (2:4, 4:8): the step's 16 values sit at a
// fixed place, so no bit counts: one 16-byte load broadcast to both lanes, four controls read
// ready-made (kFourShuffles: byte k's values start 4k in), one pshufb.
static inline __m256i expand32_four(const int8_t* v16, const uint8_t* mb) {
  auto lane = [](const uint64_t* lower, const uint64_t* upper) {
    const __m128d c = _mm_castsi128_pd(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(lower)));
    return _mm_castpd_si128(_mm_loadh_pd(c, reinterpret_cast<const double*>(upper)));
  };
  const __m128i c_lo = lane(&kFourShuffles.ctrl[0][mb[0]], &kFourShuffles.ctrl[1][mb[1]]);
  const __m128i c_hi = lane(&kFourShuffles.ctrl[2][mb[2]], &kFourShuffles.ctrl[3][mb[3]]);
  const __m256i vals = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(v16)));
  return _mm256_shuffle_epi8(vals, _mm256_set_m128i(c_hi, c_lo));
}

// NB tokens (b0 ..) of row r, masked, one scale per row: each 32-column step is decoded once (expand32,
// or expand32_four where every mask byte keeps four) and multiplied into NB sums; one token keeps two
// sums (the steps' products are independent, only the vpaddd chain is serial). absx: |xq| of the call's
// tokens, copied once per call (non-VNNI). Needs 32 readable bytes past the row's values.
// (not inlined: in the caller's register allocation its loop state went to the stack)
template <int NB, bool kFour>
__attribute__((noinline)) static void row_masked_steps(const LinearArgs& a, const uint8_t* absx, int64_t r,
                                                       int64_t b0) {
  constexpr int S = NB == 1 ? 2 : 1;  // sums per token
  const int8_t* v = static_cast<const int8_t*>(a.values) + a.row_offsets[r];
  const uint8_t* m = a.mask + r * a.mask_stride;
  const int64_t xs = a.x_stride, n32 = a.in / 32;
  [[maybe_unused]] const int8_t* x = a.xq + b0 * xs;
  [[maybe_unused]] const uint8_t* xa = absx ? absx + b0 * xs : nullptr;
  [[maybe_unused]] const uint8_t* xu = a.xu + b0 * xs;
  [[maybe_unused]] const __m256i ones = _mm256_set1_epi16(1);
  __m256i acc[S][NB];
  for (int k = 0; k < S; ++k)
    for (int i = 0; i < NB; ++i) acc[k][i] = _mm256_setzero_si256();
  auto dot = [&](__m256i w, int64_t c, int k) {
#pragma GCC unroll 8
    for (int i = 0; i < NB; ++i) {
#if SP_AVX2_VNNI  // xu = xq + 128 against w; the surplus 128 * rowsum comes off at the end
      acc[k][i] = dpbusd(acc[k][i], _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xu + i * xs + c)), w);
#else
      const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + i * xs + c));
      const __m256i av = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xa + i * xs + c));
      acc[k][i] = _mm256_add_epi32(acc[k][i], _mm256_madd_epi16(_mm256_maddubs_epi16(av, _mm256_sign_epi8(w, xv)), ones));
#endif
    }
  };
  int64_t p = 0;  // the value position stays a local: one add per step on the serial chain
  auto step = [&](int64_t q) {
    if constexpr (kFour) {
      return expand32_four(v + 16 * q, m + 4 * q);
    } else {
      int64_t adv;
      const __m256i w = expand32(v, p, m + 4 * q, adv);
      p += adv;
      return w;
    }
  };
  int64_t q = 0;
  for (; q + 2 <= n32; q += 2) {  // a step uses at most 32 value bytes: one prefetch per two
    _mm_prefetch(reinterpret_cast<const char*>(v + (kFour ? 16 * q : p) + kPrefetch1), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(m + 4 * q + kPrefetch1), _MM_HINT_T0);
    dot(step(q), 32 * q, 0);
    dot(step(q + 1), 32 * q + 32, S - 1);
  }
  if (q < n32) {
    dot(step(q), 32 * q, 0);
    ++q;
  }
  if (n32 * 32 < a.in) {  // x_stride >= in rounded up to 64: padding xq = 0 meets w = 0
    const uint32_t k = mask32(m, n32 * 32, a.in);
    uint8_t mb[4];
    std::memcpy(mb, &k, 4);
    int64_t adv;
    dot(expand32(v, kFour ? 16 * n32 : p, mb, adv), 32 * n32, 0);
  }
  const float bias = a.bias ? a.bias[r] : 0.f;
  const int32_t surplus = SP_AVX2_VNNI ? 128 * a.rowsum[r] : 0;
  for (int i = 0; i < NB; ++i) {
    const __m256i sum = S == 2 ? _mm256_add_epi32(acc[0][i], acc[S - 1][i]) : acc[0][i];
    a.y[(b0 + i) * a.out + r] = float(hsum(sum) - surplus) * a.scales[r] * a.sx[b0 + i] + bias;
  }
}

template <int NB>
static inline void row_masked_nb(const LinearArgs& a, const uint8_t* absx, int64_t r, int64_t b0) {
  if (a.four_per_byte) row_masked_steps<NB, true>(a, absx, r, b0);
  else row_masked_steps<NB, false>(a, absx, r, b0);
}

thread_local Scratch tl_absx;  // |xq| of the current call's tokens

// Tokens of rows [r0, r1), masked, one scale per row, few tokens: the decoded steps shared by up to 8
// tokens at a time, where a row may read 32 bytes past its values (else the general tiles).
static void rows_masked_few(const LinearArgs& a, int64_t r0, int64_t r1) {
  const size_t need = size_t(a.batch * a.x_stride);
  uint8_t* absx = SP_AVX2_VNNI ? nullptr : reinterpret_cast<uint8_t*>(tl_absx.get(need));
  if (!absx && !SP_AVX2_VNNI) {
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t b = 0; b < a.batch; ++b) row_tile<1, true>(a, r, b);
    return;
  }
  for (int64_t c = 0; absx && c + 32 <= int64_t(need); c += 32)
    _mm256_store_si256(reinterpret_cast<__m256i*>(absx + c),
                       _mm256_abs_epi8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.xq + c))));
  for (int64_t r = r0; r < r1; ++r) {
    if (a.row_offsets[r + 1] + 32 > a.values_len) {
      for (int64_t b = 0; b < a.batch; ++b) row_tile<1, true>(a, r, b);
      continue;
    }
    int64_t b = 0;
    for (; b + 8 <= a.batch; b += 8) row_masked_nb<8>(a, absx, r, b);
    if (a.batch - b >= 4) { row_masked_nb<4>(a, absx, r, b); b += 4; }
    if (a.batch - b >= 2) { row_masked_nb<2>(a, absx, r, b); b += 2; }
    if (a.batch - b >= 1) row_masked_nb<1>(a, absx, r, b);
  }
}

thread_local Scratch tl_x16;  // int16 copies of the call's tokens (gather rows)

// The eight activations of one gather record, as int16 lanes: scalar loads inserted into two halves
// (two short dependency chains). (vpgatherdd was tried: on Zen 4 it took twice as long per record,
// ~12 cycles against ~6, and Intel's Gather Data Sampling mitigation slows it further.)
static inline __m128i gather8(const int16_t* xb, const uint8_t* q) {
  __m128i lo = _mm_cvtsi32_si128(uint16_t(xb[q[0]]));
  __m128i hi = _mm_cvtsi32_si128(uint16_t(xb[q[4]]));
  lo = _mm_insert_epi16(lo, xb[q[1]], 1);
  hi = _mm_insert_epi16(hi, xb[q[5]], 1);
  lo = _mm_insert_epi16(lo, xb[q[2]], 2);
  hi = _mm_insert_epi16(hi, xb[q[6]], 2);
  lo = _mm_insert_epi16(lo, xb[q[3]], 3);
  hi = _mm_insert_epi16(hi, xb[q[7]], 3);
  return _mm_unpacklo_epi64(lo, hi);
}

// Gather rows (csrc/gather_rows.h): work per stored value, not per column. Per record of eight, the
// activations come from an int16 copy of the tokens made here and vpmaddwd multiplies them with the
// eight values widened to int16.
static void gather_rows(const LinearArgs& a, int64_t r0, int64_t r1) {
  const int64_t xs = a.x_stride;
  int16_t* x16 = reinterpret_cast<int16_t*>(tl_x16.get(size_t(a.batch * xs) * 2));
  if (!x16) {
    generic::gather_i8(a, r0, r1);
    return;
  }
  for (int64_t b = 0; b < a.batch; ++b)
    for (int64_t c = 0; c < xs; c += 16)  // x_stride: a multiple of 64
      _mm256_store_si256(reinterpret_cast<__m256i*>(x16 + b * xs + c),
                         _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(a.xq + b * xs + c))));
  auto record = [](const uint8_t* q, const int16_t* xb, __m128i acc) {
    const __m128i w = _mm_cvtepi8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + 8)));
    return _mm_add_epi32(acc, _mm_madd_epi16(gather8(xb, q), w));
  };
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* rec = a.gather_recs + a.gather_chunks[r] * 16;
    const int64_t n = a.gather_chunks[r + 1] - a.gather_chunks[r];
    const float bias = a.bias ? a.bias[r] : 0.f;
    for (int64_t b = 0; b < a.batch; ++b) {
      const int16_t* xb = x16 + b * xs;
      __m128i acc0 = _mm_setzero_si128(), acc1 = _mm_setzero_si128();
      const uint8_t* q = rec;
      int64_t k = 0;
      for (; k + 2 <= n; k += 2, q += 32) {  // two sums: the records of a pair overlap
        _mm_prefetch(reinterpret_cast<const char*>(q + kPrefetch), _MM_HINT_T0);
        acc0 = record(q, xb, acc0);
        xb += q[7];
        acc1 = record(q + 16, xb, acc1);
        xb += q[23];
      }
      if (k < n) acc0 = record(q, xb, acc0);
      __m128i sum = _mm_add_epi32(acc0, acc1);
      sum = _mm_add_epi32(sum, _mm_shuffle_epi32(sum, 0x4E));
      sum = _mm_add_epi32(sum, _mm_shuffle_epi32(sum, 0xB1));
      a.y[b * a.out + r] = float(_mm_cvtsi128_si32(sum)) * a.scales[r] * a.sx[b] + bias;
    }
  }
}

template <bool kMasked>
static void rows(const LinearArgs& a, int64_t r0, int64_t r1) {
  if (a.n_groups > 1 && a.group_size % 32 != 0) {
    if (kMasked) generic::masked_i8(a, r0, r1); else generic::dense_i8(a, r0, r1);
    return;
  }
  if constexpr (kMasked) {
    if (a.n_groups == 1 && a.xq) {
      rows_masked_few(a, r0, r1);
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
// GEMM for many tokens: quad panels, as the AVX-512 tree's sliding-window quads but shaped for 256-bit
// registers. A record holds, for a group of 8 output rows (one dword lane each), each row's next four
// stored values and their column positions inside a 16-column window (what pshufb reaches) starting
// where the group's most lagging row has its next value (rounded down to 4 columns); a row dense in
// one stretch spills into the next records instead of padding the others. Per token the micro-kernel
// broadcasts the window's 16 activation bytes to both lanes, gathers each row's four with pshufb and
// multiplies: vpmaddubsw takes |w| (u8, once per record for all tokens) against xq carrying w's sign
// (psignb), so no pair saturates (2 * 127 * 127 < 2^15), and vpmaddwd sums each quad into its row's
// int32 lane. Five operations per 32 stored weights per token; zeros cost only padding lanes. Dense
// weights run as full masks (no padding at all).
// A prepared tile of kGemmRows rows: a 64-byte header (byte 0: kSlidingQuads; the record count of
// group g, int32, at byte 8 + 4g), then per group its records (64 bytes: 32 position bytes, 32
// values) and their window starts (int32, rounded up to 64 bytes).

constexpr int kGroupRows = 8, kGroups = int(kGemmRows) / kGroupRows;
constexpr int64_t kWindow = 16, kSlideStep = 4;

static inline int64_t round64(int64_t n) { return (n + 63) / 64 * 64; }

// 8 mask bytes of row r from byte `first` on: one load where the mask buffer allows (bytes past the
// row's end belong to the next row: callers drop columns >= in), byte by byte at its very end.
static inline uint64_t mask_bytes8(const LinearArgs& a, int64_t r, int64_t first) {
  const int64_t at = r * a.mask_stride + first, total = a.out * a.mask_stride;
  uint64_t v = 0;
  if (at + 8 <= total) {
    std::memcpy(&v, a.mask + at, 8);
  } else {
    for (int64_t k = 0; at + k < total && k < 8; ++k) v |= uint64_t(a.mask[at + k]) << (8 * k);
  }
  return v;
}

// Mask bits of columns [c, c + 16) of row r (c a multiple of 4), none at or past `in`; dense rows
// keep every column.
static inline uint32_t window_bits(const LinearArgs& a, bool masked, int64_t r, int64_t c) {
  const uint32_t v = masked ? uint32_t(mask_bytes8(a, r, c / 8) >> (c % 8)) & 0xFFFF : 0xFFFF;
  return a.in - c >= 16 ? v : v & ((1u << (a.in - c)) - 1);
}

// First kept column of row r at or after c (in when there is none).
static inline int64_t next_kept(const LinearArgs& a, bool masked, int64_t r, int64_t c) {
  if (!masked || c >= a.in) return c < a.in ? c : a.in;
  int64_t c8 = c & ~int64_t(63);
  uint64_t bits = mask_bytes8(a, r, c8 / 8) & (~0ull << (c - c8));
  while (!bits) {
    c8 += 64;
    if (c8 >= a.in) return a.in;
    bits = mask_bytes8(a, r, c8 / 8);
  }
  const int64_t found = c8 + int64_t(_tzcnt_u64(bits));
  return found < a.in ? found : a.in;
}

// The records of rows [r0, r0 + nrows) (nrows <= 8): returns their count; with recs given also writes
// them and their window starts (recs must hold count * 64 bytes, as a first pass with null says).
static int64_t slide_group(const LinearArgs& a, bool masked, int64_t r0, int nrows, int8_t* recs, int32_t* starts) {
  const int8_t* vals = static_cast<const int8_t*>(a.values);
  // the last window start whose 16 bytes stay inside the padded activation row (x_stride >= in
  // rounded up to 64)
  const int64_t last = (a.in + kWindow - 1) / kWindow * kWindow - kWindow;
  int64_t cur[kGroupRows], next[kGroupRows], p[kGroupRows];
  for (int i = 0; i < nrows; ++i) {
    cur[i] = 0;
    p[i] = masked ? a.row_offsets[r0 + i] : (r0 + i) * a.in;
    next[i] = next_kept(a, masked, r0 + i, 0);
  }
  int64_t n = 0;
  for (;; ++n) {
    int64_t lag = a.in;
    for (int i = 0; i < nrows; ++i) lag = next[i] < lag ? next[i] : lag;
    if (lag >= a.in) break;
    const int64_t s = generic::imin(lag & ~(kSlideStep - 1), last);
    int8_t* rec = recs ? recs + n * 64 : nullptr;
    if (rec) {
      std::memset(rec, 0, 64);
      starts[n] = int32_t(s);
    }
    for (int i = 0; i < nrows; ++i) {
      if (next[i] >= s + kWindow) continue;  // ahead of this window (or done): a padding lane
      uint32_t bits = window_bits(a, masked, r0 + i, s);
      if (cur[i] > s) bits &= ~0u << (cur[i] - s);
      int k = 0;
      int64_t col = 0;
      for (; k < 4 && bits; ++k, bits &= bits - 1) {
        col = int64_t(__builtin_ctz(bits));
        if (rec) rec[4 * i + k] = int8_t(col);
      }
      if (rec) {  // four bytes at once (a library memcpy call per lane had cost more than the scan)
        uint32_t four = 0;
        if (p[i] + 4 <= a.values_len) std::memcpy(&four, vals + p[i], 4);
        else for (int t = 0; t < k; ++t) four |= uint32_t(uint8_t(vals[p[i] + t])) << (8 * t);
        four &= k == 4 ? ~0u : (1u << (8 * k)) - 1;
        std::memcpy(rec + 32 + 4 * i, &four, 4);
      }
      p[i] += k;
      cur[i] = k == 4 && bits ? s + col + 1 : s + kWindow;
      next[i] = next_kept(a, masked, r0 + i, cur[i]);
    }
  }
  return n;
}

// Bytes of one group's records and starts.
static inline int64_t group_bytes(int64_t n) { return n * 64 + round64(4 * n); }

// y[m0 .. m0+MR, r0 .. r0+nrows) from one group's n records.
template <int MR>
static inline void micro_quads(const LinearArgs& a, const int8_t* recs, const int32_t* starts, int64_t n, int64_t m0,
                               int64_t r0, int nrows) {
  [[maybe_unused]] const __m256i ones = _mm256_set1_epi16(1);
  __m256i acc[MR];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) acc[i] = _mm256_setzero_si256();
  [[maybe_unused]] const int8_t* x = a.xq + m0 * a.x_stride;
  const int64_t xs = a.x_stride;
  for (int64_t j = 0; j < n; ++j) {
    const __m256i pos = _mm256_load_si256(reinterpret_cast<const __m256i*>(recs + 64 * j));
    const __m256i w = _mm256_load_si256(reinterpret_cast<const __m256i*>(recs + 64 * j + 32));
#if SP_AVX2_VNNI  // gathered xu = xq + 128 against w: two operations per record and token
    const uint8_t* xj = a.xu + m0 * xs + starts[j];
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const __m256i xw = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(xj + i * xs)));
      acc[i] = dpbusd(acc[i], _mm256_shuffle_epi8(xw, pos), w);
    }
#else
    const __m256i aw = _mm256_abs_epi8(w);
    const int8_t* xj = x + starts[j];
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const __m256i xw = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(xj + i * xs)));
      const __m256i signed_x = _mm256_sign_epi8(_mm256_shuffle_epi8(xw, pos), w);
      acc[i] = _mm256_add_epi32(acc[i], _mm256_madd_epi16(_mm256_maddubs_epi16(aw, signed_x), ones));
    }
#endif
  }
  alignas(32) float sc[kGroupRows] = {}, bias[kGroupRows] = {};
  alignas(32) int32_t surplus[kGroupRows] = {};  // 128 * rowsum: what xu's +128 added (VNNI tree)
  for (int k = 0; k < nrows; ++k) {
    sc[k] = a.scales[r0 + k];
    bias[k] = a.bias ? a.bias[r0 + k] : 0.f;
    surplus[k] = SP_AVX2_VNNI ? 128 * a.rowsum[r0 + k] : 0;
  }
  const __m256 s = _mm256_load_ps(sc), b = _mm256_load_ps(bias);
  const __m256i sur = _mm256_load_si256(reinterpret_cast<const __m256i*>(surplus));
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
    const __m256 v = _mm256_add_ps(_mm256_mul_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(acc[i], sur)), s),
                                                 _mm256_set1_ps(a.sx[m0 + i])), b);
    float* y = a.y + (m0 + i) * a.out + r0;
    if (nrows == kGroupRows) {
      _mm256_storeu_ps(y, v);
    } else {
      alignas(32) float out[kGroupRows];
      _mm256_store_ps(out, v);
      for (int k = 0; k < nrows; ++k) y[k] = out[k];
    }
  }
}

constexpr int kQuadMR = 6;  // tokens per micro-kernel call: 6 sums + 7 working registers of 16

// Tokens [m0, m1) of one group, in blocks of near-equal size (16 tokens: 6 + 5 + 5, not 6 + 6 + 4).
static void group_tokens(const LinearArgs& a, const int8_t* recs, const int32_t* starts, int64_t n, int64_t m0,
                         int64_t m1, int64_t r0, int nrows) {
  const int64_t total = m1 - m0, blocks = (total + kQuadMR - 1) / kQuadMR;
  int64_t m = m0;
  for (int64_t blk = 0; blk < blocks; ++blk) {
    const int size = int(total / blocks + (blk < total % blocks ? 1 : 0));
    switch (size) {
      case 6: micro_quads<6>(a, recs, starts, n, m, r0, nrows); break;
      case 5: micro_quads<5>(a, recs, starts, n, m, r0, nrows); break;
      case 4: micro_quads<4>(a, recs, starts, n, m, r0, nrows); break;
      case 3: micro_quads<3>(a, recs, starts, n, m, r0, nrows); break;
      case 2: micro_quads<2>(a, recs, starts, n, m, r0, nrows); break;
      default: micro_quads<1>(a, recs, starts, n, m, r0, nrows); break;
    }
    m += size;
  }
}

// Tokens of rows [r0, r1) from the prepared panels. Without them the row kernels run: packing a
// tile's records per call costs ~15 cycles per stored value (the sliding scan), more than the row
// kernels' own expansion until some hundreds of tokens, so AVX2 layers get their panels prepared
// on their first many-token call instead (KernelTable::panels_for_long_calls).
template <bool kMasked>
static void gemm(const LinearArgs& a, int64_t r0, int64_t r1) {
  if (!a.panels) {
    rows<kMasked>(a, r0, r1);
    return;
  }
  // tokens in blocks whose activations stay in L2 while a tile's records pass by
  const int64_t mc = generic::imin(a.batch, ((int64_t(256) << 10) / a.x_stride / kQuadMR + 1) * kQuadMR);
  for (int64_t m0 = 0; m0 < a.batch; m0 += mc) {
    const int64_t m1 = generic::imin(a.batch, m0 + mc);
    for (int64_t n0 = r0; n0 < r1; n0 += kGemmRows) {
      const int8_t* tile = a.panels + a.panel_off[n0 / kGemmRows];
      const int8_t* recs = tile + 64;
      for (int g = 0; g < kGroups; ++g) {
        const int64_t g0 = n0 + g * kGroupRows;
        const int nrows = int(generic::imin(kGroupRows, r1 - g0));
        if (nrows <= 0) break;
        int32_t n;
        std::memcpy(&n, tile + 8 + 4 * g, 4);
        group_tokens(a, recs, reinterpret_cast<const int32_t*>(recs + 64 * int64_t(n)), n, m0, m1, g0, nrows);
        recs += group_bytes(n);
      }
    }
  }
}

}  // namespace

void masked_i8(const LinearArgs& a, int64_t r0, int64_t r1) { rows<true>(a, r0, r1); }
void dense_i8(const LinearArgs& a, int64_t r0, int64_t r1) { rows<false>(a, r0, r1); }
void csr_i8(const LinearArgs& a, int64_t r0, int64_t r1) { generic::csr_i8(a, r0, r1); }
void gather_i8(const LinearArgs& a, int64_t r0, int64_t r1) { gather_rows(a, r0, r1); }
void masked_gemm_i8(const LinearArgs& a, int64_t r0, int64_t r1) { gemm<true>(a, r0, r1); }
void dense_gemm_i8(const LinearArgs& a, int64_t r0, int64_t r1) { gemm<false>(a, r0, r1); }

int64_t tile_panel_bytes(const LinearArgs& a, bool masked, int64_t n0, TileLayout* layout) {
  int64_t bytes = 64;
  for (int g = 0; g < kGroups; ++g) {
    const int nrows = int(generic::imin(kGroupRows, a.out - n0 - g * kGroupRows));
    if (nrows > 0) bytes += group_bytes(slide_group(a, masked, n0 + g * kGroupRows, nrows, nullptr, nullptr));
  }
  *layout = {kSlidingQuads, 0};
  return bytes;
}

bool pack_tile_panel(const LinearArgs& a, bool masked, int64_t n0, TileLayout layout, int8_t* tile) {
  std::memset(tile, 0, 64);
  tile[0] = layout.kind;
  int8_t* data = tile + 64;
  for (int g = 0; g < kGroups; ++g) {
    const int nrows = int(generic::imin(kGroupRows, a.out - n0 - g * kGroupRows));
    if (nrows <= 0) break;
    const int64_t g0 = n0 + g * kGroupRows, n = slide_group(a, masked, g0, nrows, nullptr, nullptr);
    const int32_t count = int32_t(n);
    std::memcpy(tile + 8 + 4 * g, &count, 4);
    slide_group(a, masked, g0, nrows, data, reinterpret_cast<int32_t*>(data + 64 * n));
    data += group_bytes(n);
  }
  return true;
}

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


}  // namespace SP_ISA_NS
}  // namespace sp
