// The runtime's row-wise float operations (ops.h), one table per ISA tree like the kernel tables;
// runtime_ops() returns the one matching the active kernel tree.
#pragma once
#include <cstdint>

namespace sp {

// stream[r] += delta[r] (when delta is set), then out[r] = norm(stream[r]): LayerNorm
// ((s - mean) / sqrt(var + eps) * weight + bias) or RMSNorm (s / sqrt(mean(s^2) + eps) * weight).
// out may be stream (post-norm blocks); bias may be null.
struct NormArgs {
  float* stream = nullptr;
  int64_t stream_stride = 0;
  const float* delta = nullptr;
  int64_t delta_stride = 0;
  float* out = nullptr;
  int64_t out_stride = 0;
  const float* weight = nullptr;
  const float* bias = nullptr;
  float eps = 1e-5f;
  int64_t n = 0;
  bool rms = false;
};

// out[r, :] = row ids[r] of an embedding table: float32 [V, dim] (bits 32), int8 codes [V, dim] or
// int4 nibbles [V, ceil(dim / 2)] (low nibble first) times scales[id] (bits 8 / 4).
struct GatherArgs {
  const int64_t* ids = nullptr;
  const void* table = nullptr;
  const float* scales = nullptr;
  int bits = 32;
  int64_t dim = 0;
  float* out = nullptr;
};

struct RuntimeOps {
  void (*add_norm)(const NormArgs& a, int64_t r0, int64_t r1);
  void (*head_rms)(float* x, int64_t stride, int64_t heads, int64_t d, const float* weight, float eps,
                   int64_t r0, int64_t r1);
  void (*rope)(float* x, int64_t stride, int64_t heads, int64_t d, const float* cos, const float* sin,
               int64_t r0, int64_t r1);
  void (*mul)(float* a, const float* b, int64_t n);
  void (*gather)(const GatherArgs& a, int64_t r0, int64_t r1);
  int64_t (*argmax)(const float* x, int64_t n);
};

namespace scalar { const RuntimeOps& runtime_ops(); }
#if defined(__x86_64__) || defined(_M_X64)
namespace avx2 { const RuntimeOps& runtime_ops(); }
namespace avx512 { const RuntimeOps& runtime_ops(); }
#endif

// The table of the active kernel tree (dispatch.h's active_table()).
const RuntimeOps& runtime_ops();

}  // namespace sp
