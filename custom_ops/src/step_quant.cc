#include "step_quant.h"

#include <cmath>

#include "cpu.h"

namespace qconvert {
namespace {

// Plain C++ that GCC vectorizes; compiled twice (see QC_TARGET_AVX2).
__attribute__((always_inline)) inline void StepQuantBody(float s, float lo, float hi,
                                                         const float* x, float* y, size_t n) {
  for (size_t i = 0; i < n; ++i) {
    float r = std::nearbyint(x[i] / s);  // a true division, then half-to-even
    // Written so that NaN passes through both comparisons unchanged.
    r = r < lo ? lo : r;
    r = r > hi ? hi : r;
    y[i] = r * s;
  }
}

QC_TARGET_AVX2 void StepQuantAvx2(float s, float lo, float hi, const float* x, float* y,
                                  size_t n) {
  StepQuantBody(s, lo, hi, x, y, n);
}

void StepQuantPortable(float s, float lo, float hi, const float* x, float* y, size_t n) {
  StepQuantBody(s, lo, hi, x, y, n);
}

}  // namespace

StepQuantLoop PickStepQuantLoop() { return UseAvx2() ? StepQuantAvx2 : StepQuantPortable; }

}  // namespace qconvert
