// Portable row-range kernels, compiled once per ISA tree: the scalar tree uses
// them for everything, the SIMD trees for the layouts they do not hand-tune.
// Each including file defines SP_ISA_NS first so every tree gets its own symbols
// (shared inline or template code would be merged by the linker across trees
// built with different -m flags, and could run AVX-512 code on an AVX2 CPU).
// For that reason this header and the SIMD trees use no standard-library templates.
#include <cstdint>
#include <cstring>

#include "common.h"

#ifndef SP_ISA_NS
#error "define SP_ISA_NS before including kernels/generic.h"
#endif

namespace sp {
namespace SP_ISA_NS {
namespace generic {

static inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }

static inline float finish(const LinearArgs& a, int64_t r, float v) {
  return a.bias ? v + a.bias[r] : v;
}

// y[b, r] for int8 values with mask (masked=true) or dense rows.
template <bool kMasked>
static void rows_i8(const LinearArgs& a, int64_t r0, int64_t r1) {
  const int8_t* vals = static_cast<const int8_t*>(a.values);
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* m = kMasked ? a.mask + r * a.mask_stride : nullptr;
    const int8_t* v = kMasked ? vals + a.row_offsets[r] : vals + r * a.in;
    const float* s = a.scales + r * a.n_groups;
    for (int64_t b = 0; b < a.batch; ++b) {
      const int8_t* x = a.xq + b * a.x_stride;
      int64_t p = 0;
      float acc = 0.f;
      for (int64_t g = 0; g < a.n_groups; ++g) {
        int32_t dot = 0;
        const int64_t end = imin(a.in, (g + 1) * a.group_size);
        for (int64_t j = g * a.group_size; j < end; ++j) {
          if (kMasked) {
            if ((m[j >> 3] >> (j & 7)) & 1) dot += int32_t(x[j]) * int32_t(v[p++]);
          } else {
            dot += int32_t(x[j]) * int32_t(v[j]);
          }
        }
        acc += float(dot) * s[g];
      }
      a.y[b * a.out + r] = finish(a, r, acc * a.sx[b]);
    }
  }
}

template <typename T>
static inline float load_value(const T* v, int64_t i) {
  if constexpr (sizeof(T) == 2) {
    return bf16_to_f32(v[i]);
  } else {
    return v[i];
  }
}

// Float values (fp32, or bf16 bits as uint16) with mask.
template <typename T>
static void rows_masked_float(const LinearArgs& a, int64_t r0, int64_t r1) {
  const T* vals = static_cast<const T*>(a.values);
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* m = a.mask + r * a.mask_stride;
    const T* v = vals + a.row_offsets[r];
    for (int64_t b = 0; b < a.batch; ++b) {
      const float* x = a.x + b * a.x_stride;
      int64_t p = 0;
      float acc = 0.f;
      for (int64_t j8 = 0; j8 < a.in; j8 += 8) {
        unsigned bits = m[j8 >> 3];
        while (bits) {
          const int t = __builtin_ctz(bits);
          bits &= bits - 1;
          acc += x[j8 + t] * load_value(v, p++);
        }
      }
      a.y[b * a.out + r] = finish(a, r, acc);
    }
  }
}

template <typename I>
static void rows_csr_f32(const LinearArgs& a, int64_t r0, int64_t r1) {
  const float* vals = static_cast<const float*>(a.values);
  const I* cols = static_cast<const I*>(a.col_idx);
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t p0 = a.row_ptr[r], p1 = a.row_ptr[r + 1];
    for (int64_t b = 0; b < a.batch; ++b) {
      const float* x = a.x + b * a.x_stride;
      float acc = 0.f;
      for (int64_t p = p0; p < p1; ++p) acc += x[int64_t(cols[p])] * vals[p];
      a.y[b * a.out + r] = finish(a, r, acc);
    }
  }
}

template <typename I>
static void rows_csr_i8(const LinearArgs& a, int64_t r0, int64_t r1) {
  const int8_t* vals = static_cast<const int8_t*>(a.values);
  const I* cols = static_cast<const I*>(a.col_idx);
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t p0 = a.row_ptr[r], p1 = a.row_ptr[r + 1];
    const float* s = a.scales + r * a.n_groups;
    for (int64_t b = 0; b < a.batch; ++b) {
      const int8_t* x = a.xq + b * a.x_stride;
      float acc = 0.f;
      int32_t dot = 0;
      int64_t g = 0;
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t j = int64_t(cols[p]);
        const int64_t gj = j / a.group_size;
        if (gj != g) {
          acc += float(dot) * s[g];
          dot = 0;
          g = gj;
        }
        dot += int32_t(x[j]) * int32_t(vals[p]);
      }
      acc += float(dot) * s[g];
      a.y[b * a.out + r] = finish(a, r, acc * a.sx[b]);
    }
  }
}

