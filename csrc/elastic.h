// Nested elastic sparsity levels (sparsepress.formats.elastic) on the masked kernels, unchanged.
//
// A layer with L levels is held segment-major: segment j (the weights whose highest level is j) is an
// ordinary masked weight of its own, its mask [out, seg / 8] contiguous for all rows and its values
// contiguous (row-major; the segments' values follow each other in one buffer, segment 0's first), with
// row offsets per segment. Level i keeps segments i..L-1 and runs as their sum: one call that quantizes
// the activations once and, per task of rows, runs each of those segments' masked kernels over the
// layer's `in` columns and adds them up, then applies the bias and the activation once (plan.h
// run_linear_sum). Each value is stored once whatever the number of levels.
//
// Why segment-major (and not a row's L segments side by side): a level then never touches the bytes of
// the segments it skips. Interleaved per row, the skipped segments sat between the kept ones, the
// hardware prefetchers pulled them in anyway and level 0 decoded L full-width masks, so the time did not
// follow the level (4096x4096 int8, batch 1, Zen 4: 0.57 / 0.71 / 0.59 ms at 0.5 / 0.7 / 0.9 against
// 0.31 / 0.21 / 0.20 ms for single-level weights). Segment-major, level i streams exactly its values and
// (L - i) masks, and the top level is one plain masked call.
//
// The integer values, and so each segment's rowsums, do not depend on the level; only the scales do
// (per-row gains), and they are read when a kernel stores its outputs. GEMM panels hold the weights only,
// so they are prepared per segment (when a call first needs them, by the same rule as NativeLinear) and
// kept for every level: switching levels never rebuilds them, and all of them together take about what
// one single-level weight's panels take.
#pragma once

namespace nanobind { class module_; }

namespace sp {

// Registers `elastic_linear` and its handle class on the extension module.
void bind_elastic(nanobind::module_& m);

}  // namespace sp
