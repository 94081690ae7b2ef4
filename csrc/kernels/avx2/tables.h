// Lookup tables of the AVX2 tree: for each mask byte, where its kept values sit (the byte shuffles
// in kernels/byte_shuffles.h, the float lane permutes here). Built at compile time; included by
// avx2/*.cpp only (namespace sp::avx2).
#pragma once
#include <cstdint>

#include "kernels/byte_shuffles.h"

namespace sp {
namespace SP_ISA_NS {

struct LanePermutes {
  // vpermd indices placing the popcount(b) next stream floats at the set bits of b
  int32_t idx[256][8];
  constexpr LanePermutes() : idx() {
    for (int b = 0; b < 256; ++b) {
      int next = 0;
      for (int j = 0; j < 8; ++j) idx[b][j] = (b >> j) & 1 ? next++ : 0;
    }
  }
};

alignas(32) inline constexpr LanePermutes kLanePermutes{};

}  // namespace SP_ISA_NS
}  // namespace sp
