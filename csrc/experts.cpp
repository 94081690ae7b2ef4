#include "experts.h"

#include <algorithm>
#include <cstring>

#include "dispatch.h"

namespace sp {

namespace {

// Tokens routed to each expert, grouped by expert (counting sort: stable, so ascending tokens).
struct Buckets {
  std::vector<int64_t> start;  // [n_experts + 1]
  std::vector<int64_t> token;  // token of each routed slot
  std::vector<float> weight;   // its routing weight
};

void bucket(const ExpertsCall& c, int64_t n_experts, Buckets& b) {
  b.start.assign(size_t(n_experts + 1), 0);
  const int64_t slots = c.tokens * c.top_k;
  for (int64_t s = 0; s < slots; ++s) {
    const int64_t e = c.index[s];
    if (e >= 0 && e < n_experts) ++b.start[size_t(e + 1)];
  }
  for (int64_t e = 0; e < n_experts; ++e) b.start[size_t(e + 1)] += b.start[size_t(e)];
  b.token.resize(size_t(b.start[size_t(n_experts)]));
  b.weight.resize(b.token.size());
  std::vector<int64_t> fill(b.start.begin(), b.start.end() - 1);
  for (int64_t s = 0; s < slots; ++s) {
    const int64_t e = c.index[s];
    if (e < 0 || e >= n_experts) continue;
    const size_t at = size_t(fill[size_t(e)]++);
    b.token[at] = s / c.top_k;
    b.weight[at] = c.weight[s];
  }
}

}  // namespace

ExpertsCount run_experts(const std::vector<ExpertProjections>& experts, int64_t hidden, int64_t inter,
                         Activation act, const ExpertsCall& c, int n_threads) {
  const int64_t n_experts = int64_t(experts.size());
  thread_local Buckets b;
  thread_local std::vector<float> xs, h, a, d;
  bucket(c, n_experts, b);
  std::fill(c.out, c.out + c.tokens * hidden, 0.0f);
  const KernelTable& table = active_table();
  ExpertsCount count;
  for (int64_t e = 0; e < n_experts; ++e) {
    const int64_t first = b.start[size_t(e)], n = b.start[size_t(e + 1)] - first;
    if (n == 0) continue;
    const ExpertProjections& p = experts[size_t(e)];
    // the expert's tokens side by side (decode: the one token's row, read in place)
    const float* xin = c.x + b.token[size_t(first)] * hidden;
    if (n > 1) {
      xs.resize(size_t(n * hidden));
      for (int64_t r = 0; r < n; ++r)
        std::memcpy(xs.data() + r * hidden, c.x + b.token[size_t(first + r)] * hidden, size_t(hidden) * sizeof(float));
      xin = xs.data();
    }
    h.resize(size_t(n * 2 * inter));
    p.gate_up->run_rows(xin, n, h.data(), p.gate_up_bias, n_threads);
    if (act != Activation::None) table.activate(h.data(), n, 2 * inter, 0, inter, act);
    a.resize(size_t(n * inter));
    for (int64_t r = 0; r < n; ++r) {
      const float* gate = h.data() + r * 2 * inter;
      const float* up = gate + inter;
      float* row = a.data() + r * inter;
      for (int64_t j = 0; j < inter; ++j) row[j] = gate[j] * up[j];
    }
    d.resize(size_t(n * hidden));
    p.down->run_rows(a.data(), n, d.data(), p.down_bias, n_threads);
    for (int64_t r = 0; r < n; ++r) {
      const float w = b.weight[size_t(first + r)];
      float* dst = c.out + b.token[size_t(first + r)] * hidden;
      const float* src = d.data() + r * hidden;
      for (int64_t j = 0; j < hidden; ++j) dst[j] += w * src[j];
    }
    count.evaluations += n;
    count.weight_bytes += p.gate_up->weight_bytes() + p.down->weight_bytes();
  }
  return count;
}

}  // namespace sp