// Row r's dot with token x over Records8 gather rows.
static inline int32_t gather_records_dot(const LinearArgs& a, int64_t r, const int8_t* x) {
  const uint8_t* rec0 = a.gather_recs + a.gather_chunks[r] * 16;
  const int64_t n = a.gather_chunks[r + 1] - a.gather_chunks[r];
  int64_t base = 0;
  int32_t dot = 0;
  for (const uint8_t* rec = rec0; rec < rec0 + 16 * n; rec += 16) {
    for (int j = 0; j < 8; ++j) dot += int32_t(x[base + rec[j]]) * int32_t(int8_t(rec[8 + j]));
    base += rec[7];
  }
  return dot;
}

// Row r's dot with token x over Windows256 gather rows.
static inline int32_t gather_windows_dot(const LinearArgs& a, int64_t r, const int8_t* x) {
  const int64_t windows = (a.in + kGatherWindow - 1) / kGatherWindow;
  const uint8_t* row = a.gather_recs + a.gather_chunks[r];
  const uint8_t* p = row + 2 * windows;
  int32_t dot = 0;
  for (int64_t w = 0; w < windows; ++w) {
    uint16_t n;
    std::memcpy(&n, row + 2 * w, 2);
    for (int j = 0; j < n; ++j) dot += int32_t(x[w * kGatherWindow + p[j]]) * int32_t(int8_t(p[n + j]));
    p += 2 * n;
  }
  return dot;
}

// y[b, r] from gather rows (LinearArgs::gather_recs, one scale per row, either layout): the portable
// form of the SIMD trees' gather kernels, one stored value at a time.
static void gather_i8(const LinearArgs& a, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t b = 0; b < a.batch; ++b) {
      const int8_t* x = a.xq + b * a.x_stride;
      const int32_t dot = a.gather_layout == GatherLayout::Records8 ? gather_records_dot(a, r, x)
                                                                    : gather_windows_dot(a, r, x);
      a.y[b * a.out + r] = finish(a, r, float(dot) * a.scales[r] * a.sx[b]);
    }
}

// Columns [from, in) of one token quantized with scale s (signed and +128 copies), then the padding
// up to `stride` zeroed; SIMD levels call it for the tail their vectors do not cover.
static inline void quantize_row_from(const float* row, float s, int64_t from, int64_t in, int64_t stride,
                                     int8_t* q, uint8_t* u) {
  for (int64_t j = from; j < in; ++j) {
    float v = __builtin_nearbyintf(row[j] / s);
    v = v > 127.f ? 127.f : (v < -127.f ? -127.f : v);
    q[j] = int8_t(v);
    u[j] = uint8_t(int(v) + 128);
  }
  for (int64_t j = in; j < stride; ++j) {
    q[j] = 0;
    u[j] = 128;
  }
}

// Scalar per-token quantization (QuantizeFn); division, not a reciprocal multiply, to round like torch.
static void quantize(const float* x, int64_t b0, int64_t b1, int64_t in, int64_t stride, int8_t* xq,
                     uint8_t* xu, float* sx) {
  for (int64_t b = b0; b < b1; ++b) {
    const float* row = x + b * in;
    float amax = 0.f;
    for (int64_t j = 0; j < in; ++j) {
      const float v = __builtin_fabsf(row[j]);
      amax = v > amax ? v : amax;
    }
    const float s = amax == 0.f ? 1.f : amax / 127.f;
    sx[b] = s;
    quantize_row_from(row, s, 0, in, stride, xq + b * stride, xu + b * stride);
  }
}

static void masked_i8(const LinearArgs& a, int64_t r0, int64_t r1) { rows_i8<true>(a, r0, r1); }
static void dense_i8(const LinearArgs& a, int64_t r0, int64_t r1) { rows_i8<false>(a, r0, r1); }
static void masked_f32(const LinearArgs& a, int64_t r0, int64_t r1) {
  rows_masked_float<float>(a, r0, r1);
}
static void masked_bf16(const LinearArgs& a, int64_t r0, int64_t r1) {
  rows_masked_float<uint16_t>(a, r0, r1);
}
static void csr_f32(const LinearArgs& a, int64_t r0, int64_t r1) {
  if (a.col_idx16) rows_csr_f32<int16_t>(a, r0, r1); else rows_csr_f32<int32_t>(a, r0, r1);
}
static void csr_i8(const LinearArgs& a, int64_t r0, int64_t r1) {
  if (a.col_idx16) rows_csr_i8<int16_t>(a, r0, r1); else rows_csr_i8<int32_t>(a, r0, r1);
}

}  // namespace generic
}  // namespace SP_ISA_NS
}  // namespace sp
