// One instantiation per translation unit, so the build runs them in parallel.
#include "conv_bias_act_sm80.cuh"

RESNET_FUSED_CONV_BIAS_ACT_SM80(sm80_f16_relu_128x128, cutlass::half_t, cutlass::epilogue::thread::ReLu, 128, 128)
