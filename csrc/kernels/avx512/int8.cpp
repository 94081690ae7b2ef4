// AVX-512 tree, int8 weights. The u8 x s8 product of vpdpbusd takes xu = xq + 128
// (unsigned) against the signed weights; the surplus 128 * sum(q) is taken off per
// row from rowsum, precomputed when the weight was prepared. Masked rows expand 64
// stored values into their columns with vpexpandb (VBMI2), so zeros cost no bytes.
#include <immintrin.h>

#include <algorithm>
#include <cstdlib>

#define SP_ISA_NS avx512
#include "kernels/decl.h"
#include "kernels/generic.h"
#include "kernels/scratch.h"
#include "kernels/activation.h"

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

// Mask bits of columns [c, c + 64) of one row (c is a multiple of 8).
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

// Batch 1, masked, one scale per row: the per-chunk work (mask load, popcnt, vpexpandb, vpdpbusd)
// bounds a sparse GEMV, not the bytes. Four chunks per step with independent accumulators; the
// four masks are loaded and counted up front so the value pointer chain is one add per step; the
// mask stream (as many bytes as the values at 87.5% sparsity) is prefetched like the values.
// Needs the row's values to be followed by 64 readable bytes (checked per row by the caller).
constexpr int64_t kPrefetch1 = 2048;  // bytes ahead in both streams (1024 / 2048 / 3072 measured)
static inline void row1_masked(const LinearArgs& a, int64_t r, int64_t b) {
  const int8_t* v = static_cast<const int8_t*>(a.values) + a.row_offsets[r];
  const uint8_t* m = a.mask + r * a.mask_stride;
  const uint8_t* x = a.xu + b * a.x_stride;
  const int64_t nfull = a.in / 64;
  __m512i acc0 = _mm512_setzero_si512(), acc1 = acc0, acc2 = acc0, acc3 = acc0;
  int64_t q = 0;
  for (; q + 4 <= nfull; q += 4) {
    uint64_t k0, k1, k2, k3;
    std::memcpy(&k0, m + 8 * q, 8);
    std::memcpy(&k1, m + 8 * q + 8, 8);
    std::memcpy(&k2, m + 8 * q + 16, 8);
    std::memcpy(&k3, m + 8 * q + 24, 8);
    const int64_t n0 = int64_t(_mm_popcnt_u64(k0)), n1 = int64_t(_mm_popcnt_u64(k1));
    const int64_t n2 = int64_t(_mm_popcnt_u64(k2)), n3 = int64_t(_mm_popcnt_u64(k3));
    // one prefetch per chunk: a step consumes up to 256 value bytes (4 lines at density 1)
    _mm_prefetch(reinterpret_cast<const char*>(v + kPrefetch1), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(v + n0 + kPrefetch1), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(v + n0 + n1 + kPrefetch1), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(v + n0 + n1 + n2 + kPrefetch1), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(m + 8 * q + kPrefetch1), _MM_HINT_T0);
    const __m512i w0 = _mm512_maskz_expand_epi8(k0, _mm512_loadu_si512(v));
    const __m512i w1 = _mm512_maskz_expand_epi8(k1, _mm512_loadu_si512(v + n0));
    const __m512i w2 = _mm512_maskz_expand_epi8(k2, _mm512_loadu_si512(v + n0 + n1));
    const __m512i w3 = _mm512_maskz_expand_epi8(k3, _mm512_loadu_si512(v + n0 + n1 + n2));
    v += n0 + n1 + n2 + n3;
    acc0 = _mm512_dpbusd_epi32(acc0, _mm512_loadu_si512(x + 64 * q), w0);
    acc1 = _mm512_dpbusd_epi32(acc1, _mm512_loadu_si512(x + 64 * q + 64), w1);
    acc2 = _mm512_dpbusd_epi32(acc2, _mm512_loadu_si512(x + 64 * q + 128), w2);
    acc3 = _mm512_dpbusd_epi32(acc3, _mm512_loadu_si512(x + 64 * q + 192), w3);
  }
  for (; q < nfull; ++q) {
    uint64_t k;
    std::memcpy(&k, m + 8 * q, 8);
    acc0 = _mm512_dpbusd_epi32(acc0, _mm512_loadu_si512(x + 64 * q),
                               _mm512_maskz_expand_epi8(k, _mm512_loadu_si512(v)));
    v += int64_t(_mm_popcnt_u64(k));
  }
  if (nfull * 64 < a.in) {  // x_stride >= in rounded up to 64: padding xu = 128 meets w = 0
    const uint64_t k = mask_bits(m, nfull * 64, a.in);
    acc1 = _mm512_dpbusd_epi32(acc1, _mm512_loadu_si512(x + 64 * nfull),
                               _mm512_maskz_expand_epi8(k, _mm512_loadu_si512(v)));
  }
  acc0 = _mm512_add_epi32(_mm512_add_epi32(acc0, acc1), _mm512_add_epi32(acc2, acc3));
  const float bias = a.bias ? a.bias[r] : 0.f;
  a.y[b * a.out + r] = float(_mm512_reduce_add_epi32(acc0) - 128 * a.rowsum[r]) * a.scales[r] * a.sx[b] + bias;
}

// Token b of rows [r0, r1), masked: row1_masked where it may read 64 bytes past the row's values.
// (Four rows in lockstep, sharing the activation loads, ran 0.54-0.64x as fast from DRAM on a Zen 4:
// eight streams with their masks defeat the prefetching that one row's two sequential streams get.)
static inline void rows1_masked(const LinearArgs& a, int64_t r0, int64_t r1, int64_t b) {
  for (int64_t r = r0; r < r1; ++r) {
    if (a.row_offsets[r + 1] + 64 <= a.values_len) row1_masked(a, r, b);
    else row_tile<1, true>(a, r, b);
  }
}

// ---------------------------------------------------------------------------------------------
// Gather rows, Windows256 layout (csrc/gather_rows.h), for very sparse weights at few tokens. Per
// 256-column window of a row, its stored values' column offsets pick their activations out of the
// window's four registers (vpermt2b on the low and on the high 128 columns, blended by the offset's
// top bit) and one vpdpbusd multiplies up to 64 of them. The bitmask rows spend a mask load, a popcount,
// an expand and a multiply on every 64 columns, whatever they keep (so 75% and 90% ran at the same
// speed); here a 90% window costs about what one of their 64-column chunks does.

// The window of columns [c, c + 256) of one token's xu row; `readable` bytes from c on may be read
// (past `in` they hold the padding xu = 128, which no offset selects).
struct XWindow {
  __m512i x0, x1, x2, x3;
  static inline __m512i part(const uint8_t* p, int64_t readable) {
    if (readable >= 64) return _mm512_loadu_si512(p);
    return _mm512_maskz_loadu_epi8(readable <= 0 ? 0 : _bzhi_u64(~0ull, unsigned(readable)), p);
  }
  static inline XWindow load(const uint8_t* xw, int64_t readable) {
    if (readable >= kGatherWindow)
      return {_mm512_loadu_si512(xw), _mm512_loadu_si512(xw + 64), _mm512_loadu_si512(xw + 128),
              _mm512_loadu_si512(xw + 192)};
    return {part(xw, readable), part(xw + 64, readable - 64), part(xw + 128, readable - 128),
            part(xw + 192, readable - 192)};
  }
  // The activations at the offsets idx (lanes whose offset has bit 7 set come from the high half).
  inline __m512i pick(__m512i idx, __mmask64 high) const {
    return _mm512_mask_blend_epi8(high, _mm512_permutex2var_epi8(x0, idx, x1), _mm512_permutex2var_epi8(x2, idx, x3));
  }
};

// acc[i] += token i's products over the stored values [j, j + 64) of a window of n at p (offsets, then
// values); lanes past n multiply by 0.
template <int NB>
static inline __attribute__((always_inline)) void window_part(const uint8_t* p, int64_t n, int64_t j,
                                                              const XWindow (&xw)[NB], __m512i (&acc)[NB]) {
  const __m512i idx = _mm512_loadu_si512(p + j);
  const __m512i w = _mm512_maskz_loadu_epi8(_bzhi_u64(~0ull, unsigned(std::min<int64_t>(64, n - j))), p + n + j);
  const __mmask64 high = _mm512_movepi8_mask(idx);
#pragma GCC unroll 4
  for (int i = 0; i < NB; ++i) acc[i] = _mm512_dpbusd_epi32(acc[i], xw[i].pick(idx, high), w);
}

// One window of n stored values at p; returns the next window's position.
template <int NB>
static inline __attribute__((always_inline)) const uint8_t* window_step(const uint8_t* p, int64_t n,
                                                                        const XWindow (&xw)[NB], __m512i (&acc)[NB]) {
  window_part<NB>(p, n, 0, xw, acc);
  for (int64_t j = 64; __builtin_expect(j < n, 0); j += 64) window_part<NB>(p, n, j, xw, acc);  // rows that cluster
  return p + 2 * n;
}

template <int NB>
static inline __attribute__((always_inline)) void load_windows(XWindow (&xw)[NB], const uint8_t* x, int64_t stride,
                                                               int64_t c, int64_t readable) {
#pragma GCC unroll 4
  for (int i = 0; i < NB; ++i) xw[i] = XWindow::load(x + i * stride + c, readable);
}

