// Picks the instantiation for a (element type, tile, activation). Torch-free and
// CUTLASS-free: the templates live in the conv_bias_act_sm80_*.cu units.
#include "conv_bias_act.h"

namespace resnet_fused {
namespace cutlass_conv {

#define RESNET_FUSED_DECLARE(NAME)                                                       \
  const char* NAME##_can_implement(const ConvBiasActProblem& pr);                        \
  const char* NAME##_check_device();                                                     \
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
#undef RESNET_FUSED_DECLARE

namespace {
struct Entry {
  const char* (*can_implement)(const ConvBiasActProblem&);
  const char* (*check_device)();
  size_t (*workspace_size)(const ConvBiasActProblem&);
  const char* (*run)(const ConvBiasActProblem&, void*, cudaStream_t);
};

#define ENTRY(NAME) Entry{NAME##_can_implement, NAME##_check_device, NAME##_workspace_size, NAME##_run}

// [element][tile][relu]
const Entry kEntries[2][2][2] = {
    {  // float16
        {ENTRY(sm80_f16_linear_128x128), ENTRY(sm80_f16_relu_128x128)},
        {ENTRY(sm80_f16_linear_64x64), ENTRY(sm80_f16_relu_64x64)},
    },
    {  // bfloat16
        {ENTRY(sm80_bf16_linear_128x128), ENTRY(sm80_bf16_relu_128x128)},
        {ENTRY(sm80_bf16_linear_64x64), ENTRY(sm80_bf16_relu_64x64)},
    },
};
#undef ENTRY

const Entry& entry(const KernelKey& key) {
  return kEntries[static_cast<int>(key.element)][static_cast<int>(key.tile)][key.relu ? 1 : 0];
}
}  // namespace

const char* tile_name(Tile tile) { return tile == Tile::k128x128 ? "128x128" : "64x64"; }

const char* can_implement(const KernelKey& key, const ConvBiasActProblem& problem) {
  return entry(key).can_implement(problem);
}

const char* check_device(const KernelKey& key) { return entry(key).check_device(); }

size_t workspace_size(const KernelKey& key, const ConvBiasActProblem& problem) {
  return entry(key).workspace_size(problem);
}

const char* run(const KernelKey& key, const ConvBiasActProblem& problem, void* workspace, cudaStream_t stream) {
  return entry(key).run(problem, workspace, stream);
}

}  // namespace cutlass_conv
}  // namespace resnet_fused
