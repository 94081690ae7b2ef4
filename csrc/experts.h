// Grouped mixture-of-experts dispatch: one call runs every selected expert of one MoE layer on the
// tokens routed to it (tokens batched per expert), reading only those experts' packed weights.
// Each expert is two packed linears: gate_up [2I, H] and down [H, I], with act(gate) * up between.
#pragma once
#include <cstdint>
#include <vector>

#include "common.h"

namespace sp {

// One packed projection of one expert, as the native linear layers run it (bind.cpp's NativeLinear).
class ExpertLinear {
 public:
  virtual ~ExpertLinear() = default;
  // y[rows, out] = x[rows, in] W^T (+ bias); x and y contiguous; called without the GIL.
  virtual void run_rows(const float* x, int64_t rows, float* y, const float* bias, int n_threads) = 0;
  virtual int64_t in_features() const = 0;
  virtual int64_t out_features() const = 0;
  // Bytes of the weight's arrays one call streams (values, masks / indices, offsets, scales, row sums).
  virtual int64_t weight_bytes() const = 0;
};

struct ExpertProjections {
  ExpertLinear* gate_up = nullptr;  // [2 * inter, hidden]: gate rows first, then up rows
  const float* gate_up_bias = nullptr;
  ExpertLinear* down = nullptr;  // [hidden, inter]
  const float* down_bias = nullptr;
};

struct ExpertsCall {
  int64_t tokens = 0, top_k = 0;
  const float* x = nullptr;        // [tokens, hidden]
  const int64_t* index = nullptr;  // [tokens, top_k]; an index outside [0, n_experts) selects nothing
  const float* weight = nullptr;   // [tokens, top_k] routing weights
  float* out = nullptr;            // [tokens, hidden], overwritten
};

// What one call did: (token, expert) evaluations and the bytes of packed weights it read.
struct ExpertsCount {
  int64_t evaluations = 0;
  int64_t weight_bytes = 0;
};

// out[t] = sum_j weight[t, j] * down_e(act(gate_e(x[t])) * up_e(x[t])), e = index[t, j]; experts in
// ascending order, each on its tokens in ascending order (the order of transformers' own loop).
ExpertsCount run_experts(const std::vector<ExpertProjections>& experts, int64_t hidden, int64_t inter,
                         Activation act, const ExpertsCall& call, int n_threads);

}  // namespace sp
