// CompandQuant: the LCQ activation quantizer (docs/ops.md, "CompandQuant").
#include <cmath>
#include <cstring>
#include <limits>
#include <optional>

#include "common.h"

#if QC_HAVE_AVX2
#include <immintrin.h>
#endif

namespace qconvert {
namespace {

// Everything the element loops need, read from the inputs once per run.
struct CompandParams {
  float alpha;
  float K;       // float32(K)
  float K_last;  // float32(K - 1)
  int32_t k_last;
  float S;  // float32(S)
  const float* slopes;
  const float* offsets;
  const float* interval_start;  // float32(k) / float32(K), k = 0..K-1
  const float* levels;
};

// The level index j for a magnitude m (m = |x| signed, m = x unsigned), in
// exactly the order of docs/ops.md. NaN m is handled by the callers.
inline int32_t LevelIndex(const CompandParams& p, float m) {
  // v = min(max(m / alpha, 0), 1). The max is the spec's for unsigned and a
  // no-op for signed; for both it also maps a NaN quotient (alpha NaN or 0)
  // to 0, as the numpy reference and the function body do.
  float v = m / p.alpha;
  v = v > 0.0f ? v : 0.0f;
  v = v < 1.0f ? v : 1.0f;
  // k = min(floor(v * K), K - 1). The extra clamps (below 0, and in int)
  // change nothing for valid inputs; they keep the table reads in bounds
  // for any alpha (<= 0, NaN) and for K beyond float32's exact integers.
  float kf = std::floor(v * p.K);
  kf = kf < p.K_last ? kf : p.K_last;
  kf = kf > 0.0f ? kf : 0.0f;
  int32_t k = static_cast<int32_t>(kf);
  k = k < p.k_last ? k : p.k_last;
  // A multiply, then an add: two roundings (no FMA, see CMakeLists.txt).
  const float f = p.slopes[k] * (v - p.interval_start[k]) + p.offsets[k];
  float jf = std::nearbyint(f * p.S);  // half-to-even in the default mode
  jf = jf > 0.0f ? jf : 0.0f;          // also maps NaN to 0
  jf = jf < p.S ? jf : p.S;
  return static_cast<int32_t>(jf);
}

// The reference loop, one element at a time. Used where AVX2 is missing and
// for the tail of each chunk.
template <bool kSigned>
void CompandPortable(const CompandParams& params, const float* x, float* y, size_t n) {
  const CompandParams p = params;  // local copy: y cannot alias it
  for (size_t i = 0; i < n; ++i) {
    const float xv = x[i];
    float yv = p.levels[LevelIndex(p, kSigned ? std::fabs(xv) : xv)];
    if (kSigned) {
      const float sign = xv > 0.0f ? 1.0f : (xv < 0.0f ? -1.0f : 0.0f);
      yv = yv * sign;
    }
    y[i] = xv != xv ? xv : yv;  // NaN in, NaN out
  }
}

// ------------------------------------------------------------ step thresholds
//
// For a valid compressor (alpha > 0, slopes >= 0, all finite) j = J(m) is a
// non-decreasing step function of m: inside one interval k every operation
// of LevelIndex is monotone (IEEE rounding is monotone), and the check below
// proves the jumps between intervals are not downward. Then
//   J(m) = J(0) + #{ t : t <= m },  t_j = the least float m with J(m) >= j,
// and each t_j is found by bisection over float bit patterns (ordered like
// the values for m >= 0), evaluating LevelIndex itself. The kernel then
// compares instead of dividing and looking up three tables: the same bits in
// about half the time at 4 bits (benchmarks/bench_ops.py). Anything unproven
// falls back to the direct loops.

constexpr int kMaxSteps = 15;               // past this the direct loop is as fast
constexpr uint32_t kInfBits = 0x7F800000u;  // +Inf: the top of the search

struct CompandSteps {
  int count = 0;                     // thresholds in use (<= kMaxSteps)
  float t[kMaxSteps] = {};           // ascending
  float levels[kMaxSteps + 1] = {};  // levels[J(0) + i] for i = 0..count
  float zero_value = 0.0f;           // levels[J(0)] * sign(+-0), i.e. * 0

