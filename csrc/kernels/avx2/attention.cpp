#include "kernels/avx2/tree.h"
#include "kernels/decl.h"
#include "kernels/attention.h"

namespace sp {
namespace SP_ISA_NS {

void attend(const AttentionArgs& a, int64_t bh, int64_t i0, int64_t i1) { attn::attend(a, bh, i0, i1); }

}  // namespace SP_ISA_NS
}  // namespace sp
