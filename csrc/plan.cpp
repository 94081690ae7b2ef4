#include "plan.h"

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cmath>
#include <memory>
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
// (Offsets are taken from the weight's first row: a weight may start inside a shared values buffer.)
int64_t work_before(const LinearArgs& a, Kind k, int64_t r) {
  if (k == Kind::CsrF32 || k == Kind::CsrI8) return int64_t(a.row_ptr[r] - a.row_ptr[0]) + r * 8;
  if (k == Kind::DenseI8) return r;
  return a.row_offsets[r] - a.row_offsets[0] + r * (a.in / 8);
}

int64_t work_before(const LinearArgs* parts, int n_parts, Kind k, int64_t r) {
  int64_t w = 0;
  for (int i = 0; i < n_parts; ++i) w += work_before(parts[i], k, r);
  return w;
}

// Row boundaries of n_tasks tasks with about equal work (over all parts), aligned to `align` rows.
std::vector<int64_t> split_rows(const LinearArgs* parts, int n_parts, Kind k, int n_tasks, int64_t align) {
  const int64_t out = parts[0].out;
  std::vector<int64_t> cut{0};
  const int64_t total = work_before(parts, n_parts, k, out);
  for (int t = 1; t < n_tasks; ++t) {
    const int64_t target = total * t / n_tasks;
    int64_t lo = cut.back(), hi = out;
    while (lo < hi) {  // first row whose prefix work reaches target
      const int64_t mid = (lo + hi) / 2;
      if (work_before(parts, n_parts, k, mid) < target) lo = mid + 1; else hi = mid;
    }
    const int64_t r = std::min(out, (lo + align / 2) / align * align);
    if (r > cut.back() && r < out) cut.push_back(r);
  }
  cut.push_back(out);
  return cut;
}

// n rounded up to whole cache lines of `per_line` elements, then to an odd count of lines.
int64_t odd_lines(int64_t n, int64_t per_line) {
  const int64_t lines = (n + per_line - 1) / per_line;
  return (lines | 1) * per_line;
}

std::atomic<int> g_gemm_min_batch{0};  // 0: the table's own cutover
constexpr int kBigPreparedCutover = 12;

// Tokens from which the GEMM beats the row kernels (measured, Zen 4): small layers from the table's
// value on; layers of >= 4M weights only from 12 tokens, because their panel packing (expand +
// transpose) costs about as much as 2-3 extra row passes, and masked ones from the table's own
// big-layer value (AVX-512: 17, its K-blocked row dots beat the GEMM up to 16 tokens).
int gemm_cutover(const KernelTable& table, Kind kind, const LinearArgs& a) {
  const int o = g_gemm_min_batch.load(std::memory_order_relaxed);
  if (o > 0) return o;
  if (a.out * a.in < kSmallLayerWeights) return table.gemm_min_batch;
  // big layers with prepared panels: no packing per call, the quad GEMM wins from ~12 tokens
  // (measured, 4096x11008 at 50%: even at 8 tokens, 1.17-1.38x over the row dots at 16)
  if (a.panels) return std::max(kBigPreparedCutover, table.gemm_min_batch);
  const int big = kind == Kind::MaskedI8 ? table.gemm_min_batch_big_masked : 12;
  return std::max(big, table.gemm_min_batch);
}

}  // namespace

void set_gemm_min_batch(int n) { g_gemm_min_batch.store(n < 0 ? 0 : n, std::memory_order_relaxed); }

int gemm_min_batch() {
  const int o = g_gemm_min_batch.load(std::memory_order_relaxed);
  return o > 0 ? o : active_table().gemm_min_batch;
}

void quantize_rows(const float* x, int64_t batch, int64_t in, int64_t stride, int8_t* xq,
                   uint8_t* xu, float* sx) {
  active_table().quantize(x, 0, batch, in, stride, xq, xu, sx);
}

