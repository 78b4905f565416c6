// CompandQuant's level index, shared by the op's element loops and the step
// threshold search (docs/ops.md, "CompandQuant").
#pragma once

#include <cmath>
#include <cstdint>

namespace qconvert {

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

}  // namespace qconvert
