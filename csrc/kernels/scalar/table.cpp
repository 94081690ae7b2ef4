#define SP_ISA_NS scalar
#include "kernels/decl.h"

namespace sp {
namespace scalar {

const KernelTable& table() {
  static const KernelTable t = {"scalar", masked_i8, dense_i8, masked_f32, masked_bf16, csr_f32, csr_i8,
                                 quantize, nullptr, nullptr, false, 1 << 30, 1 << 30, nullptr, nullptr};
  return t;
}

}  // namespace scalar
}  // namespace sp
