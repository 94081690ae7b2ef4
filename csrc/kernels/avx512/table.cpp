#define SP_ISA_NS avx512
#include "kernels/decl.h"

namespace sp {
namespace avx512 {

const KernelTable& table() {
  static const KernelTable t = {"avx512", masked_i8, dense_i8, masked_f32, masked_bf16, csr_f32, csr_i8,
                                 quantize, masked_gemm_i8, dense_gemm_i8, false, 4, 17, panel_offsets, pack_panels};
  return t;
}

}  // namespace avx512
}  // namespace sp
