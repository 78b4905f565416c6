// UniformQuant: the LSQ activation quantizer (docs/ops.md, "UniformQuant"),
// one per-tensor step: y = clamp(round(x / step), lo, hi) * step.
#include <array>
#include <string>

#include "attributes.h"
#include "inputs.h"
#include "op_shell.h"
#include "ops.h"
#include "parallel.h"
#include "step_quant.h"

namespace qconvert {
namespace {

class UniformQuantKernel : public KernelBase {
 public:
  static constexpr const char* kName = "UniformQuant";
  static constexpr int kSinceVersion = 2;  // the op set's version 2 added it
  static constexpr std::array<ONNXTensorElementDataType, 2> kInputTypes = {
      ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT};

  UniformQuantKernel(const OrtKernelInfo* info, NodeRef ref) : KernelBase(std::move(ref)) {
    range_ = ReadCodeRange(info, this->ref());
    auto step = ConstantInput(info, this->ref(), 1, "step", ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT);
    if (step) {
      // A constant step is checked once; a run then reads X only.
      CheckStep(step->count);
      const_step_ = step->f32()[0];
      constant_ = true;
    }
  }

  void Compute(const Ort::KernelContext& ctx) const {
    if (constant_) {
      ActivationInput x;
      ReadActivationInput(ctx, ref(), 0, "X", x);
      float* y = AllocateOutputLike(ctx, x);
      Run(ctx, const_step_, x.data, y, x.count);
      return;
    }
    constexpr auto kF32 = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
    const TensorView x = KernelInput(ctx, ref(), 0, "X", kF32);
    const TensorView step = KernelInput(ctx, ref(), 1, "step", kF32);
    CheckStep(step.count);
    float* y = AllocateOutput(ctx, x.shape);
    Run(ctx, step.f32()[0], x.f32(), y, x.count);
  }

 private:
  void Run(const Ort::KernelContext& ctx, float step, const float* x, float* y,
           size_t count) const {
    const float lo = range_.lo, hi = range_.hi;
    const StepQuantLoop loop = PickStepQuantLoop();
    ForChunks(&ctx, count, [&](size_t begin, size_t end) {
      loop(step, lo, hi, x + begin, y + begin, end - begin);
    });
  }

  void CheckStep(size_t count) const {
    if (count != 1) ref().Fail("step has " + std::to_string(count) + " elements, expected 1");
  }

  CodeRange range_;
  bool constant_ = false;  // step is an initializer
  float const_step_ = 0.0f;
};

}  // namespace

const OrtCustomOp* UniformQuantOp() {
  static const KernelOp<UniformQuantKernel> op;
  return &op;
}

}  // namespace qconvert
