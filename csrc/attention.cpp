#include "attention.h"

#include <algorithm>

#include "dispatch.h"
#include "threadpool.h"

namespace sp {

namespace {

constexpr int64_t kMinTaskRows = 16;  // fewer query rows per task and the key transpose dominates
constexpr double kSerialWork = 64.0 * 1024;  // multiply-adds below which one thread does it all

// Asks for every line of q, k and v that attend(a, bh, i0, i1) reads, into L2. The rows are strided
// (heads interleave in memory), so the hardware prefetcher does not see them coming; fetched one miss
// at a time they took about half of the kernel's time.
void prefetch_pair(const AttentionArgs& a, int64_t bh, int64_t i0, int64_t i1) {
  const AttentionPair p = attention_pair(a, bh);
  const int64_t keys = visible_keys(a, i1);
  for (int64_t j = 0; j < keys; ++j)
    for (int64_t e = 0; e < a.d; e += 16) {
      __builtin_prefetch(p.k + j * a.k_s + e, 0, 2);
      __builtin_prefetch(p.v + j * a.v_s + e, 0, 2);
    }
  for (int64_t i = i0; i < i1; ++i)
    for (int64_t e = 0; e < a.d; e += 16) __builtin_prefetch(p.q + i * a.q_s + e, 0, 2);
}

}  // namespace

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
  const auto first_row = [&](int64_t u) { return (u % parts) * rows; };
  const auto end_row = [&](int64_t u) { return std::min(a.sq, first_row(u) + rows); };
  ThreadPool::instance().run(int(tasks), threads, [&](int t) {
    const int64_t u0 = units * t / tasks, u1 = units * (t + 1) / tasks;
    prefetch_pair(a, u0 / parts, first_row(u0), end_row(u0));
    for (int64_t u = u0; u < u1; ++u) {
      if (u + 1 < u1) prefetch_pair(a, (u + 1) / parts, first_row(u + 1), end_row(u + 1));
      attend(a, u / parts, first_row(u), end_row(u));
    }
  });
}

}  // namespace sp
