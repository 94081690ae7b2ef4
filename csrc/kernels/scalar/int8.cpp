// Scalar tree, int8 weights: exact int32 dot products of int8 activations and weights.
#define SP_ISA_NS scalar
#include "kernels/decl.h"
#include "kernels/generic.h"

namespace sp {
namespace scalar {

void masked_i8(const LinearArgs& a, int64_t r0, int64_t r1) { generic::masked_i8(a, r0, r1); }
void dense_i8(const LinearArgs& a, int64_t r0, int64_t r1) { generic::dense_i8(a, r0, r1); }
void csr_i8(const LinearArgs& a, int64_t r0, int64_t r1) { generic::csr_i8(a, r0, r1); }
void gather_i8(const LinearArgs& a, int64_t r0, int64_t r1) { generic::gather_i8(a, r0, r1); }
void quantize(const float* x, int64_t b0, int64_t b1, int64_t in, int64_t stride, int8_t* xq, uint8_t* xu,
              float* sx) {
  generic::quantize(x, b0, b1, in, stride, xq, xu, sx);
}
// No GEMM in the scalar tree (the table holds null): the row kernels serve every batch.
void masked_gemm_i8(const LinearArgs& a, int64_t r0, int64_t r1) { generic::masked_i8(a, r0, r1); }
void dense_gemm_i8(const LinearArgs& a, int64_t r0, int64_t r1) { generic::dense_i8(a, r0, r1); }

}  // namespace scalar
}  // namespace sp
