// QDepthwiseConvClamp: QConvClamp's depthwise sibling on channels-last codes, with the
// input's ceiling folded in: a uint8 Clip of X to x_hi, a depthwise uint8 x int8
// convolution with an int32 bias, and the per-channel requantization and clamp to
// [lo, hi], in one kernel and one node.
//
//   acc = sum over kh, kw of (min(X[n, oh*sh + kh - pt, ow*sw + kw - pl, c], x_hi)
//                             - x_zero_point) * W[c, 0, kh, kw]   (0 outside the image)
//   Y[n, oh, ow, c] = clamp(round_half_even(float(acc + B[c]) * scale[c]),
//                           lo - zero_point, hi - zero_point) + zero_point
//
// W, B and scale must be initializers: W is packed at session creation.
//
// AVX2: 16 channels of one pixel per vector. Per tap, 16 codes are widened to int16
// (vpmovzxbw, after a vpminub by x_hi when x_hi < 255), multiplied by the tap's 16 int16
// weights and added in int16; the sum is widened once, requantized in float and packed
// back to 16 codes. The input is read in place: x_zero_point is folded into the bias
// (B - x_zero_point * sum(W[c])), so a tap outside the image reads a row of x_zero_point
// bytes (x_zero_point <= x_hi: the ceiling leaves it alone). int16 arithmetic wraps, so
// the sum is exact whenever the final value fits int16: for codes in [0, x_hi] that is
// x_hi * (sum of W[c]'s positive taps, or of its negative taps' magnitudes) <= 32767 for
// every channel, decided at session creation. Otherwise (8-bit codes with large weights)
// each tap's product, exact in int16, is widened and summed in int32.
//
// Interior pixels of a 3x3 kernel keep a channel block's 9 weight vectors in registers
// while the row's interior columns stream by (loop order: row, block, column), two at a
// time at stride 1 or 2 so that the input columns they share are loaded once; border
// pixels and other kernels read through a per-pixel table of tap pointers. Channels past
// the last multiple of 16 are loaded in place where 16 bytes stay inside X, else copied
// through a small buffer, and stored through one: nothing is read or written beyond the
// tensors.
#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "attributes.h"
#include "conv_clamp.h"
#include "cpu.h"
#include "inputs.h"
#include "op_shell.h"
#include "ops.h"
#include "parallel.h"

#if QC_HAVE_AVX2
#include <immintrin.h>
#endif

namespace qconvert {
namespace {

constexpr int64_t kMaxTaps = kMaxConvKernel * kMaxConvKernel;
// |acc| <= 121 * 255 * 128 < 2^22 and |bias| < 2^30 (kMaxConvBias) keep acc + bias
// inside int32.
constexpr int64_t kMaxSide = int64_t{1} << 20;  // H and W
// Parallel tasks: runs of output rows holding at least this many multiply-adds each,
// or waking a thread costs more than it saves.
constexpr int64_t kTaskMacs = int64_t{1} << 21;
constexpr int64_t kBlock = 16;  // channels per AVX2 vector (int16 lanes of a ymm)

// One run's geometry, from the attributes and X's shape.
struct Geometry {
  int64_t n = 0, h = 0, w = 0;  // X: [N, H, W, C]
  int64_t oh = 0, ow = 0;       // Y's spatial size
  int64_t col0 = 0, col1 = 0;   // output columns [col0, col1) whose taps all lie inside X
};

class QDepthwiseConvClampKernel : public KernelBase {
 public:
  static constexpr const char* kName = "QDepthwiseConvClamp";
  static constexpr int kSinceVersion = 5;  // the op set's version 5 added it
  static constexpr std::array<ONNXTensorElementDataType, 4> kInputTypes = {
      ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8,
      ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT};
  static constexpr ONNXTensorElementDataType kOutputType = ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8;

