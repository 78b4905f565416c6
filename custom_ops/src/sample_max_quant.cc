// SampleMaxQuant: uniform quantization scaled by each sample's maximum
// (docs/ops.md, "SampleMaxQuant"). Per sample: m = max(x) (NaN if any
// element is NaN), then y = ((round(x / m * Q) / Q * m) - x) + x, every
// operation rounded to float32 in that order; m == 0 gives 0.
#include <array>
#include <cmath>
#include <string>

#include "attributes.h"
#include "inputs.h"
#include "op_shell.h"
#include "ops.h"
#include "parallel.h"

namespace qconvert {
namespace {

// The maximum of one sample, NaN when any element is NaN (as PyTorch's amax).
float SampleMax(const float* x, size_t n) {
  float m = -INFINITY;
  for (size_t i = 0; i < n; ++i) {
    const float v = x[i];
    if (v != v) return v;
    m = v > m ? v : m;
  }
  return m;
}

void QuantizeSample(const float* x, float* y, size_t n, float q) {
  const float m = SampleMax(x, n);
  if (m == 0.0f) {
    for (size_t i = 0; i < n; ++i) y[i] = 0.0f;
    return;
  }
  for (size_t i = 0; i < n; ++i) {
    const float xv = x[i];
    const float scaled = (xv / m) * q;                  // two roundings, no FMA
    const float code = std::nearbyint(scaled);          // half to even
    const float back = (code / q) * m;
    y[i] = (back - xv) + xv;  // the source's straight-through sum, rounded as it is
  }
}

class SampleMaxQuantKernel : public KernelBase {
 public:
  static constexpr const char* kName = "SampleMaxQuant";
  static constexpr int kSinceVersion = 3;  // the op set's version 3 added it
  static constexpr std::array<ONNXTensorElementDataType, 1> kInputTypes = {
      ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT};

  SampleMaxQuantKernel(const OrtKernelInfo* info, NodeRef ref) : KernelBase(std::move(ref)) {
    const CodeRange range = ReadCodeRange(info, this->ref());
    q_ = range.hi;  // Q = the code range's top: 2^(bits-1) - 1 signed, 2^bits - 1 unsigned
  }

  void Compute(const Ort::KernelContext& ctx) const {
    ActivationInput x;
    ReadActivationInput(ctx, ref(), 0, "X", x);
    if (x.rank < 1) ref().Fail("X has rank 0; it needs a batch axis");
    float* y = AllocateOutputLike(ctx, x);
    const size_t samples = size_t(x.dims()[0]);
    if (samples == 0 || x.count == 0) return;
    const size_t per_sample = x.count / samples;
    const float q = q_;
    const float* xs = x.data;
    // One task per sample (ForChunks with a chunk of one sample).
    ForChunks(&ctx, samples, [&](size_t begin, size_t end) {
      for (size_t s = begin; s < end; ++s) {
        QuantizeSample(xs + s * per_sample, y + s * per_sample, per_sample, q);
      }
    }, 1);
  }

 private:
  float q_ = 0.0f;
};

}  // namespace

const OrtCustomOp* SampleMaxQuantOp() {
  static const KernelOp<SampleMaxQuantKernel> op;
  return &op;
}

}  // namespace qconvert
