"""The "native" backend: the compiled extension ``resnet_fused._C``.

One op, ``torch.ops.resnet_fused.native_conv_bias_act``, with its schema in
csrc/ops/conv_bias_act.cpp and one kernel per device type:

* CPU (csrc/ops/cpu/): stride-1 3x3 float32 NHWC convs as Winograd F(4x4, 3x3) (or the
  more precise F(2x2, 3x3): ``RESNET_FUSED_CPU_WINOGRAD_TILE=2``) with bias, residual
  and ReLU in its output transform (AVX2; the weight transformed once per fold); the
  stride-1 1x1 convs of ResNet-50's layer1 as our GEMM with the same epilogue; the
  others as oneDNN's convolution with the bias as a post-op (the weight packed once per
  fold, on its second call: a fold recomputed per call, as under torch.compile without
  freezing, runs on the plain weight), then the residual add and ReLU as ATen's
  in-place passes; a conv + one epilogue pass of ours where oneDNN has no kernel for
  the dtype.
* CUDA (csrc/ops/cuda/, csrc/cutlass/): a CUTLASS implicit GEMM with the epilogue
  fused for fp16/bf16 NHWC; what it refuses (the 3-channel stem, groups, float32,
  NCHW) takes cuDNN's fused conv ops.

Which path a call takes, and why, is what ``native_conv_bias_act_path`` returns and
what :func:`resnet_fused.explain` shows. The fake kernel lives here, as the C++
checks' Python twin.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _extension
from .._layout import output_memory_format
from . import Backend, register


def _register_fake() -> None:
    from ..ops import check_conv_bias_act_args

    @torch.library.register_fake("resnet_fused::native_conv_bias_act")
    def _fake(x, weight, bias, residual, stride, padding, dilation, groups, relu):
        shape = check_conv_bias_act_args(x, weight, bias, residual, stride, padding, dilation, groups)
        return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=output_memory_format(x))

    @torch.library.register_fake("resnet_fused::native_conv_bias_act.out")
    def _fake_out(x, weight, bias, residual, stride, padding, dilation, groups, relu, *, out):
        check_conv_bias_act_args(x, weight, bias, residual, stride, padding, dilation, groups)


class NativeBackend(Backend):
    name = "native"

    def unavailable_reason(self) -> Optional[str]:
        return _extension.load()

    def runs_on(self, device_type: str, auto: bool = False) -> bool:
        if device_type == "cpu":
            return True
        if device_type == "cuda":
            return _extension.has_cuda_kernels() and torch.cuda.is_available()
        return False

    def describe(self, x, weight, residual, stride, padding, dilation, groups) -> Optional[str]:
        return torch.ops.resnet_fused.native_conv_bias_act_path(
            x, weight, residual, list(stride), list(padding), list(dilation), groups
        )

    def run(self, x, weight, bias, residual, stride, padding, dilation, groups, relu) -> Tensor:
        return torch.ops.resnet_fused.native_conv_bias_act(
            x, weight, bias, residual, list(stride), list(padding), list(dilation), groups, relu
        )

    # On the CPU the 1x1 GEMM and the grouped kernel store their tiles into out, and
    # oneDNN accumulates into the residual (its sum post-op) where it runs in x's dtype;
    # Winograd, which may have to recompute a call from the residual, computes and
    # copies, as do the float32-for-bfloat16 and float64 paths and everything on CUDA.
    out_in_place_devices = ("cpu",)

    def writes_out_in_place(self, x, weight, residual, stride, padding, dilation, groups) -> bool:
        if x.device.type not in self.out_in_place_devices:
            return False
        return torch.ops.resnet_fused.native_conv_bias_act_in_place(
            x, weight, residual, list(stride), list(padding), list(dilation), groups)

    def clear_packed_weights(self) -> int:
        return torch.ops.resnet_fused.native_clear_packed_weights() if _extension.load() is None else 0

    def check_packed_weights(self, check: bool) -> bool:
        return torch.ops.resnet_fused.native_check_packed_weights(check) if _extension.load() is None else False

    def run_out(self, x, weight, bias, residual, stride, padding, dilation, groups, relu, out) -> None:
        torch.ops.resnet_fused.native_conv_bias_act.out(
            x, weight, bias, residual, list(stride), list(padding), list(dilation), groups, relu, out=out
        )


if _extension.load() is None:
    _register_fake()
register(NativeBackend())