// Tokens b0 .. b0+NB of rows [r0, r1); windows two at a time into separate accumulators (the vpdpbusd
// latency), each window's offsets and values loaded once for the NB tokens.
template <int NB>
static void window_rows(const LinearArgs& a, int64_t r0, int64_t r1, int64_t b0) {
  const int64_t windows = (a.in + kGatherWindow - 1) / kGatherWindow;
  const int64_t whole = std::min(windows, a.x_stride / kGatherWindow);  // windows whose 256 x bytes are readable
  const uint8_t* x = a.xu + b0 * a.x_stride;
  const int64_t xs = a.x_stride;
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* row = a.gather_recs + a.gather_chunks[r];
    const uint8_t* p = row + 2 * windows;
    __m512i acc0[NB], acc1[NB];
#pragma GCC unroll 4
    for (int i = 0; i < NB; ++i) acc0[i] = acc1[i] = _mm512_setzero_si512();
    XWindow xw[NB];
    int64_t w = 0;
    for (; w + 2 <= whole; w += 2) {
      uint16_t n[2];
      std::memcpy(n, row + 2 * w, 4);
      // a step reads ~100 bytes at 90%: two lines ahead per step keep pace with it
      _mm_prefetch(reinterpret_cast<const char*>(p + kPrefetch1), _MM_HINT_T0);  // (2048: faster than 4096)
      _mm_prefetch(reinterpret_cast<const char*>(p + kPrefetch1 + 64), _MM_HINT_T0);
      load_windows<NB>(xw, x, xs, w * kGatherWindow, kGatherWindow);
      p = window_step<NB>(p, n[0], xw, acc0);
      load_windows<NB>(xw, x, xs, (w + 1) * kGatherWindow, kGatherWindow);
      p = window_step<NB>(p, n[1], xw, acc1);
    }
    for (; w < windows; ++w) {  // the last window or two, possibly short of 256 readable bytes
      uint16_t n;
      std::memcpy(&n, row + 2 * w, 2);
      load_windows<NB>(xw, x, xs, w * kGatherWindow, xs - w * kGatherWindow);
      p = window_step<NB>(p, n, xw, acc0);
    }
    const float bias = a.bias ? a.bias[r] : 0.f;
    const int32_t surplus = 128 * a.rowsum[r];
#pragma GCC unroll 4
    for (int i = 0; i < NB; ++i)
      a.y[(b0 + i) * a.out + r] =
          float(_mm512_reduce_add_epi32(_mm512_add_epi32(acc0[i], acc1[i])) - surplus) * a.scales[r] * a.sx[b0 + i] + bias;
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

// ---------------------------------------------------------------------------------------------
// Several tokens, one scale per row: row dots blocked over K. Each 64-column chunk of a row is
// expanded once and applied to NB tokens (NB vpdpbusd); the activations of the NB tokens over a
// K block of kb columns (NB * kb <= 16 KiB) stay in L1, where plain row dots over the whole row
// would stream them from L2 once per row. Per (row, K block) the NB accumulators are folded into
// one vector of NB token sums; rows are walked in blocks of kRB so that the per-row state (value
// position, sums) stays small, and each row's stream is prefetched into L2 one K block ahead.

// Lane t of the result: sum of the lanes of v[t] (t < 16).
static inline __m512i fold16(const __m512i v[16]) {
  __m512i u[8], w[4];
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i)
    u[i] = _mm512_add_epi32(_mm512_unpacklo_epi32(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_epi32(v[2 * i], v[2 * i + 1]));
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i)
    w[i] = _mm512_add_epi32(_mm512_unpacklo_epi64(u[2 * i], u[2 * i + 1]), _mm512_unpackhi_epi64(u[2 * i], u[2 * i + 1]));
  const __m512i z0 = _mm512_add_epi32(_mm512_shuffle_i32x4(w[0], w[1], 0x88), _mm512_shuffle_i32x4(w[0], w[1], 0xDD));
  const __m512i z1 = _mm512_add_epi32(_mm512_shuffle_i32x4(w[2], w[3], 0x88), _mm512_shuffle_i32x4(w[2], w[3], 0xDD));
  return _mm512_add_epi32(_mm512_shuffle_i32x4(z0, z1, 0x88), _mm512_shuffle_i32x4(z0, z1, 0xDD));
}

constexpr int kRB = 32;  // rows per block of the K-blocked row dots
// From this many inputs the K-blocked row dots beat whole-row tiles (whose activations of 8-16
// tokens then no longer fit L1); below it (MiniLM-sized layers) the plain row tiles stay.
constexpr int64_t kKBlockMinIn = 2048;
constexpr int kDist = 2;  // rows ahead to prefetch (1 / 2 / 4 / 8 measured: 2 or 4)

// Columns [c0, c1) of row r for NB tokens (activations of column c0 + j, token i at xb[i * KB + j]);
// returns the NB token sums (lane i). p: the row's value position, advanced.
// kSafe: [c0, c1) is whole chunks and 64 bytes past the row's values are readable.
template <int NB, int KB, bool kMasked, bool kSafe>
static inline __m512i kslice(const LinearArgs& a, const uint8_t* m, int64_t c0, int64_t c1, int64_t& p_io,
                             const uint8_t* xb, const int8_t* pf_v, const uint8_t* pf_m) {
  const int8_t* vals = static_cast<const int8_t*>(a.values);
  __m512i acc[16];
#pragma GCC unroll 16
  for (int i = 0; i < 16; ++i) acc[i] = _mm512_setzero_si512();
  int64_t p = p_io;
  for (int64_t c = c0; c < c1; c += 64, xb += 64) {
    __m512i w;
    if constexpr (kSafe) {
      if constexpr (kMasked) {
        uint64_t k;
        std::memcpy(&k, m + c / 8, 8);
        _mm_prefetch(reinterpret_cast<const char*>(pf_v + (p - p_io)), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(pf_m + c / 8), _MM_HINT_T0);
        w = _mm512_maskz_expand_epi8(k, _mm512_loadu_si512(vals + p));
        p += int64_t(_mm_popcnt_u64(k));
      } else {
        _mm_prefetch(reinterpret_cast<const char*>(pf_v + c), _MM_HINT_T0);
        w = _mm512_loadu_si512(vals + p + c);
      }
    } else {
      w = weights<kMasked>(vals, p, m, c, a.in, a.values_len);
    }
    // roles swapped: w + 128 (u8) against xq (s8), so the activations are the memory operand
    const __m512i wu = _mm512_xor_si512(w, _mm512_set1_epi8(char(0x80)));
    // inline asm: GCC copies vpdpbusd intrinsic accumulators through spare registers every chunk
#pragma GCC unroll 16
    for (int i = 0; i < NB; ++i)
      __asm__("vpdpbusd %[x], %[w], %[acc]" : [acc] "+v"(acc[i]) : [w] "v"(wu), [x] "m"(*reinterpret_cast<const __m512i*>(xb + i * KB)));
  }
  p_io = p;
  return fold16(acc);
}

template <int NB, bool kMasked, int XB = 24576>
static void rows_kblocked(const LinearArgs& a, int64_t r0, int64_t r1, int64_t b0) {
  // columns per K block: NB * KB bytes of activations (24 KiB measured best of 8 / 16 / 24 KiB)
  constexpr int KB = (XB / NB) < 4096 ? XB / NB / 64 * 64 : 4096;
  alignas(64) uint8_t xb[NB * KB];
  const int8_t* x = a.xq + b0 * a.x_stride;
  const int64_t in = a.in, nfull = in / 64 * 64, kpad = (in + 63) / 64 * 64;
  alignas(64) float sxv[16] = {};
  alignas(64) int32_t xsum[16] = {};  // 128 * sum of xq per token: the surplus of w + 128
  for (int i = 0; i < NB; ++i) {
    sxv[i] = a.sx[b0 + i];
    const uint8_t* u = a.xu + (b0 + i) * a.x_stride;
    __m512i t = _mm512_setzero_si512();
    for (int64_t c = 0; c < kpad; c += 64) t = _mm512_add_epi64(t, _mm512_sad_epu8(_mm512_loadu_si512(u + c), _mm512_setzero_si512()));
    xsum[i] = int32_t(128 * (_mm512_reduce_add_epi64(t) - 128 * kpad));
  }
  const __m512 sx = _mm512_load_ps(sxv);
  const __m512i surplus = _mm512_load_si512(xsum);
  for (int64_t rb = r0; rb < r1; rb += kRB) {
    const int nr = int(generic::imin(kRB, r1 - rb));
    int64_t p[kRB];
    bool safe[kRB];
    __m512i sum[kRB];
    for (int i = 0; i < nr; ++i) {
      const int64_t r = rb + i;
      p[i] = kMasked ? a.row_offsets[r] : r * in;
      safe[i] = !kMasked || a.row_offsets[r + 1] + 64 <= a.values_len;
      sum[i] = _mm512_setzero_si512();
    }
    for (int64_t k0 = 0; k0 < kpad; k0 += KB) {
      const int64_t k1 = generic::imin(kpad, k0 + KB), kf = generic::imin(nfull, k1);
      for (int i = 0; i < NB; ++i)  // x_stride >= kpad: padding columns hold xu = 128 against w = 0
        std::memcpy(xb + i * KB, x + i * a.x_stride + k0, size_t(k1 - k0));
      for (int i = 0; i < nr; ++i) {
        const uint8_t* m = kMasked ? a.mask + (rb + i) * a.mask_stride : nullptr;
        // prefetch the same K block of row i + kDist (rows are separate streams here)
        const int j = i + kDist;
        const int64_t rj = generic::imin(rb + j, a.out - 1);
        const int64_t pj = j < nr ? p[j] : k0 == 0 ? (kMasked ? a.row_offsets[rj] : rj * in) : p[i];
        const int8_t* pf_v = static_cast<const int8_t*>(a.values) + pj;
        const uint8_t* pf_m = kMasked ? a.mask + rj * a.mask_stride : nullptr;
        if (safe[i]) sum[i] = _mm512_add_epi32(sum[i], kslice<NB, KB, kMasked, true>(a, m, k0, kf, p[i], xb, pf_v, pf_m));
        else sum[i] = _mm512_add_epi32(sum[i], kslice<NB, KB, kMasked, false>(a, m, k0, kf, p[i], xb, pf_v, pf_m));
        if (kf < k1)
          sum[i] = _mm512_add_epi32(sum[i], kslice<NB, KB, kMasked, false>(a, m, kf, in, p[i], xb + (kf - k0), pf_v, pf_m));
      }
    }
    for (int i = 0; i < nr; ++i) {
      const int64_t r = rb + i;
      const __m512 f = _mm512_cvtepi32_ps(_mm512_sub_epi32(sum[i], surplus));
      const __m512 v = _mm512_add_ps(_mm512_mul_ps(_mm512_mul_ps(f, _mm512_set1_ps(a.scales[r])), sx),
                                     _mm512_set1_ps(a.bias ? a.bias[r] : 0.f));
      alignas(64) float out[16];
      _mm512_store_ps(out, v);
      for (int t = 0; t < NB; ++t) a.y[(b0 + t) * a.out + r] = out[t];
    }
  }
}