  QDepthwiseConvClampKernel(const OrtKernelInfo* info, NodeRef ref)
      : KernelBase(std::move(ref)) {
    ReadAttributes(info);
    ReadWeights(info);
    q_ = ConvRequantization::Read(info, this->ref(), "C", size_t(blocks_ * kBlock), weight_sums_,
                                  attrs_.x_zero_point);
  }

  void Compute(const Ort::KernelContext& ctx) const {
    const TensorView x = KernelInput(ctx, ref(), 0, "X", ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8);
    const Geometry g = GeometryOf(x.shape);
    Ort::UnownedValue out = ctx.GetOutput(0, {g.n, g.oh, g.ow, c_});
    uint8_t* y = out.GetTensorMutableData<uint8_t>();
    // Tasks are runs of output rows (of every image) big enough to pay for a thread;
    // each writes its own rows, so the result does not depend on the split.
    const int64_t row_macs = g.ow * c_ * kh_ * kw_;
    const size_t rows_per_task = size_t(std::max<int64_t>(1, (kTaskMacs + row_macs - 1) / row_macs));
    ForChunks(&ctx, size_t(g.n * g.oh), [&](size_t first, size_t last) {
      if (!RunAvx2(g, x.u8(), y, int64_t(first), int64_t(last))) {
        RunExact(g, x.u8(), y, int64_t(first), int64_t(last));
      }
    }, rows_per_task);
  }

 private:
  void ReadAttributes(const OrtKernelInfo* info) {
    attrs_ = ConvClampAttributes::Read(info, ref());
    group_ = IntAttr(info, ref(), "group");
    x_hi_ = OptionalIntAttr(info, "x_hi", 255);
    CheckAttrRange(ref(), "x_hi", x_hi_, attrs_.x_zero_point, 255);
  }

  void ReadWeights(const OrtKernelInfo* info) {
    auto w = ConstantInput(info, ref(), 1, "W", ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8);
    if (!w) ref().Fail("input W must be a constant initializer (it is packed at session creation)");
    if (w->shape.size() != 4 || w->shape[1] != 1) {
      ref().Fail("W must be [C, 1, kH, kW], got shape " + ShapeString(w->shape));
    }
    c_ = w->shape[0];
    kh_ = w->shape[2];
    kw_ = w->shape[3];
    if (c_ < 1) ref().Fail("W has no channels: " + ShapeString(w->shape));
    if (group_ != c_) {
      ref().Fail("attribute group=" + std::to_string(group_) + " must equal C = " +
                 std::to_string(c_) + " (W's first dimension): one group per channel");
    }
    attrs_.CheckKernel(ref(), kh_, kw_);
    const int64_t taps = kh_ * kw_;
    const auto* wv = reinterpret_cast<const int8_t*>(w->data);
    // [taps][C] for the exact loop; [C/16 blocks][taps][16] int16 for the AVX2 loops.
    weights_.assign(size_t(taps * c_), 0);
    blocks_ = (c_ + kBlock - 1) / kBlock;
    packed_.assign(size_t(blocks_ * taps * kBlock), 0);
    weight_sums_.assign(size_t(c_), 0);
    int64_t widest = 0;  // largest positive (or negative) part of a channel's weights
    for (int64_t c = 0; c < c_; ++c) {
      int64_t positive = 0, negative = 0;
      for (int64_t t = 0; t < taps; ++t) {
        const int8_t v = wv[c * taps + t];
        weights_[size_t(t * c_ + c)] = v;
        packed_[size_t(((c / kBlock) * taps + t) * kBlock + c % kBlock)] = v;
        if (v > 0) positive += v;
        if (v < 0) negative -= v;
        weight_sums_[size_t(c)] += v;
      }
      widest = std::max({widest, positive, negative});
    }
    // Codes lie in [0, x_hi] (padding reads x_zero_point <= x_hi), so every channel's
    // sum lies in [-x_hi * negative, x_hi * positive].
    int16_sums_ = x_hi_ * widest <= 32767;
    pad_row_.assign(size_t(blocks_ * kBlock), uint8_t(attrs_.x_zero_point));
  }

