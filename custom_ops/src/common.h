// Shared pieces of the qconvert kernels: error reporting, attribute and input
// checks, packed-code reading, and chunked parallel loops.
//
// Every kernel follows docs/ops.md; the comments there are the contract.
#pragma once

#include <onnxruntime_cxx_api.h>

#include <array>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

// Hot loops exist twice: an AVX2 build (explicit intrinsics, or the same C++
// compiled with target("avx2")) and a portable one, picked at run time by
// UseAvx2(). AVX2 implies SSE4.1, which makes floorf/nearbyintf single
// instructions; it does not imply FMA, and -ffp-contract=off forbids
// contraction anyway, so both builds round exactly alike.
#if defined(__x86_64__) && defined(__GNUC__)
#define QC_HAVE_AVX2 1
#define QC_TARGET_AVX2 __attribute__((target("avx2")))
#else
#define QC_HAVE_AVX2 0
#define QC_TARGET_AVX2
#endif

namespace qconvert {

// Thrown inside a kernel and turned into an OrtStatus at the C boundary, so
// no C++ exception ever crosses into ONNX Runtime.
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

NodeRef MakeNodeRef(const char* op, const OrtKernelInfo* info);

// True when the AVX2 loops may run: the CPU has AVX2 and the environment
// variable QCONVERT_OPS_PORTABLE is unset or 0 (the tests set it to check that
// the portable loops give the same bits). Read once.
bool UseAvx2();

// ---------------------------------------------------------------- attributes

// A required int attribute; missing or of another type is an error.
int64_t IntAttr(const OrtKernelInfo* info, const NodeRef& ref, const char* name);
std::vector<int64_t> IntsAttr(const OrtKernelInfo* info, const NodeRef& ref, const char* name);

void CheckAttrRange(const NodeRef& ref, const char* name, int64_t value, int64_t lo, int64_t hi);

// Largest element count accepted for an output built from attributes: keeps
// `n * bits` and byte counts far from overflow.
constexpr int64_t kMaxElements = int64_t{1} << 48;

// The `shape` attribute of the decode ops: non-empty, every entry >= 1,
// product <= kMaxElements. Returns the product.
int64_t CheckOutputShape(const NodeRef& ref, const std::vector<int64_t>& shape);

// -------------------------------------------------------------------- inputs

// One input tensor as the kernels see it.
struct TensorView {
  ONNXTensorElementDataType type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  std::vector<int64_t> shape;
  size_t count = 0;
  const void* data = nullptr;

  const float* f32() const { return static_cast<const float*>(data); }
  const uint8_t* u8() const { return static_cast<const uint8_t*>(data); }
};

TensorView ViewOf(const Ort::ConstValue& value);
TensorView KernelInput(const Ort::KernelContext& ctx, const NodeRef& ref, size_t index,
                       const char* name, ONNXTensorElementDataType type);
// The input if it is a constant initializer at kernel creation, else nothing.
std::optional<TensorView> ConstantInput(const OrtKernelInfo* info, const NodeRef& ref,
                                        size_t index, const char* name,
                                        ONNXTensorElementDataType type);

std::string ShapeString(const std::vector<int64_t>& shape);

float* AllocateOutput(const Ort::KernelContext& ctx, const std::vector<int64_t>& shape);

// The float32 input X of an activation op, read with the fewest runtime calls
// (one shape query, no heap allocation up to rank kInlineRank): the per-run
// path when every other input was a constant checked at kernel creation.
struct ActivationInput {
  static constexpr size_t kInlineRank = 8;
  const float* data = nullptr;
  size_t count = 0;
  size_t rank = 0;
  int64_t inline_dims[kInlineRank] = {};
  std::vector<int64_t> heap_dims;  // only for rank > kInlineRank

