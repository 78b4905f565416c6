// QConvClamp: a uint8 x int8 convolution with an int32 bias, requantized per output
// channel to uint8 and clamped to [lo, hi] in the same pass: the work of ONNX
// Runtime's QLinearConv (int8 weights with zero point 0) followed by a uint8 Clip, in
// one kernel and one node.
//
//   acc = sum over c, kh, kw of (X[n, c, oh*sh + kh - pt, ow*sw + kw - pl] - x_zero_point)
//                               * W[m, c, kh, kw]          (X - x_zero_point = 0 outside)
//   Y[n, m, oh, ow] = clamp(round_half_even(float(acc + B[m]) * scale[m]),
//                           lo - zero_point, hi - zero_point) + zero_point
//
// scale[m] is ORT's own multiplier, float32(x_scale * w_scale[m]) / y_scale, so the
// result is QLinearConv + Clip's to the bit whenever MLAS's int16 pair sums do not
// saturate (what integer export guarantees). W, B and scale must be initializers: W is
// packed at session creation.
//
// AVX2: the input is rewritten once per run into words of 4 consecutive channels of one
// pixel, padded with x_zero_point ([C/4][rows][column phase][columns / stride]), so a
// (4-channel group, kh, kw) tap is one vpmaddubsw against 4 weight bytes, its int16 pair
// sums added in int16 (qconv_tiles.cc). Rows whose width is a multiple of 8 keep 8
// positions of one channel in the lanes (one unaligned load per tap); narrower rows keep
// 8 channels of one position (a 4-byte broadcast per tap), so no lane idles. The int16
// sums are widened (vpmaddwd by 1) every T taps, T chosen per run from the largest input
// code and the largest weight magnitude so that none can overflow:
// T * 2 * max_x * max|w| <= 32767. With 4-bit codes (max_x 15, |w| <= 8) T = 136 taps
// of 4 channels, i.e. a 3x3x60 reduction; ResNet-20's 3x3x64 widens twice. When one tap
// could reach the int16 range (2 * max_x * max|w| > 32767, 8-bit codes with |w| > 64)
// the exact int32 loop (also the portable build) runs instead.
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
#include "qconv_tiles.h"

#if QC_HAVE_AVX2
#include <immintrin.h>
#endif

namespace qconvert {
namespace {

// Reduction length bound: |acc| <= K * 255 * 128 < 2^30 and |bias| < 2^30
// (kMaxConvBias) keep acc + bias inside int32.
constexpr int64_t kMaxReduction = int64_t{1} << 15;
// Scratch bound: 64 MiB of input words (and at most 2^24 output positions' offsets).
constexpr int64_t kMaxBufferWords = int64_t{1} << 24;
// Parallel tasks: at least this many multiply-adds each, or waking a thread costs more
// than it saves; at most this many per image; runs of positions a multiple of the
// largest tile (4 runs).
constexpr int64_t kTaskMacs = int64_t{1} << 21;
constexpr int64_t kMaxTasksPerImage = 8;
constexpr size_t kRunsPerTask = 4;

// One run's geometry, from the attributes and X's shape.
struct Geometry {
  int64_t n = 0, c = 0, h = 0, w = 0;  // X
  int64_t oh = 0, ow = 0;              // Y's spatial size
  int64_t cq = 0;                      // channel groups of 4
  int64_t rows = 0, jp = 0, plane = 0; // padded rows, words per phase row, words per group
};

class QConvClampKernel : public KernelBase {
 public:
  static constexpr const char* kName = "QConvClamp";
  static constexpr int kSinceVersion = 4;  // the op set's version 4 added it
  static constexpr std::array<ONNXTensorElementDataType, 4> kInputTypes = {
      ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8,
      ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT};
  static constexpr ONNXTensorElementDataType kOutputType = ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8;

  QConvClampKernel(const OrtKernelInfo* info, NodeRef ref) : KernelBase(std::move(ref)) {
    attrs_ = ConvClampAttributes::Read(info, this->ref());
    ReadWeights(info);
    q_ = ConvRequantization::Read(info, this->ref(), "M", size_t((m_ + kLanes - 1) / kLanes * kLanes),
                                  weight_sums_, attrs_.x_zero_point);
  }

