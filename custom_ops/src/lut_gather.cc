// LutGather: table decode of packed codes (docs/ops.md, "LutGather").
#include <array>
#include <string>

#include "decode_kernel.h"
#include "ops.h"
#include "packed_codes.h"

namespace qconvert {
namespace {

class LutGatherKernel : public DecodeKernel {
 public:
  static constexpr const char* kName = "LutGather";
  static constexpr int kSinceVersion = 1;
  static constexpr std::array<ONNXTensorElementDataType, 2> kInputTypes = {
      ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT};

  LutGatherKernel(const OrtKernelInfo* info, NodeRef ref)
      : DecodeKernel(info, std::move(ref), /*min_bits=*/1) {
    CacheIfConstant(info);
  }

 protected:
  const char* ParamName() const override { return "table"; }

  void Decode(const Ort::KernelContext* ctx, const TensorView& codes, const TensorView& table,
              float* out) const override {
    CheckPackedCodes(ref(), codes, int64_t(n()), bits());
    const size_t rank = table.shape.size();
    if (rank != 1 && rank != 2) {
      ref().Fail("table must be [L] or [C, L], got shape " + ShapeString(table.shape));
    }
    const size_t L = size_t(table.shape.back());
    const size_t rows = rank == 2 ? size_t(table.shape[0]) : 1;
    if (L > (size_t{1} << bits())) {
      ref().Fail("table has L = " + std::to_string(L) + " levels, more than 2^bits = " +
                 std::to_string(1 << bits()));
    }
    if (rank == 2 && table.shape[0] != shape()[0]) {
      ref().Fail("table " + ShapeString(table.shape) + " has " + std::to_string(rows) +
                 " rows, the output shape " + ShapeString(shape()) + " has C = " +
                 std::to_string(shape()[0]) + " channels");
    }
    DecodeAll(ctx, ref(), codes.u8(), codes.count, bits(), table.f32(), L, rows, n(), out);
  }
};

}  // namespace

const OrtCustomOp* LutGatherOp() {
  static const KernelOp<LutGatherKernel> op;
  return &op;
}

}  // namespace qconvert
