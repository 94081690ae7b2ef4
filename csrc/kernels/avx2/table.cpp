#define SP_ISA_NS avx2
#include "kernels/decl.h"

namespace sp {
namespace avx2 {

const KernelTable& table() {
  static const KernelTable t = {"avx2", masked_i8, dense_i8, masked_f32, masked_bf16, csr_f32, csr_i8,
                                 quantize, masked_gemm_i8, dense_gemm_i8, true, 6, 12, nullptr, nullptr};
  return t;
}

}  // namespace avx2
}  // namespace sp
