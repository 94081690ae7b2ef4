#include "elastic.h"

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <stdexcept>
#include <string>

namespace nb = nanobind;

namespace sp {
namespace {

using Array = ElasticLinear::Array;

void require(bool ok, const std::string& what) {
  if (!ok) throw std::invalid_argument(what);
}

template <typename T>
bool is(const Array& a) { return a.dtype() == nb::dtype<T>(); }

}  // namespace

ElasticLinear::ElasticLinear(const Array& masks, const Array& values, const Array& offsets, int64_t in, int64_t seg,
                             const std::vector<Array>& scales, const std::vector<Array>& rowsums, int64_t group_size,
                             int64_t panel_limit, bool lazy_panels)
    : panel_limit_(panel_limit), lazy_(lazy_panels) {
  require(is<int64_t>(offsets) && offsets.ndim() == 2 && offsets.shape(0) >= 1, "offsets must be int64 [levels, out+1]");
  const int64_t levels = int64_t(offsets.shape(0)), out = int64_t(offsets.shape(1)) - 1;
  require(in >= 1 && seg >= in && seg % 8 == 0, "seg must be a multiple of 8 and at least in_features");
  require(is<uint8_t>(masks) && masks.ndim() == 3 && int64_t(masks.shape(0)) == levels &&
              int64_t(masks.shape(1)) == out && int64_t(masks.shape(2)) == seg / 8,
          "masks must be uint8 [levels, out, seg / 8]");
  require(values.ndim() == 1, "values must be 1-D");
  if (is<int8_t>(values)) {
    kind_ = Kind::MaskedI8;
    require(scales.size() == size_t(levels) && rowsums.size() == size_t(levels),
            "int8 values need scales per level and rowsums per segment");
  } else if (is<float>(values)) {
    kind_ = Kind::MaskedF32;
  } else if (is<int16_t>(values) || is<uint16_t>(values)) {
    kind_ = Kind::MaskedBF16;
  } else {
    throw std::invalid_argument("values must be int8, float32 or 16-bit (bf16 bits)");
  }
  keep_ = {masks, values, offsets};
  const auto* off = static_cast<const int64_t*>(offsets.data());
  int64_t n_groups = 1;
  for (int64_t j = 0; j < levels; ++j) {
    LinearArgs a;
    a.out = out;
    a.in = in;
    a.mask = static_cast<const uint8_t*>(masks.data()) + j * out * (seg / 8);
    a.mask_stride = seg / 8;
    a.row_offsets = off + j * (out + 1);
    a.values = values.data();
    a.values_len = int64_t(values.shape(0));
    require(a.row_offsets[0] >= 0 && a.row_offsets[out] <= a.values_len, "offsets exceed values");
    for (int64_t r = 0; r < out; ++r) require(a.row_offsets[r] <= a.row_offsets[r + 1], "offsets must not decrease");
    if (kind_ == Kind::MaskedI8) {
      const Array& s = scales[size_t(j)];  // level j's scales (the same for each of its segments)
      const Array& sum = rowsums[size_t(j)];  // segment j's sums
      require(is<float>(s) && s.ndim() == 2 && int64_t(s.shape(0)) == out, "scales must be float32 [out, n_groups]");
      n_groups = int64_t(s.shape(1));
      a.n_groups = n_groups;
      a.group_size = group_size > 0 ? group_size : in;
      require((in + a.group_size - 1) / a.group_size == n_groups, "scales do not match group_size");
      require(is<int32_t>(sum) && sum.ndim() == 2 && int64_t(sum.shape(0)) == out && int64_t(sum.shape(1)) == n_groups,
              "rowsums must be int32 [out, n_groups]");
      a.rowsum = static_cast<const int32_t*>(sum.data());
      scales_.push_back(static_cast<const float*>(s.data()));
      keep_.push_back(s);
      keep_.push_back(sum);
    }
    segments_.push_back(a);
  }
  if (kind_ == Kind::MaskedI8) {  // level i: segments i..L-1 (from the top level down, one running sum)
    const size_t n = size_t(out * n_groups);
    level_rowsums_.assign(size_t(levels), std::vector<int32_t>(n, 0));
    for (int64_t i = levels - 1; i >= 0; --i)
      for (size_t e = 0; e < n; ++e)
        level_rowsums_[size_t(i)][e] =
            segments_[size_t(i)].rowsum[e] + (i + 1 < levels ? level_rowsums_[size_t(i + 1)][e] : 0);
  }
  panels_.resize(size_t(levels));
}

void ElasticLinear::run(LinearArgs call, int level, int n_threads) {
  if (call.batch == 0) return;
  // segments level..L-1 (empty ones left out, but at least one runs: it writes y)
  LinearArgs parts[kMaxSumParts];
  std::vector<LinearArgs> many;
  LinearArgs* p = parts;
  if (levels() - level > kMaxSumParts) {
    many.resize(size_t(levels() - level));
    p = many.data();
  }
  int n = 0;
  const int64_t out = segments_[0].out;
  for (int j = levels() - 1; j >= level; --j) {
    const LinearArgs& sj = segments_[size_t(j)];
    if (sj.row_offsets[out] == sj.row_offsets[0] && !(n == 0 && j == level)) continue;
    p[n] = sj;
    p[n].batch = call.batch;
    if (kind_ == Kind::MaskedI8) p[n].scales = scales_[size_t(level)];
    ++n;
  }
  const std::vector<std::shared_ptr<const PreparedPanels>> held = panels_for(level, p[0], n_threads);
  for (int k = 0; k < n; ++k) {
    const auto& panel = held[size_t(segment_of(p[k]))];
    if (panel) use_panels(*panel, p[k]);
  }
  call.rowsum = kind_ == Kind::MaskedI8 && n > 1 ? level_rowsums_[size_t(level)].data() : nullptr;
  run_linear_sum(kind_, p, n, call, n_threads);
}

int ElasticLinear::panel_segments() const {
  std::lock_guard<std::mutex> lock(mu_);
  int n = 0;
  for (const auto& p : panels_) n += p != nullptr;
  return n;
}

int64_t ElasticLinear::panel_bytes() const {
  std::lock_guard<std::mutex> lock(mu_);
  int64_t bytes = 0;
  const int64_t tiles = (segments_[0].out + kGemmRows - 1) / kGemmRows;
  for (const auto& p : panels_)
    if (p) bytes += p->offsets[tiles];
  return bytes;
}

int ElasticLinear::segment_of(const LinearArgs& p) const {
  return int((p.row_offsets - segments_[0].row_offsets) / (segments_[0].out + 1));
}

// The panels of every segment (null where none is held). When this call runs the GEMM and panels pay
// (the same rule as NativeLinear: small layers whenever the GEMM runs, big ones on calls of 12..63
// tokens), the level's segments that have none yet get theirs; they are kept for every level.
std::vector<std::shared_ptr<const PreparedPanels>> ElasticLinear::panels_for(int level, const LinearArgs& a,
                                                                             int n_threads) {
  const auto missing = [&] {
    for (int j = level; j < levels(); ++j)
      if (!panels_[size_t(j)]) return true;
    return false;
  };
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!missing()) return panels_;
  }
  bool wanted = kind_ == Kind::MaskedI8 && a.n_groups == 1;
  if (wanted) {
    const bool small = a.out * a.in < panel_limit_;
    wanted = small ? a.batch >= gemm_min_batch() : lazy_ && a.batch >= 12 && a.batch < 64;
  }
  if (wanted) {
    std::lock_guard<std::mutex> building(build_);
    for (int j = level; j < levels(); ++j) {
      {
        std::lock_guard<std::mutex> lock(mu_);
        if (panels_[size_t(j)]) continue;
      }
      auto p = std::make_shared<PreparedPanels>(prepare_panels(kind_, segments_[size_t(j)], int64_t(1) << 62, n_threads));
      if (!p->data) continue;  // (retried on a later call)
      std::lock_guard<std::mutex> lock(mu_);
      panels_[size_t(j)] = std::move(p);
    }
  }
  std::lock_guard<std::mutex> lock(mu_);
  return panels_;
}

