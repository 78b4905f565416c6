// CompandQuant: the LCQ activation quantizer (docs/ops.md, "CompandQuant").
// The op shell and the direct loops; the step thresholds that replace the
// division and lookups for small codebooks are in compand_steps.cc.
#include <array>
#include <cmath>
#include <cstring>
#include <optional>
#include <string>
#include <vector>

#include "attributes.h"
#include "compand_math.h"
#include "compand_steps.h"
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

// The reference loop, one element at a time. Used where AVX2 is missing and
// for the tail of each chunk. kSymmetric: signed or mirror (the level of |x|,
// times sign(x)); kClip: a magnitude >= alpha gives exactly alpha.
template <bool kSymmetric, bool kClip>
void CompandPortable(const CompandParams& params, const float* x, float* y, size_t n) {
  const CompandParams p = params;  // local copy: y cannot alias it
  for (size_t i = 0; i < n; ++i) {
    const float xv = x[i];
    const float m = kSymmetric ? std::fabs(xv) : xv;
    float yv = p.levels[LevelIndex(p, m)];
    if (kClip && m >= p.alpha) yv = p.alpha;
    if (kSymmetric) {
      const float sign = xv > 0.0f ? 1.0f : (xv < 0.0f ? -1.0f : 0.0f);
      yv = yv * sign;
    }
    y[i] = xv != xv ? xv : yv;  // NaN in, NaN out
  }
}

#if QC_HAVE_AVX2

// A float table read with 8 lanes of int32 indices. Up to 32 entries live in
// registers and are read with vpermps (plus blends on bits 3 and 4 of the
// index): on CPUs such as Zen 1 a gather instruction costs several times
// more. Longer tables (levels of 7- and 8-bit quantizers) use gathers.
struct VecTable {
  const float* data;
  int regs;  // 1, 2 or 4 registers in use; 0 = gather from data
  __m256 t[4];
};

QC_TARGET_AVX2 inline VecTable MakeVecTable(const float* data, size_t n) {
  VecTable table{data, 0, {}};
  if (n > 32) return table;
  table.regs = n <= 8 ? 1 : (n <= 16 ? 2 : 4);
  alignas(32) float padded[32] = {};  // entries past n are never indexed
  std::memcpy(padded, data, n * sizeof(float));
  for (int r = 0; r < table.regs; ++r) table.t[r] = _mm256_load_ps(padded + 8 * r);
  return table;
}

QC_TARGET_AVX2 inline __m256 Lookup(const VecTable& table, __m256i idx) {
  if (table.regs == 0) return _mm256_i32gather_ps(table.data, idx, 4);
  const __m256 low = _mm256_permutevar8x32_ps(table.t[0], idx);  // uses idx bits 0..2
  if (table.regs == 1) return low;
  const __m256 bit3 = _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28));  // blend on the sign bit
  const __m256 r01 = _mm256_blendv_ps(low, _mm256_permutevar8x32_ps(table.t[1], idx), bit3);
  if (table.regs == 2) return r01;
  const __m256 r23 = _mm256_blendv_ps(_mm256_permutevar8x32_ps(table.t[2], idx),
                                      _mm256_permutevar8x32_ps(table.t[3], idx), bit3);
  const __m256 bit4 = _mm256_castsi256_ps(_mm256_slli_epi32(idx, 27));
  return _mm256_blendv_ps(r01, r23, bit4);
}

// The same operations as CompandPortable, eight lanes at a time. The
// min/max intrinsics return their second operand when either is NaN, which
// is exactly the ternaries of the portable loop.
template <bool kSigned, bool kClip>
QC_TARGET_AVX2 void CompandAvx2(const CompandParams& p, const float* x, float* y, size_t n) {
  const __m256 alpha = _mm256_set1_ps(p.alpha);
  const __m256 K = _mm256_set1_ps(p.K);
  const __m256 K_last = _mm256_set1_ps(p.K_last);
  const __m256i k_last = _mm256_set1_epi32(p.k_last);
  const __m256 S = _mm256_set1_ps(p.S);
  const __m256 zero = _mm256_setzero_ps();
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256 minus_one = _mm256_set1_ps(-1.0f);
  const __m256 sign_bit = _mm256_set1_ps(-0.0f);
  const VecTable slopes = MakeVecTable(p.slopes, size_t(p.k_last) + 1);
  const VecTable offsets = MakeVecTable(p.offsets, size_t(p.k_last) + 1);
  const VecTable starts = MakeVecTable(p.interval_start, size_t(p.k_last) + 1);
  const VecTable levels = MakeVecTable(p.levels, size_t(p.S) + 1);

  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 xv = _mm256_loadu_ps(x + i);
    const __m256 m = kSigned ? _mm256_andnot_ps(sign_bit, xv) : xv;
    const __m256 v = _mm256_min_ps(_mm256_max_ps(_mm256_div_ps(m, alpha), zero), one);
    __m256 kf = _mm256_floor_ps(_mm256_mul_ps(v, K));
    kf = _mm256_max_ps(_mm256_min_ps(kf, K_last), zero);
    const __m256i k = _mm256_min_epi32(_mm256_cvttps_epi32(kf), k_last);
    const __m256 d = _mm256_sub_ps(v, Lookup(starts, k));
    const __m256 f = _mm256_add_ps(_mm256_mul_ps(Lookup(slopes, k), d), Lookup(offsets, k));
    __m256 jf = _mm256_round_ps(_mm256_mul_ps(f, S), _MM_FROUND_CUR_DIRECTION | _MM_FROUND_NO_EXC);
    jf = _mm256_min_ps(_mm256_max_ps(jf, zero), S);
    __m256 yv = Lookup(levels, _mm256_cvttps_epi32(jf));
    if (kClip) yv = _mm256_blendv_ps(yv, alpha, _mm256_cmp_ps(m, alpha, _CMP_GE_OQ));
    if (kSigned) {
      __m256 sign = _mm256_and_ps(_mm256_cmp_ps(xv, zero, _CMP_GT_OQ), one);
      sign = _mm256_blendv_ps(sign, minus_one, _mm256_cmp_ps(xv, zero, _CMP_LT_OQ));
      yv = _mm256_mul_ps(yv, sign);
    }
    yv = _mm256_blendv_ps(yv, xv, _mm256_cmp_ps(xv, xv, _CMP_UNORD_Q));
    _mm256_storeu_ps(y + i, yv);
  }
  CompandPortable<kSigned, kClip>(p, x + i, y + i, n - i);
}

