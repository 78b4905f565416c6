// Chunked element-wise loops on ONNX Runtime's intra-op thread pool.
#pragma once

#include <onnxruntime_cxx_api.h>

#include <cstddef>

namespace qconvert {

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

}  // namespace qconvert
