#include "decode_kernel.h"

#include <cstring>

#include "attributes.h"
#include "packed_codes.h"

namespace qconvert {

DecodeKernel::DecodeKernel(const OrtKernelInfo* info, NodeRef ref, int min_bits)
    : KernelBase(std::move(ref)) {
  const int64_t bits = IntAttr(info, this->ref(), "bits");
  CheckAttrRange(this->ref(), "bits", bits, min_bits, 8);
  bits_ = int(bits);
  shape_ = IntsAttr(info, this->ref(), "shape");
  n_ = CheckOutputShape(this->ref(), shape_);
}

void DecodeKernel::CacheIfConstant(const OrtKernelInfo* info) {
  auto codes = ConstantInput(info, ref(), 0, "codes", ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8);
  auto param = ConstantInput(info, ref(), 1, ParamName(), ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT);
  if (!codes || !param) return;
  // Check the sizes before allocating n floats for the cache.
  CheckPackedCodes(ref(), *codes, n_, bits_);
  cache_.resize(n());
  Decode(nullptr, *codes, *param, cache_.data());
  cached_ = true;
}

void DecodeKernel::Compute(const Ort::KernelContext& ctx) const {
  if (cached_) {
    float* out = AllocateOutput(ctx, shape_);
    std::memcpy(out, cache_.data(), cache_.size() * sizeof(float));
    return;
  }
  const TensorView codes =
      KernelInput(ctx, ref(), 0, "codes", ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8);
  const TensorView param =
      KernelInput(ctx, ref(), 1, ParamName(), ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT);
  // Checked here too so that a bad run allocates nothing.
  CheckPackedCodes(ref(), codes, n_, bits_);
  float* out = AllocateOutput(ctx, shape_);
  Decode(&ctx, codes, param, out);
}

}  // namespace qconvert
