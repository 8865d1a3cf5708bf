// One instantiation per translation unit, so the build runs them in parallel.
#include "conv_bias_act_sm80.cuh"

RESNET_FUSED_CONV_ENTRY_POINTS(sm80_bf16_linear_128x128, ConvBiasActSm80<cutlass::bfloat16_t, cutlass::epilogue::thread::Identity, 128, 128>)