#endif  // QC_HAVE_AVX2

// `symmetric`: signed or mirror. The step thresholds never serve `clip` (its extra
// value at alpha is not a level of the table): the callers pass none then.
void CompandChunk(bool symmetric, bool clip, const CompandSteps* steps, const CompandParams& p,
                  const float* x, float* y, size_t n) {
#if QC_HAVE_AVX2
  if (UseAvx2()) {
    if (steps != nullptr) {
      CompandStepsAvx2(symmetric, *steps, x, y, n);
    } else if (clip) {
      symmetric ? CompandAvx2<true, true>(p, x, y, n) : CompandAvx2<false, true>(p, x, y, n);
    } else {
      symmetric ? CompandAvx2<true, false>(p, x, y, n) : CompandAvx2<false, false>(p, x, y, n);
    }
    return;
  }
#endif
  (void)steps;
  if (clip) {
    symmetric ? CompandPortable<true, true>(p, x, y, n) : CompandPortable<false, true>(p, x, y, n);
  } else {
    symmetric ? CompandPortable<true, false>(p, x, y, n)
              : CompandPortable<false, false>(p, x, y, n);
  }
}

// Below this many elements the threshold search (about a thousand scalar
// evaluations) costs more than it saves over the direct loop.
constexpr size_t kStepsMinElements = size_t{1} << 14;

// Tables of up to this many intervals live on the stack: no heap per run.
constexpr size_t kStackIntervals = 64;

// Element-wise work per thread-pool task: at well under 1 ns per element a
// smaller task would not repay the dispatch.
constexpr size_t kCompandChunk = size_t{1} << 16;

class CompandQuantKernel : public KernelBase {
 public:
  static constexpr const char* kName = "CompandQuant";
  static constexpr int kSinceVersion = 1;
  static constexpr std::array<ONNXTensorElementDataType, 5> kInputTypes = {
      ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT,
      ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT,
      ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT};

  CompandQuantKernel(const OrtKernelInfo* info, NodeRef ref) : KernelBase(std::move(ref)) {
    bits_ = int(IntAttr(info, this->ref(), "bits"));
    const int64_t is_signed = IntAttr(info, this->ref(), "signed");
    CheckAttrRange(this->ref(), "bits", bits_, 2, 8);
    CheckAttrRange(this->ref(), "signed", is_signed, 0, 1);
    // Version 3's optional attributes; older models do not carry them (0).
    const int64_t mirror = OptionalIntAttr(info, "mirror", 0);
    const int64_t clip = OptionalIntAttr(info, "clip", 0);
    CheckAttrRange(this->ref(), "mirror", mirror, 0, 1);
    CheckAttrRange(this->ref(), "clip", clip, 0, 1);
    if (is_signed == 1 && mirror == 1) this->ref().Fail("mirror=1 needs signed=0");
    signed_ = is_signed == 1;
    symmetric_ = signed_ || mirror == 1;
    clip_ = clip == 1;
    S_ = signed_ ? (1 << (bits_ - 1)) - 1 : (1 << bits_) - 1;
    PrepareConstantParams(info);
  }

  // The kernel holds pointers into its own tables: never copied or moved.
  CompandQuantKernel(const CompandQuantKernel&) = delete;
  CompandQuantKernel& operator=(const CompandQuantKernel&) = delete;

