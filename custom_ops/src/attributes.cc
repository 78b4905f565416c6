#include "attributes.h"

#include <string>

namespace qconvert {

int64_t IntAttr(const OrtKernelInfo* info, const NodeRef& ref, const char* name) {
  int64_t value = 0;
  std::string error = TakeStatus(Ort::GetApi().KernelInfoGetAttribute_int64(info, name, &value));
  if (!error.empty()) {
    ref.Fail(std::string("attribute '") + name + "' missing or not an int (" + error + ")");
  }
  return value;
}

int64_t OptionalIntAttr(const OrtKernelInfo* info, const char* name, int64_t fallback) {
  int64_t value = 0;
  OrtStatus* status = Ort::GetApi().KernelInfoGetAttribute_int64(info, name, &value);
  if (status != nullptr) {
    Ort::GetApi().ReleaseStatus(status);
    return fallback;
  }
  return value;
}

std::vector<int64_t> IntsAttr(const OrtKernelInfo* info, const NodeRef& ref, const char* name) {
  const OrtApi& api = Ort::GetApi();
  size_t size = 0;
  std::string error = TakeStatus(api.KernelInfoGetAttributeArray_int64(info, name, nullptr, &size));
  std::vector<int64_t> values(size);
  if (error.empty() && size > 0) {
    error = TakeStatus(api.KernelInfoGetAttributeArray_int64(info, name, values.data(), &size));
  }
  if (!error.empty()) {
    ref.Fail(std::string("attribute '") + name + "' missing or not a list of ints (" + error +
             ")");
  }
  return values;
}

void CheckAttrRange(const NodeRef& ref, const char* name, int64_t value, int64_t lo, int64_t hi) {
  if (value < lo || value > hi) {
    ref.Fail(std::string("attribute ") + name + "=" + std::to_string(value) + " outside " +
             std::to_string(lo) + ".." + std::to_string(hi));
  }
}

int64_t CheckOutputShape(const NodeRef& ref, const std::vector<int64_t>& shape) {
  if (shape.empty()) ref.Fail("attribute shape is empty; it needs at least one entry");
  int64_t n = 1;
  for (int64_t dim : shape) {
    if (dim < 1) ref.Fail("attribute shape=" + ShapeString(shape) + " has an entry < 1");
    if (n > kMaxElements / dim) {
      ref.Fail("attribute shape=" + ShapeString(shape) + " has more than 2^48 elements");
    }
    n *= dim;
  }
  return n;
}

CodeRange ReadCodeRange(const OrtKernelInfo* info, const NodeRef& ref) {
  const int64_t bits = IntAttr(info, ref, "bits");
  const int64_t is_signed = IntAttr(info, ref, "signed");
  CheckAttrRange(ref, "bits", bits, 2, 8);
  CheckAttrRange(ref, "signed", is_signed, 0, 1);
  if (is_signed) return {-float(1 << (bits - 1)), float((1 << (bits - 1)) - 1)};
  return {0.0f, float((1 << bits) - 1)};
}

}  // namespace qconvert
