// Nested elastic sparsity levels (sparsepress.formats.elastic) on the masked kernels, unchanged.
//
// A layer with L levels keeps one mask row of L segments of `seg` columns per output row: segment j
// marks the weights whose highest level is j, so level i keeps segments i..L-1. Its values are kept
// per row in segment order (column order inside a segment). Level i is then one masked weight of
// (L - i) * seg columns: the mask from segment i on, row offsets at the row's first value of segment
// i, and activations repeated once per segment (plan.h Replicas). Every level runs as one kernel call
// that skips the zeros of that level; the values and masks are stored once for all levels.
#pragma once

namespace nanobind { class module_; }

namespace sp {

// Registers `elastic_linear` and its handle class on the extension module.
void bind_elastic(nanobind::module_& m);

}  // namespace sp
