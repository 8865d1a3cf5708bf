// One instantiation per translation unit, so the build runs them in parallel.
#include "conv_bias_act_sm80.cuh"

RESNET_FUSED_CONV_ENTRY_POINTS(sm80_f16_relu_128x128, ConvBiasActSm80<cutlass::half_t, cutlass::epilogue::thread::ReLu, 128, 128>)
