// The qconvert ops, defined one per source file, registered by register.cc.
#pragma once

#include <onnxruntime_cxx_api.h>

namespace qconvert {

const OrtCustomOp* CompandQuantOp();
const OrtCustomOp* AdaptiveStepOp();
const OrtCustomOp* LutGatherOp();
const OrtCustomOp* Pow2ShiftOp();
const OrtCustomOp* UniformQuantOp();
const OrtCustomOp* SampleMaxQuantOp();
const OrtCustomOp* QConvClampOp();
const OrtCustomOp* QDepthwiseConvClampOp();

}  // namespace qconvert
