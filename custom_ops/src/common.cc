#include "common.h"

#include <algorithm>
#include <cstdlib>

namespace qconvert {

namespace {

// Takes ownership of an OrtStatus and returns its message ("" for ok).
std::string TakeStatus(OrtStatus* status) {
  if (status == nullptr) return {};
  std::string message = Ort::GetApi().GetErrorMessage(status);
  Ort::GetApi().ReleaseStatus(status);
  return message.empty() ? "error" : message;
}

const char* TypeName(ONNXTensorElementDataType type) {
  switch (type) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT:
      return "float32";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8:
      return "uint8";
    default:
      return "another type";
  }
}

}  // namespace

bool UseAvx2() {
  static const bool use = [] {
    const char* portable = std::getenv("QCONVERT_OPS_PORTABLE");
    if (portable != nullptr && std::strcmp(portable, "") != 0 && std::strcmp(portable, "0") != 0) {
      return false;
    }
#if QC_HAVE_AVX2
    return __builtin_cpu_supports("avx2") != 0;
#else
    return false;
#endif
  }();
  return use;
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

int64_t IntAttr(const OrtKernelInfo* info, const NodeRef& ref, const char* name) {
  int64_t value = 0;
  std::string error = TakeStatus(Ort::GetApi().KernelInfoGetAttribute_int64(info, name, &value));
  if (!error.empty()) {
    ref.Fail(std::string("attribute '") + name + "' missing or not an int (" + error + ")");
  }
  return value;
}

std::vector<int64_t> IntsAttr(const OrtKernelInfo* info, const NodeRef& ref, const char* name) {
  const OrtApi& api = Ort::GetApi();
  size_t size = 0;
  std::string error = TakeStatus(api.KernelInfoGetAttributeArray_int64(info, name, nullptr, &size));
  std::vector<int64_t> values(size);
  if (error.empty() && size > 0) {
    error = TakeStatus(api.KernelInfoGetAttributeArray_int64(info, name, values.data(), &size));
  }
  if (!error.empty()) {
    ref.Fail(std::string("attribute '") + name + "' missing or not a list of ints (" + error +
             ")");
  }
  return values;
}

void CheckAttrRange(const NodeRef& ref, const char* name, int64_t value, int64_t lo, int64_t hi) {
  if (value < lo || value > hi) {
    ref.Fail(std::string("attribute ") + name + "=" + std::to_string(value) + " outside " +
             std::to_string(lo) + ".." + std::to_string(hi));
  }
}

int64_t CheckOutputShape(const NodeRef& ref, const std::vector<int64_t>& shape) {
  if (shape.empty()) ref.Fail("attribute shape is empty; it needs at least one entry");
  int64_t n = 1;
  for (int64_t dim : shape) {
    if (dim < 1) ref.Fail("attribute shape=" + ShapeString(shape) + " has an entry < 1");
    if (n > kMaxElements / dim) {
      ref.Fail("attribute shape=" + ShapeString(shape) + " has more than 2^48 elements");
    }
    n *= dim;
  }
  return n;
}

std::string ShapeString(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) {
    if (i > 0) s += ", ";
    s += std::to_string(shape[i]);
  }
  return s + "]";
}

TensorView ViewOf(const Ort::ConstValue& value) {
  TensorView view;
  auto info = value.GetTensorTypeAndShapeInfo();
  view.type = info.GetElementType();
  view.shape = info.GetShape();
  view.count = info.GetElementCount();
  view.data = value.GetTensorRawData();
  return view;
}

namespace {

TensorView CheckedView(const Ort::ConstValue& value, const NodeRef& ref, const char* name,
                       ONNXTensorElementDataType type) {
  if (!value.IsTensor()) ref.Fail(std::string("input ") + name + " is not a tensor");
  TensorView view = ViewOf(value);
  if (view.type != type) {
    ref.Fail(std::string("input ") + name + " is " + TypeName(view.type) + ", expected " +
             TypeName(type));
  }
  for (int64_t dim : view.shape) {
    if (dim < 0) ref.Fail(std::string("input ") + name + " has a negative dimension");
  }
  if (view.count > 0 && view.data == nullptr) {
    ref.Fail(std::string("input ") + name + " has no data");
  }
  return view;
}

}  // namespace

TensorView KernelInput(const Ort::KernelContext& ctx, const NodeRef& ref, size_t index,
                       const char* name, ONNXTensorElementDataType type) {
  if (index >= ctx.GetInputCount()) ref.Fail(std::string("input ") + name + " is missing");
  Ort::ConstValue value = ctx.GetInput(index);
  if (value == nullptr) ref.Fail(std::string("input ") + name + " is missing");
  return CheckedView(value, ref, name, type);
}

