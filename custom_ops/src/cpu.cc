#include "cpu.h"

#include <cstdlib>
#include <cstring>

namespace qconvert {

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

}  // namespace qconvert
