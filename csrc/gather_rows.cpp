#include "gather_rows.h"

#include <cstdlib>
#include <cstring>
#include <vector>


namespace sp {

namespace {

// Builds one row's records: values are appended in column order; a record is closed when full or when
// the next column lies more than 255 past its base (the rest padded with zeros at its last column),
// and a gap wider than 255 columns is bridged by empty records that each move the base 255 on.
class RowWriter {
 public:
  explicit RowWriter(uint8_t* out) : out_(out) {}

  void add(int64_t col, int8_t value) {
    while (col - base_ > 255) {
      if (n_ > 0) {
        close();
      } else {
        std::memset(off_, 255, sizeof off_);
        std::memset(val_, 0, sizeof val_);
        n_ = kGatherChunk;
        close();
      }
    }
    off_[n_] = uint8_t(col - base_);
    val_[n_] = value;
    if (++n_ == kGatherChunk) close();
  }

  // Records written (or counted) so far, the last partial one closed.
  int64_t finish() {
    if (n_ > 0) close();
    return records_;
  }

 private:
  uint8_t* out_;
  int64_t base_ = 0, records_ = 0;
  int n_ = 0;
  uint8_t off_[kGatherChunk] = {};
  int8_t val_[kGatherChunk] = {};

  void close() {
    for (int j = n_; j < kGatherChunk; ++j) {
      off_[j] = off_[n_ - 1];
      val_[j] = 0;
    }
    if (out_) {
      std::memcpy(out_ + records_ * kGatherRecordBytes, off_, kGatherChunk);
      std::memcpy(out_ + records_ * kGatherRecordBytes + kGatherChunk, val_, kGatherChunk);
    }
    base_ += off_[kGatherChunk - 1];
    ++records_;
    n_ = 0;
  }
};

}  // namespace

// Calls f(column, value) for every stored value of row r, in column order.
template <class F>
static void for_each_stored(const LinearArgs& a, int64_t r, F f) {
  const uint8_t* m = a.mask + r * a.mask_stride;
  const int8_t* v = static_cast<const int8_t*>(a.values) + a.row_offsets[r];
  const int64_t stored = a.row_offsets[r + 1] - a.row_offsets[r];
  int64_t i = 0;
  for (int64_t byte = 0; byte < a.mask_stride && i < stored; ++byte)
    for (uint32_t bits = m[byte]; bits && i < stored; bits &= bits - 1) {
      const int64_t col = byte * 8 + __builtin_ctz(bits);
      if (col >= a.in) return;
      f(col, v[i++]);
    }
}

// Windows256: the row's window counts (uint16 each), then per window its offsets and its values.
static int64_t pack_window_row(const LinearArgs& a, int64_t r, uint8_t* out) {
  const int64_t windows = (a.in + kGatherWindow - 1) / kGatherWindow;
  const int64_t stored = a.row_offsets[r + 1] - a.row_offsets[r];
  const int64_t size = 2 * windows + 2 * stored;
  if (!out) return size;
  std::vector<uint16_t> counts(size_t(windows), 0);
  for_each_stored(a, r, [&](int64_t col, int8_t) { ++counts[size_t(col / kGatherWindow)]; });
  std::memcpy(out, counts.data(), size_t(2 * windows));
  // window w's offsets start at `at[w]`, its values counts[w] bytes later
  std::vector<int64_t> at(size_t(windows), 0), filled(size_t(windows), 0);
  for (int64_t w = 0, p = 2 * windows; w < windows; p += 2 * counts[size_t(w)], ++w) at[size_t(w)] = p;
  for_each_stored(a, r, [&](int64_t col, int8_t value) {
    const size_t w = size_t(col / kGatherWindow);
    out[at[w] + filled[w]] = uint8_t(col % kGatherWindow);
    out[at[w] + counts[w] + filled[w]] = uint8_t(value);
    ++filled[w];
  });
  return size;
}

int64_t pack_gather_row(const LinearArgs& a, int64_t r, GatherLayout layout, uint8_t* out) {
  if (layout == GatherLayout::Windows256) return pack_window_row(a, r, out);
  RowWriter row(out);
  for_each_stored(a, r, [&](int64_t col, int8_t value) { row.add(col, value); });
  return row.finish();
}

GatherRows prepare_gather_rows(const LinearArgs& a, GatherLayout layout) {
  GatherRows g;
  if (a.out <= 0) return g;
  g.layout = layout;
  g.out = a.out;
  g.chunks = OwnedArray<int64_t>::allocate(size_t(a.out + 1));
  if (!g.chunks) return GatherRows();
  g.chunks[0] = 0;
  for (int64_t r = 0; r < a.out; ++r) g.chunks[r + 1] = g.chunks[r] + pack_gather_row(a, r, layout, nullptr);
  // + zeroed slack past the last row: one record, or the 64 bytes a window's offsets are loaded as
  const int64_t unit = layout == GatherLayout::Records8 ? kGatherRecordBytes : 1;
  const int64_t used = g.chunks[a.out] * unit;
  const size_t bytes = size_t(used + 64 + 63) / 64 * 64;
  g.records = OwnedArray<uint8_t>::allocate(bytes);
  if (!g.records) return GatherRows();
  for (int64_t r = 0; r < a.out; ++r) pack_gather_row(a, r, layout, g.records + g.chunks[r] * unit);
  std::memset(g.records + used, 0, bytes - size_t(used));
  return g;
}

void use_gather_rows(const GatherRows& g, LinearArgs& a) {
  if (g.records) {
    a.gather_recs = g.records;
    a.gather_chunks = g.chunks;
    a.gather_layout = g.layout;
  }
}

}  // namespace sp
