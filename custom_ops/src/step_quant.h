// The loop UniformQuant and AdaptiveStep share (docs/ops.md):
//   y = min(max(nearbyint(x / s), lo), hi) * s
// a true division, half-to-even rounding, NaN in -> NaN out.
#pragma once

#include <cstddef>

namespace qconvert {

using StepQuantLoop = void (*)(float s, float lo, float hi, const float* x, float* y, size_t n);

// The AVX2 build of the loop when UseAvx2(), else the portable one. Both
// round exactly alike (see cpu.h); the tests compare their bits.
StepQuantLoop PickStepQuantLoop();

}  // namespace qconvert
