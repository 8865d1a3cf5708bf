// CPU kernel of resnet_fused::native_conv_bias_act.
//
// Stride-1 3x3 convs in float32 NHWC (13 of ResNet-50's 53 convs, ~37% of its FLOPs):
// Winograd F(4x4, 3x3) with bias, residual and ReLU fused into its output transform
// (winograd.cpp); the weight is transformed once per fold and cached like oneDNN's
// packed weights below. A call that meets a NaN/Inf there is recomputed by oneDNN.
//
// Stride-1 1x1 convs in float32 NHWC with at most 64 KiB of weight (ResNet-50's layer1):
// one GEMM over the pixels with the epilogue applied to each register tile (conv1x1.cpp).
//
// Grouped convs with 4 channels per group in float32 NHWC (ResNeXt 32x4d's and 64x4d's
// first stage, where oneDNN is slow): a direct conv with the epilogue applied to each
// register tile (grouped.cpp).
//
// Other convs: oneDNN's convolution with the bias as its post-op, then the residual
// add and the ReLU as ATen's vectorized in-place add_ and relu_.
// Measured on ResNet-50's residual 1x1 convs (benchmarks/NOTES.md): oneDNN's binary
// "add" post-op (mkldnn::_convolution_pointwise.binary) was up to 22% slower than this
// per layer and 4% over the forward on the AVX2 CPU here, and its ReLU post-op maps NaN to 0 where torch.relu keeps
// NaN (a garbage input must not come out as plausible numbers). The conv is ATen's own
// oneDNN binding (mkldnn::_convolution_pointwise); the weight is reordered once into
// oneDNN's blocked layout for the call's geometry and kept in a cache keyed on the
// weight tensor itself (identity + version counter), so a folded weight is packed
// once per fold (on its second call, below), not once per call.
//
// Where oneDNN has no kernel for the dtype on this CPU (bfloat16/float16 without
// AVX-512), the call is computed in float32 through the same path and cast back.
// Everything else (float64, a torch built without oneDNN, an empty batch) runs
// aten's convolution followed by one pass of our own epilogue over the output.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/OpMathType.h>
#include <c10/util/intrusive_ptr.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <map>
#include <mutex>
#include <vector>

#include "../conv_bias_act.h"
#include "conv1x1.h"
#include "grouped.h"
#include "winograd.h"

