// AdaptiveStep: the ASQ activation quantizer (docs/ops.md, "AdaptiveStep").
#include <algorithm>
#include <array>
#include <string>
#include <vector>

#include "attributes.h"
#include "inputs.h"
#include "op_shell.h"
#include "ops.h"
#include "parallel.h"
#include "step_quant.h"

namespace qconvert {
namespace {

class AdaptiveStepKernel : public KernelBase {
 public:
  static constexpr const char* kName = "AdaptiveStep";
  static constexpr int kSinceVersion = 1;
  static constexpr std::array<ONNXTensorElementDataType, 3> kInputTypes = {
      ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT,
      ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT};

  AdaptiveStepKernel(const OrtKernelInfo* info, NodeRef ref) : KernelBase(std::move(ref)) {
    range_ = ReadCodeRange(info, this->ref());
    constexpr auto kF32 = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
    auto step = ConstantInput(info, this->ref(), 1, "step", kF32);
    if (step) CheckStep(step->count);
    auto beta = ConstantInput(info, this->ref(), 2, "beta", kF32);
    if (step && beta) {
      // Both parameters fixed: a run reads X only (beta's length is checked
      // against X's first dimension per run, as X's shape may change).
      const_step_ = step->f32()[0];
      const_beta_.assign(beta->f32(), beta->f32() + beta->count);
      constant_ = true;
    }
  }

  void Compute(const Ort::KernelContext& ctx) const {
    if (constant_) {
      ActivationInput x;
      ReadActivationInput(ctx, ref(), 0, "X", x);
      if (x.rank == 0) ref().Fail("X must have rank >= 1 (its first dim indexes beta)");
      CheckBeta(const_beta_.size(), x.dims(), x.rank);
      float* y = AllocateOutputLike(ctx, x);
      Run(ctx, const_step_, const_beta_.data(), x.data, y, x.count, size_t(x.dims()[0]));
      return;
    }
    constexpr auto kF32 = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
    const TensorView x = KernelInput(ctx, ref(), 0, "X", kF32);
    const TensorView step = KernelInput(ctx, ref(), 1, "step", kF32);
    const TensorView beta = KernelInput(ctx, ref(), 2, "beta", kF32);
    CheckStep(step.count);
    if (x.shape.empty()) ref().Fail("X must have rank >= 1 (its first dim indexes beta)");
    CheckBeta(beta.count, x.shape.data(), x.shape.size());
    float* y = AllocateOutput(ctx, x.shape);
    Run(ctx, step.f32()[0], beta.f32(), x.f32(), y, x.count, size_t(x.shape[0]));
  }

 private:
  void Run(const Ort::KernelContext& ctx, float step_v, const float* betas, const float* xs,
           float* y, size_t count, size_t N) const {
    if (count == 0) return;
    const size_t inner = count / N;
    const float lo = range_.lo, hi = range_.hi;
    const StepQuantLoop loop = PickStepQuantLoop();
    ForChunks(&ctx, count, [&](size_t begin, size_t end) {
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

  void CheckStep(size_t count) const {
    if (count != 1) ref().Fail("step has " + std::to_string(count) + " elements, expected 1");
  }

  // The message (and its shape vector) is built only on failure.
  void CheckBeta(size_t beta_count, const int64_t* x_dims, size_t x_rank) const {
    const size_t N = size_t(x_dims[0]);
    if (beta_count != N) {
      ref().Fail("beta has " + std::to_string(beta_count) + " elements, X " +
                 ShapeString(std::vector<int64_t>(x_dims, x_dims + x_rank)) + " has N = " +
                 std::to_string(N) + " samples");
    }
  }

  CodeRange range_;
  bool constant_ = false;  // step and beta are initializers
  float const_step_ = 0.0f;
  std::vector<float> const_beta_;
};

}  // namespace

const OrtCustomOp* AdaptiveStepOp() {
  static const KernelOp<AdaptiveStepKernel> op;
  return &op;
}

}  // namespace qconvert
