// A mixture-of-experts block of the native Stack: the router, each token's top-k experts run by the
// grouped expert kernel (csrc/experts.h, the call the module path makes), and an optional shared expert.
//
//   logits = router(h); p = softmax(logits); (w, e) = top-k of p; w /= sum(w) when `normalize`;
//   top_p < 1: only the fewest of the k whose share of sum(w) reaches top_p, rescaled to sum(w);
//   out = sum_j w_j * expert_{e_j}(h) [+ sigmoid(shared_gate(h)) * down(act(gate(h)) * up(h))]
//
// which is what transformers' Qwen3-MoE / Qwen2-MoE / Mixtral / OLMoE blocks compute (Mixtral always
// renormalises; Qwen2-MoE adds the gated shared expert), with sparsepress's adaptive routing
// (nn/experts.py's select_top_p) on top.
#pragma once
#include <atomic>
#include <cstdint>
#include <vector>

#include "common.h"
#include "experts.h"
#include "runtime/stack.h"

namespace sp {
namespace runtime {

// What the MoE blocks of a stack evaluated since they were last read (the module path's
// RoutedExperts.counts: tokens per layer call, token-expert evaluations, packed bytes read).
struct MoeCounts {
  std::atomic<int64_t> tokens{0}, evaluations{0}, bytes{0};
};

struct MoeBlock {
  const std::vector<ExpertProjections>* experts = nullptr;  // the layer's NativeExperts
  int64_t inter = 0;                                        // expert intermediate size
  Activation act = Activation::None;
  Projection router;  // [n_experts, hidden], float32, no bias
  int64_t top_k = 1;
  bool normalize = false;
  int slot = 0;  // index of this block's top_p in a call's top_p array
  // shared expert (gate.present(): it has one): down(act(gate(h)) * up(h)) of `shared_inter`
  // features, scaled by sigmoid(shared_scale(h)) where shared_scale is present (a [1, hidden] Linear)
  Projection shared_gate, shared_up, shared_down, shared_scale;
  int64_t shared_inter = 0;
  mutable MoeCounts counts;

  int64_t n_experts() const { return int64_t(experts->size()); }
};

// out[T, hidden] = the block applied to h[T, hidden] (out is overwritten). top_p >= 1: plain top-k.
// `thresholds` reach the shared expert's projections (activation sparsity, as Stack::forward).
// `level`: the elastic level of the shared expert's projections.
void run_moe(const MoeBlock& m, const float* h, int64_t T, int64_t hidden, float* out, float top_p, int threads,
             const float* thresholds = nullptr, int level = 0);

// Per-token routing alone (what run_moe does before the experts): logits [T, n_experts] in, each
// token's top_k expert indices and weights out; dropped slots (top_p) get index n_experts, weight 0.
void route(const float* logits, int64_t T, int64_t n_experts, int64_t top_k, bool normalize, float top_p,
           int64_t* index, float* weight);

}  // namespace runtime
}  // namespace sp