namespace resnet_fused {
namespace ops {
namespace {

enum class CpuPath { kWinograd, kConv1x1, kGrouped, kOneDnn, kOneDnnFloat32, kConvThenEpilogue, kPaddingOnly };

// ---- ATen's oneDNN fused conv ops, looked up once ----------------------------------

struct OneDnnOps {
  // unary: conv with a post-op into a new tensor; binary_inplace: conv + bias accumulated
  // into an existing tensor (oneDNN's "sum" post-op), the out=residual case.
  std::optional<c10::OperatorHandle> unary, binary_inplace, bf16_supported, fp16_supported;
};

const OneDnnOps& onednn_ops() {
  static const OneDnnOps ops = [] {
    OneDnnOps o;
    if (!at::hasMKLDNN()) {
      return o;
    }
    auto& dispatcher = c10::Dispatcher::singleton();
    o.unary = dispatcher.findSchema({"mkldnn::_convolution_pointwise", ""});
    o.binary_inplace = dispatcher.findSchema({"mkldnn::_convolution_pointwise_", "binary"});
    o.bf16_supported = dispatcher.findSchema({"mkldnn::_is_mkldnn_bf16_supported", ""});
    o.fp16_supported = dispatcher.findSchema({"mkldnn::_is_mkldnn_fp16_supported", ""});
    return o;
  }();
  return ops;
}

bool ask_bool(const std::optional<c10::OperatorHandle>& op) {
  if (!op) {
    return false;
  }
  torch::jit::Stack stack;
  op->callBoxed(&stack);
  return stack.at(0).toBool();
}

bool onednn_has_dtype(at::ScalarType dtype) {
  static const bool bf16 = ask_bool(onednn_ops().bf16_supported);
  static const bool fp16 = ask_bool(onednn_ops().fp16_supported);
  switch (dtype) {
    case at::kFloat:
      return true;
    case at::kBFloat16:
      return bf16;
    case at::kHalf:
      return fp16;
    default:
      return false;
  }
}

// What runs after oneDNN's conv, and what our kernels fuse, in the words of explain()
// (which is not told relu).
std::string in_place_tail(bool residual) {
  return residual ? "the residual add and ReLU (where asked) in place" : "ReLU (where asked) in place";
}

std::string fused_epilogue(bool residual) {
  return residual ? "bias, residual and ReLU (where asked)" : "bias and ReLU (where asked)";
}

std::pair<CpuPath, std::string> choose_path(const at::Tensor& x, const at::Tensor& weight, const ConvGeometry& g,
                                            bool residual) {
  const auto& ops = onednn_ops();
  if (!ops.unary) {
    return {CpuPath::kConvThenEpilogue,
            "conv then one epilogue pass: this torch has no oneDNN fused convolution (mkldnn::_convolution_pointwise)"};
  }
  if (x.numel() == 0 || weight.numel() == 0) {
    return {CpuPath::kConvThenEpilogue, "conv then one epilogue pass: empty input or weight"};
  }
  if (reads_only_padding(x, weight, g)) {
    return {CpuPath::kPaddingOnly, "no conv: every output pixel's taps lie in the zero padding, so only " +
                                       fused_epilogue(residual) + " run, in one pass"};
  }
  const std::string not_winograd = winograd::refusal(x, weight, g);
  if (not_winograd.empty()) {
    const std::string tile = std::to_string(winograd::tile_size());
    return {CpuPath::kWinograd, "Winograd F(" + tile + "x" + tile + ",3x3) with " + fused_epilogue(residual) +
                                    " fused in the output transform (weight transformed once); oneDNN for a call "
                                    "that meets a non-finite value"};
  }
  const std::string not_1x1 = conv1x1::refusal(x, weight, g);
  if (not_1x1.empty()) {
    return {CpuPath::kConv1x1,
            "1x1 conv as one GEMM over the pixels (AVX2 6x16 register tiles) with " + fused_epilogue(residual) +
                " applied to each tile before its store"};
  }
  const std::string not_grouped = grouped::refusal(x, weight, g);
  if (not_grouped.empty()) {
    return {CpuPath::kGrouped, "grouped conv with 4 channels per group as a direct AVX2 conv (weight packed once) "
                               "with " + fused_epilogue(residual) + " applied to each tile before its store"};
  }
  // Say why a float32 3x3 or 1x1 conv took neither only where the answer is not obvious.
  std::string aside;
  if (x.scalar_type() == at::kFloat && g.groups > 1 && weight.size(1) == 4) {
    aside = " (not the grouped kernel: " + not_grouped + ")";
  } else if (x.scalar_type() == at::kFloat && weight.size(2) == 3 && weight.size(3) == 3) {
    aside = " (not Winograd: " + not_winograd + ")";
  } else if (x.scalar_type() == at::kFloat && weight.size(2) == 1 && weight.size(3) == 1) {
    aside = " (not the 1x1 GEMM: " + not_1x1 + ")";
  }
  const auto dtype = x.scalar_type();
  if (onednn_has_dtype(dtype)) {
    return {CpuPath::kOneDnn,
            "oneDNN conv with the bias as a post-op (weight pre-packed from its second call), then " +
                in_place_tail(residual) + aside};
  }
  if (dtype == at::kBFloat16 || dtype == at::kHalf) {
    return {CpuPath::kOneDnnFloat32,
            std::string("oneDNN conv with the bias as a post-op in float32 (this CPU has no ") +
                c10::toString(dtype) + " oneDNN kernels), then " + in_place_tail(residual) + ", cast back to " +
                c10::toString(dtype)};
  }
  return {CpuPath::kConvThenEpilogue,
          std::string("conv then one epilogue pass: oneDNN has no ") + c10::toString(dtype) + " convolution"};
}

// ---- weights packed once per (weight tensor, version, geometry) ---------------------
//
// Four packings: oneDNN's blocked layout for the call's geometry and input sizes,
// Winograd's transformed weight, the 1x1 GEMM's W^T, or the grouped kernel's taps (the
// last three independent of the input sizes, so one per weight).
//
// An entry is served only while its weight tensor is alive and unchanged: same
// TensorImpl, version counter, data pointer, sizes and strides. That catches in-place
// edits, optimizer steps, load_state_dict, `w.data = t` and address reuse. Not seen:
// edits through `w.data.add_(...)` (a detached alias has its own version counter):
// resnet_fused.refold() empties the cache (native_clear_packed_weights) after one.
// On a miss, the weight's older entries and those of freed weights are dropped, so the
// cache holds about one packed copy per live weight and input shape.
//
// Trusting the version counter is wrong in one place: a torch.compile graph. Inductor
// reuses a dead buffer for a later tensor of the same size and writes it from its own
// kernels, with no version bump, so the buffer that held one conv's folded weight can
// hold the next conv's, same TensorImpl, version, pointer, sizes and strides (measured:
// a compiled fused ResNet-18 without freezing gave relative error 0.95). Calls from a
// compiled graph therefore check (`check_packed_weights`, set by the Python op from
// its `check_packed` argument): an entry made then keeps a copy of its weight and is
// served, to any caller, only while the weight still holds the same bytes (one read of
// the weight and the copy, cheaper than repacking; twice the packed weights' memory).
//
// oneDNN's packing is done on a weight's second call (`get_on_reuse`): its first runs
// oneDNN on the plain weight (the same convolution, reordered inside oneDNN). A weight
// that is new on every call, as a fold is under torch.compile without freezing (its
// graph recomputes the fold), would otherwise pay the blocked copy for one use: measured
// 1.1-3.4x the plain call (to_mkldnn, then the reorder).

enum class Packing : int64_t { kOneDnn, kWinograd, kWinograd2x2, kConv1x1, kGrouped };

using WeakTensorImpl = c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>;

struct PackedWeight {
  WeakTensorImpl source;  // the weight it was packed from
  std::vector<int64_t> state;  // its version, data pointer, sizes and strides then
  at::Tensor packed;  // undefined: seen once, not packed yet (get_on_reuse)
  at::Tensor values;  // a copy of the weight then, where made under check_packed_weights
};

// This thread's calls serve a packed weight only where the weight still holds the
// values it was packed from (above: for calls from a compiled graph); set by the Python
// op through native_check_packed_weights.
thread_local bool check_packed_weights = false;

class PackedWeightCache {
 public:
  // ``source`` is the caller's weight, packed in the ``compute`` dtype.
  at::Tensor get(const at::Tensor& source, Packing packing, at::ScalarType compute, const ConvGeometry& g,
                 at::IntArrayRef x_sizes) {
    return *lookup(source, packing, compute, g, x_sizes, /*on_reuse=*/false);
  }

