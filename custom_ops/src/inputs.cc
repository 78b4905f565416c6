#include "inputs.h"

#include <string>

namespace qconvert {

namespace {

const char* TypeName(ONNXTensorElementDataType type) {
  switch (type) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT:
      return "float32";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8:
      return "uint8";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8:
      return "int8";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32:
      return "int32";
    default:
      return "another type";
  }
}

}  // namespace

TensorView ViewOf(const Ort::ConstValue& value) {
  TensorView view;
  auto info = value.GetTensorTypeAndShapeInfo();
  view.type = info.GetElementType();
  view.shape = info.GetShape();
  view.count = info.GetElementCount();
  view.data = value.GetTensorRawData();
  return view;
}

namespace {

TensorView CheckedView(const Ort::ConstValue& value, const NodeRef& ref, const char* name,
                       ONNXTensorElementDataType type) {
  if (!value.IsTensor()) ref.Fail(std::string("input ") + name + " is not a tensor");
  TensorView view = ViewOf(value);
  if (view.type != type) {
    ref.Fail(std::string("input ") + name + " is " + TypeName(view.type) + ", expected " +
             TypeName(type));
  }
  for (int64_t dim : view.shape) {
    if (dim < 0) ref.Fail(std::string("input ") + name + " has a negative dimension");
  }
  if (view.count > 0 && view.data == nullptr) {
    ref.Fail(std::string("input ") + name + " has no data");
  }
  return view;
}

}  // namespace

TensorView KernelInput(const Ort::KernelContext& ctx, const NodeRef& ref, size_t index,
                       const char* name, ONNXTensorElementDataType type) {
  if (index >= ctx.GetInputCount()) ref.Fail(std::string("input ") + name + " is missing");
  Ort::ConstValue value = ctx.GetInput(index);
  if (value == nullptr) ref.Fail(std::string("input ") + name + " is missing");
  return CheckedView(value, ref, name, type);
}

std::optional<TensorView> ConstantInput(const OrtKernelInfo* info, const NodeRef& ref,
                                        size_t index, const char* name,
                                        ONNXTensorElementDataType type) {
  int is_constant = 0;
  const OrtValue* value = nullptr;
  std::string error =
      TakeStatus(Ort::GetApi().KernelInfoGetConstantInput_tensor(info, index, &is_constant, &value));
  if (!error.empty() || !is_constant || value == nullptr) return std::nullopt;
  return CheckedView(Ort::ConstValue(value), ref, name, type);
}

float* AllocateOutput(const Ort::KernelContext& ctx, const std::vector<int64_t>& shape) {
  Ort::UnownedValue out = ctx.GetOutput(0, shape);
  return out.GetTensorMutableData<float>();
}

void ReadActivationInput(const Ort::KernelContext& ctx, const NodeRef& ref, size_t index,
                         const char* name, ActivationInput& out) {
  const OrtApi& api = Ort::GetApi();
  OrtKernelContext* context = ctx.GetOrtKernelContext();
  const OrtValue* value = nullptr;
  if (TakeStatus(api.KernelContext_GetInput(context, index, &value)) != "" || value == nullptr) {
    ref.Fail(std::string("input ") + name + " is missing");
  }
  OrtTensorTypeAndShapeInfo* info = nullptr;
  if (TakeStatus(api.GetTensorTypeAndShape(value, &info)) != "" || info == nullptr) {
    ref.Fail(std::string("input ") + name + " is not a tensor");
  }
  ONNXTensorElementDataType type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  size_t rank = 0;
  std::string error = TakeStatus(api.GetTensorElementType(info, &type));
  if (error.empty()) error = TakeStatus(api.GetDimensionsCount(info, &rank));
  int64_t* dims = out.inline_dims;
  if (error.empty() && rank > ActivationInput::kInlineRank) {
    out.heap_dims.resize(rank);
    dims = out.heap_dims.data();
  }
  if (error.empty()) error = TakeStatus(api.GetDimensions(info, dims, rank));
  size_t count = 0;
  if (error.empty()) error = TakeStatus(api.GetTensorShapeElementCount(info, &count));
  api.ReleaseTensorTypeAndShapeInfo(info);
  if (!error.empty()) ref.Fail(std::string("input ") + name + ": " + error);
  if (type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) {
    ref.Fail(std::string("input ") + name + " is " + TypeName(type) + ", expected float32");
  }
  for (size_t i = 0; i < rank; ++i) {
    if (dims[i] < 0) ref.Fail(std::string("input ") + name + " has a negative dimension");
  }
  void* data = nullptr;
  if (count > 0) {
    error = TakeStatus(api.GetTensorMutableData(const_cast<OrtValue*>(value), &data));
    if (!error.empty() || data == nullptr) ref.Fail(std::string("input ") + name + " has no data");
  }
  out.data = static_cast<const float*>(data);
  out.count = count;
  out.rank = rank;
}

float* AllocateOutputLike(const Ort::KernelContext& ctx, const ActivationInput& x) {
  const OrtApi& api = Ort::GetApi();
  OrtKernelContext* context = ctx.GetOrtKernelContext();
  OrtValue* out = nullptr;
  Ort::ThrowOnError(api.KernelContext_GetOutput(context, 0, x.dims(), x.rank, &out));
  void* data = nullptr;
  Ort::ThrowOnError(api.GetTensorMutableData(out, &data));
  return static_cast<float*>(data);
}

}  // namespace qconvert