// Batch 1, dense rows: R rows in lockstep, the activation vectors loaded once per step for all of them.
// Rows lie one after another, so R rows are R sequential streams a row apart: in a C loop on a Zen 4
// one row at a time read a 4096 x 4096 weight at ~27 GB/s, eight at a time ~46 GB/s; in the kernel,
// 1.03-1.22x over one row at a time on LLaMA-7B shapes (same outputs, bit for bit).
template <int R>
static inline void rows1_dense_lockstep(const LinearArgs& a, int64_t r, int64_t b) {
  const int8_t* w = static_cast<const int8_t*>(a.values) + r * a.in;
  const uint8_t* x = a.xu + b * a.x_stride;
  const int64_t in = a.in, nfull = in / 64;
  __m512i acc[R];
#pragma GCC unroll 8
  for (int i = 0; i < R; ++i) acc[i] = _mm512_setzero_si512();
  for (int64_t q = 0; q < nfull; ++q) {
    const __m512i xv = _mm512_loadu_si512(x + 64 * q);
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i) acc[i] = _mm512_dpbusd_epi32(acc[i], xv, _mm512_loadu_si512(w + i * in + 64 * q));
  }
  if (nfull * 64 < in) {  // padding xu = 128 meets the masked-off (zero) weights
    const __m512i xv = _mm512_loadu_si512(x + 64 * nfull);
    const __mmask64 k = _bzhi_u64(~0ull, unsigned(in - 64 * nfull));
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i)
      acc[i] = _mm512_dpbusd_epi32(acc[i], xv, _mm512_maskz_loadu_epi8(k, w + i * in + 64 * nfull));
  }
#pragma GCC unroll 8
  for (int i = 0; i < R; ++i) {
    const float bias = a.bias ? a.bias[r + i] : 0.f;
    a.y[b * a.out + r + i] =
        float(_mm512_reduce_add_epi32(acc[i]) - 128 * a.rowsum[r + i]) * a.scales[r + i] * a.sx[b] + bias;
  }
}

constexpr int kDenseLockstepRows = 8;

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
  if constexpr (kMasked) {
    if (a.batch == 1) {
      rows1_masked(a, r0, r1, 0);
      return;
    }
    if (a.in >= kKBlockMinIn) {
      int64_t b = 0;
      for (; b + 16 <= a.batch; b += 16) rows_kblocked<16, true>(a, r0, r1, b);
      if (a.batch - b >= 8) { rows_kblocked<8, true>(a, r0, r1, b); b += 8; }
      if (a.batch - b >= 4) { rows_kblocked<4, true>(a, r0, r1, b); b += 4; }
      for (int64_t r = r0; a.batch - b >= 2 && r < r1; ++r) row_tile<2, true>(a, r, b);
      if (a.batch - b >= 2) b += 2;
      if (a.batch - b >= 1) rows1_masked(a, r0, r1, b);
      return;
    }
  } else {
    if (a.batch == 1) {
      int64_t r = r0;
      for (; r + kDenseLockstepRows <= r1; r += kDenseLockstepRows) rows1_dense_lockstep<kDenseLockstepRows>(a, r, 0);
      for (; r < r1; ++r) row_tile<1, false>(a, r, 0);
      return;
    }
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

// ---------------------------------------------------------------------------------------------
// GEMM for many tokens. Per tile of kGemmRows (32) output rows the packed weights are expanded
// ONCE (vpexpandb for masked streams, a plain load for dense rows) and transposed into a
// VNNI panel buf[k4][32 rows][4 bytes]: one zmm holds 16 output rows x 4 k. The micro-kernel
// then broadcasts 4 activation bytes per token and runs vpdpbusd into MR x NJ accumulators
// (MR tokens x NJ*16 outputs). Decompression is O(out * in) per call, not per token.

thread_local Scratch tl_panel;  // per-thread panel buffer
thread_local Scratch tl_counts;  // quads per window while a prepared tile is planned

// In-place transpose of a 16 x 16 matrix of dwords (v[row] -> v[col]).
static inline void transpose16(__m512i v[16]) {
  __m512i t[16], u[16];
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(v[2 * i], v[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(v[2 * i], v[2 * i + 1]);
  }
#pragma GCC unroll 4
  for (int g = 0; g < 4; ++g) {  // u[4g + j]: rows 4g..4g+3, column j of each 128-bit lane
    u[4 * g + 0] = _mm512_unpacklo_epi64(t[4 * g], t[4 * g + 2]);
    u[4 * g + 1] = _mm512_unpackhi_epi64(t[4 * g], t[4 * g + 2]);
    u[4 * g + 2] = _mm512_unpacklo_epi64(t[4 * g + 1], t[4 * g + 3]);
    u[4 * g + 3] = _mm512_unpackhi_epi64(t[4 * g + 1], t[4 * g + 3]);
  }
#pragma GCC unroll 4
  for (int j = 0; j < 4; ++j) {
    const __m512i a0 = _mm512_shuffle_i32x4(u[j], u[4 + j], 0x88);
    const __m512i b0 = _mm512_shuffle_i32x4(u[j], u[4 + j], 0xDD);
    const __m512i c0 = _mm512_shuffle_i32x4(u[8 + j], u[12 + j], 0x88);
    const __m512i d0 = _mm512_shuffle_i32x4(u[8 + j], u[12 + j], 0xDD);
    v[j] = _mm512_shuffle_i32x4(a0, c0, 0x88);
    v[8 + j] = _mm512_shuffle_i32x4(a0, c0, 0xDD);
    v[4 + j] = _mm512_shuffle_i32x4(b0, d0, 0x88);
    v[12 + j] = _mm512_shuffle_i32x4(b0, d0, 0xDD);
  }
}

// Rows [r0, r0 + rows) expanded one after the other into dst, kpad bytes apart (one sequential stream
// at a time: sixteen interleaved streams defeat the hardware prefetcher); rows [rows, count) zero.
template <bool kMasked>
static void expand_rows(const LinearArgs& a, int64_t r0, int rows, int count, int64_t kpad, int8_t* dst) {
  const int8_t* vals = static_cast<const int8_t*>(a.values);
  for (int i = 0; i < count; ++i) {
    int8_t* row = dst + i * kpad;
    if (i >= rows) {
      std::memset(row, 0, size_t(kpad));
      continue;
    }
    const int64_t r = r0 + i;
    int64_t p = kMasked ? a.row_offsets[r] : r * a.in;
    const uint8_t* m = kMasked ? a.mask + r * a.mask_stride : nullptr;
    for (int64_t c = 0; c < kpad; c += 64) _mm512_store_si512(row + c, weights<kMasked>(vals, p, m, c, a.in, a.values_len));
  }
}

// Panel of rows [n0, n0 + nr) (nr <= 16 * nj), columns [0, kpad): buf[k4][nj * 16][4]: each half's
// rows expanded into rowbuf [16][kpad], then transposed from L1/L2.
template <bool kMasked>
static void pack_panel(const LinearArgs& a, int64_t n0, int nr, int nj, int64_t kpad, int8_t* rowbuf,
                       int8_t* buf) {
  const int64_t step = int64_t(nj) * 64;
  for (int h = 0; h < nj; ++h) {
    expand_rows<kMasked>(a, n0 + 16 * h, int(generic::imin(16, nr - 16 * h)), 16, kpad, rowbuf);
    for (int64_t c = 0; c < kpad; c += 64) {
      __m512i v[16];
#pragma GCC unroll 16
      for (int i = 0; i < 16; ++i) v[i] = _mm512_load_si512(rowbuf + i * kpad + c);
      transpose16(v);
      int8_t* dst = buf + (c / 4) * step + h * 64;
#pragma GCC unroll 16
      for (int t = 0; t < 16; ++t) _mm512_store_si512(dst + t * step, v[t]);
    }
  }
}

// The epilogue of row block j (rows [n0 + 16j, n0 + 16j + 16), lanes past the tile's nr rows masked off):
// its rowsum surplus, scales and bias loaded once; store() then writes one token's outputs. Every GEMM
// (VNNI tiles, AMX tiles either way round) ends in it.
struct RowBlock {
  __mmask16 km;
  int64_t n;
  __m512i surplus;
  __m512 s, bias;

  // Whether row block j holds rows of a tile of nr rows.
  static bool present(int j, int nr) { return nr - 16 * j > 0; }

  RowBlock(const LinearArgs& a, int64_t n0, int j, int nr)
      : km(__mmask16(_bzhi_u32(0xFFFFu, unsigned(generic::imin(16, nr - 16 * j))))), n(n0 + 16 * j),
        surplus(_mm512_slli_epi32(_mm512_maskz_loadu_epi32(km, a.rowsum + n), 7)),
        s(_mm512_maskz_loadu_ps(km, a.scales + n)),
        bias(a.bias ? _mm512_maskz_loadu_ps(km, a.bias + n) : _mm512_setzero_ps()) {}

  // y[m, n .. n+16) from token m's int32 dots: surplus off, row scales, token scale, bias, then the fused
  // activation in registers (the table says the GEMM applies it).
  __attribute__((always_inline)) void store(const LinearArgs& a, __m512i acc, int64_t m) const {
    const __m512 f = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc, surplus));
    __m512 v = _mm512_add_ps(_mm512_mul_ps(_mm512_mul_ps(f, s), _mm512_set1_ps(a.sx[m])), bias);
    if (a.activation != Activation::None) v = __m512(act::activate(act::Vec(v), a.activation));
    _mm512_mask_storeu_ps(a.y + m * a.out + n, km, v);
  }
};

