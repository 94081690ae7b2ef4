// Lookup tables of the AVX2 tree: for each mask byte, where its kept values sit.
// Built at compile time; included by avx2/*.cpp only (namespace sp::avx2).
#pragma once
#include <cstdint>

namespace sp {
namespace avx2 {

struct ByteShuffles {
  // pshufb control placing the popcount(b) next stream bytes at the set bits of b; 0x80 = zero
  uint64_t ctrl[256];
  constexpr ByteShuffles() : ctrl() {
    for (int b = 0; b < 256; ++b) {
      uint64_t v = 0;
      int next = 0;
      for (int j = 0; j < 8; ++j) {
        const uint64_t byte = (b >> j) & 1 ? uint64_t(next++) : 0x80;
        v |= byte << (8 * j);
      }
      ctrl[b] = v;
    }
  }
};

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

inline constexpr ByteShuffles kByteShuffles{};
alignas(32) inline constexpr LanePermutes kLanePermutes{};

}  // namespace avx2
}  // namespace sp
