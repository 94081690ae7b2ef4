// A per-thread scratch buffer that grows on demand (64-byte aligned, whole pages): GEMM panels,
// attention's transposed keys. Defined once per ISA tree (SP_ISA_NS), like generic.h, so no tree's
// copy is ever merged with another's by the linker.
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstdlib>

#ifndef SP_ISA_NS
#error "define SP_ISA_NS before including kernels/scratch.h"
#endif

namespace sp {
namespace SP_ISA_NS {

struct Scratch {
  int8_t* p = nullptr;
  size_t n = 0;
  Scratch() = default;
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  ~Scratch() { std::free(p); }
  // At least `need` bytes (null when they cannot be allocated); the contents are not kept.
  int8_t* get(size_t need) {
    if (need > n) {
      std::free(p);
      n = (need + 4095) & ~size_t(4095);
      p = static_cast<int8_t*>(std::aligned_alloc(64, n));
      if (!p) n = 0;
    }
    return p;
  }
};

}  // namespace SP_ISA_NS
}  // namespace sp
