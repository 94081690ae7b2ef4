#define SP_ISA_NS avx512
#include "kernels/decl.h"
#include "kernels/activation.h"

namespace sp {
namespace avx512 {

void activate(float* y, int64_t batch, int64_t stride, int64_t c0, int64_t c1, Activation kind) {
  act::activate(y, batch, stride, c0, c1, kind);
}

const KernelTable& table() {
  static const KernelTable t = {"avx512", masked_i8, dense_i8, masked_f32, masked_bf16, csr_f32, csr_i8,
                                 quantize, activate, masked_gemm_i8, dense_gemm_i8, false, true, true, 4, 17, tile_panel_bytes, pack_tile_panel, attend,
                                 false, masked_gemm_i8_sum};
  return t;
}

}  // namespace avx512
}  // namespace sp