std::optional<TensorView> ConstantInput(const OrtKernelInfo* info, const NodeRef& ref,
                                        size_t index, const char* name,
                                        ONNXTensorElementDataType type) {
  int is_constant = 0;
  const OrtValue* value = nullptr;
  std::string error =
      TakeStatus(Ort::GetApi().KernelInfoGetConstantInput_tensor(info, index, &is_constant, &value));
  if (!error.empty() || !is_constant || value == nullptr) return std::nullopt;
  return CheckedView(Ort::ConstValue(value), ref, name, type);
}

float* AllocateOutput(const Ort::KernelContext& ctx, const std::vector<int64_t>& shape) {
  Ort::UnownedValue out = ctx.GetOutput(0, shape);
  return out.GetTensorMutableData<float>();
}

void ReadActivationInput(const Ort::KernelContext& ctx, const NodeRef& ref, size_t index,
                         const char* name, ActivationInput& out) {
  const OrtApi& api = Ort::GetApi();
  OrtKernelContext* context = ctx.GetOrtKernelContext();
  const OrtValue* value = nullptr;
  if (TakeStatus(api.KernelContext_GetInput(context, index, &value)) != "" || value == nullptr) {
    ref.Fail(std::string("input ") + name + " is missing");
  }
  OrtTensorTypeAndShapeInfo* info = nullptr;
  if (TakeStatus(api.GetTensorTypeAndShape(value, &info)) != "" || info == nullptr) {
    ref.Fail(std::string("input ") + name + " is not a tensor");
  }
  ONNXTensorElementDataType type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  size_t rank = 0;
  std::string error = TakeStatus(api.GetTensorElementType(info, &type));
  if (error.empty()) error = TakeStatus(api.GetDimensionsCount(info, &rank));
  int64_t* dims = out.inline_dims;
  if (error.empty() && rank > ActivationInput::kInlineRank) {
    out.heap_dims.resize(rank);
    dims = out.heap_dims.data();
  }
  if (error.empty()) error = TakeStatus(api.GetDimensions(info, dims, rank));
  size_t count = 0;
  if (error.empty()) error = TakeStatus(api.GetTensorShapeElementCount(info, &count));
  api.ReleaseTensorTypeAndShapeInfo(info);
  if (!error.empty()) ref.Fail(std::string("input ") + name + ": " + error);
  if (type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) {
    ref.Fail(std::string("input ") + name + " is " + TypeName(type) + ", expected float32");
  }
  for (size_t i = 0; i < rank; ++i) {
    if (dims[i] < 0) ref.Fail(std::string("input ") + name + " has a negative dimension");
  }
  void* data = nullptr;
  if (count > 0) {
    error = TakeStatus(api.GetTensorMutableData(const_cast<OrtValue*>(value), &data));
    if (!error.empty() || data == nullptr) ref.Fail(std::string("input ") + name + " has no data");
  }
  out.data = static_cast<const float*>(data);
  out.count = count;
  out.rank = rank;
}

float* AllocateOutputLike(const Ort::KernelContext& ctx, const ActivationInput& x) {
  const OrtApi& api = Ort::GetApi();
  OrtKernelContext* context = ctx.GetOrtKernelContext();
  OrtValue* out = nullptr;
  Ort::ThrowOnError(api.KernelContext_GetOutput(context, 0, x.dims(), x.rank, &out));
  void* data = nullptr;
  Ort::ThrowOnError(api.GetTensorMutableData(out, &data));
  return static_cast<float*>(data);
}

void CheckPackedCodes(const NodeRef& ref, const TensorView& codes, int64_t n, int bits) {
  if (codes.shape.size() != 1) {
    ref.Fail("codes must be 1-D, got shape " + ShapeString(codes.shape));
  }
  const uint64_t need = RequiredBytes(uint64_t(n), bits);
  if (codes.count < need) {
    ref.Fail("codes has " + std::to_string(codes.count) + " bytes, " + std::to_string(n) +
             " codes of " + std::to_string(bits) + " bits need " + std::to_string(need));
  }
}

namespace {

// Code i read bit by bit; used at the ragged ends of a range.
inline uint8_t CodeAt(const uint8_t* packed, int bits, unsigned mask, size_t i) {
  const size_t bit = i * size_t(bits);
  const size_t byte = bit >> 3;
  const unsigned shift = bit & 7;
  unsigned v = unsigned(packed[byte]) >> shift;
  // Only touch the next byte when the code reaches into it: that byte is
  // then part of the stream, so the read stays inside the buffer.
  if (shift + unsigned(bits) > 8) v |= unsigned(packed[byte + 1]) << (8 - shift);
  return uint8_t(v & mask);
}

// Eight codes occupy exactly `bits` bytes starting at group * bits.
inline uint64_t LoadGroup(const uint8_t* packed, size_t size, int bits, size_t group) {
  const size_t offset = group * size_t(bits);
  uint64_t word = 0;
  if (offset + 8 <= size) {
    std::memcpy(&word, packed + offset, 8);  // bytes past the group are masked off
  } else {
    std::memcpy(&word, packed + offset, size_t(bits));
  }
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
  word = __builtin_bswap64(word);
#endif
  return word;
}

}  // namespace

