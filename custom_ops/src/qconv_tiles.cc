// QConvClamp's AVX2 tap loops: vpmaddubsw products summed in int16, widened to int32
// every `run` taps, requantized and clamped (docs in qconv_clamp.cc). Compiled at -O2
// (CMakeLists.txt); the loops over a tile's R positions and B channel blocks are unrolled
// by pragma so that their sums stay in registers.
#include "qconv_tiles.h"

#include <algorithm>
#include <cstring>

#include "cpu.h"

#if QC_HAVE_AVX2
#include <immintrin.h>
#endif

namespace qconvert {

#if QC_HAVE_AVX2

namespace {

// The two ways a tap's pair sums (vpmaddubsw) join a running sum: in int16, or widened
// at once to int32 (vpmaddwd by 1, as MLAS does) for codes whose single tap may already
// reach the int16 range.
struct AddInt16 {
  QC_TARGET_AVX2 __m256i operator()(__m256i sum, __m256i pairs) const {
    return _mm256_add_epi16(sum, pairs);
  }
};
struct AddWidened {
  QC_TARGET_AVX2 __m256i operator()(__m256i sum, __m256i pairs) const {
    return _mm256_add_epi32(sum, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
  }
};

template <int R, int B>
QC_TARGET_AVX2 inline void SetZero(__m256i (&acc)[R][B]) {
  #pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    #pragma GCC unroll 8
    for (int o = 0; o < B; ++o) acc[r][o] = _mm256_setzero_si256();
  }
}

// Adds taps [t0, t1) into R x B sums.
// Position lanes: a[r] = 8 positions' words (a load), b = one channel's word (broadcast).
// Channel lanes: a[r] = one position's word (broadcast), b = 8 channels' words (a load).
template <int R, int B, bool kChannelLanes, typename Add>
QC_TARGET_AVX2 inline void AddTaps(const uint32_t* const (&at)[R], const int64_t* taps,
                                   int64_t t0, int64_t t1, const uint32_t* w, int64_t stride,
                                   __m256i (&acc)[R][B], Add add) {
  // Channel lanes: weights [M/8][taps][8], so channel vector o is `stride` words on.
  constexpr int64_t kWordsPerTap = kChannelLanes ? kLanes : B;
  for (int64_t t = t0; t < t1; ++t) {
    const uint32_t* wt = w + t * kWordsPerTap;
    const int64_t tap = taps[t];
    __m256i a[R];
    #pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      a[r] = kChannelLanes ? _mm256_set1_epi32(int32_t(at[r][tap]))
                           : _mm256_loadu_si256(reinterpret_cast<const __m256i*>(at[r] + tap));
    }
    #pragma GCC unroll 8
    for (int o = 0; o < B; ++o) {
      const __m256i b =
          kChannelLanes ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wt + o * stride))
                        : _mm256_set1_epi32(int32_t(wt[o]));
      #pragma GCC unroll 8
      for (int r = 0; r < R; ++r) acc[r][o] = add(acc[r][o], _mm256_maddubs_epi16(a[r], b));
    }
  }
}

// acc += v in int16, written into acc's own register: GCC otherwise adds into a new
// register and copies it back, one extra instruction per product (the loop is
// front-end bound).
QC_TARGET_AVX2 inline void AddInPlace(__m256i& acc, __m256i v) {
  asm("vpaddw %1, %0, %0" : "+x"(acc) : "x"(v));
}