  const int64_t* dims() const { return rank <= kInlineRank ? inline_dims : heap_dims.data(); }
};

// Input `index` as ActivationInput: must be present, a tensor, float32.
void ReadActivationInput(const Ort::KernelContext& ctx, const NodeRef& ref, size_t index,
                         const char* name, ActivationInput& out);

// Output 0 with X's shape.
float* AllocateOutputLike(const Ort::KernelContext& ctx, const ActivationInput& x);

// ------------------------------------------------------------- packed codes

inline uint64_t RequiredBytes(uint64_t n, int bits) { return (n * uint64_t(bits) + 7) / 8; }

// `codes` must be 1-D uint8 with at least ceil(n * bits / 8) bytes.
void CheckPackedCodes(const NodeRef& ref, const TensorView& codes, int64_t n, int bits);

// Unpacks codes [first, first + count) of a little-endian `bits`-bit stream
// into one byte each. The caller guarantees the stream holds them
// ((first + count) * bits <= 8 * size); no byte past that is read.
void UnpackCodes(const uint8_t* packed, size_t size, int bits, size_t first, size_t count,
                 uint8_t* out);

// out[i] = table[(i / inner) * row_len + code_i] for i in [begin, end), rows
// of one table per output channel (rows == 1: one shared row). With
// `check_range`, codes >= row_len are refused before any table read: the
// function then returns the first offending element index; else -1.
int64_t GatherCodes(const uint8_t* packed, size_t size, int bits, const float* table,
                    size_t row_len, size_t rows, size_t inner, size_t begin, size_t end,
                    float* out, bool check_range);

// Whole-tensor decode with the intra-op thread pool when ctx is given.
// Fails through `ref` on an out-of-range code.
void DecodeAll(const Ort::KernelContext* ctx, const NodeRef& ref, const uint8_t* packed,
               size_t size, int bits, const float* table, size_t row_len, size_t rows,
               size_t n, float* out);

// ----------------------------------------------------------------- parallel

// Chunk length for element-wise loops: a multiple of 8 so that chunks start
// on a byte boundary of any packed stream, and big enough to amortise a
// thread-pool dispatch.
constexpr size_t kChunk = size_t{1} << 15;

// Calls fn(begin, end) over [0, n) in chunks of `chunk` elements (a multiple
// of 8 for packed streams), on ORT's intra-op thread pool when there is more
// than one chunk, else inline with no pool dispatch at all. fn must not throw.
template <class Fn>
void ForChunks(const Ort::KernelContext* ctx, size_t n, Fn&& fn, size_t chunk = kChunk) {
  const size_t chunks = (n + chunk - 1) / chunk;
  if (ctx == nullptr || chunks <= 1) {
    if (n > 0) fn(size_t{0}, n);
    return;
  }
  struct Job {
    Fn* fn;
    size_t n;
    size_t chunk;
  } job{&fn, n, chunk};
  auto run = [](void* user, size_t c) {
    auto* j = static_cast<Job*>(user);
    const size_t begin = c * j->chunk;
    const size_t end = begin + j->chunk < j->n ? begin + j->chunk : j->n;
    (*j->fn)(begin, end);
  };
  ctx->ParallelFor(run, chunks, 0, &job);
}

// ---------------------------------------------------------------- op shells

// Turns a kernel class K into an ORT custom op. K provides kName,
// kInputTypes (a std::array), a constructor K(const OrtKernelInfo*, NodeRef)
// that checks attributes, and Compute(const Ort::KernelContext&).
//
// Built on Ort::CustomOpBase with WithStatus=true (CreateKernelV2 and
// KernelComputeV2) rather than the lite API: both entry points then return an
// OrtStatus, so errors carry our message and never unwind through ORT.
template <class K>
struct StatusKernel : K {
  using K::K;
  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    return Guarded(this->ref().Prefix(), [&] { this->Compute(Ort::KernelContext(context)); });
  }
};

template <class K>
struct KernelOp : Ort::CustomOpBase<KernelOp<K>, StatusKernel<K>, /*WithStatus=*/true> {
  const char* GetName() const { return K::kName; }
  size_t GetInputTypeCount() const { return K::kInputTypes.size(); }
  ONNXTensorElementDataType GetInputType(size_t i) const { return K::kInputTypes[i]; }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }

  OrtStatusPtr CreateKernelV2(const OrtApi&, const OrtKernelInfo* info, void** kernel) const {
    NodeRef ref = MakeNodeRef(K::kName, info);
    const std::string prefix = ref.Prefix();
    return Guarded(prefix, [&] { *kernel = new StatusKernel<K>(info, std::move(ref)); });
  }
};

// Base of every kernel: remembers which node it serves.
class KernelBase {
 public:
  explicit KernelBase(NodeRef ref) : ref_(std::move(ref)) {}
  const NodeRef& ref() const { return ref_; }

 private:
  NodeRef ref_;
};

// Base of the weight-decode ops (LutGather, Pow2Shift): `bits` and `shape`
// attributes, and a decode-once cache. When both inputs are constant
// initializers the weights are decoded at session creation and each run only
// copies them out: ORT never constant-folds a custom-domain node itself.
class DecodeKernel : public KernelBase {
 public:
  DecodeKernel(const OrtKernelInfo* info, NodeRef ref, int min_bits);
  void Compute(const Ort::KernelContext& ctx) const;
  bool cached() const { return cached_; }

 protected:
  // Call at the end of the derived constructor (Decode is virtual).
  void CacheIfConstant(const OrtKernelInfo* info);
  // Checks `codes` and the op's second input, then writes n() floats.
  virtual void Decode(const Ort::KernelContext* ctx, const TensorView& codes,
                      const TensorView& param, float* out) const = 0;
  virtual const char* ParamName() const = 0;

  int bits() const { return bits_; }
  const std::vector<int64_t>& shape() const { return shape_; }
  size_t n() const { return size_t(n_); }

 private:
  int bits_ = 0;
  std::vector<int64_t> shape_;
  int64_t n_ = 0;
  bool cached_ = false;
  std::vector<float> cache_;
};

// The four ops, defined one per source file, registered by register.cc.
const OrtCustomOp* CompandQuantOp();
const OrtCustomOp* AdaptiveStepOp();
const OrtCustomOp* LutGatherOp();
const OrtCustomOp* Pow2ShiftOp();

}  // namespace qconvert