  void Compute(const Ort::KernelContext& ctx) const {
    const TensorView x = KernelInput(ctx, ref(), 0, "X", ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8);
    const Geometry g = GeometryOf(x.shape);
    Ort::UnownedValue out = ctx.GetOutput(0, {g.n, m_, g.oh, g.ow});
    uint8_t* y = out.GetTensorMutableData<uint8_t>();
    const size_t image = size_t(g.c * g.h * g.w);
    const size_t out_image = size_t(m_ * g.oh * g.ow);
    // On ORT's intra-op threads when the work pays for waking them: several images one
    // per task, or one image's output positions split into tasks.
    const int64_t image_macs = m_ * g.oh * g.ow * g.c * kh_ * kw_;
    const bool per_image = g.n > 1 && image_macs * g.n >= 2 * kTaskMacs;
    const int64_t tasks = per_image ? 1 : std::clamp<int64_t>(image_macs / kTaskMacs, 1,
                                                               kMaxTasksPerImage);
    ForChunks(per_image ? &ctx : nullptr, size_t(g.n), [&](size_t begin, size_t end) {
      for (size_t n = begin; n < end; ++n) {
        const uint8_t* xn = x.u8() + n * image;
        uint8_t* yn = y + n * out_image;
        if (!RunAvx2(g, xn, yn, tasks > 1 ? &ctx : nullptr, tasks)) RunExact(g, xn, yn);
      }
    }, 1);
  }

 private:
  void ReadWeights(const OrtKernelInfo* info) {
    auto w = ConstantInput(info, ref(), 1, "W", ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8);
    if (!w) ref().Fail("input W must be a constant initializer (it is packed at session creation)");
    if (w->shape.size() != 4) {
      ref().Fail("W must be [M, C, kH, kW], got shape " + ShapeString(w->shape));
    }
    m_ = w->shape[0];
    c_ = w->shape[1];
    kh_ = w->shape[2];
    kw_ = w->shape[3];
    if (m_ < 1 || c_ < 1) ref().Fail("W has an empty dimension: " + ShapeString(w->shape));
    attrs_.CheckKernel(ref(), kh_, kw_);
    if (c_ * kh_ * kw_ > kMaxReduction) {
      ref().Fail("C * kH * kW = " + std::to_string(c_ * kh_ * kw_) + " exceeds " +
                 std::to_string(kMaxReduction));
    }
    if (m_ > kMaxReduction) ref().Fail("W has more than 32768 output channels");
    weights_.assign(w->u8(), w->u8() + w->count);
    weight_sums_.assign(size_t(m_), 0);
    // Packed: [ceil(M/4)][ceil(C/4) * kH * kW taps][4 channels][4 input channels].
    const int64_t cq = (c_ + 3) / 4, blocks = (m_ + kBlock - 1) / kBlock;
    taps_ = cq * kh_ * kw_;
    packed_.assign(size_t(blocks * taps_ * kBlock), 0);
    const int64_t wide_blocks = (m_ + kLanes - 1) / kLanes;
    packed_wide_.assign(size_t(wide_blocks * taps_ * kLanes), 0);
    const auto* wv = reinterpret_cast<const int8_t*>(w->data);
    for (int64_t m = 0; m < m_; ++m) {
      for (int64_t c = 0; c < c_; ++c) {
        for (int64_t kh = 0; kh < kh_; ++kh) {
          for (int64_t kw = 0; kw < kw_; ++kw) {
            const int8_t v = wv[((m * c_ + c) * kh_ + kh) * kw_ + kw];
            const int64_t tap = ((c / 4) * kh_ + kh) * kw_ + kw;
            const size_t word = size_t(((m / kBlock) * taps_ + tap) * kBlock + m % kBlock);
            uint32_t bits = uint32_t(uint8_t(v)) << (8 * (c % 4));
            packed_[word] |= bits;
            packed_wide_[size_t(((m / kLanes) * taps_ + tap) * kLanes + m % kLanes)] |= bits;
            max_weight_ = std::max<int64_t>(max_weight_, v < 0 ? -int64_t(v) : int64_t(v));
            weight_sums_[size_t(m)] += v;
          }
        }
      }
    }
  }

