// Grouped convolutions with 4 channels per group (float32, NHWC), as the first stage of
// ResNeXt 32x4d and 64x4d has (its 3x3 convs of 128 or 256 channels): a direct
// convolution whose register tiles get bias, residual and ReLU before their one store,
//
//     y[n, oh, ow, o] = relu?(sum_{r, s, j<4} x[n, ih, iw, 4 g(o) + j] w[o, j, r, s]
//                             + bias[o] + residual[n, oh, ow, o]).
//
// oneDNN's grouped convolution reaches only 16-28 GFLOP/s here with 4 channels per group
// (2 AVX2 cores; benchmarks/NOTES.md): a group's 4 channels leave its vector loops short.
// A vector of 8 output channels is two whole groups, and the 8 input channels those two
// read are one 32-byte load per pixel and tap; vpermilps broadcasts channel j of each
// group within its 128-bit half, so one load feeds 4 FMAs, and the 4 x 8 weights of a
// tap stay in registers across a tile's P pixels. Measured 1.7-2.1x oneDNN's speed on
// these layers. With 8 or more channels per group the same kind of kernel (broadcasting
// each input channel from memory) was no faster than oneDNN, so those stay there.
//
// The weight is packed once per fold (pack_weight): each tap's 4 x 8 slab of a vector
// contiguous. Threads take (output row, chunk of channel blocks) pairs; in a row, each
// tile of P pixels runs every block of the chunk, so the tile's input is read from
// memory once and from L1 after, while the chunk's weights stay in L1. The next tile's
// input is prefetched. Tiles whose taps reach into the padding check each pixel's taps
// and skip those in the padding, as oneDNN's convolution does (so a NaN or Inf weight
// there leaves the edge pixels finite, as with torch's float32 CPU conv, where a conv
// that multiplies the padding's zeros gives NaN); the other tiles take no checks.
// Otherwise NaN and Inf land where a direct convolution puts them (nothing mixes pixels).
#include "grouped.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>

#include "avx2.h"
#include "switches.h"

