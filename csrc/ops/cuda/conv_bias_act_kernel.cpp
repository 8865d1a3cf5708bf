// CUDA kernel of resnet_fused::native_conv_bias_act.
//
// fp16/bf16 NHWC convs run a CUTLASS implicit GEMM with the epilogue fused
// (csrc/cutlass/: sm80 kernels with two tiles, and sm90a ones where built). Everything that kernel refuses -- the 3-channel stem, grouped
// convs, float32, NCHW activations, a misaligned pointer, an architecture this build
// has no code for -- takes cuDNN's conv with bias, then the residual add and ReLU in
// place. Not cuDNN's fused conv+add+ReLU (cudnn_convolution_add_relu): cuDNN's ReLU is
// reported to map NaN to 0 (as oneDNN's does on the CPU, measured), and a garbage input
// must not come out as plausible numbers; torch.relu keeps NaN. The path and the
// reason are what native_conv_bias_act_path returns.
//
// This file holds no device code, so the host compiler builds it; the CUTLASS
// templates are in torch-free .cu units behind a plain launch interface.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime_api.h>

#include <cstdlib>
#include <limits>
#include <map>
#include <mutex>
#include <set>
#include <string>
#include <tuple>

#include "../../cutlass/conv_bias_act.h"
#include "../conv_bias_act.h"

namespace resnet_fused {
namespace ops {
namespace {

namespace cc = resnet_fused::cutlass_conv;

// The largest stride, padding or dilation handed to CUTLASS, whose problem holds ints
// (sizes are bounded by the 2^30-element check).
constexpr int64_t kMaxGeometry = 1 << 16;

struct DeviceFacts {
  int capability;  // major * 10 + minor
  int sm_count;
};

const DeviceFacts& device_facts(int device) {
  static std::mutex mutex;
  static std::map<int, DeviceFacts> cache;
  std::lock_guard<std::mutex> lock(mutex);
  auto it = cache.find(device);
  if (it != cache.end()) {
    return it->second;
  }
  int major = 0, minor = 0, sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return cache[device] = DeviceFacts{major * 10 + minor, sms};
}

// Why an instantiation cannot run on a device, kept for the process's life: the build has
// no code for the GPU (checked once), or the kernel failed to launch (its resources were
// refused: that will not change, so the call is not retried and warned about per conv).
// A module that failed to load for another reason (device memory, an earlier kernel's
// error) is asked again on the next call.
class KernelFailures {
 public:
  using Key = std::tuple<int, int, int, bool>;

  static Key key_of(int device, const cc::KernelKey& key) {
    return std::make_tuple(device, static_cast<int>(key.element), static_cast<int>(key.variant), key.relu);
  }

  // Empty when the kernel may run, else why not.
  std::string check(int device, const cc::KernelKey& key) {
    const Key k = key_of(device, key);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto it = failures_.find(k);
      if (it != failures_.end()) {
        return it->second;
      }
      if (checked_.count(k)) {
        return "";
      }
    }
    bool permanent = false;
    const char* why = cc::check_device(key, &permanent);
    std::lock_guard<std::mutex> lock(mutex_);
    if (why == nullptr) {
      checked_.insert(k);
      return "";
    }
    if (permanent) {
      failures_[k] = why;
    }
    return why;
  }

  void launch_failed(int device, const cc::KernelKey& key, const std::string& why) {
    std::lock_guard<std::mutex> lock(mutex_);
    failures_[key_of(device, key)] = "it failed to launch earlier in this process (" + why + ")";
  }

