// The shared base of the weight-decode ops (LutGather, Pow2Shift).
#pragma once

#include <onnxruntime_cxx_api.h>

#include <cstddef>
#include <cstdint>
#include <vector>

#include "inputs.h"
#include "op_shell.h"

namespace qconvert {

// `bits` and `shape` attributes, and a decode-once cache. When both inputs
// are constant initializers the weights are decoded at session creation and
// each run only copies them out: ORT never constant-folds a custom-domain
// node itself.
class DecodeKernel : public KernelBase {
 public:
  DecodeKernel(const OrtKernelInfo* info, NodeRef ref, int min_bits);
  void Compute(const Ort::KernelContext& ctx) const;
  bool cached() const { return cached_; }

 protected:
  // Call at the end of the derived constructor (Decode is virtual).
  void CacheIfConstant(const OrtKernelInfo* info);
  // Checks `codes` and the op's second input, then writes n() floats.
  virtual void Decode(const Ort::KernelContext* ctx, const TensorView& codes,
                      const TensorView& param, float* out) const = 0;
  virtual const char* ParamName() const = 0;

  int bits() const { return bits_; }
  const std::vector<int64_t>& shape() const { return shape_; }
  size_t n() const { return size_t(n_); }

 private:
  int bits_ = 0;
  std::vector<int64_t> shape_;
  int64_t n_ = 0;
  bool cached_ = false;
  std::vector<float> cache_;
};

}  // namespace qconvert
