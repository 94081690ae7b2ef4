// Row kernels every ISA tree defines (in namespace sp::<tree>), and its table.
#include "common.h"

#ifndef SP_ISA_NS
#error "define SP_ISA_NS before including kernels/decl.h"
#endif

namespace sp {
namespace SP_ISA_NS {
void masked_i8(const LinearArgs& a, int64_t r0, int64_t r1);
void dense_i8(const LinearArgs& a, int64_t r0, int64_t r1);
void csr_i8(const LinearArgs& a, int64_t r0, int64_t r1);
void gather_i8(const LinearArgs& a, int64_t r0, int64_t r1);  // trees whose table has one
void masked_f32(const LinearArgs& a, int64_t r0, int64_t r1);
void masked_bf16(const LinearArgs& a, int64_t r0, int64_t r1);
void csr_f32(const LinearArgs& a, int64_t r0, int64_t r1);
void quantize(const float* x, int64_t b0, int64_t b1, int64_t in, int64_t stride, int8_t* xq, uint8_t* xu,
              float* sx);
void activate(float* y, int64_t batch, int64_t stride, int64_t c0, int64_t c1, Activation kind);
void masked_gemm_i8(const LinearArgs& a, int64_t r0, int64_t r1);
void dense_gemm_i8(const LinearArgs& a, int64_t r0, int64_t r1);
void masked_gemm_i8_sum(const LinearArgs* parts, int n_parts, const LinearArgs& sum, int64_t r0, int64_t r1);
int64_t tile_panel_bytes(const LinearArgs& a, bool masked, int64_t n0, TileLayout* layout);
bool pack_tile_panel(const LinearArgs& a, bool masked, int64_t n0, TileLayout layout, int8_t* out);
void attend(const AttentionArgs& a, int64_t bh, int64_t i0, int64_t i1);
}  // namespace SP_ISA_NS
}  // namespace sp
