// CompandQuant's step thresholds and the AVX2 loop that counts them.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>

#include "compand_math.h"
#include "cpu.h"

namespace qconvert {

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

constexpr int kMaxSteps = 15;  // past this the direct loop is as fast

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

// The thresholds of a compressor with K intervals, or nothing when they are
// not proven to reproduce LevelIndex (then the direct loops run).
std::optional<CompandSteps> FindSteps(const CompandParams& p, size_t K);

#if QC_HAVE_AVX2
// y = CompandQuant(x) for n elements through the thresholds (AVX2 only).
void CompandStepsAvx2(bool is_signed, const CompandSteps& st, const float* x, float* y,
                      size_t n);
#endif

}  // namespace qconvert
