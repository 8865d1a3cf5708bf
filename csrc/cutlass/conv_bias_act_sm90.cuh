// The Hopper kernel: a CUTLASS 3.x sm90a implicit GEMM (TMA im2col loads of the
// activations, wgmma, warp-specialized), with the same fused epilogue as the sm80 one
// expressed as CUTLASS's epilogue fusion LinCombPerColBiasEltAct:
//   D = Act(alpha * acc + beta * C + bias[k])
// with C the residual (beta = 1), or beta = 0 and no source read at all.
// Act is ReLu (which keeps NaN) or Identity. Runs on compute capability 9.0 only (sm_90a
// code), and the host takes it only where the GPU is one; everything else runs sm80.
#pragma once

#include "cutlass/cutlass.h"
#include "cutlass/kernel_hardware_info.hpp"
#include "cute/tensor.hpp"
#include "cutlass/conv/collective/collective_builder.hpp"
#include "cutlass/conv/convnd_problem_shape.hpp"
#include "cutlass/conv/device/conv_universal_adapter.hpp"
#include "cutlass/conv/dispatch_policy.hpp"
#include "cutlass/conv/kernel/conv_universal.hpp"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/fusion/operations.hpp"
#include "cutlass/epilogue/thread/activation.h"

#include "conv_bias_act.h"
#include "entry_points.cuh"

namespace resnet_fused {
namespace cutlass_conv {

template <typename ElementT, template <typename> class Activation>
struct ConvBiasActSm90 {
  using Element = ElementT;
  using ElementAccumulator = float;
  using ElementCompute = float;
  using Layout = cutlass::layout::TensorNHWC;
  static constexpr int kAlignment = 128 / cute::sizeof_bits_v<Element>;
  static constexpr cutlass::conv::Operator kConvOp = cutlass::conv::Operator::kFprop;

  // 128x128 output tile, 64-deep K steps, one CTA per cluster, a producer warp feeding
  // the consumer warpgroup through TMA (CUTLASS's conv has no persistent schedules yet);
  // stages fill what the epilogue leaves of shared memory.
  using TileShape = cute::Shape<cute::_128, cute::_128, cute::Shape<cute::_64>>;
  using ClusterShape = cute::Shape<cute::_1, cute::_1, cute::_1>;

  using Fusion = cutlass::epilogue::fusion::LinCombPerColBiasEltAct<Activation, Element, ElementCompute, Element,
                                                                     Element, ElementCompute>;
  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, ElementAccumulator, ElementCompute, Element, Layout,
      kAlignment, Element, Layout, kAlignment, cutlass::epilogue::TmaWarpSpecialized,
      Fusion>::CollectiveOp;

  using Mainloop = typename cutlass::conv::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, kConvOp, Element, Layout, kAlignment, Element, Layout,
      kAlignment, ElementAccumulator, TileShape, ClusterShape,
      cutlass::conv::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename Epilogue::SharedStorage))>,
      cutlass::conv::KernelImplicitTmaWarpSpecializedSm90>::CollectiveOp;

  using ProblemShape = cutlass::conv::ConvProblemShape<kConvOp, Mainloop::NumSpatialDimensions>;
  using Kernel = cutlass::conv::kernel::ConvUniversal<ProblemShape, Mainloop, Epilogue>;
  using Conv = cutlass::conv::device::ConvUniversalAdapter<Kernel>;

  // The epilogue sees the NPQK output as ((q, p, n), k): the M mode's strides are those
  // of q, p and n, innermost first (as CUTLASS packs the NHWC activation's).
  template <typename Stride>
  static Stride output_stride(const ProblemShape& shape) {
    Stride stride{};
    cute::for_each(cute::make_seq<3>{}, [&](auto i) { cute::get<0, i>(stride) = shape.stride_C[2 - i]; });
    return stride;
  }

  static typename Conv::Arguments arguments(const ConvBiasActProblem& pr) {
    ProblemShape shape(cutlass::conv::Mode::kCrossCorrelation, {pr.n, pr.h, pr.w, pr.c}, {pr.k, pr.r, pr.s, pr.c},
                       {pr.pad_h, pr.pad_w}, {pr.pad_h, pr.pad_w}, {pr.stride_h, pr.stride_w},
                       {pr.dilation_h, pr.dilation_w}, 1);
    typename Conv::Arguments args{};
    args.mode = cutlass::gemm::GemmUniversalMode::kGemm;
    args.problem_shape = shape;
    args.mainloop.ptr_A = static_cast<const Element*>(pr.x);
    args.mainloop.ptr_B = static_cast<const Element*>(pr.weight);
    auto& fusion = args.epilogue.thread;
    fusion.alpha = ElementCompute(1);
    fusion.beta = ElementCompute(pr.residual ? 1 : 0);
    fusion.bias_ptr = static_cast<const Element*>(pr.bias);  // null: no bias
    // Without a residual, beta = 0 and the epilogue loads no source; C still gets a
    // valid base (the output) since its TMA descriptor is built either way.
    args.epilogue.ptr_C = static_cast<const Element*>(pr.residual ? pr.residual : pr.y);
    args.epilogue.dC = output_stride<typename Epilogue::StrideC>(shape);
    args.epilogue.ptr_D = static_cast<Element*>(pr.y);
    args.epilogue.dD = output_stride<typename Epilogue::StrideD>(shape);
    args.hw_info.sm_count = pr.sm_count;
    return args;
  }

  static constexpr const char* kNoImage =
      "no sm_90a kernel image for this GPU (the Hopper kernels need compute capability 9.0)";

  static const void* kernel_function() { return reinterpret_cast<const void*>(cutlass::device_kernel<Kernel>); }

  static int shared_bytes() { return Kernel::SharedStorageSize; }

  static const char* refusal(const ConvBiasActProblem& pr) {
    // TMA im2col descriptors take traversal strides up to 8, and CUTLASS only asserts
    // the descriptor's encoding (compiled out under NDEBUG): refuse here instead.
    return pr.stride_h > 8 || pr.stride_w > 8 ? "stride above 8 (TMA im2col)" : nullptr;
  }
};

}  // namespace cutlass_conv
}  // namespace resnet_fused
