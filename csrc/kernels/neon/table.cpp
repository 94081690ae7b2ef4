#include "kernels/neon/tree.h"
#include "kernels/decl.h"
#include "kernels/activation.h"

namespace sp {
namespace SP_ISA_NS {

void activate(float* y, int64_t batch, int64_t stride, int64_t c0, int64_t c1, Activation kind) {
  act::activate(y, batch, stride, c0, c1, kind);
}

// No tiled GEMM yet: the row kernels serve every batch (their tiles of up to 8 tokens expand each
// row's values once per tile). No speed is claimed for ARM until an ARM machine measures it.
const KernelTable& table() {
#if defined(__ARM_FEATURE_DOTPROD)
  static const char* const name = "neondot";
#else
  static const char* const name = "neon";
#endif
  static const KernelTable t = {name, masked_i8, dense_i8, masked_f32, masked_bf16, csr_f32, csr_i8,
                                 quantize, activate, nullptr, nullptr, false, false, false, 1 << 30, 1 << 30,
                                 nullptr, nullptr, attend};
  return t;
}

}  // namespace SP_ISA_NS
}  // namespace sp
