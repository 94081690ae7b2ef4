#include "attention.h"

#include <algorithm>

#include "dispatch.h"
#include "threadpool.h"

namespace sp {

namespace {
constexpr int64_t kMinTaskRows = 16;  // fewer query rows per task and the key transpose dominates
constexpr double kSerialWork = 64.0 * 1024;  // multiply-adds below which one thread does it all
}  // namespace

void run_attention(const AttentionArgs& a, int n_threads) {
  const int64_t pairs = a.batch * a.heads;
  if (pairs == 0 || a.sq == 0) return;
  const AttendFn attend = active_table().attend;
  int threads = std::max(1, n_threads);
  if (double(pairs) * double(a.sq) * double(a.sk) * double(a.d) < kSerialWork) threads = 1;
  // enough tasks for every thread to take a few (a descheduled thread then costs little), but
  // query ranges no shorter than kMinTaskRows
  const int64_t want = threads > 1 ? 4 * int64_t(threads) : 1;
  const int64_t most = std::max<int64_t>(1, a.sq / kMinTaskRows);
  const int64_t parts = std::min(most, std::max<int64_t>(1, (want + pairs - 1) / pairs));
  const int64_t rows = (a.sq + parts - 1) / parts;
  const int64_t tasks = pairs * parts;
  ThreadPool::instance().run(int(tasks), threads, [&](int t) {
    const int64_t pair = t / parts, i0 = (t % parts) * rows;
    attend(a, pair, i0, std::min(a.sq, i0 + rows));
  });
}

}  // namespace sp