// Scales, row-sum surplus, token scale and bias applied to MR x NJ int32 accumulators; stores
// y[m0 .. m0+MR, n0 .. n0+nr).
template <int MR, int NJ>
static inline void store_tile(const LinearArgs& a, const __m512i (&acc)[MR][NJ], int64_t m0, int64_t n0, int nr) {
#pragma GCC unroll 2
  for (int j = 0; j < NJ && RowBlock::present(j, nr); ++j) {
    const RowBlock rb(a, n0, j, nr);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) rb.store(a, acc[i][j], m0 + i);
  }
}

// acc += the dense panel's k4n steps for tokens m0 .. m0+MR.
template <int MR, int NJ>
static inline __attribute__((always_inline)) void add_dense(__m512i (&acc)[MR][NJ], const LinearArgs& a,
                                                            const int8_t* buf, int64_t k4n, int64_t m0) {
  const uint8_t* x = a.xu + m0 * a.x_stride;
  const int64_t xs = a.x_stride;
  for (int64_t k = 0; k < k4n; ++k) {
    __m512i w[NJ];
#pragma GCC unroll 2
    for (int j = 0; j < NJ; ++j) w[j] = _mm512_load_si512(buf + (k * NJ + j) * 64);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      int32_t xv;
      std::memcpy(&xv, x + i * xs + 4 * k, 4);
      const __m512i xb = _mm512_set1_epi32(xv);
#pragma GCC unroll 2
      for (int j = 0; j < NJ; ++j) acc[i][j] = _mm512_dpbusd_epi32(acc[i][j], xb, w[j]);
    }
  }
}

template <int MR, int NJ>
static inline __attribute__((always_inline)) void zero_tile(__m512i (&acc)[MR][NJ]) {
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 2
    for (int j = 0; j < NJ; ++j) acc[i][j] = _mm512_setzero_si512();
}

// y[m0 .. m0+MR, n0 .. n0+nr) from the dense panel.
template <int MR, int NJ>
static inline void micro(const LinearArgs& a, const int8_t* buf, int64_t k4n, int64_t m0, int64_t n0, int nr) {
  __m512i acc[MR][NJ];
  zero_tile<MR, NJ>(acc);
  add_dense<MR, NJ>(acc, a, buf, k4n, m0);
  store_tile<MR, NJ>(a, acc, m0, n0, nr);
}

constexpr int kMR = 6;

// Token blocks of near-equal size of at most kMost: 16 tokens at most 5 run as 4+4+4+4, not as
// 5+5+5+1, whose lone token would be one latency-bound accumulator chain. Block b of `blocks`
// starts at m0 + block_start(b) and holds block_size(b) tokens.
struct TokenBlocks {
  int64_t blocks, base, extra;
  TokenBlocks(int64_t total, int most)
      : blocks(total > 0 ? (total + most - 1) / most : 0), base(blocks ? total / blocks : 0),
        extra(blocks ? total % blocks : 0) {}
  int size(int64_t b) const { return int(base + (b < extra ? 1 : 0)); }
};

template <int NJ>
static void panel_tokens(const LinearArgs& a, const int8_t* buf, int64_t k4n, int64_t m0, int64_t m1,
                         int64_t n0, int nr) {
  const TokenBlocks tb(m1 - m0, kMR);
  int64_t m = m0;
  for (int64_t b = 0; b < tb.blocks; ++b) {
    const int size = tb.size(b);
    switch (size) {
      case 6: micro<6, NJ>(a, buf, k4n, m, n0, nr); break;
      case 5: micro<5, NJ>(a, buf, k4n, m, n0, nr); break;
      case 4: micro<4, NJ>(a, buf, k4n, m, n0, nr); break;
      case 3: micro<3, NJ>(a, buf, k4n, m, n0, nr); break;
      case 2: micro<2, NJ>(a, buf, k4n, m, n0, nr); break;
      default: micro<1, NJ>(a, buf, k4n, m, n0, nr); break;
    }
    m += size;
  }
}

// Quad panels: the sparse GEMM of masked weights. Each row's stored values are taken four at a
// time ("quads"); quad j of 16 rows is one zmm of weights plus one zmm of their column positions
// inside the quad's 64-column window. The micro-kernel loads a token's 64 activation bytes of a
// window once and, per quad, gathers each row's four activations with vpermb and multiplies them
// with vpdpbusd. Quads come in runs that share one window: (start column, quads). vpermb and
// vpdpbusd issue side by side, so a quad costs about what one dense step (4 columns) does.
//
// Zeros cost nothing but padding: a quad has a lane for each of the 32 rows whether the row has
// values for it or not. Two ways to lay quads out, the tile takes the one with fewer:
//  - fixed windows: window w = columns [64w, 64w + 64) gets q_w = max over rows of ceil(nnz / 4)
//    quads (BBS(64) and 2:4 at 50%: exactly 8, no padding);
//  - sliding windows: each quad's window starts where the tile's most lagging row has its next
//    stored value (rounded down to 32 columns), and every row takes its next (up to) four stored
//    values inside it. A row dense in one stretch spills into the next quads instead of padding
//    all 32 rows, so unstructured 50% needs ~1.06 quads per four values against ~1.29 in fixed
//    windows (binomial row counts). Windows at 32-column steps keep the runs long (one window
//    load per ~4 quads) at 1.5% more quads than 8-column steps.
// Layout: for each run, for j < quads: for h < NJ: 64 position bytes, 64 value bytes.

struct QuadRun {
  int32_t start;  // first column of the window
  int32_t quads;
};

// Quads of window w needed by the rows [n0, n0 + nr).
static inline int window_quads(const LinearArgs& a, int64_t n0, int nr, int64_t c) {
  int most = 0;
  for (int i = 0; i < nr; ++i) {
    const int n = int(_mm_popcnt_u64(mask_bits(a.mask + (n0 + i) * a.mask_stride, c, a.in)));
    most = n > most ? n : most;
  }
  return (most + 3) / 4;
}

// Fixed windows of the rows [n0, n0 + nr): quads per window into q[w] (when q is given); returns
// their sum.
static int64_t tile_quads(const LinearArgs& a, int64_t n0, int nr, int64_t windows, uint8_t* q) {
  int64_t total = 0;
  for (int64_t w = 0; w < windows; ++w) {
    const int qw = window_quads(a, n0, nr, w * 64);
    if (q) q[w] = uint8_t(qw);
    total += qw;
  }
  return total;
}

// The runs of fixed windows (those with quads); returns their count.
static int64_t window_runs(const uint8_t* q, int64_t windows, QuadRun* runs) {
  int64_t n = 0;
  for (int64_t w = 0; w < windows; ++w)
    if (q[w]) runs[n++] = QuadRun{int32_t(w * 64), int32_t(q[w])};
  return n;
}

// The fixed-window quad panel of rows [n0, n0 + nr), q[w] quads per window (from tile_quads).
static void pack_quads(const LinearArgs& a, int64_t n0, int nr, int nj, int64_t windows, const uint8_t* q,
                       int8_t* buf, __m512i* stage) {
  const int8_t* vals = static_cast<const int8_t*>(a.values);
  const __m512i iota = _mm512_set_epi8(63, 62, 61, 60, 59, 58, 57, 56, 55, 54, 53, 52, 51, 50, 49, 48, 47, 46, 45,
                                       44, 43, 42, 41, 40, 39, 38, 37, 36, 35, 34, 33, 32, 31, 30, 29, 28, 27, 26,
                                       25, 24, 23, 22, 21, 20, 19, 18, 17, 16, 15, 14, 13, 12, 11, 10, 9, 8, 7, 6,
                                       5, 4, 3, 2, 1, 0);
  const int64_t step = int64_t(nj) * 128;
  for (int h = 0; h < nj; ++h) {
    const int rows = int(generic::imin(16, nr - 16 * h));
    int64_t p[16];
    for (int i = 0; i < rows; ++i) p[i] = a.row_offsets[n0 + 16 * h + i];
    int8_t* dst = buf;
    for (int64_t w = 0; w < windows; ++w) {
      const int qw = q[w];
      __m512i* pos = stage;
      __m512i* val = stage + 16;
#pragma GCC unroll 16
      for (int i = 0; i < 16; ++i) {
        if (i >= rows) {
          pos[i] = _mm512_setzero_si512();
          val[i] = _mm512_setzero_si512();
          continue;
        }
        const uint64_t k = mask_bits(a.mask + (n0 + 16 * h + i) * a.mask_stride, w * 64, a.in);
        const int n = int(_mm_popcnt_u64(k));
        pos[i] = _mm512_maskz_compress_epi8(k, iota);
        val[i] = _mm512_maskz_mov_epi8(_bzhi_u64(~0ull, unsigned(n)), load_stream(vals, p[i], a.values_len));
        p[i] += n;
      }
      transpose16(pos);
      transpose16(val);
      for (int j = 0; j < qw; ++j) {
        _mm512_store_si512(dst + j * step + h * 128, pos[j]);
        _mm512_store_si512(dst + j * step + h * 128 + 64, val[j]);
      }
      dst += qw * step;
    }
  }
}

// First stored column at or after c of the mask row m (in when there is none).
static inline int64_t next_stored(const uint8_t* m, int64_t c, int64_t in) {
  if (c >= in) return in;
  int64_t c8 = c & ~int64_t(63);
  uint64_t bits = mask_bits(m, c8, in) & (~0ull << (c - c8));
  while (!bits) {
    c8 += 64;
    if (c8 >= in) return in;
    bits = mask_bits(m, c8, in);
  }
  return c8 + int64_t(_tzcnt_u64(bits));
}

constexpr int64_t kSlideAlign = 32;  // sliding windows start at multiples of this many columns

