#include "runtime/moe.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "runtime/ops_table.h"

namespace sp {
namespace runtime {

namespace {

// Per-thread buffers of the MoE blocks, grown on demand and kept for the next call.
struct MoeWorkspace {
  std::vector<float> logits, weight, gate, up, shared, scale;
  std::vector<int64_t> index;
};
thread_local MoeWorkspace tl_moe;

template <class T>
T* grow(std::vector<T>& v, int64_t n) {
  if (v.size() < size_t(n)) v.resize(size_t(n));
  return v.data();
}

}  // namespace

void route(const float* logits, int64_t T, int64_t n_experts, int64_t top_k, bool normalize, float top_p,
           int64_t* index, float* weight) {
  const float tiny = std::numeric_limits<float>::min();
  thread_local std::vector<float> p;
  p.resize(size_t(n_experts));
  for (int64_t t = 0; t < T; ++t) {
    const float* l = logits + t * n_experts;
    int64_t* idx = index + t * top_k;
    float* w = weight + t * top_k;
    // softmax in float32, as the routers do (dtype=torch.float)
    float top = -INFINITY;
    for (int64_t e = 0; e < n_experts; ++e) top = std::max(top, l[e]);
    float sum = 0.f;
    for (int64_t e = 0; e < n_experts; ++e) sum += (p[size_t(e)] = std::exp(l[e] - top));
    for (int64_t e = 0; e < n_experts; ++e) p[size_t(e)] /= sum;
    // top-k, largest first; ties to the lower expert index
    for (int64_t j = 0; j < top_k; ++j) {
      int64_t best = -1;
      for (int64_t e = 0; e < n_experts; ++e) {
        if (std::find(idx, idx + j, e) != idx + j) continue;
        if (best < 0 || p[size_t(e)] > p[size_t(best)]) best = e;
      }
      idx[j] = best;
      w[j] = p[size_t(best)];
    }
    float total = 0.f;
    for (int64_t j = 0; j < top_k; ++j) total += w[j];
    if (normalize)
      for (int64_t j = 0; j < top_k; ++j) w[j] /= total;
    if (top_p >= 1.f || top_k < 2) continue;
    // adaptive routing (nn/experts.py select_top_p): keep slots while the mass before them is < top_p
    float mass = 0.f;
    for (int64_t j = 0; j < top_k; ++j) mass += w[j];
    const float denom = std::max(mass, tiny);
    float cumulative = 0.f, kept = 0.f;
    for (int64_t j = 0; j < top_k; ++j) {
      const float share = w[j] / denom;
      cumulative += share;
      if (cumulative - share < top_p) {  // torch's cumsum(share) - share
        kept += w[j];
      } else {
        idx[j] = n_experts;
        w[j] = 0.f;
      }
    }
    const float rescale = mass / std::max(kept, tiny);
    for (int64_t j = 0; j < top_k; ++j) w[j] *= rescale;
  }
}

void run_moe(const MoeBlock& m, const float* h, int64_t T, int64_t hidden, float* out, float top_p, int threads,
             const float* thresholds, int level) {
  MoeWorkspace& ws = tl_moe;
  const int64_t E = m.n_experts(), k = m.top_k;
  float* logits = grow(ws.logits, T * E);
  project(m.router, h, T, logits, Activation::None, threads);
  int64_t* index = grow(ws.index, T * k);
  float* weight = grow(ws.weight, T * k);
  route(logits, T, E, k, m.normalize, top_p, index, weight);
  ExpertsCall call;
  call.tokens = T, call.top_k = k, call.x = h, call.index = index, call.weight = weight, call.out = out;
  const ExpertsCount n = run_experts(*m.experts, hidden, m.inter, m.act, call, threads);
  m.counts.tokens.fetch_add(T, std::memory_order_relaxed);
  m.counts.evaluations.fetch_add(n.evaluations, std::memory_order_relaxed);
  m.counts.bytes.fetch_add(n.weight_bytes, std::memory_order_relaxed);
  if (!m.shared_gate.present()) return;
  const int64_t I = m.shared_inter;
  float* gate = grow(ws.gate, T * I);
  float* up = grow(ws.up, T * I);
  float* shared = grow(ws.shared, T * hidden);
  project(m.shared_gate, h, T, gate, m.act, threads, thresholds, level);
  project(m.shared_up, h, T, up, Activation::None, threads, thresholds, level);
  runtime_ops().mul(gate, up, T * I);
  project(m.shared_down, gate, T, shared, Activation::None, threads, thresholds, level);
  float* scale = nullptr;
  if (m.shared_scale.present()) {
    scale = grow(ws.scale, T);
    project(m.shared_scale, h, T, scale, Activation::None, threads);
  }
  for (int64_t t = 0; t < T; ++t) {
    const float s = scale ? 1.f / (1.f + std::exp(-scale[t])) : 1.f;
    float* o = out + t * hidden;
    const float* x = shared + t * hidden;
    for (int64_t j = 0; j < hidden; ++j) o[j] += s * x[j];
  }
}

}  // namespace runtime
}  // namespace sp
