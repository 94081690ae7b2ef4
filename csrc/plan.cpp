#include "plan.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "dispatch.h"
#include "threadpool.h"

namespace sp {
namespace {

constexpr int64_t kRowAlign = 16;  // 16 floats = one cache line of y per batch row

RowKernel pick(const KernelTable& t, Kind k) {
  switch (k) {
    case Kind::MaskedI8: return t.masked_i8;
    case Kind::DenseI8: return t.dense_i8;
    case Kind::MaskedF32: return t.masked_f32;
    case Kind::MaskedBF16: return t.masked_bf16;
    case Kind::CsrF32: return t.csr_f32;
    case Kind::CsrI8: return t.csr_i8;
  }
  return nullptr;
}

// Work of rows [0, r) in units the kernels spend time on: stored values (+ the row itself).
int64_t work_before(const LinearArgs& a, Kind k, int64_t r) {
  if (k == Kind::CsrF32 || k == Kind::CsrI8) return int64_t(a.row_ptr[r]) + r * 8;
  if (k == Kind::DenseI8) return r;
  return a.row_offsets[r] + r * (a.in / 8);
}

// Row boundaries of n_tasks tasks with about equal work, aligned to kRowAlign rows.
std::vector<int64_t> split_rows(const LinearArgs& a, Kind k, int n_tasks) {
  std::vector<int64_t> cut{0};
  const int64_t total = work_before(a, k, a.out);
  for (int t = 1; t < n_tasks; ++t) {
    const int64_t target = total * t / n_tasks;
    int64_t lo = cut.back(), hi = a.out;
    while (lo < hi) {  // first row whose prefix work reaches target
      const int64_t mid = (lo + hi) / 2;
      if (work_before(a, k, mid) < target) lo = mid + 1; else hi = mid;
    }
    const int64_t r = std::min(a.out, (lo + kRowAlign / 2) / kRowAlign * kRowAlign);
    if (r > cut.back() && r < a.out) cut.push_back(r);
  }
  cut.push_back(a.out);
  return cut;
}

// n rounded up to whole cache lines of `per_line` elements, then to an odd count of lines.
int64_t odd_lines(int64_t n, int64_t per_line) {
  const int64_t lines = (n + per_line - 1) / per_line;
  return (lines | 1) * per_line;
}

}  // namespace

void quantize_rows(const float* x, int64_t batch, int64_t in, int64_t stride, int8_t* xq,
                   uint8_t* xu, float* sx) {
  for (int64_t b = 0; b < batch; ++b) {
    const float* row = x + b * in;
    float amax = 0.f;
    for (int64_t j = 0; j < in; ++j) amax = std::max(amax, std::fabs(row[j]));
    const float s = amax == 0.f ? 1.f : amax / 127.f;
    sx[b] = s;
    int8_t* q = xq + b * stride;
    uint8_t* u = xu + b * stride;
    for (int64_t j = 0; j < in; ++j) {
      // division, not a reciprocal multiply: must round exactly like the torch reference
      const float v = std::min(127.f, std::max(-127.f, std::nearbyint(row[j] / s)));
      q[j] = int8_t(v);
      u[j] = uint8_t(int(v) + 128);
    }
    for (int64_t j = in; j < stride; ++j) {
      q[j] = 0;
      u[j] = 128;
    }
  }
}

void run_linear(Kind kind, LinearArgs a, int n_threads) {
  const KernelTable& table = active_table();
  const RowKernel kernel = pick(table, kind);
  thread_local std::vector<int8_t> xq;
  thread_local std::vector<uint8_t> xu;
  thread_local std::vector<float> sx;
  thread_local std::vector<float> xf;
  a.x_stride = a.in;
  if (is_int8(kind)) {
    a.x_stride = odd_lines(a.in, 64);
    const size_t n = size_t(a.batch * a.x_stride);
    if (xq.size() < n) {
      xq.resize(n);
      xu.resize(n);
    }
    if (sx.size() < size_t(a.batch)) sx.resize(size_t(a.batch));
    quantize_rows(a.x, a.batch, a.in, a.x_stride, xq.data(), xu.data(), sx.data());
    a.xq = xq.data();
    a.xu = xu.data();
    a.sx = sx.data();
  } else if (a.batch > 1 && a.x_stride != odd_lines(a.in, 16)) {
    a.x_stride = odd_lines(a.in, 16);
    if (xf.size() < size_t(a.batch * a.x_stride)) xf.resize(size_t(a.batch * a.x_stride));
    for (int64_t b = 0; b < a.batch; ++b)
      std::copy(a.x + b * a.in, a.x + (b + 1) * a.in, xf.data() + b * a.x_stride);
    a.x = xf.data();
  }
  // Tiny layers are not worth waking a helper thread for.
  const double macs = double(a.batch) * double(a.out) * double(a.in);
  int threads = std::max(1, n_threads);
  if (macs < 64.0 * 1024) threads = 1;
  const int64_t max_tasks = std::max<int64_t>(1, a.out / kRowAlign);
  // a few tasks per thread so a descheduled thread on a busy machine costs little
  const int n_tasks = int(std::min<int64_t>(max_tasks, threads == 1 ? 1 : threads * 4));
  const std::vector<int64_t> cut = split_rows(a, kind, n_tasks);
  const int real_tasks = int(cut.size()) - 1;
  ThreadPool::instance().run(real_tasks, threads, [&](int t) { kernel(a, cut[t], cut[t + 1]); });
}

}  // namespace sp