// The two full tiles (2 x 4 and 4 x 2) with named sums: GCC keeps 8 named sums in
// registers, where the array form above spills one each tap.
template <bool kChannelLanes, int R, int B>
QC_TARGET_AVX2 inline void AddTaps8(const uint32_t* const (&at)[R], const int64_t* taps,
                                    int64_t t0, int64_t t1, const uint32_t* w, int64_t stride,
                                    __m256i (&acc16)[R][B]) {
  static_assert(R * B == 8 && (R == 2 || R == 4), "tiles of 8 sums");
  // Channel lanes: weights [M/8][taps][8], so channel vector o is `stride` words on.
  constexpr int64_t kWordsPerTap = kChannelLanes ? kLanes : B;
  __m256i s0 = _mm256_setzero_si256(), s1 = s0, s2 = s0, s3 = s0, s4 = s0, s5 = s0, s6 = s0,
          s7 = s0;
  for (int64_t t = t0; t < t1; ++t) {
    const uint32_t* wt = w + t * kWordsPerTap;
    const int64_t tap = taps[t];
    if constexpr (kChannelLanes) {  // R = 4 positions (broadcast), B = 2 channel vectors
      const __m256i b0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wt));
      const __m256i b1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wt + stride));
      __m256i a = _mm256_set1_epi32(int32_t(at[0][tap]));
      AddInPlace(s0, _mm256_maddubs_epi16(a, b0));
      AddInPlace(s1, _mm256_maddubs_epi16(a, b1));
      a = _mm256_set1_epi32(int32_t(at[1][tap]));
      AddInPlace(s2, _mm256_maddubs_epi16(a, b0));
      AddInPlace(s3, _mm256_maddubs_epi16(a, b1));
      a = _mm256_set1_epi32(int32_t(at[2][tap]));
      AddInPlace(s4, _mm256_maddubs_epi16(a, b0));
      AddInPlace(s5, _mm256_maddubs_epi16(a, b1));
      a = _mm256_set1_epi32(int32_t(at[3][tap]));
      AddInPlace(s6, _mm256_maddubs_epi16(a, b0));
      AddInPlace(s7, _mm256_maddubs_epi16(a, b1));
    } else {  // R = 2 position vectors (loads), B = 4 channels (broadcast)
      const __m256i a0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(at[0] + tap));
      const __m256i a1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(at[1] + tap));
      __m256i b = _mm256_set1_epi32(int32_t(wt[0]));
      AddInPlace(s0, _mm256_maddubs_epi16(a0, b));
      AddInPlace(s1, _mm256_maddubs_epi16(a1, b));
      b = _mm256_set1_epi32(int32_t(wt[1]));
      AddInPlace(s2, _mm256_maddubs_epi16(a0, b));
      AddInPlace(s3, _mm256_maddubs_epi16(a1, b));
      b = _mm256_set1_epi32(int32_t(wt[2]));
      AddInPlace(s4, _mm256_maddubs_epi16(a0, b));
      AddInPlace(s5, _mm256_maddubs_epi16(a1, b));
      b = _mm256_set1_epi32(int32_t(wt[3]));
      AddInPlace(s6, _mm256_maddubs_epi16(a0, b));
      AddInPlace(s7, _mm256_maddubs_epi16(a1, b));
    }
  }
  const __m256i sums[8] = {s0, s1, s2, s3, s4, s5, s6, s7};
  #pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) {
    // Channel lanes: sum 2r + o; position lanes: sum 2o + r.
    const int r = kChannelLanes ? i / 2 : i % 2, o = kChannelLanes ? i % 2 : i / 2;
    acc16[r][o] = sums[i];
  }
}

// acc16 = the sums of taps [t0, t1).
template <int R, int B, bool kChannelLanes>
QC_TARGET_AVX2 inline void SumRun(const uint32_t* const (&at)[R], const int64_t* taps, int64_t t0,
                                  int64_t t1, const uint32_t* w, int64_t stride,
                                  __m256i (&acc16)[R][B]) {
  SetZero(acc16);
  if constexpr (R * B == 8) {
    AddTaps8<kChannelLanes, R, B>(at, taps, t0, t1, w, stride, acc16);
  } else {
    AddTaps<R, B, kChannelLanes>(at, taps, t0, t1, w, stride, acc16, AddInt16{});
  }
}

