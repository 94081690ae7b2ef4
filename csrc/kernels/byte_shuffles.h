// Byte-shuffle controls that expand a mask byte's stored values into its 8 columns (pshufb on x86,
// tbl on ARM: an index with the top bit set, 0x80, selects zero in both). Built at compile time, once
// per tree (SP_ISA_NS), like generic.h.
#pragma once
#include <cstdint>

#ifndef SP_ISA_NS
#error "define SP_ISA_NS before including kernels/byte_shuffles.h"
#endif

namespace sp {
namespace SP_ISA_NS {

struct ByteShuffles {
  // control placing the popcount(b) next stream bytes at the set bits of b; 0x80 = zero
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

inline constexpr ByteShuffles kByteShuffles{};

// n * kOnes adds n to every byte of a control: the control of a mask byte whose values start n bytes
// into the loaded window (0x80 + n still selects zero).
constexpr uint64_t kOnes = 0x0101010101010101ull;

}  // namespace SP_ISA_NS
}  // namespace sp
