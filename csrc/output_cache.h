// Recycled memory for large float outputs (layer outputs, attention outputs).
//
// A fresh multi-megabyte tensor per layer call comes from mmap (or a trimmed heap), and the kernel
// writing it first then takes one page fault per 4 KiB: ~7000 faults and ~10% of a MiniLM batch-32
// forward (measured). Blocks handed out here go back to a small cache when their tensor dies (the
// DLPack deleter) and the next call of the same size gets them back already mapped and warm.
#pragma once
#include <cstddef>

namespace sp {

// Outputs smaller than this are better left to the ordinary allocator (its heap reuses them
// fault-free); sparsepress.native.output_tensor asks for recycled blocks from this size on.
constexpr size_t kCachedOutputMinBytes = size_t(256) << 10;
// Freed blocks kept at most (oldest freed first out beyond it).
constexpr size_t kOutputCacheBytes = size_t(256) << 20;

// 64-byte aligned memory of at least `bytes`; a recycled block when one of a close size is free.
void* acquire_output(size_t bytes);
// Gives a block from acquire_output back (cached, or freed beyond kOutputCacheBytes).
void release_output(void* block) noexcept;
// Frees every cached block; returns the bytes freed.
size_t clear_output_cache() noexcept;
// Bytes currently held by the cache (freed blocks only).
size_t cached_output_bytes() noexcept;

}  // namespace sp
