// One instantiation per translation unit; compiled for sm_90a only (setup.py).
#include "conv_bias_act_sm90.cuh"

RESNET_FUSED_CONV_ENTRY_POINTS(sm90_bf16_relu, ConvBiasActSm90<cutlass::bfloat16_t, cutlass::epilogue::thread::ReLu>)
