// Gather rows: a few-token layout for very sparse masked int8 weights. A bitmask kernel spends work on
// every column (each mask byte must be decoded, kept weights or not), so above ~75% sparsity it stops
// getting faster; gather rows re-lay each row as records of eight stored values with their column
// offsets (LinearArgs::gather_recs documents the record), and a kernel then spends work per stored
// value: eight activations fetched and multiplied per record. At 90% a record costs 2 bytes per value
// against the bitmask's 2.25 (mask + value), so the layout is no bigger than the stream it copies.
// Prepared once per weight (beside the mask stream, which the other paths keep reading), tree-free.
#pragma once
#include <cstdint>

#include "common.h"
#include "owned_array.h"

namespace sp {

constexpr int kGatherChunk = 8;             // values per record
constexpr int64_t kGatherRecordBytes = 16;  // their eight offsets, then the eight values

// Stored density (values / weights) at or below which a masked int8 weight gets gather rows.
constexpr double kGatherMaxDensity = 0.2;

struct GatherRows {
  OwnedArray<uint8_t> records;
  OwnedArray<int64_t> chunks;  // [out + 1], in records
  int64_t out = 0;
  int64_t bytes() const { return records ? chunks[out] * kGatherRecordBytes + (out + 1) * 8 : 0; }
};

// Records of row r of a masked int8 stream (a.mask, a.values, a.row_offsets): written to `records`
// when given (room for the count a call with null returned), counted either way.
int64_t pack_gather_row(const LinearArgs& a, int64_t r, uint8_t* records);

// Gather rows of the masked int8 weight `a` (empty where allocation fails). One pass over the mask
// (~10 ms for a 4096 x 11008 weight at 90%), at load.
GatherRows prepare_gather_rows(const LinearArgs& a);

// `a` with the gather rows filled in (when there are any).
void use_gather_rows(const GatherRows& g, LinearArgs& a);

}  // namespace sp
