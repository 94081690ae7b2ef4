#include "colskip.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "dispatch.h"
#include "threadpool.h"

namespace sp {

namespace {

// Masked weights storing at most this share of their weights take the sparse chunk layout: a block
// then costs 8 mask bytes + its values, under the 64 of a dense block up to ~88%; above 75% the
// expansion costs more time than the bytes it saves.
constexpr double kSparseChunkDensity = 0.75;

std::atomic<int> g_policy{0};

int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// Position within a 64-row block of local row l (position 4i + k holds row 16k + i).
inline int64_t block_pos(int64_t l) { return 4 * (l & 15) + (l >> 4); }

// Calls f(local row, column, value) for each stored value of rows [r0, r1), columns ascending per row.
template <typename F>
void for_each_stored(Kind kind, const LinearArgs& a, int64_t r0, int64_t r1, F f) {
  const int8_t* vals = static_cast<const int8_t*>(a.values);
  for (int64_t r = r0; r < r1; ++r) {
    if (kind == Kind::DenseI8) {
      for (int64_t c = 0; c < a.in; ++c) f(r - r0, c, vals[r * a.in + c]);
      continue;
    }
    const uint8_t* m = a.mask + r * a.mask_stride;
    int64_t p = a.row_offsets[r];
    for (int64_t c8 = 0; c8 < a.in; c8 += 8) {
      unsigned bits = m[c8 >> 3];
      while (bits) {
        const int t = __builtin_ctz(bits);
        bits &= bits - 1;
        f(r - r0, c8 + t, vals[p++]);
      }
    }
  }
}

// Dense chunks: column c at c * out_pad, u8 = w + 128 (rows past `out` hold 128, i.e. w = 0).
bool pack_dense(Kind kind, const LinearArgs& a, ColPanels& p, int threads) {
  const int64_t blocks = p.out_pad / kColBlock;
  p.bytes = p.out_pad * a.in;
  p.data = OwnedArray<uint8_t>::allocate(size_t(p.bytes + 64));
  if (!p.data) return false;
  for (int64_t c = 0; c < a.in; ++c) p.col_off[c] = c * p.out_pad;
  const int tasks = int(std::min<int64_t>(blocks, std::max(1, threads) * 4));
  ThreadPool::instance().run(tasks, threads, [&](int t) {
    for (int64_t blk = blocks * t / tasks; blk < blocks * (t + 1) / tasks; ++blk) {
      const int64_t r0 = blk * kColBlock, r1 = std::min(a.out, r0 + kColBlock);
      uint8_t* base = p.data + blk * kColBlock;
      for (int64_t c = 0; c < a.in; ++c) std::memset(base + c * p.out_pad, 128, size_t(kColBlock));
      for_each_stored(kind, a, r0, r1, [&](int64_t l, int64_t c, int8_t v) {
        base[c * p.out_pad + block_pos(l)] = uint8_t(int(v) + 128);
      });
    }
  });
  std::memset(p.data + p.bytes, 0, 64);
  return true;
}

// Sparse chunks: per block of column c, a 64-bit mask of the positions holding a weight, then those
// weights (s8) in position order.
bool pack_sparse(const LinearArgs& a, ColPanels& p, int threads) {
  const int64_t blocks = p.out_pad / kColBlock, in = a.in;
  std::vector<int32_t> at(size_t(blocks * in), 0);  // values per (block, column), then their offsets
  ThreadPool& pool = ThreadPool::instance();
  const int tasks = int(std::min<int64_t>(blocks, std::max(1, threads) * 4));
  pool.run(tasks, threads, [&](int t) {
    for (int64_t blk = blocks * t / tasks; blk < blocks * (t + 1) / tasks; ++blk)
      for_each_stored(Kind::MaskedI8, a, blk * kColBlock, std::min(a.out, (blk + 1) * kColBlock),
                      [&](int64_t, int64_t c, int8_t) { ++at[size_t(blk * in + c)]; });
  });
  int64_t off = 0;
  for (int64_t c = 0; c < in; ++c) {
    p.col_off[c] = off;
    for (int64_t blk = 0; blk < blocks; ++blk) {
      const int32_t n = at[size_t(blk * in + c)];
      at[size_t(blk * in + c)] = int32_t(off - p.col_off[c]);
      off += 8 + n;
    }
  }
  p.bytes = off;
  // 64 readable bytes past the end: the kernels load a whole vector of values per block
  p.data = OwnedArray<uint8_t>::allocate(size_t(off + 64));
  if (!p.data) return false;
  std::memset(p.data + off, 0, 64);
  pool.run(tasks, threads, [&](int t) {
    std::vector<uint64_t> masks(static_cast<size_t>(in));
    std::vector<int8_t> vals(static_cast<size_t>(in * kColBlock));
    for (int64_t blk = blocks * t / tasks; blk < blocks * (t + 1) / tasks; ++blk) {
      std::fill(masks.begin(), masks.end(), 0);
      for_each_stored(Kind::MaskedI8, a, blk * kColBlock, std::min(a.out, (blk + 1) * kColBlock),
                      [&](int64_t l, int64_t c, int8_t v) {
                        const int64_t pos = block_pos(l);
                        masks[size_t(c)] |= uint64_t(1) << pos;
                        vals[size_t(c * kColBlock + pos)] = v;
                      });
      for (int64_t c = 0; c < in; ++c) {
        uint8_t* dst = p.data + p.col_off[c] + at[size_t(blk * in + c)];
        uint64_t m = masks[size_t(c)];
        std::memcpy(dst, &m, 8);
        dst += 8;
        while (m) {
          *dst++ = uint8_t(vals[size_t(c * kColBlock + __builtin_ctzll(m))]);
          m &= m - 1;
        }
      }
    }
  });
  return true;
}

int64_t stored_values(Kind kind, const LinearArgs& a) {
  return kind == Kind::DenseI8 ? a.out * a.in : a.row_offsets[a.out];
}

}  // namespace

const ColSkipKernels& active_colskip() {
  const KernelTable* t = &active_table();
#if defined(__x86_64__)
  if (t == &avx512::table()) return avx512::colskip();
#if defined(SP_HAVE_AMX)
  if (t == &avx512::amx_table()) return avx512::colskip();
#endif
  if (t == &avx2::table()) return avx2::colskip();
#if defined(SP_HAVE_AVX2VNNI)
  if (t == &avx2vnni::table()) return avx2vnni::colskip();
#endif
#elif defined(__aarch64__)
  if (t == &neon::table()) return neon::colskip();
  if (t == &neondot::table()) return neondot::colskip();
#endif
  return scalar::colskip();
}

int64_t ColPanels::total_bytes() const {
  if (!data) return 0;
  return bytes + in * int64_t(sizeof(int64_t)) + scales_bytes;
}

bool colskip_supported(Kind kind, const LinearArgs& a) {
  if (kind != Kind::DenseI8 && kind != Kind::MaskedI8) return false;
  // Small layers never gain (their chunks are short: 0.5-0.9x at 50% listed columns on 256 x 2048 and
  // 2048 x 2048, 1.5x on 2048 x 5632; activation_kernels.py --crossover --shape), so they get no chunks
  // and no second copy of their weights; the always-skip policy (tests) takes every size.
  const bool big = a.out * a.in >= kColSkipMinWeights || colskip_policy() == 2;
  return big && a.out > 0 && a.in > 0 && (a.n_groups > 1 || a.in <= kColSkipMaxIn);
}

ColPanels prepare_colpanels(Kind kind, const LinearArgs& a, int threads) {
  ColPanels p;
  if (!colskip_supported(kind, a)) return p;
  p.out_pad = round_up(a.out, kColBlock);
  p.in = a.in;
  p.col_off = OwnedArray<int64_t>::allocate(size_t(a.in));
  if (!p.col_off) return ColPanels();
  p.sparse = kind == Kind::MaskedI8 && double(stored_values(kind, a)) <= kSparseChunkDensity * double(a.out * a.in);
  const bool ok = p.sparse ? pack_sparse(a, p, threads) : pack_dense(kind, a, p, threads);
  if (!ok) return ColPanels();
  if (a.n_groups > 1) {
    p.scales_t = OwnedArray<float>::zeroed(size_t(a.n_groups * p.out_pad));
    if (!p.scales_t) return ColPanels();
    for (int64_t r = 0; r < a.out; ++r)
      for (int64_t g = 0; g < a.n_groups; ++g) p.scales_t[g * p.out_pad + r] = a.scales[r * a.n_groups + g];
    p.scales_bytes = a.n_groups * p.out_pad * int64_t(sizeof(float));
  }
  return p;
}

void set_colskip_policy(int policy) { g_policy.store(policy < 0 || policy > 2 ? 0 : policy, std::memory_order_relaxed); }
int colskip_policy() { return g_policy.load(std::memory_order_relaxed); }

bool wants_colpanels(float threshold, int64_t batch) {
  return threshold > 0.f && batch >= 1 && batch <= kColSkipMaxBatch && colskip_policy() != 1;
}

namespace {

// Zeroes x's entries below the threshold into xz ([batch, in]) and lists the columns some token
// keeps (ascending) into cols; returns how many.
int64_t zero_and_list(const float* x, int64_t batch, int64_t in, float t, float* xz, uint8_t* any, int32_t* cols) {
  std::memset(any, 0, size_t(in));
  for (int64_t b = 0; b < batch; ++b) {
    const float* row = x + b * in;
    float* z = xz + b * in;
    for (int64_t c = 0; c < in; ++c) {
      const bool keep = !(std::fabs(row[c]) < t);
      z[c] = keep ? row[c] : 0.f;
      any[c] |= uint8_t(keep);
    }
  }
  if (!cols) return 0;
  int64_t n = 0;
  for (int64_t c = 0; c < in; ++c) {  // branch-free: kept columns are a coin flip at 50%
    cols[n] = int32_t(c);
    n += any[c];
  }
  return n;
}

// The column-skip call on zeroed inputs xz with `n_cols` listed columns.
void run_colskip(const KernelTable& table, const ColSkipKernels& k, const LinearArgs& a, const ColPanels& cp,
                 const float* xz, const int32_t* cols, int64_t n_cols, int n_threads) {
  thread_local std::vector<int8_t> xq;
  thread_local std::vector<uint8_t> xu, xv;
  thread_local std::vector<float> sx, facc;
  thread_local std::vector<int32_t> xsum, acc;
  const int64_t batch = a.batch, stride = round_up(a.in, 64), out_pad = cp.out_pad;
  if (xq.size() < size_t(batch * stride)) {
    xq.resize(size_t(batch * stride));
    xu.resize(size_t(batch * stride));
  }
  sx.resize(size_t(batch));
  xsum.assign(size_t(batch), 0);
  table.quantize(xz, 0, batch, a.in, stride, xq.data(), xu.data(), sx.data());
  if (xv.size() < size_t(std::max<int64_t>(1, n_cols) * batch)) xv.resize(size_t(std::max<int64_t>(1, n_cols) * batch));
  for (int64_t j = 0; j < n_cols; ++j)
    for (int64_t b = 0; b < batch; ++b) {
      const int8_t q = xq[size_t(b * stride + cols[j])];
      xv[size_t(j * batch + b)] = uint8_t(q);
      xsum[size_t(b)] += q;
    }
  int threads = std::max(1, n_threads);
  const double work = double(n_cols) * double(out_pad) * double(batch);
  if (work < 64.0 * 1024) threads = 1;
  // a few column ranges per thread, so a descheduled thread on a busy machine costs little
  const int parts = int(std::max<int64_t>(1, std::min<int64_t>(threads == 1 ? 1 : threads * 2, n_cols / 32)));
  const bool grouped = a.n_groups > 1;
  const size_t part = size_t(batch * out_pad);
  if (acc.size() < part * size_t(parts)) acc.resize(part * size_t(parts));
  if (grouped && facc.size() < part * size_t(parts)) facc.resize(part * size_t(parts));
  ColSkipArgs c;
  c.batch = batch;
  c.in = a.in;
  c.out = a.out;
  c.out_pad = out_pad;
  c.sparse = cp.sparse;
  c.data = cp.data;
  c.col_off = cp.col_off;
  c.cols = cols;
  c.n_cols = n_cols;
  c.xv = xv.data();
  c.n_groups = a.n_groups;
  c.group_size = a.group_size;
  c.scales_t = cp.scales_t;
  c.acc = acc.data();
  c.facc = grouped ? facc.data() : nullptr;
  c.parts = parts;
  c.xsum = xsum.data();
  c.sx = sx.data();
  c.scales = a.scales;
  c.bias = a.bias;
  c.y = a.y;
  ThreadPool& pool = ThreadPool::instance();
  int32_t* acc0 = acc.data();
  float* facc0 = grouped ? facc.data() : nullptr;
  pool.run(parts, threads, [&](int t) {
    int32_t* mine = acc0 + size_t(t) * part;
    std::memset(mine, 0, part * sizeof(int32_t));
    float* fmine = grouped ? facc0 + size_t(t) * part : nullptr;
    if (grouped) std::memset(fmine, 0, part * sizeof(float));
    k.accumulate(c, n_cols * t / parts, n_cols * (t + 1) / parts, mine, fmine);
  });
  const int64_t row_tasks = std::max<int64_t>(1, std::min<int64_t>(threads, a.out / 256));
  pool.run(int(row_tasks), threads, [&](int t) {
    const int64_t r0 = a.out * t / row_tasks / 16 * 16;
    const int64_t r1 = t + 1 == row_tasks ? a.out : a.out * (t + 1) / row_tasks / 16 * 16;
    k.finish(c, r0, r1);
    if (a.activation != Activation::None) table.activate(a.y, batch, a.out, r0, r1, a.activation);
  });
}

}  // namespace

void run_linear_sparse_inputs(Kind kind, LinearArgs a, float threshold, const ColPanels* cp, int n_threads,
                              bool* skipped) {
  if (skipped) *skipped = false;
  if (a.batch == 0) return;
  thread_local std::vector<float> xz;
  thread_local std::vector<uint8_t> any;
  thread_local std::vector<int32_t> cols;
  const int64_t n = a.batch * a.in;
  if (xz.size() < size_t(n)) xz.resize(size_t(n));
  if (any.size() < size_t(a.in)) {
    any.resize(size_t(a.in));
    cols.resize(size_t(a.in));
  }
  const int policy = colskip_policy();
  const bool may_skip = cp && cp->data && cp->in == a.in && wants_colpanels(threshold, a.batch);
  const int64_t n_cols = zero_and_list(a.x, a.batch, a.in, threshold, xz.data(), any.data(),
                                       may_skip ? cols.data() : nullptr);
  if (may_skip) {
    const ColSkipKernels& k = active_colskip();
    const float limit = cp->sparse ? k.max_density_sparse[a.batch] : k.max_density[a.batch];
    if (policy == 2 || double(n_cols) <= double(limit) * double(a.in)) {
      run_colskip(active_table(), k, a, *cp, xz.data(), cols.data(), n_cols, n_threads);
      if (skipped) *skipped = true;
      return;
    }
  }
  a.x = xz.data();
  run_linear(kind, a, n_threads);
}

}  // namespace sp
