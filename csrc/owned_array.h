// An owned, 64-byte aligned array that reads like the raw pointer it holds (p[i], p + k, !p, passing it
// where a T* is wanted) and frees itself: the prepared layouts (GEMM panels, gather rows, column chunks)
// keep plain pointer-like fields and need no hand-written move or free code.
//
//   OwnedArray<int64_t> offsets = OwnedArray<int64_t>::allocate(n + 1);
//   if (!offsets) return {};  // out of memory: empty, never a throw
//   offsets[0] = 0;
#pragma once
#include <cstddef>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <utility>

namespace sp {

template <typename T>
class OwnedArray {
  static_assert(std::is_trivially_copyable_v<T>, "OwnedArray holds plain numbers only");

 public:
  OwnedArray() = default;
  // `count` elements, uninitialised, in whole 64-byte lines (null when the allocation fails).
  static OwnedArray allocate(size_t count) {
    OwnedArray a;
    const size_t bytes = (count * sizeof(T) + 63) / 64 * 64;
    a.p_ = static_cast<T*>(std::aligned_alloc(64, bytes ? bytes : 64));
    return a;
  }
  // The same, every element zero.
  static OwnedArray zeroed(size_t count) {
    OwnedArray a = allocate(count);
    if (a.p_) std::memset(static_cast<void*>(a.p_), 0, count * sizeof(T));
    return a;
  }
  OwnedArray(OwnedArray&& o) noexcept : p_(std::exchange(o.p_, nullptr)) {}
  OwnedArray& operator=(OwnedArray&& o) noexcept {
    if (this != &o) {
      std::free(p_);
      p_ = std::exchange(o.p_, nullptr);
    }
    return *this;
  }
  OwnedArray(const OwnedArray&) = delete;
  OwnedArray& operator=(const OwnedArray&) = delete;
  ~OwnedArray() { std::free(p_); }

  operator T*() const { return p_; }
  T* get() const { return p_; }

 private:
  T* p_ = nullptr;
};

}  // namespace sp