  // As get, but nullopt for a weight's first call (noted, so its second packs it) and
  // for an inference tensor: the caller runs on the plain weight then.
  std::optional<at::Tensor> get_on_reuse(const at::Tensor& source, Packing packing, at::ScalarType compute,
                                         const ConvGeometry& g, at::IntArrayRef x_sizes) {
    return lookup(source, packing, compute, g, x_sizes, /*on_reuse=*/true);
  }

  // Drops every entry (noted first calls too); returns how many there were.
  int64_t clear() {
    std::lock_guard<std::mutex> lock(mutex_);
    const auto n = static_cast<int64_t>(entries_.size());
    entries_.clear();
    return n;
  }

 private:
  std::optional<at::Tensor> lookup(const at::Tensor& source, Packing packing, at::ScalarType compute,
                                   const ConvGeometry& g, at::IntArrayRef x_sizes, bool on_reuse) {
    if (source.is_inference()) {
      // No version counter: an in-place edit could not be seen, so no caching (the
      // fused modules fold outside inference mode, so their weights are cached).
      if (on_reuse) {
        return std::nullopt;
      }
      return pack(source.to(compute), packing, g, x_sizes);
    }
    const c10::TensorImpl* impl = source.unsafeGetTensorImpl();
    std::vector<int64_t> key{reinterpret_cast<int64_t>(impl), static_cast<int64_t>(packing),
                             static_cast<int64_t>(compute),
                             g.stride[0], g.stride[1], g.padding[0], g.padding[1],
                             g.dilation[0], g.dilation[1], g.groups};
    key.insert(key.end(), x_sizes.begin(), x_sizes.end());
    std::vector<int64_t> state{static_cast<int64_t>(source._version()),
                               reinterpret_cast<int64_t>(source.const_data_ptr())};
    state.insert(state.end(), source.sizes().begin(), source.sizes().end());
    state.insert(state.end(), source.strides().begin(), source.strides().end());

    const bool check = check_packed_weights;
    bool seen = false;
    {
      std::unique_lock<std::mutex> lock(mutex_);
      auto it = entries_.find(key);
      seen = it != entries_.end() && it->second.source.lock().get() == impl && it->second.state == state;
      if (seen && it->second.packed.defined()) {
        const at::Tensor packed = it->second.packed, values = it->second.values;
        lock.unlock();  // (the comparison reads the whole weight: not under the lock)
        // An entry made under the check is checked whoever asks: its weight may be a
        // compiled graph's buffer that eager code now holds.
        if (values.defined() ? same_bytes(source, values) : !check) {
          return packed;
        }
        seen = false;  // rewritten without a version bump: as new
      }
    }
    // (an entry without a packed weight: noted on a first call, for the second)
    at::Tensor packed = on_reuse && !seen ? at::Tensor() : pack(source.to(compute), packing, g, x_sizes);
    at::Tensor values = check && packed.defined() ? source.clone() : at::Tensor();
    std::lock_guard<std::mutex> lock(mutex_);
    drop_stale(impl, state);
    if (entries_.size() >= kMaxEntries) {
      entries_.clear();
    }
    entries_.insert_or_assign(key, PackedWeight{WeakTensorImpl(source.getIntrusivePtr()), state, packed, values});
    if (!packed.defined()) {
      return std::nullopt;
    }
    return packed;
  }