  Geometry GeometryOf(const std::vector<int64_t>& shape) const {
    if (shape.size() != 4) ref().Fail("X must be [N, H, W, C], got shape " + ShapeString(shape));
    Geometry g;
    g.n = shape[0];
    g.h = shape[1];
    g.w = shape[2];
    if (shape[3] != c_) {
      ref().Fail("X has " + std::to_string(shape[3]) + " channels (its last dimension), W " +
                 "expects C = " + std::to_string(c_));
    }
    const int64_t padded_h = g.h + attrs_.pads[0] + attrs_.pads[2], padded_w = g.w + attrs_.pads[1] + attrs_.pads[3];
    if (g.h < 1 || g.w < 1 || padded_h < kh_ || padded_w < kw_) {
      ref().Fail("X " + ShapeString(shape) + " is smaller than the kernel " +
                 ShapeString({kh_, kw_}) + " after padding");
    }
    if (g.h > kMaxSide || g.w > kMaxSide) {
      ref().Fail("X " + ShapeString(shape) + " is larger than 2^20 in H or W");
    }
    g.oh = (padded_h - kh_) / attrs_.sh + 1;
    g.ow = (padded_w - kw_) / attrs_.sw + 1;
    // Interior columns: ow * sw - pl >= 0 and ow * sw - pl + kw <= W.
    g.col0 = std::min(g.ow, (attrs_.pads[1] + attrs_.sw - 1) / attrs_.sw);
    const int64_t last = g.w - kw_ + attrs_.pads[1];  // largest ow * sw inside
    g.col1 = last < 0 ? g.col0 : std::max(g.col0, std::min(g.ow, last / attrs_.sw + 1));
    return g;
  }

  // The exact loop: the portable build, and the AVX2 build's fallback. Output rows
  // [first, last) of the flattened [N * OH].
  void RunExact(const Geometry& g, const uint8_t* x, uint8_t* y, int64_t first,
                int64_t last) const {
    thread_local std::vector<int32_t> acc;
    acc.resize(size_t(c_));
    const auto ceiling = uint8_t(x_hi_);
    for (int64_t row = first; row < last; ++row) {
      const int64_t n = row / g.oh, oh = row % g.oh;
      for (int64_t ow = 0; ow < g.ow; ++ow) {
        std::fill(acc.begin(), acc.end(), 0);
        for (int64_t kh = 0; kh < kh_; ++kh) {
          const int64_t ih = oh * attrs_.sh + kh - attrs_.pads[0];
          if (ih < 0 || ih >= g.h) continue;
          for (int64_t kw = 0; kw < kw_; ++kw) {
            const int64_t iw = ow * attrs_.sw + kw - attrs_.pads[1];
            if (iw < 0 || iw >= g.w) continue;  // padding: x - x_zero_point = 0
            const uint8_t* px = x + ((n * g.h + ih) * g.w + iw) * c_;
            const int8_t* wt = weights_.data() + (kh * kw_ + kw) * c_;
            for (int64_t c = 0; c < c_; ++c) {
              acc[size_t(c)] += (int32_t(std::min(px[c], ceiling)) - int32_t(attrs_.x_zero_point)) *
                                int32_t(wt[c]);
            }
          }
        }
        uint8_t* out = y + (row * g.ow + ow) * c_;
        for (int64_t c = 0; c < c_; ++c) out[c] = attrs_.Requantize(acc[size_t(c)], q_.bias[size_t(c)], q_.scale[size_t(c)]);
      }
    }
  }

  bool RunAvx2(const Geometry& g, const uint8_t* x, uint8_t* y, int64_t first,
               int64_t last) const;
  template <bool kCeiling, bool kInt16>
  void RowsAvx2(const Geometry& g, const uint8_t* x, uint8_t* y, int64_t first,
                int64_t last) const;