// acc32 = the sums over all taps, the int16 sums widened (vpmaddwd by 1) every `run`
// taps. The int32 sums of a multi-run reduction live in memory during the tap loop so
// that the int16 sums keep the registers.
template <int R, int B, bool kChannelLanes>
QC_TARGET_AVX2 inline void TapLoop(const uint32_t* buf, const int64_t* bases, const int64_t* taps,
                                   int64_t ntaps, int64_t run, const uint32_t* w,
                                   __m256i (&acc32)[R][B]) {
  const __m256i ones = _mm256_set1_epi16(1);
  const uint32_t* at[R];
  #pragma GCC unroll 8
  for (int r = 0; r < R; ++r) at[r] = buf + bases[r];
  if (run == 1) {  // 8-bit codes: one tap fills the int16 range, widen every product
    SetZero(acc32);
    AddTaps<R, B, kChannelLanes>(at, taps, 0, ntaps, w, ntaps * kLanes, acc32, AddWidened{});
    return;
  }
  __m256i acc16[R][B];
  SumRun<R, B, kChannelLanes>(at, taps, 0, std::min(ntaps, run), w, ntaps * kLanes, acc16);
  #pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    #pragma GCC unroll 8
    for (int o = 0; o < B; ++o) acc32[r][o] = _mm256_madd_epi16(acc16[r][o], ones);
  }
  if (run >= ntaps) return;  // one run: the int32 sums never leave the registers
  // Several runs: the int32 sums wait in memory so that the int16 sums keep the registers.
  alignas(32) int32_t wide[R][B][kLanes];
  #pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    #pragma GCC unroll 8
    for (int o = 0; o < B; ++o) {
      _mm256_store_si256(reinterpret_cast<__m256i*>(wide[r][o]), acc32[r][o]);
    }
  }
  for (int64_t t0 = run; t0 < ntaps; t0 += run) {
    SumRun<R, B, kChannelLanes>(at, taps, t0, std::min(ntaps, t0 + run), w, ntaps * kLanes,
                                acc16);
    #pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      #pragma GCC unroll 8
      for (int o = 0; o < B; ++o) {
        auto* dst = reinterpret_cast<__m256i*>(wide[r][o]);
        _mm256_store_si256(dst, _mm256_add_epi32(_mm256_load_si256(dst),
                                                 _mm256_madd_epi16(acc16[r][o], ones)));
      }
    }
  }
  #pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    #pragma GCC unroll 8
    for (int o = 0; o < B; ++o) {
      acc32[r][o] = _mm256_load_si256(reinterpret_cast<const __m256i*>(wide[r][o]));
    }
  }
}

// clamp(round(float(acc + bias) * scale), lo, hi) as 8 bytes (low half of the result).
QC_TARGET_AVX2 inline __m128i Requantize8(__m256i acc, __m256i bias, __m256 scale, const OutRange& range) {
  __m256 f = _mm256_cvtepi32_ps(_mm256_add_epi32(acc, bias));
  f = _mm256_mul_ps(f, scale);
  f = _mm256_min_ps(_mm256_max_ps(f, _mm256_set1_ps(range.lo)), _mm256_set1_ps(range.hi));
  // Half to even in the default rounding mode, then the zero point (the result is in
  // [0, 255] by the clamp, so the saturating packs below are exact).
  const __m256i codes =
      _mm256_add_epi32(_mm256_cvtps_epi32(f), _mm256_set1_epi32(range.zero_point));
  const __m128i words =
      _mm_packs_epi32(_mm256_castsi256_si128(codes), _mm256_extracti128_si256(codes, 1));
  return _mm_packus_epi16(words, words);
}

// Lanes = 8 output positions of one channel: rows whose width is a multiple of 8.
template <int R>
QC_TARGET_AVX2 void PositionTile(const uint32_t* buf, const int64_t* bases, const int64_t* dst,
                                 const int64_t* taps, int64_t ntaps, int64_t run,
                                 const uint32_t* w, const int32_t* bias, const float* scale,
                                 int64_t channels, int64_t plane_out, const OutRange& range,
                                 uint8_t* y) {
  __m256i acc[R][kBlock];
  TapLoop<R, kBlock, false>(buf, bases, taps, ntaps, run, w, acc);
  for (int64_t o = 0; o < channels; ++o) {
    const __m256i b = _mm256_set1_epi32(bias[o]);
    const __m256 s = _mm256_set1_ps(scale[o]);
    #pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      _mm_storel_epi64(reinterpret_cast<__m128i*>(y + o * plane_out + dst[r]),
                       Requantize8(acc[r][o], b, s, range));
    }
  }
}

