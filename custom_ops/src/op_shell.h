// The shell that turns a kernel class into an ONNX Runtime custom op.
#pragma once

#include <onnxruntime_cxx_api.h>

#include <string>
#include <type_traits>
#include <utility>

#include "errors.h"

namespace qconvert {

// Turns a kernel class K into an ORT custom op. K provides kName,
// kSinceVersion (the op-set version that added the op), kInputTypes (a std::array), a constructor K(const OrtKernelInfo*, NodeRef)
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

// The newest version of the `qconvert` op set the library serves (version 2
// added UniformQuant, version 3 SampleMaxQuant and CompandQuant's optional
// mirror / clip attributes, version 4 QConvClamp, version 5 QDepthwiseConvClamp;
// qconvert.ops.DOMAIN_VERSION on the Python side). ORT's
// CustomOpBase gives every op the range [1, 2^31 - 1] unless told otherwise;
// each op here states [K::kSinceVersion, kDomainVersion] instead. ORT binds a
// node through the op's schema (since-version <= the model's import), so
// models importing versions 1 to 5 run these kernels (tests/test_native_ops.py
// checks both); raise this with the Python op set.
constexpr int kDomainVersion = 5;

// K::kOutputType when K declares one, else float32 (every op before QConvClamp).
template <class K, class = void>
struct OutputTypeOf : std::integral_constant<ONNXTensorElementDataType,
                                             ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT> {};
template <class K>
struct OutputTypeOf<K, std::void_t<decltype(K::kOutputType)>>
    : std::integral_constant<ONNXTensorElementDataType, K::kOutputType> {};

template <class K>
struct KernelOp : Ort::CustomOpBase<KernelOp<K>, StatusKernel<K>, /*WithStatus=*/true> {
  KernelOp() {
    this->start_ver_ = K::kSinceVersion;
    this->end_ver_ = kDomainVersion;
  }

  const char* GetName() const { return K::kName; }
  size_t GetInputTypeCount() const { return K::kInputTypes.size(); }
  ONNXTensorElementDataType GetInputType(size_t i) const { return K::kInputTypes[i]; }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return OutputTypeOf<K>::value; }

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
