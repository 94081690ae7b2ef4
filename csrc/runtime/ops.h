// Row-wise float operations of the runtime's block plans (norms, residual adds, rotary embeddings,
// embedding gathers, argmax), written once over the GCC vector type of kernels/activation.h so each
// ISA tree compiles them with its own -m flags (16 lanes in AVX-512, 8 in AVX2, 4 in SSE2). They are
// memory-bound one-pass loops; the linear layers and attention stay in the kernel tables.
//
// Included by csrc/runtime/ops_<tree>.cpp after defining SP_ISA_NS; static functions only (see
// kernels/generic.h for why no inline or template code may be shared between trees).
#include <cmath>
#include <cstdint>
#include <cstring>

#include "common.h"
#include "kernels/activation.h"
#include "runtime/ops_table.h"

#ifndef SP_ISA_NS
#error "define SP_ISA_NS before including runtime/ops.h"
#endif

namespace sp {
namespace SP_ISA_NS {
namespace rt {

using act::kLanes;
using act::Vec;

static inline Vec load(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

static inline void store(float* p, Vec v) { std::memcpy(p, &v, sizeof v); }

static inline float hsum(Vec v) {
  float lanes[kLanes];
  std::memcpy(lanes, &v, sizeof v);
  for (int w = kLanes / 2; w >= 1; w /= 2)
    for (int i = 0; i < w; ++i) lanes[i] += lanes[i + w];
  return lanes[0];
}

// Rows [r0, r1) of NormArgs (ops_table.h): s = stream + delta (kept in stream when delta is set),
// out = norm(s). Mean and variance in two passes over the row (then in L1) for torch's accuracy.
static void add_norm(const NormArgs& a, int64_t r0, int64_t r1) {
  const int64_t n = a.n;
  for (int64_t r = r0; r < r1; ++r) {
    float* s = a.stream + r * a.stream_stride;
    const float* d = a.delta ? a.delta + r * a.delta_stride : nullptr;
    float* o = a.out + r * a.out_stride;
    int64_t j = 0;
    Vec acc = Vec{};
    if (d) {
      for (; j + kLanes <= n; j += kLanes) {
        const Vec v = load(s + j) + load(d + j);
        store(s + j, v);
        acc += a.rms ? v * v : v;
      }
    } else {
      for (; j + kLanes <= n; j += kLanes) {
        const Vec v = load(s + j);
        acc += a.rms ? v * v : v;
      }
    }
    float total = hsum(acc);
    for (; j < n; ++j) {
      const float v = d ? (s[j] += d[j]) : s[j];
      total += a.rms ? v * v : v;
    }
    float mean = 0.f, inv;
    if (a.rms) {
      inv = 1.f / std::sqrt(total / float(n) + a.eps);
    } else {
      mean = total / float(n);
      Vec var = Vec{};
      for (j = 0; j + kLanes <= n; j += kLanes) {
        const Vec c = load(s + j) - mean;
        var += c * c;
      }
      float v2 = hsum(var);
      for (; j < n; ++j) v2 += (s[j] - mean) * (s[j] - mean);
      inv = 1.f / std::sqrt(v2 / float(n) + a.eps);
    }
    for (j = 0; j + kLanes <= n; j += kLanes) {
      Vec y = (load(s + j) - mean) * inv * load(a.weight + j);
      if (a.bias) y += load(a.bias + j);
      store(o + j, y);
    }
    for (; j < n; ++j) {
      const float y = (s[j] - mean) * inv * a.weight[j];
      o[j] = a.bias ? y + a.bias[j] : y;
    }
  }
}

// RMS norm of each head's d values in rows [r0, r1) of x (rows `stride` floats apart, `heads` heads
// each), in place, weight [d] (Qwen3's per-head query / key norms).
static void head_rms(float* x, int64_t stride, int64_t heads, int64_t d, const float* weight, float eps,
                     int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t h = 0; h < heads; ++h) {
      float* v = x + r * stride + h * d;
      Vec acc = Vec{};
      int64_t j = 0;
      for (; j + kLanes <= d; j += kLanes) acc += load(v + j) * load(v + j);
      float total = hsum(acc);
      for (; j < d; ++j) total += v[j] * v[j];
      const float inv = 1.f / std::sqrt(total / float(d) + eps);
      for (j = 0; j + kLanes <= d; j += kLanes) store(v + j, load(v + j) * inv * load(weight + j));
      for (; j < d; ++j) v[j] = v[j] * inv * weight[j];
    }
}

// Rotary embedding (the rotate-half convention of transformers' LLaMA) of each head in rows [r0, r1):
// row r uses cos / sin row r (d floats each, both halves given, as transformers computes them).
static void rope(float* x, int64_t stride, int64_t heads, int64_t d, const float* cos, const float* sin,
                 int64_t r0, int64_t r1) {
  const int64_t half = d / 2;
  for (int64_t r = r0; r < r1; ++r) {
    const float* c = cos + r * d;
    const float* s = sin + r * d;
    for (int64_t h = 0; h < heads; ++h) {
      float* lo = x + r * stride + h * d;
      float* hi = lo + half;
      int64_t i = 0;
      for (; i + kLanes <= half; i += kLanes) {
        const Vec a = load(lo + i), b = load(hi + i);
        store(lo + i, a * load(c + i) - b * load(s + i));
        store(hi + i, b * load(c + half + i) + a * load(s + half + i));
      }
      for (; i < half; ++i) {
        const float a = lo[i], b = hi[i];
        lo[i] = a * c[i] - b * s[i];
        hi[i] = b * c[half + i] + a * s[half + i];
      }
    }
  }
}

// a[i] *= b[i] for i < n (the gate x up product of gated MLPs).
static void mul(float* a, const float* b, int64_t n) {
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) store(a + i, load(a + i) * load(b + i));
  for (; i < n; ++i) a[i] *= b[i];
}

// Rows [r0, r1) of an embedding lookup: out[r] = table row ids[r] (fp32, or int8 / int4 codes times
// the row's scale).
static void gather(const GatherArgs& a, int64_t r0, int64_t r1) {
  const int64_t dim = a.dim;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t id = a.ids[r];
    float* o = a.out + r * dim;
    if (a.bits == 32) {
      std::memcpy(o, static_cast<const float*>(a.table) + id * dim, size_t(dim) * sizeof(float));
      continue;
    }
    const float scale = a.scales[id];
    if (a.bits == 8) {
      const int8_t* q = static_cast<const int8_t*>(a.table) + id * dim;
      for (int64_t j = 0; j < dim; ++j) o[j] = float(q[j]) * scale;
    } else {
      const uint8_t* q = static_cast<const uint8_t*>(a.table) + id * ((dim + 1) / 2);
      for (int64_t j = 0; j < dim; ++j) {
        const int nib = (q[j >> 1] >> ((j & 1) * 4)) & 0xF;
        o[j] = float(nib >= 8 ? nib - 16 : nib) * scale;
      }
    }
  }
}

// Index of the largest of x[0 .. n) (the first on ties, as torch.argmax); NaN never wins.
static int64_t argmax(const float* x, int64_t n) {
  int64_t best = 0;
  float top = -INFINITY;
  for (int64_t i = 0; i < n; ++i)
    if (x[i] > top) {
      top = x[i];
      best = i;
    }
  return best;
}

static const RuntimeOps& table() {
  static const RuntimeOps t = {add_norm, head_rms, rope, mul, gather, argmax};
  return t;
}

}  // namespace rt
}  // namespace SP_ISA_NS
}  // namespace sp
