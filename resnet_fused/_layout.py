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