PreparedPanels prepare_panels(Kind kind, const LinearArgs& a, int64_t max_weights, int threads) {
  PreparedPanels p;
  const KernelTable& table = active_table();
  if ((kind != Kind::MaskedI8 && kind != Kind::DenseI8) || a.n_groups != 1 || !table.tile_panel_bytes ||
      a.out * a.in >= max_weights || a.out == 0)
    return p;
  const bool masked = kind == Kind::MaskedI8;
  const int64_t tiles = (a.out + kGemmRows - 1) / kGemmRows;
  p.offsets = OwnedArray<int64_t>::allocate(size_t(tiles + 1));
  if (!p.offsets) return p;
  // tiles are independent: sized, then packed, by every thread in contiguous tile ranges
  const int tasks = int(std::min<int64_t>(tiles, threads > 1 ? threads * 4 : 1));
  std::atomic<bool> ok{true};
  std::vector<TileLayout> layouts(static_cast<size_t>(tiles));
  ThreadPool& pool = ThreadPool::instance();
  pool.run(tasks, threads, [&](int t) {
    for (int64_t i = tiles * t / tasks; i < tiles * (t + 1) / tasks; ++i) {
      p.offsets[i + 1] = table.tile_panel_bytes(a, masked, i * kGemmRows, &layouts[size_t(i)]);
      if (p.offsets[i + 1] < 0) ok.store(false, std::memory_order_relaxed);
    }
  });
  if (!ok.load()) return PreparedPanels();
  p.offsets[0] = 0;
  for (int64_t i = 0; i < tiles; ++i) p.offsets[i + 1] += p.offsets[i];
  p.data = OwnedArray<int8_t>::allocate(size_t(p.offsets[tiles]));
  if (!p.data) return PreparedPanels();
  pool.run(tasks, threads, [&](int t) {
    for (int64_t i = tiles * t / tasks; i < tiles * (t + 1) / tasks; ++i)
      if (!table.pack_tile_panel(a, masked, i * kGemmRows, layouts[size_t(i)], p.data + p.offsets[i]))
        ok.store(false, std::memory_order_relaxed);
  });
  if (!ok.load()) return PreparedPanels();
  p.table = &table;
  return p;
}

void use_panels(const PreparedPanels& p, LinearArgs& a) {
  if (p.data && p.table == &active_table()) {
    a.panels = p.data;
    a.panel_off = p.offsets;
  }
}