  // The same thresholds laid out for a branch-free binary search (see
  // CompandSearchAvx2), filled by BuildSearch. With T_1..T_15 = t padded by
  // NaN (never <= m, like thresholds above +Inf) and L_0..L_15 = levels:
  //   depth 4 (count <= 15): top = T8, mid = {T4, T12}, third = {T2, T6,
  //     T10, T14} twice (in-lane), fourth = {T1, T3, ..., T15},
  //     even/odd = {L0, L2, ..., L14} / {L1, L3, ..., L15};
  //   depth 3 (count <= 7): top = T4, mid = {T2, T6}, third = {T1, T3, T5,
  //     T7} twice, even/odd = {L0, L2, L4, L6} / {L1, L3, L5, L7} twice.
  int depth = 4;
  float top = 0.0f, mid_lo = 0.0f, mid_hi = 0.0f;
  float third[8] = {}, fourth[8] = {}, even[8] = {}, odd[8] = {};
};

void BuildSearch(CompandSteps& st) {
  float T[16], L[16];
  for (int i = 1; i < 16; ++i) {
    T[i] = i <= st.count ? st.t[i - 1] : std::numeric_limits<float>::quiet_NaN();
  }
  T[0] = T[1];  // never read
  for (int i = 0; i < 16; ++i) L[i] = st.levels[i <= st.count ? i : st.count];  // pad: never read
  if (st.count <= 7) {
    st.depth = 3;
    st.top = T[4];
    st.mid_lo = T[2];
    st.mid_hi = T[6];
    for (int i = 0; i < 8; ++i) {
      st.third[i] = T[2 * (i & 3) + 1];
      st.even[i] = L[2 * (i & 3)];
      st.odd[i] = L[2 * (i & 3) + 1];
      st.fourth[i] = 0.0f;
    }
  } else {
    st.depth = 4;
    st.top = T[8];
    st.mid_lo = T[4];
    st.mid_hi = T[12];
    for (int i = 0; i < 8; ++i) {
      st.third[i] = T[4 * (i & 3) + 2];
      st.fourth[i] = T[2 * i + 1];
      st.even[i] = L[2 * i];
      st.odd[i] = L[2 * i + 1];
    }
  }
}

inline float FromBits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// The least bit pattern u in [0, kInfBits] with pred(u); pred(kInfBits) holds.
template <class Pred>
uint32_t LeastTrue(Pred pred) {
  uint32_t lo = 0, hi = kInfBits;
  while (lo < hi) {
    const uint32_t mid = lo + (hi - lo) / 2;
    if (pred(mid)) {
      hi = mid;
    } else {
      lo = mid + 1;
    }
  }
  return lo;
}

inline int32_t IntervalIndex(const CompandParams& p, float m) {
  float v = m / p.alpha;
  v = v > 0.0f ? v : 0.0f;
  v = v < 1.0f ? v : 1.0f;
  const float kf = std::floor(v * p.K);
  return static_cast<int32_t>(kf < p.K_last ? kf : p.K_last);
}

std::optional<CompandSteps> FindSteps(const CompandParams& p, size_t K) {
  if (!(std::isfinite(p.alpha) && p.alpha > 0.0f) || K > 256) return std::nullopt;
  for (size_t k = 0; k < K; ++k) {
    if (!(p.slopes[k] >= 0.0f) || !std::isfinite(p.slopes[k]) || !std::isfinite(p.offsets[k])) {
      return std::nullopt;
    }
  }
  auto J = [&](uint32_t u) { return LevelIndex(p, FromBits(u)); };
  // No downward jump where the interval index changes.
  for (int32_t k = 1; k < int32_t(K); ++k) {
    const uint32_t u = LeastTrue([&](uint32_t w) { return IntervalIndex(p, FromBits(w)) >= k; });
    if (u > 0 && J(u - 1) > J(u)) return std::nullopt;
  }
  const int32_t j0 = J(0), j_top = J(kInfBits);
  if (j_top - j0 > kMaxSteps) return std::nullopt;
  CompandSteps steps;
  steps.count = j_top - j0;
  for (int32_t j = j0 + 1; j <= j_top; ++j) {
    steps.t[j - j0 - 1] = FromBits(LeastTrue([&](uint32_t w) { return J(w) >= j; }));
  }
  for (int32_t j = j0; j <= j_top; ++j) steps.levels[j - j0] = p.levels[j];
  steps.zero_value = p.levels[j0] * 0.0f;
  BuildSearch(steps);
  return steps;
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
template <bool kSigned>
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
    if (kSigned) {
      __m256 sign = _mm256_and_ps(_mm256_cmp_ps(xv, zero, _CMP_GT_OQ), one);
      sign = _mm256_blendv_ps(sign, minus_one, _mm256_cmp_ps(xv, zero, _CMP_LT_OQ));
      yv = _mm256_mul_ps(yv, sign);
    }
    yv = _mm256_blendv_ps(yv, xv, _mm256_cmp_ps(xv, xv, _CMP_UNORD_Q));
    _mm256_storeu_ps(y + i, yv);
  }
  CompandPortable<kSigned>(p, x + i, y + i, n - i);
}

// J(m) = J(0) + #{t <= m} by a branch-free binary search over the
// thresholds: one compare per level (3 or 4 instead of up to 15), each
// level's threshold picked from registers by a blend or a permute indexed by
// the compares so far, and the level read the same way (no gather). A true
// compare is an all-ones lane (-1 as int32), so the index after levels
// c_3..c_1 is i = 2 * i_prev - c. Same results as CompandPortable (see
// FindSteps): every lane compares m against exactly the thresholds a
// sequential search would, and NaN padding compares false like +Inf.
template <bool kSigned, int kDepth>
struct SearchBlock {
  __m256 top, mid_lo, mid_hi, third, fourth, even, odd, zero_value;

