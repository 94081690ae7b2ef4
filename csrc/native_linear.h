// The Python-facing handle of one packed weight (sparsepress._native.NativeLinear) and the small
// argument helpers of the bindings: shared by bind.cpp (which registers them) and the runtime's block
// plans (csrc/runtime/), which call the same handles from native code.
#pragma once
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>

#include <atomic>
#include <memory>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "colskip.h"
#include "dispatch.h"
#include "experts.h"
#include "gather_rows.h"
#include "plan.h"

namespace sp {
namespace py {

namespace nb = nanobind;

using Array = nb::ndarray<nb::ro, nb::c_contig, nb::device::cpu>;
using F32In = nb::ndarray<const float, nb::ndim<2>, nb::c_contig, nb::device::cpu>;
using F32Out = nb::ndarray<float, nb::ndim<2>, nb::c_contig, nb::device::cpu>;
using Vec = nb::ndarray<const float, nb::ndim<1>, nb::c_contig, nb::device::cpu>;

inline void require(bool ok, const std::string& what) {
  if (!ok) throw std::invalid_argument(what);
}

template <typename T>
inline bool is(const Array& a) { return a.dtype() == nb::dtype<T>(); }

inline sp::Activation to_activation(int code) {
  require(code >= 0 && code <= int(sp::Activation::Silu),
          "activation must be 0 (none), 1 (gelu), 2 (gelu_tanh), 3 (relu) or 4 (silu), got " + std::to_string(code));
  return sp::Activation(code);
}

class NativeLinear : public sp::ExpertLinear {
 public:
  // panel_limit: layers of fewer weights get GEMM panels now; lazy_panels: bigger ones get them on
  // their first call of kLazyMin..kLazyMax tokens (where packing per call costs most); gather_rows:
  // very sparse int8 weights get gather rows (csrc/gather_rows.h) where the active tree runs them.
  NativeLinear(sp::Kind kind, sp::LinearArgs args, std::vector<Array> keep, int64_t panel_limit = 0,
               bool lazy_panels = false, bool gather_rows = true)
      : kind_(kind), args_(args), keep_(std::move(keep)), lazy_(std::make_unique<Lazy>()) {
    if (kind == sp::Kind::MaskedI8) args_.four_per_byte = sp::mask_four_per_byte(args_);
    if (panel_limit > 0) lazy_->panels = sp::prepare_panels(kind, args, panel_limit);
    if (gather_rows && wants_gather_rows(kind, args))
      gather_ = sp::prepare_gather_rows(args, sp::active_table().gather_layout);
    lazy_->ready.store(lazy_->panels.data != nullptr, std::memory_order_release);
    lazy_->allowed.store(lazy_panels && !lazy_->ready.load(std::memory_order_relaxed), std::memory_order_relaxed);
  }

  // Bytes of the gather rows (0: none; csrc/gather_rows.h).
  int64_t gather_bytes() const { return gather_.bytes(); }

  bool has_panels() const { return lazy_->ready.load(std::memory_order_acquire); }
  int64_t panel_bytes() const {
    return has_panels() ? lazy_->panels.offsets[(args_.out + sp::kGemmRows - 1) / sp::kGemmRows] : 0;
  }

  // Prepared tiles per layout: (dense, fixed-window quads, sliding-window quads).
  std::vector<int64_t> panel_tiles() const {
    std::vector<int64_t> n(3, 0);
    if (!has_panels()) return n;
    for (int64_t t = 0; t < (args_.out + sp::kGemmRows - 1) / sp::kGemmRows; ++t)
      ++n[size_t(lazy_->panels.data[lazy_->panels.offsets[t]])];
    return n;
  }

  // y[B, out] = x[B, in] W^T (+ bias)
  // threshold > 0: inputs with |x| < threshold count as zero (activation sparsity, csrc/colskip.h).
  void call(const F32In& x, F32Out& y, std::optional<Vec> bias, int n_threads, int activation,
            float threshold = 0.f) {
    require(x.shape(1) == size_t(args_.in), "x has " + std::to_string(x.shape(1)) +
                                                  " features, the weight expects " + std::to_string(args_.in));
    require(y.shape(0) == x.shape(0) && y.shape(1) == size_t(args_.out), "y must be [batch, out]");
    sp::LinearArgs a = args_;
    a.batch = int64_t(x.shape(0));
    a.x = x.data();
    a.y = y.data();
    if (bias) {
      require(bias->shape(0) == size_t(args_.out), "bias must have out elements");
      a.bias = bias->data();
    }
    a.activation = to_activation(activation);
    if (a.batch == 0) return;
    nb::gil_scoped_release unlocked;
    run(a, n_threads, threshold);
  }

  // Same as call() on raw addresses (what packed_linear uses: converting three tensors through
  // DLPack costs microseconds per call). The caller guarantees x is float32 [batch, in] and y float32
  // [batch, out], both C-contiguous, and bias (0: none) float32 [out].
  void call_raw(uintptr_t x, int64_t batch, uintptr_t y, uintptr_t bias, int n_threads, int activation,
                float threshold = 0.f) {
    require(batch >= 0 && (batch == 0 || (x != 0 && y != 0)), "x and y must be non-null");
    const sp::Activation act = to_activation(activation);
    if (batch == 0) return;
    sp::LinearArgs a = args_;
    a.batch = batch;
    a.x = reinterpret_cast<const float*>(x);
    a.y = reinterpret_cast<float*>(y);
    a.bias = reinterpret_cast<const float*>(bias);
    a.activation = act;
    nb::gil_scoped_release unlocked;
    run(a, n_threads, threshold);
  }

