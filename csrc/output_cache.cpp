#include "output_cache.h"

#include <cstdint>
#include <cstdlib>
#include <deque>
#include <mutex>
#include <new>

namespace sp {
namespace {

// Each block carries its capacity in a 64-byte header so the deleter needs only the pointer.
constexpr size_t kHeader = 64;

struct Cache {
  std::mutex lock;
  std::deque<void*> free_blocks;  // data pointers, most recently freed last
  size_t bytes = 0;
};

Cache& cache() {
  static Cache* c = new Cache;  // never destroyed: deleters may run during interpreter shutdown
  return *c;
}

size_t& capacity_of(void* block) { return *reinterpret_cast<size_t*>(static_cast<char*>(block) - kHeader); }

void free_block(void* block) noexcept { std::free(static_cast<char*>(block) - kHeader); }

}  // namespace

void* acquire_output(size_t bytes) {
  Cache& c = cache();
  {
    std::lock_guard<std::mutex> guard(c.lock);
    // newest first: the block most likely still in cache; at most 1.25x the request so varying
    // token counts do not pin big blocks under small outputs
    for (auto it = c.free_blocks.rbegin(); it != c.free_blocks.rend(); ++it) {
      const size_t cap = capacity_of(*it);
      if (cap >= bytes && cap - bytes <= bytes / 4) {
        void* block = *it;
        c.free_blocks.erase(std::next(it).base());
        c.bytes -= cap;
        return block;
      }
    }
  }
  const size_t cap = (bytes + 63) & ~size_t(63);
  void* raw = std::aligned_alloc(64, cap + kHeader);
  if (raw == nullptr) throw std::bad_alloc();
  void* block = static_cast<char*>(raw) + kHeader;
  capacity_of(block) = cap;
  return block;
}

void release_output(void* block) noexcept {
  if (block == nullptr) return;
  Cache& c = cache();
  const size_t cap = capacity_of(block);
  std::deque<void*> evicted;
  {
    std::lock_guard<std::mutex> guard(c.lock);
    c.free_blocks.push_back(block);
    c.bytes += cap;
    while (c.bytes > kOutputCacheBytes) {
      void* oldest = c.free_blocks.front();
      c.free_blocks.pop_front();
      c.bytes -= capacity_of(oldest);
      evicted.push_back(oldest);
    }
  }
  for (void* b : evicted) free_block(b);
}

size_t clear_output_cache() noexcept {
  Cache& c = cache();
  std::deque<void*> all;
  size_t freed = 0;
  {
    std::lock_guard<std::mutex> guard(c.lock);
    all.swap(c.free_blocks);
    freed = c.bytes;
    c.bytes = 0;
  }
  for (void* b : all) free_block(b);
  return freed;
}

size_t cached_output_bytes() noexcept {
  Cache& c = cache();
  std::lock_guard<std::mutex> guard(c.lock);
  return c.bytes;
}

}  // namespace sp
