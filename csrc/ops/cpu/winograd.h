// Winograd F(4x4, 3x3) (or F(2x2, 3x3)) for the CPU kernel of
// resnet_fused::native_conv_bias_act: the stride-1 3x3 convolutions of a ResNet in float32,
// NHWC, with bias, residual and ReLU fused into the output transform. See winograd.cpp for
// the algorithm and its limits.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string>

#include "../conv_bias_act.h"

namespace resnet_fused {
namespace ops {
namespace winograd {

// The output tile's side: 4 (F(4x4,3x3), the default) or 2 (F(2x2,3x3): 2.25x fewer
// multiplies than a direct conv instead of 4x, float32 error below the direct conv's), from
// RESNET_FUSED_CPU_WINOGRAD_TILE; any other value is an error naming the two.
int tile_size();

// Why this call cannot take the Winograd path ("" when it can): dtype, layout, kernel
// size, stride, dilation, groups, channel counts, the CPU's instruction set, or the
// RESNET_FUSED_CPU_WINOGRAD=0 knob.
std::string refusal(const at::Tensor& x, const at::Tensor& weight, const ConvGeometry& g);

// The weight (K, C, 3, 3) transformed once for an output tile of `tile` (4 or 2): G w G^T
// per (K, C) pair, computed in float64 and stored float32 as (tile + 2)^2 matrices of
// C x K, shape (36 or 16, C, K).
at::Tensor transform_weight(const at::Tensor& weight, int tile);

// relu?(conv3x3(x, w) + bias + residual) with x NHWC float32 and ``u`` from
// transform_weight (its first dimension says the tile). Returns nullopt when a value met
// on the way was not finite (a NaN or Inf in x or w, or an overflow inside a transform):
// Winograd would spread it over whole output tiles, so the caller recomputes such a call
// directly and NaN/Inf land exactly where a direct convolution puts them.
std::optional<at::Tensor> conv_bias_act(const at::Tensor& x, const at::Tensor& u, int64_t k,
                                        const std::optional<at::Tensor>& bias,
                                        const std::optional<at::Tensor>& residual, const ConvGeometry& g, bool relu);

}  // namespace winograd
}  // namespace ops
}  // namespace resnet_fused