  // Whether ``source`` holds the bytes of ``copy``, its clone (a NaN weight is the same
  // weight; -0 and 0 are not), compared in chunks over the threads.
  static bool same_bytes(const at::Tensor& source, const at::Tensor& copy) {
    if (!source.is_non_overlapping_and_dense() || source.strides() != copy.strides() ||
        source.scalar_type() != copy.scalar_type()) {
      return false;  // (clone keeps a dense tensor's strides: only a view with gaps lands here)
    }
    const auto* a = static_cast<const char*>(source.const_data_ptr());
    const auto* b = static_cast<const char*>(copy.const_data_ptr());
    const int64_t bytes = source.numel() * static_cast<int64_t>(source.element_size());
    std::atomic<bool> same{true};
    at::parallel_for(0, bytes, int64_t(1) << 20, [&](int64_t begin, int64_t end) {
      if (same.load(std::memory_order_relaxed) && std::memcmp(a + begin, b + begin, end - begin) != 0) {
        same.store(false, std::memory_order_relaxed);
      }
    });
    return same.load();
  }

  static at::Tensor pack(const at::Tensor& weight, Packing packing, const ConvGeometry& g, at::IntArrayRef x_sizes) {
    if (packing == Packing::kWinograd || packing == Packing::kWinograd2x2) {
      return winograd::transform_weight(weight, packing == Packing::kWinograd ? 4 : 2);
    }
    if (packing == Packing::kConv1x1) {
      return conv1x1::pack_weight(weight);
    }
    if (packing == Packing::kGrouped) {
      return grouped::pack_weight(weight);
    }
    return at::mkldnn_reorder_conv2d_weight(weight.contiguous().to_mkldnn(), g.padding, g.stride, g.dilation,
                                            g.groups, x_sizes);
  }

  // A bound for pathological use (a new input shape every call); ResNet-152 has 155 convs.
  static constexpr size_t kMaxEntries = 1024;

