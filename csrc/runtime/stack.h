// A transformer stack run natively: one call runs every block (norms, packed projections, attention,
// activation, residuals) on buffers reused from call to call, with an optional KV cache for decoding.
//
// Two block shapes cover the supported families (a pre-norm block's MLP may be a mixture of experts,
// runtime/moe.h):
//   post-norm (BERT, RoBERTa, MPNet, DistilBERT): x = norm1(x + o(attn(q, k, v)));
//                                               x = norm2(x + down(act(up(x))))
//   pre-norm (LLaMA, Mistral, Qwen2/3):           h = norm1(x); x += o(attn(rope(q(h)), rope(k(h)), v(h)));
//                                               h = norm2(x); x += down(act(gate(h)) * up(h))
// Grouped-query heads, per-head query / key RMS norms (Qwen3) and projection biases are options of the
// same blocks. The projections are the packed layers' NativeLinear handles, attention is the kernel
// table's (csrc/attention.h); what is left (norms, rotary embeddings, products) is runtime/ops.h.
#pragma once
#include <cstdint>
#include <memory>
#include <vector>

#include "common.h"
#include "elastic.h"
#include "native_linear.h"
#include "runtime/ops_table.h"

namespace sp {
namespace runtime {

struct Norm {
  const float* weight = nullptr;  // null: no norm here
  const float* bias = nullptr;
  float eps = 1e-5f;
  bool rms = false;
};

struct Projection {
  py::NativeLinear* linear = nullptr;  // one weight, or
  ElasticLinear* elastic = nullptr;    // nested elastic levels (csrc/elastic.h): the call's level runs
  const float* bias = nullptr;
  std::vector<const float*> level_bias;  // elastic: each level's bias (its stored shift added); empty: `bias`
  // index of this projection's activation-sparsity threshold in a call's thresholds (-1: none)
  int slot = -1;
  bool present() const { return linear || elastic; }
};

struct MoeBlock;  // runtime/moe.h

struct Block {
  Norm norm1, norm2, q_norm, k_norm;
  // q_norm / k_norm over each head's head_dim features (Qwen3), or over the whole projection (OLMoE)
  bool qk_norm_full = false;
  Projection q, k, v, o, gate, up, down;  // gate: pre-norm (gated MLP) blocks only
  Activation act = Activation::None;
  const MoeBlock* moe = nullptr;  // set: a mixture-of-experts block in place of gate / up / down
};

struct Shape {
  int64_t hidden = 0, heads = 0, kv_heads = 0, head_dim = 0, intermediate = 0;
  bool pre_norm = false;
  float scale = 1.f;  // attention score scale
};

// Keys and values of every layer for `batch` sequences of up to `capacity` positions, filled
// `length` positions so far (all rows alike). Row b's first `start[b]` positions are left padding:
// they are hidden from attention and positions count from the first real token.
class KVCache {
 public:
  KVCache(int64_t layers, int64_t batch, int64_t kv_heads, int64_t capacity, int64_t head_dim);
  float* keys(int64_t layer) { return keys_.get() + layer * layer_floats_; }
  float* values(int64_t layer) { return values_.get() + layer * layer_floats_; }
  // Marks row b's first `pads` positions as padding (before the prompt is run).
  void set_padding(int64_t b, int64_t pads);
  const float* key_mask() const { return padded_ ? key_mask_.data() : nullptr; }
  int64_t start(int64_t b) const { return start_[size_t(b)]; }

  int64_t layers, batch, kv_heads, capacity, head_dim;
  int64_t length = 0;

 private:
  int64_t layer_floats_;
  std::unique_ptr<float[]> keys_, values_;
  std::vector<float> key_mask_;  // [batch, capacity]: 0 or -inf
  std::vector<int64_t> start_;
  bool padded_ = false;
};

// An additive attention mask viewed as [batch, heads, queries, keys] (strides in floats; 0 broadcasts).
struct MaskView {
  const float* data = nullptr;
  int64_t b = 0, h = 0, s = 0;
};

class Stack {
 public:
  explicit Stack(Shape shape) : shape_(shape) {}
  void add_block(const Block& b) { blocks_.push_back(b); }
  void set_final_norm(const Norm& n) { final_norm_ = n; }
  const Shape& shape() const { return shape_; }
  int64_t layers() const { return int64_t(blocks_.size()); }
  const Norm& final_norm() const { return final_norm_; }

  // out[T, hidden] = the blocks applied to x[T, hidden] (T = batch * seq tokens, row-major
  // [batch, seq]), then the final norm when `final_norm` is asked for and set. Rotary embeddings:
  // cos / sin [T, head_dim] (null: none). Without a cache: `mask` (may be empty) and `causal` say
  // which keys each query sees. With one: the tokens are the next `seq` positions of every row;
  // they see the cached ones and themselves causally (mask and causal are ignored). `thresholds`
  // (null: none): a projection with slot s zeroes inputs below thresholds[s] (activation sparsity).
  // `level`: the elastic level index every elastic projection of this call runs (0: the lowest sparsity).
  // `top_p` (null: plain top-k everywhere): the adaptive-routing top_p of each MoE block, by its slot.
  void forward(const float* x, float* out, int64_t batch, int64_t seq, MaskView mask, bool causal,
               const float* cos, const float* sin, KVCache* cache, bool final_norm, int threads,
               const float* thresholds = nullptr, int level = 0, const float* top_p = nullptr) const;

 private:
  Shape shape_;
  std::vector<Block> blocks_;
  Norm final_norm_;
};

// Row-parallel helpers shared with the decoder loop.
void norm_rows(const Norm& n, float* stream, const float* delta, float* out, int64_t rows, int64_t width,
               int threads);
// y[rows, out] = act(x @ W.T + bias) through the projection's kernel; `thresholds` and `level` as in
// Stack::forward.
void project(const Projection& p, const float* x, int64_t rows, float* y, Activation act, int threads,
             const float* thresholds = nullptr, int level = 0);

}  // namespace runtime
}  // namespace sp
