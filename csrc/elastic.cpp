#include "elastic.h"

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include "plan.h"

namespace nb = nanobind;

namespace sp {
namespace {

using Array = nb::ndarray<nb::ro, nb::c_contig, nb::device::cpu>;

void require(bool ok, const std::string& what) {
  if (!ok) throw std::invalid_argument(what);
}

template <typename T>
bool is(const Array& a) { return a.dtype() == nb::dtype<T>(); }

// GEMM panels of one level (the level most recently run with many tokens). Kept for one level only:
// panels of every level would hold about one byte per stored value per level.
struct PanelSlot {
  int level = -1;
  PreparedPanels panels;
};

class ElasticLinear {
 public:
  ElasticLinear(const Array& masks, const Array& values, const Array& offsets, int64_t in, int64_t seg,
                const std::vector<Array>& scales, const std::vector<Array>& rowsums, int64_t group_size,
                int64_t panel_limit, bool lazy_panels)
      : in_(in), seg_(seg), panel_limit_(panel_limit), lazy_(lazy_panels) {
    require(is<int64_t>(offsets) && offsets.ndim() == 2 && offsets.shape(0) >= 1, "offsets must be int64 [levels, out+1]");
    const int64_t levels = int64_t(offsets.shape(0)), out = int64_t(offsets.shape(1)) - 1;
    require(in >= 1 && seg >= in && seg % 8 == 0, "seg must be a multiple of 8 and at least in_features");
    require(is<uint8_t>(masks) && masks.ndim() == 2 && int64_t(masks.shape(0)) == out &&
                int64_t(masks.shape(1)) == levels * seg / 8,
            "masks must be uint8 [out, levels * seg / 8]");
    require(values.ndim() == 1, "values must be 1-D");
    if (is<int8_t>(values)) {
      kind_ = Kind::MaskedI8;
      require(scales.size() == size_t(levels) && rowsums.size() == size_t(levels), "int8 values need scales and rowsums per level");
    } else if (is<float>(values)) {
      kind_ = Kind::MaskedF32;
    } else if (is<int16_t>(values) || is<uint16_t>(values)) {
      kind_ = Kind::MaskedBF16;
    } else {
      throw std::invalid_argument("values must be int8, float32 or 16-bit (bf16 bits)");
    }
    keep_ = {masks, values, offsets};
    const auto* off = static_cast<const int64_t*>(offsets.data());
    for (int64_t i = 0; i < levels; ++i) {
      LinearArgs a;
      a.out = out;
      a.in = (levels - i) * seg;
      a.mask = static_cast<const uint8_t*>(masks.data()) + i * seg / 8;
      a.mask_stride = levels * seg / 8;
      a.row_offsets = off + i * (out + 1);
      a.values = values.data();
      a.values_len = int64_t(values.shape(0));
      require(a.row_offsets[0] >= 0 && a.row_offsets[out] <= a.values_len, "offsets exceed values");
      for (int64_t r = 0; r < out; ++r) require(a.row_offsets[r] <= a.row_offsets[r + 1], "offsets must not decrease");
      if (kind_ == Kind::MaskedI8) {
        const Array& s = scales[size_t(i)];
        const Array& sum = rowsums[size_t(i)];
        require(is<float>(s) && s.ndim() == 2 && int64_t(s.shape(0)) == out, "scales must be float32 [out, n_groups]");
        a.n_groups = int64_t(s.shape(1));
        a.group_size = group_size > 0 ? group_size : a.in;
        require((a.in + a.group_size - 1) / a.group_size == a.n_groups, "scales do not match group_size");
        require(is<int32_t>(sum) && sum.ndim() == 2 && int64_t(sum.shape(0)) == out && int64_t(sum.shape(1)) == a.n_groups,
                "rowsums must be int32 [out, n_groups]");
        a.scales = static_cast<const float*>(s.data());
        a.rowsum = static_cast<const int32_t*>(sum.data());
        keep_.push_back(s);
        keep_.push_back(sum);
      }
      args_.push_back(a);
    }
  }

  // y[batch, out] = act(x[batch, in] W_level^T (+ bias)): raw addresses of float32 C-contiguous arrays.
  void call_raw(uintptr_t x, int64_t batch, uintptr_t y, uintptr_t bias, int n_threads, int activation, int level) {
    require(level >= 0 && level < int(args_.size()), "level out of range");
    require(activation >= 0 && activation <= int(Activation::Silu), "unknown activation code");
    require(batch >= 0 && (batch == 0 || (x != 0 && y != 0)), "x and y must be non-null");
    if (batch == 0) return;
    LinearArgs a = args_[size_t(level)];
    a.batch = batch;
    a.x = reinterpret_cast<const float*>(x);
    a.y = reinterpret_cast<float*>(y);
    a.bias = reinterpret_cast<const float*>(bias);
    a.activation = Activation(activation);
    const Replicas rep{int64_t(args_.size()) - level, seg_, in_};
    nb::gil_scoped_release unlocked;
    const std::shared_ptr<const PanelSlot> slot = panels_for(level, a, n_threads);
    if (slot) use_panels(slot->panels, a);
    run_linear(kind_, a, n_threads, rep);
  }

