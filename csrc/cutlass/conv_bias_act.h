// CUTLASS implicit-GEMM conv fprop with the whole epilogue fused:
//   y = relu?(conv2d(x, w) + bias + residual?)
// A plain launch interface (pointers, sizes, stream) so the CUTLASS templates live in
// torch-free translation units that compile fast and in parallel.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>

namespace resnet_fused {
namespace cutlass_conv {

enum class Element { kFloat16, kBFloat16 };

// The kernels compiled in, each for both element types and both activations:
// sm80 (mma.sync, cp.async; runs on sm80 through sm90) with a 128x128 tile (3 stages)
// for large problems or a 64x64 tile (4 stages) for small ones (few output rows at
// batch 1, or 64 output channels) where a 128x128 grid leaves SMs idle; and sm90a
// (TMA + wgmma, 128x128; compute capability 9.0 only, built where 90 is in the arch list).
enum class Variant { kSm80Tile128, kSm80Tile64, kSm90aTile128 };

// One instantiation.
struct KernelKey {
  Element element;
  Variant variant;
  bool relu;
};

// "sm80_128x128", "sm80_64x64", "sm90a_128x128": the names RESNET_FUSED_CUTLASS_KERNEL takes.
const char* variant_name(Variant variant);

// Whether this build holds the sm90a kernels.
bool has_sm90a();

// Every pointer 16-byte aligned.
struct ConvBiasActProblem {
  const void* x;         // N x H x W x C, packed NHWC
  const void* weight;    // K x R x S x C, packed KRSC (a channels_last (K, C, R, S) weight)
  const void* bias;      // K values, the element type, or nullptr (zeros)
  const void* residual;  // N x P x Q x K packed NHWC, or nullptr
  void* y;               // N x P x Q x K packed NHWC
  int n, h, w, c, k, r, s, p, q;
  int pad_h, pad_w, stride_h, stride_w, dilation_h, dilation_w;
  int sm_count;          // the GPU's multiprocessors (the sm90 kernels' grid)
};

// nullptr when the kernel takes the problem, else why it does not.
const char* can_implement(const KernelKey& key, const ConvBiasActProblem& problem);

// nullptr when the current device can run the kernel (this build has its machine
// code or PTX for the device's architecture), else why not, with ``*permanent`` true
// where that holds for the process's life (no code for this GPU) and false where a
// later call may pass (the module failed to load, e.g. for want of device memory).
// The text lives until this thread's next call.
const char* check_device(const KernelKey& key, bool* permanent);

// Bytes of device workspace `run` needs (0 for these kernels; asked for all the same).
size_t workspace_size(const KernelKey& key, const ConvBiasActProblem& problem);

// Launches on `stream`. nullptr on success, else what failed: the step (initialize or
// launch), CUTLASS's status, the CUDA error, and the kernel's registers and shared
// memory. The text lives until this thread's next call.
const char* run(const KernelKey& key, const ConvBiasActProblem& problem, void* workspace, cudaStream_t stream);

}  // namespace cutlass_conv
}  // namespace resnet_fused
