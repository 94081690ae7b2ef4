#define SP_ISA_NS scalar
#include "kernels/decl.h"
#include "kernels/activation.h"

namespace sp {
namespace scalar {

void activate(float* y, int64_t batch, int64_t stride, int64_t c0, int64_t c1, Activation kind) {
  act::activate(y, batch, stride, c0, c1, kind);
}

const KernelTable& table() {
  static const KernelTable t = {"scalar", masked_i8, dense_i8, masked_f32, masked_bf16, csr_f32, csr_i8,
                                 quantize, activate, nullptr, nullptr, false, false, false, 1 << 30, 1 << 30, nullptr, nullptr, attend, false,
                                 nullptr, gather_i8, 1 << 30};  // per stored value beats per column at any batch
  return t;
}

}  // namespace scalar
}  // namespace sp
