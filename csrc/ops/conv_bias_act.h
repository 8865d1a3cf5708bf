// The native implementation of resnet_fused::conv_bias_act:
//   y = relu?(conv2d(x, weight, stride, padding, dilation, groups) + bias + residual?)
//
// One schema (ops/conv_bias_act.cpp), one kernel per dispatch key
// (ops/cpu/conv_bias_act_kernel.cpp, ops/cuda/conv_bias_act_kernel.cpp), the fake
// kernel in Python (resnet_fused/backends/native_backend.py). The checks below are
// the ones the Python front and the fake kernel make (resnet_fused.ops).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <array>
#include <optional>
#include <string>
#include <utility>

namespace resnet_fused {
namespace ops {

struct ConvGeometry {
  std::array<int64_t, 2> stride, padding, dilation;
  int64_t groups;
};

inline std::string shape_str(at::IntArrayRef sizes) {
  std::string s = "(";
  for (size_t i = 0; i < sizes.size(); ++i) {
    s += (i ? ", " : "") + std::to_string(sizes[i]);
  }
  return s + (sizes.size() == 1 ? ",)" : ")");
}

// The output's size in one dimension (0: no window fits).
inline int64_t conv_output_size(int64_t in, int64_t taps, int64_t stride, int64_t pad, int64_t dil) {
  // the input's reach past the first window; C++'s / rounds a negative one toward zero,
  // where torch's size rule (Python's //) rounds it down: no window fits either way
  const int64_t span = in + 2 * pad - dil * (taps - 1) - 1;
  return span < 0 ? 0 : span / stride + 1;
}

// Validates one call and returns (geometry, output sizes N, K, P, Q).
inline std::pair<ConvGeometry, std::array<int64_t, 4>> check_conv_bias_act_args(
    const at::Tensor& x,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& residual,
    at::IntArrayRef stride,
    at::IntArrayRef padding,
    at::IntArrayRef dilation,
    int64_t groups) {
  TORCH_CHECK(x.dim() == 4, "x should be 4-D (N, C, H, W), got ", x.dim(), "-D with shape ", shape_str(x.sizes()));
  TORCH_CHECK(weight.dim() == 4, "weight should be 4-D (K, C/groups, R, S), got ", weight.dim(),
              "-D with shape ", shape_str(weight.sizes()));
  TORCH_CHECK(at::isFloatingType(x.scalar_type()),
              "x should be a floating-point tensor (float32, float16, bfloat16, float64), got ", x.scalar_type());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "weight dtype should match x (", x.scalar_type(), "), got ",
              weight.scalar_type());
  TORCH_CHECK(weight.device() == x.device(), "weight should be on x's device (", x.device(), "), got ", weight.device());
  TORCH_CHECK(stride.size() == 2 && stride[0] >= 1 && stride[1] >= 1, "stride should be two ints >= 1, got ", stride);
  TORCH_CHECK(padding.size() == 2 && padding[0] >= 0 && padding[1] >= 0, "padding should be two ints >= 0, got ",
              padding);
  TORCH_CHECK(dilation.size() == 2 && dilation[0] >= 1 && dilation[1] >= 1, "dilation should be two ints >= 1, got ",
              dilation);
  TORCH_CHECK(groups >= 1, "groups should be a positive int, got ", groups);
  const int64_t n = x.size(0), c = x.size(1), k = weight.size(0), c_per_group = weight.size(1);
  TORCH_CHECK(k >= 1, "weight should have at least one output channel, got shape ", shape_str(weight.sizes()));
  TORCH_CHECK(k % groups == 0, "weight's output channels (", k, ") should be divisible by groups (", groups, ")");
  TORCH_CHECK(c == c_per_group * groups, "x should have ", c_per_group * groups, " channels (weight ",
              shape_str(weight.sizes()), " with groups=", groups, "), got ", c, " channels in x of shape ",
              shape_str(x.sizes()));
  std::array<int64_t, 2> out_hw{};
  for (int i = 0; i < 2; ++i) {
    out_hw[i] = conv_output_size(x.size(2 + i), weight.size(2 + i), stride[i], padding[i], dilation[i]);
  }
  TORCH_CHECK(out_hw[0] >= 1 && out_hw[1] >= 1, "the convolution output would be empty (", out_hw[0], "x", out_hw[1],
              "): input ", shape_str(x.sizes().slice(2)), ", kernel ", shape_str(weight.sizes().slice(2)),
              ", stride ", stride, ", padding ", padding, ", dilation ", dilation);
  std::array<int64_t, 4> out{n, k, out_hw[0], out_hw[1]};
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == k, "bias should have shape (", k, ",), got ",
                shape_str(bias->sizes()));
    TORCH_CHECK(bias->scalar_type() == x.scalar_type() && bias->device() == x.device(), "bias should be ",
                x.scalar_type(), " on ", x.device(), ", got ", bias->scalar_type(), " on ", bias->device());
  }
  if (residual.has_value()) {
    TORCH_CHECK(residual->sizes() == at::IntArrayRef(out), "residual should have the output's shape ",
                shape_str(out), ", got ", shape_str(residual->sizes()));
    TORCH_CHECK(residual->scalar_type() == x.scalar_type() && residual->device() == x.device(), "residual should be ",
                x.scalar_type(), " on ", x.device(), ", got ", residual->scalar_type(), " on ", residual->device());
  }
  ConvGeometry geom{{stride[0], stride[1]}, {padding[0], padding[1]}, {dilation[0], dilation[1]}, groups};
  return {geom, out};
}

