// NEON trees, column skipping: the portable kernels of kernels/colskip_generic.h (auto-vectorized).
// No densities are measured for ARM yet: the scalar tree's are used until an ARM machine measures them.
#include "kernels/neon/tree.h"
#include "kernels/colskip_generic.h"

namespace sp {
namespace SP_ISA_NS {

const ColSkipKernels& colskip() {
  static const ColSkipKernels k = {colgeneric::accumulate, colgeneric::finish,
                                   {0.f, 0.85f, 0.8f, 0.8f, 0.8f, 0.8f, 0.8f, 0.8f, 0.8f},
                                   {0.f, 0.85f, 0.8f, 0.8f, 0.8f, 0.8f, 0.8f, 0.8f, 0.8f}};
  return k;
}

}  // namespace SP_ISA_NS
}  // namespace sp
