// Runs an exported qconvert model through the ONNX Runtime C++ API with the
// native custom-op library and compares its first output, bit for bit, with
// expected values stored next to the model.
//
//   qconvert_run_model MODEL.onnx LIBRARY.so INPUT.qct EXPECTED.qct [THREADS]
//
// .qct files ("qconvert tensor"): the 4 bytes "QCT1", a uint32 rank, rank
// int64 dims, then the float32 values, all little-endian. Exit status: 0 when
// every value matches (NaN matches NaN), 1 on a mismatch, 2 on bad usage or
// an ONNX Runtime error.
#include <onnxruntime_cxx_api.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

struct Tensor {
  std::vector<int64_t> dims;
  std::vector<float> values;
};

Tensor ReadQct(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot open " + path);
  char magic[4];
  uint32_t rank = 0;
  in.read(magic, 4);
  in.read(reinterpret_cast<char*>(&rank), sizeof rank);
  if (!in || std::memcmp(magic, "QCT1", 4) != 0 || rank > 16) {
    throw std::runtime_error(path + " is not a QCT1 file");
  }
  Tensor t;
  t.dims.resize(rank);
  in.read(reinterpret_cast<char*>(t.dims.data()), std::streamsize(rank * sizeof(int64_t)));
  size_t count = 1;
  for (int64_t d : t.dims) {
    if (d < 0 || d > (int64_t{1} << 32)) throw std::runtime_error(path + ": bad dimension");
    count *= size_t(d);
  }
  t.values.resize(count);
  in.read(reinterpret_cast<char*>(t.values.data()), std::streamsize(count * sizeof(float)));
  if (!in) throw std::runtime_error(path + " is shorter than its header says");
  return t;
}

bool SameBits(float a, float b) {
  if (std::isnan(a) || std::isnan(b)) return std::isnan(a) && std::isnan(b);
  return a == b;  // +0 == -0: docs/ops.md lets the sign of zero differ
}

int Compare(const float* actual, const std::vector<int64_t>& actual_dims, const Tensor& expected) {
  if (actual_dims != expected.dims) {
    std::printf("shape mismatch: output rank %zu, expected rank %zu\n", actual_dims.size(),
                expected.dims.size());
    return 1;
  }
  size_t mismatches = 0;
  double max_diff = 0;
  for (size_t i = 0; i < expected.values.size(); ++i) {
    if (!SameBits(actual[i], expected.values[i])) {
      if (mismatches < 5) {
        std::printf("  element %zu: got %.9g, expected %.9g\n", i, double(actual[i]),
                    double(expected.values[i]));
      }
      ++mismatches;
      max_diff = std::fmax(max_diff, std::fabs(double(actual[i]) - double(expected.values[i])));
    }
  }
  std::printf("%zu values compared, %zu mismatches (max |diff| %.3g)\n", expected.values.size(),
              mismatches, max_diff);
  return mismatches == 0 ? 0 : 1;
}

int Run(int argc, char** argv) {
  if (argc < 5 || argc > 6) {
    std::fprintf(stderr, "usage: %s MODEL.onnx LIBRARY.so INPUT.qct EXPECTED.qct [THREADS]\n",
                 argv[0]);
    return 2;
  }
  const int threads = argc == 6 ? std::atoi(argv[5]) : 1;
  Tensor input = ReadQct(argv[3]);
  const Tensor expected = ReadQct(argv[4]);

  Ort::Env env(ORT_LOGGING_LEVEL_WARNING, "qconvert_run_model");
  Ort::SessionOptions options;
  options.SetIntraOpNumThreads(threads);
  options.RegisterCustomOpsLibrary(argv[2]);
  Ort::Session session(env, argv[1], options);

  Ort::AllocatorWithDefaultOptions allocator;
  const auto input_name = session.GetInputNameAllocated(0, allocator);
  const auto output_name = session.GetOutputNameAllocated(0, allocator);
  const auto memory = Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault);
  Ort::Value x = Ort::Value::CreateTensor<float>(memory, input.values.data(), input.values.size(),
                                                 input.dims.data(), input.dims.size());
  const char* input_names[] = {input_name.get()};
  const char* output_names[] = {output_name.get()};
  auto outputs = session.Run(Ort::RunOptions{nullptr}, input_names, &x, 1, output_names, 1);
  const auto info = outputs[0].GetTensorTypeAndShapeInfo();
  if (info.GetElementType() != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) {
    std::printf("output is not float32\n");
    return 1;
  }
  return Compare(outputs[0].GetTensorData<float>(), info.GetShape(), expected);
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return Run(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 2;
  }
}