void UnpackCodes(const uint8_t* packed, size_t size, int bits, size_t first, size_t count,
                 uint8_t* out) {
  const unsigned mask = (1u << bits) - 1;
  const size_t end = first + count;
  size_t i = first;
  for (; i < end && (i & 7) != 0; ++i) *out++ = CodeAt(packed, bits, mask, i);
  for (; i + 8 <= end; i += 8) {
    const uint64_t word = LoadGroup(packed, size, bits, i / 8);
    for (int k = 0; k < 8; ++k) *out++ = uint8_t((word >> (k * bits)) & mask);
  }
  for (; i < end; ++i) *out++ = CodeAt(packed, bits, mask, i);
}

int64_t GatherCodes(const uint8_t* packed, size_t size, int bits, const float* table,
                    size_t row_len, size_t rows, size_t inner, size_t begin, size_t end,
                    float* out, bool check_range) {
  constexpr size_t kBlock = 1024;
  uint8_t codes[kBlock];
  for (size_t start = begin; start < end; start += kBlock) {
    const size_t count = std::min(kBlock, end - start);
    UnpackCodes(packed, size, bits, start, count, codes);
    if (check_range) {
      for (size_t k = 0; k < count; ++k) {
        if (codes[k] >= row_len) return int64_t(start + k);
      }
    }
    // Walk the block one channel segment at a time: no division per element.
    size_t k = 0;
    while (k < count) {
      const size_t i = start + k;
      const size_t row = rows == 1 ? 0 : i / inner;
      const size_t seg_end = rows == 1 ? count : std::min(count, (row + 1) * inner - start);
      const float* t = table + row * row_len;
      for (; k < seg_end; ++k) out[start + k] = t[codes[k]];
    }
  }
  return -1;
}

void DecodeAll(const Ort::KernelContext* ctx, const NodeRef& ref, const uint8_t* packed,
               size_t size, int bits, const float* table, size_t row_len, size_t rows,
               size_t n, float* out) {
  // A full table (2^bits entries) cannot be indexed out of range.
  const bool check_range = row_len < (size_t{1} << bits);
  const size_t inner = n / rows;
  std::atomic<int64_t> first_bad{std::numeric_limits<int64_t>::max()};
  ForChunks(ctx, n, [&](size_t begin, size_t end) {
    const int64_t bad = GatherCodes(packed, size, bits, table, row_len, rows, inner, begin, end,
                                    out, check_range);
    if (bad >= 0) {
      int64_t seen = first_bad.load();
      while (bad < seen && !first_bad.compare_exchange_weak(seen, bad)) {
      }
    }
  });
  const int64_t bad = first_bad.load();
  if (bad != std::numeric_limits<int64_t>::max()) {
    uint8_t code = 0;
    UnpackCodes(packed, size, bits, size_t(bad), 1, &code);
    ref.Fail("code " + std::to_string(code) + " at element " + std::to_string(bad) +
             " is out of range for a table of " + std::to_string(row_len) + " levels");
  }
}

DecodeKernel::DecodeKernel(const OrtKernelInfo* info, NodeRef ref, int min_bits)
    : KernelBase(std::move(ref)) {
  const int64_t bits = IntAttr(info, this->ref(), "bits");
  CheckAttrRange(this->ref(), "bits", bits, min_bits, 8);
  bits_ = int(bits);
  shape_ = IntsAttr(info, this->ref(), "shape");
  n_ = CheckOutputShape(this->ref(), shape_);
}

void DecodeKernel::CacheIfConstant(const OrtKernelInfo* info) {
  auto codes = ConstantInput(info, ref(), 0, "codes", ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8);
  auto param = ConstantInput(info, ref(), 1, ParamName(), ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT);
  if (!codes || !param) return;
  // Check the sizes before allocating n floats for the cache.
  CheckPackedCodes(ref(), *codes, n_, bits_);
  cache_.resize(n());
  Decode(nullptr, *codes, *param, cache_.data());
  cached_ = true;
}

void DecodeKernel::Compute(const Ort::KernelContext& ctx) const {
  if (cached_) {
    float* out = AllocateOutput(ctx, shape_);
    std::memcpy(out, cache_.data(), cache_.size() * sizeof(float));
    return;
  }
  const TensorView codes =
      KernelInput(ctx, ref(), 0, "codes", ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8);
  const TensorView param =
      KernelInput(ctx, ref(), 1, ParamName(), ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT);
  // Checked here too so that a bad run allocates nothing.
  CheckPackedCodes(ref(), codes, n_, bits_);
  float* out = AllocateOutput(ctx, shape_);
  Decode(&ctx, codes, param, out);
}

}  // namespace qconvert
