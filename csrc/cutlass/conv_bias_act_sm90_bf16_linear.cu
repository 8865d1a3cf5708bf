// One instantiation per translation unit; compiled for sm_90a only (setup.py).
#include "conv_bias_act_sm90.cuh"

RESNET_FUSED_CONV_BIAS_ACT_SM90(sm90_bf16_linear, cutlass::bfloat16_t, cutlass::epilogue::thread::Identity)