  // One call from native code (the runtime's block plans): `a` is args() with batch, x, y, bias and
  // activation filled in by the caller; must run without the GIL. threshold: as for call().
  void run(sp::LinearArgs a, int n_threads, float threshold = 0.f) {
    if (a.batch == 0) return;
    if (threshold > 0.f) {
      const sp::ColPanels* cp = attach_colpanels(a.batch, threshold, n_threads);
      attach_panels(a, n_threads);
      sp::use_gather_rows(gather_, a);
      sp::run_linear_sparse_inputs(kind_, a, threshold, cp, n_threads, &last_skipped_);
      return;
    }
    attach_panels(a, n_threads);
    sp::use_gather_rows(gather_, a);
    sp::run_linear(kind_, a, n_threads);
  }

  // Builds the column chunks now (normally on the first thresholded call of few tokens); whether
  // this weight has them.
  bool prepare_colpanels(int n_threads) {
    nb::gil_scoped_release unlocked;
    build_colpanels(n_threads);
    return colpanel_bytes() > 0;
  }
  int64_t colpanel_bytes() const {
    return lazy_->col_ready.load(std::memory_order_acquire) ? lazy_->cols.total_bytes() : 0;
  }
  bool colpanels_sparse() const { return lazy_->col_ready.load(std::memory_order_acquire) && lazy_->cols.sparse; }
  // Whether this thread's last thresholded call skipped columns (tests, benchmarks).
  bool last_skipped() const { return last_skipped_; }

  const sp::LinearArgs& args() const { return args_; }

  int64_t in_features() const override { return args_.in; }
  int64_t out_features() const override { return args_.out; }

  // One expert projection of a grouped MoE call (experts.h): the caller holds no GIL.
  void run_rows(const float* x, int64_t rows, float* y, const float* bias, int n_threads) override {
    sp::LinearArgs a = args_;
    a.batch = rows;
    a.x = x;
    a.y = y;
    a.bias = bias;
    attach_panels(a, n_threads);
    sp::use_gather_rows(gather_, a);
    sp::run_linear(kind_, a, n_threads);
  }

  int64_t weight_bytes() const override {
    int64_t total = 0;
    for (const Array& array : keep_) total += int64_t(array.nbytes());
    return total;
  }

 private:
  sp::Kind kind_;
  sp::LinearArgs args_;
  std::vector<Array> keep_;  // owns the buffers args_ points into

  static constexpr int64_t kLazyMin = 12, kLazyMax = 64;
  struct Lazy {
    std::mutex mu;                 // one builder at a time
    std::atomic<bool> ready{false};  // panels complete and readable (release / acquire)
    std::atomic<bool> allowed{false};  // read unlocked by every call, so atomic
    sp::PreparedPanels panels;
    // column chunks for thresholded calls of few tokens (csrc/colskip.h), built once on first need
    std::atomic<bool> col_ready{false}, col_tried{false};
    sp::ColPanels cols;
  };
  std::unique_ptr<Lazy> lazy_;  // behind a pointer so NativeLinear stays movable
  sp::GatherRows gather_;

  // Very sparse masked int8 rows with one scale each, where the active tree has a gather kernel.
  static bool wants_gather_rows(sp::Kind kind, const sp::LinearArgs& a) {
    return kind == sp::Kind::MaskedI8 && a.n_groups == 1 && sp::active_table().gather_i8 && a.out > 0 &&
           double(a.row_offsets[a.out]) <=
               sp::gather_max_density(sp::active_table().gather_layout) * double(a.out) * double(a.in);
  }

  static inline thread_local bool last_skipped_ = false;

  void build_colpanels(int n_threads) {
    Lazy& l = *lazy_;
    if (l.col_tried.load(std::memory_order_acquire)) return;
    std::lock_guard<std::mutex> lock(l.mu);
    if (l.col_tried.load(std::memory_order_relaxed)) return;
    l.cols = sp::prepare_colpanels(kind_, args_, n_threads);
    l.col_ready.store(l.cols.data != nullptr, std::memory_order_release);
    l.col_tried.store(true, std::memory_order_release);  // built, or not possible here: never try again
  }

  // The column chunks a thresholded call of `batch` tokens may use (built on first need), or null.
  const sp::ColPanels* attach_colpanels(int64_t batch, float threshold, int n_threads) {
    if (!sp::wants_colpanels(threshold, batch) || !sp::colskip_supported(kind_, args_)) return nullptr;
    build_colpanels(n_threads);
    return lazy_->col_ready.load(std::memory_order_acquire) ? &lazy_->cols : nullptr;
  }

  void attach_panels(sp::LinearArgs& a, int n_threads) {
    Lazy& l = *lazy_;
    if (!l.ready.load(std::memory_order_acquire) && l.allowed.load(std::memory_order_relaxed) &&
        a.batch >= kLazyMin && (a.batch < kLazyMax || sp::active_table().panels_for_long_calls)) {
      std::lock_guard<std::mutex> lock(l.mu);
      if (!l.ready.load(std::memory_order_relaxed)) {
        l.panels = sp::prepare_panels(kind_, args_, int64_t(1) << 62, n_threads);
        l.allowed.store(false, std::memory_order_relaxed);  // built, or not possible here: never try again
        l.ready.store(l.panels.data != nullptr, std::memory_order_release);
      }
    }
    if (l.ready.load(std::memory_order_acquire)) sp::use_panels(l.panels, a);
  }
};

}  // namespace py
}  // namespace sp