// The op's output follows its input (resnet_fused/_layout.py): NHWC in -> NHWC out;
// anything else (including a tensor that is both, like C == 1) -> NCHW.
inline at::MemoryFormat output_memory_format(const at::Tensor& x) {
  return x.is_contiguous(at::MemoryFormat::ChannelsLast) && !x.is_contiguous() ? at::MemoryFormat::ChannelsLast
                                                                               : at::MemoryFormat::Contiguous;
}

// Validates the out= tensor of native_conv_bias_act.out: the output's shape, x's dtype and
// device, dense in the output's memory format, and sharing no memory with x, weight or
// bias. It may be the residual itself (its buffer then takes the output: the kernels
// read each residual element before writing that element), but not a partial overlap;
// disjoint slices of one buffer are fine.
// Returns true when out is the residual.
inline bool check_out(const at::Tensor& out, const at::Tensor& x, const at::Tensor& weight,
                      const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual,
                      const std::array<int64_t, 4>& out_sizes) {
  TORCH_CHECK(out.sizes() == at::IntArrayRef(out_sizes), "out should have the output's shape ", shape_str(out_sizes),
              ", got ", shape_str(out.sizes()));
  TORCH_CHECK(out.scalar_type() == x.scalar_type() && out.device() == x.device(), "out should be ", x.scalar_type(),
              " on ", x.device(), ", got ", out.scalar_type(), " on ", out.device());
  const at::MemoryFormat fmt = output_memory_format(x);
  TORCH_CHECK(out.is_contiguous(fmt), "out should be dense in the output's memory format (",
              fmt == at::MemoryFormat::ChannelsLast ? "channels_last" : "contiguous", ", that of x), got strides ",
              out.strides());
  // Memory in common: the bytes each spans meet (a gap inside a span counts, conservatively);
  // other parts of the same buffer are fine.
  const auto span = [](const at::Tensor& t) {
    int64_t last = 0;
    for (int64_t d = 0; d < t.dim(); ++d) {
      last += (t.size(d) - 1) * t.stride(d);
    }
    const auto* first = static_cast<const char*>(t.data_ptr());
    return std::make_pair(first, first + (last + 1) * t.element_size());
  };
  const auto shares = [&](const at::Tensor& t) {
    if (t.numel() == 0 || out.numel() == 0) {
      return false;
    }
    const auto a = span(t), b = span(out);
    return a.first < b.second && b.first < a.second;
  };
  TORCH_CHECK(!shares(x) && !shares(weight) && !(bias.has_value() && shares(*bias)),
              "out should not share memory with x, weight or bias");
  if (!residual.has_value() || !shares(*residual)) {
    return false;
  }
  TORCH_CHECK(residual->data_ptr() == out.data_ptr() && residual->strides() == out.strides(),
              "out may be the residual itself but should not partly overlap it");
  return true;
}

// ``t`` as a view whose size-1 dimensions have the strides its layout gives them
// (contiguous, or channels_last where c10 reads it so); ``t`` itself where it has them
// already or is dense in neither layout. A size-1 dimension's stride addresses nothing,
// so any value is legal and ``contiguous()`` keeps it; but aten's CPU convolution (oneDNN,
// torch 2.11 and 2.14) computes a grouped conv on an NHWC input wrongly when the
// channels_last weight's size-1 kernel dimension (a 1x3 or 3x1 kernel) has another
// stride (benchmarks/NOTES.md): every weight handed to aten's convolution goes through
// this. (The Python twin: resnet_fused._layout.with_canonical_strides.)
inline at::Tensor with_canonical_strides(const at::Tensor& t) {
  const at::IntArrayRef sizes = t.sizes();
  if (t.dim() != 4 || std::find(sizes.begin(), sizes.end(), 1) == sizes.end()) {
    return t;
  }
  const int64_t c = sizes[1], h = sizes[2], w = sizes[3];
  std::array<int64_t, 4> want{};
  if (t.is_contiguous() && t.suggest_memory_format() != at::MemoryFormat::ChannelsLast) {
    want = {c * h * w, h * w, w, 1};
  } else if (t.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    want = {h * w * c, 1, w * c, c};
  } else {
    return t;
  }
  return t.strides() == at::IntArrayRef(want) ? t : t.as_strided(sizes, want);
}

// True when, in one dimension, no output position o and tap t meet
// 0 <= o*stride - pad + t*dil < in: every output pixel's taps lie in the zero padding.
inline bool reads_only_padding_1d(int64_t in, int64_t taps, int64_t stride, int64_t pad, int64_t dil) {
  const int64_t out = conv_output_size(in, taps, stride, pad, dil);
  for (int64_t t = 0; t < taps; ++t) {
    const int64_t lo = pad - t * dil;  // o * stride must reach lo ...
    const int64_t first = lo <= 0 ? 0 : (lo + stride - 1) / stride;
    if (first < out && first * stride - lo < in) {  // ... and stay below lo + in
      return false;
    }
  }
  return true;
}

// Such a conv is zero everywhere (the padding's taps add nothing, even a NaN or Inf
// weight's, as in oneDNN's NHWC conv and our CPU kernels; aten's NCHW CPU conv gives NaN
// there), so its output is the epilogue alone. aten's CPU conv (oneDNN's brgemm kernels,
// torch 2.11 and 2.14) dereferences a null pointer on some of these calls: NHWC input,
// every output column in the padding, a bias or a post-op (benchmarks/NOTES.md).
inline bool reads_only_padding(const at::Tensor& x, const at::Tensor& weight, const ConvGeometry& g) {
  return reads_only_padding_1d(x.size(2), weight.size(2), g.stride[0], g.padding[0], g.dilation[0]) ||
         reads_only_padding_1d(x.size(3), weight.size(3), g.stride[1], g.padding[1], g.dilation[1]);
}

}  // namespace ops
}  // namespace resnet_fused