  QC_TARGET_AVX2 explicit SearchBlock(const CompandSteps& st)
      : top(_mm256_set1_ps(st.top)),
        mid_lo(_mm256_set1_ps(st.mid_lo)),
        mid_hi(_mm256_set1_ps(st.mid_hi)),
        third(_mm256_loadu_ps(st.third)),
        fourth(_mm256_loadu_ps(st.fourth)),
        even(_mm256_loadu_ps(st.even)),
        odd(_mm256_loadu_ps(st.odd)),
        zero_value(_mm256_set1_ps(st.zero_value)) {}

  QC_TARGET_AVX2 __attribute__((always_inline)) __m256 operator()(__m256 xv) const {
    const __m256 sign_bit = _mm256_set1_ps(-0.0f);
    const __m256 m = kSigned ? _mm256_andnot_ps(sign_bit, xv) : xv;
    const __m256 c_top = _mm256_cmp_ps(m, top, _CMP_GE_OQ);
    const __m256 c_mid = _mm256_cmp_ps(m, _mm256_blendv_ps(mid_lo, mid_hi, c_top), _CMP_GE_OQ);
    const __m256i i2 =
        _mm256_sub_epi32(_mm256_and_si256(_mm256_castps_si256(c_top), _mm256_set1_epi32(2)),
                         _mm256_castps_si256(c_mid));  // 0..3
    const __m256 c3 = _mm256_cmp_ps(m, _mm256_permutevar_ps(third, i2), _CMP_GE_OQ);
    __m256 yv;
    if constexpr (kDepth == 3) {
      // J = 2 * i2 + c3
      yv = _mm256_blendv_ps(_mm256_permutevar_ps(even, i2), _mm256_permutevar_ps(odd, i2), c3);
    } else {
      const __m256i i3 = _mm256_sub_epi32(_mm256_add_epi32(i2, i2), _mm256_castps_si256(c3));
      const __m256 c4 = _mm256_cmp_ps(m, _mm256_permutevar8x32_ps(fourth, i3), _CMP_GE_OQ);
      // J = 2 * i3 + c4
      yv = _mm256_blendv_ps(_mm256_permutevar8x32_ps(even, i3),
                            _mm256_permutevar8x32_ps(odd, i3), c4);
    }
    if (kSigned) {
      // levels[j] * sign(x): an exact negation for x < 0; x = +-0 has j = J(0).
      const __m256 zero = _mm256_setzero_ps();
      yv = _mm256_xor_ps(yv, _mm256_and_ps(xv, sign_bit));
      yv = _mm256_blendv_ps(yv, zero_value, _mm256_cmp_ps(xv, zero, _CMP_EQ_OQ));
    }
    return yv;  // NaN lanes are the caller's (Nan below)
  }

