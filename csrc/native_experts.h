// The Python-facing handle of one MoE layer's packed experts (sparsepress._native.NativeExperts):
// registered by bind.cpp and read by the runtime's MoE blocks (csrc/runtime/), which run the same
// grouped call (experts.h) from native code.
#pragma once
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>

#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "experts.h"
#include "native_linear.h"

namespace sp {
namespace py {

// The experts of one MoE layer for grouped calls (experts.h): per expert its gate_up and down
// NativeLinear (kept alive here) and optional float32 biases.
class NativeExperts {
 public:
  NativeExperts(const nb::list& gate_up, const nb::list& down, const std::vector<std::optional<Vec>>& gate_up_bias,
                const std::vector<std::optional<Vec>>& down_bias, int64_t hidden, int64_t inter, int activation)
      : hidden_(hidden), inter_(inter), act_(to_activation(activation)) {
    const size_t n = nb::len(gate_up);
    require(n > 0 && nb::len(down) == n && gate_up_bias.size() == n && down_bias.size() == n,
            "gate_up, down and their biases need one entry per expert");
    for (size_t e = 0; e < n; ++e) {
      NativeLinear* gu = nb::cast<NativeLinear*>(gate_up[e]);
      NativeLinear* dn = nb::cast<NativeLinear*>(down[e]);
      require(gu->in_features() == hidden && gu->out_features() == 2 * inter,
              "expert " + std::to_string(e) + ": gate_up must be [2 * inter, hidden]");
      require(dn->in_features() == inter && dn->out_features() == hidden,
              "expert " + std::to_string(e) + ": down must be [hidden, inter]");
      sp::ExpertProjections p{gu, nullptr, dn, nullptr};
      if (gate_up_bias[e]) {
        require(gate_up_bias[e]->shape(0) == size_t(2 * inter), "gate_up bias must be [2 * inter]");
        p.gate_up_bias = gate_up_bias[e]->data();
      }
      if (down_bias[e]) {
        require(down_bias[e]->shape(0) == size_t(hidden), "down bias must be [hidden]");
        p.down_bias = down_bias[e]->data();
      }
      experts_.push_back(p);
      keep_.push_back(gate_up[e]);
      keep_.push_back(down[e]);
    }
    biases_ = {gate_up_bias, down_bias};
  }

  // Unchecked fast path: addresses of float32 x [tokens, hidden], int64 index and float32 weight
  // [tokens, top_k], float32 out [tokens, hidden], all C-contiguous. Returns (evaluations, bytes read).
  std::pair<int64_t, int64_t> call_raw(uintptr_t x, int64_t tokens, int64_t top_k, uintptr_t index,
                                       uintptr_t weight, uintptr_t out, int n_threads) {
    require(tokens >= 0 && top_k > 0, "tokens must be >= 0 and top_k > 0");
    require(tokens == 0 || (x && index && weight && out), "x, index, weight and out must be non-null");
    sp::ExpertsCall c;
    c.tokens = tokens;
    c.top_k = top_k;
    c.x = reinterpret_cast<const float*>(x);
    c.index = reinterpret_cast<const int64_t*>(index);
    c.weight = reinterpret_cast<const float*>(weight);
    c.out = reinterpret_cast<float*>(out);
    nb::gil_scoped_release unlocked;
    const sp::ExpertsCount n = sp::run_experts(experts_, hidden_, inter_, act_, c, n_threads);
    return {n.evaluations, n.weight_bytes};
  }

  int64_t num_experts() const { return int64_t(experts_.size()); }
  // What the runtime's MoE blocks (csrc/runtime/moe.h) run: the same handles, called from native code.
  const std::vector<sp::ExpertProjections>& experts() const { return experts_; }
  int64_t hidden() const { return hidden_; }
  int64_t inter() const { return inter_; }
  sp::Activation activation() const { return act_; }

 private:
  int64_t hidden_, inter_;
  sp::Activation act_;
  std::vector<sp::ExpertProjections> experts_;
  std::vector<nb::object> keep_;
  std::vector<std::vector<std::optional<Vec>>> biases_;
};

}  // namespace py
}  // namespace sp
