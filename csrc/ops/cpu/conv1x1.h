// 1x1 stride-1 convolutions of the CPU kernel as one GEMM over NHWC pixels, with bias,
// residual and ReLU applied to each register tile before it is stored: the output is
// written once, with no add or ReLU pass over it afterwards. See conv1x1.cpp.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string>

#include "../conv_bias_act.h"

namespace resnet_fused {
namespace ops {
namespace conv1x1 {

// Why this call cannot take the GEMM path ("" when it can).
std::string refusal(const at::Tensor& x, const at::Tensor& weight, const ConvGeometry& g);

// The weight (K, C, 1, 1) as the GEMM's right-hand side: (C, K), float32, contiguous.
at::Tensor pack_weight(const at::Tensor& weight);

// relu?(x @ w + bias + residual) for x NHWC float32 and ``w`` from pack_weight, into
// ``out`` when given (dense NHWC float32; it may be the residual itself), else a new tensor.
at::Tensor conv_bias_act(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias,
                         const std::optional<at::Tensor>& residual, bool relu, const at::Tensor* out = nullptr);

}  // namespace conv1x1
}  // namespace ops
}  // namespace resnet_fused