namespace resnet_fused {
namespace ops {
namespace grouped {
namespace {

constexpr int64_t kChannelsPerGroup = 4;

// Output pixels per register tile: 7 accumulators, 4 weight vectors, the load and its
// broadcast fit AVX2's 16 registers, and 7 tiles ResNeXt's 56, 28, 14 and 7 exactly.
constexpr int kPixels = 7;

// The weights of the channel blocks that share a tile's input (see row()).
constexpr int64_t kChunkWeightBytes = int64_t(16) << 10;

// Sizes and geometry of one call, in elements.
struct Shape {
  int64_t h, w, c;    // input rows, columns, channels
  int64_t oh, ow, k;  // output rows, columns, channels (c == k)
  int64_t r, s;       // filter rows, columns
  int64_t sh, sw, ph, pw, dh, dw;
};

#if RESNET_FUSED_AVX2
RESNET_FUSED_AVX2_BEGIN

// Output pixels (n, oh, ow0 .. ow0 + P) of channels o0 .. o0 + 8.
struct Tile {
  const float* x;  // image n, pixel (0, 0), channel o0 (the two groups' inputs)
  int64_t oh, ow0;
  const float* w;         // the vector's packed weight: (R, S, 4, 8)
  const float* bias;      // at channel o0, or null
  const float* residual;  // at (n, oh, ow0, o0), or null
  float* y;               // at (n, oh, ow0, o0)
  bool relu;
};

// EDGE: some pixel's tap falls in the padding left or right; each pixel's taps are
// checked and those in the padding skipped, as the rows in the padding are.
template <int P, bool EDGE>
static inline void tile(const Shape& s, const Tile& t) {
  __m256 acc[P];
#pragma GCC unroll 16
  for (int p = 0; p < P; ++p) {
    acc[p] = _mm256_setzero_ps();
  }
  for (int64_t r = 0; r < s.r; ++r) {
    const int64_t ih = t.oh * s.sh - s.ph + r * s.dh;
    if (ih < 0 || ih >= s.h) {
      continue;
    }
    const float* x_row = t.x + ih * s.w * s.c;
    for (int64_t q = 0; q < s.s; ++q) {
      const int64_t iw0 = t.ow0 * s.sw - s.pw + q * s.dw;  // pixel 0's input column
      const float* wt = t.w + (r * s.s + q) * 32;
      const __m256 w0 = _mm256_loadu_ps(wt), w1 = _mm256_loadu_ps(wt + 8), w2 = _mm256_loadu_ps(wt + 16),
                   w3 = _mm256_loadu_ps(wt + 24);
#pragma GCC unroll 16
      for (int p = 0; p < P; ++p) {
        if constexpr (EDGE) {
          const int64_t iw = iw0 + p * s.sw;
          if (iw < 0 || iw >= s.w) {
            continue;
          }
        }
        const __m256 in = _mm256_loadu_ps(x_row + (iw0 + p * s.sw) * s.c);
        __m256 a = acc[p];
        a = _mm256_fmadd_ps(_mm256_permute_ps(in, 0x00), w0, a);
        a = _mm256_fmadd_ps(_mm256_permute_ps(in, 0x55), w1, a);
        a = _mm256_fmadd_ps(_mm256_permute_ps(in, 0xAA), w2, a);
        a = _mm256_fmadd_ps(_mm256_permute_ps(in, 0xFF), w3, a);
        acc[p] = a;
      }
    }
  }
  // relu?(acc + bias + residual); ReLU as max(0, v) with v second, which keeps NaN (as
  // torch.relu does).
  const __m256 bias = t.bias ? _mm256_loadu_ps(t.bias) : _mm256_setzero_ps();
#pragma GCC unroll 16
  for (int p = 0; p < P; ++p) {
    __m256 v = _mm256_add_ps(acc[p], bias);
    if (t.residual) {
      v = _mm256_add_ps(v, _mm256_loadu_ps(t.residual + p * s.k));
    }
    if (t.relu) {
      v = _mm256_max_ps(_mm256_setzero_ps(), v);
    }
    _mm256_storeu_ps(t.y + p * s.k, v);
  }
}

// Where a row's tiles start: image n's row oh, output channel 0.
struct Row {
  const float* x;  // image n, pixel (0, 0), channel 0
  int64_t oh;
  const float* w;
  const float* bias;
  const float* residual;  // at (n, oh, 0, 0), or null
  float* y;               // at (n, oh, 0, 0)
  bool relu;
};

template <int P>
static inline void tile_at(const Shape& s, const Row& row, int64_t block, int64_t ow, bool edge) {
  const int64_t o0 = block * 8;
  const int64_t at = ow * s.k + o0;
  const Tile t{row.x + o0, row.oh, ow, row.w + block * s.r * s.s * 32, row.bias ? row.bias + o0 : nullptr,
               row.residual ? row.residual + at : nullptr, row.y + at, row.relu};
  if (edge) {
    tile<P, true>(s, t);
  } else {
    tile<P, false>(s, t);
  }
}

// One output row for the channel blocks [b0, b1) (8 channels each): tiles of kPixels,
// then of 4, 2 and 1 for what is left; for each tile, every block of the chunk.
static void row(const Shape& s, const Row& row, int64_t b0, int64_t b1) {
  // Output columns [lo, hi) read no padding: ow * sw - pw >= 0 and
  // ow * sw - pw + (S - 1) * dw <= W - 1.
  const int64_t lo = std::min(s.ow, (s.pw + s.sw - 1) / s.sw);
  const int64_t last = s.w - 1 + s.pw - (s.s - 1) * s.dw;  // the largest ow * sw allowed
  const int64_t hi = std::max(lo, std::min(s.ow, last < 0 ? int64_t(0) : last / s.sw + 1));
  const auto edge = [&](int64_t ow, int64_t n) { return ow < lo || ow + n > hi; };
  // The input of the tile at ow (its columns, the chunk's channels), into L1.
  const auto prefetch = [&](int64_t ow) {
    const int64_t iw_first = std::max<int64_t>(0, ow * s.sw - s.pw);
    const int64_t iw_last = std::min<int64_t>(s.w - 1, (ow + kPixels - 1) * s.sw - s.pw + (s.s - 1) * s.dw);
    for (int64_t r = 0; r < s.r; ++r) {
      const int64_t ih = row.oh * s.sh - s.ph + r * s.dh;
      if (ih < 0 || ih >= s.h) {
        continue;
      }
      for (int64_t iw = iw_first; iw <= iw_last; ++iw) {
        const char* first = reinterpret_cast<const char*>(row.x + (ih * s.w + iw) * s.c + b0 * 8);
        const char* end = reinterpret_cast<const char*>(row.x + (ih * s.w + iw) * s.c + b1 * 8);
        for (const char* a = first; a < end; a += 64) {
          _mm_prefetch(a, _MM_HINT_T0);
        }
      }
    }
  };
  int64_t ow = 0;
  for (; ow + kPixels <= s.ow; ow += kPixels) {
    if (ow + kPixels < s.ow) {
      prefetch(ow + kPixels);
    }
    const bool e = edge(ow, kPixels);
    for (int64_t b = b0; b < b1; ++b) {
      tile_at<kPixels>(s, row, b, ow, e);
    }
  }
  for (; ow + 4 <= s.ow; ow += 4) {
    const bool e = edge(ow, 4);
    for (int64_t b = b0; b < b1; ++b) {
      tile_at<4>(s, row, b, ow, e);
    }
  }
  for (; ow + 2 <= s.ow; ow += 2) {
    const bool e = edge(ow, 2);
    for (int64_t b = b0; b < b1; ++b) {
      tile_at<2>(s, row, b, ow, e);
    }
  }
  for (; ow < s.ow; ++ow) {
    const bool e = edge(ow, 1);
    for (int64_t b = b0; b < b1; ++b) {
      tile_at<1>(s, row, b, ow, e);
    }
  }
}

static void run(const Shape& s, int64_t n, const float* x, const float* w, const float* bias, const float* residual,
                bool relu, float* y) {
  const int64_t blocks = s.k / 8;
  const int64_t block_bytes = s.r * s.s * 32 * int64_t(sizeof(float));
  const int64_t per_chunk = std::max<int64_t>(1, std::min(blocks, kChunkWeightBytes / block_bytes));
  const int64_t chunks = (blocks + per_chunk - 1) / per_chunk;
  const int64_t rows = n * s.oh;
  at::parallel_for(0, rows * chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t row_index = item / chunks, chunk = item % chunks;
      const int64_t image = row_index / s.oh, oh = row_index % s.oh;
      const int64_t y_offset = row_index * s.ow * s.k;  // (image, oh, 0, 0)
      const Row r{x + image * s.h * s.w * s.c, oh, w, bias, residual ? residual + y_offset : nullptr,
                  y + y_offset, relu};
      const int64_t b0 = chunk * per_chunk;
      row(s, r, b0, std::min(blocks, b0 + per_chunk));
    }
  });
}

RESNET_FUSED_AVX2_END
#endif  // RESNET_FUSED_AVX2

}  // namespace

std::string refusal(const at::Tensor& x, const at::Tensor& weight, const ConvGeometry& g) {
  if (switched_off("RESNET_FUSED_CPU_GROUPED")) {
    return "RESNET_FUSED_CPU_GROUPED=0";
  }
  if (g.groups == 1) {
    return "not grouped";
  }
  if (x.scalar_type() != at::kFloat) {
    return std::string("dtype ") + c10::toString(x.scalar_type()) + " (the grouped kernel runs float32 only)";
  }
  const int64_t cpg = weight.size(1), kpg = weight.size(0) / g.groups;
  if (cpg != kChannelsPerGroup || kpg != kChannelsPerGroup || weight.size(0) % 8 != 0) {
    return std::to_string(cpg) + " input and " + std::to_string(kpg) + " output channels per group, " +
           std::to_string(weight.size(0)) + " in all (the grouped kernel takes 4 and 4, an even number of groups)";
  }
  if (x.numel() == 0) {
    return "empty input";
  }
  if (output_memory_format(x) != at::MemoryFormat::ChannelsLast) {
    return "input not channels_last (the grouped kernel runs NHWC)";
  }
  if (!cpu_has_avx2_fma()) {
    return "this CPU (or build) has no AVX2+FMA kernels";
  }
  return "";
}

at::Tensor pack_weight(const at::Tensor& weight) {
  const int64_t k = weight.size(0), r = weight.size(2), s = weight.size(3);
  return weight.detach()
      .reshape({k / 8, 8, kChannelsPerGroup, r, s})
      .permute({0, 3, 4, 2, 1})
      .to(at::kFloat)
      .contiguous();
}

at::Tensor conv_bias_act(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias,
                         const std::optional<at::Tensor>& residual, const ConvGeometry& g, bool relu,
                         const at::Tensor* out) {
#if RESNET_FUSED_AVX2
  const at::Tensor xc = x.contiguous(at::MemoryFormat::ChannelsLast);
  const int64_t k = w.size(0) * 8;
  Shape s{x.size(2), x.size(3), x.size(1), 0, 0, k, w.size(1), w.size(2),
          g.stride[0], g.stride[1], g.padding[0], g.padding[1], g.dilation[0], g.dilation[1]};
  s.oh = (s.h + 2 * s.ph - s.dh * (s.r - 1) - 1) / s.sh + 1;
  s.ow = (s.w + 2 * s.pw - s.dw * (s.s - 1) - 1) / s.sw + 1;
  // ``out`` may be the residual: a tile reads each residual element before it writes
  // that element of y, and no tile touches another's elements.
  at::Tensor y = out != nullptr
                     ? *out
                     : at::empty({x.size(0), k, s.oh, s.ow}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  TORCH_CHECK(y.is_contiguous(at::MemoryFormat::ChannelsLast), "resnet_fused: the grouped kernel writes dense NHWC");
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  const at::Tensor res = residual.has_value() ? residual->contiguous(at::MemoryFormat::ChannelsLast) : at::Tensor();
  run(s, x.size(0), xc.const_data_ptr<float>(), w.const_data_ptr<float>(),
      b.defined() ? b.const_data_ptr<float>() : nullptr, res.defined() ? res.const_data_ptr<float>() : nullptr, relu,
      y.mutable_data_ptr<float>());
  return y;
#else
  TORCH_CHECK(false, "resnet_fused: the grouped kernel was not built for this CPU");
#endif
}

}  // namespace grouped
}  // namespace ops
}  // namespace resnet_fused
