// Grouped convolutions with 4 channels per group (the first stage of ResNeXt 32x4d and
// 64x4d) for the CPU kernel of resnet_fused::native_conv_bias_act: a direct convolution
// over NHWC float32 with bias, residual and ReLU applied to each register tile before it
// is stored. See grouped.cpp for the kernel and why oneDNN is slow there.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string>

#include "../conv_bias_act.h"

namespace resnet_fused {
namespace ops {
namespace grouped {

// Why this call cannot take the grouped path ("" when it can): dtype, layout, groups,
// channels per group (4 in and 4 out, an even number of groups), the CPU's instruction
// set, or the RESNET_FUSED_CPU_GROUPED=0 knob.
std::string refusal(const at::Tensor& x, const at::Tensor& weight, const ConvGeometry& g);

// The weight (K, 4, R, S) in the kernel's order: for each vector of 8 output channels
// (two groups), its R x S taps, each a 4 x 8 slab: shape (K/8, R, S, 4, 8), float32,
// contiguous.
at::Tensor pack_weight(const at::Tensor& weight);

// relu?(conv(x, w, groups) + bias + residual) for x NHWC float32 and ``w`` from
// pack_weight, into ``out`` when given (dense NHWC float32; it may be the residual
// itself), else a new tensor.
at::Tensor conv_bias_act(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias,
                         const std::optional<at::Tensor>& residual, const ConvGeometry& g, bool relu,
                         const at::Tensor* out = nullptr);

}  // namespace grouped
}  // namespace ops
}  // namespace resnet_fused
