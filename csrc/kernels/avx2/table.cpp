#define SP_ISA_NS avx2
#include "kernels/decl.h"
#include "kernels/activation.h"

namespace sp {
namespace avx2 {

void activate(float* y, int64_t batch, int64_t stride, int64_t c0, int64_t c1, Activation kind) {
  act::activate(y, batch, stride, c0, c1, kind);
}

const KernelTable& table() {
  static const KernelTable t = {"avx2", masked_i8, dense_i8, masked_f32, masked_bf16, csr_f32, csr_i8,
                                 quantize, activate, masked_gemm_i8, dense_gemm_i8, false, false, false, 6, 12, tile_panel_bytes, pack_tile_panel, attend, true};
  return t;
}

}  // namespace avx2
}  // namespace sp
