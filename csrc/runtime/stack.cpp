#include "runtime/stack.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>

#include "attention.h"
#include "dispatch.h"
#include "runtime/moe.h"
#include "threadpool.h"

namespace sp {

const RuntimeOps& runtime_ops() {
#if defined(__x86_64__) || defined(_M_X64)
  const KernelTable& t = active_table();
  if (&t == &avx512::table()) return avx512::runtime_ops();
#if defined(SP_HAVE_AMX)
  if (&t == &avx512::amx_table()) return avx512::runtime_ops();  // the avx512 tree with tile GEMMs
#endif
  if (&t == &avx2::table()) return avx2::runtime_ops();
#if defined(SP_HAVE_AVX2VNNI)
  if (&t == &avx2vnni::table()) return avx2::runtime_ops();  // same flags but VNNI: avx2's row ops
#endif
#endif
  return scalar::runtime_ops();
}

namespace runtime {

namespace {

// Row-wise work below this many floats runs on the calling thread (waking a helper costs more).
constexpr int64_t kParallelFloats = 32 * 1024;

// Per-thread buffers of one forward, grown on demand and kept for the next call.
struct Workspace {
  std::vector<float> q, k, v, attn, tmp, normed, gate, up, mask;
};
thread_local Workspace tl_ws;

float* grow(std::vector<float>& v, int64_t n) {
  if (v.size() < size_t(n)) v.resize(size_t(n));
  return v.data();
}

// f(r0, r1) over [0, rows) in a few tasks per thread when the work is big enough to share.
template <class F>
void for_rows(int64_t rows, int64_t width, int threads, const F& f) {
  const int tasks = threads > 1 && rows * width >= kParallelFloats ? int(std::min<int64_t>(rows, 4 * threads)) : 1;
  if (tasks <= 1) {
    f(int64_t(0), rows);
    return;
  }
  ThreadPool::instance().run(tasks, threads, [&](int t) { f(rows * t / tasks, rows * (t + 1) / tasks); });
}

}  // namespace

void project(const Projection& p, const float* x, int64_t rows, float* y, Activation act, int threads,
             const float* thresholds, int level) {
  if (p.elastic) {
    LinearArgs call;
    call.batch = rows;
    call.x = x;
    call.y = y;
    call.bias = p.level_bias.empty() ? p.bias : p.level_bias[size_t(level)];
    call.activation = act;
    p.elastic->run(call, level, threads);
    return;
  }
  LinearArgs a = p.linear->args();
  a.batch = rows;
  a.x = x;
  a.y = y;
  a.bias = p.bias;
  a.activation = act;
  p.linear->run(a, threads, thresholds && p.slot >= 0 ? thresholds[p.slot] : 0.f);
}

namespace {

// Copies the `seq` new key (or value) rows of every sequence, [batch, seq, kv_heads, d], into the
// cache's [batch, kv_heads, capacity, d] at position `at`.
void store_rows(const float* src, float* cache, const KVCache& c, int64_t seq, int64_t at) {
  const int64_t d = c.head_dim, g = c.kv_heads;
  for (int64_t b = 0; b < c.batch; ++b)
    for (int64_t s = 0; s < seq; ++s)
      for (int64_t h = 0; h < g; ++h)
        std::memcpy(cache + ((b * g + h) * c.capacity + at + s) * d, src + ((b * seq + s) * g + h) * d,
                    size_t(d) * sizeof(float));
}

}  // namespace

KVCache::KVCache(int64_t layers_, int64_t batch_, int64_t kv_heads_, int64_t capacity_, int64_t head_dim_)
    : layers(layers_), batch(batch_), kv_heads(kv_heads_), capacity(capacity_), head_dim(head_dim_),
      layer_floats_(batch_ * kv_heads_ * capacity_ * head_dim_),
      keys_(new float[size_t(layers_ * batch_ * kv_heads_ * capacity_ * head_dim_)]),
      values_(new float[size_t(layers_ * batch_ * kv_heads_ * capacity_ * head_dim_)]),
      key_mask_(size_t(batch_ * capacity_), 0.f),
      start_(size_t(batch_), 0) {}

void KVCache::set_padding(int64_t b, int64_t pads) {
  float* row = key_mask_.data() + b * capacity;
  std::fill(row, row + capacity, 0.f);
  std::fill(row, row + std::min(pads, capacity), -INFINITY);
  start_[size_t(b)] = pads;
  padded_ = padded_ || pads > 0;
}

void norm_rows(const Norm& n, float* stream, const float* delta, float* out, int64_t rows, int64_t width,
               int threads) {
  const RuntimeOps& ops = runtime_ops();
  NormArgs a;
  a.stream = stream;
  a.stream_stride = width;
  a.delta = delta;
  a.delta_stride = width;
  a.out = out;
  a.out_stride = width;
  a.weight = n.weight;
  a.bias = n.bias;
  a.eps = n.eps;
  a.n = width;
  a.rms = n.rms;
  for_rows(rows, width, threads, [&](int64_t r0, int64_t r1) { ops.add_norm(a, r0, r1); });
}

void Stack::forward(const float* x, float* out, int64_t batch, int64_t seq, MaskView mask, bool causal,
                    const float* cos, const float* sin, KVCache* cache, bool final_norm, int threads,
                    const float* thresholds, int level, const float* top_p) const {
  const Shape& sh = shape_;
  const int64_t T = batch * seq, H = sh.hidden, d = sh.head_dim;
  const int64_t Hq = sh.heads * d, Hk = sh.kv_heads * d, I = sh.intermediate;
  if (T == 0) return;
  const RuntimeOps& ops = runtime_ops();
  Workspace& ws = tl_ws;
  float* q = grow(ws.q, T * Hq);
  float* k = grow(ws.k, T * Hk);
  float* v = grow(ws.v, T * Hk);
  float* attn = grow(ws.attn, T * Hq);
  float* tmp = grow(ws.tmp, T * H);
  float* normed = sh.pre_norm ? grow(ws.normed, T * H) : nullptr;
  float* gate = grow(ws.gate, T * I);
  float* up = grow(ws.up, T * I);
  if (out != x) std::memcpy(out, x, size_t(T * H) * sizeof(float));

  // Which keys the queries see: the caller's mask and flag, or (cached) all earlier positions,
  // padding hidden, themselves causally.
  const int64_t past = cache ? cache->length : 0;
  const int64_t sk = past + seq;
  AttentionArgs at;
  at.batch = batch, at.heads = sh.heads, at.kv_heads = sh.kv_heads, at.sq = seq, at.sk = sk, at.d = d;
  at.q = q, at.out = attn;
  at.q_b = seq * Hq, at.q_h = d, at.q_s = Hq;
  at.o_b = seq * Hq, at.o_h = d, at.o_s = Hq;
  at.scale = sh.scale;
  if (!cache) {
    at.k_b = at.v_b = seq * Hk, at.k_h = at.v_h = d, at.k_s = at.v_s = Hk;
    at.mask = mask.data, at.m_b = mask.b, at.m_h = mask.h, at.m_s = mask.s;
    at.causal = causal && seq > 1;
  } else {
    at.k_b = at.v_b = sh.kv_heads * cache->capacity * d, at.k_h = at.v_h = cache->capacity * d, at.k_s = at.v_s = d;
    const float* keys = cache->key_mask();  // [batch, capacity] or null
    if (past == 0 || seq == 1) {
      // a prompt alone (top-left causal = bottom-right when there is no past) or one new token
      at.causal = seq > 1;
      at.mask = keys, at.m_b = cache->capacity, at.m_h = 0, at.m_s = 0;
    } else {
      // new tokens after cached ones: query i sees keys up to past + i, padding hidden
      float* m = grow(ws.mask, batch * seq * sk);
      for (int64_t b = 0; b < batch; ++b)
        for (int64_t i = 0; i < seq; ++i) {
          float* row = m + (b * seq + i) * sk;
          for (int64_t j = 0; j < sk; ++j)
            row[j] = (j > past + i ? -INFINITY : 0.f) + (keys ? keys[b * cache->capacity + j] : 0.f);
        }
      at.causal = false;
      at.mask = m, at.m_b = seq * sk, at.m_h = 0, at.m_s = sk;
    }
  }

  const float* pending = nullptr;  // a pre-norm block's last residual, added by the next norm
  for (size_t l = 0; l < blocks_.size(); ++l) {
    const Block& blk = blocks_[l];
    const float* in = out;
    if (sh.pre_norm) {
      norm_rows(blk.norm1, out, pending, normed, T, H, threads);
      pending = nullptr;
      in = normed;
    }
    project(blk.q, in, T, q, Activation::None, threads, thresholds, level);
    project(blk.k, in, T, k, Activation::None, threads, thresholds, level);
    project(blk.v, in, T, v, Activation::None, threads, thresholds, level);
    if (blk.q_norm.weight || blk.k_norm.weight || cos) {
      // a norm over the whole projection is one "head" of its full width
      const int64_t qh = blk.qk_norm_full ? 1 : sh.heads, qd = blk.qk_norm_full ? Hq : d;
      const int64_t kh = blk.qk_norm_full ? 1 : sh.kv_heads, kd = blk.qk_norm_full ? Hk : d;
      for_rows(T, Hq + Hk, threads, [&](int64_t r0, int64_t r1) {
        if (blk.q_norm.weight) ops.head_rms(q, Hq, qh, qd, blk.q_norm.weight, blk.q_norm.eps, r0, r1);
        if (blk.k_norm.weight) ops.head_rms(k, Hk, kh, kd, blk.k_norm.weight, blk.k_norm.eps, r0, r1);
        if (cos) {
          ops.rope(q, Hq, sh.heads, d, cos, sin, r0, r1);
          ops.rope(k, Hk, sh.kv_heads, d, cos, sin, r0, r1);
        }
      });
    }
    if (cache) {
      store_rows(k, cache->keys(int64_t(l)), *cache, seq, past);
      store_rows(v, cache->values(int64_t(l)), *cache, seq, past);
      at.k = cache->keys(int64_t(l)), at.v = cache->values(int64_t(l));
    } else {
      at.k = k, at.v = v;
    }
    run_attention(at, threads);
    project(blk.o, attn, T, tmp, Activation::None, threads, thresholds, level);
    if (sh.pre_norm) {
      norm_rows(blk.norm2, out, tmp, normed, T, H, threads);
      in = normed;
    } else {
      norm_rows(blk.norm1, out, tmp, out, T, H, threads);
      in = out;
    }
    if (blk.moe) {
      run_moe(*blk.moe, in, T, H, tmp, top_p ? top_p[blk.moe->slot] : 1.f, threads, thresholds, level);
    } else {
      if (blk.gate.present()) {
        project(blk.gate, in, T, gate, blk.act, threads, thresholds, level);
        project(blk.up, in, T, up, Activation::None, threads, thresholds, level);
        for_rows(T, I, threads, [&](int64_t r0, int64_t r1) { ops.mul(gate + r0 * I, up + r0 * I, (r1 - r0) * I); });
      } else {
        project(blk.up, in, T, gate, blk.act, threads, thresholds, level);
      }
      project(blk.down, gate, T, tmp, Activation::None, threads, thresholds, level);
    }
    if (sh.pre_norm) {
      pending = tmp;
    } else {
      norm_rows(blk.norm2, out, tmp, out, T, H, threads);
    }
  }
  if (final_norm && final_norm_.weight) {
    norm_rows(final_norm_, out, pending, out, T, H, threads);
  } else if (pending) {
    for_rows(T, H, threads, [&](int64_t r0, int64_t r1) {
      for (int64_t i = r0 * H; i < r1 * H; ++i) out[i] += pending[i];
    });
  }
  if (cache) cache->length += seq;
}

}  // namespace runtime
}  // namespace sp