// Sliding quads of the rows [n0, n0 + nr): returns their count and sets *nruns. With out given,
// also writes the runs and the quads (out must hold count * NJ * 128 bytes and runs *nruns entries,
// as a first counting pass with out = runs = null says).
static int64_t slide_quads(const LinearArgs& a, int64_t n0, int nr, int64_t kpad, QuadRun* runs, int8_t* out,
                           int64_t* nruns) {
  const int8_t* vals = static_cast<const int8_t*>(a.values);
  const int64_t step = (nr > 16 ? 2 : 1) * 128;
  const uint8_t* row[kGemmRows];
  int64_t cur[kGemmRows], next[kGemmRows], p[kGemmRows];
  for (int i = 0; i < nr; ++i) {
    row[i] = a.mask + (n0 + i) * a.mask_stride;
    cur[i] = 0;
    p[i] = a.row_offsets[n0 + i];
    next[i] = next_stored(row[i], 0, a.in);
  }
  int64_t count = 0, run = -1, last_start = -1;
  for (;;) {
    int64_t lag = a.in;
    for (int i = 0; i < nr; ++i) lag = next[i] < lag ? next[i] : lag;
    if (lag >= a.in) break;
    const int64_t s = generic::imin(lag & ~(kSlideAlign - 1), kpad - 64);
    if (s != last_start) {
      ++run;
      last_start = s;
      if (runs) runs[run] = QuadRun{int32_t(s), 0};
    }
    if (runs) ++runs[run].quads;
    int8_t* quad = out ? out + count * step : nullptr;
    if (quad) std::memset(quad, 0, size_t(step));
    for (int i = 0; i < nr; ++i) {
      // done, or ahead of this window: a padding lane here (else cur <= next < s + 64)
      if (next[i] >= s + 64 || next[i] >= a.in) continue;
      uint64_t bits = mask_bits(row[i], s, a.in);
      if (cur[i] > s) bits &= ~0ull << (cur[i] - s);
      uint32_t pos = 0;
      int k = 0;
      int64_t last = 0;
      for (; k < 4 && bits; ++k, bits = _blsr_u64(bits)) {
        last = int64_t(_tzcnt_u64(bits));
        pos |= uint32_t(last) << (8 * k);
      }
      if (quad) {
        int8_t* lane = quad + (i / 16) * 128 + (i % 16) * 4;
        std::memcpy(lane, &pos, 4);
        std::memcpy(lane + 64, vals + p[i], size_t(k));
      }
      p[i] += k;
      cur[i] = k == 4 && bits ? s + last + 1 : s + 64;
      next[i] = next_stored(row[i], cur[i], a.in);
    }
    ++count;
  }
  *nruns = run + 1;
  return count;
}

// acc += the quad runs' products for tokens m0 .. m0+MR.
template <int MR, int NJ>
static inline __attribute__((always_inline)) void add_quads(__m512i (&acc)[MR][NJ], const LinearArgs& a,
                                                            const int8_t* buf, const QuadRun* runs, int64_t nruns,
                                                            int64_t m0) {
  const uint8_t* x = a.xu + m0 * a.x_stride;
  const int64_t xs = a.x_stride;
  const int8_t* p = buf;
  for (int64_t r = 0; r < nruns; ++r) {
    __m512i xw[MR];
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) xw[i] = _mm512_loadu_si512(x + i * xs + runs[r].start);
    for (int j = runs[r].quads; j > 0; --j, p += NJ * 128) {
#pragma GCC unroll 2
      for (int h = 0; h < NJ; ++h) {
        const __m512i idx = _mm512_load_si512(p + h * 128);
        const __m512i wv = _mm512_load_si512(p + h * 128 + 64);
#pragma GCC unroll 8
        for (int i = 0; i < MR; ++i)
          acc[i][h] = _mm512_dpbusd_epi32(acc[i][h], _mm512_permutexvar_epi8(idx, xw[i]), wv);
      }
    }
  }
}

template <int MR, int NJ>
static inline void micro_quads(const LinearArgs& a, const int8_t* buf, const QuadRun* runs, int64_t nruns,
                               int64_t m0, int64_t n0, int nr) {
  __m512i acc[MR][NJ];
  zero_tile<MR, NJ>(acc);
  add_quads<MR, NJ>(acc, a, buf, runs, nruns, m0);
  store_tile<MR, NJ>(a, acc, m0, n0, nr);
}

constexpr int kQuadMR = 5;

template <int MR>
struct QuadTokens {  // the token count of a micro-kernel call, as a type (quad_token_blocks)
  static constexpr int n = MR;
};

// Tokens [m0, m1) in blocks of near-equal size of at most kQuadMR: fn(QuadTokens<size>{}, first token)
// per block, so each block's micro-kernel is instantiated for its size.
template <typename Fn>
static inline void quad_token_blocks(int64_t m0, int64_t m1, Fn&& fn) {
  const TokenBlocks tb(m1 - m0, kQuadMR);
  int64_t m = m0;
  for (int64_t b = 0; b < tb.blocks; ++b) {
    const int size = tb.size(b);
    switch (size) {
      case 5: fn(QuadTokens<5>{}, m); break;
      case 4: fn(QuadTokens<4>{}, m); break;
      case 3: fn(QuadTokens<3>{}, m); break;
      case 2: fn(QuadTokens<2>{}, m); break;
      default: fn(QuadTokens<1>{}, m); break;
    }
    m += size;
  }
}

template <int NJ>
static void quad_tokens(const LinearArgs& a, const int8_t* buf, const QuadRun* runs, int64_t nruns, int64_t m0,
                        int64_t m1, int64_t n0, int nr) {
  quad_token_blocks(m0, m1, [&](auto tokens, int64_t m) {
    micro_quads<decltype(tokens)::n, NJ>(a, buf, runs, nruns, m, n0, nr);
  });
}

// Quad panels win while a tile needs at most this share of the dense steps (a quad costs about
// 1.3x a dense step: measured break-even ~0.77 on Zen 4).
constexpr int64_t kQuadShareNum = 3, kQuadShareDen = 4;

static inline bool quads_win(int64_t quads, int64_t windows) {
  return quads * kQuadShareDen <= windows * 16 * kQuadShareNum;
}

// Tokens [m0, m1) of the tile at n0 from its panel: quads (in runs) or the dense panel.
static inline void tile_tokens(const LinearArgs& a, const int8_t* data, const QuadRun* runs, int64_t nruns,
                               int64_t windows, int64_t m0, int64_t m1, int64_t n0, int nr) {
  if (runs && nr > 16) quad_tokens<2>(a, data, runs, nruns, m0, m1, n0, nr);
  else if (runs) quad_tokens<1>(a, data, runs, nruns, m0, m1, n0, nr);
  else if (nr > 16) panel_tokens<2>(a, data, windows * 16, m0, m1, n0, nr);
  else panel_tokens<1>(a, data, windows * 16, m0, m1, n0, nr);
}

// A prepared tile: a 64-byte header (byte 0: its PanelTile; bytes 4..7: the number of runs), for quads
// their runs (round64(8 * runs) bytes), then the panel.
static inline int64_t round64(int64_t n) { return (n + 63) / 64 * 64; }

// Bytes before a prepared tile's panel.
static inline int64_t tile_header(TileLayout layout) {
  return layout.kind == kDenseTile ? 64 : 64 + round64(8 * int64_t(layout.runs));
}

// The layout of the tile at n0 with the fewest steps; *bytes gets its panel's size.
static TileLayout plan_tile(const LinearArgs& a, bool masked, int64_t n0, int nr, int64_t kpad, uint8_t* q,
                            int64_t* bytes) {
  const int64_t windows = kpad / 64, nj = nr > 16 ? 2 : 1;
  *bytes = kpad / 4 * nj * 64;
  if (!masked) return {kDenseTile, 0};
  const int64_t fixed = tile_quads(a, n0, nr, windows, q);
  int64_t slide_runs = 0;
  const int64_t slides = slide_quads(a, n0, nr, kpad, nullptr, nullptr, &slide_runs);
  const bool sliding = slides < fixed;
  const int64_t quads = sliding ? slides : fixed;
  if (!quads_win(quads, windows)) return {kDenseTile, 0};
  int64_t runs = slide_runs;
  if (!sliding) {
    runs = 0;
    for (int64_t w = 0; w < windows; ++w) runs += q[w] != 0;
  }
  *bytes = quads * nj * 128;
  return {sliding ? kSlidingQuads : kFixedQuads, int32_t(runs)};
}

// Tokens [m0, m1) of a prepared tile.
static inline void prepared_tokens(const LinearArgs& a, const int8_t* tile, int64_t windows, int64_t m0, int64_t m1,
                                   int64_t n0, int nr) {
  TileLayout layout{PanelTile(tile[0]), 0};
  std::memcpy(&layout.runs, tile + 4, 4);
  const QuadRun* runs = layout.kind == kDenseTile ? nullptr : reinterpret_cast<const QuadRun*>(tile + 64);
  tile_tokens(a, tile + tile_header(layout), runs, layout.runs, windows, m0, m1, n0, nr);
}

// One part's prepared tile, read from its header.
struct PartTile {
  const int8_t* data;
  const QuadRun* runs;  // null: a dense panel
  int64_t nruns;
};

static inline PartTile part_tile(const int8_t* tile) {
  TileLayout layout{PanelTile(tile[0]), 0};
  std::memcpy(&layout.runs, tile + 4, 4);
  const QuadRun* runs = layout.kind == kDenseTile ? nullptr : reinterpret_cast<const QuadRun*>(tile + 64);
  return {tile + tile_header(layout), runs, layout.runs};
}

// y[m0 .. m0+MR, n0 .. n0+nr) = the parts' tiles summed in the accumulators, then one epilogue: the
// activations stay in registers (quads) or L1 from part to part and y is written once.
template <int MR, int NJ>
static void micro_sum(const LinearArgs& a, const PartTile* tiles, int n, int64_t windows, int64_t m0, int64_t n0,
                      int nr) {
  __m512i acc[MR][NJ];
  zero_tile<MR, NJ>(acc);
  for (int t = 0; t < n; ++t) {
    if (tiles[t].runs) add_quads<MR, NJ>(acc, a, tiles[t].data, tiles[t].runs, tiles[t].nruns, m0);
    else add_dense<MR, NJ>(acc, a, tiles[t].data, windows * 16, m0);
  }
  store_tile<MR, NJ>(a, acc, m0, n0, nr);
}

