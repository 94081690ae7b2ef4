// Scalar tree, column skipping: the portable kernels of kernels/colskip_generic.h.
#define SP_ISA_NS scalar
#include "kernels/colskip_generic.h"

namespace sp {
namespace scalar {

// Densities (listed columns / in) up to which skipping beats the row kernels, measured with
// benchmarks/activation_kernels.py --crossover (AMD EPYC Zen 4, 2026-12-07): on dense int8 never
// (0.1-0.6x at 30% listed columns: the portable column loops lose the row kernels' unrolling), on
// masked int8 almost always (the scalar row kernel decodes every mask bit: 1.0-1.4x at 85-95%).
const ColSkipKernels& colskip() {
  static const ColSkipKernels k = {colgeneric::accumulate, colgeneric::finish,
                                   {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f},
                                   {0.f, 0.85f, 0.85f, 0.85f, 0.85f, 0.85f, 0.8f, 0.8f, 0.8f}};
  return k;
}

}  // namespace scalar
}  // namespace sp
