// Winograd F(4x4, 3x3) convolution for the CPU kernel (float32, NHWC, stride 1), and
// F(2x2, 3x3) where RESNET_FUSED_CPU_WINOGRAD_TILE=2 asks for it (below).
//
// Each 4x4 tile of output pixels comes from the 6x6 patch of input pixels under it:
//
//     Y = A^T [ (G w G^T) (.) (B^T d B) ] A        (Lavin & Gray 2016; points below)
//
// so a tile costs 36 multiply-adds per (input, output) channel pair instead of 144: four
// times fewer in the part that dominates. Per block of tiles, three stages:
//
//   1. input transform (ours, AVX2 over 8 channels at a time): V[p][t][c], p < 36;
//   2. 36 GEMMs, M[p] = V[p] (tiles x C) @ U[p] (C x K);
//   3. output transform (ours): y = relu?(A^T M A + bias + residual), clipped to the
//      output's edge and stored NHWC: the fused epilogue, one write of the output.
//
// U = G w G^T is computed once per fold (the caller caches it like oneDNN's packed
// weights), in float64, stored float32: 4x the weight's bytes. Blocks of tiles bound the
// workspace (buffers reused per thread: a fresh buffer per call cost more than the GEMMs
// at 56x56, in page faults) and keep V and M in cache between the stages, two ways:
//
//   - U up to 4 MiB (C x K up to 128 x 128): each thread takes its own blocks of a few
//     dozen tiles through all three stages, V and M in its L2, the GEMMs by our AVX2
//     6x16 register-tile kernel;
//   - larger U: blocks of a few hundred tiles shared by all threads, so U is read once
//     per block; the transforms split over the threads, the GEMMs by at::bmm (MKL).
//
// Precision: relative error 0.7-0.9e-6 against float64 on ResNet-50's shapes at batch 8
// (measured; oneDNN's direct conv 0.3-0.8e-6), inside DESIGN.md's float32 bound of 1e-5,
// with the GEMMs summing the channels in blocks (kChannelBlock below); over a whole
// network 1.1-1.7x torchvision's own float32 error at 64 px, up to 2.1x on an
// ill-conditioned ResNet-50 at 32 px (benchmarks/NOTES.md, CPU version 7).
//
// F(2x2, 3x3): the same three stages over 2x2 output tiles, 4x4 patches and 16 points
// (0, 1, -1, infinity), so 16 multiply-adds per channel pair for 4 outputs instead of 36
// for 16: 2.25x fewer than a direct conv instead of 4x, but transforms of sums and halves
// only. Measured, batch 8: 0.24-0.47x oneDNN's float32 error, 1.26-1.58x its speed,
// 1.27-1.67x F(4x4)'s time. The opt-in for precision (CPU version 8 in the NOTES).
//
// Non-finite values: Winograd mixes a 6x6 patch into every output of a tile, so one
// NaN/Inf in x would spread over whole tiles, and an overflow inside a transform could
// make a number that a direct convolution keeps finite. Both transforms therefore check
// every value they produce (one FMA each), and a call that meets a non-finite one is
// handed back to the caller to compute directly.
#include "winograd.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/CPUAllocator.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>

#include "avx2.h"
#include "switches.h"

