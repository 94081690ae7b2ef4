// Gather rows: a few-token layout for very sparse masked int8 weights. A bitmask kernel spends work on
// every column (each mask byte must be decoded, kept weights or not), so above ~75% sparsity it stops
// getting faster; gather rows re-lay each row as records of eight stored values with their column
// offsets, and a kernel then spends work per stored value. Two layouts (LinearArgs::gather_recs documents
// both), one per kind of kernel: Records8 (eight values and their offsets from a moving base: AVX2 fetches
// the eight activations with scalar loads) and Windows256 (per 256-column window its values' offsets
// within the window: AVX-512 fetches up to 64 activations with two vpermt2b from the window's four
// registers). At 90% either costs ~2 bytes per value against the bitmask's 2.25 (mask + value), so the
// layout is no bigger than the stream it copies. Prepared once per weight (beside the mask stream, which
// the other paths keep reading), in the layout of the active tree's kernel.
#pragma once
#include <cstdint>

#include "common.h"
#include "owned_array.h"

namespace sp {

constexpr int kGatherChunk = 8;             // values per record
constexpr int64_t kGatherRecordBytes = 16;  // their eight offsets, then the eight values

// Stored density (values / weights) at or below which a masked int8 weight gets gather rows, per layout
// (where they measured faster than the trees' mask-stream rows at one token: AVX2 up to 20%, AVX-512 up to
// 15%, LLaMA-7B shapes on a Zen 4).
static inline double gather_max_density(GatherLayout layout) {
  return layout == GatherLayout::Records8 ? 0.2 : 0.15;
}

struct GatherRows {
  GatherLayout layout = GatherLayout::Records8;
  OwnedArray<uint8_t> records;
  OwnedArray<int64_t> chunks;  // [out + 1]: where each row starts, in records (Records8) or bytes
  int64_t out = 0;
  int64_t bytes() const {
    if (!records) return 0;
    return chunks[out] * (layout == GatherLayout::Records8 ? kGatherRecordBytes : 1) + (out + 1) * 8;
  }
};

// Row r of a masked int8 stream (a.mask, a.values, a.row_offsets) in `layout`: written to `out` when
// given (room for what a call with null returned), its size (records or bytes, as GatherRows::chunks
// counts) returned either way.
int64_t pack_gather_row(const LinearArgs& a, int64_t r, GatherLayout layout, uint8_t* out);

// Gather rows of the masked int8 weight `a` in `layout` (empty where allocation fails). One pass over
// the mask (~10 ms for a 4096 x 11008 weight at 90%), at load.
GatherRows prepare_gather_rows(const LinearArgs& a, GatherLayout layout);

// `a` with the gather rows filled in (when there are any).
void use_gather_rows(const GatherRows& g, LinearArgs& a);

}  // namespace sp
