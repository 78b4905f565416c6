#include "packed_codes.h"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <limits>
#include <string>

#include "parallel.h"

namespace qconvert {

void CheckPackedCodes(const NodeRef& ref, const TensorView& codes, int64_t n, int bits) {
  if (codes.shape.size() != 1) {
    ref.Fail("codes must be 1-D, got shape " + ShapeString(codes.shape));
  }
  const uint64_t need = RequiredBytes(uint64_t(n), bits);
  if (codes.count < need) {
    ref.Fail("codes has " + std::to_string(codes.count) + " bytes, " + std::to_string(n) +
             " codes of " + std::to_string(bits) + " bits need " + std::to_string(need));
  }
}

namespace {

// Code i read bit by bit; used at the ragged ends of a range.
inline uint8_t CodeAt(const uint8_t* packed, int bits, unsigned mask, size_t i) {
  const size_t bit = i * size_t(bits);
  const size_t byte = bit >> 3;
  const unsigned shift = bit & 7;
  unsigned v = unsigned(packed[byte]) >> shift;
  // Only touch the next byte when the code reaches into it: that byte is
  // then part of the stream, so the read stays inside the buffer.
  if (shift + unsigned(bits) > 8) v |= unsigned(packed[byte + 1]) << (8 - shift);
  return uint8_t(v & mask);
}

// Eight codes occupy exactly `bits` bytes starting at group * bits.
inline uint64_t LoadGroup(const uint8_t* packed, size_t size, int bits, size_t group) {
  const size_t offset = group * size_t(bits);
  uint64_t word = 0;
  if (offset + 8 <= size) {
    std::memcpy(&word, packed + offset, 8);  // bytes past the group are masked off
  } else {
    std::memcpy(&word, packed + offset, size_t(bits));
  }
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
  word = __builtin_bswap64(word);
#endif
  return word;
}

}  // namespace

void UnpackCodes(const uint8_t* packed, size_t size, int bits, size_t first, size_t count,
                 uint8_t* out) {
  const unsigned mask = (1u << bits) - 1;
  const size_t end = first + count;
  size_t i = first;
  for (; i < end && (i & 7) != 0; ++i) *out++ = CodeAt(packed, bits, mask, i);
  for (; i + 8 <= end; i += 8) {
    const uint64_t word = LoadGroup(packed, size, bits, i / 8);
    for (int k = 0; k < 8; ++k) *out++ = uint8_t((word >> (k * bits)) & mask);
  }
  for (; i < end; ++i) *out++ = CodeAt(packed, bits, mask, i);
}

int64_t GatherCodes(const uint8_t* packed, size_t size, int bits, const float* table,
                    size_t row_len, size_t rows, size_t inner, size_t begin, size_t end,
                    float* out, bool check_range) {
  constexpr size_t kBlock = 1024;
  uint8_t codes[kBlock];
  for (size_t start = begin; start < end; start += kBlock) {
    const size_t count = std::min(kBlock, end - start);
    UnpackCodes(packed, size, bits, start, count, codes);
    if (check_range) {
      for (size_t k = 0; k < count; ++k) {
        if (codes[k] >= row_len) return int64_t(start + k);
      }
    }
    // Walk the block one channel segment at a time: no division per element.
    size_t k = 0;
    while (k < count) {
      const size_t i = start + k;
      const size_t row = rows == 1 ? 0 : i / inner;
      const size_t seg_end = rows == 1 ? count : std::min(count, (row + 1) * inner - start);
      const float* t = table + row * row_len;
      for (; k < seg_end; ++k) out[start + k] = t[codes[k]];
    }
  }
  return -1;
}

void DecodeAll(const Ort::KernelContext* ctx, const NodeRef& ref, const uint8_t* packed,
               size_t size, int bits, const float* table, size_t row_len, size_t rows,
               size_t n, float* out) {
  // A full table (2^bits entries) cannot be indexed out of range.
  const bool check_range = row_len < (size_t{1} << bits);
  const size_t inner = n / rows;
  std::atomic<int64_t> first_bad{std::numeric_limits<int64_t>::max()};
  ForChunks(ctx, n, [&](size_t begin, size_t end) {
    const int64_t bad = GatherCodes(packed, size, bits, table, row_len, rows, inner, begin, end,
                                    out, check_range);
    if (bad >= 0) {
      int64_t seen = first_bad.load();
      while (bad < seen && !first_bad.compare_exchange_weak(seen, bad)) {
      }
    }
  });
  const int64_t bad = first_bad.load();
  if (bad != std::numeric_limits<int64_t>::max()) {
    uint8_t code = 0;
    UnpackCodes(packed, size, bits, size_t(bad), 1, &code);
    ref.Fail("code " + std::to_string(code) + " at element " + std::to_string(bad) +
             " is out of range for a table of " + std::to_string(row_len) + " levels");
  }
}

}  // namespace qconvert
