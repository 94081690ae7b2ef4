// Torch-free check of every kernel tree this build has against plain reference loops, on random
// inputs: the int8 row kernels (bitmask, 2:4 and BBS(64) mask streams, dense, CSR with 16- and 32-bit
// columns; one scale per row and grouped scales), the tiled GEMMs and prepared panels where a tree has
// them, the float kernels (fp32, bf16 bits, CSR), per-token quantization (bit-exact), the fused
// activations and attention. Built and run by tests/test_kernel_trees.py: natively, and for aarch64
// with Debian's cross compiler under qemu-user (the Python extension cannot run there).
//
// Usage: kernel_check [ISA ...]   (default: every level this CPU supports)
// Prints one line per failure and a closing "N passed, N failed" line; exits 1 on any failure.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "common.h"
#include "dispatch.h"
#include "gather_rows.h"

namespace {

using sp::KernelTable;
using sp::LinearArgs;

int g_passed = 0, g_failed = 0;

void check(bool ok, const std::string& what) {
  if (ok) {
    ++g_passed;
  } else {
    ++g_failed;
    std::printf("FAIL %s\n", what.c_str());
  }
}

std::mt19937_64 rng(12345);

float uniform(float lo, float hi) { return std::uniform_real_distribution<float>(lo, hi)(rng); }
int randint(int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); }

int64_t odd_lines(int64_t n, int64_t per_line) {  // as plan.cpp pads activation rows
  const int64_t lines = (n + per_line - 1) / per_line;
  return (lines | 1) * per_line;
}

// Which weights a row keeps: random at `density`, n of every m (2:4), or k of every bank (BBS).
enum class Pattern { Random, NofM, Banks };

struct Weight {
  int64_t out = 0, in = 0, group = 0, n_groups = 1;
  std::vector<uint8_t> keep;   // [out, in]
  std::vector<int8_t> q;       // [out, in] integer grid (0 where dropped)
  std::vector<float> wf;       // [out, in] float weights (0 where dropped)
  std::vector<float> scales;   // [out, n_groups]
  std::vector<int32_t> rowsum; // [out, n_groups]
};

Weight make_weight(int64_t out, int64_t in, Pattern pattern, double density, int64_t group) {
  Weight w;
  w.out = out, w.in = in, w.group = group > 0 ? group : in;
  w.n_groups = (in + w.group - 1) / w.group;
  w.keep.assign(size_t(out * in), 0);
  for (int64_t r = 0; r < out; ++r) {
    if (pattern == Pattern::Random) {
      for (int64_t c = 0; c < in; ++c) w.keep[size_t(r * in + c)] = uniform(0.f, 1.f) < density;
    } else {
      const int64_t span = pattern == Pattern::NofM ? 4 : 64, take = pattern == Pattern::NofM ? 2 : 32;
      for (int64_t c0 = 0; c0 < in; c0 += span) {
        std::vector<int64_t> cols;
        for (int64_t c = c0; c < c0 + span && c < in; ++c) cols.push_back(c);
        std::shuffle(cols.begin(), cols.end(), rng);
        for (int64_t t = 0; t < take && t < int64_t(cols.size()); ++t) w.keep[size_t(r * in + cols[size_t(t)])] = 1;
      }
    }
  }
  w.q.assign(size_t(out * in), 0);
  w.wf.assign(size_t(out * in), 0.f);
  w.scales.resize(size_t(out * w.n_groups));
  w.rowsum.assign(size_t(out * w.n_groups), 0);
  for (int64_t r = 0; r < out; ++r)
    for (int64_t g = 0; g < w.n_groups; ++g) w.scales[size_t(r * w.n_groups + g)] = uniform(0.001f, 0.02f);
  for (int64_t i = 0; i < out * in; ++i) {
    if (!w.keep[size_t(i)]) continue;
    // kept weights span the whole int8 range, -127 and 127 included (0 is possible: a kept zero)
    const int v = randint(0, 9) == 0 ? (randint(0, 1) ? 127 : -127) : randint(-127, 127);
    w.q[size_t(i)] = int8_t(v);
    w.wf[size_t(i)] = uniform(-2.f, 2.f);
    const int64_t r = i / in, g = (i % in) / w.group;
    w.rowsum[size_t(r * w.n_groups + g)] += v;
  }
  return w;
}

