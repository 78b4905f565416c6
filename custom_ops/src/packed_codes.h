// Packed weight codes: a little-endian bit stream, 8 codes per `bits` bytes.
#pragma once

#include <onnxruntime_cxx_api.h>

#include <cstddef>
#include <cstdint>

#include "errors.h"
#include "inputs.h"

namespace qconvert {

inline uint64_t RequiredBytes(uint64_t n, int bits) { return (n * uint64_t(bits) + 7) / 8; }

// `codes` must be 1-D uint8 with at least ceil(n * bits / 8) bytes.
void CheckPackedCodes(const NodeRef& ref, const TensorView& codes, int64_t n, int bits);

// Unpacks codes [first, first + count) of a little-endian `bits`-bit stream
// into one byte each. The caller guarantees the stream holds them
// ((first + count) * bits <= 8 * size); no byte past that is read.
void UnpackCodes(const uint8_t* packed, size_t size, int bits, size_t first, size_t count,
                 uint8_t* out);

// out[i] = table[(i / inner) * row_len + code_i] for i in [begin, end), rows
// of one table per output channel (rows == 1: one shared row). With
// `check_range`, codes >= row_len are refused before any table read: the
// function then returns the first offending element index; else -1.
int64_t GatherCodes(const uint8_t* packed, size_t size, int bits, const float* table,
                    size_t row_len, size_t rows, size_t inner, size_t begin, size_t end,
                    float* out, bool check_range);

// Whole-tensor decode with the intra-op thread pool when ctx is given.
// Fails through `ref` on an out-of-range code.
void DecodeAll(const Ort::KernelContext* ctx, const NodeRef& ref, const uint8_t* packed,
               size_t size, int bits, const float* table, size_t row_len, size_t rows,
               size_t n, float* out);

}  // namespace qconvert
