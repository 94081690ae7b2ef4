// nanobind module sparsepress._native: torch-free, takes any DLPack array
// (torch tensors, numpy arrays). A NativeLinear is built once per packed weight
// (validation happens there) and called per forward with x and y only.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <atomic>
#include <memory>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>

#include "attention.h"
#include "native_experts.h"
#include "native_linear.h"
#include "dispatch.h"
#include "elastic.h"
#include "experts.h"
#include "openmp_team.h"
#include "output_cache.h"
#include "plan.h"
#include "runtime/bind_runtime.h"

namespace nb = nanobind;

namespace {

using namespace sp::py;

// Fills scale/rowsum/group fields of int8 kinds.
void set_quant(sp::LinearArgs& a, std::vector<Array>& keep, const std::optional<Array>& scales,
               const std::optional<Array>& rowsum, int64_t group_size, bool need_rowsum) {
  require(scales.has_value(), "int8 weights need scales");
  require(is<float>(*scales) && scales->ndim() == 2 && scales->shape(0) == size_t(a.out),
          "scales must be float32 [out, n_groups]");
  a.n_groups = int64_t(scales->shape(1));
  a.group_size = group_size > 0 ? group_size : a.in;
  require((a.in + a.group_size - 1) / a.group_size == a.n_groups, "scales do not match group_size");
  a.scales = static_cast<const float*>(scales->data());
  keep.push_back(*scales);
  if (need_rowsum) {
    require(rowsum.has_value(), "int8 weights need rowsum");
    require(is<int32_t>(*rowsum) && rowsum->ndim() == 2 && rowsum->shape(0) == size_t(a.out) &&
                rowsum->shape(1) == size_t(a.n_groups),
            "rowsum must be int32 [out, n_groups]");
    a.rowsum = static_cast<const int32_t*>(rowsum->data());
    keep.push_back(*rowsum);
  }
}

NativeLinear make_masked(const Array& mask, const Array& values, const Array& row_offsets, int64_t in,
                         std::optional<Array> scales, std::optional<Array> rowsum, int64_t group_size,
                         int64_t panel_limit, bool lazy_panels, bool gather_rows) {
  sp::LinearArgs a;
  require(is<uint8_t>(mask) && mask.ndim() == 2, "mask must be uint8 [out, ceil(in/8)]");
  a.out = int64_t(mask.shape(0));
  a.in = in;
  require(int64_t(mask.shape(1)) == (in + 7) / 8, "mask must have ceil(in/8) columns");
  require(is<int64_t>(row_offsets) && row_offsets.ndim() == 1 && row_offsets.shape(0) == size_t(a.out + 1),
          "row_offsets must be int64 [out+1]");
  require(values.ndim() == 1, "values must be 1-D");
  a.mask = static_cast<const uint8_t*>(mask.data());
  a.mask_stride = int64_t(mask.shape(1));
  a.row_offsets = static_cast<const int64_t*>(row_offsets.data());
  a.values = values.data();
  a.values_len = int64_t(values.shape(0));
  require(a.row_offsets[0] == 0 && a.row_offsets[a.out] <= a.values_len, "row_offsets exceed values");
  std::vector<Array> keep{mask, values, row_offsets};
  sp::Kind kind;
  if (is<int8_t>(values)) {
    kind = sp::Kind::MaskedI8;
    set_quant(a, keep, scales, rowsum, group_size, true);
  } else if (is<float>(values)) {
    kind = sp::Kind::MaskedF32;
  } else if (is<int16_t>(values) || is<uint16_t>(values)) {
    kind = sp::Kind::MaskedBF16;
  } else {
    throw std::invalid_argument("values must be int8, float32 or 16-bit (bf16 bits)");
  }
  return NativeLinear(kind, a, std::move(keep), panel_limit, lazy_panels, gather_rows);
}

NativeLinear make_dense_int8(const Array& values, std::optional<Array> scales, std::optional<Array> rowsum,
                             int64_t group_size, int64_t panel_limit, bool lazy_panels) {
  sp::LinearArgs a;
  require(is<int8_t>(values) && values.ndim() == 2, "values must be int8 [out, in]");
  a.out = int64_t(values.shape(0));
  a.in = int64_t(values.shape(1));
  a.values = values.data();
  a.values_len = a.out * a.in;
  std::vector<Array> keep{values};
  set_quant(a, keep, scales, rowsum, group_size, true);
  return NativeLinear(sp::Kind::DenseI8, a, std::move(keep), panel_limit, lazy_panels);
}

NativeLinear make_csr(const Array& row_ptr, const Array& col_indices, const Array& values, int64_t in,
                      std::optional<Array> scales, int64_t group_size) {
  sp::LinearArgs a;
  require(is<int32_t>(row_ptr) && row_ptr.ndim() == 1 && row_ptr.shape(0) >= 1, "row_ptr must be int32 [out+1]");
  require(is<int16_t>(col_indices) || is<int32_t>(col_indices), "col_indices must be int16 or int32");
  require(values.ndim() == 1 && col_indices.ndim() == 1 && values.shape(0) == col_indices.shape(0),
          "values and col_indices must be 1-D of equal length");
  a.out = int64_t(row_ptr.shape(0)) - 1;
  a.in = in;
  a.row_ptr = static_cast<const int32_t*>(row_ptr.data());
  a.col_idx = col_indices.data();
  a.col_idx16 = is<int16_t>(col_indices);
  a.values = values.data();
  a.values_len = int64_t(values.shape(0));
  require(a.row_ptr[0] == 0 && a.row_ptr[a.out] <= a.values_len, "row_ptr exceeds values");
  std::vector<Array> keep{row_ptr, col_indices, values};
  sp::Kind kind;
  if (is<float>(values)) {
    kind = sp::Kind::CsrF32;
  } else if (is<int8_t>(values)) {
    kind = sp::Kind::CsrI8;
    set_quant(a, keep, scales, std::nullopt, group_size, false);
  } else {
    throw std::invalid_argument("csr values must be float32 or int8");
  }
  return NativeLinear(kind, a, std::move(keep));
}

// Unchecked fast path of the attention op: addresses of float32 q, k, v, out (and mask or 0), sizes
// [batch, heads, kv_heads, sq, sk, d] and strides in floats [q_b, q_h, q_s, k_b, k_h, k_s, v_b, v_h,
// v_s, o_b, o_h, o_s, m_b, m_h, m_s]; the caller (sparsepress.attention) has checked them.
void attention_raw(uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t mask, uintptr_t out,
                   const std::vector<int64_t>& sizes, const std::vector<int64_t>& strides, float scale,
                   bool causal, int n_threads) {
  require(sizes.size() == 6 && strides.size() == 15, "attention needs 6 sizes and 15 strides");
  for (int64_t n : sizes) require(n >= 0, "attention sizes must not be negative");
  require(sizes[2] > 0 && sizes[1] % sizes[2] == 0, "heads must be a multiple of kv_heads");
  require(q && k && v && out, "q, k, v and out must be non-null");
  sp::AttentionArgs a;
  a.q = reinterpret_cast<const float*>(q);
  a.k = reinterpret_cast<const float*>(k);
  a.v = reinterpret_cast<const float*>(v);
  a.mask = reinterpret_cast<const float*>(mask);
  a.out = reinterpret_cast<float*>(out);
  a.batch = sizes[0], a.heads = sizes[1], a.kv_heads = sizes[2], a.sq = sizes[3], a.sk = sizes[4], a.d = sizes[5];
  int64_t* fields[15] = {&a.q_b, &a.q_h, &a.q_s, &a.k_b, &a.k_h, &a.k_s, &a.v_b, &a.v_h,
                         &a.v_s, &a.o_b, &a.o_h, &a.o_s, &a.m_b, &a.m_h, &a.m_s};
  for (int i = 0; i < 15; ++i) *fields[i] = strides[size_t(i)];
  a.scale = scale;
  a.causal = causal;
  nb::gil_scoped_release unlocked;
  sp::run_attention(a, n_threads);
}

}  // namespace

