// What QConvClamp and QDepthwiseConvClamp share: their attributes, their per-channel
// requantization constants, and the scalar requantization of their exact loops.
#pragma once

#include <onnxruntime_cxx_api.h>

#include <array>
#include <cmath>
#include <cstdint>
#include <vector>

#include "errors.h"

namespace qconvert {

constexpr int64_t kMaxConvKernel = 11;  // kernel height / width
constexpr int64_t kMaxConvStride = 4;
constexpr int64_t kMaxConvBias = int64_t{1} << 30;  // |B| below it keeps acc + B in int32

// The attributes both ops take, range-checked.
struct ConvClampAttributes {
  int64_t sh = 1, sw = 1;
  std::array<int64_t, 4> pads{};  // top, left, bottom, right
  int64_t lo = 0, hi = 255, zero_point = 0, x_zero_point = 0;

  static ConvClampAttributes Read(const OrtKernelInfo* info, const NodeRef& ref);
  // Kernel sides in 1..kMaxConvKernel, and every pad below its side.
  void CheckKernel(const NodeRef& ref, int64_t kh, int64_t kw) const;

  // clamp(round_half_even(float(int32(acc) + bias) * scale), lo - zp, hi - zp) + zp.
  uint8_t Requantize(int64_t acc, int32_t bias, float scale) const {
    float v = float(int32_t(acc) + bias) * scale;
    const float low = float(lo - zero_point), high = float(hi - zero_point);
    v = v < low ? low : v;
    v = v > high ? high : v;
    // Half to even in the default rounding mode; the sum is in [lo, hi].
    return uint8_t(int64_t(std::nearbyint(v)) + zero_point);
  }
};

// B and scale (initializers of `channels` elements, named `letter` = M or C in errors),
// zero-padded to `padded`; folded_bias = B - x_zero_point * weight_sums[c], the bias of
// loops that pad with x_zero_point and sum x * w (|that| < 2^30, so it fits int32).
struct ConvRequantization {
  std::vector<int32_t> bias, folded_bias;
  std::vector<float> scale;

  static ConvRequantization Read(const OrtKernelInfo* info, const NodeRef& ref,
                                 const char* letter, size_t padded,
                                 const std::vector<int64_t>& weight_sums,
                                 int64_t x_zero_point);
};

}  // namespace qconvert
