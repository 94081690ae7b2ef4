// NEON trees, column skipping: the portable kernels of kernels/colskip_generic.h (auto-vectorized).
// No densities are measured on ARM hardware yet (qemu gives no timings): like the scalar tree's, they stay
// 0 (never skip; the inputs are still zeroed) until an ARM machine runs activation_kernels.py --crossover.
#include "kernels/neon/tree.h"
#include "kernels/colskip_generic.h"

namespace sp {
namespace SP_ISA_NS {

const ColSkipKernels& colskip() {
  static const ColSkipKernels k = {colgeneric::accumulate, colgeneric::finish,
                                   {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f},
                                   {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f}};
  return k;
}

}  // namespace SP_ISA_NS
}  // namespace sp
