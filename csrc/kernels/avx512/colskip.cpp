// AVX-512 tree, column skipping (layout in csrc/colskip.h). Twelve listed columns at a time: their
// chunks stream side by side, and each 64-row block adds 12 x 4 vpdpbusd (u8 weights x the token's
// activation byte in one byte of each lane, as a broadcast dword) into four accumulators of 16 rows
// that are loaded and stored once per block. Sparse chunks expand a block's stored values with
// vpexpandb (VBMI2) and flip their sign bits to get w + 128 (empty positions: 128, i.e. w = 0).
#include <immintrin.h>

#include <algorithm>

#define SP_ISA_NS avx512
#include "kernels/colskip_generic.h"

namespace sp {
namespace avx512 {
namespace {

// Bytes ahead of each chunk's read position to prefetch (the hardware prefetcher does not follow a
// jump to the next listed column in time on its own).
constexpr int64_t kAhead = 256;

template <bool kSparse>
static inline __m512i load_block(const uint8_t*& p) {
  if constexpr (kSparse) {
    uint64_t m;
    std::memcpy(&m, p, 8);
    const __m512i v = _mm512_loadu_si512(p + 8);
    p += 8 + _mm_popcnt_u64(m);
    return _mm512_xor_si512(_mm512_maskz_expand_epi8(m, v), _mm512_set1_epi8(char(0x80)));
  } else {
    const __m512i v = _mm512_loadu_si512(p);
    p += kColBlock;
    return v;
  }
}

// Listed columns j .. j + NC - 1 into acc; NB tokens (0: c.batch, known at run time).
template <bool kSparse, int NC, int NB>
static void add_group(const ColSkipArgs& c, int64_t j, int32_t* acc) {
  const int64_t batch = NB ? NB : c.batch, blocks = c.out_pad / kColBlock;
  const uint8_t* p[NC];
  for (int n = 0; n < NC; ++n) p[n] = c.data + c.col_off[c.cols[j + n]];
  // the activation byte of (column n, token b) at byte k of a dword: xk[(b * NC + n) * 4 + k]
  alignas(64) uint32_t xk[kColSkipMaxBatch * NC * 4];
  for (int64_t b = 0; b < batch; ++b)
    for (int n = 0; n < NC; ++n)
      for (int k = 0; k < 4; ++k) xk[(b * NC + n) * 4 + k] = uint32_t(c.xv[(j + n) * c.batch + b]) << (8 * k);
  for (int64_t blk = 0; blk < blocks; ++blk) {
    __m512i w[NC];
    for (int n = 0; n < NC; ++n) {
      _mm_prefetch(reinterpret_cast<const char*>(p[n] + kAhead), _MM_HINT_T0);
      w[n] = load_block<kSparse>(p[n]);
    }
    for (int64_t b = 0; b < batch; ++b) {
      int32_t* a = acc + b * c.out_pad + blk * kColBlock;
      __m512i s[4];
      for (int k = 0; k < 4; ++k) s[k] = _mm512_loadu_si512(a + 16 * k);
      const uint32_t* x = xk + b * NC * 4;
      for (int n = 0; n < NC; ++n)
        for (int k = 0; k < 4; ++k) s[k] = _mm512_dpbusd_epi32(s[k], w[n], _mm512_set1_epi32(int(x[n * 4 + k])));
      for (int k = 0; k < 4; ++k) _mm512_storeu_si512(a + 16 * k, s[k]);
    }
  }
}

// The first bytes of listed columns j .. j + NC - 1 into L2 (a group ahead: a jump to a new column is
// where the streams stall, and the next group's heads arrive while this group runs).
template <int NC>
static inline void prefetch_heads(const ColSkipArgs& c, int64_t j, int64_t j1) {
  for (int64_t n = j; n < std::min(j + NC, j1); ++n) {
    const char* head = reinterpret_cast<const char*>(c.data + c.col_off[c.cols[n]]);
    for (int64_t off = 0; off < kAhead; off += 64) _mm_prefetch(head + off, _MM_HINT_T1);
  }
}

// Columns [j, j1) in groups of NC, then of 4, then one by one. Twelve chunks streaming side by side
// keep enough DRAM reads in flight per core: with four, 50% of a dense 4096 x 4096 weight's columns
// ran 1.3-1.6x faster than the row kernels, with twelve ~2.0x (50% bitmask: 0.9-1.1x -> 1.2-1.3x).
template <bool kSparse, int NB, int NC>
static int64_t add_groups(const ColSkipArgs& c, int64_t j, int64_t j1, int32_t* acc) {
  prefetch_heads<NC>(c, j, j1);
  for (; j + NC <= j1; j += NC) {
    prefetch_heads<NC>(c, j + NC, j1);
    add_group<kSparse, NC, NB>(c, j, acc);
  }
  return j;
}

template <bool kSparse, int NB>
static void add_columns_t(const ColSkipArgs& c, int64_t j0, int64_t j1, int32_t* acc) {
  int64_t j = add_groups<kSparse, NB, 12>(c, j0, j1, acc);
  j = add_groups<kSparse, NB, 4>(c, j, j1, acc);
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
// --crossover crosses ~1.05 (AMD EPYC Zen 4, 2 threads, 2026-12-08, twelve chunks per group),
// interpolated linearly between the measured densities, a little below the crossing. It depends on
// the shape (taller layers have longer chunks): at one token dense 4096 x 4096 crosses near 0.76,
// 2048 x 5632 near 0.8, 5632 x 2048 and 11008 x 4096 above 0.95; 50% bitmask 4096 x 4096 near 0.57,
// 2048 x 5632 near 0.5 (1.0x there), 11008 x 4096 near 0.85.
const ColSkipKernels& colskip() {
  static const ColSkipKernels k = {accumulate, colgeneric::finish,
                                   {0.f, 0.7f, 0.55f, 0.52f, 0.5f, 0.47f, 0.45f, 0.42f, 0.4f},
                                   {0.f, 0.52f, 0.45f, 0.42f, 0.38f, 0.33f, 0.28f, 0.24f, 0.2f}};
  return k;
}

}  // namespace avx512
}  // namespace sp
