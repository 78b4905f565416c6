// Node attributes, read and range-checked at kernel creation.
#pragma once

#include <onnxruntime_cxx_api.h>

#include <cstdint>
#include <vector>

#include "errors.h"

namespace qconvert {

// A required int attribute; missing or of another type is an error.
int64_t IntAttr(const OrtKernelInfo* info, const NodeRef& ref, const char* name);
// An optional int attribute: `fallback` when the node does not carry it.
int64_t OptionalIntAttr(const OrtKernelInfo* info, const char* name, int64_t fallback);
std::vector<int64_t> IntsAttr(const OrtKernelInfo* info, const NodeRef& ref, const char* name);

void CheckAttrRange(const NodeRef& ref, const char* name, int64_t value, int64_t lo, int64_t hi);

// The code range of the activation quantizers' `bits` (2..8) and `signed` (0 or 1)
// attributes: [-2^(bits-1), 2^(bits-1) - 1] signed, [0, 2^bits - 1] unsigned.
struct CodeRange {
  float lo = 0.0f;
  float hi = 0.0f;
};
CodeRange ReadCodeRange(const OrtKernelInfo* info, const NodeRef& ref);

// Largest element count accepted for an output built from attributes: keeps
// `n * bits` and byte counts far from overflow.
constexpr int64_t kMaxElements = int64_t{1} << 48;

// The `shape` attribute of the decode ops: non-empty, every entry >= 1,
// product <= kMaxElements. Returns the product.
int64_t CheckOutputShape(const NodeRef& ref, const std::vector<int64_t>& shape);

}  // namespace qconvert
