// QConvClamp's AVX2 tap loops (qconv_clamp.cc prepares their operands). A translation
// unit of its own because it is compiled at -O2 (see CMakeLists.txt).
#pragma once

#include <cstdint>

namespace qconvert {

constexpr int64_t kLanes = 8;  // int32 lanes of a ymm register
constexpr int64_t kBlock = 4;  // output channels broadcast per position-lane tile

// Requantized outputs: round(clamp(v, lo, hi)) + zero_point, lo and hi relative to the
// zero point (the codes' [lo, hi] minus it).
struct OutRange {
  float lo = 0.0f, hi = 255.0f;
  int32_t zero_point = 0;
};

// One image's convolution over prepared operands. Sums are exact: the int16 sums are
// widened every `run` taps, `run` chosen by the caller so that none can overflow.
struct TileArgs {
  const uint32_t* buf = nullptr;    // input words: 4 channels of one pixel each
  const int64_t* bases = nullptr;   // per run of positions: word offset of tap 0
  const int64_t* dst = nullptr;     // per run of positions: index in an output plane
  int64_t count = 0;                // runs of positions
  const int64_t* taps = nullptr;    // word offset of each tap
  int64_t ntaps = 0;
  int64_t run = 1;                  // taps summed in int16 before widening (>= 1)
  const uint32_t* w = nullptr;      // packed weights for the lane layout
  const int32_t* bias = nullptr;    // padded to a multiple of 8 channels
  const float* scale = nullptr;     // padded to a multiple of 8 channels
  int64_t m = 0;                    // output channels
  int64_t plane_out = 0;            // OH * OW
  OutRange range;
  uint8_t* y = nullptr;             // [M, OH, OW]
};

// Lanes = 8 consecutive output positions of one channel (a run is 8 positions of a row;
// weights [M/4][taps][4 channels] words).
void PositionLanesAvx2(const TileArgs& args);
// Lanes = 8 output channels of one position (a run is one position; weights
// [M/8][taps][8 channels] words).
void ChannelLanesAvx2(const TileArgs& args);

}  // namespace qconvert
