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
//
// Many tokens: the level's segments run as one GEMM (kernel table's masked_gemm_i8_sum): each output
// tile's token block multiplies every segment's panel into the same accumulators, then scales once by
// the level's scales and the summed rowsums (held per level). So a level costs its own quads (about what
// a single-level panel of that sparsity holds) and writes its outputs once, with no extra panels held.
//
// The handle is shared by the Python binding (elastic_linear) and the native block plans
// (csrc/runtime/stack.h), which pass the level of each call.
#pragma once
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>

#include <memory>
#include <mutex>
#include <vector>

#include "plan.h"

namespace sp {

class ElasticLinear {
 public:
  using Array = nanobind::ndarray<nanobind::ro, nanobind::c_contig, nanobind::device::cpu>;

  // See elastic_linear's docstring (elastic.cpp) for the arrays; std::invalid_argument when they do not fit.
  ElasticLinear(const Array& masks, const Array& values, const Array& offsets, int64_t in, int64_t seg,
                const std::vector<Array>& scales, const std::vector<Array>& rowsums, int64_t group_size,
                int64_t panel_limit, bool lazy_panels);

  // y = act(x W_level^T (+ bias)): `call` carries batch, x, y, bias and activation. Without the GIL.
  void run(LinearArgs call, int level, int n_threads);

  int levels() const { return int(segments_.size()); }
  int64_t in_features() const { return segments_[0].in; }
  int64_t out_features() const { return segments_[0].out; }
  int panel_segments() const;
  int64_t panel_bytes() const;

 private:
  Kind kind_ = Kind::MaskedF32;
  int64_t panel_limit_;
  bool lazy_;
  std::vector<LinearArgs> segments_;  // segment j as its own masked weight (no scales: they are the level's)
  std::vector<const float*> scales_;  // int8: level i's scales [out, n_groups]
  std::vector<std::vector<int32_t>> level_rowsums_;  // int8: level i's segments' rowsums summed
  std::vector<Array> keep_;           // owns the buffers segments_ and scales_ point into
  mutable std::mutex mu_;             // guards panels_ (a call copies the pointers and runs outside the lock)
  std::mutex build_;                  // one builder at a time
  std::vector<std::shared_ptr<const PreparedPanels>> panels_;  // per segment, kept once built

  int segment_of(const LinearArgs& p) const;
  std::vector<std::shared_ptr<const PreparedPanels>> panels_for(int level, const LinearArgs& a, int n_threads);
};

// Registers `elastic_linear` and its handle class on the extension module.
void bind_elastic(nanobind::module_& m);

}  // namespace sp
