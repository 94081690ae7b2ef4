// Scalar tree, float weights (fp32, bf16 bits widened to fp32).
#define SP_ISA_NS scalar
#include "kernels/decl.h"
#include "kernels/generic.h"

namespace sp {
namespace scalar {

void masked_f32(const LinearArgs& a, int64_t r0, int64_t r1) { generic::masked_f32(a, r0, r1); }
void masked_bf16(const LinearArgs& a, int64_t r0, int64_t r1) { generic::masked_bf16(a, r0, r1); }
void csr_f32(const LinearArgs& a, int64_t r0, int64_t r1) { generic::csr_f32(a, r0, r1); }

}  // namespace scalar
}  // namespace sp