namespace {

// One call over n_parts weights (run_linear: one; run_linear_sum: their sum). With several, the bias is
// added once (by part 0's kernel, into y) and no part activates: the activation comes after the sum.
void run_parts(Kind kind, const LinearArgs* parts, int n_parts, const LinearArgs& call, int n_threads) {
  const KernelTable& table = active_table();
  thread_local std::vector<int8_t> xq;
  thread_local std::vector<uint8_t> xu;
  thread_local std::vector<int16_t> xw;
  thread_local std::vector<float> sx;
  thread_local std::vector<float> xf;
  thread_local std::vector<float> acc;  // the parts after the first, before they are added into y
  const int64_t batch = call.batch, in = parts[0].in, out = parts[0].out;
  int threads = std::max(1, n_threads);
  // Tiny layers are not worth waking a helper thread for.
  const double macs = double(batch) * double(out) * double(in) * double(n_parts);
  if (macs < 64.0 * 1024) threads = 1;
  ThreadPool& pool = ThreadPool::instance();
  // Per part: many tokens, one scale per row: the tiled GEMM (weights expanded once per call, or
  // prepared panels).
  // (no allocation for the usual few parts: small layers run in microseconds)
  constexpr int kInlineParts = 4;
  LinearArgs inline_args[kInlineParts];
  RowKernel inline_kernels[kInlineParts];
  bool inline_gemm[kInlineParts];
  std::vector<LinearArgs> heap_args;
  std::vector<RowKernel> heap_kernels;
  std::unique_ptr<bool[]> heap_gemm;
  LinearArgs* a = inline_args;
  RowKernel* kernels = inline_kernels;
  bool* gemm = inline_gemm;
  if (n_parts > kInlineParts) {
    heap_args.resize(size_t(n_parts));
    heap_kernels.resize(size_t(n_parts));
    heap_gemm.reset(new bool[size_t(n_parts)]);
    a = heap_args.data();
    kernels = heap_kernels.data();
    gemm = heap_gemm.get();
  }
  bool any_gemm = false, xu_only = true;
  for (int k = 0; k < n_parts; ++k) {
    LinearArgs& p = a[k];
    p = parts[k];
    p.batch = batch;
    kernels[k] = pick(table, kind);
    gemm[k] = false;
    if (kind == Kind::MaskedI8 && p.n_groups == 1 && p.gather_recs && table.gather_i8 &&
        p.gather_layout == table.gather_layout && batch <= table.gather_max_batch) {
      kernels[k] = table.gather_i8;  // very sparse, few tokens: work per stored value (gather_rows.h)
    } else if ((kind == Kind::MaskedI8 || kind == Kind::DenseI8) && p.n_groups == 1 &&
               batch >= gemm_cutover(table, kind, p)) {
      const RowKernel g = kind == Kind::MaskedI8 ? table.masked_gemm_i8 : table.dense_gemm_i8;
      if (g) {
        kernels[k] = g;
        gemm[k] = true;
        any_gemm = true;
      }
    }
    // prepared panels: the GEMM never falls back to the row kernels (which read xq)
    xu_only = xu_only && gemm[k] && table.gemm_reads_xu_only && p.panels;
  }
  // Every part on prepared panels and a summed rowsum given: one GEMM pass sums them in its accumulators
  // (no part's output is written and added; each token block's activations serve every part while cached).
  bool fused = n_parts > 1 && n_parts <= kMaxSumParts && call.rowsum && table.masked_gemm_i8_sum &&
               kind == Kind::MaskedI8 && table.gemm_reads_xu_only && table.gemm_activates;
  for (int k = 0; k < n_parts && fused; ++k) fused = gemm[k] && a[k].panels;
  int64_t x_stride = in;
  const float* x = call.x;
  int8_t* q = nullptr;
  uint8_t* u = nullptr;
  float* s = nullptr;
  int16_t* w = nullptr;
  if (is_int8(kind)) {
    x_stride = odd_lines(in, 64);
    const size_t n = size_t(batch * x_stride);
    if (xq.size() < n) {
      xq.resize(n);
      xu.resize(n);
    }
    if (sx.size() < size_t(batch)) sx.resize(size_t(batch));
    const int64_t elems = batch * in;
    const int q_tasks = threads > 1 && elems >= (64 << 10) ? int(std::min<int64_t>(batch, threads * 4)) : 1;
    const int64_t stride = x_stride;
    const bool want_i16 = any_gemm && table.gemm_wants_i16;
    if (want_i16 && xw.size() < n) xw.resize(n);
    // the caller's thread_local buffers, by pointer: the pool's threads have their own
    q = xu_only ? nullptr : xq.data();
    u = xu.data();
    s = sx.data();
    w = want_i16 ? xw.data() : nullptr;
    pool.run(q_tasks, threads, [&](int t) {
      const int64_t b0 = batch * t / q_tasks, b1 = batch * (t + 1) / q_tasks;
      table.quantize(x, b0, b1, in, stride, q, u, s);
      if (w)  // (q is set: a table that wants xw does not read xu only)
        for (int64_t i = b0 * stride; i < b1 * stride; ++i) w[i] = q[i];
    });
  } else if (batch > 1 && x_stride != odd_lines(in, 16)) {
    x_stride = odd_lines(in, 16);
    if (xf.size() < size_t(batch * x_stride)) xf.resize(size_t(batch * x_stride));
    for (int64_t b = 0; b < batch; ++b) std::copy(x + b * in, x + (b + 1) * in, xf.data() + b * x_stride);
    x = xf.data();
  }
  float* scratch = nullptr;
  if (n_parts > 1 && !fused) {
    if (acc.size() < size_t(batch * out)) acc.resize(size_t(batch * out));
    scratch = acc.data();
  }
  for (int k = 0; k < n_parts; ++k) {
    LinearArgs& p = a[k];
    p.x = x;
    p.x_stride = x_stride;
    p.xq = q;
    p.xu = u;
    p.sx = s;
    p.xw = w;
    p.y = k == 0 ? call.y : scratch;
    p.bias = k == 0 ? call.bias : nullptr;
    p.activation = n_parts == 1 ? call.activation : Activation::None;
  }
  // the activation after the kernels, unless the one kernel's GEMM applies it itself
  const bool activate = call.activation != Activation::None && !((n_parts == 1 || fused) && gemm[0] && table.gemm_activates);
  LinearArgs sum = a[0];
  sum.y = call.y;
  sum.bias = call.bias;
  sum.rowsum = call.rowsum;
  sum.activation = call.activation;
  const int64_t align = any_gemm ? kGemmRows : kRowAlign;
  const int64_t max_tasks = std::max<int64_t>(1, out / align);
  // a few tasks per thread so a descheduled thread on a busy machine costs little
  const int n_tasks = int(std::min<int64_t>(max_tasks, threads == 1 ? 1 : threads * 4));
  const std::vector<int64_t> cut = split_rows(a, n_parts, kind, n_tasks, align);
  const int real_tasks = int(cut.size()) - 1;
  float* y = call.y;
  // each task sums and activates the outputs it just wrote, while they are still in its caches
  pool.run(real_tasks, threads, [&](int t) {
    const int64_t r0 = cut[size_t(t)], r1 = cut[size_t(t) + 1];
    if (fused) {
      table.masked_gemm_i8_sum(a, n_parts, sum, r0, r1);
      return;
    }
    kernels[0](a[0], r0, r1);
    for (int k = 1; k < n_parts; ++k) {
      kernels[k](a[k], r0, r1);
      for (int64_t b = 0; b < batch; ++b) {
        float* dst = y + b * out;
        const float* src = scratch + b * out;
        for (int64_t r = r0; r < r1; ++r) dst[r] += src[r];
      }
    }
    if (activate) table.activate(y, batch, out, r0, r1, call.activation);
  });
}

}  // namespace

void run_linear(Kind kind, LinearArgs a, int n_threads) { run_parts(kind, &a, 1, a, n_threads); }

void run_linear_sum(Kind kind, const LinearArgs* parts, int n_parts, const LinearArgs& call, int n_threads) {
  if (n_parts <= 0) return;
  run_parts(kind, parts, n_parts, call, n_threads);
}

}  // namespace sp
