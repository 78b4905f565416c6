// Errors of the qconvert kernels: every message names the op and the node,
// and no C++ exception ever crosses into ONNX Runtime.
#pragma once

#include <onnxruntime_cxx_api.h>

#include <cstdint>
#include <new>
#include <stdexcept>
#include <string>
#include <vector>

namespace qconvert {

// Thrown inside a kernel and turned into an OrtStatus at the C boundary.
class KernelError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Names the op and node in every message: "qconvert::LutGather node 'w0': ...".
struct NodeRef {
  std::string op;
  std::string node;

  [[noreturn]] void Fail(const std::string& what) const {
    throw KernelError("qconvert::" + op + " node '" + node + "': " + what);
  }
  std::string Prefix() const { return "qconvert::" + op + " node '" + node + "': "; }
};

// Runs `body` and converts any exception into an OrtStatus (nullptr = ok).
template <class Body>
OrtStatusPtr Guarded(const std::string& prefix, Body&& body) noexcept {
  const OrtApi& api = Ort::GetApi();
  try {
    body();
    return nullptr;
  } catch (const KernelError& e) {
    return api.CreateStatus(ORT_INVALID_ARGUMENT, e.what());
  } catch (const Ort::Exception& e) {
    return api.CreateStatus(e.GetOrtErrorCode(), (prefix + e.what()).c_str());
  } catch (const std::bad_alloc&) {
    return api.CreateStatus(ORT_FAIL, (prefix + "out of memory").c_str());
  } catch (const std::exception& e) {
    return api.CreateStatus(ORT_FAIL, (prefix + e.what()).c_str());
  } catch (...) {
    return api.CreateStatus(ORT_FAIL, (prefix + "unknown error").c_str());
  }
}

// The op name and the node's name as the session graph has it ("?" if unknown).
NodeRef MakeNodeRef(const char* op, const OrtKernelInfo* info);

// Takes ownership of an OrtStatus and returns its message ("" for ok).
std::string TakeStatus(OrtStatus* status);

// "[2, 3]": shapes in messages.
std::string ShapeString(const std::vector<int64_t>& shape);

}  // namespace qconvert
