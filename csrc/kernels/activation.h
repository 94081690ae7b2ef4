// Output activations fused into a linear call (y = act(x W^T + b)), compiled once per ISA tree.
// Plain branch-free float code that GCC vectorizes with each tree's own -m flags (16 lanes in the
// AVX-512 tree, 8 in AVX2); static functions only, for the reason generic.h gives.
//
// exp: Cephes-style range reduction and degree-6 polynomial (relative error ~2e-7 on [-87, 88]);
// erf: Abramowitz & Stegun 7.1.26 (absolute error <= 1.5e-7). Against torch's own functions the
// outputs differ by a few 1e-7 relative, far below the int8 rounding of the linear before them.
#include <cstdint>
#include <cstring>

#include "common.h"

#ifndef SP_ISA_NS
#error "define SP_ISA_NS before including kernels/activation.h"
#endif

namespace sp {
namespace SP_ISA_NS {
namespace act {

static inline float clampf(float v, float lo, float hi) { return v < lo ? lo : (v > hi ? hi : v); }

static inline float expf_approx(float x) {
  x = clampf(x, -87.0f, 88.0f);
  const float n = __builtin_nearbyintf(x * 1.44269504088896341f);
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (int32_t(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, 4);
  return p * scale;
}

static inline float erf_approx(float x) {
  const float ax = __builtin_fabsf(x);
  const float t = 1.0f / (1.0f + 0.3275911f * ax);
  float p = 1.061405429f;
  p = p * t - 1.453152027f;
  p = p * t + 1.421413741f;
  p = p * t - 0.284496736f;
  p = p * t + 0.254829592f;
  const float y = 1.0f - p * t * expf_approx(-ax * ax);
  return x < 0.f ? -y : y;
}

static inline float gelu(float x) { return 0.5f * x * (1.0f + erf_approx(x * 0.70710678118654752f)); }

static inline float gelu_tanh(float x) {
  const float z = clampf(0.79788456080286536f * (x + 0.044715f * x * x * x), -9.f, 9.f);
  const float th = 1.0f - 2.0f / (1.0f + expf_approx(2.0f * z));
  return 0.5f * x * (1.0f + th);
}

static inline float silu(float x) { return x / (1.0f + expf_approx(-x)); }

static inline float relu(float x) { return x > 0.f ? x : 0.f; }

// y[b, c0 .. c1) = act(y[b, c0 .. c1)) for b < batch, rows `stride` floats apart.
template <float (*F)(float)>
static void apply(float* y, int64_t batch, int64_t stride, int64_t c0, int64_t c1) {
  for (int64_t b = 0; b < batch; ++b) {
    float* row = y + b * stride;
    for (int64_t j = c0; j < c1; ++j) row[j] = F(row[j]);
  }
}

static void activate(float* y, int64_t batch, int64_t stride, int64_t c0, int64_t c1, Activation kind) {
  switch (kind) {
    case Activation::Gelu: apply<gelu>(y, batch, stride, c0, c1); break;
    case Activation::GeluTanh: apply<gelu_tanh>(y, batch, stride, c0, c1); break;
    case Activation::Silu: apply<silu>(y, batch, stride, c0, c1); break;
    case Activation::Relu: apply<relu>(y, batch, stride, c0, c1); break;
    case Activation::None: break;
  }
}

}  // namespace act
}  // namespace SP_ISA_NS
}  // namespace sp
