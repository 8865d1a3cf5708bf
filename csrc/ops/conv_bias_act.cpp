// The schema of the native op, and what the library says about its own build.
#include <torch/library.h>

#include <string>

#include "conv_bias_act.h"

#ifndef RESNET_FUSED_CUDA_ARCHS
#define RESNET_FUSED_CUDA_ARCHS ""
#endif
#ifndef RESNET_FUSED_TORCH_VERSION
#define RESNET_FUSED_TORCH_VERSION "unknown"
#endif

namespace resnet_fused {
namespace ops {
namespace {

// A JSON object: what was compiled in, for resnet_fused.extension_info().
std::string build_info() {
  std::string info = "{\"torch_version\": \"" RESNET_FUSED_TORCH_VERSION "\", ";
#ifdef RESNET_FUSED_WITH_CUDA
  info += "\"cuda\": true, \"cuda_archs\": \"" RESNET_FUSED_CUDA_ARCHS "\", ";
#ifdef RESNET_FUSED_WITH_SM90A
  info += "\"cutlass_kernels\": \"sm80_128x128;sm80_64x64;sm90a_128x128\", ";
#else
  info += "\"cutlass_kernels\": \"sm80_128x128;sm80_64x64\", ";
#endif
#ifdef RESNET_FUSED_CUDA_VERSION
  info += "\"cuda_version\": \"" RESNET_FUSED_CUDA_VERSION "\", ";
#endif
#ifdef RESNET_FUSED_CUTLASS_VERSION
  info += "\"cutlass_version\": \"" RESNET_FUSED_CUTLASS_VERSION "\", ";
#endif
#else
  info += "\"cuda\": false, ";
#endif
#ifdef _OPENMP
  // at::parallel_for (inline in ATen's headers) splits the CPU kernels over torch's
  // OpenMP threads only when this library was compiled with OpenMP; otherwise one thread.
  info += "\"cpu_parallel\": \"OpenMP\", ";
#else
  info += "\"cpu_parallel\": \"none\", ";
#endif
  info += "\"cpu\": true}";
  return info;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(resnet_fused, m) {
  m.def(
      "native_conv_bias_act(Tensor x, Tensor weight, Tensor? bias, Tensor? residual, int[2] stride, "
      "int[2] padding, int[2] dilation, int groups, bool relu) -> Tensor");
  // The same, written into ``out`` (which may be the residual itself: a residual block's
  // output then takes its identity's buffer, which is dead after the add). It returns
  // nothing, as torch.compile's functionalization wants of a custom op that mutates.
  m.def(
      "native_conv_bias_act.out(Tensor x, Tensor weight, Tensor? bias, Tensor? residual, int[2] stride, "
      "int[2] padding, int[2] dilation, int groups, bool relu, *, Tensor(a!) out) -> ()");
  // Whether native_conv_bias_act.out with out = residual writes into it directly (no new
  // output computed first); the fused blocks ask before handing over a dead identity.
  m.def(
      "native_conv_bias_act_in_place(Tensor x, Tensor weight, Tensor? residual, int[2] stride, int[2] padding, "
      "int[2] dilation, int groups) -> bool");
  // Which algorithm native_conv_bias_act takes for such a call, and why (for explain()).
  m.def(
      "native_conv_bias_act_path(Tensor x, Tensor weight, Tensor? residual, int[2] stride, int[2] padding, "
      "int[2] dilation, int groups) -> str");
  m.def("native_build_info() -> str", &build_info);
}

}  // namespace ops
}  // namespace resnet_fused
