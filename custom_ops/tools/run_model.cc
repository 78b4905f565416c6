// Runs an exported qconvert model through the ONNX Runtime C++ API with the
// native custom-op library: checks its output against stored values, or times it.
//
//   qconvert_run_model MODEL.onnx LIBRARY.so INPUT.qct EXPECTED.qct [THREADS]
//   qconvert_run_model --time N MODEL.onnx LIBRARY.so [--warmup W] [--threads T]
//                      [--batch B] [--seed S]
//
// Check mode compares the first output, bit for bit, with EXPECTED. .qct files
// ("qconvert tensor"): the 4 bytes "QCT1", a uint32 rank, rank int64 dims,
// then the float32 values, all little-endian. Exit status: 0 when every value
// matches (NaN matches NaN), 1 on a mismatch, 2 on bad usage or an ONNX
// Runtime error.
//
// Timing mode is what a C++ deployment gets from the file: a plain session
// (default options, T intra-op threads, 1 by default) with the library
// registered, fed a fixed random normal input of the model's input shape with
// the batch dimension set to B (default 1). After W warm-up runs (default 10)
// it times N runs and prints one JSON line:
//   {"model": ..., "batch": B, "threads": T, "warmup": W, "runs": N,
//    "median_ms": ..., "p10_ms": ..., "p90_ms": ...}
// (percentiles interpolated linearly between order statistics, as numpy's).
#include <onnxruntime_cxx_api.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <random>
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

