// Which build of the hot loops runs.
//
// Hot loops exist twice: an AVX2 build (explicit intrinsics, or the same C++
// compiled with target("avx2")) and a portable one, picked at run time by
// UseAvx2(). AVX2 implies SSE4.1, which makes floorf/nearbyintf single
// instructions; it does not imply FMA, and -ffp-contract=off forbids
// contraction anyway, so both builds round exactly alike.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__)
#define QC_HAVE_AVX2 1
#define QC_TARGET_AVX2 __attribute__((target("avx2")))
#else
#define QC_HAVE_AVX2 0
#define QC_TARGET_AVX2
#endif

namespace qconvert {

// True when the AVX2 loops may run: the CPU has AVX2 and the environment
// variable QCONVERT_OPS_PORTABLE is unset or 0 (the tests set it to check that
// the portable loops give the same bits). Read once.
bool UseAvx2();

}  // namespace qconvert