template <int NJ>
static void sum_tokens(const LinearArgs& a, const PartTile* tiles, int n, int64_t windows, int64_t m0, int64_t m1,
                       int64_t n0, int nr) {
  quad_token_blocks(m0, m1, [&](auto tokens, int64_t m) {
    micro_sum<decltype(tokens)::n, NJ>(a, tiles, n, windows, m, n0, nr);
  });
}

template <bool kMasked>
static void gemm(const LinearArgs& a, int64_t r0, int64_t r1) {
  const int64_t kpad = (a.in + 63) / 64 * 64, windows = kpad / 64;
  // Tokens in blocks whose activations stay in L2 while the panels of this range pass by.
  const int64_t mc = generic::imin(a.batch, ((int64_t(384) << 10) / a.x_stride / kMR + 1) * kMR);
  if (a.panels) {
    for (int64_t m0 = 0; m0 < a.batch; m0 += mc) {
      const int64_t m1 = generic::imin(a.batch, m0 + mc);
      for (int64_t n0 = r0; n0 < r1; n0 += kGemmRows) {
        const int nr = int(generic::imin(kGemmRows, r1 - n0));
        prepared_tokens(a, a.panels + a.panel_off[n0 / kGemmRows], windows, m0, m1, n0, nr);
      }
    }
    return;
  }
  // Per call: fixed-window quads only (sliding ones take longer to pack than a call runs).
  // dense panel kpad x 32 + its row buffer kpad x 16; quad panel up to kpad x 64; 32 staging zmm;
  // q[]; runs
  const size_t dense_bytes = size_t(kpad * (kGemmRows + 16));
  const size_t quad_bytes = kMasked ? size_t(kpad * 64 + 32 * 64 + round64(windows) + windows * 8) : 0;
  int8_t* buf = a.n_groups == 1 ? tl_panel.get(dense_bytes > quad_bytes ? dense_bytes : quad_bytes) : nullptr;
  if (!buf) {
    rows<kMasked>(a, r0, r1);
    if (a.activation != Activation::None) act::activate(a.y, a.batch, a.out, r0, r1, a.activation);
    return;
  }
  __m512i* stage = reinterpret_cast<__m512i*>(buf + kpad * 64);
  uint8_t* q = reinterpret_cast<uint8_t*>(buf + kpad * 64 + 32 * 64);
  QuadRun* runs = reinterpret_cast<QuadRun*>(buf + kpad * 64 + 32 * 64 + round64(windows));
  for (int64_t m0 = 0; m0 < a.batch; m0 += mc) {
    const int64_t m1 = generic::imin(a.batch, m0 + mc);
    for (int64_t n0 = r0; n0 < r1; n0 += kGemmRows) {
      const int nr = int(generic::imin(kGemmRows, r1 - n0));
      const int nj = nr > 16 ? 2 : 1;
      // quads only where they win; the counts are cheap, the packing is not
      const bool quads = kMasked && quads_win(tile_quads(a, n0, nr, windows, q), windows);
      if (quads) pack_quads(a, n0, nr, nj, windows, q, buf, stage);
      else pack_panel<kMasked>(a, n0, nr, nj, kpad, buf + kpad * kGemmRows, buf);
      const int64_t nruns = quads ? window_runs(q, windows, runs) : 0;
      tile_tokens(a, buf, quads ? runs : nullptr, nruns, windows, m0, m1, n0, nr);
    }
  }
}


#if defined(SP_HAVE_AMX)
// ---------------------------------------------------------------------------------------------
// AMX-INT8 (level "amx", Sapphire Rapids and later). The dense panel above, buf[k4][NJ * 16][4],
// is exactly the tile unit's B operand: a tile of 16 column quads (rows NJ * 64 bytes apart) x 16
// output rows. The A operand is 16 tokens' xu bytes as they lie (x_stride apart),
// and one tdpbusd (u8 x s8, like vpdpbusd) does 16 tokens x 16 rows x 64 columns. The epilogue is
// store_tile's (rowsum surplus, scales, bias, activation). Tiles: C 0..3 (2 token blocks x 2 row
// halves), A 4..5 (token blocks), B 6..7 (row halves), all 16 rows of 64 bytes.

struct alignas(64) AmxConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Per call: another library in this thread (oneDNN under torch) may have left its own shapes.
static inline void amx_configure() {
  AmxConfig c;
  for (int t = 0; t < 8; ++t) {
    c.colsb[t] = 64;
    c.rows[t] = 16;
  }
  _tile_loadconfig(&c);
}

constexpr int64_t kAmxAhead = 4;  // windows of panel prefetched ahead of the tile loads

thread_local Scratch tl_amx;  // C tiles [4][16][16] int32, then two padded 16-token activation blocks

// Accumulates MB token blocks x NJ row halves over all windows of the panel.
template <int MB, int NJ>
static inline void amx_block(const uint8_t* x0, const uint8_t* x1, int64_t xs, const int8_t* panel,
                             int64_t windows) {
  constexpr int64_t bs = NJ * 64, step = 16 * bs;  // panel row stride; one 64-column window
  _tile_zero(0);
  if constexpr (NJ == 2) _tile_zero(1);
  if constexpr (MB == 2) _tile_zero(2);
  if constexpr (MB == 2 && NJ == 2) _tile_zero(3);
  for (int64_t w = 0; w < windows; ++w) {
    // tile loads do not wake the hardware prefetcher: ask for the window kAmxAhead on
    if (w + kAmxAhead < windows) {
      const char* ahead = reinterpret_cast<const char*>(panel + (w + kAmxAhead) * step);
      for (int64_t l = 0; l < step; l += 64) _mm_prefetch(ahead + l, _MM_HINT_T0);
    }
    _tile_loadd(6, panel + w * step, bs);
    if constexpr (NJ == 2) _tile_loadd(7, panel + w * step + 64, bs);
    _tile_loadd(4, x0 + w * 64, xs);
    _tile_dpbusd(0, 4, 6);
    if constexpr (NJ == 2) _tile_dpbusd(1, 4, 7);
    if constexpr (MB == 2) {
      _tile_loadd(5, x1 + w * 64, xs);
      _tile_dpbusd(2, 5, 6);
      if constexpr (NJ == 2) _tile_dpbusd(3, 5, 7);
    }
  }
}

// The first `rows` of the 16 token rows at x (x_stride xs), the rest xu = 128 (xq = 0), in pad: a partial
// token block must not have the tile load read past the activations.
static inline const uint8_t* amx_pad_tokens(const uint8_t* x, int rows, int64_t xs, uint8_t* pad) {
  std::memcpy(pad, x, size_t(rows * xs));
  std::memset(pad + rows * xs, 128, size_t((16 - rows) * xs));
  return pad;
}

// y for `mt` tokens from m of C tiles c[j][16 tokens][16 rows] (row halves j < NJ).
static inline void amx_store(const LinearArgs& a, const int32_t* c, int mt, int64_t m, int64_t n0, int nr) {
  for (int j = 0; j < 2 && RowBlock::present(j, nr); ++j) {
    const RowBlock rb(a, n0, j, nr);
    for (int i = 0; i < mt; ++i) rb.store(a, _mm512_load_si512(c + (j * 16 + i) * 16), m + i);
  }
}

// Tokens [m0, m1) of the rows [n0, n0 + nr) whose dense panel is `panel`, 32 tokens at a time.
static void amx_tokens(const LinearArgs& a, const int8_t* panel, int64_t windows, int64_t m0, int64_t m1,
                       int64_t n0, int nr, int32_t* c, uint8_t* pad) {
  const int64_t xs = a.x_stride;
  for (int64_t m = m0; m < m1; m += 32) {
    const int mt0 = int(generic::imin(16, m1 - m));
    const int mt1 = int(generic::imin(16, m1 - m - mt0));
    const uint8_t* x0 = a.xu + m * xs;
    const uint8_t* x1 = x0 + 16 * xs;
    if (mt0 < 16) x0 = amx_pad_tokens(x0, mt0, xs, pad);
    if (mt1 > 0 && mt1 < 16) x1 = amx_pad_tokens(x1, mt1, xs, pad + 16 * xs);
    if (mt1 > 0) {
      if (nr > 16) amx_block<2, 2>(x0, x1, xs, panel, windows);
      else amx_block<2, 1>(x0, x1, xs, panel, windows);
      _tile_stored(2, c + 512, 64);
      if (nr > 16) _tile_stored(3, c + 768, 64);
    } else {
      if (nr > 16) amx_block<1, 2>(x0, x1, xs, panel, windows);
      else amx_block<1, 1>(x0, x1, xs, panel, windows);
    }
    _tile_stored(0, c, 64);
    if (nr > 16) _tile_stored(1, c + 256, 64);
    amx_store(a, c, mt0, m, n0, nr);
    if (mt1 > 0) amx_store(a, c + 512, mt1, m + 16, n0, nr);
  }
}

// Quads stay where they take at most this share of the dense panel's bytes: the tile unit multiplies
// a dense panel far faster than the vector quads do, so only sparse tiles (~80% and up) gain more from
// the fewer bytes of quads (4096 x 4096 at 16 tokens, Sapphire Rapids: 75% dense panel 1.00 ms, quads
// 1.13 ms; 90% quads 0.67 ms). It also keeps the elastic segments (~80-90% sparse) on small quads.
constexpr int64_t kAmxQuadShareNum = 11, kAmxQuadShareDen = 20;

// ---- Without prepared panels: the packed rows as the A operand ----
// vpexpandb leaves a row's 64 columns in place, which is how the A operand wants them (16 weight rows x
// 64 columns), so the weights need no transpose: the bytes read per call are the packed stream's (0.62
// per weight at 50%, against the dense panel's 1.0). The activations become the B operand (16 column
// quads x 16 tokens: xt, transposed once per task) and the C tiles hold rows x tokens, transposed in
// the epilogue (once per 16 x 16 outputs).