  ConvClampAttributes attrs_;
  int64_t group_ = 0, x_hi_ = 255;
  int64_t c_ = 0, kh_ = 0, kw_ = 0, blocks_ = 0;
  bool int16_sums_ = true;            // the AVX2 sums may stay in int16 (see the header)
  std::vector<int8_t> weights_;       // W as [taps][C], for the exact loop
  std::vector<int64_t> weight_sums_;  // sum(W[c])
  std::vector<int16_t> packed_;       // W as [C/16][taps][16], zero past C
  ConvRequantization q_;  // B and scale padded to a multiple of 16 channels; the AVX2
                          // loops' bias is the folded one (they pad with x_zero_point)
  std::vector<uint8_t> pad_row_;      // x_zero_point bytes: what taps outside X read
};

#if QC_HAVE_AVX2

// The requantization's constants for one 16-channel block, and the output range.
struct BlockParams {
  __m256i bias_lo, bias_hi;  // channels 0-7, 8-15
  __m256 scale_lo, scale_hi;
};
struct OutParams {
  __m256 lo, hi;     // the clamp, relative to the zero point
  __m256i zero_point;  // int16 lanes
  __m128i ceiling;     // x_hi in every byte
};

QC_TARGET_AVX2 inline BlockParams LoadBlock(const int32_t* bias, const float* scale) {
  return {_mm256_loadu_si256(reinterpret_cast<const __m256i*>(bias)),
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bias + 8)),
          _mm256_loadu_ps(scale), _mm256_loadu_ps(scale + 8)};
}

// The running sums of one 16-channel block: in int16 (s16), or widened per tap to int32
// (lo: channels 0-7, hi: 8-15).
struct Sums {
  __m256i s16, lo, hi;
};

QC_TARGET_AVX2 inline Sums ZeroSums() {
  const __m256i z = _mm256_setzero_si256();
  return {z, z, z};
}

// 16 codes as int16, after the ceiling.
template <bool kCeiling>
QC_TARGET_AVX2 inline __m256i Widen(__m128i codes, const OutParams& o) {
  if (kCeiling) codes = _mm_min_epu8(codes, o.ceiling);
  return _mm256_cvtepu8_epi16(codes);
}

template <bool kInt16>
QC_TARGET_AVX2 inline void AddProduct(Sums& s, __m256i x, __m256i w) {
  // |x * w| <= 255 * 128: exact in int16 (w = -128 only reaches 32640).
  const __m256i product = _mm256_mullo_epi16(x, w);
  if (kInt16) {
    s.s16 = _mm256_add_epi16(s.s16, product);
  } else {
    s.lo = _mm256_add_epi32(s.lo, _mm256_cvtepi16_epi32(_mm256_castsi256_si128(product)));
    s.hi = _mm256_add_epi32(s.hi, _mm256_cvtepi16_epi32(_mm256_extracti128_si256(product, 1)));
  }
}

template <bool kCeiling, bool kInt16>
QC_TARGET_AVX2 inline void AddTap(Sums& s, __m128i codes, __m256i w, const OutParams& o) {
  AddProduct<kInt16>(s, Widen<kCeiling>(codes, o), w);
}

