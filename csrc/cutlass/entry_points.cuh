// The four entry points every CUTLASS kernel type here exports (conv_bias_act.h), written
// once. ``Impl`` provides: ``Conv`` (a CUTLASS device operator), ``arguments(problem)``,
// ``kernel_function()`` (the __global__ the operator launches), ``kNoImage`` (why the
// kernel cannot run when the GPU has no code for it) and ``refusal(problem)`` (a
// refusal of its own before CUTLASS's can_implement, or nullptr).
#pragma once

#include "cutlass/cutlass.h"

#include "conv_bias_act.h"

namespace resnet_fused {
namespace cutlass_conv {

template <class Impl>
struct EntryPoints {
  static const char* can_implement(const ConvBiasActProblem& pr) {
    if (const char* why = Impl::refusal(pr)) {
      return why;
    }
    cutlass::Status status = Impl::Conv::can_implement(Impl::arguments(pr));
    return status == cutlass::Status::kSuccess ? nullptr : cutlassGetStatusString(status);
  }

  static size_t workspace_size(const ConvBiasActProblem& pr) {
    return Impl::Conv::get_workspace_size(Impl::arguments(pr));
  }

  // nullptr when the current device has machine code (or PTX) for the kernel.
  static const char* check_device() {
    cudaFuncAttributes attributes;
    if (cudaFuncGetAttributes(&attributes, Impl::kernel_function()) != cudaSuccess) {
      cudaGetLastError();  // clear it: the caller falls back, this is not a failure
      return Impl::kNoImage;
    }
    return nullptr;
  }

  static const char* run(const ConvBiasActProblem& pr, void* workspace, cudaStream_t stream) {
    typename Impl::Conv conv;
    cutlass::Status status = conv.initialize(Impl::arguments(pr), workspace, stream);
    if (status == cutlass::Status::kSuccess) {
      status = conv.run(stream);
    }
    if (status != cutlass::Status::kSuccess) {
      cudaGetLastError();  // a failed setup call must not surface in an unrelated later check
      return cutlassGetStatusString(status);
    }
    cudaError_t error = cudaGetLastError();
    return error == cudaSuccess ? nullptr : cudaGetErrorString(error);
  }
};

}  // namespace cutlass_conv
}  // namespace resnet_fused

// Defines NAME_{can_implement,check_device,workspace_size,run} for the kernel type given
// after NAME (declared in conv_bias_act_dispatch.cpp).
#define RESNET_FUSED_CONV_ENTRY_POINTS(NAME, ...)                                                         \
  namespace resnet_fused {                                                                                \
  namespace cutlass_conv {                                                                                \
  using NAME##_t = EntryPoints<__VA_ARGS__>;                                                              \
  const char* NAME##_can_implement(const ConvBiasActProblem& pr) { return NAME##_t::can_implement(pr); }  \
  const char* NAME##_check_device() { return NAME##_t::check_device(); }                                  \
  size_t NAME##_workspace_size(const ConvBiasActProblem& pr) { return NAME##_t::workspace_size(pr); }     \
  const char* NAME##_run(const ConvBiasActProblem& pr, void* ws, cudaStream_t s) {                       \
    return NAME##_t::run(pr, ws, s);                                                                      \
  }                                                                                                       \
  }                                                                                                       \
  }
