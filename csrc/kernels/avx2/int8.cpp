// avx2 tree (placeholder), int8 weights: exact int32 dot products of int8 activations and weights.
#define SP_ISA_NS avx2
#include "kernels/decl.h"
#include "kernels/generic.h"

namespace sp {
namespace avx2 {

void masked_i8(const LinearArgs& a, int64_t r0, int64_t r1) { generic::masked_i8(a, r0, r1); }
void dense_i8(const LinearArgs& a, int64_t r0, int64_t r1) { generic::dense_i8(a, r0, r1); }
void csr_i8(const LinearArgs& a, int64_t r0, int64_t r1) { generic::csr_i8(a, r0, r1); }

}  // namespace avx2
}  // namespace sp