// B tiles of tokens [m0, m1): xt[token block][window][16 quads][16 tokens][4 bytes]; tokens past m1 are
// xu = 128 (their outputs are never stored).
static void amx_transpose_tokens(const LinearArgs& a, int64_t m0, int64_t m1, int64_t windows, int8_t* xt) {
  const int64_t xs = a.x_stride;
  for (int64_t tb = 0; tb * 16 < m1 - m0; ++tb) {
    const int64_t rows = generic::imin(16, m1 - m0 - tb * 16);
    const uint8_t* x = a.xu + (m0 + tb * 16) * xs;
    for (int64_t w = 0; w < windows; ++w) {
      __m512i v[16];
#pragma GCC unroll 16
      for (int i = 0; i < 16; ++i)
        v[i] = i < rows ? _mm512_loadu_si512(x + i * xs + w * 64) : _mm512_set1_epi8(char(0x80));
      transpose16(v);
      int8_t* dst = xt + (tb * windows + w) * 1024;
#pragma GCC unroll 16
      for (int g = 0; g < 16; ++g) _mm512_store_si512(dst + g * 64, v[g]);
    }
  }
}

// y of `mt` tokens from m and rows [n0, n0 + nr) from C tiles c[j][16 rows][16 tokens] (row halves j):
// each 16 x 16 block transposed to tokens x rows, then store_tile's epilogue.
static inline void amx_store_transposed(const LinearArgs& a, const int32_t* c, int mt, int64_t m, int64_t n0,
                                        int nr) {
  for (int j = 0; j < 2 && RowBlock::present(j, nr); ++j) {
    __m512i v[16];
#pragma GCC unroll 16
    for (int i = 0; i < 16; ++i) v[i] = _mm512_load_si512(c + (j * 16 + i) * 16);
    transpose16(v);
    const RowBlock rb(a, n0, j, nr);
    for (int t = 0; t < mt; ++t) rb.store(a, v[t], m + t);
  }
}

// Rows [n0, n0 + nr) expanded, window after window, into win[32 rows][64] (rows past nr zero); p: the
// rows' positions in the value stream, advanced past each window.
template <bool kMasked>
static inline void amx_expand_window(const LinearArgs& a, int64_t n0, int nr, int64_t c, int64_t* p, int8_t* win) {
  const int8_t* vals = static_cast<const int8_t*>(a.values);
  for (int i = 0; i < nr; ++i) {
    const int64_t r = n0 + i;
    const uint8_t* m = kMasked ? a.mask + r * a.mask_stride : nullptr;
    _mm512_store_si512(win + i * 64, weights<kMasked>(vals, p[i], m, c, a.in, a.values_len));
  }
}

// C tiles 0..3 of one 32-token pair: rows halves (A 4, 5) x token blocks (B 6, 7), stored to c.
template <int MB, int NJ>
static inline void amx_store_c(int32_t* c) {
  _tile_stored(0, c, 64);
  if constexpr (NJ == 2) _tile_stored(2, c + 256, 64);
  if constexpr (MB == 2) _tile_stored(1, c + 512, 64);
  if constexpr (MB == 2 && NJ == 2) _tile_stored(3, c + 768, 64);
}

template <int MB, int NJ>
static inline void amx_zero_c() {
  _tile_zero(0);
  if constexpr (NJ == 2) _tile_zero(2);
  if constexpr (MB == 2) _tile_zero(1);
  if constexpr (MB == 2 && NJ == 2) _tile_zero(3);
}

// One window: A tiles from `w0` (row half 0) and `w1` (row half 1), `ws` bytes between rows; B tiles
// from xt blocks b0, b1. C tile (row half h, token block t) is tile h * 2 + t.
template <int MB, int NJ>
static inline __attribute__((always_inline)) void amx_window(const int8_t* w0, const int8_t* w1, int64_t ws,
                                                             const int8_t* b0, const int8_t* b1) {
  _tile_loadd(6, b0, 64);
  _tile_loadd(4, w0, ws);
  _tile_dpbsud(0, 4, 6);
  if constexpr (MB == 2) {
    _tile_loadd(7, b1, 64);
    _tile_dpbsud(1, 4, 7);
  }
  if constexpr (NJ == 2) {
    _tile_loadd(5, w1, ws);
    _tile_dpbsud(2, 5, 6);
    if constexpr (MB == 2) _tile_dpbsud(3, 5, 7);
  }
}

// Up to 32 tokens (one pair of token blocks): each window expanded into the L1 buffer `win` and
// multiplied at once; the 32 rows' streams advance together (each prefetched ahead by weights()).
template <bool kMasked, int MB, int NJ>
static void amx_rows_few(const LinearArgs& a, int64_t n0, int nr, int64_t windows, const int8_t* xt, int8_t* win,
                         int32_t* c) {
  int64_t p[kGemmRows];
  for (int i = 0; i < nr; ++i) p[i] = kMasked ? a.row_offsets[n0 + i] : (n0 + i) * a.in;
  if (nr < kGemmRows) std::memset(win + nr * 64, 0, size_t((kGemmRows - nr) * 64));
  amx_zero_c<MB, NJ>();
  for (int64_t w = 0; w < windows; ++w) {
    amx_expand_window<kMasked>(a, n0, nr, w * 64, p, win);
    amx_window<MB, NJ>(win, win + 16 * 64, 64, xt + w * 1024, xt + (windows + w) * 1024);
  }
  amx_store_c<MB, NJ>(c);
}

// Many tokens: the 32 rows expanded once, one row after the other (sequential streams), into
// panel[32][kpad]; then every token pair of xt reads them from there.
template <int MB, int NJ>
static void amx_rows_pair(const int8_t* panel, int64_t kpad, int64_t windows, const int8_t* xt, int32_t* c) {
  amx_zero_c<MB, NJ>();
  for (int64_t w = 0; w < windows; ++w)
    amx_window<MB, NJ>(panel + w * 64, panel + 16 * kpad + w * 64, kpad, xt + w * 1024, xt + (windows + w) * 1024);
  amx_store_c<MB, NJ>(c);
}

template <bool kMasked>
static void amx_rows(const LinearArgs& a, int64_t r0, int64_t r1, int8_t* scratch, int64_t mc) {
  const int64_t kpad = (a.in + 63) / 64 * 64, windows = kpad / 64;
  int32_t* c = reinterpret_cast<int32_t*>(scratch);
  int8_t* win = scratch + 4096;                   // 32 x 64 (few tokens) or 32 x kpad (many)
  int8_t* xt = win + kGemmRows * kpad;            // round up(mc, 32) x kpad
  for (int64_t m0 = 0; m0 < a.batch; m0 += mc) {
    const int64_t m1 = generic::imin(a.batch, m0 + mc);
    amx_transpose_tokens(a, m0, m1, windows, xt);
    for (int64_t n0 = r0; n0 < r1; n0 += kGemmRows) {
      const int nr = int(generic::imin(kGemmRows, r1 - n0));
      const bool two_halves = nr > 16;
      if (m1 - m0 <= 32) {
        const int mt0 = int(generic::imin(16, m1 - m0)), mt1 = int(m1 - m0) - mt0;
        if (mt1 > 0 && two_halves) amx_rows_few<kMasked, 2, 2>(a, n0, nr, windows, xt, win, c);
        else if (mt1 > 0) amx_rows_few<kMasked, 2, 1>(a, n0, nr, windows, xt, win, c);
        else if (two_halves) amx_rows_few<kMasked, 1, 2>(a, n0, nr, windows, xt, win, c);
        else amx_rows_few<kMasked, 1, 1>(a, n0, nr, windows, xt, win, c);
        amx_store_transposed(a, c, mt0, m0, n0, nr);
        if (mt1 > 0) amx_store_transposed(a, c + 512, mt1, m0 + 16, n0, nr);
        continue;
      }
      expand_rows<kMasked>(a, n0, nr, kGemmRows, kpad, win);
      for (int64_t m = m0; m < m1; m += 32) {
        const int mt0 = int(generic::imin(16, m1 - m)), mt1 = int(generic::imin(16, m1 - m - mt0));
        const int8_t* x = xt + (m - m0) / 16 * windows * 1024;
        if (mt1 > 0 && two_halves) amx_rows_pair<2, 2>(win, kpad, windows, x, c);
        else if (mt1 > 0) amx_rows_pair<2, 1>(win, kpad, windows, x, c);
        else if (two_halves) amx_rows_pair<1, 2>(win, kpad, windows, x, c);
        else amx_rows_pair<1, 1>(win, kpad, windows, x, c);
        amx_store_transposed(a, c, mt0, m, n0, nr);
        if (mt1 > 0) amx_store_transposed(a, c + 512, mt1, m + 16, n0, nr);
      }
    }
  }
}

template <bool kMasked>
static void amx_gemm(const LinearArgs& a, int64_t r0, int64_t r1) {
  const int64_t kpad = (a.in + 63) / 64 * 64, windows = kpad / 64, xs = a.x_stride;
  if (a.n_groups != 1) {
    gemm<kMasked>(a, r0, r1);
    return;
  }
  if (a.panels) {  // prepared panels: weights as the B operand (amx_tokens)
    int8_t* scratch = tl_amx.get(size_t(4096 + 32 * xs));
    if (!scratch) {
      gemm<kMasked>(a, r0, r1);
      return;
    }
    int32_t* c = reinterpret_cast<int32_t*>(scratch);
    uint8_t* pad = reinterpret_cast<uint8_t*>(scratch + 4096);
    // token blocks whose activations stay in L2 while the panels of this range pass by
    const int64_t mc = ((int64_t(768) << 10) / xs / 32 + 1) * 32;
    amx_configure();
    for (int64_t m0 = 0; m0 < a.batch; m0 += mc) {
      const int64_t m1 = generic::imin(a.batch, m0 + mc);
      for (int64_t n0 = r0; n0 < r1; n0 += kGemmRows) {
        const int nr = int(generic::imin(kGemmRows, r1 - n0));
        const int8_t* tile = a.panels + a.panel_off[n0 / kGemmRows];
        if (PanelTile(tile[0]) == kDenseTile) amx_tokens(a, tile + 64, windows, m0, m1, n0, nr, c, pad);
        else prepared_tokens(a, tile, windows, m0, m1, n0, nr);  // quads of a sparse tile
      }
    }
    _tile_release();
    return;
  }
  // per call: tokens in blocks whose transposed activations stay in L2 (a multiple of 32)
  const int64_t mc = std::max<int64_t>(32, (int64_t(512) << 10) / kpad / 32 * 32);
  const int64_t mpad = (generic::imin(mc, a.batch) + 31) / 32 * 32;
  int8_t* scratch = tl_amx.get(size_t(4096 + kGemmRows * kpad + mpad * kpad));
  if (!scratch) {
    gemm<kMasked>(a, r0, r1);
    return;
  }
  amx_configure();
  amx_rows<kMasked>(a, r0, r1, scratch, mc);
  _tile_release();
}
#endif  // SP_HAVE_AMX

}  // namespace