  // Entries of freed weights, and of ``impl`` in any other state than ``state``.
  void drop_stale(const c10::TensorImpl* impl, const std::vector<int64_t>& state) {
    for (auto it = entries_.begin(); it != entries_.end();) {
      const auto alive = it->second.source.lock();
      const bool stale = !alive || (alive.get() == impl && it->second.state != state);
      it = stale ? entries_.erase(it) : std::next(it);
    }
  }

  std::mutex mutex_;
  std::map<std::vector<int64_t>, PackedWeight> entries_;
};

PackedWeightCache& packed_weights() {
  static PackedWeightCache cache;
  return cache;
}

// ---- the paths ----------------------------------------------------------------------

// y <- relu?(y + bias + residual), in place, one pass, computed in opmath (float for
// the 16-bit types). ``rows`` runs of ``len`` contiguous elements; the bias index is
// the position in the run (channels_last: a run is one pixel's channels) or the run
// number mod K (NCHW: a run is one channel plane).
template <typename scalar_t>
void bias_residual_relu_(scalar_t* y, const scalar_t* bias, const scalar_t* residual, int64_t rows, int64_t len,
                         int64_t k, bool bias_along_run, bool relu) {
  using opmath_t = at::opmath_type<scalar_t>;
  at::parallel_for(0, rows, std::max<int64_t>(1, 32768 / std::max<int64_t>(len, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      scalar_t* out = y + row * len;
      const scalar_t* res = residual ? residual + row * len : nullptr;
      const opmath_t row_bias = (bias && !bias_along_run) ? static_cast<opmath_t>(bias[row % k]) : opmath_t(0);
      for (int64_t i = 0; i < len; ++i) {
        opmath_t v = static_cast<opmath_t>(out[i]) + row_bias;
        if (bias && bias_along_run) v += static_cast<opmath_t>(bias[i]);
        if (res) v += static_cast<opmath_t>(res[i]);
        if (relu) v = v < opmath_t(0) ? opmath_t(0) : v;  // NaN stays NaN, as in torch.relu
        out[i] = static_cast<scalar_t>(v);
      }
    }
  });
}

// ``into_residual``: the caller's out= is the residual itself; where the residual is
// already in the compute dtype and layout, oneDNN accumulates the conv and bias into it
// (its "sum" post-op: no new output, no add pass), then ReLU runs in place on it.
at::Tensor onednn_conv_bias_act(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                const std::optional<at::Tensor>& residual, const ConvGeometry& g, bool relu,
                                at::ScalarType compute, at::MemoryFormat fmt, bool into_residual = false) {
  const at::Tensor xc = x.to(compute).contiguous(fmt);
  // (the plain weight on its first call: see get_on_reuse)
  const std::optional<at::Tensor> reused = packed_weights().get_on_reuse(weight, Packing::kOneDnn, compute, g,
                                                                         xc.sizes());
  const at::Tensor packed = reused.has_value() ? *reused : with_canonical_strides(weight.to(compute));
  const std::vector<int64_t> padding(g.padding.begin(), g.padding.end());
  const std::vector<int64_t> stride(g.stride.begin(), g.stride.end());
  const std::vector<int64_t> dilation(g.dilation.begin(), g.dilation.end());
  // oneDNN reads the bias as a dense vector: a strided or expanded view is copied.
  c10::IValue b = bias.has_value() ? c10::IValue(bias->to(compute).contiguous()) : c10::IValue();
  const c10::List<std::optional<at::Scalar>> no_scalars;
  at::Tensor y;
  if (into_residual && onednn_ops().binary_inplace && residual->scalar_type() == compute &&
      residual->is_contiguous(fmt)) {
    torch::jit::Stack stack = {*residual, xc, packed, b, padding, stride, dilation, g.groups, std::string("add"),
                               c10::IValue(at::Scalar(1.0)), c10::IValue(), no_scalars, c10::IValue()};
    onednn_ops().binary_inplace->callBoxed(&stack);
    y = *residual;
  } else {
    torch::jit::Stack stack = {xc, packed, b, padding, stride, dilation, g.groups, std::string("none"), no_scalars,
                               c10::IValue()};
    onednn_ops().unary->callBoxed(&stack);
    y = stack.at(0).toTensor();
    if (residual.has_value()) {
      y.add_(residual->to(compute));
    }
  }
  if (relu) {
    y.relu_();  // not aten::_add_relu_, which maps NaN to 0 (measured)
  }
  if (y.scalar_type() != x.scalar_type()) {
    y = y.to(x.scalar_type());
  }
  return y.is_contiguous(fmt) ? y : y.contiguous(fmt);
}

// y <- relu?(y + bias + residual?) in place, y dense in ``fmt``; returns y.
at::Tensor epilogue_(at::Tensor y, const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual,
                     bool relu, at::MemoryFormat fmt) {
  if (!bias.has_value() && !residual.has_value() && !relu) {
    return y;
  }
  const bool channels_last = fmt == at::MemoryFormat::ChannelsLast;
  const int64_t k = y.size(1);
  const int64_t len = channels_last ? k : y.size(2) * y.size(3);
  const int64_t rows = len == 0 ? 0 : y.numel() / len;
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  const at::Tensor r = residual.has_value() ? residual->contiguous(fmt) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "conv_bias_act_epilogue", [&] {
    bias_residual_relu_<scalar_t>(y.data_ptr<scalar_t>(), b.defined() ? b.const_data_ptr<scalar_t>() : nullptr,
                                  r.defined() ? r.const_data_ptr<scalar_t>() : nullptr, rows, len, k, channels_last,
                                  relu);
  });
  return y;
}

at::Tensor conv_then_epilogue(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                              const std::optional<at::Tensor>& residual, const ConvGeometry& g, bool relu,
                              at::MemoryFormat fmt) {
  const at::Tensor y = at::convolution(x, with_canonical_strides(weight), std::nullopt, g.stride, g.padding,
                                       g.dilation, false, {0, 0}, g.groups);
  return epilogue_(y.contiguous(fmt), bias, residual, relu, fmt);
}

at::Tensor native_conv_bias_act_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                    const std::optional<at::Tensor>& residual, at::IntArrayRef stride,
                                    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, bool relu) {
  const auto [g, out] = check_conv_bias_act_args(x, weight, bias, residual, stride, padding, dilation, groups);
  const at::MemoryFormat fmt = output_memory_format(x);
  switch (choose_path(x, weight, g, residual.has_value()).first) {
    case CpuPath::kWinograd: {
      const Packing packing = winograd::tile_size() == 4 ? Packing::kWinograd : Packing::kWinograd2x2;
      const at::Tensor u = packed_weights().get(weight, packing, at::kFloat, g, {});
      if (auto y = winograd::conv_bias_act(x, u, weight.size(0), bias, residual, g, relu)) {
        return *y;
      }
      return onednn_conv_bias_act(x, weight, bias, residual, g, relu, at::kFloat, fmt);
    }
    case CpuPath::kConv1x1:
      return conv1x1::conv_bias_act(x, packed_weights().get(weight, Packing::kConv1x1, at::kFloat, g, {}), bias,
                                    residual, relu);
    case CpuPath::kGrouped:
      return grouped::conv_bias_act(x, packed_weights().get(weight, Packing::kGrouped, at::kFloat, g, {}), bias,
                                    residual, g, relu);
    case CpuPath::kOneDnn:
      return onednn_conv_bias_act(x, weight, bias, residual, g, relu, x.scalar_type(), fmt);
    case CpuPath::kOneDnnFloat32:
      return onednn_conv_bias_act(x, weight, bias, residual, g, relu, at::kFloat, fmt);
    case CpuPath::kPaddingOnly:  // the conv is zero (reads_only_padding): the epilogue on zeros
      return epilogue_(at::empty(out, x.options().memory_format(fmt)).zero_(), bias, residual, relu, fmt);
    case CpuPath::kConvThenEpilogue:
      break;
  }
  return conv_then_epilogue(x, weight, bias, residual, g, relu, fmt);
}

// out=: written into ``out`` directly by the 1x1 GEMM and the grouped kernel, into the residual by oneDNN's
// sum post-op when out is the residual; every other case computes as above and copies
// (Winograd too: a call that meets a NaN/Inf is recomputed from the residual, which
// must still hold its values then).
void native_conv_bias_act_out_cpu(const at::Tensor& x, const at::Tensor& weight,
                                         const std::optional<at::Tensor>& bias,
                                         const std::optional<at::Tensor>& residual, at::IntArrayRef stride,
                                         at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, bool relu,
                                         at::Tensor& out) {
  const auto [g, shape] = check_conv_bias_act_args(x, weight, bias, residual, stride, padding, dilation, groups);
  const bool into_residual = check_out(out, x, weight, bias, residual, shape);
  const at::MemoryFormat fmt = output_memory_format(x);
  at::Tensor y;
  switch (choose_path(x, weight, g, residual.has_value()).first) {
    case CpuPath::kConv1x1:
      conv1x1::conv_bias_act(x, packed_weights().get(weight, Packing::kConv1x1, at::kFloat, g, {}), bias, residual,
                             relu, &out);
      // Written through raw pointers: tell autograd, as an in-place aten op would (a
      // graph that saved ``out`` then raises instead of reading the new values).
      out.unsafeGetTensorImpl()->bump_version();
      return;
    case CpuPath::kGrouped:
      grouped::conv_bias_act(x, packed_weights().get(weight, Packing::kGrouped, at::kFloat, g, {}), bias, residual, g,
                             relu, &out);
      out.unsafeGetTensorImpl()->bump_version();
      return;
    case CpuPath::kOneDnn:
      y = onednn_conv_bias_act(x, weight, bias, residual, g, relu, x.scalar_type(), fmt, into_residual);
      break;
    default:
      y = native_conv_bias_act_cpu(x, weight, bias, residual, stride, padding, dilation, groups, relu);
  }
  if (!y.is_same(out)) {
    out.copy_(y);
  } else {
    out.unsafeGetTensorImpl()->bump_version();  // written by oneDNN through its own pointers
  }
}

bool native_conv_bias_act_in_place_cpu(const at::Tensor& x, const at::Tensor& weight,
                                       const std::optional<at::Tensor>& residual, at::IntArrayRef stride,
                                       at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  const ConvGeometry g =
      check_conv_bias_act_args(x, weight, std::nullopt, residual, stride, padding, dilation, groups).first;
  switch (choose_path(x, weight, g, residual.has_value()).first) {
    case CpuPath::kConv1x1:
    case CpuPath::kGrouped:
      return true;
    case CpuPath::kOneDnn:  // the conditions under which onednn_conv_bias_act accumulates into the residual
      return residual.has_value() && onednn_ops().binary_inplace.has_value() &&
             residual->scalar_type() == x.scalar_type() && residual->is_contiguous(output_memory_format(x));
    default:
      return false;
  }
}

std::string native_conv_bias_act_path_cpu(const at::Tensor& x, const at::Tensor& weight,
                                          const std::optional<at::Tensor>& residual, at::IntArrayRef stride,
                                          at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  const ConvGeometry g =
      check_conv_bias_act_args(x, weight, std::nullopt, residual, stride, padding, dilation, groups).first;
  return choose_path(x, weight, g, residual.has_value()).second;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(resnet_fused, m) {
  // Empties the packed-weight cache (resnet_fused.refold); returns the entries dropped.
  m.def("native_clear_packed_weights() -> int", [] { return packed_weights().clear(); });
  // Sets whether this thread's calls check a packed weight against the weight's values
  // (check_packed_weights); returns the previous setting.
  m.def("native_check_packed_weights(bool check) -> bool", [](bool check) {
    const bool previous = check_packed_weights;
    check_packed_weights = check;
    return previous;
  });
}

TORCH_LIBRARY_IMPL(resnet_fused, CPU, m) {
  m.impl("native_conv_bias_act", &native_conv_bias_act_cpu);
  m.impl("native_conv_bias_act.out", &native_conv_bias_act_out_cpu);
  m.impl("native_conv_bias_act_path", &native_conv_bias_act_path_cpu);
  m.impl("native_conv_bias_act_in_place", &native_conv_bias_act_in_place_cpu);
}

}  // namespace ops
}  // namespace resnet_fused