int Check(int argc, char** argv) {
  if (argc < 5 || argc > 6) {
    std::fprintf(stderr, "usage: %s MODEL.onnx LIBRARY.so INPUT.qct EXPECTED.qct [THREADS]\n"
                         "       %s --time N MODEL.onnx LIBRARY.so [--warmup W] [--threads T]"
                         " [--batch B] [--seed S]\n",
                 argv[0], argv[0]);
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

// ------------------------------------------------------------------- timing

struct TimingArgs {
  const char* model = nullptr;
  const char* library = nullptr;
  long runs = 0;
  long warmup = 10;
  long threads = 1;
  long batch = 1;
  long seed = 0;
};

// A whole, positive (or >= 0 with allow_zero) integer, else a usage error.
long PositiveArg(const char* flag, const char* text, bool allow_zero = false) {
  char* end = nullptr;
  const long value = std::strtol(text, &end, 10);
  if (end == text || *end != '\0' || value < (allow_zero ? 0 : 1) || value > 1000000000L) {
    throw std::invalid_argument(std::string(flag) + " needs a whole number" +
                                (allow_zero ? " >= 0" : " >= 1") + ", got '" + text + "'");
  }
  return value;
}

TimingArgs ParseTimingArgs(int argc, char** argv) {
  TimingArgs args;
  std::vector<const char*> positional;
  for (int i = 1; i < argc; ++i) {
    const std::string flag = argv[i];
    const bool has_value = i + 1 < argc;
    if (flag == "--time" || flag == "--warmup" || flag == "--threads" || flag == "--batch" ||
        flag == "--seed") {
      if (!has_value) throw std::invalid_argument(flag + " needs a value");
      const char* value = argv[++i];
      if (flag == "--time") args.runs = PositiveArg("--time", value);
      if (flag == "--warmup") args.warmup = PositiveArg("--warmup", value, true);
      if (flag == "--threads") args.threads = PositiveArg("--threads", value);
      if (flag == "--batch") args.batch = PositiveArg("--batch", value);
      if (flag == "--seed") args.seed = PositiveArg("--seed", value, true);
    } else if (flag.rfind("--", 0) == 0) {
      throw std::invalid_argument("unknown option " + flag);
    } else {
      positional.push_back(argv[i]);
    }
  }
  if (positional.size() != 2) {
    throw std::invalid_argument("timing mode needs MODEL.onnx and LIBRARY.so");
  }
  args.model = positional[0];
  args.library = positional[1];
  return args;
}

// The model's first input shape with dimension 0 set to `batch`. Any other
// dimension must be fixed: random data of a guessed size would time nothing real.
std::vector<int64_t> InputShape(const Ort::Session& session, long batch) {
  const auto type = session.GetInputTypeInfo(0);
  const auto info = type.GetTensorTypeAndShapeInfo();
  if (info.GetElementType() != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) {
    throw std::runtime_error("the model's first input is not float32");
  }
  std::vector<int64_t> shape = info.GetShape();
  if (shape.empty()) throw std::runtime_error("the model's first input is a scalar; no batch dim");
  shape[0] = batch;
  for (size_t i = 1; i < shape.size(); ++i) {
    if (shape[i] <= 0) {
      throw std::runtime_error("input dimension " + std::to_string(i) +
                               " is not fixed in the model; timing needs a fixed shape");
    }
  }
  return shape;
}

// numpy.percentile's default: linear between the order statistics around q.
double Percentile(const std::vector<double>& sorted, double q) {
  const double rank = q / 100.0 * double(sorted.size() - 1);
  const size_t lo = size_t(std::floor(rank));
  const size_t hi = std::min(lo + 1, sorted.size() - 1);
  return sorted[lo] + (sorted[hi] - sorted[lo]) * (rank - double(lo));
}

// JSON string contents: quotes, backslashes and control bytes escaped.
std::string JsonEscape(const std::string& text) {
  std::string out;
  for (const char c : text) {
    if (c == '"' || c == '\\') {
      out += '\\';
      out += c;
    } else if (static_cast<unsigned char>(c) < 0x20) {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\u%04x", unsigned(static_cast<unsigned char>(c)));
      out += buf;
    } else {
      out += c;
    }
  }
  return out;
}

int Time(int argc, char** argv) {
  const TimingArgs args = ParseTimingArgs(argc, argv);
  Ort::Env env(ORT_LOGGING_LEVEL_WARNING, "qconvert_run_model");
  Ort::SessionOptions options;
  options.SetIntraOpNumThreads(int(args.threads));
  options.RegisterCustomOpsLibrary(args.library);
  Ort::Session session(env, args.model, options);

  const std::vector<int64_t> shape = InputShape(session, args.batch);
  size_t count = 1;
  for (const int64_t d : shape) count *= size_t(d);
  std::vector<float> values(count);
  std::mt19937 rng(static_cast<uint32_t>(args.seed));
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (float& v : values) v = normal(rng);

  Ort::AllocatorWithDefaultOptions allocator;
  const auto input_name = session.GetInputNameAllocated(0, allocator);
  const auto output_name = session.GetOutputNameAllocated(0, allocator);
  const auto memory = Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault);
  Ort::Value x = Ort::Value::CreateTensor<float>(memory, values.data(), values.size(),
                                                 shape.data(), shape.size());
  const char* input_names[] = {input_name.get()};
  const char* output_names[] = {output_name.get()};
  const Ort::RunOptions run_options{nullptr};
  auto run_once = [&] { session.Run(run_options, input_names, &x, 1, output_names, 1); };

  for (long i = 0; i < args.warmup; ++i) run_once();
  std::vector<double> ms(size_t(args.runs));
  for (double& t : ms) {
    const auto start = std::chrono::steady_clock::now();
    run_once();
    t = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start)
            .count();
  }
  std::sort(ms.begin(), ms.end());
  std::printf(
      "{\"model\": \"%s\", \"batch\": %ld, \"threads\": %ld, \"warmup\": %ld, \"runs\": %ld, "
      "\"median_ms\": %.6g, \"p10_ms\": %.6g, \"p90_ms\": %.6g}\n",
      JsonEscape(args.model).c_str(), args.batch, args.threads, args.warmup, args.runs,
      Percentile(ms, 50), Percentile(ms, 10), Percentile(ms, 90));
  return 0;
}

bool IsTimingMode(int argc, char** argv) {
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--time") == 0) return true;
  }
  return false;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return IsTimingMode(argc, argv) ? Time(argc, argv) : Check(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 2;
  }
}
