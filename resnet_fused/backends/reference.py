"""The "torch" backend: the fused op spelled in aten ops. Every device, every dtype.

It is the reference the other backends are tested against and the end of every
fallback chain, so it takes any call that passed the op's argument checks.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from . import Backend, register
from .._layout import conv_output_size, output_memory_format, with_canonical_strides


class TorchBackend(Backend):
    name = "torch"

    def describe(self, x, weight, residual, stride, padding, dilation, groups) -> Optional[str]:
        if x.device.type == "cpu" and reads_only_padding(x.shape[2:], weight.shape[2:], stride, padding, dilation):
            return "no conv: every output pixel's taps lie in the zero padding, so only the bias, residual and ReLU run"
        return None

    def run(
        self,
        x: Tensor,
        weight: Tensor,
        bias: Optional[Tensor],
        residual: Optional[Tensor],
        stride: Sequence[int],
        padding: Sequence[int],
        dilation: Sequence[int],
        groups: int,
        relu: bool,
    ) -> Tensor:
        fmt = output_memory_format(x)
        if x.device.type == "cpu" and reads_only_padding(x.shape[2:], weight.shape[2:], stride, padding, dilation):
            y = _zero_conv(x, weight, bias, stride, padding, dilation, fmt)
        else:
            y = F.conv2d(x, with_canonical_strides(weight), bias, stride, padding, dilation, groups)
            y = y.contiguous(memory_format=fmt)
        if residual is not None:
            y.add_(residual)
        if relu:
            y.relu_()
        return y


def reads_only_padding(size: Sequence[int], kernel: Sequence[int], stride: Sequence[int], padding: Sequence[int],
                       dilation: Sequence[int]) -> bool:
    """True when every output pixel's taps lie in the zero padding (in height or in
    width, no output position o and tap t meet ``0 <= o*stride - pad + t*dil < size``), so
    the conv is zero everywhere. aten's CPU conv (oneDNN's brgemm kernels, torch 2.11 and
    2.14) dereferences a null pointer on some such calls (an NHWC input whose every
    output column is padding, with a bias or a post-op: benchmarks/NOTES.md), so on the
    CPU they never reach it. (The C++ twin: ``reads_only_padding`` in
    csrc/ops/conv_bias_act.h.)"""
    return any(not _reads_input(*dims) for dims in zip(size, kernel, stride, padding, dilation))


def _reads_input(n: int, taps: int, stride: int, pad: int, dil: int) -> bool:
    """Whether some output position reads some input row in one dimension."""
    out = conv_output_size(n, taps, stride, pad, dil)
    for t in range(taps):
        lo = pad - t * dil  # output position o reads row o*stride - lo with this tap
        first = max(0, -(-lo // stride))  # the first o with o*stride >= lo
        if first < out and first * stride - lo < n:
            return True
    return False


def _zero_conv(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride, padding, dilation, fmt) -> Tensor:
    """The output of a conv that reads only padding: its bias, zeros without one. The
    padding's taps add nothing even where the weight is NaN or Inf there, as in oneDNN's
    NHWC conv and the native backend's own kernels (aten's NCHW CPU conv and the float64
    reference multiply the padding's zeros: NaN)."""
    size = map(conv_output_size, x.shape[2:], weight.shape[2:], stride, padding, dilation)
    y = torch.empty((x.shape[0], weight.shape[0], *size), dtype=x.dtype, device=x.device, memory_format=fmt).zero_()
    return y if bias is None else y.add_(bias.view(1, -1, 1, 1))


register(TorchBackend())
