// NEON trees, float weights: the portable row kernels (GCC vectorizes their inner loops for 128-bit
// registers); the int8 kernels are where ARM inference spends its time.
#include "kernels/neon/tree.h"
#include "kernels/decl.h"
#include "kernels/generic.h"

namespace sp {
namespace SP_ISA_NS {

void masked_f32(const LinearArgs& a, int64_t r0, int64_t r1) { generic::masked_f32(a, r0, r1); }
void masked_bf16(const LinearArgs& a, int64_t r0, int64_t r1) { generic::masked_bf16(a, r0, r1); }
void csr_f32(const LinearArgs& a, int64_t r0, int64_t r1) { generic::csr_f32(a, r0, r1); }

}  // namespace SP_ISA_NS
}  // namespace sp