namespace {

// y[batch, out] = act(x[batch, in] W_level^T (+ bias)): raw addresses of float32 C-contiguous arrays.
void call_raw(ElasticLinear& self, uintptr_t x, int64_t batch, uintptr_t y, uintptr_t bias, int n_threads,
              int activation, int level) {
  require(level >= 0 && level < self.levels(), "level out of range");
  require(activation >= 0 && activation <= int(Activation::Silu), "unknown activation code");
  require(batch >= 0 && (batch == 0 || (x != 0 && y != 0)), "x and y must be non-null");
  if (batch == 0) return;
  LinearArgs call;
  call.batch = batch;
  call.x = reinterpret_cast<const float*>(x);
  call.y = reinterpret_cast<float*>(y);
  call.bias = reinterpret_cast<const float*>(bias);
  call.activation = Activation(activation);
  nb::gil_scoped_release unlocked;
  self.run(call, level, n_threads);
}

}  // namespace

void bind_elastic(nb::module_& m) {
  nb::class_<ElasticLinear>(m, "ElasticLinear", "A packed weight with nested elastic levels (csrc/elastic.h).")
      .def("call_raw", &call_raw, nb::arg("x_ptr"), nb::arg("batch"), nb::arg("y_ptr"),
           nb::arg("bias_ptr"), nb::arg("n_threads"), nb::arg("activation"), nb::arg("level"),
           "Unchecked fast path at level `level` (0: the lowest sparsity): addresses of float32 C-contiguous\n"
           "x [batch, in], y [batch, out], bias [out] or 0.")
      .def_prop_ro("levels", &ElasticLinear::levels)
      .def_prop_ro("panel_segments", &ElasticLinear::panel_segments, "Segments whose GEMM panels are held.")
      .def_prop_ro("panel_bytes", &ElasticLinear::panel_bytes, "Bytes of the held GEMM panels (all segments).");
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
        "Nested elastic weight, segment-major: masks uint8 [levels, out, seg/8], values (int8 / float32 /\n"
        "bf16 bits) segment after segment, offsets int64 [levels, out+1] (segment j's rows, into values);\n"
        "int8: scales float32 [out, n_groups] per level and rowsums int32 [out, n_groups] per segment,\n"
        "over the in_features columns.",
        nb::rv_policy::take_ownership);
}

}  // namespace sp
