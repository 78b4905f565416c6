// Pow2Shift: POT / POST weight decode (docs/ops.md, "Pow2Shift").
#include <array>
#include <cmath>
#include <string>
#include <vector>

#include "attributes.h"
#include "decode_kernel.h"
#include "ops.h"
#include "packed_codes.h"

namespace qconvert {
namespace {

// mag[e] for e = 0..M: 2^-e (root 1), or 2^-(e div 2) times r = float32(sqrt(1/2))
// for odd e (root 2). Every entry is an exact float32 (2^-127 is subnormal
// but exact), so ldexp and one exact multiply produce them.
std::vector<float> MagnitudeTable(int bits, int root) {
  const int M = (1 << (bits - 1)) - 1;
  const float r = static_cast<float>(std::sqrt(0.5));
  std::vector<float> mag(size_t(M) + 1);
  for (int e = 0; e <= M; ++e) {
    mag[size_t(e)] = root == 1 ? std::ldexp(1.0f, -e)
                               : std::ldexp(1.0f, -(e / 2)) * (e % 2 == 1 ? r : 1.0f);
  }
  return mag;
}

class Pow2ShiftKernel : public DecodeKernel {
 public:
  static constexpr const char* kName = "Pow2Shift";
  static constexpr int kSinceVersion = 1;
  static constexpr std::array<ONNXTensorElementDataType, 2> kInputTypes = {
      ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT};

  Pow2ShiftKernel(const OrtKernelInfo* info, NodeRef ref)
      : DecodeKernel(info, std::move(ref), /*min_bits=*/2) {
    const int64_t root = IntAttr(info, this->ref(), "root");
    CheckAttrRange(this->ref(), "root", root, 1, 2);
    mag_ = MagnitudeTable(bits(), int(root));
    CacheIfConstant(info);
  }

 protected:
  const char* ParamName() const override { return "alpha"; }

  // Every bits-bit pattern is a valid code, so the decode is a gather from a
  // per-channel table of all 2^bits values: alpha[c] * mag[e], negated when
  // the sign bit is set (negating after the rounding equals the spec's
  // "negated" exactly), and +-0 for m = 0.
  void Decode(const Ort::KernelContext* ctx, const TensorView& codes, const TensorView& alpha,
              float* out) const override {
    CheckPackedCodes(ref(), codes, int64_t(n()), bits());
    const size_t C = size_t(shape()[0]);
    if (alpha.count != 1 && alpha.count != C) {
      ref().Fail("alpha has " + std::to_string(alpha.count) + " elements, expected 1 or C = " +
                 std::to_string(C));
    }
    const size_t codes_per_row = size_t{1} << bits();
    const unsigned M = (1u << (bits() - 1)) - 1;
    std::vector<float> values(alpha.count * codes_per_row);
    for (size_t c = 0; c < alpha.count; ++c) {
      const float a = alpha.f32()[c];
      for (size_t code = 0; code < codes_per_row; ++code) {
        const bool negative = (code >> (bits() - 1)) != 0;
        const unsigned m = unsigned(code) & M;
        const float magnitude = m == 0 ? 0.0f : a * mag_[M - m];
        values[c * codes_per_row + code] = negative ? -magnitude : magnitude;
      }
    }
    DecodeAll(ctx, ref(), codes.u8(), codes.count, bits(), values.data(), codes_per_row,
              alpha.count, n(), out);
  }

 private:
  std::vector<float> mag_;
};

}  // namespace

const OrtCustomOp* Pow2ShiftOp() {
  static const KernelOp<Pow2ShiftKernel> op;
  return &op;
}

}  // namespace qconvert