  Geometry GeometryOf(const std::vector<int64_t>& shape) const {
    if (shape.size() != 4) ref().Fail("X must be [N, C, H, W], got shape " + ShapeString(shape));
    Geometry g;
    g.n = shape[0];
    g.c = shape[1];
    g.h = shape[2];
    g.w = shape[3];
    if (g.c != c_) {
      ref().Fail("X has " + std::to_string(g.c) + " channels, W expects C = " + std::to_string(c_));
    }
    const int64_t padded_h = g.h + attrs_.pads[0] + attrs_.pads[2], padded_w = g.w + attrs_.pads[1] + attrs_.pads[3];
    if (g.h < 1 || g.w < 1 || padded_h < kh_ || padded_w < kw_) {
      ref().Fail("X " + ShapeString(shape) + " is smaller than the kernel " +
                 ShapeString({kh_, kw_}) + " after padding");
    }
    if (g.h > (int64_t{1} << 20) || g.w > (int64_t{1} << 20)) {
      ref().Fail("X " + ShapeString(shape) + " is larger than 2^20 in H or W");
    }
    g.oh = (padded_h - kh_) / attrs_.sh + 1;
    g.ow = (padded_w - kw_) / attrs_.sw + 1;
    g.cq = (g.c + 3) / 4;
    g.rows = padded_h;
    g.jp = (padded_w + attrs_.sw - 1) / attrs_.sw;
    g.plane = g.rows * attrs_.sw * g.jp;
    if (g.cq * g.plane > kMaxBufferWords) {
      ref().Fail("X " + ShapeString(shape) + " needs a scratch buffer above 64 MiB");
    }
    return g;
  }

  // The word offset of each tap relative to an output position's base.
  std::vector<int64_t> TapOffsets(const Geometry& g) const {
    std::vector<int64_t> offsets(static_cast<size_t>(taps_));
    for (int64_t q = 0; q < g.cq; ++q) {
      for (int64_t kh = 0; kh < kh_; ++kh) {
        for (int64_t kw = 0; kw < kw_; ++kw) {
          offsets[size_t((q * kh_ + kh) * kw_ + kw)] =
              q * g.plane + (kh * attrs_.sw + kw % attrs_.sw) * g.jp + kw / attrs_.sw;
        }
      }
    }
    return offsets;
  }

  // Output runs of `step` positions along a row (8: one vector of position lanes; 1:
  // one position for channel lanes): where tap 0 reads in the words buffer, and where
  // the run starts in an output plane.
  void Runs(const Geometry& g, int64_t step, std::vector<int64_t>& bases,
            std::vector<int64_t>& dst) const {
    bases.clear();
    dst.clear();
    for (int64_t oh = 0; oh < g.oh; ++oh) {
      for (int64_t ow = 0; ow < g.ow; ow += step) {
        bases.push_back(oh * attrs_.sh * attrs_.sw * g.jp + ow);
        dst.push_back(oh * g.ow + ow);
      }
    }
  }

  // Taps summed in int16 before widening; 0 when one tap could overflow int16.
  int64_t Int16Run(int64_t max_x) const {
    const int64_t pair = 2 * max_x * max_weight_;
    return pair == 0 ? taps_ : std::min(taps_, 32767 / pair);
  }

  // The exact int32 loop: the portable build, and the AVX2 build's fallback.
  void RunExact(const Geometry& g, const uint8_t* x, uint8_t* y) const {
    const auto* w = reinterpret_cast<const int8_t*>(weights_.data());
    for (int64_t m = 0; m < m_; ++m) {
      for (int64_t oh = 0; oh < g.oh; ++oh) {
        for (int64_t ow = 0; ow < g.ow; ++ow) {
          int64_t acc = 0;
          for (int64_t c = 0; c < c_; ++c) {
            for (int64_t kh = 0; kh < kh_; ++kh) {
              const int64_t ih = oh * attrs_.sh + kh - attrs_.pads[0];
              if (ih < 0 || ih >= g.h) continue;
              for (int64_t kw = 0; kw < kw_; ++kw) {
                const int64_t iw = ow * attrs_.sw + kw - attrs_.pads[1];
                if (iw < 0 || iw >= g.w) continue;  // padding: x = x_zero_point
                acc += (int64_t(x[(c * g.h + ih) * g.w + iw]) - attrs_.x_zero_point) *
                       int64_t(w[((m * c_ + c) * kh_ + kh) * kw_ + kw]);
              }
            }
          }
          y[(m * g.oh + oh) * g.ow + ow] = attrs_.Requantize(acc, q_.bias[size_t(m)], q_.scale[size_t(m)]);
        }
      }
    }
  }

  bool RunAvx2(const Geometry& g, const uint8_t* x, uint8_t* y,
               const Ort::KernelContext* pool, int64_t tasks) const;

