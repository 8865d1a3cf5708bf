// Picks the instantiation for an element type and activation. Torch-free and
// CUTLASS-free: the templates live in the conv_bias_act_sm80_*.cu units.
#include "conv_bias_act.h"

namespace resnet_fused {
namespace cutlass_conv {

#define RESNET_FUSED_DECLARE(NAME)                                                       \
  const char* NAME##_can_implement(const ConvBiasActProblem& pr);                        \
  const char* NAME##_check_device();                                                     \
  size_t NAME##_workspace_size(const ConvBiasActProblem& pr);                            \
  const char* NAME##_run(const ConvBiasActProblem& pr, void* ws, cudaStream_t stream);

RESNET_FUSED_DECLARE(sm80_f16_relu)
RESNET_FUSED_DECLARE(sm80_f16_linear)
RESNET_FUSED_DECLARE(sm80_bf16_relu)
RESNET_FUSED_DECLARE(sm80_bf16_linear)
#undef RESNET_FUSED_DECLARE

namespace {
struct Entry {
  const char* (*can_implement)(const ConvBiasActProblem&);
  const char* (*check_device)();
  size_t (*workspace_size)(const ConvBiasActProblem&);
  const char* (*run)(const ConvBiasActProblem&, void*, cudaStream_t);
};

Entry entry(Element element, bool relu) {
  if (element == Element::kFloat16) {
    return relu ? Entry{sm80_f16_relu_can_implement, sm80_f16_relu_check_device, sm80_f16_relu_workspace_size, sm80_f16_relu_run}
                : Entry{sm80_f16_linear_can_implement, sm80_f16_linear_check_device, sm80_f16_linear_workspace_size, sm80_f16_linear_run};
  }
  return relu ? Entry{sm80_bf16_relu_can_implement, sm80_bf16_relu_check_device, sm80_bf16_relu_workspace_size, sm80_bf16_relu_run}
              : Entry{sm80_bf16_linear_can_implement, sm80_bf16_linear_check_device, sm80_bf16_linear_workspace_size, sm80_bf16_linear_run};
}
}  // namespace

const char* can_implement(Element element, const ConvBiasActProblem& problem) {
  return entry(element, problem.relu).can_implement(problem);
}

const char* check_device(Element element, bool relu) { return entry(element, relu).check_device(); }

size_t workspace_size(Element element, const ConvBiasActProblem& problem) {
  return entry(element, problem.relu).workspace_size(problem);
}

const char* run(Element element, const ConvBiasActProblem& problem, void* workspace, cudaStream_t stream) {
  return entry(element, problem.relu).run(problem, workspace, stream);
}

}  // namespace cutlass_conv
}  // namespace resnet_fused