NB_MODULE(_native, m) {
  m.doc() = "Native CPU kernels of sparsepress (torch-free; DLPack arrays in and out).";
  sp::bind_elastic(m);
  m.def("detect_isa", &sp::detect_isa, "Best ISA level of this CPU: 'avx512', 'avx2' or 'scalar'.");
  m.def("supported_isas", &sp::supported_isas, "ISA levels usable on this CPU, best last.");
  m.def("known_isas", &sp::known_isas, "ISA levels this build has (usable here or not), lowest first.");
  m.def("set_isa", &sp::set_isa, nb::arg("name"), "Force an ISA level (ValueError if unsupported).");
  m.def("active_isa", [] { return std::string(sp::active_table().name); }, "The ISA level in use.");
  m.def("set_gemm_min_batch", &sp::set_gemm_min_batch, nb::arg("n"),
        "Tokens from which int8 layers use the tiled GEMM instead of the row kernels (0: default; tests, tuning).");
  m.def("attach_openmp", &sp::attach_openmp, nb::arg("path"),
        "Run parallel calls on the OpenMP team of the runtime already loaded from `path`; '' or why not.");
  m.def("detach_openmp", &sp::detach_openmp, "Run parallel calls on sparsepress's own thread pool.");
  m.def("parallel_backend", [] { return std::string(sp::parallel_backend()); }, "'openmp' or 'own'.");
  m.def("gemm_min_batch", &sp::gemm_min_batch, "Current GEMM cutover of the active ISA level.");
  m.def("quantize_rows", [](const F32In& x) {
    // test hook: the activation quantization exactly as the kernels see it
    const int64_t b = int64_t(x.shape(0)), in = int64_t(x.shape(1));
    auto* q = new int8_t[size_t(b * in)];
    auto* u = new uint8_t[size_t(b * in)];
    auto* s = new float[size_t(b)];
    sp::quantize_rows(x.data(), b, in, in, q, u, s);
    delete[] u;
    nb::capsule qo(q, [](void* p) noexcept { delete[] static_cast<int8_t*>(p); });
    nb::capsule so(s, [](void* p) noexcept { delete[] static_cast<float*>(p); });
    return nb::make_tuple(nb::ndarray<nb::numpy, int8_t, nb::ndim<2>>(q, {size_t(b), size_t(in)}, qo),
                          nb::ndarray<nb::numpy, float, nb::ndim<1>>(s, {size_t(b)}, so));
  }, nb::arg("x"));

  m.def("output_tensor", [](const std::vector<int64_t>& shape) {
    size_t count = 1;
    for (int64_t d : shape) {
      require(d >= 0, "output_tensor: negative dimension");
      count *= size_t(d);
    }
    std::vector<size_t> dims(shape.begin(), shape.end());
    void* block = sp::acquire_output(count * sizeof(float));
    nb::capsule owner(block, [](void* p) noexcept { sp::release_output(p); });
    return nb::ndarray<nb::pytorch, float>(block, dims.size(), dims.data(), owner);
  }, nb::arg("shape"),
        "An uninitialised float32 torch tensor of `shape` in recycled memory (see csrc/output_cache.h).");
  m.attr("cached_output_min_bytes") = sp::kCachedOutputMinBytes;
  m.def("clear_output_cache", &sp::clear_output_cache, "Frees the recycled output blocks; returns the bytes freed.");
  m.def("cached_output_bytes", &sp::cached_output_bytes, "Bytes of freed output blocks held for reuse.");

  m.def("attention_raw", &attention_raw, nb::arg("q_ptr"), nb::arg("k_ptr"), nb::arg("v_ptr"), nb::arg("mask_ptr"),
        nb::arg("out_ptr"), nb::arg("sizes"), nb::arg("strides"), nb::arg("scale"), nb::arg("causal"),
        nb::arg("n_threads") = 1,
        "Unchecked fast path: out[b, i, h] = softmax(scale q k^T + mask) v for float32 strided q, k, v, out.");

  nb::class_<NativeLinear>(m, "NativeLinear", "A packed weight prepared for the native kernels.")
      .def("__call__", &NativeLinear::call, nb::arg("x"), nb::arg("y"), nb::arg("bias").none(),
           nb::arg("n_threads") = 1, nb::arg("activation") = 0, nb::arg("threshold") = 0.f,
           "y[B, out] = act(x[B, in] @ W.T (+ bias)); x, y float32 C-contiguous; activation 0 none, 1 gelu,\n"
           "2 gelu_tanh, 3 relu, 4 silu; threshold > 0: inputs with |x| < threshold count as zero, and calls of\n"
           "few tokens skip the weight columns no token needs (column chunks built on first need).")
      .def("call_raw", &NativeLinear::call_raw, nb::arg("x_ptr"), nb::arg("batch"), nb::arg("y_ptr"),
           nb::arg("bias_ptr"), nb::arg("n_threads") = 1, nb::arg("activation") = 0, nb::arg("threshold") = 0.f,
           "Unchecked fast path: addresses of float32 C-contiguous x [batch, in], y [batch, out], bias [out] or 0.")
      .def_prop_ro("has_panels", &NativeLinear::has_panels, "Whether GEMM panels were prepared.")
      .def_prop_ro("panel_bytes", &NativeLinear::panel_bytes, "Bytes of the prepared GEMM panels (0: none).")
      .def_prop_ro("gather_bytes", &NativeLinear::gather_bytes,
                   "Bytes of the gather rows of a very sparse int8 weight (0: none; csrc/gather_rows.h).")
      .def_prop_ro("panel_tiles", &NativeLinear::panel_tiles,
                   "Prepared 32-row tiles per layout: [dense, fixed-window quads, sliding-window quads].")
      .def("prepare_colpanels", &NativeLinear::prepare_colpanels, nb::arg("n_threads") = 1,
           "Builds the column chunks of activation sparsity now (else on the first thresholded call of few\n"
           "tokens); whether this weight has them.")
      .def_prop_ro("colpanel_bytes", &NativeLinear::colpanel_bytes, "Bytes of the column chunks (0: none yet).")
      .def_prop_ro("colpanels_sparse", &NativeLinear::colpanels_sparse, "Whether the column chunks are sparse.")
      .def_prop_ro("last_skipped", &NativeLinear::last_skipped,
                   "Whether this thread's last thresholded call skipped weight columns.")
      .def_prop_ro("in_features", &NativeLinear::in_features)
      .def_prop_ro("out_features", &NativeLinear::out_features);
  m.def("set_colskip_policy", &sp::set_colskip_policy, nb::arg("policy"),
        "Which path thresholded calls take: 0 measured (default), 1 never skip columns, 2 always skip (up to\n"
        "8 tokens).");
  m.def("colskip_policy", &sp::colskip_policy, "The column-skip policy (see set_colskip_policy).");
  m.attr("colskip_max_batch") = sp::kColSkipMaxBatch;
  m.def("gather_max_density", [] { return sp::gather_max_density(sp::active_table().gather_layout); },
        "Stored share (values / weights) up to which int8 weights packed under the active tree get gather rows.");

  nb::class_<NativeExperts>(m, "NativeExperts", "The packed experts of one MoE layer, run by one grouped call.")
      .def(nb::init<const nb::list&, const nb::list&, const std::vector<std::optional<Vec>>&,
                    const std::vector<std::optional<Vec>>&, int64_t, int64_t, int>(),
           nb::arg("gate_up"), nb::arg("down"), nb::arg("gate_up_bias"), nb::arg("down_bias"), nb::arg("hidden"),
           nb::arg("inter"), nb::arg("activation"),
           "gate_up / down: a NativeLinear per expert ([2 * inter, hidden] / [hidden, inter]); biases float32 or None;\n"
           "activation applied to the gate half before it multiplies the up half (0 none ... 4 silu).")
      .def("call_raw", &NativeExperts::call_raw, nb::arg("x_ptr"), nb::arg("tokens"), nb::arg("top_k"),
           nb::arg("index_ptr"), nb::arg("weight_ptr"), nb::arg("out_ptr"), nb::arg("n_threads") = 1,
           "Unchecked fast path: out = sum over each token's selected experts of weight * expert(x); returns\n"
           "(token-expert evaluations, bytes of packed weights read).")
      .def_prop_ro("num_experts", &NativeExperts::num_experts);

  m.def("masked_linear", &make_masked, nb::arg("mask"), nb::arg("values"), nb::arg("row_offsets"),
        nb::arg("in_features"), nb::arg("scales").none() = nb::none(), nb::arg("rowsum").none() = nb::none(),
        nb::arg("group_size") = 0, nb::arg("panel_limit") = sp::kSmallLayerWeights, nb::arg("lazy_panels") = false,
        nb::arg("gather_rows") = true,
        "Masked stream weight (bitmask, and nm/bbs converted to it): int8 / float32 / bf16-bits values.\n"
        "panel_limit: int8 layers of fewer weights get their GEMM panels packed once here instead of on\n"
        "every many-token call (0: none); lazy_panels: bigger ones get them on their first call of\n"
        "12..63 tokens; gather_rows: very sparse int8 weights get gather rows for few-token calls where\n"
        "the active tree has a gather kernel (csrc/gather_rows.h).");
  m.def("dense_int8_linear", &make_dense_int8, nb::arg("values"), nb::arg("scales"), nb::arg("rowsum"),
        nb::arg("group_size") = 0, nb::arg("panel_limit") = sp::kSmallLayerWeights, nb::arg("lazy_panels") = false,
        "Dense int8 weight [out, in] (panel_limit, lazy_panels: as for masked_linear).");
  m.def("csr_linear", &make_csr, nb::arg("row_ptr"), nb::arg("col_indices"), nb::arg("values"),
        nb::arg("in_features"), nb::arg("scales").none() = nb::none(), nb::arg("group_size") = 0,
        "CSR weight: float32 or int8 values.");

  sp::runtime::bind(m);
}