  ConvClampAttributes attrs_;
  int64_t m_ = 0, c_ = 0, kh_ = 0, kw_ = 0, taps_ = 0, max_weight_ = 0;
  std::vector<uint8_t> weights_;   // W as given, for the exact loop
  std::vector<uint32_t> packed_;       // W for position lanes: [M/4][taps][4 channels]
  std::vector<uint32_t> packed_wide_;  // W for channel lanes: [M/8][taps][8 channels]
  std::vector<int64_t> weight_sums_;  // sum(W[m])
  ConvRequantization q_;  // B and scale padded to a multiple of 8 channels; the AVX2 loop's
                          // bias is the folded one (it pads with x_zero_point)
};

#if QC_HAVE_AVX2

// X's image rewritten as [C/4][rows][phase][jp] words of 4 channels (the buffer arrives
// filled with the padding value). Returns the largest code.
QC_TARGET_AVX2 int64_t FillWords(const Geometry& g, int64_t pt, int64_t pl, int64_t sh,
                                 int64_t sw, int64_t kh, int64_t kw, const uint8_t* x,
                                 uint32_t* buf) {
  thread_local std::vector<uint8_t> row_read;  // rows some tap reads (kernel < stride skips)
  row_read.resize(size_t(g.h));
  for (int64_t ih = 0; ih < g.h; ++ih) row_read[size_t(ih)] = (ih + pt) % sh < kh;
  thread_local std::vector<uint32_t> row;
  thread_local std::vector<uint8_t> zeros;
  row.resize(size_t(g.w));
  zeros.assign(size_t(g.w), 0);
  // The max of every code is needed (the int16 run); the words only where a tap reads
  // them: a kernel smaller than the stride skips rows and column phases.
  // Per column phase: the first input column it takes and where that column lands.
  const int64_t phases = std::min(sw, kw);
  int64_t first[kMaxConvStride], offset[kMaxConvStride];
  for (int64_t ph = 0; ph < phases; ++ph) {
    first[ph] = ((ph - pl) % sw + sw) % sw;
    offset[ph] = ph * g.jp + (first[ph] + pl) / sw;
  }
  __m128i top = _mm_setzero_si128();
  uint8_t top_tail = 0;
  for (int64_t q = 0; q < g.cq; ++q) {
    for (int64_t ih = 0; ih < g.h; ++ih) {
      const uint8_t* r[4];
      for (int64_t i = 0; i < 4; ++i) {
        const int64_t c = 4 * q + i;
        r[i] = c < g.c ? x + (c * g.h + ih) * g.w : zeros.data();
      }
      int64_t iw = 0;
      for (; iw + 16 <= g.w; iw += 16) {
        const __m128i r0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(r[0] + iw));
        const __m128i r1 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(r[1] + iw));
        const __m128i r2 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(r[2] + iw));
        const __m128i r3 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(r[3] + iw));
        top = _mm_max_epu8(top, _mm_max_epu8(_mm_max_epu8(r0, r1), _mm_max_epu8(r2, r3)));
        const __m128i a = _mm_unpacklo_epi8(r0, r1), b = _mm_unpackhi_epi8(r0, r1);
        const __m128i c = _mm_unpacklo_epi8(r2, r3), d = _mm_unpackhi_epi8(r2, r3);
        auto* out = reinterpret_cast<__m128i*>(row.data() + iw);
        _mm_storeu_si128(out + 0, _mm_unpacklo_epi16(a, c));
        _mm_storeu_si128(out + 1, _mm_unpackhi_epi16(a, c));
        _mm_storeu_si128(out + 2, _mm_unpacklo_epi16(b, d));
        _mm_storeu_si128(out + 3, _mm_unpackhi_epi16(b, d));
      }
      for (; iw + 8 <= g.w; iw += 8) {
        const __m128i r0 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(r[0] + iw));
        const __m128i r1 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(r[1] + iw));
        const __m128i r2 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(r[2] + iw));
        const __m128i r3 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(r[3] + iw));
        top = _mm_max_epu8(top, _mm_max_epu8(_mm_max_epu8(r0, r1), _mm_max_epu8(r2, r3)));
        const __m128i a = _mm_unpacklo_epi8(r0, r1), c = _mm_unpacklo_epi8(r2, r3);
        auto* out = reinterpret_cast<__m128i*>(row.data() + iw);
        _mm_storeu_si128(out + 0, _mm_unpacklo_epi16(a, c));
        _mm_storeu_si128(out + 1, _mm_unpackhi_epi16(a, c));
      }
      for (; iw < g.w; ++iw) {
        top_tail = std::max({top_tail, r[0][iw], r[1][iw], r[2][iw], r[3][iw]});
        row[size_t(iw)] = uint32_t(r[0][iw]) | uint32_t(r[1][iw]) << 8 |
                          uint32_t(r[2][iw]) << 16 | uint32_t(r[3][iw]) << 24;
      }
      if (!row_read[size_t(ih)]) continue;
      uint32_t* dst = buf + q * g.plane + (ih + pt) * sw * g.jp;
      if (sw == 1) {
        std::memcpy(dst + pl, row.data(), size_t(g.w) * sizeof(uint32_t));
        continue;
      }
      for (int64_t ph = 0; ph < phases; ++ph) {
        // Columns iw with (iw + pl) % sw == ph go to dst[ph * jp + (iw + pl) / sw].
        uint32_t* out = dst + offset[ph];
        for (int64_t col = first[ph]; col < g.w; col += sw) *out++ = row[size_t(col)];
      }
    }
  }
  alignas(16) uint8_t lanes[16];
  _mm_store_si128(reinterpret_cast<__m128i*>(lanes), top);
  return std::max<int64_t>(top_tail, *std::max_element(lanes, lanes + 16));
}

