#include "runtime/decoder.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include "threadpool.h"

namespace sp {
namespace runtime {

namespace {

struct StepBuffers {
  std::vector<float> hidden, cos, sin, last, logits;
};
thread_local StepBuffers tl_step;

float* grow(std::vector<float>& v, int64_t n) {
  if (v.size() < size_t(n)) v.resize(size_t(n));
  return v.data();
}

}  // namespace

void CausalLM::step(const int64_t* ids, int64_t batch, int64_t seq, KVCache& cache, float* logits, int64_t* next,
                    int threads, const float* thresholds, int level, const float* top_p) const {
  const Shape& sh = stack_->shape();
  const int64_t T = batch * seq, H = sh.hidden, d = sh.head_dim, V = vocab();
  if (T == 0) return;
  const RuntimeOps& ops = runtime_ops();
  StepBuffers& buf = tl_step;
  float* x = grow(buf.hidden, T * H);
  GatherArgs g;
  g.ids = ids, g.table = embed_.table, g.scales = embed_.scales, g.bits = embed_.bits, g.dim = H, g.out = x;
  ops.gather(g, 0, T);
  // each token's rotary row: its position counted from the row's first real token
  float* cos = grow(buf.cos, T * d);
  float* sin = grow(buf.sin, T * d);
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t s = 0; s < seq; ++s) {
      const int64_t p = std::clamp<int64_t>(cache.length + s - cache.start(b), 0, positions_ - 1);
      std::memcpy(cos + (b * seq + s) * d, cos_ + p * d, size_t(d) * sizeof(float));
      std::memcpy(sin + (b * seq + s) * d, sin_ + p * d, size_t(d) * sizeof(float));
    }
  stack_->forward(x, x, batch, seq, MaskView{}, false, cos, sin, &cache, false, threads, thresholds, level, top_p);
  // only each row's last token goes on: final norm, head, argmax
  float* last = grow(buf.last, batch * H);
  for (int64_t b = 0; b < batch; ++b) std::memcpy(last + b * H, x + (b * seq + seq - 1) * H, size_t(H) * sizeof(float));
  if (stack_->final_norm().weight) norm_rows(stack_->final_norm(), last, nullptr, last, batch, H, threads);
  float* out = logits ? logits : grow(buf.logits, batch * V);
  project(head_, last, batch, out, Activation::None, threads, thresholds, level);
  for (int64_t b = 0; b < batch; ++b) next[b] = ops.argmax(out + b * V, V);
}

}  // namespace runtime
}  // namespace sp
