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

// For masks whose every byte keeps four (2:4, 4:8): the byte shuffles of kByteShuffles with the values of
// mask byte k of a 32-column step starting 4k bytes into the step's 16 values (k = 0..3).
struct FourShuffles {
  uint64_t ctrl[4][256];
  constexpr FourShuffles() : ctrl() {
    for (int k = 0; k < 4; ++k)
      for (int b = 0; b < 256; ++b) {
        uint64_t v = 0;
        int next = 4 * k;
        for (int j = 0; j < 8; ++j) v |= uint64_t((b >> j) & 1 ? next++ : 0x80) << (8 * j);
        ctrl[k][b] = v;
      }
  }
};

alignas(64) inline constexpr FourShuffles kFourShuffles{};

}  // namespace SP_ISA_NS
}  // namespace sp