QC_TARGET_AVX2 bool QConvClampKernel::RunAvx2(const Geometry& g, const uint8_t* x, uint8_t* y,
                                              const Ort::KernelContext* pool,
                                              int64_t tasks) const {
  if (!UseAvx2()) return false;
  const std::vector<int64_t> taps = TapOffsets(g);
  // Position lanes when rows fill whole vectors, else channel lanes (no lane wasted).
  const bool position_lanes = g.ow % kLanes == 0;
  thread_local std::vector<int64_t> bases, dst;
  Runs(g, position_lanes ? kLanes : 1, bases, dst);
  // A position-lane load reads 8 words from base + tap: the buffer covers the last.
  const int64_t max_tap = *std::max_element(taps.begin(), taps.end());
  const int64_t end = bases.back() + max_tap + (position_lanes ? kLanes : 1);
  thread_local std::vector<uint32_t> buf;
  // Padding holds x_zero_point (the channels past C read it too, against zero weights).
  buf.assign(size_t(std::max(g.cq * g.plane, end)), uint32_t(attrs_.x_zero_point) * 0x01010101u);
  const int64_t run = Int16Run(std::max(
      attrs_.x_zero_point, FillWords(g, attrs_.pads[0], attrs_.pads[1], attrs_.sh, attrs_.sw, kh_, kw_, x, buf.data())));
  if (run == 0) return false;
  TileArgs args;
  args.buf = buf.data();
  args.bases = bases.data();
  args.dst = dst.data();
  args.count = int64_t(bases.size());
  args.taps = taps.data();
  args.ntaps = taps_;
  args.run = run;
  args.bias = q_.folded_bias.data();
  args.scale = q_.scale.data();
  args.m = m_;
  args.plane_out = g.oh * g.ow;
  args.range.lo = float(attrs_.lo - attrs_.zero_point);
  args.range.hi = float(attrs_.hi - attrs_.zero_point);
  args.range.zero_point = int32_t(attrs_.zero_point);
  args.y = y;
  args.w = position_lanes ? packed_.data() : packed_wide_.data();
  // Tasks of whole tiles (runs of positions): each writes its own positions of every
  // output channel.
  const size_t runs = bases.size();
  const size_t chunk = std::max<size_t>(kRunsPerTask, (runs + size_t(tasks) - 1) / size_t(tasks));
  ForChunks(pool, runs, [&](size_t first, size_t last) {
    TileArgs part = args;
    part.bases += first;
    part.dst += first;
    part.count = int64_t(last - first);
    position_lanes ? PositionLanesAvx2(part) : ChannelLanesAvx2(part);
  }, (chunk + kRunsPerTask - 1) / kRunsPerTask * kRunsPerTask);
  return true;
}

#else

bool QConvClampKernel::RunAvx2(const Geometry&, const uint8_t*, uint8_t*,
                               const Ort::KernelContext*, int64_t) const {
  return false;
}

#endif

}  // namespace

const OrtCustomOp* QConvClampOp() {
  static const KernelOp<QConvClampKernel> op;
  return &op;
}

}  // namespace qconvert
