"""Memory-format conventions shared by the op, its backends and the modules."""
import torch
from torch import Tensor


def is_channels_last(x: Tensor) -> bool:
    """True when ``x`` is NHWC in memory and not also plain NCHW-contiguous.

    A tensor that is both (C == 1, or H == W == 1) counts as NCHW, so the op's
    output layout is one well-defined function of its input.
    """
    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def output_memory_format(x: Tensor) -> torch.memory_format:
    """The op's output follows its input: NHWC in, NHWC out; anything else, NCHW."""
    return torch.channels_last if is_channels_last(x) else torch.contiguous_format


def strides_read_as_channels_last(x: Tensor) -> bool:
    """Whether aten's CPU convolution reads ``x``'s strides as NHWC: c10's
    ``is_channels_last_strides_2d`` (what ``Tensor.suggest_memory_format`` returns, not
    exposed in Python). Unlike :func:`is_channels_last` it says NHWC for a tensor of both
    layouts (size-1 dims) whose strides are NHWC's, as a conv's (N, C, 1, 1) output on an
    NHWC input has. aten brings the weight into the layout it reads, copying it on every
    call where the two differ, so a folded weight for aten takes this layout.
    """
    if x.dim() != 4:
        return False
    sizes, strides = x.shape, x.stride()
    if strides[1] == 0:
        return False
    low = 0
    for d in (1, 3, 2, 0):
        if sizes[d] == 0 or strides[d] < low or (d == 0 and low == strides[1]):
            return False
        low = strides[d] * sizes[d] if sizes[d] > 1 else strides[d]
    return True
