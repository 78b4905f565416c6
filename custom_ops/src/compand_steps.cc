#include "compand_steps.h"

#include <cmath>
#include <cstring>
#include <limits>

#if QC_HAVE_AVX2
#include <immintrin.h>
#endif

namespace qconvert {
namespace {

constexpr uint32_t kInfBits = 0x7F800000u;  // +Inf: the top of the search

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

}  // namespace

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

namespace {

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

}  // namespace

void CompandStepsAvx2(bool is_signed, const CompandSteps& st, const float* x, float* y,
                      size_t n) {
  if (is_signed) {
    st.depth == 3 ? CompandSearchAvx2<true, 3>(st, x, y, n)
                  : CompandSearchAvx2<true, 4>(st, x, y, n);
  } else {
    st.depth == 3 ? CompandSearchAvx2<false, 3>(st, x, y, n)
                  : CompandSearchAvx2<false, 4>(st, x, y, n);
  }
}


#endif  // QC_HAVE_AVX2

}  // namespace qconvert
