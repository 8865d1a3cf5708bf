"""Memory-format and shape conventions shared by the op, its backends and the modules."""
import torch
from torch import Tensor


def conv_output_size(size: int, taps: int, stride: int, pad: int, dil: int) -> int:
    """A conv's output size in one dimension, torch's rule (below 1: no window fits).
    (The C++ twin, clamped at 0: ``conv_output_size`` in csrc/ops/conv_bias_act.h.)"""
    return (size + 2 * pad - dil * (taps - 1) - 1) // stride + 1


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


def with_canonical_strides(t: Tensor) -> Tensor:
    """``t`` as a view whose size-1 dimensions have the strides its layout gives them
    (contiguous, or channels_last where aten reads it so); ``t`` itself where it has them
    already or is dense in neither layout. A size-1 dimension's stride addresses nothing,
    so any value is legal and ``.contiguous()`` keeps it; but aten's CPU convolution
    (oneDNN, torch 2.11 and 2.14) computes a grouped conv on an NHWC input wrongly when the
    channels_last weight's size-1 kernel dimension (a 1x3 or 3x1 kernel) has another stride
    (benchmarks/NOTES.md): the weight handed to aten's convolution goes through this.
    (The C++ twin: ``with_canonical_strides`` in csrc/ops/conv_bias_act.h.)"""
    shape = t.shape
    if len(shape) != 4 or 1 not in shape:
        return t
    n, c, h, w = shape
    if t.is_contiguous() and not strides_read_as_channels_last(t):
        want = (c * h * w, h * w, w, 1)
    elif t.is_contiguous(memory_format=torch.channels_last):
        want = (h * w * c, 1, w * c, c)
    else:
        return t
    return t if t.stride() == want else t.as_strided(shape, want)
