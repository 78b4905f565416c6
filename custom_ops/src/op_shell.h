// The shell that turns a kernel class into an ONNX Runtime custom op.
#pragma once

#include <onnxruntime_cxx_api.h>

#include <string>
#include <utility>

#include "errors.h"

namespace qconvert {

// Turns a kernel class K into an ORT custom op. K provides kName,
// kInputTypes (a std::array), a constructor K(const OrtKernelInfo*, NodeRef)
// that checks attributes, and Compute(const Ort::KernelContext&).
//
// Built on Ort::CustomOpBase with WithStatus=true (CreateKernelV2 and
// KernelComputeV2) rather than the lite API: both entry points then return an
// OrtStatus, so errors carry our message and never unwind through ORT.
template <class K>
struct StatusKernel : K {
  using K::K;
  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    return Guarded(this->ref().Prefix(), [&] { this->Compute(Ort::KernelContext(context)); });
  }
};

template <class K>
struct KernelOp : Ort::CustomOpBase<KernelOp<K>, StatusKernel<K>, /*WithStatus=*/true> {
  const char* GetName() const { return K::kName; }
  size_t GetInputTypeCount() const { return K::kInputTypes.size(); }
  ONNXTensorElementDataType GetInputType(size_t i) const { return K::kInputTypes[i]; }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }

  OrtStatusPtr CreateKernelV2(const OrtApi&, const OrtKernelInfo* info, void** kernel) const {
    NodeRef ref = MakeNodeRef(K::kName, info);
    const std::string prefix = ref.Prefix();
    return Guarded(prefix, [&] { *kernel = new StatusKernel<K>(info, std::move(ref)); });
  }
};

// Base of every kernel: remembers which node it serves.
class KernelBase {
 public:
  explicit KernelBase(NodeRef ref) : ref_(std::move(ref)) {}
  const NodeRef& ref() const { return ref_; }

 private:
  NodeRef ref_;
};

}  // namespace qconvert