namespace resnet_fused {
namespace ops {
namespace winograd {
namespace {

// Sizes of one call: input N, H, W, C; output channels K and its H, W; tiles per column
// and row. Tile t is (n, i, j) in row-major order: t = (n * tiles_h + i) * tiles_w + j.
struct Grid {
  int64_t n, h, w, c, k, pad_h, pad_w, out_h, out_w, tiles_h, tiles_w;
};

// The 36 GEMMs sum over the input channels in blocks of this many, each block's partial
// sum added to M: float32 rounding in a long running sum dominated Winograd's error (an
// emulation with the GEMMs in float64 and all else as here gave 0.24-0.43e-6, below
// oneDNN's direct conv), and blocks shorten that sum. Measured, batch 8, relative error
// against float64 before -> after: own GEMMs (block 32) 0.90e-6 -> 0.69e-6 at 64x56x56,
// 1.23e-6 -> 0.72e-6 at 128x28x28, 2.5-3% more time (block 16: 0.58e-6, 0.63e-6 for 4-11%);
// MKL's bmm (block 64) 1.18e-6 -> 0.88e-6 at 256x14x14, 1.36e-6 -> 0.91e-6 at 512x7x7,
// 2-5% more time. oneDNN's direct conv: 0.31, 0.42, 0.58, 0.78e-6.
constexpr int64_t kChannelBlock = 32;
constexpr int64_t kBmmChannelBlock = 64;

#if RESNET_FUSED_AVX2
RESNET_FUSED_AVX2_BEGIN
#include "gemm_6x16.h"

// The interpolation points are 0, 1, -1, 1/2, -2 (and infinity). Lavin & Gray's 0, +-1,
// +-2 make the same number of operations but 1.5x the float32 error (1.7e-6 vs 1.1e-6
// relative on ResNet shapes, measured; cf. Barabasz et al., "Error analysis and improving
// the accuracy of Winograd convolution", 2020): a network of 50 such convs doubled its
// error against float64 with the first set.
//
// o = B^T d for one 6-vector of 8-channel lanes (the rows of B^T are
// [1 -3/2 -2 3/2 1 0], [0 -1 1/2 5/2 1 0], [0 1 -5/2 1/2 1 0], [0 -2 -1 2 1 0],
// [0 1/2 -1 -1/2 1 0], [0 1 -3/2 -2 3/2 1]).
static inline void input_1d_4x4(const __m256 d[6], __m256 o[6]) {
  const __m256 half = _mm256_set1_ps(0.5f), one_half = _mm256_set1_ps(1.5f), two = _mm256_set1_ps(2.f),
               two_half = _mm256_set1_ps(2.5f);
  const __m256 d31 = _mm256_sub_ps(d[3], d[1]), d42 = _mm256_sub_ps(d[4], d[2]);
  o[0] = _mm256_fmadd_ps(one_half, d31, _mm256_fnmadd_ps(two, d[2], _mm256_add_ps(d[4], d[0])));
  o[1] = _mm256_fmadd_ps(half, d[2], _mm256_fmadd_ps(two_half, d[3], _mm256_sub_ps(d[4], d[1])));
  o[2] = _mm256_fmadd_ps(half, d[3], _mm256_fnmadd_ps(two_half, d[2], _mm256_add_ps(d[4], d[1])));
  o[3] = _mm256_fmadd_ps(two, d31, d42);
  o[4] = _mm256_fnmadd_ps(half, d31, d42);
  o[5] = _mm256_fmadd_ps(one_half, d42, _mm256_fnmadd_ps(two, d[3], _mm256_add_ps(d[5], d[1])));
}

// o = A^T m (rows [1 1 1 1 1 0], [0 1 -1 1/2 -2 0], [0 1 1 1/4 4 0], [0 1 -1 1/8 -8 1]).
static inline void output_1d_4x4(const __m256 m[6], __m256 o[4]) {
  const __m256 eighth = _mm256_set1_ps(0.125f), quarter = _mm256_set1_ps(0.25f), half = _mm256_set1_ps(0.5f),
               two = _mm256_set1_ps(2.f), four = _mm256_set1_ps(4.f), eight = _mm256_set1_ps(8.f);
  const __m256 s12 = _mm256_add_ps(m[1], m[2]), d12 = _mm256_sub_ps(m[1], m[2]);
  o[0] = _mm256_add_ps(_mm256_add_ps(m[0], s12), _mm256_add_ps(m[3], m[4]));
  o[1] = _mm256_fnmadd_ps(two, m[4], _mm256_fmadd_ps(half, m[3], d12));
  o[2] = _mm256_fmadd_ps(four, m[4], _mm256_fmadd_ps(quarter, m[3], s12));
  o[3] = _mm256_add_ps(_mm256_fnmadd_ps(eight, m[4], _mm256_fmadd_ps(eighth, m[3], d12)), m[5]);
}

// F(2x2, 3x3), the precise tile (points 0, 1, -1 and infinity): o = B^T d with rows
// [1 0 -1 0], [0 1 1 0], [0 -1 1 0], [0 1 0 -1]; o = A^T m with rows [1 1 1 0], [0 1 -1 -1].
static inline void input_1d_2x2(const __m256 d[4], __m256 o[4]) {
  o[0] = _mm256_sub_ps(d[0], d[2]);
  o[1] = _mm256_add_ps(d[1], d[2]);
  o[2] = _mm256_sub_ps(d[2], d[1]);
  o[3] = _mm256_sub_ps(d[1], d[3]);
}

static inline void output_1d_2x2(const __m256 m[4], __m256 o[2]) {
  o[0] = _mm256_add_ps(_mm256_add_ps(m[0], m[1]), m[2]);
  o[1] = _mm256_sub_ps(_mm256_sub_ps(m[1], m[2]), m[3]);
}

// The transforms of an M x M output tile (M = 4 or 2) over its (M + 2)^2 points.
template <int M>
struct Tile {
  static constexpr int kAlpha = M + 2, kPoints = kAlpha * kAlpha;
  static void input_1d(const __m256 d[kAlpha], __m256 o[kAlpha]) {
    if constexpr (M == 4) {
      input_1d_4x4(d, o);
    } else {
      input_1d_2x2(d, o);
    }
  }
  static void output_1d(const __m256 m[kAlpha], __m256 o[M]) {
    if constexpr (M == 4) {
      output_1d_4x4(m, o);
    } else {
      output_1d_2x2(m, o);
    }
  }
};

// acc stays finite while every v added is: v * 0 is NaN exactly for NaN and +-Inf.
static inline __m256 track(__m256 acc, __m256 v) {
  return _mm256_fmadd_ps(v, _mm256_setzero_ps(), acc);
}

static inline bool all_finite(__m256 acc) {
  return _mm256_movemask_ps(_mm256_cmp_ps(acc, acc, _CMP_UNORD_Q)) == 0;
}

// Stage 1 for tiles [t_begin, t_end) of a block starting at tile t_base:
// v[p * v_stride + (t - t_base) * C + c]. False if a value was not finite.
template <int M>
static bool input_transform(const float* x, const Grid& g, int64_t t_begin, int64_t t_end, int64_t t_base, float* v,
                            int64_t v_stride) {
  constexpr int A = Tile<M>::kAlpha;
  const __m256 zero = _mm256_setzero_ps();
  __m256 acc = zero;
  for (int64_t t = t_begin; t < t_end; ++t) {
    const int64_t n = t / (g.tiles_h * g.tiles_w), i = (t / g.tiles_w) % g.tiles_h, j = t % g.tiles_w;
    const float* pixel[A][A];  // the patch's pixels, nullptr in the zero padding
    for (int r = 0; r < A; ++r) {
      for (int s = 0; s < A; ++s) {
        const int64_t h = i * M - g.pad_h + r, w = j * M - g.pad_w + s;
        pixel[r][s] = (h >= 0 && h < g.h && w >= 0 && w < g.w) ? x + ((n * g.h + h) * g.w + w) * g.c : nullptr;
      }
    }
    float* out = v + (t - t_base) * g.c;
    for (int64_t c = 0; c < g.c; c += 8) {
      __m256 rows[A][A];  // rows[r] = B^T applied along the patch's row r
      for (int r = 0; r < A; ++r) {
        __m256 d[A];
        for (int s = 0; s < A; ++s) {
          d[s] = pixel[r][s] ? _mm256_loadu_ps(pixel[r][s] + c) : zero;
        }
        Tile<M>::input_1d(d, rows[r]);
      }
      for (int b = 0; b < A; ++b) {
        __m256 column[A], o[A];
        for (int r = 0; r < A; ++r) {
          column[r] = rows[r][b];
        }
        Tile<M>::input_1d(column, o);
        for (int a = 0; a < A; ++a) {
          _mm256_storeu_ps(out + (a * A + b) * v_stride + c, o[a]);
          acc = track(acc, o[a]);
        }
      }
    }
  }
  return all_finite(acc);
}

// Stage 3 for tiles [t_begin, t_end): y = relu?(A^T M A + bias + residual). ReLU is
// max(0, v) with v second, which returns v when v is NaN (as torch.relu keeps NaN).
template <int M>
static bool output_transform(const float* m, int64_t m_stride, const Grid& g, int64_t t_begin, int64_t t_end,
                             int64_t t_base, const float* bias, const float* residual, bool relu, float* y) {
  constexpr int A = Tile<M>::kAlpha;
  const __m256 zero = _mm256_setzero_ps();
  __m256 acc = zero;
  for (int64_t t = t_begin; t < t_end; ++t) {
    const int64_t n = t / (g.tiles_h * g.tiles_w), i = (t / g.tiles_w) % g.tiles_h, j = t % g.tiles_w;
    const float* in = m + (t - t_base) * g.k;
    for (int64_t k = 0; k < g.k; k += 8) {
      __m256 rows[A][M];  // rows[a] = A^T applied along row a of the tile of M
      for (int a = 0; a < A; ++a) {
        __m256 row[A];
        for (int b = 0; b < A; ++b) {
          row[b] = _mm256_loadu_ps(in + (a * A + b) * m_stride + k);
        }
        Tile<M>::output_1d(row, rows[a]);
      }
      const __m256 bias_k = bias ? _mm256_loadu_ps(bias + k) : zero;
      for (int q = 0; q < M; ++q) {
        __m256 column[A], o[M];
        for (int a = 0; a < A; ++a) {
          column[a] = rows[a][q];
        }
        Tile<M>::output_1d(column, o);
        const int64_t w = j * M + q;
        for (int p = 0; p < M; ++p) {
          const int64_t h = i * M + p;
          if (h >= g.out_h || w >= g.out_w) {
            continue;
          }
          acc = track(acc, o[p]);
          const int64_t offset = ((n * g.out_h + h) * g.out_w + w) * g.k + k;
          __m256 value = _mm256_add_ps(o[p], bias_k);
          if (residual) {
            value = _mm256_add_ps(value, _mm256_loadu_ps(residual + offset));
          }
          if (relu) {
            value = _mm256_max_ps(zero, value);
          }
          _mm256_storeu_ps(y + offset, value);
        }
      }
    }
  }
  return all_finite(acc);
}

// Stage 2 for one block of `rows` tiles (a multiple of 6) held by one thread:
// M[p] (rows x K) = V[p] (rows x C) @ U[p] (C x K) for the `points` p, each sum over the
// channels taken in blocks of kChannelBlock.
static void block_gemms(const float* v, const float* u, float* m, int points, int64_t rows, int64_t c, int64_t k) {
  constexpr int64_t cb = kChannelBlock;
  for (int p = 0; p < points; ++p) {
    const float* vp = v + p * rows * c;
    const float* up = u + p * c * k;
    float* mp = m + p * rows * k;
    int64_t k0 = 0;
    for (; k0 + 16 <= k; k0 += 16) {
      for (int64_t t0 = 0; t0 < rows; t0 += 6) {
        for (int64_t c0 = 0; c0 < c; c0 += cb) {
          gemm_6x16(vp + t0 * c + c0, c, up + c0 * k + k0, k, mp + t0 * k + k0, k, std::min(cb, c - c0), c0 > 0);
        }
      }
    }
    if (k0 < k) {  // K % 16 == 8
      for (int64_t t0 = 0; t0 < rows; t0 += 6) {
        for (int64_t c0 = 0; c0 < c; c0 += cb) {
          gemm_6x8(vp + t0 * c + c0, c, up + c0 * k + k0, k, mp + t0 * k + k0, k, std::min(cb, c - c0), c0 > 0);
        }
      }
    }
  }
}

RESNET_FUSED_AVX2_END
#endif  // RESNET_FUSED_AVX2

// V and M of one block, reused across calls on the calling thread (the pool's workers
// write into the caller's buffer).
class Workspace {
 public:
  float* get(int64_t floats) {
    const size_t bytes = static_cast<size_t>(floats) * sizeof(float);
    if (bytes > bytes_) {
      data_ = c10::GetCPUAllocator()->allocate(bytes);
      bytes_ = bytes;
    }
    return static_cast<float*>(data_.get());
  }