 private:
  std::mutex mutex_;
  std::set<Key> checked_;
  std::map<Key, std::string> failures_;
};

KernelFailures& kernel_failures() {
  static KernelFailures failures;
  return failures;
}

// The sm80 tile for a problem: the 64x64 one where a 128x128 grid would not cover the GPU
// twice or the conv has at most 64 output channels (half of a 128-wide tile would idle),
// else the 128x128 one.
cc::Variant sm80_variant(const cc::ConvBiasActProblem& p) {
  const int64_t rows = static_cast<int64_t>(p.n) * p.p * p.q;
  const int64_t tiles = ((rows + 127) / 128) * ((p.k + 127) / 128);
  return p.k <= 64 || tiles < 2 * p.sm_count ? cc::Variant::kSm80Tile64 : cc::Variant::kSm80Tile128;
}

// RESNET_FUSED_CUTLASS_KERNEL=sm80_128x128|sm80_64x64|sm90a_128x128 forces a kernel (for
// measuring); "auto" (default) takes sm80_variant. The sm90a kernel is opt-in until it has
// been checked and timed on a Hopper GPU (benchmarks/NOTES.md); where it refuses a call
// (not Hopper, a TMA limit), the sm80 kernel takes it (cutlass_refusal).
cc::Variant choose_variant(const cc::ConvBiasActProblem& p) {
  const char* forced = std::getenv("RESNET_FUSED_CUTLASS_KERNEL");
  if (forced != nullptr && *forced != '\0' && std::string(forced) != "auto") {
    for (cc::Variant v : {cc::Variant::kSm80Tile128, cc::Variant::kSm80Tile64, cc::Variant::kSm90aTile128}) {
      if (std::string(forced) == cc::variant_name(v)) {
        return v;
      }
    }
    TORCH_CHECK(false, "RESNET_FUSED_CUTLASS_KERNEL should be auto, sm80_128x128, sm80_64x64 or sm90a_128x128, got '",
                forced, "'");
  }
  return sm80_variant(p);
}

bool aligned16(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0; }

cc::ConvBiasActProblem problem_for(const at::Tensor& x, const at::Tensor& weight, const ConvGeometry& g,
                                   const std::array<int64_t, 4>& out) {
  cc::ConvBiasActProblem p{};
  p.sm_count = device_facts(x.get_device()).sm_count;
  p.n = static_cast<int>(x.size(0));
  p.c = static_cast<int>(x.size(1));
  p.h = static_cast<int>(x.size(2));
  p.w = static_cast<int>(x.size(3));
  p.k = static_cast<int>(weight.size(0));
  p.r = static_cast<int>(weight.size(2));
  p.s = static_cast<int>(weight.size(3));
  p.p = static_cast<int>(out[2]);
  p.q = static_cast<int>(out[3]);
  p.pad_h = static_cast<int>(g.padding[0]);
  p.pad_w = static_cast<int>(g.padding[1]);
  p.stride_h = static_cast<int>(g.stride[0]);
  p.stride_w = static_cast<int>(g.stride[1]);
  p.dilation_h = static_cast<int>(g.dilation[0]);
  p.dilation_w = static_cast<int>(g.dilation[1]);
  return p;
}

cc::KernelKey kernel_key(const at::Tensor& x, const cc::ConvBiasActProblem& p, bool relu) {
  return cc::KernelKey{x.scalar_type() == at::kHalf ? cc::Element::kFloat16 : cc::Element::kBFloat16,
                       choose_variant(p), relu};
}

// Empty when a CUTLASS kernel takes the call (``chosen`` then names it; ``note`` says why
// not the sm90a one where that was forced and refused), else why not.
std::string cutlass_refusal(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& residual,
                            const ConvGeometry& g, const std::array<int64_t, 4>& out, bool relu,
                            cc::KernelKey* chosen, std::string* note = nullptr) {
  const auto dtype = x.scalar_type();
  if (x.numel() == 0 || weight.numel() == 0) {
    return "empty input or weight";
  }
  if (dtype != at::kHalf && dtype != at::kBFloat16) {
    return std::string("the CUTLASS kernels take float16 and bfloat16, got ") + c10::toString(dtype);
  }
  const int capability = device_facts(x.get_device()).capability;
  if (capability < 80) {
    return "compute capability " + std::to_string(capability / 10) + "." + std::to_string(capability % 10) +
           " (the CUTLASS kernels need 8.0+)";
  }
  if (g.groups != 1) {
    return "grouped conv (groups=" + std::to_string(g.groups) + ")";
  }
  if (output_memory_format(x) != at::MemoryFormat::ChannelsLast) {
    return "x is not channels_last (NHWC); the output follows x's layout";
  }
  if (x.size(1) % 8 != 0 || weight.size(0) % 8 != 0) {
    return "channels C=" + std::to_string(x.size(1)) + ", K=" + std::to_string(weight.size(0)) +
           " are not multiples of 8 (16-byte vector accesses)";
  }
  for (const at::Tensor* t : {&x, &weight}) {
    if (t->numel() > std::numeric_limits<int32_t>::max() / 2) {
      return "a tensor of 2^30 or more elements (32-bit offsets in the CUTLASS iterators)";
    }
  }
  if (out[0] * out[1] * out[2] * out[3] > std::numeric_limits<int32_t>::max() / 2) {
    return "an output of 2^30 or more elements (32-bit offsets in the CUTLASS iterators)";
  }
  for (int64_t v : {g.stride[0], g.stride[1], g.padding[0], g.padding[1], g.dilation[0], g.dilation[1]}) {
    if (v > kMaxGeometry) {
      return "stride, padding or dilation above " + std::to_string(kMaxGeometry) + " (the CUTLASS problem holds ints)";
    }
  }
  const cc::ConvBiasActProblem problem = problem_for(x, weight, g, out);
  const cc::KernelKey key = kernel_key(x, problem, relu);
  const auto refusal = [&](const cc::KernelKey& k) -> std::string {
    const std::string why_not = kernel_failures().check(x.get_device(), k);
    if (!why_not.empty()) {
      return std::string("the CUTLASS kernel ") + cc::variant_name(k.variant) + ": " + why_not;
    }
    if (const char* why = cc::can_implement(k, problem)) {
      return std::string("CUTLASS can_implement: ") + why;
    }
    return "";
  };
  const std::string why = refusal(key);
  if (why.empty()) {
    *chosen = key;
    return "";
  }
  if (key.variant == cc::Variant::kSm90aTile128) {  // (a Hopper kernel's refusal leaves the call to the sm80 one)
    const cc::KernelKey sm80{key.element, sm80_variant(problem), key.relu};
    const std::string why_sm80 = refusal(sm80);
    if (why_sm80.empty()) {
      *chosen = sm80;
      if (note != nullptr) {
        *note = std::string(" (sm90a_128x128 refused: ") + why + ")";
      }
      return "";
    }
    return why + "; then " + why_sm80;
  }
  return why;
}

// nullopt when CUTLASS failed to launch a kernel that can_implement accepted (e.g. the
// shared-memory attribute was refused): the caller then runs the unfused path.
std::optional<at::Tensor> cutlass_conv_bias_act(const at::Tensor& x, const at::Tensor& weight,
                                                const std::optional<at::Tensor>& bias,
                                                const std::optional<at::Tensor>& residual, const ConvGeometry& g,
                                                const std::array<int64_t, 4>& out, const cc::KernelKey& key) {
  // Packed NHWC/KRSC with 16-byte aligned data; a view that is not gets copied
  // (the fused modules pass tensors that already are).
  const auto operand = [](const at::Tensor& t, at::MemoryFormat fmt) {
    at::Tensor c = t.contiguous(fmt);
    return aligned16(c) ? c : c.clone(fmt);
  };
  const at::Tensor xc = operand(x, at::MemoryFormat::ChannelsLast);
  const at::Tensor wc = operand(weight, at::MemoryFormat::ChannelsLast);
  const at::Tensor b = bias.has_value() ? operand(*bias, at::MemoryFormat::Contiguous) : at::Tensor();
  const at::Tensor r = residual.has_value() ? operand(*residual, at::MemoryFormat::ChannelsLast) : at::Tensor();
  at::Tensor y = at::empty({out[0], out[1], out[2], out[3]}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  cc::ConvBiasActProblem p = problem_for(x, weight, g, out);
  p.x = xc.const_data_ptr();
  p.weight = wc.const_data_ptr();
  p.bias = b.defined() ? b.const_data_ptr() : nullptr;
  p.residual = r.defined() ? r.const_data_ptr() : nullptr;
  p.y = y.data_ptr();
  const size_t workspace_bytes = cc::workspace_size(key, p);
  at::Tensor workspace;
  if (workspace_bytes > 0) {
    workspace = at::empty({static_cast<int64_t>(workspace_bytes)}, x.options().dtype(at::kByte));
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.get_device()).stream();
  cudaGetLastError();  // (an earlier launch's error, not this kernel's: the check after the launch reads it)
  const char* error = cc::run(key, p, workspace.defined() ? workspace.data_ptr() : nullptr, stream);
  if (error != nullptr) {
    const std::string why = error;
    // Not tried again in this process (warned once; explain() then names why), unless a
    // CUDA graph capture is under way: a capture already broken fails any launch.
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    const bool capturing = cudaStreamIsCapturing(stream, &capture) != cudaSuccess ||
                           capture != cudaStreamCaptureStatusNone;
    cudaGetLastError();
    if (!capturing) {
      kernel_failures().launch_failed(x.get_device(), key, why);
    }
    TORCH_WARN("resnet_fused: the CUTLASS kernel ", cc::variant_name(key.variant), " failed to run (", why, "; x ",
               shape_str(x.sizes()), ", weight ", shape_str(weight.sizes()), ", ", x.scalar_type(),
               "); this call runs cuDNN's conv, then the add and ReLU",
               capturing ? " (in a CUDA graph capture: the kernel is tried again after it)"
                         : "; later calls do not try this kernel again (explain() says why)");
    return std::nullopt;
  }
  return y;
}

// Unfused, always correct: conv with bias, then the residual add and ReLU in place.
at::Tensor generic_conv_bias_act(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                 const std::optional<at::Tensor>& residual, const ConvGeometry& g, bool relu,
                                 at::MemoryFormat fmt) {
  at::Tensor y = at::convolution(x, with_canonical_strides(weight), bias, g.stride, g.padding, g.dilation, false,
                                 {0, 0}, g.groups);
  y = y.contiguous(fmt);
  if (residual.has_value()) y.add_(*residual);
  if (relu) y.relu_();
  return y;
}

std::string cudnn_path(const at::Tensor& x, bool relu, bool residual) {
  if (!at::globalContext().userEnabledCuDNN() || !at::detail::getCUDAHooks().compiledWithCuDNN()) {
    return "cuDNN is off";
  }
  std::string path = "conv with bias";
  if (residual) path += relu ? ", then the residual add and ReLU in place" : ", then the residual add in place";
  else if (relu) path += ", then ReLU in place";
  return relu ? path + " (not cuDNN's fused ReLU, which is reported to map NaN to 0)" : path;
}

at::Tensor native_conv_bias_act_cuda(const at::Tensor& x, const at::Tensor& weight,
                                     const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual,
                                     at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                     int64_t groups, bool relu) {
  const auto [g, out] = check_conv_bias_act_args(x, weight, bias, residual, stride, padding, dilation, groups);
  c10::cuda::CUDAGuard guard(x.device());
  cc::KernelKey key{};
  if (cutlass_refusal(x, weight, residual, g, out, relu, &key).empty()) {
    if (auto y = cutlass_conv_bias_act(x, weight, bias, residual, g, out, key)) {
      return *y;
    }
  }
  return generic_conv_bias_act(x, weight, bias, residual, g, relu, output_memory_format(x));
}

// out=: the output is computed as above, then copied (the CUDA caching allocator
// makes a fresh output cheap, so nothing here writes into the residual in place).
void native_conv_bias_act_out_cuda(const at::Tensor& x, const at::Tensor& weight,
                                          const std::optional<at::Tensor>& bias,
                                          const std::optional<at::Tensor>& residual, at::IntArrayRef stride,
                                          at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, bool relu,
                                          at::Tensor& out) {
  const auto shape = check_conv_bias_act_args(x, weight, bias, residual, stride, padding, dilation, groups).second;
  check_out(out, x, weight, bias, residual, shape);
  c10::cuda::CUDAGuard guard(x.device());
  out.copy_(native_conv_bias_act_cuda(x, weight, bias, residual, stride, padding, dilation, groups, relu));
}

bool native_conv_bias_act_in_place_cuda(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                        at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, int64_t) {
  return false;  // out= computes, then copies (see native_conv_bias_act_out_cuda)
}

std::string native_conv_bias_act_path_cuda(const at::Tensor& x, const at::Tensor& weight,
                                           const std::optional<at::Tensor>& residual, at::IntArrayRef stride,
                                           at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  const auto [g, out] = check_conv_bias_act_args(x, weight, std::nullopt, residual, stride, padding, dilation, groups);
  c10::cuda::CUDAGuard guard(x.device());
  // The path is the same with and without ReLU (two instantiations of each kernel) unless
  // one of them failed to launch: the ReLU case, and the other where it differs.
  cc::KernelKey key{}, linear_key{};
  std::string note;
  const std::string why = cutlass_refusal(x, weight, residual, g, out, /*relu=*/true, &key, &note);
  const std::string why_linear = cutlass_refusal(x, weight, residual, g, out, /*relu=*/false, &linear_key);
  if (why.empty()) {
    std::string path = std::string("CUTLASS implicit GEMM ") + cc::variant_name(key.variant) +
                       ", with the bias, residual and ReLU epilogue fused" + note;
    if (!why_linear.empty()) {
      path += "; without ReLU, cuDNN (" + why_linear + ")";
    } else if (linear_key.variant != key.variant) {
      path += std::string("; without ReLU, ") + cc::variant_name(linear_key.variant);
    }
    return path;
  }
  const std::string fallback = cudnn_path(x, true, residual.has_value());
  if (fallback == "cuDNN is off" || x.numel() == 0) {
    return "conv, then the residual add and ReLU (" + why + "; " + (x.numel() == 0 ? "empty input" : fallback) + ")";
  }
  return "cuDNN " + fallback + " (CUTLASS refused: " + why + ")";
}

}  // namespace

TORCH_LIBRARY_IMPL(resnet_fused, CUDA, m) {
  m.impl("native_conv_bias_act", &native_conv_bias_act_cuda);
  m.impl("native_conv_bias_act.out", &native_conv_bias_act_out_cuda);
  m.impl("native_conv_bias_act_path", &native_conv_bias_act_path_cuda);
  m.impl("native_conv_bias_act_in_place", &native_conv_bias_act_in_place_cuda);
}

}  // namespace ops
}  // namespace resnet_fused
