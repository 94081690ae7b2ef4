// One call of a packed linear layer: quantize activations (int kinds), split the
// output rows into tasks, and run the active ISA's row kernel on the thread pool.
#pragma once
#include "common.h"
#include "owned_array.h"

namespace sp {

enum class Kind { MaskedI8, DenseI8, MaskedF32, MaskedBF16, CsrF32, CsrI8 };

inline bool is_int8(Kind k) { return k == Kind::MaskedI8 || k == Kind::DenseI8 || k == Kind::CsrI8; }

// `a` carries the weight fields plus x, batch, y and bias; activation fields are
// filled here. Must be called without the GIL.
void run_linear(Kind kind, LinearArgs a, int n_threads);

// Several masked weights of the same shape over the same activations, summed (nested elastic
// levels, csrc/elastic.h): y = act(x W_0^T + ... + x W_{n-1}^T + bias). parts[k] carries weight k's
// fields (mask, values, row offsets, scales, rowsum, groups, panels; the same out and in); `call`
// carries x, batch, y, bias and activation. x is quantized once; each task runs every part over its
// rows (part 0 into y with the bias, the others through a scratch added in), then the activation
// once, on the sum. With call.rowsum set (the parts' rowsums summed, int8) and every part on prepared
// GEMM panels, a table with masked_gemm_i8_sum sums the parts in its accumulators instead.
// Must be called without the GIL.
void run_linear_sum(Kind kind, const LinearArgs* parts, int n_parts, const LinearArgs& call, int n_threads);

// Token count from which int8 layers with one scale per row take the tiled GEMM (when the
// active table has one); set_gemm_min_batch(0) restores the table's default cutover.
void set_gemm_min_batch(int n);
int gemm_min_batch();

// Per-token int8 quantization of docs/formats.md: sx = max|x|/127 (1 for an all-zero
// row), xq = clamp(round_half_even(x / sx), -127, 127); writes xu = xq + 128 too.
void quantize_rows(const float* x, int64_t batch, int64_t in, int64_t stride, int8_t* xq,
                   uint8_t* xu, float* sx);

// GEMM panels of a weight prepared once (see LinearArgs::panels), owned here.
struct PreparedPanels {
  const KernelTable* table = nullptr;  // the tree that packed them: only its GEMM may read them
  OwnedArray<int8_t> data;
  OwnedArray<int64_t> offsets;
};

// Panels for int8 weights with one scale per row of fewer than `max_weights` weights; empty
// otherwise, or when the active tree has no prepared panels. `threads` share the packing.
PreparedPanels prepare_panels(Kind kind, const LinearArgs& a, int64_t max_weights, int threads = 1);

// `a` with the panels filled in when they were packed by the active tree.
void use_panels(const PreparedPanels& p, LinearArgs& a);

}  // namespace sp