 private:
  c10::DataPtr data_;
  size_t bytes_ = 0;
};

// Winograd only where there are enough tiles to pay for reading U: see refusal().
constexpr int64_t kMaxUBytesPerTile = int64_t(2) << 20;
// Up to this size of U (C x K up to 128 x 128 for F(4x4), 256 x 256 for F(2x2)), each
// thread takes its own blocks of tiles through all three stages, with our GEMM kernel;
// V and M of a block in about kOwnBlockBytes, inside the thread's L2 (512 KiB here).
// Measured for F(4x4) against shared blocks at batch 8: 0.79x the time at 64x56x56,
// 0.71x at 128x28x28, parity at 256x14x14 (where U is 9.4 MB and each block of a few
// tiles reads all of it). F(2x2) at 256x14x14 (U 4 MiB, own blocks): 0.63x the direct
// conv's time.
constexpr int64_t kOwnBlocksMaxU = int64_t(4) << 20;
constexpr int64_t kOwnBlockBytes = int64_t(384) << 10;
// Shared blocks: V and M of a block in at most about kBlockBytes (a workspace kept by
// each calling thread), but at least kMinBlock tiles (the GEMMs' row count) whatever the
// channel counts. Every block reads all of U (9.4 MB at 256 channels, 37.7 MB at 512),
// so fewer, larger blocks won over V and M staying in cache: against 8 MiB blocks,
// 0.87x the time at 256x14x14 batch 8 (one block instead of 113 + 15 tiles) and 0.76x
// at 512x7x7 batch 32.
constexpr int64_t kBlockBytes = int64_t(32) << 20;
constexpr int64_t kMinBlock = 32;

}  // namespace

int tile_size() {
  const char* value = std::getenv("RESNET_FUSED_CPU_WINOGRAD_TILE");
  const std::string setting = value ? value : "";
  TORCH_CHECK(setting.empty() || setting == "4" || setting == "2",
              "RESNET_FUSED_CPU_WINOGRAD_TILE should be 4 (F(4x4,3x3), the default) or 2 (F(2x2,3x3), more "
              "precise), got '", setting, "'");
  return setting == "2" ? 2 : 4;
}

std::string refusal(const at::Tensor& x, const at::Tensor& weight, const ConvGeometry& g) {
  const int m = tile_size();  // first: a bad value is an error on every call, as for the switch
  if (switched_off("RESNET_FUSED_CPU_WINOGRAD")) {
    return "RESNET_FUSED_CPU_WINOGRAD=0";
  }
  if (x.scalar_type() != at::kFloat) {
    return std::string("dtype ") + c10::toString(x.scalar_type()) + " (Winograd runs float32 only)";
  }
  if (weight.size(2) != 3 || weight.size(3) != 3) {
    return "kernel " + std::to_string(weight.size(2)) + "x" + std::to_string(weight.size(3)) + " (needs 3x3)";
  }
  if (g.stride[0] != 1 || g.stride[1] != 1 || g.dilation[0] != 1 || g.dilation[1] != 1 || g.groups != 1) {
    return "stride " + std::to_string(g.stride[0]) + "x" + std::to_string(g.stride[1]) + ", dilation " +
           std::to_string(g.dilation[0]) + "x" + std::to_string(g.dilation[1]) + ", groups " +
           std::to_string(g.groups) + " (needs stride 1, dilation 1, groups 1)";
  }
  if (x.size(1) % 8 != 0 || weight.size(0) % 8 != 0) {
    return std::to_string(x.size(1)) + " input and " + std::to_string(weight.size(0)) +
           " output channels (needs multiples of 8)";
  }
  if (x.numel() == 0) {
    return "empty input";
  }
  // Each tile reads all of U (4x the weight's bytes), so with few tiles a big U is
  // bandwidth: 512 -> 512 channels at 7x7 took 2.3x oneDNN's time at batch 1 (4 tiles,
  // 9.4 MB of U a tile), 1.15x at batch 2, 0.94x at batch 4 and 0.66x at batch 8; at
  // 256 -> 256 channels, 14x14, batch 1 (0.6 MB a tile) it took 0.6x.
  // The same bound per output pixel for F(2x2): 512 KiB a tile.
  const int64_t out_h = x.size(2) + 2 * g.padding[0] - 2, out_w = x.size(3) + 2 * g.padding[1] - 2;
  const int64_t tiles = x.size(0) * ((out_h + m - 1) / m) * ((out_w + m - 1) / m);
  const int64_t u_bytes = (m + 2) * (m + 2) * x.size(1) * weight.size(0) * int64_t(sizeof(float));
  const int64_t max_per_tile = kMaxUBytesPerTile / 16 * m * m;
  if (tiles > 0 && u_bytes / tiles > max_per_tile) {
    const std::string tile = std::to_string(m) + "x" + std::to_string(m);
    return std::to_string(tiles) + " tiles of " + tile + " outputs for " + std::to_string(u_bytes >> 10) +
           " KiB of transformed weight (needs at most " + std::to_string(max_per_tile >> 10) +
           " KiB a tile: with fewer tiles the direct conv is faster)";
  }
  if (output_memory_format(x) != at::MemoryFormat::ChannelsLast) {
    return "input not channels_last (Winograd runs NHWC)";
  }
  if (!cpu_has_avx2_fma()) {
    return "this CPU (or build) has no AVX2+FMA kernels";
  }
  return "";
}

at::Tensor transform_weight(const at::Tensor& weight, int tile) {
  TORCH_CHECK(tile == 4 || tile == 2, "Winograd's output tile should be 4 or 2, got ", tile);
  TORCH_CHECK(weight.dim() == 4 && weight.size(2) == 3 && weight.size(3) == 3,
              "Winograd's weight transform takes a (K, C, 3, 3) weight, got ", weight.sizes());
  // F(4x4): row j of G is (1, a, a^2) / prod_{l != j} (a - a_l) for point a = a_j; the
  // last is infinity's. F(2x2): Lavin & Gray's G for the points 0, 1, -1, infinity.
  static constexpr double kG4[6][3] = {{1., 0., 0.},
                                       {1 / 3., 1 / 3., 1 / 3.},
                                       {-1 / 3., 1 / 3., -1 / 3.},
                                       {-16 / 15., -8 / 15., -4 / 15.},
                                       {1 / 15., -2 / 15., 4 / 15.},
                                       {0., 0., 1.}};
  static constexpr double kG2[4][3] = {{1., 0., 0.}, {.5, .5, .5}, {.5, -.5, .5}, {0., 0., 1.}};
  const int a_points = tile + 2;
  const double* G = tile == 4 ? &kG4[0][0] : &kG2[0][0];
  // (C, 3, 3, K): each tap's row over the output channels contiguous, so the loops below
  // run over k in vectors (a copy of the weight's bytes, small beside U's 4x them).
  const at::Tensor w = weight.detach().to(at::kFloat).permute({1, 2, 3, 0}).contiguous();
  const int64_t c_in = w.size(0), k_out = w.size(3);
  // U[a][b][c][k] = sum_ij G[a][i] w[k][c][i][j] G[b][j], in float64, stored float32:
  // (A*A, C, K), each point's (C, K) matrix the right operand of its GEMM. Direct loops:
  // the einsum they replace cost ~11 ms for a 256x256 weight at every fold, which is
  // paid on every call where the weight is new each time (torch.compile without freezing
  // recomputes the fold in its graph).
  at::Tensor u = at::empty({a_points * a_points, c_in, k_out}, w.options());
  const float* src = w.const_data_ptr<float>();
  float* dst = u.mutable_data_ptr<float>();
  const int64_t plane = c_in * k_out;
  constexpr int64_t kBlock = 64;
  at::parallel_for(0, c_in, 8, [&](int64_t c_begin, int64_t c_end) {
    double gw[6][3][kBlock];  // G w for a block of output channels
    for (int64_t c = c_begin; c < c_end; ++c) {
      for (int64_t k0 = 0; k0 < k_out; k0 += kBlock) {
        const int64_t n = std::min(kBlock, k_out - k0);
        const float* tap = src + c * 9 * k_out + k0;  // tap (i, j) at tap + (3 i + j) k_out
        for (int a = 0; a < a_points; ++a) {
          const double g0 = G[a * 3], g1 = G[a * 3 + 1], g2 = G[a * 3 + 2];
          for (int j = 0; j < 3; ++j) {
            const float* r0 = tap + j * k_out;
            const float* r1 = r0 + 3 * k_out;
            const float* r2 = r1 + 3 * k_out;
            for (int64_t k = 0; k < n; ++k) {
              gw[a][j][k] = g0 * r0[k] + g1 * r1[k] + g2 * r2[k];
            }
          }
        }
        for (int a = 0; a < a_points; ++a) {
          for (int b = 0; b < a_points; ++b) {
            const double h0 = G[b * 3], h1 = G[b * 3 + 1], h2 = G[b * 3 + 2];
            float* out = dst + (a * a_points + b) * plane + c * k_out + k0;
            for (int64_t k = 0; k < n; ++k) {
              out[k] = static_cast<float>(gw[a][0][k] * h0 + gw[a][1][k] * h1 + gw[a][2][k] * h2);
            }
          }
        }
      }
    }
  });
  return u;
}

#if RESNET_FUSED_AVX2
namespace {

template <int M>
std::optional<at::Tensor> run(const at::Tensor& x, const at::Tensor& u, int64_t k, const std::optional<at::Tensor>& bias,
                              const std::optional<at::Tensor>& residual, const ConvGeometry& g, bool relu) {
  constexpr int P = Tile<M>::kPoints;
  const at::Tensor xc = x.contiguous(at::MemoryFormat::ChannelsLast);
  Grid grid{x.size(0), x.size(2), x.size(3), x.size(1), k, g.padding[0], g.padding[1], 0, 0, 0, 0};
  grid.out_h = grid.h + 2 * grid.pad_h - 2;
  grid.out_w = grid.w + 2 * grid.pad_w - 2;
  grid.tiles_h = (grid.out_h + M - 1) / M;
  grid.tiles_w = (grid.out_w + M - 1) / M;
  at::Tensor y = at::empty({grid.n, k, grid.out_h, grid.out_w},
                           x.options().memory_format(at::MemoryFormat::ChannelsLast));
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  const at::Tensor r = residual.has_value() ? residual->contiguous(at::MemoryFormat::ChannelsLast) : at::Tensor();
  const float* x_ptr = xc.const_data_ptr<float>();
  const float* b_ptr = b.defined() ? b.const_data_ptr<float>() : nullptr;
  const float* r_ptr = r.defined() ? r.const_data_ptr<float>() : nullptr;
  float* y_ptr = y.mutable_data_ptr<float>();

  const int64_t tiles = grid.n * grid.tiles_h * grid.tiles_w;
  const int64_t per_tile = P * (grid.c + k);
  std::atomic<bool> finite{true};
  if (P * grid.c * k * int64_t(sizeof(float)) <= kOwnBlocksMaxU) {
    // Each thread runs the three stages over its own blocks of tiles, V and M in its L2.
    const int64_t by_cache = kOwnBlockBytes / (per_tile * int64_t(sizeof(float)));
    const int64_t by_balance = (tiles + 4 * at::get_num_threads() - 1) / (4 * at::get_num_threads());
    const int64_t rows = std::clamp<int64_t>(std::min(by_cache, (by_balance + 5) / 6 * 6) / 6 * 6, 6, 60);
    const int64_t blocks = (tiles + rows - 1) / rows;
    const float* u_ptr = u.const_data_ptr<float>();
    at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
      static thread_local Workspace local;
      float* v_local = local.get(rows * per_tile);
      float* m_local = v_local + P * rows * grid.c;
      for (int64_t blk = begin; blk < end && finite; ++blk) {
        const int64_t start = blk * rows, count = std::min(rows, tiles - start);
        if (count < rows) {  // the GEMMs run whole groups of 6 rows: zero the rows past the end
          for (int p = 0; p < P; ++p) {
            std::fill(v_local + (p * rows + count) * grid.c, v_local + (p + 1) * rows * grid.c, 0.f);
          }
        }
        bool ok = input_transform<M>(x_ptr, grid, start, start + count, start, v_local, rows * grid.c);
        if (ok) {
          block_gemms(v_local, u_ptr, m_local, P, rows, grid.c, k);
          ok = output_transform<M>(m_local, rows * k, grid, start, start + count, start, b_ptr, r_ptr, relu, y_ptr);
        }
        if (!ok) {
          finite = false;
        }
      }
    });
    return finite ? std::optional<at::Tensor>(y) : std::nullopt;
  }
  // Larger U (256 and 512 channels: 9.4 and 37.7 MB): blocks shared by all threads, so U
  // is read once per block; the transforms split over the threads, the GEMMs by MKL's bmm.
  const int64_t widest = std::max(kMinBlock, kBlockBytes / (per_tile * int64_t(sizeof(float))));
  const int64_t n_blocks = (tiles + widest - 1) / widest;
  const int64_t block = (tiles + n_blocks - 1) / n_blocks;  // equal blocks: each one reads all of U
  static thread_local Workspace workspace;
  float* v = workspace.get(block * per_tile);
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  for (int64_t start = 0; start < tiles; start += block) {
    const int64_t count = std::min(block, tiles - start);
    float* m = v + P * count * grid.c;
    at::parallel_for(start, start + count, 1, [&](int64_t begin, int64_t end) {
      if (!input_transform<M>(x_ptr, grid, begin, end, start, v, count * grid.c)) {
        finite = false;
      }
    });
    if (!finite) {
      return std::nullopt;
    }
    at::Tensor m_view = at::from_blob(m, {P, count, k}, f32);
    const at::Tensor v_view = at::from_blob(v, {P, count, grid.c}, f32);
    for (int64_t c0 = 0; c0 < grid.c; c0 += kBmmChannelBlock) {
      const int64_t len = std::min(kBmmChannelBlock, grid.c - c0);
      if (c0 == 0) {
        at::bmm_out(m_view, v_view.narrow(2, c0, len), u.narrow(1, c0, len));
      } else {
        m_view.baddbmm_(v_view.narrow(2, c0, len), u.narrow(1, c0, len));
      }
    }
    at::parallel_for(start, start + count, 1, [&](int64_t begin, int64_t end) {
      if (!output_transform<M>(m, count * k, grid, begin, end, start, b_ptr, r_ptr, relu, y_ptr)) {
        finite = false;
      }
    });
    if (!finite) {
      return std::nullopt;
    }
  }
  return y;
}

}  // namespace
#endif  // RESNET_FUSED_AVX2

std::optional<at::Tensor> conv_bias_act(const at::Tensor& x, const at::Tensor& u, int64_t k,
                                        const std::optional<at::Tensor>& bias,
                                        const std::optional<at::Tensor>& residual, const ConvGeometry& g, bool relu) {
#if RESNET_FUSED_AVX2
  TORCH_CHECK(u.dim() == 3 && (u.size(0) == 36 || u.size(0) == 16),
              "Winograd's transformed weight should be (36 or 16, C, K), got ", u.sizes());
  return u.size(0) == 36 ? run<4>(x, u, k, bias, residual, g, relu) : run<2>(x, u, k, bias, residual, g, relu);
#else
  TORCH_CHECK(false, "resnet_fused: the Winograd path was not built for this CPU");
#endif
}

}  // namespace winograd
}  // namespace ops
}  // namespace resnet_fused