// Lanes = 8 output channels of one position: narrow rows, no lane wasted.
template <int R, int B>
QC_TARGET_AVX2 void ChannelTile(const uint32_t* buf, const int64_t* bases, const int64_t* dst,
                                const int64_t* taps, int64_t ntaps, int64_t run,
                                const uint32_t* w, const int32_t* bias, const float* scale,
                                int64_t channels, int64_t plane_out, const OutRange& range,
                                uint8_t* y) {
  __m256i acc[R][B];
  TapLoop<R, B, true>(buf, bases, taps, ntaps, run, w, acc);
  #pragma GCC unroll 8
  for (int o = 0; o < B; ++o) {
    const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bias + o * kLanes));
    const __m256 s = _mm256_loadu_ps(scale + o * kLanes);
    const int64_t valid = std::min<int64_t>(kLanes, channels - o * kLanes);
    uint8_t* yo = y + o * kLanes * plane_out;
    __m128i codes[R];
    #pragma GCC unroll 8
    for (int r = 0; r < R; ++r) codes[r] = Requantize8(acc[r][o], b, s, range);
    if constexpr (R == 4) {
      // 4 adjacent positions (ChannelRows checks) x 8 channels -> 4 bytes per channel.
      const __m128i p01 = _mm_unpacklo_epi8(codes[0], codes[1]);
      const __m128i p23 = _mm_unpacklo_epi8(codes[2], codes[3]);
      alignas(16) uint32_t rows[kLanes];
      _mm_store_si128(reinterpret_cast<__m128i*>(rows), _mm_unpacklo_epi16(p01, p23));
      _mm_store_si128(reinterpret_cast<__m128i*>(rows + 4), _mm_unpackhi_epi16(p01, p23));
      for (int64_t i = 0; i < valid; ++i) std::memcpy(yo + i * plane_out + dst[0], &rows[i], 4);
    } else {
      #pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        alignas(16) uint8_t lanes[16];
        _mm_store_si128(reinterpret_cast<__m128i*>(lanes), codes[r]);
        for (int64_t i = 0; i < valid; ++i) yo[i * plane_out + dst[r]] = lanes[i];
      }
    }
  }
}

template <int B>
QC_TARGET_AVX2 void ChannelRows(const TileArgs& a, int64_t m0, int64_t channels) {
  constexpr int kRows = 4;
  const uint32_t* w = a.w + (m0 / kLanes) * a.ntaps * kLanes;
  uint8_t* y = a.y + m0 * a.plane_out;
  int64_t p = 0;
  // A tile of 4 stores one 4-byte row piece per channel: its positions must be adjacent.
  for (; p + kRows <= a.count && a.dst[p + kRows - 1] == a.dst[p] + kRows - 1; p += kRows) {
    ChannelTile<kRows, B>(a.buf, a.bases + p, a.dst + p, a.taps, a.ntaps, a.run, w, a.bias + m0,
                          a.scale + m0, channels, a.plane_out, a.range, y);
  }
  for (; p < a.count; ++p) {  // the tail, or non-adjacent positions, one at a time
    ChannelTile<1, B>(a.buf, a.bases + p, a.dst + p, a.taps, a.ntaps, a.run, w, a.bias + m0,
                      a.scale + m0, channels, a.plane_out, a.range, y);
  }
}

}  // namespace

QC_TARGET_AVX2 void PositionLanesAvx2(const TileArgs& a) {
  for (int64_t m0 = 0; m0 < a.m; m0 += kBlock) {
    const uint32_t* w = a.w + (m0 / kBlock) * a.ntaps * kBlock;
    const int64_t channels = std::min(kBlock, a.m - m0);
    uint8_t* y = a.y + m0 * a.plane_out;
    int64_t k = 0;
    for (; k + 2 <= a.count; k += 2) {
      PositionTile<2>(a.buf, a.bases + k, a.dst + k, a.taps, a.ntaps, a.run, w, a.bias + m0,
                      a.scale + m0, channels, a.plane_out, a.range, y);
    }
    if (k < a.count) {
      PositionTile<1>(a.buf, a.bases + k, a.dst + k, a.taps, a.ntaps, a.run, w, a.bias + m0,
                      a.scale + m0, channels, a.plane_out, a.range, y);
    }
  }
}

QC_TARGET_AVX2 void ChannelLanesAvx2(const TileArgs& a) {
  int64_t m0 = 0;
  for (; m0 + 2 * kLanes <= a.m; m0 += 2 * kLanes) ChannelRows<2>(a, m0, 2 * kLanes);
  for (; m0 < a.m; m0 += kLanes) ChannelRows<1>(a, m0, std::min(kLanes, a.m - m0));
}

#else

void PositionLanesAvx2(const TileArgs&) {}
void ChannelLanesAvx2(const TileArgs&) {}

#endif

}  // namespace qconvert
