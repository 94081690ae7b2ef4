// Shared, torch-free types of the native kernels: one argument block per call,
// row-range kernels, and the per-ISA table the dispatcher picks from.
#pragma once
#include <cstddef>
#include <cstdint>

namespace sp {

// Elementwise function applied to a linear's outputs inside the same call (fused activation).
enum class Activation : int { None = 0, Gelu = 1, GeluTanh = 2, Relu = 3, Silu = 4 };

// Everything a row-range kernel needs; filled once per call by plan.cpp.
// Weight layouts are exactly those of docs/formats.md; nm and bbs weights are
// handed over as masked streams (mask + flat values + row offsets).
// How a weight's gather rows are laid out (LinearArgs::gather_recs): each tree's gather kernel reads one.
enum class GatherLayout : uint8_t { Records8, Windows256 };
constexpr int64_t kGatherWindow = 256;  // columns per window of the Windows256 layout

struct LinearArgs {
  int64_t batch = 0, in = 0, out = 0;
  // Activations, row stride x_stride elements. Strides are padded to an odd number of
  // cache lines: rows 4 KiB apart would all fall in one L1 set and thrash it.
  // float kinds: x [batch, in] float32
  const float* x = nullptr;
  // int8 kinds: quantized per token (stride a multiple of 64, padded with xq = 0 /
  // xu = 128); xu = xq + 128 for u8 x s8 dot products
  const int8_t* xq = nullptr;
  const uint8_t* xu = nullptr;
  int64_t x_stride = 0;
  const float* sx = nullptr;  // [batch]
  // int16 copy of xq (same stride), only for tables with gemm_wants_i16 (AVX2 vpmaddwd GEMM)
  const int16_t* xw = nullptr;
  // masked stream: mask [out, mask_stride] bits LSB first; values from row_offsets[r]
  const uint8_t* mask = nullptr;
  int64_t mask_stride = 0;
  const void* values = nullptr;  // int8 | float | uint16 (bf16 bits)
  int64_t values_len = 0;        // elements in `values`, to guard vector over-reads
  const int64_t* row_offsets = nullptr;
  // dense int8: values [out, in]
  // csr: row_ptr [out+1], col indices int16 or int32
  const int32_t* row_ptr = nullptr;
  const void* col_idx = nullptr;
  bool col_idx16 = false;
  // int quantization: scales [out, n_groups], rowsum [out, n_groups] (sum of q per group)
  const float* scales = nullptr;
  const int32_t* rowsum = nullptr;
  int64_t n_groups = 1, group_size = 0;  // group_size = in when n_groups == 1
  // GEMM panels prepared once per weight (prepare_panels in plan.h): tile t of kGemmRows rows at
  // panels + panel_off[t]; null: the GEMM packs its panels per call.
  const int8_t* panels = nullptr;
  const int64_t* panel_off = nullptr;
  // Gather rows of a very sparse masked int8 weight (csrc/gather_rows.h), prepared once; null: none.
  // gather_layout says how they are laid out; row r's bytes start at gather_recs + gather_chunks[r]
  // (Records8: in records of 16 bytes, gather_chunks[r] * 16) and end where row r + 1's start.
  //  Records8: records of 16 bytes, eight column offsets (uint8) then the eight values (int8); value j
  //   of record k sits in column base_k + offset_j, with base_0 = 0 and base_{k+1} = base_k + offset_7
  //   of record k. Padding values are 0 (at a column inside the row), so every offset read stays below
  //   `in`.
  //  Windows256: per window of kGatherWindow columns, its count of stored values (uint16, the row's
  //   counts first, one per window), then per window its n column offsets within the window (uint8)
  //   followed by its n values (int8).
  const uint8_t* gather_recs = nullptr;
  const int64_t* gather_chunks = nullptr;
  GatherLayout gather_layout = GatherLayout::Records8;
  // every mask byte keeps exactly four weights (2:4 and 4:8 patterns; mask_four_per_byte): the values
  // of mask byte k of a row start at 4k, so kernels may place them without counting bits
  bool four_per_byte = false;
  const float* bias = nullptr;  // [out] or null
  float* y = nullptr;           // [batch, out]
  Activation activation = Activation::None;  // applied by run_linear after the kernels
};

using RowKernel = void (*)(const LinearArgs&, int64_t r0, int64_t r1);
// Several masked int8 weights over the same activations, summed (nested elastic levels, csrc/elastic.h):
// parts[k] carries weight k's prepared panels; `sum` carries everything else (x, y, bias, activation,
// the shared scales and the parts' summed rowsum). Rows [r0, r1), multiples of kGemmRows.
using SumKernel = void (*)(const LinearArgs* parts, int n_parts, const LinearArgs& sum, int64_t r0, int64_t r1);
// At most this many parts per SumKernel call (the levels of one elastic weight).
constexpr int kMaxSumParts = 8;
// Per-token int8 quantization of rows [b0, b1) (docs/formats.md, bit-exact with torch):
// sx = max|x|/127 (1 for an all-zero row), xq = clamp(round_half_even(x / sx), -127, 127),
// xu = xq + 128; row b at xq/xu + b * stride, padded to stride with xq = 0 / xu = 128.
// y[b, c0 .. c1) = act(y[b, c0 .. c1)) for b < batch (rows `stride` floats apart).
using ActivateFn = void (*)(float* y, int64_t batch, int64_t stride, int64_t c0, int64_t c1, Activation kind);
using QuantizeFn = void (*)(const float* x, int64_t b0, int64_t b1, int64_t in, int64_t stride, int8_t* xq,
                            uint8_t* xu, float* sx);

// Scaled dot-product attention of one call, fp32 (csrc/attention.cpp splits it into tasks):
// out[b, i, h, :] = softmax_j(scale * q[b, h, i] . k[b, g, j] + mask[b, h, i, j]) v[b, g, j, :]
// with g = h / (heads / kv_heads) (grouped-query attention). Strides in floats; the last (head)
// dimension of q, k, v and out and the key dimension of the mask are contiguous. mask: additive,
// null for none; broadcast dimensions have stride 0. causal: key j > query i is left out
// (top-left aligned, as torch's is_causal). A row with every key left out (-inf) comes out zero.
struct AttentionArgs {
  const float* q = nullptr;
  const float* k = nullptr;
  const float* v = nullptr;
  const float* mask = nullptr;
  float* out = nullptr;
  int64_t batch = 0, heads = 0, kv_heads = 0, sq = 0, sk = 0, d = 0;
  int64_t q_b = 0, q_h = 0, q_s = 0;
  int64_t k_b = 0, k_h = 0, k_s = 0;
  int64_t v_b = 0, v_h = 0, v_s = 0;
  int64_t o_b = 0, o_h = 0, o_s = 0;
  int64_t m_b = 0, m_h = 0, m_s = 0;
  float scale = 1.f;
  bool causal = false;
};

// Attention of query rows [i0, i1) of the (batch, head) pair bh = b * heads + h.
using AttendFn = void (*)(const AttentionArgs&, int64_t bh, int64_t i0, int64_t i1);

// Where one (batch, head) pair's rows start: its query head's, its key/value head's, its mask's.
// (static inline, as everything here: the ISA trees include this header with different -m flags.)
struct AttentionPair {
  int64_t b, h;
  const float *q, *k, *v, *mask;
};

static inline AttentionPair attention_pair(const AttentionArgs& a, int64_t bh) {
  const int64_t b = bh / a.heads, h = bh % a.heads, g = h / (a.heads / a.kv_heads);
  return {b, h, a.q + b * a.q_b + h * a.q_h, a.k + b * a.k_b + g * a.k_h, a.v + b * a.v_b + g * a.v_h,
          a.mask ? a.mask + b * a.m_b + h * a.m_h : nullptr};
}

// Keys that query rows before `end` can see: all of them, or causally none at or past `end`.
static inline int64_t visible_keys(const AttentionArgs& a, int64_t end) {
  return a.causal && end < a.sk ? end : a.sk;
}

// How a prepared GEMM tile stores its weights (byte 0 of the tile's header).
enum PanelTile : int8_t { kDenseTile = 0, kFixedQuads = 1, kSlidingQuads = 2 };

// A prepared tile's layout: decided when the tile is sized, followed when it is packed.
struct TileLayout {
  PanelTile kind;
  int32_t runs;  // quad runs (quad layouts)
};

struct KernelTable {
  const char* name;
  RowKernel masked_i8;
  RowKernel dense_i8;
  RowKernel masked_f32;
  RowKernel masked_bf16;
  RowKernel csr_f32;
  RowKernel csr_i8;
  QuantizeFn quantize;
  ActivateFn activate;
  // Tiled GEMM for many tokens (one scale per row only; null: use the row kernels).
  // Row ranges handed to them start at multiples of kGemmRows.
  RowKernel masked_gemm_i8;
  RowKernel dense_gemm_i8;
  bool gemm_wants_i16;
  // the GEMMs read only xu (not xq, nor xw): run_linear has quantize skip xq for them (xq = null)
  bool gemm_reads_xu_only;
  bool gemm_activates;  // the GEMM applies LinearArgs::activation itself (in its tile epilogue)
  int gemm_min_batch;  // use the GEMM from this many tokens on
  // the same for masked layers of >= 4M weights (their panel packing costs about as much as
  // several row passes; the AVX-512 K-blocked row dots keep up to 16 tokens)
  int gemm_min_batch_big_masked;
  // Prepared GEMM panels (null: this tree packs per call only), one 32-row tile at a time (tiles are
  // independent, so threads can share a layer): tile_panel_bytes picks the layout of the tile at row
  // n0 and says how many bytes (a multiple of 64) it takes, pack_tile_panel writes that layout to out
  // (64-byte aligned). Both fail (-1 / false) only when their scratch cannot be allocated.
  int64_t (*tile_panel_bytes)(const LinearArgs&, bool masked, int64_t n0, TileLayout* layout);
  bool (*pack_tile_panel)(const LinearArgs&, bool masked, int64_t n0, TileLayout layout, int8_t* out);
  AttendFn attend;  // fp32 attention (kernels/attention.h, compiled in every tree)
  // big layers get prepared panels on their first call of kLazyMin tokens or more, long calls included
  // (false: only calls of kLazyMin..kLazyMax tokens; longer ones pack per call): for trees whose
  // per-call packing costs more than the panels save
  bool panels_for_long_calls = false;
  // The masked GEMM over several weights' prepared panels summed in its accumulators, one epilogue
  // (null: run_linear_sum runs the parts one after another and adds their outputs).
  SumKernel masked_gemm_i8_sum = nullptr;
  // Few-token kernel over gather rows (LinearArgs::gather_recs; one scale per row), null: none. Used
  // where a weight has them (very sparse layers, csrc/gather_rows.h) for up to gather_max_batch tokens.
  RowKernel gather_i8 = nullptr;
  int gather_max_batch = 0;
  GatherLayout gather_layout = GatherLayout::Records8;  // the layout gather_i8 reads
};

constexpr int64_t kGemmRows = 32;  // output rows per GEMM tile
// Layers of fewer weights are "small": their GEMM panels are cheap to keep (prepared at load by
// default), and packing them on every call would cost more than their GEMM.
constexpr int64_t kSmallLayerWeights = int64_t(4) << 20;

// Whether every mask byte of the masked stream `a` keeps exactly four weights, in rows of a multiple of
// 8 columns (LinearArgs::four_per_byte): true for 2:4 and 4:8 weights.
static inline bool mask_four_per_byte(const LinearArgs& a) {
  if (!a.mask || a.out <= 0 || a.in % 8 != 0) return false;
  for (int64_t r = 0; r < a.out; ++r) {
    if (a.row_offsets[r + 1] - a.row_offsets[r] != a.in / 2) return false;
    const uint8_t* m = a.mask + r * a.mask_stride;
    for (int64_t k = 0; k < a.in / 8; ++k)
      if (__builtin_popcount(m[k]) != 4) return false;
  }
  return true;
}

static inline float bf16_to_f32(uint16_t h) {
  uint32_t u = uint32_t(h) << 16;
  float f;
  __builtin_memcpy(&f, &u, 4);
  return f;
}

// The trees: scalar everywhere; avx2, avx2vnni (the AVX2 sources with AVX-VNNI) and avx512 on x86-64; neon (ARMv8 Advanced SIMD) and neondot
// (the same source with the ARMv8.2 dot-product instructions) on aarch64.
namespace scalar { const KernelTable& table(); }
#if defined(__x86_64__)
namespace avx2 { const KernelTable& table(); }
namespace avx2vnni { const KernelTable& table(); }  // built where the compiler has -mavxvnni (SP_HAVE_AVX2VNNI)
namespace avx512 {
const KernelTable& table();
const KernelTable& amx_table();  // level "amx": built where the compiler has -mamx-int8 (SP_HAVE_AMX)
}
#elif defined(__aarch64__)
namespace neon { const KernelTable& table(); }
namespace neondot { const KernelTable& table(); }
#endif

}  // namespace sp