  int levels() const { return int(args_.size()); }
  int panel_level() const {
    std::lock_guard<std::mutex> lock(mu_);
    return slot_ ? slot_->level : -1;
  }
  int64_t panel_bytes() const {
    std::lock_guard<std::mutex> lock(mu_);
    if (!slot_ || !slot_->panels.data) return 0;
    return slot_->panels.offsets[(args_[0].out + kGemmRows - 1) / kGemmRows];
  }

 private:
  Kind kind_ = Kind::MaskedF32;
  int64_t in_, seg_, panel_limit_;
  bool lazy_;
  std::vector<LinearArgs> args_;
  std::vector<Array> keep_;  // owns the buffers args_ point into
  mutable std::mutex mu_;    // guards slot_ (a call copies the pointer and runs outside the lock)
  std::mutex build_;         // one builder at a time
  std::shared_ptr<const PanelSlot> slot_;

  // The level's panels when this call runs the GEMM and panels pay (the same rule as NativeLinear:
  // small layers whenever the GEMM runs, big ones on calls of 12..63 tokens); built on the first such
  // call at a level, replacing the previous level's (a call still using those keeps them alive).
  std::shared_ptr<const PanelSlot> panels_for(int level, const LinearArgs& a, int n_threads) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (slot_ && slot_->level == level) return slot_;
    }
    if (kind_ != Kind::MaskedI8 || a.n_groups != 1) return nullptr;
    const bool small = a.out * a.in < panel_limit_;
    const bool wanted = small ? a.batch >= gemm_min_batch() : lazy_ && a.batch >= 12 && a.batch < 64;
    if (!wanted) return nullptr;
    std::lock_guard<std::mutex> building(build_);
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (slot_ && slot_->level == level) return slot_;
    }
    auto slot = std::make_shared<PanelSlot>();
    slot->level = level;
    slot->panels = prepare_panels(kind_, args_[size_t(level)], int64_t(1) << 62, n_threads);
    if (!slot->panels.data) return nullptr;
    std::lock_guard<std::mutex> lock(mu_);
    slot_ = slot;
    return slot_;
  }
};

}  // namespace

void bind_elastic(nb::module_& m) {
  nb::class_<ElasticLinear>(m, "ElasticLinear", "A packed weight with nested elastic levels (csrc/elastic.h).")
      .def("call_raw", &ElasticLinear::call_raw, nb::arg("x_ptr"), nb::arg("batch"), nb::arg("y_ptr"),
           nb::arg("bias_ptr"), nb::arg("n_threads"), nb::arg("activation"), nb::arg("level"),
           "Unchecked fast path at level `level` (0: the lowest sparsity): addresses of float32 C-contiguous\n"
           "x [batch, in], y [batch, out], bias [out] or 0.")
      .def_prop_ro("levels", &ElasticLinear::levels)
      .def_prop_ro("panel_level", &ElasticLinear::panel_level, "Level whose GEMM panels are held (-1: none).")
      .def_prop_ro("panel_bytes", &ElasticLinear::panel_bytes, "Bytes of the held GEMM panels.");
  m.def("elastic_linear",
        [](const Array& masks, const Array& values, const Array& offsets, int64_t in, int64_t seg,
           const std::vector<Array>& scales, const std::vector<Array>& rowsums, int64_t group_size,
           int64_t panel_limit, bool lazy_panels) {
          return new ElasticLinear(masks, values, offsets, in, seg, scales, rowsums, group_size, panel_limit,
                                   lazy_panels);
        },
        nb::arg("masks"), nb::arg("values"), nb::arg("offsets"), nb::arg("in_features"), nb::arg("seg"),
        nb::arg("scales"), nb::arg("rowsums"), nb::arg("group_size") = 0,
        nb::arg("panel_limit") = kSmallLayerWeights, nb::arg("lazy_panels") = false,
        "Nested elastic weight: masks uint8 [out, levels*seg/8], level-ordered values (int8 / float32 /\n"
        "bf16 bits), offsets int64 [levels, out+1]; int8: per level scales float32 [out, n_groups] and\n"
        "rowsums int32 [out, n_groups] over the level's (levels - i) * seg columns.",
        nb::rv_policy::take_ownership);
}

}  // namespace sp
