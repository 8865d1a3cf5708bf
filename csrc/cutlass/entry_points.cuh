// The four entry points every CUTLASS kernel type here exports (conv_bias_act.h), written
// once. ``Impl`` provides: ``Conv`` (a CUTLASS device operator), ``arguments(problem)``,
// ``kernel_function()`` (the __global__ the operator launches), ``shared_bytes()`` (the
// dynamic shared memory it launches with), ``kNoImage`` (why the kernel cannot run when
// the GPU has no code for it) and ``refusal(problem)`` (a refusal of its own before
// CUTLASS's can_implement, or nullptr).
#pragma once

#include <cstdio>
#include <string>

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

  // nullptr when the current device has machine code (or PTX) for the kernel. Else why
  // not; ``*permanent`` says whether that holds for the process's life (the build has no
  // code for this GPU) or may pass on a later call (under CUDA's lazy loading this call
  // loads the kernel's module, which can also fail for want of memory or from an earlier
  // kernel's error). The text lives until this thread's next call.
  static const char* check_device(bool* permanent) {
    cudaFuncAttributes attributes;
    const cudaError_t error = cudaFuncGetAttributes(&attributes, Impl::kernel_function());
    if (error == cudaSuccess) {
      return nullptr;
    }
    cudaGetLastError();  // clear it: the caller falls back, this is not a failure
    static thread_local std::string why;
    *permanent = error == cudaErrorInvalidDeviceFunction || error == cudaErrorNoKernelImageForDevice;
    why = std::string(*permanent ? Impl::kNoImage : "the kernel could not be loaded") + " (" +
          cudaGetErrorName(error) + ": " + cudaGetErrorString(error) + ")";
    return why.c_str();
  }

  static const char* run(const ConvBiasActProblem& pr, void* workspace, cudaStream_t stream) {
    typename Impl::Conv conv;
    const char* step = "initialize (the kernel's shared-memory attribute)";
    cutlass::Status status = conv.initialize(Impl::arguments(pr), workspace, stream);
    if (status == cutlass::Status::kSuccess) {
      step = "launch";
      status = conv.run(stream);
    }
    // CUTLASS reads and clears the CUDA error itself and returns a generic status, so
    // the kernel's resources are what tells a refused launch's cause.
    const cudaError_t error = cudaGetLastError();  // (cleared: it must not surface in a later, unrelated check)
    if (status == cutlass::Status::kSuccess && error == cudaSuccess) {
      return nullptr;
    }
    static thread_local std::string why;
    why = std::string(step) + " failed: ";
    if (status != cutlass::Status::kSuccess) {
      why += cutlassGetStatusString(status);
    }
    if (error != cudaSuccess) {
      why += std::string(status != cutlass::Status::kSuccess ? ", " : "") + cudaGetErrorName(error) + ": " +
             cudaGetErrorString(error);
    }
    cudaFuncAttributes a;
    if (cudaFuncGetAttributes(&a, Impl::kernel_function()) == cudaSuccess) {
      char facts[256];
      std::snprintf(facts, sizeof(facts),
                    "; the kernel: %d registers/thread, %zu B static + %d B dynamic shared memory (%d B allowed), "
                    "at most %d threads/block, sm_%d binary",
                    a.numRegs, a.sharedSizeBytes, Impl::shared_bytes(), a.maxDynamicSharedSizeBytes,
                    a.maxThreadsPerBlock, a.binaryVersion);
      why += facts;
    } else {
      cudaGetLastError();
    }
    return why.c_str();
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
  const char* NAME##_check_device(bool* permanent) { return NAME##_t::check_device(permanent); }        \
  size_t NAME##_workspace_size(const ConvBiasActProblem& pr) { return NAME##_t::workspace_size(pr); }     \
  const char* NAME##_run(const ConvBiasActProblem& pr, void* ws, cudaStream_t s) {                       \
    return NAME##_t::run(pr, ws, s);                                                                      \
  }                                                                                                       \
  }                                                                                                       \
  }
