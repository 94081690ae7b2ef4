#include "attention.h"

#include <algorithm>
#include <utility>

#include "dispatch.h"
#include "threadpool.h"

namespace sp {

namespace {
constexpr int64_t kMinTaskRows = 16;  // fewer query rows per task and the key transpose dominates
constexpr double kSerialWork = 64.0 * 1024;  // multiply-adds below which one thread does it all
}  // namespace

// Asks for every line of q, k and v that attend(a, bh, i0, i1) reads, into L2. The rows are strided
// (heads interleave in memory), so the hardware prefetcher does not see them coming; fetched one miss
// at a time they took about half of the kernel's time.
void prefetch_pair(const AttentionArgs& a, int64_t bh, int64_t i0, int64_t i1) {
  const int64_t b = bh / a.heads, h = bh % a.heads, g = h / (a.heads / a.kv_heads);
  const float* K = a.k + b * a.k_b + g * a.k_h;
  const float* V = a.v + b * a.v_b + g * a.v_h;
  const float* Q = a.q + b * a.q_b + h * a.q_h;
  const int64_t kend = a.causal ? std::min(a.sk, i1) : a.sk;
  for (int64_t j = 0; j < kend; ++j)
    for (int64_t e = 0; e < a.d; e += 16) {
      __builtin_prefetch(K + j * a.k_s + e, 0, 2);
      __builtin_prefetch(V + j * a.v_s + e, 0, 2);
    }
  for (int64_t i = i0; i < i1; ++i)
    for (int64_t e = 0; e < a.d; e += 16) __builtin_prefetch(Q + i * a.q_s + e, 0, 2);
}

void run_attention(const AttentionArgs& a, int n_threads) {
  const int64_t pairs = a.batch * a.heads;
  if (pairs == 0 || a.sq == 0 || a.d == 0) return;  // nothing to write
  const AttendFn attend = active_table().attend;
  int threads = std::max(1, n_threads);
  if (double(pairs) * double(a.sq) * double(a.sk) * double(a.d) < kSerialWork) threads = 1;
  // enough tasks for every thread to take a few (a descheduled thread then costs little), but
  // query ranges no shorter than kMinTaskRows
  const int64_t want = threads > 1 ? 4 * int64_t(threads) : 1;
  const int64_t most = std::max<int64_t>(1, a.sq / kMinTaskRows);
  const int64_t parts = std::min(most, std::max<int64_t>(1, (want + pairs - 1) / pairs));
  const int64_t rows = (a.sq + parts - 1) / parts;
  const int64_t units = pairs * parts;  // (pair, query range) units, run in order within a task
  // tasks take runs of consecutive units, so each can fetch its next unit while it computes this one
  const int64_t tasks = std::min<int64_t>(units, want);
  ThreadPool::instance().run(int(tasks), threads, [&](int t) {
    const int64_t u0 = units * t / tasks, u1 = units * (t + 1) / tasks;
    auto range = [&](int64_t u) { return std::pair<int64_t, int64_t>((u % parts) * rows, std::min(a.sq, (u % parts + 1) * rows)); };
    for (int64_t u = u0; u < u1; ++u) {
      if (u == u0) prefetch_pair(a, u / parts, range(u).first, range(u).second);
      if (u + 1 < u1) prefetch_pair(a, (u + 1) / parts, range(u + 1).first, range(u + 1).second);
      attend(a, u / parts, range(u).first, range(u).second);
    }
  });
}

}  // namespace sp
