#include "errors.h"

#include <cstring>

namespace qconvert {

std::string TakeStatus(OrtStatus* status) {
  if (status == nullptr) return {};
  std::string message = Ort::GetApi().GetErrorMessage(status);
  Ort::GetApi().ReleaseStatus(status);
  return message.empty() ? "error" : message;
}

NodeRef MakeNodeRef(const char* op, const OrtKernelInfo* info) {
  NodeRef ref{op, "?"};
  size_t size = 0;
  const OrtApi& api = Ort::GetApi();
  if (TakeStatus(api.KernelInfo_GetNodeName(info, nullptr, &size)).empty() && size > 0) {
    std::string name(size, '\0');
    if (TakeStatus(api.KernelInfo_GetNodeName(info, name.data(), &size)).empty()) {
      name.resize(std::strlen(name.c_str()));
      ref.node = name;
    }
  }
  return ref;
}

std::string ShapeString(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) {
    if (i > 0) s += ", ";
    s += std::to_string(shape[i]);
  }
  return s + "]";
}

}  // namespace qconvert