// 16 output codes: float(sum + bias) * scale, clamped, rounded half to even (the default
// MXCSR mode), zero point added, packed to bytes in channel order.
template <bool kInt16>
QC_TARGET_AVX2 inline __m128i Requantize16(const Sums& s, const BlockParams& b,
                                           const OutParams& o) {
  __m256i lo = s.lo, hi = s.hi;
  if (kInt16) {
    lo = _mm256_cvtepi16_epi32(_mm256_castsi256_si128(s.s16));
    hi = _mm256_cvtepi16_epi32(_mm256_extracti128_si256(s.s16, 1));
  }
  __m256 f0 = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(lo, b.bias_lo)), b.scale_lo);
  __m256 f1 = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(hi, b.bias_hi)), b.scale_hi);
  f0 = _mm256_min_ps(_mm256_max_ps(f0, o.lo), o.hi);
  f1 = _mm256_min_ps(_mm256_max_ps(f1, o.lo), o.hi);
  // int16 lanes [0-3, 8-11 | 4-7, 12-15]; values in [-255, 255] before the zero point.
  __m256i v = _mm256_packs_epi32(_mm256_cvtps_epi32(f0), _mm256_cvtps_epi32(f1));
  v = _mm256_add_epi16(v, o.zero_point);
  v = _mm256_permute4x64_epi64(v, 0xD8);    // [0-3, 4-7 | 8-11, 12-15]
  v = _mm256_packus_epi16(v, v);            // bytes [0-7, 0-7 | 8-15, 8-15]
  v = _mm256_permute4x64_epi64(v, 0x08);    // bytes 0-15 in the low half
  return _mm256_castsi256_si128(v);
}

QC_TARGET_AVX2 inline __m128i Load16(const uint8_t* p) {
  return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
}

// One pixel's full block of 16 channels, taps read through `at` (each already offset to
// the block).
template <bool kCeiling, bool kInt16>
QC_TARGET_AVX2 inline __m128i PixelBlock(const uint8_t* const* at, int64_t taps, int64_t offset,
                                         const __m256i* w, const BlockParams& b,
                                         const OutParams& o) {
  Sums s = ZeroSums();
  for (int64_t t = 0; t < taps; ++t) {
    AddTap<kCeiling, kInt16>(s, Load16(at[t] + offset), _mm256_loadu_si256(w + t), o);
  }
  return Requantize16<kInt16>(s, b, o);
}

// A 3x3 kernel's interior columns of one row, one full block: the block's 9 weight
// vectors stay in registers. `src` is the first column's top-left tap, `offsets` the
// taps' byte offsets, `step` the bytes between output columns' taps (stride * c). With
// kStride = the stride, 1 or 2, columns go in pairs that share their input columns, each
// loaded and clamped once (12 loads for 18 taps at stride 1); kStride = 0 takes them one
// by one, at any stride.
template <bool kCeiling, bool kInt16, int kStride>
QC_TARGET_AVX2 void Interior3x3Block(const uint8_t* src, const int64_t* offsets, int64_t step,
                                     int64_t columns, int64_t c, const __m256i* wp,
                                     const BlockParams& b, const OutParams& o, uint8_t* dst) {
  __m256i w[9];
  #pragma GCC unroll 9
  for (int t = 0; t < 9; ++t) w[t] = _mm256_loadu_si256(wp + t);
  int64_t col = 0;
  for (; kStride > 0 && col + 2 <= columns; col += 2, src += 2 * step, dst += 2 * c) {
    Sums s0 = ZeroSums(), s1 = ZeroSums();
    #pragma GCC unroll 3
    for (int i = 0; i < 3; ++i) {
      const uint8_t* row = src + offsets[3 * i];
      #pragma GCC unroll 5
      for (int q = 0; q < kStride + 3; ++q) {  // input columns under the pair
        const __m256i x = Widen<kCeiling>(Load16(row + q * c), o);
        if (q < 3) AddProduct<kInt16>(s0, x, w[3 * i + q]);
        if (q >= kStride && q < kStride + 3) AddProduct<kInt16>(s1, x, w[3 * i + q - kStride]);
      }
    }
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), Requantize16<kInt16>(s0, b, o));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + c), Requantize16<kInt16>(s1, b, o));
  }
  for (; col < columns; ++col, src += step, dst += c) {
    Sums s = ZeroSums();
    #pragma GCC unroll 9
    for (int t = 0; t < 9; ++t) AddTap<kCeiling, kInt16>(s, Load16(src + offsets[t]), w[t], o);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), Requantize16<kInt16>(s, b, o));
  }
}

