#include "conv_clamp.h"

#include <algorithm>
#include <string>

#include "attributes.h"
#include "inputs.h"

namespace qconvert {

ConvClampAttributes ConvClampAttributes::Read(const OrtKernelInfo* info, const NodeRef& ref) {
  ConvClampAttributes a;
  const std::vector<int64_t> strides = IntsAttr(info, ref, "strides");
  const std::vector<int64_t> pads = IntsAttr(info, ref, "pads");
  if (strides.size() != 2) ref.Fail("attribute strides needs 2 entries [sh, sw]");
  if (pads.size() != 4) ref.Fail("attribute pads needs 4 entries [top, left, bottom, right]");
  CheckAttrRange(ref, "strides[0]", strides[0], 1, kMaxConvStride);
  CheckAttrRange(ref, "strides[1]", strides[1], 1, kMaxConvStride);
  a.sh = strides[0];
  a.sw = strides[1];
  for (size_t i = 0; i < 4; ++i) CheckAttrRange(ref, "pads", pads[i], 0, kMaxConvKernel - 1);
  std::copy(pads.begin(), pads.end(), a.pads.begin());
  a.lo = IntAttr(info, ref, "lo");
  a.hi = IntAttr(info, ref, "hi");
  CheckAttrRange(ref, "lo", a.lo, 0, 255);
  CheckAttrRange(ref, "hi", a.hi, a.lo, 255);
  a.zero_point = OptionalIntAttr(info, "zero_point", 0);
  CheckAttrRange(ref, "zero_point", a.zero_point, 0, 255);
  a.x_zero_point = OptionalIntAttr(info, "x_zero_point", 0);
  CheckAttrRange(ref, "x_zero_point", a.x_zero_point, 0, 255);
  return a;
}

void ConvClampAttributes::CheckKernel(const NodeRef& ref, int64_t kh, int64_t kw) const {
  CheckAttrRange(ref, "W kernel height", kh, 1, kMaxConvKernel);
  CheckAttrRange(ref, "W kernel width", kw, 1, kMaxConvKernel);
  if (pads[0] >= kh || pads[2] >= kh || pads[1] >= kw || pads[3] >= kw) {
    ref.Fail("pads must be smaller than the kernel " + ShapeString({kh, kw}));
  }
}

ConvRequantization ConvRequantization::Read(const OrtKernelInfo* info, const NodeRef& ref,
                                            const char* letter, size_t padded,
                                            const std::vector<int64_t>& weight_sums,
                                            int64_t x_zero_point) {
  const size_t channels = weight_sums.size();
  auto b = ConstantInput(info, ref, 2, "B", ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32);
  auto s = ConstantInput(info, ref, 3, "scale", ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT);
  if (!b || !s) ref.Fail("inputs B and scale must be constant initializers");
  if (b->count != channels || s->count != channels) {
    ref.Fail(std::string("B and scale need ") + letter + " = " + std::to_string(channels) +
             " elements, got " + std::to_string(b->count) + " and " + std::to_string(s->count));
  }
  ConvRequantization q;
  q.bias.assign(padded, 0);
  q.folded_bias.assign(padded, 0);
  q.scale.assign(padded, 0.0f);
  const auto* bv = static_cast<const int32_t*>(b->data);
  for (size_t c = 0; c < channels; ++c) {
    if (bv[c] <= -kMaxConvBias || bv[c] >= kMaxConvBias) {
      ref.Fail("B[" + std::to_string(c) + "] = " + std::to_string(bv[c]) +
               " is outside (-2^30, 2^30)");
    }
    if (!std::isfinite(s->f32()[c])) ref.Fail("scale[" + std::to_string(c) + "] is not finite");
    q.bias[c] = bv[c];
    // int32 wrap-around leaves the final sum, which fits, exact.
    q.folded_bias[c] = int32_t(int64_t(bv[c]) - x_zero_point * weight_sums[c]);
    q.scale[c] = s->f32()[c];
  }
  return q;
}

}  // namespace qconvert