// The masked stream of docs/formats.md: mask bits LSB first, values row-major, row offsets.
struct Stream {
  std::vector<uint8_t> mask;
  std::vector<int64_t> offsets;
  int64_t stride = 0;
};

Stream make_stream(const Weight& w) {
  Stream s;
  s.stride = (w.in + 7) / 8;
  s.mask.assign(size_t(w.out * s.stride), 0);
  s.offsets.assign(size_t(w.out + 1), 0);
  for (int64_t r = 0; r < w.out; ++r) {
    int64_t n = 0;
    for (int64_t c = 0; c < w.in; ++c)
      if (w.keep[size_t(r * w.in + c)]) {
        s.mask[size_t(r * s.stride + c / 8)] |= uint8_t(1u << (c % 8));
        ++n;
      }
    s.offsets[size_t(r + 1)] = s.offsets[size_t(r)] + n;
  }
  return s;
}

template <typename T, typename F>
std::vector<T> gather_kept(const Weight& w, F value) {
  std::vector<T> out;
  for (int64_t i = 0; i < w.out * w.in; ++i)
    if (w.keep[size_t(i)]) out.push_back(value(i));
  return out;
}

uint16_t bf16_bits(float f) {  // round to nearest even, as torch's bfloat16 conversion
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return uint16_t((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
}

// Per-token activations as plan.cpp hands them over: [batch, stride] rows, padded.
struct Tokens {
  int64_t batch = 0, in = 0, stride = 0;
  std::vector<float> x;           // [batch, in]
  std::vector<int8_t> xq;         // [batch, stride]
  std::vector<uint8_t> xu;
  std::vector<int16_t> xw;
  std::vector<float> sx;
};

// The reference quantization of docs/formats.md (division, round half to even, clamp to +-127).
void reference_quantize(const float* row, int64_t in, int8_t* q, float* s) {
  float amax = 0.f;
  for (int64_t j = 0; j < in; ++j) amax = std::fabs(row[j]) > amax ? std::fabs(row[j]) : amax;
  *s = amax == 0.f ? 1.f : amax / 127.f;
  for (int64_t j = 0; j < in; ++j) {
    float v = std::nearbyint(row[j] / *s);
    q[j] = int8_t(v > 127.f ? 127.f : (v < -127.f ? -127.f : v));
  }
}

Tokens make_tokens(const KernelTable& t, int64_t batch, int64_t in, const std::string& where) {
  Tokens k;
  k.batch = batch, k.in = in, k.stride = odd_lines(in, 64);
  k.x.resize(size_t(batch * in));
  for (float& v : k.x) v = uniform(-3.f, 3.f);
  if (batch > 1) std::fill(k.x.begin(), k.x.begin() + in, 0.f);  // an all-zero token: sx = 1
  if (batch > 2 && in > 3) k.x[size_t(2 * in + 3)] = 40.f;         // one outlier
  k.xq.assign(size_t(batch * k.stride), 99);
  k.xu.assign(size_t(batch * k.stride), 99);
  k.sx.assign(size_t(batch), 0.f);
  t.quantize(k.x.data(), 0, batch, in, k.stride, k.xq.data(), k.xu.data(), k.sx.data());
  bool exact = true;
  std::vector<int8_t> q(static_cast<size_t>(in));
  for (int64_t b = 0; b < batch; ++b) {
    float s;
    reference_quantize(k.x.data() + b * in, in, q.data(), &s);
    exact = exact && s == k.sx[size_t(b)];
    for (int64_t j = 0; j < k.stride; ++j) {
      const int8_t want = j < in ? q[size_t(j)] : 0;
      exact = exact && k.xq[size_t(b * k.stride + j)] == want &&
              k.xu[size_t(b * k.stride + j)] == uint8_t(int(want) + 128);
    }
  }
  check(exact, where + " quantize");
  k.xw.assign(k.xq.begin(), k.xq.end());
  return k;
}

// y[b, r] of the reference in double: exact integer dots per scale group (int kinds), or float sums.
std::vector<double> reference_int8(const Weight& w, const Tokens& k, std::vector<double>* magnitude) {
  std::vector<double> y(size_t(k.batch * w.out), 0.0);
  magnitude->assign(y.size(), 0.0);
  for (int64_t b = 0; b < k.batch; ++b)
    for (int64_t r = 0; r < w.out; ++r) {
      double acc = 0.0, mag = 0.0;
      for (int64_t g = 0; g < w.n_groups; ++g) {
        int64_t dot = 0, adot = 0;
        for (int64_t c = g * w.group; c < std::min(w.in, (g + 1) * w.group); ++c) {
          const int64_t p = int64_t(k.xq[size_t(b * k.stride + c)]) * w.q[size_t(r * w.in + c)];
          dot += p;
          adot += p < 0 ? -p : p;
        }
        acc += double(dot) * w.scales[size_t(r * w.n_groups + g)];
        mag += double(adot) * w.scales[size_t(r * w.n_groups + g)];
      }
      y[size_t(b * w.out + r)] = acc * k.sx[size_t(b)];
      (*magnitude)[size_t(b * w.out + r)] = mag * k.sx[size_t(b)];
    }
  return y;
}

bool close(const std::vector<float>& y, const std::vector<double>& ref, const std::vector<double>& mag,
           const std::vector<float>& bias, int64_t out) {
  for (size_t i = 0; i < y.size(); ++i) {
    const double want = ref[i] + bias[i % size_t(out)];
    const double tol = 1e-5 * mag[i] + 1e-5 * std::fabs(want) + 1e-6;
    if (!(std::fabs(double(y[i]) - want) <= tol)) return false;
  }
  return true;
}

std::string describe(const char* kind, const Weight& w, int64_t batch, double density) {
  char buf[160];
  std::snprintf(buf, sizeof buf, "%s out=%lld in=%lld batch=%lld group=%lld density=%.2f", kind,
                (long long)w.out, (long long)w.in, (long long)batch, (long long)w.group, density);
  return buf;
}

// Runs `kernel` over rows [0, out) in pieces starting at multiples of `align` (as plan.cpp splits).
void run_rows(sp::RowKernel kernel, const LinearArgs& a, int64_t align) {
  const int64_t piece = align * 2;
  for (int64_t r0 = 0; r0 < a.out; r0 += piece) kernel(a, r0, std::min(a.out, r0 + piece));
}

void check_int8(const KernelTable& t, const std::string& isa, int64_t out, int64_t in, int64_t batch, Pattern pattern,
                double density, int64_t group) {
  const Weight w = make_weight(out, in, pattern, density, group);
  const Stream s = make_stream(w);
  const Tokens k = make_tokens(t, batch, in, isa);
  std::vector<double> mag;
  const std::vector<double> ref = reference_int8(w, k, &mag);
  std::vector<float> bias(static_cast<size_t>(out));
  for (float& v : bias) v = uniform(-1.f, 1.f);
  const std::vector<int8_t> vals = gather_kept<int8_t>(w, [&](int64_t i) { return w.q[size_t(i)]; });
  LinearArgs a;
  a.batch = batch, a.in = in, a.out = out;
  a.xq = k.xq.data(), a.xu = k.xu.data(), a.x_stride = k.stride, a.sx = k.sx.data();
  a.xw = t.gemm_wants_i16 ? k.xw.data() : nullptr;
  a.scales = w.scales.data(), a.rowsum = w.rowsum.data(), a.n_groups = w.n_groups, a.group_size = w.group;
  a.bias = bias.data();
  std::vector<float> y(static_cast<size_t>(batch * out));
  auto run = [&](const char* kind, sp::RowKernel kernel, const LinearArgs& args, int64_t align) {
    std::fill(y.begin(), y.end(), -999.f);
    run_rows(kernel, args, align);
    check(close(y, ref, mag, bias, out), isa + " " + describe(kind, w, batch, density));
  };
  a.y = y.data();
  // masked stream
  LinearArgs m = a;
  m.mask = s.mask.data(), m.mask_stride = s.stride, m.row_offsets = s.offsets.data();
  m.values = vals.data(), m.values_len = int64_t(vals.size());
  run("masked_i8", t.masked_i8, m, 16);
  if (sp::mask_four_per_byte(m)) {  // 2:4 and 4:8 streams, as NativeLinear marks them
    LinearArgs four = m;
    four.four_per_byte = true;
    run("masked_i8 (four per byte)", t.masked_i8, four, 16);
  }
  // dense rows
  LinearArgs d = a;
  d.values = w.q.data(), d.values_len = out * in;
  run("dense_i8", t.dense_i8, d, 16);
  // CSR with 32-bit and (when in fits) 16-bit columns
  std::vector<int32_t> row_ptr(size_t(out + 1), 0), cols32;
  std::vector<int16_t> cols16;
  for (int64_t r = 0; r < out; ++r) {
    for (int64_t c = 0; c < in; ++c)
      if (w.keep[size_t(r * in + c)]) {
        cols32.push_back(int32_t(c));
        cols16.push_back(int16_t(c));
      }
    row_ptr[size_t(r + 1)] = int32_t(cols32.size());
  }
  LinearArgs c = a;
  c.row_ptr = row_ptr.data(), c.values = vals.data(), c.values_len = int64_t(vals.size());
  c.col_idx = cols32.data(), c.col_idx16 = false;
  run("csr_i8/32", t.csr_i8, c, 16);
  if (in <= 32767) {
    c.col_idx = cols16.data(), c.col_idx16 = true;
    run("csr_i8/16", t.csr_i8, c, 16);
  }
  if (w.n_groups != 1) return;
  // gather rows (very sparse weights, few tokens; the layout is built the same at any density)
  if (t.gather_i8) {
    const sp::GatherRows rows = sp::prepare_gather_rows(m, t.gather_layout);
    check(rows.records != nullptr, isa + " " + describe("prepare_gather_rows", w, batch, density));
    LinearArgs gr = m;
    sp::use_gather_rows(rows, gr);
    run("gather_i8", t.gather_i8, gr, 16);
  }
  // tiled GEMMs (one scale per row), packed per call and from prepared panels
  for (int masked = 0; masked < 2; ++masked) {
    const sp::RowKernel gemm = masked ? t.masked_gemm_i8 : t.dense_gemm_i8;
    if (!gemm) continue;
    const LinearArgs& g = masked ? m : d;
    run(masked ? "masked_gemm_i8" : "dense_gemm_i8", gemm, g, sp::kGemmRows);
    if (!t.tile_panel_bytes) continue;
    const int64_t tiles = (out + sp::kGemmRows - 1) / sp::kGemmRows;
    std::vector<int64_t> off(size_t(tiles + 1), 0);
    std::vector<sp::TileLayout> layouts(static_cast<size_t>(tiles));
    for (int64_t i = 0; i < tiles; ++i) off[size_t(i + 1)] = off[size_t(i)] + t.tile_panel_bytes(g, masked, i * sp::kGemmRows, &layouts[size_t(i)]);
    int8_t* panels = static_cast<int8_t*>(std::aligned_alloc(64, size_t((off[size_t(tiles)] + 63) / 64 * 64 + 64)));
    bool packed = true;
    for (int64_t i = 0; i < tiles; ++i)
      packed = packed && t.pack_tile_panel(g, masked, i * sp::kGemmRows, layouts[size_t(i)], panels + off[size_t(i)]);
    check(packed, isa + " " + describe("pack_tile_panel", w, batch, density));
    LinearArgs p = g;
    p.panels = panels, p.panel_off = off.data();
    run(masked ? "masked_gemm_i8 (prepared)" : "dense_gemm_i8 (prepared)", gemm, p, sp::kGemmRows);
    std::free(panels);
  }
}

void check_float(const KernelTable& t, const std::string& isa, int64_t out, int64_t in, int64_t batch, double density) {
  const Weight w = make_weight(out, in, Pattern::Random, density, 0);
  const Stream s = make_stream(w);
  std::vector<float> x(static_cast<size_t>(batch * in));
  for (float& v : x) v = uniform(-2.f, 2.f);
  const std::vector<float> f32 = gather_kept<float>(w, [&](int64_t i) { return w.wf[size_t(i)]; });
  const std::vector<uint16_t> b16 = gather_kept<uint16_t>(w, [&](int64_t i) { return bf16_bits(w.wf[size_t(i)]); });
  std::vector<float> bias(static_cast<size_t>(out));
  for (float& v : bias) v = uniform(-1.f, 1.f);
  auto reference = [&](bool bf16, std::vector<double>* mag) {
    std::vector<double> y(size_t(batch * out), 0.0);
    mag->assign(y.size(), 0.0);
    for (int64_t b = 0; b < batch; ++b)
      for (int64_t r = 0; r < out; ++r)
        for (int64_t c = 0; c < in; ++c) {
          float wv = w.wf[size_t(r * in + c)];
          if (bf16) wv = sp::bf16_to_f32(bf16_bits(wv));
          const double p = double(x[size_t(b * in + c)]) * wv;
          y[size_t(b * out + r)] += p;
          (*mag)[size_t(b * out + r)] += std::fabs(p);
        }
    return y;
  };
  LinearArgs a;
  a.batch = batch, a.in = in, a.out = out, a.x = x.data(), a.x_stride = in, a.bias = bias.data();
  a.mask = s.mask.data(), a.mask_stride = s.stride, a.row_offsets = s.offsets.data();
  std::vector<float> y(static_cast<size_t>(batch * out));
  a.y = y.data();
  std::vector<double> mag;
  for (int bf16 = 0; bf16 < 2; ++bf16) {
    LinearArgs m = a;
    m.values = bf16 ? static_cast<const void*>(b16.data()) : static_cast<const void*>(f32.data());
    m.values_len = int64_t(f32.size());
    const std::vector<double> ref = reference(bf16, &mag);
    std::fill(y.begin(), y.end(), -999.f);
    run_rows(bf16 ? t.masked_bf16 : t.masked_f32, m, 16);
    check(close(y, ref, mag, bias, out), isa + " " + describe(bf16 ? "masked_bf16" : "masked_f32", w, batch, density));
  }
  std::vector<int32_t> row_ptr(size_t(out + 1), 0), cols;
  for (int64_t r = 0; r < out; ++r) {
    for (int64_t c = 0; c < in; ++c)
      if (w.keep[size_t(r * in + c)]) cols.push_back(int32_t(c));
    row_ptr[size_t(r + 1)] = int32_t(cols.size());
  }
  LinearArgs c = a;
  c.row_ptr = row_ptr.data(), c.col_idx = cols.data(), c.col_idx16 = false;
  c.values = f32.data(), c.values_len = int64_t(f32.size());
  const std::vector<double> ref = reference(false, &mag);
  std::fill(y.begin(), y.end(), -999.f);
  run_rows(t.csr_f32, c, 16);
  check(close(y, ref, mag, bias, out), isa + " " + describe("csr_f32", w, batch, density));
}

double reference_activation(double v, sp::Activation kind) {
  switch (kind) {
    case sp::Activation::Gelu: return 0.5 * v * (1.0 + std::erf(v / std::sqrt(2.0)));
    case sp::Activation::GeluTanh:
      return 0.5 * v * (1.0 + std::tanh(std::sqrt(2.0 / M_PI) * (v + 0.044715 * v * v * v)));
    case sp::Activation::Relu: return v > 0 ? v : 0.0;
    case sp::Activation::Silu: return v / (1.0 + std::exp(-v));
    default: return v;
  }
}

void check_activations(const KernelTable& t, const std::string& isa) {
  const int64_t batch = 3, stride = 203;
  for (int kind = 1; kind <= int(sp::Activation::Silu); ++kind) {
    std::vector<float> y(static_cast<size_t>(batch * stride));
    for (size_t i = 0; i < y.size(); ++i) y[i] = -30.f + 60.f * float(i) / float(y.size());
    const std::vector<float> before = y;
    t.activate(y.data(), batch, stride, 5, 190, sp::Activation(kind));
    bool ok = true;
    for (int64_t b = 0; b < batch; ++b)
      for (int64_t c = 0; c < stride; ++c) {
        const size_t i = size_t(b * stride + c);
        const double want = c >= 5 && c < 190 ? reference_activation(before[i], sp::Activation(kind)) : before[i];
        ok = ok && std::fabs(y[i] - want) <= 3e-6 + 2e-6 * std::fabs(want);
      }
    check(ok, isa + " activate kind=" + std::to_string(kind));
  }
}

void check_attention(const KernelTable& t, const std::string& isa, int64_t sq, int64_t sk, int64_t d, bool causal,
                     bool masked) {
  const int64_t batch = 2, heads = 4, kv = 2;
  std::vector<float> q(size_t(batch * heads * sq * d)), k(size_t(batch * kv * sk * d)), v(k.size());
  std::vector<float> mask(size_t(batch * heads * sq * sk)), out(q.size(), -999.f);
  for (float& f : q) f = uniform(-1.f, 1.f);
  for (float& f : k) f = uniform(-1.f, 1.f);
  for (float& f : v) f = uniform(-1.f, 1.f);
  for (float& f : mask) f = randint(0, 7) == 0 ? -INFINITY : uniform(-1.f, 0.f);
  sp::AttentionArgs a;
  a.q = q.data(), a.k = k.data(), a.v = v.data(), a.mask = masked ? mask.data() : nullptr, a.out = out.data();
  a.batch = batch, a.heads = heads, a.kv_heads = kv, a.sq = sq, a.sk = sk, a.d = d;
  a.q_b = heads * sq * d, a.q_h = sq * d, a.q_s = d;  // [batch, heads, seq, d]
  a.k_b = kv * sk * d, a.k_h = sk * d, a.k_s = d;
  a.v_b = a.k_b, a.v_h = a.k_h, a.v_s = a.k_s;
  a.o_b = a.q_b, a.o_h = a.q_h, a.o_s = a.q_s;
  a.m_b = heads * sq * sk, a.m_h = sq * sk, a.m_s = sk;
  a.scale = 1.f / std::sqrt(float(d)), a.causal = causal;
  for (int64_t bh = 0; bh < batch * heads; ++bh) t.attend(a, bh, 0, sq);
  bool ok = true;
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t h = 0; h < heads; ++h) {
      const int64_t g = h / (heads / kv);
      for (int64_t i = 0; i < sq; ++i) {
        std::vector<double> s(static_cast<size_t>(sk));
        double top = -INFINITY;
        for (int64_t j = 0; j < sk; ++j) {
          double dot = 0;
          for (int64_t e = 0; e < d; ++e) dot += double(q[size_t(a.q_b * b + a.q_h * h + d * i + e)]) * k[size_t(a.k_b * b + a.k_h * g + d * j + e)];
          s[size_t(j)] = a.scale * dot + (masked ? mask[size_t(a.m_b * b + a.m_h * h + sk * i + j)] : 0.f);
          if (causal && j > i) s[size_t(j)] = -INFINITY;
          top = std::max(top, s[size_t(j)]);
        }
        double total = 0;
        for (double& e : s) total += (e = top == -INFINITY ? 0.0 : std::exp(e - top));
        for (int64_t e = 0; e < d; ++e) {
          double o = 0;
          for (int64_t j = 0; j < sk; ++j) o += s[size_t(j)] * v[size_t(a.v_b * b + a.v_h * g + d * j + e)];
          o = total > 0 ? o / total : 0.0;
          ok = ok && std::fabs(out[size_t(a.o_b * b + a.o_h * h + d * i + e)] - o) <= 1e-5;
        }
      }
    }
  check(ok, isa + " attend sq=" + std::to_string(sq) + " sk=" + std::to_string(sk) + " d=" + std::to_string(d) +
                (causal ? " causal" : "") + (masked ? " masked" : ""));
}

void check_tree(const std::string& isa, const KernelTable& t) {
  const int64_t ins[] = {1, 7, 16, 33, 64, 100, 256, 300, 1000, 2048, 2111};
  const int64_t outs[] = {1, 5, 33, 70};
  const int64_t batches[] = {1, 2, 3, 5, 8, 9, 17, 33};
  const double densities[] = {0.0, 0.05, 0.5, 0.9, 1.0};
  for (int64_t in : ins)
    for (int64_t out : outs) {
      const int64_t batch = batches[randint(0, 7)];
      const double density = densities[randint(0, 4)];
      check_int8(t, isa, out, in, batch, Pattern::Random, density, 0);
      if (in % 4 == 0) check_int8(t, isa, out, in, batch, Pattern::NofM, 0.5, 0);
      if (in % 64 == 0) check_int8(t, isa, out, in, batch, Pattern::Banks, 0.5, 0);
      if (in >= 64) check_int8(t, isa, out, in, batch, Pattern::Random, 0.5, in % 64 == 0 ? 64 : 24);
      if (in >= 128) check_int8(t, isa, out, in, batch, Pattern::Random, density, 32);
      check_float(t, isa, out, in, batches[randint(0, 7)], density);
    }
  // many tokens through the tiled GEMMs and big row counts (tiles of 32 with tails)
  for (int64_t batch : {16, 40})
    for (Pattern p : {Pattern::Random, Pattern::NofM, Pattern::Banks}) check_int8(t, isa, 97, 640, batch, p, 0.5, 0);
  check_int8(t, isa, 64, 4096, 16, Pattern::Random, 0.1, 0);
  // very sparse long rows: gather records bridging gaps of more than 255 columns, empty rows
  for (int64_t batch : {1, 2, 3}) check_int8(t, isa, 40, 3000, batch, Pattern::Random, 0.003, 0);
  check_int8(t, isa, 33, 2111, 1, Pattern::Random, 0.1, 0);
  check_activations(t, isa);
  for (bool causal : {false, true})
    for (bool masked : {false, true}) {
      check_attention(t, isa, 5, 9, 8, causal, masked);
      check_attention(t, isa, 17, 17, 32, causal, masked);
      check_attention(t, isa, 1, 70, 24, causal, masked);
    }
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> isas;
  for (int i = 1; i < argc; ++i) isas.push_back(argv[i]);
  if (isas.empty()) isas = sp::supported_isas();
  std::printf("detected: %s\n", sp::detect_isa().c_str());
  for (const std::string& isa : isas) {
    const int before = g_failed;
    try {
      sp::set_isa(isa);
      check_tree(isa, sp::active_table());
    } catch (const std::exception& e) {
      check(false, isa + ": " + e.what());
    }
    std::printf("tree %s: %s\n", isa.c_str(), g_failed == before ? "ok" : "FAILED");
  }
#if defined(SP_CHECK_AVX2VNNI_EVEX)
  // the AVX-VNNI tree built with the EVEX vpdpbusd (AVX-512 VNNI + VL): the same code, runnable here
  if (argc == 1) {
    const int before = g_failed;
    check_tree("avx2vnni (evex)", sp::avx2vnni::table());
    std::printf("tree avx2vnni (evex): %s\n", g_failed == before ? "ok" : "FAILED");
  }
#endif
  std::printf("%d passed, %d failed\n", g_passed, g_failed);
  return g_failed ? 1 : 0;
}