int64_t tile_panel_bytes(const LinearArgs& a, bool masked, int64_t n0, TileLayout* layout) {
  const int64_t kpad = (a.in + 63) / 64 * 64;
  uint8_t* q = reinterpret_cast<uint8_t*>(tl_counts.get(size_t(kpad / 64)));
  if (!q) return -1;
  int64_t bytes = 0;
  *layout = plan_tile(a, masked, n0, int(generic::imin(kGemmRows, a.out - n0)), kpad, q, &bytes);
  return tile_header(*layout) + bytes;
}

bool pack_tile_panel(const LinearArgs& a, bool masked, int64_t n0, TileLayout layout, int8_t* tile) {
  const int64_t kpad = (a.in + 63) / 64 * 64, windows = kpad / 64;
  int8_t* rowbuf = tl_panel.get(size_t(kpad * 16));
  uint8_t* q = reinterpret_cast<uint8_t*>(tl_counts.get(size_t(windows)));
  if (!rowbuf || !q) return false;
  alignas(64) __m512i stage[32];
  const int nr = int(generic::imin(kGemmRows, a.out - n0));
  const int nj = nr > 16 ? 2 : 1;
  std::memset(tile, 0, 64);
  tile[0] = layout.kind;
  std::memcpy(tile + 4, &layout.runs, 4);
  QuadRun* runs = reinterpret_cast<QuadRun*>(tile + 64);
  int8_t* data = tile + tile_header(layout);
  int64_t written = 0;  // runs: layout.runs, as sizing counted them
  if (layout.kind == kSlidingQuads) {
    slide_quads(a, n0, nr, kpad, runs, data, &written);
  } else if (layout.kind == kFixedQuads) {
    tile_quads(a, n0, nr, windows, q);
    window_runs(q, windows, runs);
    pack_quads(a, n0, nr, nj, windows, q, data, stage);
  } else if (masked) {
    pack_panel<true>(a, n0, nr, nj, kpad, rowbuf, data);
  } else {
    pack_panel<false>(a, n0, nr, nj, kpad, rowbuf, data);
  }
  return true;
}

#if defined(SP_HAVE_AMX)
void amx_masked_gemm_i8(const LinearArgs& a, int64_t r0, int64_t r1) { amx_gemm<true>(a, r0, r1); }
void amx_dense_gemm_i8(const LinearArgs& a, int64_t r0, int64_t r1) { amx_gemm<false>(a, r0, r1); }

int64_t amx_tile_panel_bytes(const LinearArgs& a, bool masked, int64_t n0, TileLayout* layout) {
  const int64_t kpad = (a.in + 63) / 64 * 64;
  const int64_t dense = kpad / 4 * (a.out - n0 > 16 ? 2 : 1) * 64;
  const int64_t bytes = tile_panel_bytes(a, masked, n0, layout);
  if (bytes < 0) return bytes;
  if (layout->kind != kDenseTile && (bytes - tile_header(*layout)) * kAmxQuadShareDen <= dense * kAmxQuadShareNum)
    return bytes;
  *layout = {kDenseTile, 0};
  return tile_header(*layout) + dense;
}

bool amx_pack_tile_panel(const LinearArgs& a, bool masked, int64_t n0, TileLayout layout, int8_t* tile) {
  return pack_tile_panel(a, masked, n0, layout, tile);
}
#endif

void masked_gemm_i8_sum(const LinearArgs* parts, int n_parts, const LinearArgs& sum, int64_t r0, int64_t r1) {
  const int64_t kpad = (sum.in + 63) / 64 * 64, windows = kpad / 64;
  const int64_t mc = generic::imin(sum.batch, ((int64_t(384) << 10) / sum.x_stride / kMR + 1) * kMR);
  PartTile tiles[kMaxSumParts];
  const int n = n_parts < kMaxSumParts ? n_parts : kMaxSumParts;
  for (int64_t m0 = 0; m0 < sum.batch; m0 += mc) {
    const int64_t m1 = generic::imin(sum.batch, m0 + mc);
    for (int64_t n0 = r0; n0 < r1; n0 += kGemmRows) {
      const int nr = int(generic::imin(kGemmRows, r1 - n0));
      for (int t = 0; t < n; ++t) tiles[t] = part_tile(parts[t].panels + parts[t].panel_off[n0 / kGemmRows]);
      if (nr > 16) sum_tokens<2>(sum, tiles, n, windows, m0, m1, n0, nr);
      else sum_tokens<1>(sum, tiles, n, windows, m0, m1, n0, nr);
    }
  }
}
void masked_i8(const LinearArgs& a, int64_t r0, int64_t r1) { rows<true>(a, r0, r1); }
void dense_i8(const LinearArgs& a, int64_t r0, int64_t r1) { rows<false>(a, r0, r1); }
void csr_i8(const LinearArgs& a, int64_t r0, int64_t r1) { generic::csr_i8(a, r0, r1); }
void gather_i8(const LinearArgs& a, int64_t r0, int64_t r1) {
  if (a.gather_layout != GatherLayout::Windows256) {
    generic::gather_i8(a, r0, r1);
    return;
  }
  int64_t b = 0;
  for (; b + 2 <= a.batch; b += 2) window_rows<2>(a, r0, r1, b);
  if (b < a.batch) window_rows<1>(a, r0, r1, b);
}
void masked_gemm_i8(const LinearArgs& a, int64_t r0, int64_t r1) { gemm<true>(a, r0, r1); }
void dense_gemm_i8(const LinearArgs& a, int64_t r0, int64_t r1) { gemm<false>(a, r0, r1); }

void quantize(const float* x, int64_t b0, int64_t b1, int64_t in, int64_t stride, int8_t* xq, uint8_t* xu,
              float* sx) {
  // xq null: xu only (what the GEMM reads; half the bytes written)
  const __m512i lo = _mm512_set1_epi8(-127), bias = _mm512_set1_epi8(char(0x80));
  // packs interleave 128-bit lanes: dword t of lane l holds bytes of source vector t, lane l
  const __m512i order = _mm512_set_epi32(15, 11, 7, 3, 14, 10, 6, 2, 13, 9, 5, 1, 12, 8, 4, 0);
  for (int64_t b = b0; b < b1; ++b) {
    const float* row = x + b * in;
    __m512 m0 = _mm512_setzero_ps(), m1 = m0;
    int64_t j = 0;
    for (; j + 32 <= in; j += 32) {
      m0 = _mm512_max_ps(m0, _mm512_abs_ps(_mm512_loadu_ps(row + j)));
      m1 = _mm512_max_ps(m1, _mm512_abs_ps(_mm512_loadu_ps(row + j + 16)));
    }
    for (; j < in; j += 16) {
      const __mmask16 k = j + 16 <= in ? __mmask16(0xFFFF) : __mmask16(_bzhi_u32(0xFFFFu, unsigned(in - j)));
      m0 = _mm512_max_ps(m0, _mm512_abs_ps(_mm512_maskz_loadu_ps(k, row + j)));
    }
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(m0, m1));
    const float s = amax == 0.f ? 1.f : amax / 127.f;
    sx[b] = s;
    const __m512 sv = _mm512_set1_ps(s);
    int8_t* q = xq ? xq + b * stride : nullptr;
    uint8_t* u = xu + b * stride;
    // 64 columns per step, padding [in, stride) with q = 0; whole 64-byte stores (masked byte stores
    // are slow on Zen 4: they took half of this function's time), a masked one only for a ragged end
    for (j = 0; j < stride; j += 64) {
      __m512i w[4];
#pragma GCC unroll 4
      for (int t = 0; t < 4; ++t) {
        const int64_t c = j + 16 * t;
        const __mmask16 k = c + 16 <= in ? __mmask16(0xFFFF)
                            : c < in     ? __mmask16(_bzhi_u32(0xFFFFu, unsigned(in - c)))
                                         : __mmask16(0);
        // division: rounds like torch; cvtps2dq rounds half to even (default MXCSR), as torch.round
        w[t] = _mm512_cvtps_epi32(_mm512_div_ps(_mm512_maskz_loadu_ps(k, row + c), sv));
      }
      const __m512i packed = _mm512_packs_epi16(_mm512_packs_epi32(w[0], w[1]), _mm512_packs_epi32(w[2], w[3]));
      const __m512i qv = _mm512_max_epi8(_mm512_permutexvar_epi32(order, packed), lo);
      if (j + 64 <= stride) {
        if (xq) _mm512_storeu_si512(q + j, qv);
        _mm512_storeu_si512(u + j, _mm512_xor_si512(qv, bias));
      } else {
        const __mmask64 ks = _bzhi_u64(~0ull, unsigned(stride - j));
        if (xq) _mm512_mask_storeu_epi8(q + j, ks, qv);
        _mm512_mask_storeu_epi8(u + j, ks, _mm512_xor_si512(qv, bias));
      }
    }
  }
}


}  // namespace avx512
}  // namespace sp
