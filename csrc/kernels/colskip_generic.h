// Portable column-skip kernels (csrc/colskip.h), compiled once per ISA tree like generic.h: the
// scalar tree runs them, the SIMD trees share their group bookkeeping.
#include <cstdint>
#include <cstring>

#include "colskip_args.h"

#ifndef SP_ISA_NS
#error "define SP_ISA_NS before including kernels/colskip_generic.h"
#endif

namespace sp {
namespace SP_ISA_NS {
namespace colgeneric {

// Row of position p of a 64-row block (position 4i + k holds row 16k + i).
static inline int64_t block_row(int64_t p) { return 16 * (p & 3) + (p >> 2); }

// The signed activation of token b at listed column j.
static inline int32_t xval(const ColSkipArgs& c, int64_t j, int64_t b) {
  return int32_t(int8_t(uint8_t(c.xv[j * c.batch + b])));
}

// Listed columns [j0, j1) into acc, all of one scale group (or no groups): acc += (w + 128) * xq.
static void add_columns(const ColSkipArgs& c, int64_t j0, int64_t j1, int32_t* acc) {
  const int64_t blocks = c.out_pad / kColBlock;
  for (int64_t j = j0; j < j1; ++j) {
    const uint8_t* chunk = c.data + c.col_off[c.cols[j]];
    for (int64_t blk = 0; blk < blocks; ++blk) {
      uint8_t w[kColBlock];
      if (c.sparse) {
        uint64_t mask;
        std::memcpy(&mask, chunk, 8);
        chunk += 8;
        for (int p = 0; p < kColBlock; ++p)
          w[p] = (mask >> p) & 1 ? uint8_t(*chunk++ ^ 0x80) : uint8_t(128);
      } else {
        std::memcpy(w, chunk, kColBlock);
        chunk += kColBlock;
      }
      for (int64_t b = 0; b < c.batch; ++b) {
        const int32_t x = xval(c, j, b);
        if (x == 0) continue;
        int32_t* row = acc + b * c.out_pad + blk * kColBlock;
        for (int p = 0; p < kColBlock; ++p) row[block_row(p)] += int32_t(w[p]) * x;
      }
    }
  }
}

// facc += scale of group g * (acc - 128 * sum of xq over the run [j0, j1)); acc = 0.
static void flush_group(const ColSkipArgs& c, int64_t g, int64_t j0, int64_t j1, int32_t* acc, float* facc) {
  const float* s = c.scales_t + g * c.out_pad;
  for (int64_t b = 0; b < c.batch; ++b) {
    int32_t sum = 0;
    for (int64_t j = j0; j < j1; ++j) sum += xval(c, j, b);
    int32_t* a = acc + b * c.out_pad;
    float* f = facc + b * c.out_pad;
    for (int64_t r = 0; r < c.out_pad; ++r) {
      f[r] += s[r] * float(a[r] - 128 * sum);
      a[r] = 0;
    }
  }
}

// Splits [j0, j1) into runs of one scale group each: add(j, k) for each run, then flush (grouped
// weights only). The SIMD trees pass their own add and flush.
template <typename Add, typename Flush>
static inline void for_group_runs(const ColSkipArgs& c, int64_t j0, int64_t j1, Add add, Flush flush) {
  if (c.n_groups <= 1) {
    add(j0, j1);
    return;
  }
  int64_t j = j0;
  while (j < j1) {
    const int64_t g = c.cols[j] / c.group_size, end_col = (g + 1) * c.group_size;
    int64_t k = j + 1;
    while (k < j1 && c.cols[k] < end_col) ++k;
    add(j, k);
    flush(g, j, k);
    j = k;
  }
}

static void accumulate(const ColSkipArgs& c, int64_t j0, int64_t j1, int32_t* acc, float* facc) {
  for_group_runs(
      c, j0, j1, [&](int64_t a, int64_t b) { add_columns(c, a, b, acc); },
      [&](int64_t g, int64_t a, int64_t b) { flush_group(c, g, a, b, acc, facc); });
}

static void finish(const ColSkipArgs& c, int64_t r0, int64_t r1) {
  const int64_t part = c.batch * c.out_pad;
  for (int64_t b = 0; b < c.batch; ++b) {
    float* y = c.y + b * c.out;
    const float sx = c.sx[b];
    if (c.n_groups > 1) {
      const float* f = c.facc + b * c.out_pad;
      for (int64_t r = r0; r < r1; ++r) {
        float sum = 0.f;
        for (int64_t t = 0; t < c.parts; ++t) sum += f[t * part + r];
        y[r] = sum * sx + (c.bias ? c.bias[r] : 0.f);
      }
    } else {
      const int32_t* a = c.acc + b * c.out_pad;
      const int32_t surplus = 128 * c.xsum[b];
      for (int64_t r = r0; r < r1; ++r) {
        int32_t sum = -surplus;
        for (int64_t t = 0; t < c.parts; ++t) sum += a[t * part + r];
        y[r] = float(sum) * c.scales[r] * sx + (c.bias ? c.bias[r] : 0.f);
      }
    }
  }
}

}  // namespace colgeneric
}  // namespace SP_ISA_NS
}  // namespace sp
