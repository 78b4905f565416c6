// AdaptiveStep: the ASQ activation quantizer (docs/ops.md, "AdaptiveStep").
#include <algorithm>
#include <cmath>

#include "common.h"

namespace qconvert {
namespace {

// y = clamp(round(x / s), lo, hi) * s over one sample's elements. Plain C++
// that GCC vectorizes; compiled twice (see QC_TARGET_AVX2).
__attribute__((always_inline)) inline void AdaptiveStepBody(float s, float lo, float hi,
                                                           const float* x, float* y, size_t n) {
  for (size_t i = 0; i < n; ++i) {
    float r = std::nearbyint(x[i] / s);  // a true division, then half-to-even
    // Written so that NaN passes through both comparisons unchanged.
    r = r < lo ? lo : r;
    r = r > hi ? hi : r;
    y[i] = r * s;
  }
}

QC_TARGET_AVX2 void AdaptiveStepAvx2(float s, float lo, float hi, const float* x, float* y,
                                     size_t n) {
  AdaptiveStepBody(s, lo, hi, x, y, n);
}

void AdaptiveStepPortable(float s, float lo, float hi, const float* x, float* y, size_t n) {
  AdaptiveStepBody(s, lo, hi, x, y, n);
}

class AdaptiveStepKernel : public KernelBase {
 public:
  static constexpr const char* kName = "AdaptiveStep";
  static constexpr std::array<ONNXTensorElementDataType, 3> kInputTypes = {
      ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT,
      ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT};

  AdaptiveStepKernel(const OrtKernelInfo* info, NodeRef ref) : KernelBase(std::move(ref)) {
    const int64_t bits = IntAttr(info, this->ref(), "bits");
    const int64_t is_signed = IntAttr(info, this->ref(), "signed");
    CheckAttrRange(this->ref(), "bits", bits, 2, 8);
    CheckAttrRange(this->ref(), "signed", is_signed, 0, 1);
    lo_ = is_signed ? -float(1 << (bits - 1)) : 0.0f;
    hi_ = is_signed ? float((1 << (bits - 1)) - 1) : float((1 << bits) - 1);
    constexpr auto kF32 = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
    if (auto step = ConstantInput(info, this->ref(), 1, "step", kF32)) CheckStep(step->count);
  }

  void Compute(const Ort::KernelContext& ctx) const {
    constexpr auto kF32 = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
    const TensorView x = KernelInput(ctx, ref(), 0, "X", kF32);
    const TensorView step = KernelInput(ctx, ref(), 1, "step", kF32);
    const TensorView beta = KernelInput(ctx, ref(), 2, "beta", kF32);
    CheckStep(step.count);
    if (x.shape.empty()) ref().Fail("X must have rank >= 1 (its first dim indexes beta)");
    const size_t N = size_t(x.shape[0]);
    if (beta.count != N) {
      ref().Fail("beta has " + std::to_string(beta.count) + " elements, X " +
                 ShapeString(x.shape) + " has N = " + std::to_string(N) + " samples");
    }

    float* y = AllocateOutput(ctx, x.shape);
    if (x.count == 0) return;
    const size_t inner = x.count / N;
    const float step_v = step.f32()[0];
    const float* betas = beta.f32();
    const float* xs = x.f32();
    const float lo = lo_, hi = hi_;
    const auto loop = UseAvx2() ? AdaptiveStepAvx2 : AdaptiveStepPortable;
    ForChunks(&ctx, x.count, [&](size_t begin, size_t end) {
      // A chunk may span several samples: one call per sample segment.
      for (size_t i = begin; i < end;) {
        const size_t sample = i / inner;
        const size_t seg_end = std::min(end, (sample + 1) * inner);
        const float s = step_v * betas[sample];  // s_a = step * beta[n]
        loop(s, lo, hi, xs + i, y + i, seg_end - i);
        i = seg_end;
      }
    });
  }

 private:
  void CheckStep(size_t count) const {
    if (count != 1) ref().Fail("step has " + std::to_string(count) + " elements, expected 1");
  }

  float lo_ = 0.0f;
  float hi_ = 0.0f;
};

}  // namespace

const OrtCustomOp* AdaptiveStepOp() {
  static const KernelOp<AdaptiveStepKernel> op;
  return &op;
}

}  // namespace qconvert
