// 1x1 stride-1 convolutions (float32, NHWC) as one GEMM over the pixels,
//
//     y[p][0:K] = relu?(x[p][0:C] @ W (C x K) + bias + residual[p]),
//
// by the 6x16 register-tile kernel of gemm_6x16.h. Each 6-pixel x 16-channel tile gets
// its bias, residual and ReLU while in L1 and is stored once: no add or ReLU pass over
// the output afterwards (those passes cost up to 1.8x the conv's own time on ResNet-50's
// residual 1x1 layers at batch 8, where the output is 25 MB).
//
// Threads take blocks of kRowsPerBlock pixels; in a block, each 16-column slab of W
// (C x 16 floats) stays in L1 across its row groups. A direct GEMM keeps NaN and Inf
// where oneDNN's direct convolution puts them (no transform mixes pixels).
#include "conv1x1.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdlib>
#include <vector>

#include "avx2.h"
#include "switches.h"

namespace resnet_fused {
namespace ops {
namespace conv1x1 {
namespace {

constexpr int64_t kRowsPerBlock = 48;  // 8 row groups of 6 pixels
// Each block of rows reads all of W, so W must stay in cache (this GEMM has no blocking
// over C or K). ResNet-50's 1x1 convs at batch 8, time against oneDNN's conv + add_ +
// relu_: 0.56x (64 -> 256, no ReLU), 0.60x (64 -> 256 + residual), 0.92x (64 -> 64),
// 0.96x (256 -> 64), all with W <= 64 KiB; 1.02x-1.57x with W of 128 KiB - 4 MiB.
constexpr int64_t kMaxWeightBytes = int64_t(64) << 10;

#if RESNET_FUSED_AVX2
RESNET_FUSED_AVX2_BEGIN
#include "gemm_6x16.h"

// Rows [row0, row0 + valid) of y, columns [k0, k0 + nr): relu?(tile + bias + residual).
// ReLU as max(0, v) with v second, which returns v when v is NaN (as torch.relu keeps NaN).
static inline void store_tile(const float* tile, int64_t valid, int nr, int64_t row0, int64_t k0, int64_t k,
                              const float* bias, const float* residual, bool relu, float* y) {
  const __m256 zero = _mm256_setzero_ps();
  for (int64_t r = 0; r < valid; ++r) {
    for (int q = 0; q < nr; q += 8) {
      const int64_t offset = (row0 + r) * k + k0 + q;
      __m256 v = _mm256_loadu_ps(tile + r * 16 + q);
      if (bias) {
        v = _mm256_add_ps(v, _mm256_loadu_ps(bias + k0 + q));
      }
      if (residual) {
        v = _mm256_add_ps(v, _mm256_loadu_ps(residual + offset));
      }
      if (relu) {
        v = _mm256_max_ps(zero, v);
      }
      _mm256_storeu_ps(y + offset, v);
    }
  }
}

// Pixels [row0, row0 + count) of x (rows of C floats) through all of W. The last row
// group, when it has fewer than 6 pixels, is copied into ``pad`` (6 rows, sized on first
// need) and zero-filled, so the kernel never reads past x.
static void block(const float* x, int64_t row0, int64_t count, int64_t c, const float* w, int64_t k,
                  const float* bias, const float* residual, bool relu, float* y, std::vector<float>& pad) {
  alignas(32) float tile[6 * 16];
  for (int64_t k0 = 0; k0 < k; k0 += 16) {
    const int nr = k - k0 >= 16 ? 16 : 8;  // K % 8 == 0
    for (int64_t g = 0; g < count; g += 6) {
      const int64_t valid = std::min<int64_t>(6, count - g);
      const float* v = x + (row0 + g) * c;
      if (valid < 6) {
        pad.resize(6 * c);
        std::copy(v, v + valid * c, pad.begin());
        std::fill(pad.begin() + valid * c, pad.end(), 0.f);
        v = pad.data();
      }
      if (nr == 16) {
        gemm_6x16(v, c, w + k0, k, tile, 16, c);
      } else {
        gemm_6x8(v, c, w + k0, k, tile, 16, c);
      }
      store_tile(tile, valid, nr, row0 + g, k0, k, bias, residual, relu, y);
    }
  }
}

RESNET_FUSED_AVX2_END
#endif  // RESNET_FUSED_AVX2

}  // namespace

std::string refusal(const at::Tensor& x, const at::Tensor& weight, const ConvGeometry& g) {
  if (switched_off("RESNET_FUSED_CPU_CONV1X1")) {
    return "RESNET_FUSED_CPU_CONV1X1=0";
  }
  if (x.scalar_type() != at::kFloat) {
    return std::string("dtype ") + c10::toString(x.scalar_type()) + " (the GEMM runs float32 only)";
  }
  if (weight.size(2) != 1 || weight.size(3) != 1 || g.stride[0] != 1 || g.stride[1] != 1 || g.padding[0] != 0 ||
      g.padding[1] != 0 || g.groups != 1) {
    return "not a 1x1 stride-1 unpadded ungrouped conv";
  }
  const int64_t weight_bytes = weight.size(0) * weight.size(1) * int64_t(sizeof(float));
  if (weight_bytes > kMaxWeightBytes) {
    return std::to_string(weight.size(1)) + " -> " + std::to_string(weight.size(0)) + " channels (" +
           std::to_string(weight_bytes >> 10) + " KiB of weight; the GEMM without cache blocking is for at most " +
           std::to_string(kMaxWeightBytes >> 10) + " KiB, oneDNN is faster above)";
  }
  if (weight.size(0) % 8 != 0) {
    return std::to_string(weight.size(0)) + " output channels (needs a multiple of 8)";
  }
  if (x.numel() == 0) {
    return "empty input";
  }
  if (output_memory_format(x) != at::MemoryFormat::ChannelsLast) {
    return "input not channels_last (the GEMM runs NHWC)";
  }
  if (!cpu_has_avx2_fma()) {
    return "this CPU (or build) has no AVX2+FMA kernels";
  }
  return "";
}

at::Tensor pack_weight(const at::Tensor& weight) {
  return weight.detach().reshape({weight.size(0), weight.size(1)}).t().to(at::kFloat).contiguous();
}

at::Tensor conv_bias_act(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias,
                         const std::optional<at::Tensor>& residual, bool relu, const at::Tensor* out) {
#if RESNET_FUSED_AVX2
  const at::Tensor xc = x.contiguous(at::MemoryFormat::ChannelsLast);
  const int64_t c = w.size(0), k = w.size(1);
  const int64_t pixels = x.size(0) * x.size(2) * x.size(3);
  // ``out`` may be the residual: store_tile reads each residual element before it
  // writes that element of y, and no tile touches another's elements.
  at::Tensor y = out != nullptr ? *out
                                : at::empty({x.size(0), k, x.size(2), x.size(3)},
                                            x.options().memory_format(at::MemoryFormat::ChannelsLast));
  TORCH_CHECK(y.is_contiguous(at::MemoryFormat::ChannelsLast), "resnet_fused: the 1x1 GEMM writes dense NHWC");
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  const at::Tensor r = residual.has_value() ? residual->contiguous(at::MemoryFormat::ChannelsLast) : at::Tensor();
  const float* x_ptr = xc.const_data_ptr<float>();
  const float* w_ptr = w.const_data_ptr<float>();
  const float* b_ptr = b.defined() ? b.const_data_ptr<float>() : nullptr;
  const float* r_ptr = r.defined() ? r.const_data_ptr<float>() : nullptr;
  float* y_ptr = y.mutable_data_ptr<float>();
  const int64_t blocks = (pixels + kRowsPerBlock - 1) / kRowsPerBlock;
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> pad;  // allocated only by a block ending in a short row group
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t row0 = blk * kRowsPerBlock;
      block(x_ptr, row0, std::min(kRowsPerBlock, pixels - row0), c, w_ptr, k, b_ptr, r_ptr, relu, y_ptr, pad);
    }
  });
  return y;
#else
  TORCH_CHECK(false, "resnet_fused: the 1x1 GEMM path was not built for this CPU");
#endif
}

}  // namespace conv1x1
}  // namespace ops
}  // namespace resnet_fused
