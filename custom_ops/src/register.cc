// The library's only exported symbol: RegisterCustomOps, called by
// SessionOptions.register_custom_ops_library / RegisterCustomOpsLibrary.
#include <string>

#include "errors.h"
#include "ops.h"

namespace {

// ORT keeps pointers to the domain and the ops for as long as any session
// uses them, so both live in static storage and are built once.
OrtCustomOpDomain* QconvertDomain() {
  static Ort::CustomOpDomain domain = [] {
    Ort::CustomOpDomain d("qconvert");
    d.Add(qconvert::CompandQuantOp());
    d.Add(qconvert::AdaptiveStepOp());
    d.Add(qconvert::LutGatherOp());
    d.Add(qconvert::Pow2ShiftOp());
    d.Add(qconvert::UniformQuantOp());
    d.Add(qconvert::SampleMaxQuantOp());
    d.Add(qconvert::QConvClampOp());
    d.Add(qconvert::QDepthwiseConvClampOp());
    return d;
  }();
  return domain;
}

}  // namespace

extern "C" __attribute__((visibility("default"))) OrtStatus* ORT_API_CALL
RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (api == nullptr) {
    // Every runtime serves API version 1, enough to report the mismatch.
    const std::string message =
        std::string("libqconvert_ops needs ONNX Runtime API version ") +
        std::to_string(ORT_API_VERSION) + " or newer; this runtime is " +
        api_base->GetVersionString();
    return api_base->GetApi(1)->CreateStatus(ORT_FAIL, message.c_str());
  }
  Ort::InitApi(api);
  return qconvert::Guarded("libqconvert_ops: ", [&] {
    Ort::UnownedSessionOptions(options).Add(QconvertDomain());
  });
}
