#include "kernels/avx2/tree.h"
#include "kernels/decl.h"
#include "kernels/activation.h"

namespace sp {
namespace SP_ISA_NS {

void activate(float* y, int64_t batch, int64_t stride, int64_t c0, int64_t c1, Activation kind) {
  act::activate(y, batch, stride, c0, c1, kind);
}

// gather rows up to this many tokens (from there the row kernels' one decode per 8 tokens wins)
constexpr int kGatherMaxBatch = 2;

const KernelTable& table() {
  #if SP_AVX2_VNNI
  static const char* const name = "avx2vnni";
#else
  static const char* const name = "avx2";
#endif
  static const KernelTable t = {name, masked_i8, dense_i8, masked_f32, masked_bf16, csr_f32, csr_i8,
                                 quantize, activate, masked_gemm_i8, dense_gemm_i8, false, false, false, 6, 12, tile_panel_bytes, pack_tile_panel, attend, true,
                                 nullptr, gather_i8, kGatherMaxBatch};
  return t;
}

}  // namespace SP_ISA_NS
}  // namespace sp