// What the per-pixel loops of one run read: the taps' pointers of the current pixel and
// the packed constants.
struct PixelArgs {
  const uint8_t* at[kMaxTaps];  // each tap's pixel (or the padding row)
  int64_t taps = 0, full = 0, tail = 0;  // full blocks of 16 channels, channels after them
  const __m256i* w = nullptr;            // [blocks][taps] weight vectors
  const int32_t* bias = nullptr;
  const float* scale = nullptr;
  const uint8_t* pad = nullptr;  // the padding row
  uintptr_t x_end = 0;           // X's end: a 16-byte load must stop there
};

// The last C % 16 channels of one pixel: 16 bytes are loaded in place while they stay
// inside X (lanes past C meet zero weights), else the channels are copied out first;
// the codes are stored through a buffer.
template <bool kCeiling, bool kInt16>
QC_TARGET_AVX2 void TailBlock(const PixelArgs& a, const OutParams& o, uint8_t* out) {
  const int64_t offset = a.full * kBlock;
  const __m256i* w = a.w + a.full * a.taps;
  Sums s = ZeroSums();
  for (int64_t t = 0; t < a.taps; ++t) {
    const uint8_t* p = a.at[t] + offset;
    __m128i codes;
    if (a.at[t] == a.pad || uintptr_t(p) + kBlock <= a.x_end) {
      codes = Load16(p);
    } else {
      alignas(16) uint8_t copy[kBlock] = {};
      std::memcpy(copy, p, size_t(a.tail));
      codes = _mm_load_si128(reinterpret_cast<const __m128i*>(copy));
    }
    AddTap<kCeiling, kInt16>(s, codes, _mm256_loadu_si256(w + t), o);
  }
  alignas(16) uint8_t codes_out[kBlock];
  _mm_store_si128(reinterpret_cast<__m128i*>(codes_out),
                  Requantize16<kInt16>(s, LoadBlock(a.bias + offset, a.scale + offset), o));
  std::memcpy(out + offset, codes_out, size_t(a.tail));
}

// One pixel's channel blocks from `first_block` on, its taps read through a.at.
template <bool kCeiling, bool kInt16>
QC_TARGET_AVX2 void Pixel(const PixelArgs& a, const OutParams& o, int64_t first_block,
                          uint8_t* out) {
  for (int64_t blk = first_block; blk < a.full; ++blk) {
    const BlockParams b = LoadBlock(a.bias + blk * kBlock, a.scale + blk * kBlock);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + blk * kBlock),
                     PixelBlock<kCeiling, kInt16>(a.at, a.taps, blk * kBlock, a.w + blk * a.taps,
                                                  b, o));
  }
  if (a.tail > 0) TailBlock<kCeiling, kInt16>(a, o, out);
}

