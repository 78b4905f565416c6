// Input tensors as the kernels read them, and their outputs.
#pragma once

#include <onnxruntime_cxx_api.h>

#include <cstddef>
#include <cstdint>
#include <optional>
#include <vector>

#include "errors.h"

namespace qconvert {

// One input tensor as the kernels see it.
struct TensorView {
  ONNXTensorElementDataType type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  std::vector<int64_t> shape;
  size_t count = 0;
  const void* data = nullptr;

  const float* f32() const { return static_cast<const float*>(data); }
  const uint8_t* u8() const { return static_cast<const uint8_t*>(data); }
};

TensorView ViewOf(const Ort::ConstValue& value);
// Input `index`: must be present, a tensor of `type`, with no negative dimension.
TensorView KernelInput(const Ort::KernelContext& ctx, const NodeRef& ref, size_t index,
                       const char* name, ONNXTensorElementDataType type);
// The input if it is a constant initializer at kernel creation, else nothing.
std::optional<TensorView> ConstantInput(const OrtKernelInfo* info, const NodeRef& ref,
                                        size_t index, const char* name,
                                        ONNXTensorElementDataType type);

float* AllocateOutput(const Ort::KernelContext& ctx, const std::vector<int64_t>& shape);

// The float32 input X of an activation op, read with the fewest runtime calls
// (one shape query, no heap allocation up to rank kInlineRank): the per-run
// path when every other input was a constant checked at kernel creation.
struct ActivationInput {
  static constexpr size_t kInlineRank = 8;
  const float* data = nullptr;
  size_t count = 0;
  size_t rank = 0;
  int64_t inline_dims[kInlineRank] = {};
  std::vector<int64_t> heap_dims;  // only for rank > kInlineRank

  const int64_t* dims() const { return rank <= kInlineRank ? inline_dims : heap_dims.data(); }
};

// Input `index` as ActivationInput: must be present, a tensor, float32.
void ReadActivationInput(const Ort::KernelContext& ctx, const NodeRef& ref, size_t index,
                         const char* name, ActivationInput& out);

// Output 0 with X's shape.
float* AllocateOutputLike(const Ort::KernelContext& ctx, const ActivationInput& x);

}  // namespace qconvert
