// Picks the instantiation for a (element type, kernel variant, activation). Torch-free
// and CUTLASS-free: the templates live in the conv_bias_act_sm{80,90}_*.cu units.
#include "conv_bias_act.h"

namespace resnet_fused {
namespace cutlass_conv {

#define RESNET_FUSED_DECLARE(NAME)                                                       \
  const char* NAME##_can_implement(const ConvBiasActProblem& pr);                        \
  const char* NAME##_check_device(bool* permanent);                                       \
  size_t NAME##_workspace_size(const ConvBiasActProblem& pr);                            \
  const char* NAME##_run(const ConvBiasActProblem& pr, void* ws, cudaStream_t stream);

RESNET_FUSED_DECLARE(sm80_f16_relu_128x128)
RESNET_FUSED_DECLARE(sm80_f16_linear_128x128)
RESNET_FUSED_DECLARE(sm80_f16_relu_64x64)
RESNET_FUSED_DECLARE(sm80_f16_linear_64x64)
RESNET_FUSED_DECLARE(sm80_bf16_relu_128x128)
RESNET_FUSED_DECLARE(sm80_bf16_linear_128x128)
RESNET_FUSED_DECLARE(sm80_bf16_relu_64x64)
RESNET_FUSED_DECLARE(sm80_bf16_linear_64x64)
#ifdef RESNET_FUSED_WITH_SM90A
RESNET_FUSED_DECLARE(sm90_f16_relu)
RESNET_FUSED_DECLARE(sm90_f16_linear)
RESNET_FUSED_DECLARE(sm90_bf16_relu)
RESNET_FUSED_DECLARE(sm90_bf16_linear)
#endif
#undef RESNET_FUSED_DECLARE

namespace {
struct Entry {
  const char* (*can_implement)(const ConvBiasActProblem&);
  const char* (*check_device)(bool*);
  size_t (*workspace_size)(const ConvBiasActProblem&);
  const char* (*run)(const ConvBiasActProblem&, void*, cudaStream_t);
};

#define ENTRY(NAME) Entry{NAME##_can_implement, NAME##_check_device, NAME##_workspace_size, NAME##_run}

const char* not_built_can_implement(const ConvBiasActProblem&) { return "the sm90a kernels are not in this build"; }
const char* not_built_check_device(bool* permanent) {
  *permanent = true;
  return "the sm90a kernels are not in this build";
}
size_t not_built_workspace_size(const ConvBiasActProblem&) { return 0; }
const char* not_built_run(const ConvBiasActProblem&, void*, cudaStream_t) {
  return "the sm90a kernels are not in this build";
}

#ifdef RESNET_FUSED_WITH_SM90A
#define SM90(NAME) ENTRY(NAME)
#else
#define SM90(NAME) ENTRY(not_built)
#endif

// [element][variant][relu]
const Entry kEntries[2][3][2] = {
    {  // float16
        {ENTRY(sm80_f16_linear_128x128), ENTRY(sm80_f16_relu_128x128)},
        {ENTRY(sm80_f16_linear_64x64), ENTRY(sm80_f16_relu_64x64)},
        {SM90(sm90_f16_linear), SM90(sm90_f16_relu)},
    },
    {  // bfloat16
        {ENTRY(sm80_bf16_linear_128x128), ENTRY(sm80_bf16_relu_128x128)},
        {ENTRY(sm80_bf16_linear_64x64), ENTRY(sm80_bf16_relu_64x64)},
        {SM90(sm90_bf16_linear), SM90(sm90_bf16_relu)},
    },
};
#undef SM90
#undef ENTRY

const Entry& entry(const KernelKey& key) {
  return kEntries[static_cast<int>(key.element)][static_cast<int>(key.variant)][key.relu ? 1 : 0];
}
}  // namespace

const char* variant_name(Variant variant) {
  switch (variant) {
    case Variant::kSm80Tile128:
      return "sm80_128x128";
    case Variant::kSm80Tile64:
      return "sm80_64x64";
    case Variant::kSm90aTile128:
      return "sm90a_128x128";
  }
  return "unknown";
}

bool has_sm90a() {
#ifdef RESNET_FUSED_WITH_SM90A
  return true;
#else
  return false;
#endif
}

const char* can_implement(const KernelKey& key, const ConvBiasActProblem& problem) {
  return entry(key).can_implement(problem);
}

const char* check_device(const KernelKey& key, bool* permanent) {
  *permanent = false;
  return entry(key).check_device(permanent);
}

size_t workspace_size(const KernelKey& key, const ConvBiasActProblem& problem) {
  return entry(key).workspace_size(problem);
}

const char* run(const KernelKey& key, const ConvBiasActProblem& problem, void* workspace, cudaStream_t stream) {
  return entry(key).run(problem, workspace, stream);
}

}  // namespace cutlass_conv
}  // namespace resnet_fused
