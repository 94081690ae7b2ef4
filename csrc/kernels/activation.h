// Output activations fused into a linear call (y = act(x W^T + b)), compiled once per ISA tree.
// Branch-free float code written once over GCC vector types, so each tree compiles it with its own
// -m flags (16 lanes in the AVX-512 tree, 8 in AVX2, 4 in the scalar tree's SSE2 baseline); static
// functions only, for the reason generic.h gives.
//
// exp: Cephes-style range reduction and degree-6 polynomial (relative error ~2e-7 on [-87, 88]);
// erf: x P(x^2) / Q(x^2) on |x| < 3.925 and +-1 beyond (erf(3.925) rounds to 1 in float32), a rational
// fit made for this project (scripts/fit_erf.py): absolute error 4.4e-8 in exact arithmetic, <= 3.9e-7
// evaluated in float32. It takes 15 vector operations where Abramowitz & Stegun 7.1.26 (division,
// exp, polynomial) took ~30, when the fused GELU was ~a quarter of MiniLM's FFN-up GEMM. Against
// torch's own functions the outputs differ by a few 1e-7, far below the int8 rounding of the linear
// before them.
#include <cstdint>
#include <cstring>

#include "common.h"

#ifndef SP_ISA_NS
#error "define SP_ISA_NS before including kernels/activation.h"
#endif

namespace sp {
namespace SP_ISA_NS {
namespace act {

// One formula for every width: V is float or a GCC vector of floats (scalars broadcast in mixed
// expressions, ?: selects per lane), so the tail element and the vector lanes agree exactly.
#if defined(__AVX512F__)
constexpr int kLanes = 16;
#elif defined(__AVX2__)
constexpr int kLanes = 8;
#else
constexpr int kLanes = 4;  // SSE2, the x86-64 baseline
#endif
typedef float Vec __attribute__((vector_size(4 * kLanes)));
typedef int32_t VecI __attribute__((vector_size(4 * kLanes)));

template <class V>
static inline V clampv(V v, float lo, float hi) {
  v = v < lo ? lo : v;
  return v > hi ? hi : v;
}

static inline float clampv(float v, float lo, float hi) { return v < lo ? lo : (v > hi ? hi : v); }

// 2^n for integral n in [-126, 127]
static inline float pow2(float n) {
  const int32_t bits = (int32_t(n) + 127) << 23;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

static inline Vec pow2(Vec n) {
  const VecI bits = (__builtin_convertvector(n, VecI) + 127) << 23;
  return reinterpret_cast<const Vec&>(bits);
}

template <class V>
static inline V expv(V x) {
  x = clampv(x, -87.0f, 88.0f);
  // round to nearest (even) by the 1.5 * 2^23 trick: |x * log2 e| < 2^22 here
  const V n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  V r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  V p = r * 1.9875691500e-4f + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  return p * pow2(n);
}

constexpr float kErfEdge = 3.925f;

template <class V>
static inline V erfv(V x) {
  const V c = clampv(x, -kErfEdge, kErfEdge);
  const V t = c * c;
  V p = t * 1.987499942e-08f - 1.993746764e-06f;
  p = p * t + 1.493567252e-04f;
  p = p * t + 3.991498146e-03f;
  p = p * t + 5.145757645e-02f;
  p = p * t + 2.065722942e-01f;
  p = p * t + 1.128378749e+00f;
  V q = t * 1.028387342e-03f + 1.492774766e-02f;
  q = q * t + 1.177535132e-01f;
  q = q * t + 5.163986087e-01f;
  q = q * t + 1.0f;
  const V y = c * p / q;
  return x >= kErfEdge ? 1.0f : (x <= -kErfEdge ? -1.0f : y);
}

template <class V>
static inline V gelu(V x) { return 0.5f * x * (1.0f + erfv<V>(x * 0.70710678118654752f)); }

template <class V>
static inline V gelu_tanh(V x) {
  const V z = clampv(0.79788456080286536f * (x + 0.044715f * x * x * x), -9.f, 9.f);
  const V th = 1.0f - 2.0f / (1.0f + expv<V>(2.0f * z));
  return 0.5f * x * (1.0f + th);
}

template <class V>
static inline V silu(V x) { return x / (1.0f + expv<V>(-x)); }

template <class V>
static inline V relu(V x) { return x > 0.f ? x : 0.f; }

// y[b, c0 .. c1) = act(y[b, c0 .. c1)) for b < batch, rows `stride` floats apart: kLanes at a time.
template <Vec (*FV)(Vec), float (*F)(float)>
static void apply(float* y, int64_t batch, int64_t stride, int64_t c0, int64_t c1) {
  for (int64_t b = 0; b < batch; ++b) {
    float* row = y + b * stride;
    int64_t j = c0;
    for (; j + kLanes <= c1; j += kLanes) {
      Vec v;
      std::memcpy(&v, row + j, sizeof v);
      v = FV(v);
      std::memcpy(row + j, &v, sizeof v);
    }
    for (; j < c1; ++j) row[j] = F(row[j]);
  }
}

static void activate(float* y, int64_t batch, int64_t stride, int64_t c0, int64_t c1, Activation kind) {
  switch (kind) {
    case Activation::Gelu: apply<gelu<Vec>, gelu<float>>(y, batch, stride, c0, c1); break;
    case Activation::GeluTanh: apply<gelu_tanh<Vec>, gelu_tanh<float>>(y, batch, stride, c0, c1); break;
    case Activation::Silu: apply<silu<Vec>, silu<float>>(y, batch, stride, c0, c1); break;
    case Activation::Relu: apply<relu<Vec>, relu<float>>(y, batch, stride, c0, c1); break;
    case Activation::None: break;
  }
}

// act(v) of one vector, for epilogues that hold their outputs in registers.
static inline Vec activate(Vec v, Activation kind) {
  switch (kind) {
    case Activation::Gelu: return gelu<Vec>(v);
    case Activation::GeluTanh: return gelu_tanh<Vec>(v);
    case Activation::Silu: return silu<Vec>(v);
    case Activation::Relu: return relu<Vec>(v);
    case Activation::None: break;
  }
  return v;
}

}  // namespace act
}  // namespace SP_ISA_NS
}  // namespace sp