template <bool kCeiling, bool kInt16>
QC_TARGET_AVX2 void QDepthwiseConvClampKernel::RowsAvx2(const Geometry& g, const uint8_t* x,
                                                       uint8_t* y, int64_t first,
                                                       int64_t last) const {
  PixelArgs a;
  a.taps = kh_ * kw_;
  a.full = c_ / kBlock;
  a.tail = c_ % kBlock;
  a.w = reinterpret_cast<const __m256i*>(packed_.data());
  a.bias = q_.folded_bias.data();
  a.scale = q_.scale.data();
  a.pad = pad_row_.data();
  a.x_end = uintptr_t(x + g.n * g.h * g.w * c_);
  const OutParams o = {_mm256_set1_ps(float(attrs_.lo - attrs_.zero_point)),
                       _mm256_set1_ps(float(attrs_.hi - attrs_.zero_point)),
                       _mm256_set1_epi16(int16_t(attrs_.zero_point)),
                       _mm_set1_epi8(char(uint8_t(x_hi_)))};
  int64_t offsets[kMaxTaps];  // bytes from a pixel's top-left tap to each tap
  for (int64_t kh = 0; kh < kh_; ++kh) {
    for (int64_t kw = 0; kw < kw_; ++kw) offsets[kh * kw_ + kw] = (kh * g.w + kw) * c_;
  }
  for (int64_t row = first; row < last; ++row) {
    const int64_t ih0 = row % g.oh * attrs_.sh - attrs_.pads[0];
    const uint8_t* image = x + row / g.oh * g.h * g.w * c_;
    uint8_t* out_row = y + row * g.ow * c_;
    const bool row_inside = ih0 >= 0 && ih0 + kh_ <= g.h;
    const int64_t col0 = row_inside ? g.col0 : g.ow, col1 = row_inside ? g.col1 : g.ow;
    for (int64_t col = 0; col < g.ow; ++col) {
      if (col == col0) col = col1;  // the interior columns come below
      if (col == g.ow) break;
      for (int64_t kh = 0; kh < kh_; ++kh) {
        const int64_t ih = ih0 + kh;
        for (int64_t kw = 0; kw < kw_; ++kw) {
          const int64_t iw = col * attrs_.sw + kw - attrs_.pads[1];
          a.at[kh * kw_ + kw] = ih < 0 || ih >= g.h || iw < 0 || iw >= g.w
                                    ? a.pad
                                    : image + (ih * g.w + iw) * c_;
        }
      }
      Pixel<kCeiling, kInt16>(a, o, 0, out_row + col * c_);
    }
    if (col1 == col0) continue;
    const uint8_t* base = image + (ih0 * g.w + col0 * attrs_.sw - attrs_.pads[1]) * c_;
    const bool streamed = a.taps == 9;
    if (streamed) {
      for (int64_t blk = 0; blk < a.full; ++blk) {
        const BlockParams b = LoadBlock(a.bias + blk * kBlock, a.scale + blk * kBlock);
        // The pairs read the stride from their template: 1 and 2 are MobileNet's.
        auto interior = attrs_.sw == 1   ? Interior3x3Block<kCeiling, kInt16, 1>
                        : attrs_.sw == 2 ? Interior3x3Block<kCeiling, kInt16, 2>
                                   : Interior3x3Block<kCeiling, kInt16, 0>;
        interior(base + blk * kBlock, offsets, attrs_.sw * c_, col1 - col0, c_, a.w + blk * a.taps, b,
                 o, out_row + col0 * c_ + blk * kBlock);
      }
      if (a.tail == 0) continue;
    }
    for (int64_t col = col0; col < col1; ++col) {
      const uint8_t* top_left = base + (col - col0) * attrs_.sw * c_;
      for (int64_t t = 0; t < a.taps; ++t) a.at[t] = top_left + offsets[t];
      Pixel<kCeiling, kInt16>(a, o, streamed ? a.full : 0, out_row + col * c_);
    }
  }
}

bool QDepthwiseConvClampKernel::RunAvx2(const Geometry& g, const uint8_t* x, uint8_t* y,
                                        int64_t first, int64_t last) const {
  if (!UseAvx2()) return false;
  const bool ceiling = x_hi_ < 255;
  if (ceiling && int16_sums_) RowsAvx2<true, true>(g, x, y, first, last);
  if (ceiling && !int16_sums_) RowsAvx2<true, false>(g, x, y, first, last);
  if (!ceiling && int16_sums_) RowsAvx2<false, true>(g, x, y, first, last);
  if (!ceiling && !int16_sums_) RowsAvx2<false, false>(g, x, y, first, last);
  return true;
}

#else

bool QDepthwiseConvClampKernel::RunAvx2(const Geometry&, const uint8_t*, uint8_t*, int64_t,
                                        int64_t) const {
  return false;
}

#endif

}  // namespace

const OrtCustomOp* QDepthwiseConvClampOp() {
  static const KernelOp<QDepthwiseConvClampKernel> op;
  return &op;
}

}  // namespace qconvert
