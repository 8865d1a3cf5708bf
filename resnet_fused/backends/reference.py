"""The "torch" backend: the fused op spelled in aten ops. Every device, every dtype.

It is the reference the other backends are tested against and the end of every
fallback chain, so it takes any call that passed the op's argument checks.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch.nn.functional as F
from torch import Tensor

from . import Backend, register
from .._layout import output_memory_format, with_canonical_strides


class TorchBackend(Backend):
    name = "torch"

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
        y = F.conv2d(x, with_canonical_strides(weight), bias, stride, padding, dilation, groups)
        y = y.contiguous(memory_format=output_memory_format(x))
        if residual is not None:
            y.add_(residual)
        if relu:
            y.relu_()
        return y


register(TorchBackend())
