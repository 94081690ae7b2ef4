// Activation sparsity at run time: inputs below a layer's threshold are zeroed, and at small token
// counts the weight columns of zero inputs are never read.
//
// Why a second layout: the row kernels read every weight of a row whatever its input, so zeroing
// half the inputs saves nothing on a GEMV, whose time is the weight bytes streamed from DRAM. Here a
// weight is also prepared column-major ("column chunks": each input column's weights contiguous,
// all output rows of it in one stream), and a call reads only the chunks of the columns some token
// needs. Chunks are whole columns (out bytes dense int8), not short panels: this machine's DRAM
// served 50%-random 256-byte chunks at 7-8 GB/s against 17 GB/s sequential (the hardware prefetcher
// streams the gaps too), 4 KiB+ chunks at 10-13 GB/s.
//
// Layout of one column chunk, in 64-row blocks (out padded to a multiple of 64):
//   dense: 64 bytes per block, u8 = w + 128, position 4i + k holding row 16k + i of the block;
//   sparse (bitmask / nm / bbs with few enough values): per block a 64-bit mask of the positions
//   that hold a weight (bit p = position p, same row order), then the block's stored weights, s8,
//   in position order (the kernels expand them and flip the sign bit to get w + 128).
// The row order lets a u8 x s8 dot product (vpdpbusd, vpmaddubsw) with the token's activation
// byte at byte k of each 32-bit lane (zero elsewhere) add row 16k + i of one column into lane i:
// four such products per block fill four vectors of 16 consecutive rows. The surplus 128 * sum(xq)
// of w + 128 is taken off per token (per scale group) afterwards.
#pragma once
#include <cstdint>

#include "colskip_args.h"
#include "owned_array.h"
#include "common.h"
#include "plan.h"

namespace sp {

// The column-skip kernels of the active tree (the portable ones where a tree has none of its own).
const ColSkipKernels& active_colskip();

// A weight's column chunks, prepared once (for layers that have activation thresholds).
struct ColPanels {
  bool sparse = false;
  int64_t out_pad = 0, in = 0, bytes = 0, scales_bytes = 0;
  OwnedArray<uint8_t> data;
  OwnedArray<int64_t> col_off;
  OwnedArray<float> scales_t;
  // Bytes beside the packed weight (chunks, offsets, transposed scales).
  int64_t total_bytes() const;
};

// Whether a weight of this kind can have column chunks (int8 dense or masked rows of at least
// kColSkipMinWeights weights unless the policy is 2; one scale per row needs in <= kColSkipMaxIn).
// Replicated (elastic) weights have none.
bool colskip_supported(Kind kind, const LinearArgs& a);

// The column chunks of an int8 weight (empty when unsupported or out of memory); `threads` share the
// packing. Masked weights take the sparse layout when they store at most kSparseChunkDensity of
// their weights, else the dense one.
ColPanels prepare_colpanels(Kind kind, const LinearArgs& a, int threads);

// Which path a thresholded call may take: 0 = measured (active_colskip's densities), 1 = never skip
// columns, 2 = always skip them (up to kColSkipMaxBatch tokens; tests).
void set_colskip_policy(int policy);
int colskip_policy();

// A call with activation threshold t > 0: inputs with |x| < t are zeroed (into a buffer of this
// thread), then the column-skip path runs when `cp` is ready, the call has at most kColSkipMaxBatch
// tokens and few enough listed columns; else the usual kernels run on the zeroed inputs. Results
// equal those of run_linear on the zeroed inputs. `skipped` (optional) says which path ran.
void run_linear_sparse_inputs(Kind kind, LinearArgs a, float threshold, const ColPanels* cp, int n_threads,
                              bool* skipped = nullptr);

// Whether a call would use column chunks if its layer had them: a threshold, few enough tokens, and a
// policy that allows skipping.
bool wants_colpanels(float threshold, int64_t batch);

}  // namespace sp
