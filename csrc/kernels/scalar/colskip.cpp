// Scalar tree, column skipping: the portable kernels of kernels/colskip_generic.h.
#define SP_ISA_NS scalar
#include "kernels/colskip_generic.h"

namespace sp {
namespace scalar {

// Densities (listed columns / in) up to which skipping beats the row kernels, by token count
// (index 0 unused); measured with benchmarks/activation_kernels.py --crossover (Zen 4).
const ColSkipKernels& colskip() {
  static const ColSkipKernels k = {colgeneric::accumulate, colgeneric::finish,
                                   {0.f, 0.85f, 0.8f, 0.8f, 0.8f, 0.8f, 0.8f, 0.8f, 0.8f},
                                   {0.f, 0.85f, 0.8f, 0.8f, 0.8f, 0.8f, 0.8f, 0.8f, 0.8f}};
  return k;
}

}  // namespace scalar
}  // namespace sp
