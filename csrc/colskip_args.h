// Types the column-skip kernels of every ISA tree share (see colskip.h for the layout). Only plain
// types and declarations: each tree includes this with its own -m flags.
#pragma once
#include <cstdint>

namespace sp {

constexpr int64_t kColBlock = 64;       // rows per block of a column chunk
constexpr int kColSkipMaxBatch = 8;      // tokens up to which a call may skip columns
constexpr int64_t kColSkipMaxIn = 65536;  // one scale per row: int32 sums stay exact up to here
constexpr int64_t kColSkipMinWeights = int64_t(8) << 20;  // smaller layers never skip (colskip.cpp)

// One call of the column-skipping kernels (filled by run_colskip; read by the ISA trees).
struct ColSkipArgs {
  int64_t batch = 0, in = 0, out = 0, out_pad = 0;
  bool sparse = false;
  const uint8_t* data = nullptr;    // column chunks
  const int64_t* col_off = nullptr;  // [in] byte offset of column c's chunk in data
  const int32_t* cols = nullptr;     // the listed columns (some token's input is not zero), ascending
  int64_t n_cols = 0;
  const uint8_t* xv = nullptr;       // [n_cols, batch]: token b's activation byte at cols[j], as u8 (0: zero)
  int64_t n_groups = 1, group_size = 0;
  const float* scales_t = nullptr;  // grouped weights: scales transposed, [n_groups, out_pad]
  // what ColFinishFn reads: the parts' sums, `parts` blocks of [batch, out_pad] one after another
  // (int32 acc; float facc for grouped weights)
  const int32_t* acc = nullptr;
  const float* facc = nullptr;
  int64_t parts = 0;
  const int32_t* xsum = nullptr;  // [batch] sum of xq over all columns (one scale per row)
  const float* sx = nullptr;      // [batch] activation scales
  const float* scales = nullptr;  // [out] one scale per row
  const float* bias = nullptr;    // [out] or null
  float* y = nullptr;             // [batch, out]
};

// Adds the listed columns [j0, j1) into acc (int32 [batch, out_pad], rows in natural order) as
// sum over columns of (w + 128) * xq. Grouped weights (n_groups > 1): at the end of each group's run
// of columns within [j0, j1), facc (float [batch, out_pad]) += scale * (acc - 128 * run sum of xq)
// and acc is reset, so acc holds nothing on return.
using ColAccumulateFn = void (*)(const ColSkipArgs&, int64_t j0, int64_t j1, int32_t* acc, float* facc);
// y[b, r0 .. r1) from the parts' sums: (sum acc - 128 xsum[b]) * scales[r] * sx[b] + bias[r], or for
// grouped weights (sum facc) * sx[b] + bias[r].
using ColFinishFn = void (*)(const ColSkipArgs&, int64_t r0, int64_t r1);

// What a kernel tree offers for column skipping.
struct ColSkipKernels {
  ColAccumulateFn accumulate;
  ColFinishFn finish;
  // Skip columns when at most this share of the inputs is listed, by token count (index 0 unused):
  // measured per tree (benchmarks/activation_kernels.py --crossover) where skipping stops paying.
  float max_density[kColSkipMaxBatch + 1];
  float max_density_sparse[kColSkipMaxBatch + 1];
};

// Each tree's column-skip kernels (the trees of this machine's architecture are built; see common.h).
namespace scalar { const ColSkipKernels& colskip(); }
#if defined(__x86_64__)
namespace avx2 { const ColSkipKernels& colskip(); }
namespace avx2vnni { const ColSkipKernels& colskip(); }
namespace avx512 { const ColSkipKernels& colskip(); }
#elif defined(__aarch64__)
namespace neon { const ColSkipKernels& colskip(); }
namespace neondot { const ColSkipKernels& colskip(); }
#endif

}  // namespace sp