  void Compute(const Ort::KernelContext& ctx) const {
    if (constant_) {
      // Parameters checked (and thresholds found) at kernel creation: only X
      // is read, and nothing is allocated but the output.
      ActivationInput x;
      ReadActivationInput(ctx, ref(), 0, "X", x);
      float* y = AllocateOutputLike(ctx, x);
      Run(ctx, steps_ ? &*steps_ : nullptr, const_params_, x.data, y, x.count);
      return;
    }
    constexpr auto kF32 = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
    const TensorView x = KernelInput(ctx, ref(), 0, "X", kF32);
    const TensorView alpha = KernelInput(ctx, ref(), 1, "alpha", kF32);
    const TensorView slopes = KernelInput(ctx, ref(), 2, "slopes", kF32);
    const TensorView offsets = KernelInput(ctx, ref(), 3, "offsets", kF32);
    const TensorView levels = KernelInput(ctx, ref(), 4, "levels", kF32);
    CheckParams(alpha.count, slopes.count, offsets.count, levels.count);
    const size_t K = slopes.count;
    float stack_starts[kStackIntervals];
    std::vector<float> heap_starts;
    float* starts = stack_starts;
    if (K > kStackIntervals) {
      heap_starts.resize(K);
      starts = heap_starts.data();
    }
    const CompandParams p = MakeParams(alpha.f32()[0], slopes.f32(), offsets.f32(),
                                       levels.f32(), K, starts);

    // Thresholds per run when the tensor is large enough to repay the search.
    std::optional<CompandSteps> fresh;
    if (UseAvx2() && !clip_ && x.count >= kStepsMinElements) fresh = FindSteps(p, K);

    float* y = AllocateOutput(ctx, x.shape);
    Run(ctx, fresh ? &*fresh : nullptr, p, x.f32(), y, x.count);
  }

 private:
  void Run(const Ort::KernelContext& ctx, const CompandSteps* steps, const CompandParams& p,
           const float* xs, float* y, size_t n) const {
    const bool symmetric = symmetric_, clip = clip_;
    ForChunks(
        &ctx, n,
        [&](size_t begin, size_t end) {
          CompandChunk(symmetric, clip, steps, p, xs + begin, y + begin, end - begin);
        },
        kCompandChunk);
  }

  void CheckParams(size_t alpha, size_t slopes, size_t offsets, size_t levels) const {
    if (alpha != 1) ref().Fail("alpha has " + std::to_string(alpha) + " elements, expected 1");
    if (slopes == 0) ref().Fail("slopes is empty; K must be >= 1");
    if (slopes != offsets) {
      ref().Fail("slopes has " + std::to_string(slopes) + " elements but offsets has " +
                 std::to_string(offsets));
    }
    // int32 indices in the loop; far beyond any real compressor.
    if (slopes > size_t{1} << 30) ref().Fail("slopes has more than 2^30 elements");
    if (levels != size_t(S_) + 1) {
      ref().Fail("levels has " + std::to_string(levels) + " elements, expected S + 1 = " +
                 std::to_string(S_ + 1) + " for bits=" + std::to_string(bits_) +
                 " signed=" + std::to_string(int(signed_)));
    }
  }

  // `starts` receives d = float32(k) / float32(K) for k = 0..K-1.
  CompandParams MakeParams(float alpha, const float* slopes, const float* offsets,
                           const float* levels, size_t K, float* starts) const {
    for (size_t k = 0; k < K; ++k) starts[k] = float(k) / float(K);
    return CompandParams{alpha, float(K),      float(K - 1), int32_t(K - 1), float(S_),
                         slopes, offsets, starts,       levels};
  }

  // Parameters stored as initializers are checked when the session is built,
  // copied into the kernel, and their step thresholds found once; a run then
  // reads X only.
  void PrepareConstantParams(const OrtKernelInfo* info) {
    constexpr auto kF32 = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
    auto alpha = ConstantInput(info, ref(), 1, "alpha", kF32);
    auto slopes = ConstantInput(info, ref(), 2, "slopes", kF32);
    auto offsets = ConstantInput(info, ref(), 3, "offsets", kF32);
    auto levels = ConstantInput(info, ref(), 4, "levels", kF32);
    if (!(alpha && slopes && offsets && levels)) return;
    CheckParams(alpha->count, slopes->count, offsets->count, levels->count);
    const size_t K = slopes->count;
    slopes_.assign(slopes->f32(), slopes->f32() + K);
    offsets_.assign(offsets->f32(), offsets->f32() + K);
    levels_.assign(levels->f32(), levels->f32() + levels->count);
    starts_.resize(K);
    const_params_ = MakeParams(alpha->f32()[0], slopes_.data(), offsets_.data(), levels_.data(),
                               K, starts_.data());
    if (UseAvx2() && !clip_) steps_ = FindSteps(const_params_, K);
    constant_ = true;
  }

  int bits_ = 0;
  bool signed_ = false;
  bool symmetric_ = false;  // signed, or mirror: levels of |x| times sign(x)
  bool clip_ = false;       // |x| >= alpha (x >= alpha unsigned) gives exactly alpha
  int S_ = 0;
  bool constant_ = false;  // alpha, slopes, offsets, levels are initializers
  std::vector<float> slopes_, offsets_, levels_, starts_;
  CompandParams const_params_{};
  std::optional<CompandSteps> steps_;
};

}  // namespace

const OrtCustomOp* CompandQuantOp() {
  static const KernelOp<CompandQuantKernel> op;
  return &op;
}

}  // namespace qconvert