  // NaN in, NaN out.
  static QC_TARGET_AVX2 __attribute__((always_inline)) __m256 Nan(__m256 yv, __m256 xv) {
    return _mm256_blendv_ps(yv, xv, _mm256_cmp_ps(xv, xv, _CMP_UNORD_Q));
  }
};

template <bool kSigned, int kDepth>
QC_TARGET_AVX2 void CompandSearchAvx2(const CompandSteps& st, const float* x, float* y,
                                      size_t n) {
  const SearchBlock<kSigned, kDepth> block(st);
  size_t i = 0;
  using Block = SearchBlock<kSigned, kDepth>;
  // Two blocks at a time (more would spill registers, which costs far more
  // than it gains on Zen 1); one unordered compare checks both for NaN and
  // the blend that passes NaN through runs only when there is one.
  for (; i + 16 <= n; i += 16) {
    const __m256 xa = _mm256_loadu_ps(x + i);
    const __m256 xb = _mm256_loadu_ps(x + i + 8);
    __m256 a = block(xa);
    __m256 b = block(xb);
    if (__builtin_expect(_mm256_movemask_ps(_mm256_cmp_ps(xa, xb, _CMP_UNORD_Q)) != 0, 0)) {
      a = Block::Nan(a, xa);
      b = Block::Nan(b, xb);
    }
    _mm256_storeu_ps(y + i, a);
    _mm256_storeu_ps(y + i + 8, b);
  }
  for (; i + 8 <= n; i += 8) {
    const __m256 xv = _mm256_loadu_ps(x + i);
    _mm256_storeu_ps(y + i, Block::Nan(block(xv), xv));
  }
  if (i < n) {  // the last 1..7 elements through a padded block: no scalar path
    alignas(32) float in[8] = {}, out[8];
    std::memcpy(in, x + i, (n - i) * sizeof(float));
    const __m256 xv = _mm256_load_ps(in);
    _mm256_store_ps(out, Block::Nan(block(xv), xv));
    std::memcpy(y + i, out, (n - i) * sizeof(float));
  }
}

template <bool kSigned>
void CompandStepsDispatch(const CompandSteps& st, const CompandParams& p, const float* x,
                          float* y, size_t n) {
  (void)p;
  if (st.depth == 3) {
    CompandSearchAvx2<kSigned, 3>(st, x, y, n);
  } else {
    CompandSearchAvx2<kSigned, 4>(st, x, y, n);
  }
}

#endif  // QC_HAVE_AVX2

void CompandChunk(bool is_signed, const CompandSteps* steps, const CompandParams& p,
                  const float* x, float* y, size_t n) {
#if QC_HAVE_AVX2
  if (UseAvx2()) {
    if (steps != nullptr) {
      is_signed ? CompandStepsDispatch<true>(*steps, p, x, y, n)
                : CompandStepsDispatch<false>(*steps, p, x, y, n);
    } else {
      is_signed ? CompandAvx2<true>(p, x, y, n) : CompandAvx2<false>(p, x, y, n);
    }
    return;
  }
#endif
  (void)steps;
  is_signed ? CompandPortable<true>(p, x, y, n) : CompandPortable<false>(p, x, y, n);
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
  static constexpr std::array<ONNXTensorElementDataType, 5> kInputTypes = {
      ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT,
      ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT,
      ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT};

  CompandQuantKernel(const OrtKernelInfo* info, NodeRef ref) : KernelBase(std::move(ref)) {
    bits_ = int(IntAttr(info, this->ref(), "bits"));
    const int64_t is_signed = IntAttr(info, this->ref(), "signed");
    CheckAttrRange(this->ref(), "bits", bits_, 2, 8);
    CheckAttrRange(this->ref(), "signed", is_signed, 0, 1);
    signed_ = is_signed == 1;
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
    if (UseAvx2() && x.count >= kStepsMinElements) fresh = FindSteps(p, K);

    float* y = AllocateOutput(ctx, x.shape);
    Run(ctx, fresh ? &*fresh : nullptr, p, x.f32(), y, x.count);
  }

 private:
  void Run(const Ort::KernelContext& ctx, const CompandSteps* steps, const CompandParams& p,
           const float* xs, float* y, size_t n) const {
    const bool is_signed = signed_;
    ForChunks(
        &ctx, n,
        [&](size_t begin, size_t end) {
          CompandChunk(is_signed, steps, p, xs + begin, y + begin, end - begin);
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
    if (UseAvx2()) steps_ = FindSteps(const_params_, K);
    constant_ = true;
  }

  int bits_ = 0;
  bool signed_ = false;
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
