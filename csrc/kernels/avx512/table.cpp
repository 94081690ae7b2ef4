#define SP_ISA_NS avx512
#include "kernels/decl.h"
#include "kernels/activation.h"

namespace sp {
namespace avx512 {

void activate(float* y, int64_t batch, int64_t stride, int64_t c0, int64_t c1, Activation kind) {
  act::activate(y, batch, stride, c0, c1, kind);
}

// gather rows up to this many tokens (measured: from there the row kernels win)
constexpr int kGatherMaxBatch = 2;

const KernelTable& table() {
  static const KernelTable t = {"avx512", masked_i8, dense_i8, masked_f32, masked_bf16, csr_f32, csr_i8,
                                 quantize, activate, masked_gemm_i8, dense_gemm_i8, false, true, true, 4, 17, tile_panel_bytes, pack_tile_panel, attend,
                                 false, masked_gemm_i8_sum, gather_i8, kGatherMaxBatch, GatherLayout::Windows256};
  return t;
}

#if defined(SP_HAVE_AMX)
void amx_masked_gemm_i8(const LinearArgs& a, int64_t r0, int64_t r1);
void amx_dense_gemm_i8(const LinearArgs& a, int64_t r0, int64_t r1);
int64_t amx_tile_panel_bytes(const LinearArgs& a, bool masked, int64_t n0, TileLayout* layout);
bool amx_pack_tile_panel(const LinearArgs& a, bool masked, int64_t n0, TileLayout layout, int8_t* tile);

// Level "amx": this tree with the GEMMs on the tile unit. Prepared panels as the avx512 tree keeps them
// (dense ones are the B operand; quads stay for sparse tiles); without panels (long prefill calls of big
// layers included) the GEMM expands the packed rows straight into the A operand. The elastic levels'
// summed GEMM stays avx512's: it reads both panel layouts, and their segments keep quads.
const KernelTable& amx_table() {
  static const KernelTable t = [] {
    KernelTable k = table();
    k.name = "amx";
    k.masked_gemm_i8 = amx_masked_gemm_i8;
    k.dense_gemm_i8 = amx_dense_gemm_i8;
    k.tile_panel_bytes = amx_tile_panel_bytes;
    k.pack_tile_panel = amx_pack_tile_panel;
    return k;
  }();
  return t;
}
#endif

}  // namespace avx512
}  // namespace sp
