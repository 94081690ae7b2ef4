// The decode loop's native step: token ids in, next-token ids (greedy) and logits out, through the
// embedding lookup, a Stack with its KV cache, the final norm and the LM head in one call.
#pragma once
#include <cstdint>

#include "runtime/stack.h"

namespace sp {
namespace runtime {

// An embedding table: float32 [vocab, dim] (bits 32), or int8 / int4 codes with one scale per row.
struct Embedding {
  const void* table = nullptr;
  const float* scales = nullptr;
  int bits = 32;
  int64_t vocab = 0, dim = 0;
};

class CausalLM {
 public:
  // cos / sin: rotary tables [positions, head_dim] for positions 0 .. positions - 1.
  CausalLM(const Stack* stack, Embedding embed, Projection head, const float* cos, const float* sin,
           int64_t positions)
      : stack_(stack), embed_(embed), head_(head), cos_(cos), sin_(sin), positions_(positions) {}

  // Runs ids [batch, seq] as the next `seq` positions of every row of `cache`; writes the logits of
  // each row's last token to logits [batch, vocab] (null: kept internal) and their argmax to next.
  // The caller has checked ids < vocab and cache->length + seq <= min(capacity, positions).
  // `thresholds`: activation sparsity of the blocks' and the head's projections; `level`: the elastic
  // level every elastic projection runs; `top_p`: the MoE blocks' adaptive routing (all as Stack::forward).
  void step(const int64_t* ids, int64_t batch, int64_t seq, KVCache& cache, float* logits, int64_t* next,
            int threads, const float* thresholds = nullptr, int level = 0, const float* top_p = nullptr) const;

  int64_t vocab() const { return head_.linear->args().out; }
  int64_t positions() const { return positions_; }
  const Stack& stack() const { return *stack_; }

 private:
  const Stack* stack_;
  Embedding embed_;
  Projection head_;
  const float* cos_;
  const float* sin_;
  int64_t positions_;
};

}  // namespace runtime
}  // namespace sp
