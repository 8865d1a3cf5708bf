"""The fused op: ``relu?(conv2d(x, weight) + bias + residual?)`` in one call.

``torch.ops.resnet_fused.conv_bias_act`` is one torch.library op with a fake (meta)
implementation and an autograd formula, so ``torch.compile(fullgraph=True)`` and
``torch.export`` trace through it. Its body hands the call to a backend (see
:mod:`resnet_fused.backends`); :func:`conv_bias_act` is the Python front that checks
the arguments, normalises them and picks the backend.

A backend may also bring an op of its own that the compiler can see into: the Triton
backend's ``torch.ops.resnet_fused.triton_conv_bias_act`` is a
``torch.library.triton_op``, so under ``torch.compile`` Inductor calls its Triton
kernels directly instead of an opaque Python op, and ``torch.export`` keeps it as one
node. The front calls that op whenever the Triton backend is the one asked for.

The op's last argument, ``check_packed`` (default True), is for the backends that keep
a weight in a layout of their own: with it the native CPU kernels use a packed copy only
while the weight still holds the values it was packed from, and the Triton stem packs
per call, since a compiled graph (Inductor, AOTInductor) rewrites a dead buffer for a
later tensor with no version-counter bump. :func:`conv_bias_act` runs plain eager calls
on the backend directly (its fast path: the version counter tells an edit there) and
every other call (traced by torch.compile, torch.export, make_fx or torch.jit.trace,
under a dispatch or function mode, or recording autograd) through the op with the check.
"""
from __future__ import annotations

import operator
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from . import backends
from ._layout import conv_output_size, output_memory_format, with_canonical_strides

__all__ = ["conv_bias_act", "explain", "available_backends", "check_conv_bias_act_args"]

IntOrPair = Union[int, Sequence[int]]

available_backends = backends.available_backends


def _shown(value) -> str:
    """A value for an error message: a tensor by its shape and dtype, not its contents."""
    if isinstance(value, Tensor):
        return f"a Tensor of shape {tuple(value.shape)} ({value.dtype})"
    if isinstance(value, (tuple, list)) and any(isinstance(v, Tensor) for v in value):
        return f"a {type(value).__name__} holding " + ", ".join(_shown(v) for v in value)
    return f"{type(value).__name__} {value!r}"


def _as_int(value):
    """``value`` as an int if it is one (NumPy's integers too, as conv2d takes them; not a
    bool or a tensor), else None."""
    if isinstance(value, (int, torch.SymInt)):
        return None if isinstance(value, bool) else value
    if isinstance(value, Tensor) or not hasattr(value, "__index__"):
        return None
    return operator.index(value)


def _groups(value):
    """``groups`` as an int where it is one (a NumPy integer too); else as it came, for
    the check to name."""
    as_int = _as_int(value)
    return value if as_int is None else as_int


def _pair(value: IntOrPair, name: str) -> list[int]:
    if type(value) is tuple and len(value) == 2 and type(value[0]) is int and type(value[1]) is int:
        return list(value)  # (a conv module's own attributes: the common case, 5x faster)
    one = _as_int(value)
    if one is not None:
        return [one, one]
    if isinstance(value, (tuple, list)) and len(value) == 2:
        pair = [_as_int(v) for v in value]
        if None not in pair:
            return pair
    raise TypeError(f"{name} should be an int or a pair of ints, got {_shown(value)}")


#: the dtypes the op computes in (conv2d's floating-point ones; no float8)
_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_conv_bias_act_args(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    residual: Optional[Tensor],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
) -> tuple[int, int, int, int]:
    """Validate one call; returns the output shape (N, K, P, Q).

    Raises TypeError for non-tensors and ValueError naming what was expected and
    what came for anything else. Shared by the Python front and the fake kernel.
    """
    if not isinstance(x, Tensor) or not isinstance(weight, Tensor):
        name, t = ("x", x) if not isinstance(x, Tensor) else ("weight", weight)
        raise TypeError(f"{name} should be a Tensor, got {type(t).__name__}")
    if (bias is not None and not isinstance(bias, Tensor)) or (residual is not None and not isinstance(residual, Tensor)):
        name, t = ("bias", bias) if bias is not None and not isinstance(bias, Tensor) else ("residual", residual)
        raise TypeError(f"{name} should be a Tensor or None, got {type(t).__name__}")
    strided = torch.strided
    for name, t in (("x", x), ("weight", weight), ("bias", bias), ("residual", residual)):
        if t is not None and t.layout != strided:
            raise ValueError(f"{name} should be a dense (strided) tensor, got layout {t.layout}")
    x_shape, w_shape = x.shape, weight.shape
    if len(x_shape) != 4:
        raise ValueError(f"x should be 4-D (N, C, H, W), got {len(x_shape)}-D with shape {tuple(x_shape)}")
    if len(w_shape) != 4:
        raise ValueError(f"weight should be 4-D (K, C/groups, R, S), got {len(w_shape)}-D with shape {tuple(w_shape)}")
    dtype, device = x.dtype, x.device
    if dtype not in _DTYPES:
        raise ValueError(f"x should be a floating-point tensor (float32, float16, bfloat16, float64), got {dtype}")
    if weight.dtype != dtype:
        raise ValueError(f"weight dtype should match x ({dtype}), got {weight.dtype}")
    if weight.device != device:
        raise ValueError(f"weight should be on x's device ({device}), got {weight.device}")
    if len(stride) != 2 or len(padding) != 2 or len(dilation) != 2 or stride[0] < 1 or stride[1] < 1 or \
            padding[0] < 0 or padding[1] < 0 or dilation[0] < 1 or dilation[1] < 1:
        for name, v, low in (("stride", stride, 1), ("padding", padding, 0), ("dilation", dilation, 1)):
            if len(v) != 2 or any(e < low for e in v):
                raise ValueError(f"{name} should be two ints >= {low}, got {list(v)}")
    if isinstance(groups, bool) or not isinstance(groups, (int, torch.SymInt)) or groups < 1:
        raise ValueError(f"groups should be a positive int, got {groups!r}")
    n, c, h, w = x_shape
    k, c_per_group, r, s = w_shape
    if k < 1 or c_per_group < 1:
        raise ValueError(f"weight should have at least one output and one input channel, got shape "
                         f"{tuple(w_shape)}")
    if r < 1 or s < 1:
        raise ValueError(f"weight's kernel should be at least 1x1, got shape {tuple(w_shape)}")
    if k % groups != 0:
        raise ValueError(f"weight's output channels ({k}) should be divisible by groups ({groups})")
    if c != c_per_group * groups:
        raise ValueError(
            f"x should have {c_per_group * groups} channels (weight {tuple(w_shape)} with groups={groups}), "
            f"got {c} channels in x of shape {tuple(x_shape)}"
        )
    p = conv_output_size(h, r, stride[0], padding[0], dilation[0])
    q = conv_output_size(w, s, stride[1], padding[1], dilation[1])
    if p < 1 or q < 1:
        raise ValueError(
            f"the convolution output would be empty ({p}x{q}): input {tuple(x_shape[2:])}, kernel "
            f"{tuple(w_shape[2:])}, stride {list(stride)}, padding {list(padding)}, dilation {list(dilation)}"
        )
    out_shape = (n, k, p, q)
    if bias is not None:
        if bias.shape != (k,):
            raise ValueError(f"bias should have shape ({k},), got {tuple(bias.shape)}")
        if bias.dtype != dtype or bias.device != device:
            raise ValueError(f"bias should be {dtype} on {device}, got {bias.dtype} on {bias.device}")
    if residual is not None:
        if residual.shape != out_shape:
            raise ValueError(f"residual should have the output's shape {out_shape}, got {tuple(residual.shape)}")
        if residual.dtype != dtype or residual.device != device:
            raise ValueError(f"residual should be {dtype} on {device}, got {residual.dtype} on {residual.device}")
    return out_shape


@torch.library.custom_op("resnet_fused::conv_bias_act", mutates_args=())
def _conv_bias_act(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    residual: Optional[Tensor],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
    relu: bool,
    backend: str,
    check_packed: bool = True,
) -> Tensor:
    # (the checks again: the op is public, torch.ops.resnet_fused.conv_bias_act, and a
    # backend such as 'torch' would broadcast a wrong-shaped residual instead of refusing it)
    check_conv_bias_act_args(x, weight, bias, residual, stride, padding, dilation, groups)
    impl, _ = backends.select(backend, x, weight, residual, stride, padding, dilation, groups)
    with backends.packed_weights_checked(impl, check_packed):
        return impl.run(x, weight, bias, residual, stride, padding, dilation, groups, relu)


@torch.library.custom_op("resnet_fused::conv_bias_act_out", mutates_args=("out",))
def _conv_bias_act_out(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    residual: Optional[Tensor],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
    relu: bool,
    backend: str,
    out: Tensor,
    check_packed: bool = True,
) -> None:
    """conv_bias_act written into ``out`` (the op behind ``conv_bias_act(..., out=)``)."""
    check_out(out, x, weight, bias, residual,
              check_conv_bias_act_args(x, weight, bias, residual, stride, padding, dilation, groups))
    impl, _ = backends.select(backend, x, weight, residual, stride, padding, dilation, groups)
    with backends.packed_weights_checked(impl, check_packed):
        impl.run_out(x, weight, bias, residual, stride, padding, dilation, groups, relu, out)


@_conv_bias_act_out.register_fake
def _conv_bias_act_out_fake(x, weight, bias, residual, stride, padding, dilation, groups, relu, backend, out,
                            check_packed=True):
    check_conv_bias_act_args(x, weight, bias, residual, stride, padding, dilation, groups)


def _byte_span(t: Tensor) -> tuple[int, int]:
    """[first, last + 1) of the addresses a non-empty tensor's elements occupy (strides are
    never negative in torch; a gap inside the span counts as shared, conservatively)."""
    last = sum((n - 1) * s for n, s in zip(t.shape, t.stride()))
    return t.data_ptr(), t.data_ptr() + (last + 1) * t.element_size()


def check_out(out: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor], residual: Optional[Tensor],
              shape: tuple[int, int, int, int]) -> None:
    """Validate ``out=``: the output's shape, x's dtype and device, dense in the output's
    layout (x's), no memory shared with x, weight or bias; the residual itself is allowed
    (its buffer then takes the output), a partial overlap with it is not. Other parts of
    the same buffer (disjoint slices) are fine."""
    if not isinstance(out, Tensor):
        raise TypeError(f"out should be a Tensor or None, got {type(out).__name__}")
    if tuple(out.shape) != tuple(shape):
        raise ValueError(f"out should have the output's shape {tuple(shape)}, got {tuple(out.shape)}")
    if out.dtype != x.dtype or out.device != x.device:
        raise ValueError(f"out should be {x.dtype} on {x.device}, got {out.dtype} on {out.device}")
    fmt = output_memory_format(x)
    if not out.is_contiguous(memory_format=fmt):
        layout = "channels_last" if fmt == torch.channels_last else "contiguous"
        raise ValueError(f"out should be dense in the output's memory format ({layout}, that of x), "
                         f"got strides {out.stride()}")
    if torch.compiler.is_compiling() or any(type(t) is not Tensor for t in (x, out)) or out.numel() == 0:
        return  # fake tensors have no storage to compare (the kernels' own check runs eagerly); empty ones share none

    out_storage = out.untyped_storage()
    out_low = out_storage.data_ptr()
    out_high = out_low + out_storage.nbytes()

    def shares(t: Optional[Tensor]) -> bool:  # memory in common: the bytes each spans meet
        if t is None or t.device.type == "meta" or t.numel() == 0:
            return False
        if t is out:
            return True
        storage = t.untyped_storage()
        low = storage.data_ptr()
        if low >= out_high or low + storage.nbytes() <= out_low:
            return False  # the storages' memory apart (the common case, and the cheap test); two
            # storages may share memory (two from_numpy or from_dlpack views of one array)
        (first, end), (out_first, out_end) = _byte_span(t), _byte_span(out)
        return first < out_end and out_first < end

    if shares(x) or shares(weight) or shares(bias):
        raise ValueError("out should not share memory with x, weight or bias")
    if shares(residual) and (residual.data_ptr() != out.data_ptr() or residual.stride() != out.stride()):
        raise ValueError("out may be the residual itself but should not partly overlap it")


def register_fake_and_autograd(opdef) -> None:
    """Give a conv_bias_act-shaped op (x, weight, bias, residual, stride, padding,
    dilation, groups, relu, *options) its fake kernel and its autograd formula.

    Used by this op and by the Triton backend's ``triton_conv_bias_act``, so every
    op that computes the fused function agrees on both.
    """

    def fake(x, weight, bias, residual, stride, padding, dilation, groups, relu, *options):
        shape = check_conv_bias_act_args(x, weight, bias, residual, stride, padding, dilation, groups)
        return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=output_memory_format(x))

    def setup_context(ctx, inputs, output):
        x, weight, bias, residual, stride, padding, dilation, groups, relu = inputs[:9]
        ctx.save_for_backward(x, weight, output if relu else None)
        ctx.conv_args = (list(stride), list(padding), list(dilation), groups)
        ctx.bias_shape = None if bias is None else list(bias.shape)
        ctx.has_residual = residual is not None
        ctx.num_options = len(inputs) - 9

    def backward(ctx, grad):
        x, weight, out = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv_args
        if out is not None:  # torch.relu's own backward: zero where out <= 0 (a NaN output passes grad)
            grad = torch.ops.aten.threshold_backward(grad, out, 0)
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad_x, grad_w, grad_b = torch.ops.aten.convolution_backward(
            grad, x, with_canonical_strides(weight), ctx.bias_shape, stride, padding, dilation, False, [0, 0], groups,
            [need_x, need_w, need_b and ctx.bias_shape is not None],
        )
        grad_residual = grad if ctx.has_residual and ctx.needs_input_grad[3] else None
        return (grad_x, grad_w, grad_b, grad_residual) + (None,) * (5 + ctx.num_options)

    opdef.register_fake(fake)
    opdef.register_autograd(backward, setup_context=setup_context)


register_fake_and_autograd(_conv_bias_act)


def conv_bias_act(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    residual: Optional[Tensor] = None,
    stride: IntOrPair = 1,
    padding: IntOrPair = 0,
    dilation: IntOrPair = 1,
    groups: int = 1,
    relu: bool = True,
    backend: Optional[str] = None,
    *,
    out: Optional[Tensor] = None,
) -> Tensor:
    """``relu?(conv2d(x, weight, stride, padding, dilation, groups) + bias + residual?)``.

    Args:
        x: input (N, C, H, W), NCHW or channels_last; the output has x's layout.
        weight: (K, C/groups, R, S), x's dtype and device (a folded BatchNorm lives here).
        bias: (K,) or None.
        residual: a tensor of the output's shape added before the ReLU, or None.
        stride, padding, dilation: an int or a pair, as in ``torch.nn.functional.conv2d``
            (string padding such as "same" is not taken).
        groups: as in conv2d.
        relu: apply ReLU last.
        backend: "auto" (None) picks the fastest implementation available for x's
            device and dtype; "torch", "triton" or "native" name one. A backend that
            cannot take the call falls back to the next; :func:`explain` says why.
        out: write the output here and return it (the output's shape, dtype and
            layout; sharing no memory with x, weight or bias, though other slices of
            their buffers are fine). It may be ``residual``
            itself: a residual block's output can take its identity's buffer, which is
            dead after the add, and the native CPU kernels then write it in place
            (no new 25 MB output to fault in at ResNet-50's layer1, batch 8). Like
            torch's ``out=`` functions, not differentiable.

    Under ``torch.autocast`` the op casts its inputs as conv2d does there: x, weight,
    bias and residual, where floating point and not float64, to the autocast dtype;
    not with ``out=`` (as torch's ``out=`` calls are not autocast).
    """
    if _autocasting(x):  # the backends then run in the dtype they are given (torch's conv2d would not)
        if out is None:
            x, weight, bias, residual = _autocast(x, weight, bias, residual)
        with torch.autocast(x.device.type, enabled=False):
            return conv_bias_act(x, weight, bias, residual, stride, padding, dilation, groups, relu, backend, out=out)
    stride, padding, dilation = _pair(stride, "stride"), _pair(padding, "padding"), _pair(dilation, "dilation")
    groups = _groups(groups)
    if not isinstance(relu, bool):
        raise TypeError(f"relu should be a bool, got {type(relu).__name__}")
    shape = check_conv_bias_act_args(x, weight, bias, residual, stride, padding, dilation, groups)
    name = backends.resolve(backend, x.device)
    if out is not None:
        check_out(out, x, weight, bias, residual, shape)
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias, residual, out)):
            raise RuntimeError("conv_bias_act(..., out=...) does not support autograd (like torch's out= functions); "
                               "call it without out=, or under torch.no_grad() / torch.inference_mode()")
        if _eager_fast_path(x, weight, bias, residual, out):
            impl, _ = backends.select(name, x, weight, residual, stride, padding, dilation, groups)
            impl.run_out(x, weight, bias, residual, stride, padding, dilation, groups, relu, out)
        else:
            torch.ops.resnet_fused.conv_bias_act_out(
                x, weight, bias, residual, stride, padding, dilation, groups, relu, name, out)
        return out
    if _eager_fast_path(x, weight, bias, residual):
        impl, _ = backends.select(name, x, weight, residual, stride, padding, dilation, groups)
        return impl.run(x, weight, bias, residual, stride, padding, dilation, groups, relu)
    own_op = backends.traceable_op(name)
    if own_op is not None:  # an op torch.compile can trace into (the Triton backend's)
        return own_op(x, weight, bias, residual, stride, padding, dilation, groups, relu)
    # (check_packed left True: off the eager fast path the call may be traced into a graph
    # that rewrites its buffers without version bumps; packed_weights_checked)
    return torch.ops.resnet_fused.conv_bias_act(x, weight, bias, residual, stride, padding, dilation, groups, relu, name)


def _autocasting(x) -> bool:
    """Whether ``torch.autocast`` is on for x's device type ("meta", which autocast does
    not know, never)."""
    if not _ANY_AUTOCAST() or not isinstance(x, Tensor):  # (~0.2 us a call where autocast is off)
        return False
    device = x.device.type
    return torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)


#: whether autocast is on for any device: one cheap call on the op's hot path
_ANY_AUTOCAST = getattr(torch._C, "_is_any_autocast_enabled", lambda: True)


def _autocast(*tensors):
    """``tensors`` as conv2d takes them under ``torch.autocast`` (on: :func:`_autocasting`)
    for the first one's device type: floating point ones (but float64) in its dtype."""
    dtype = torch.get_autocast_dtype(tensors[0].device.type)
    return tuple(t.to(dtype) if isinstance(t, Tensor) and t.is_floating_point() and t.dtype != torch.float64 else t
                 for t in tensors)


def _eager_fast_path(*tensors: Optional[Tensor]) -> bool:
    """True when calling the backend directly is exactly what the op would do.

    The dispatcher's work for a Python custom op (autograd wrapper, alias checks,
    dynamo guards) costs ~40 us a call, as much as a small conv's kernel. With no
    autograd to record, no tracing and no dispatch or function modes active, the op
    would only run the same backend, so plain tensors skip it.
    """
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or torch._C._len_torch_dispatch_stack() or \
            torch._C._is_torch_function_mode_enabled():
        return False
    grad = torch.is_grad_enabled()
    for t in tensors:
        if t is not None and (type(t) is not Tensor or (grad and t.requires_grad)):
            return False
    return True


def explain(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    residual: Optional[Tensor] = None,
    stride: IntOrPair = 1,
    padding: IntOrPair = 0,
    dilation: IntOrPair = 1,
    groups: int = 1,
    relu: bool = True,
    backend: Optional[str] = None,
    *,
    out: Optional[Tensor] = None,
) -> str:
    """Say which backend a :func:`conv_bias_act` call with these arguments runs on, and why.

    Takes exactly :func:`conv_bias_act`'s arguments, so ``explain(*args, **kwargs)``
    describes ``conv_bias_act(*args, **kwargs)``. Example: ``explain(x, w, backend="triton")``
    on a machine without a GPU ->
    ``"runs on 'torch'; skipped 'triton': no CUDA device and TRITON_INTERPRET is not set"``.
    """
    if out is None and _autocasting(x):
        x, weight, bias, residual = _autocast(x, weight, bias, residual)  # (what the op will be given)
    stride, padding, dilation = _pair(stride, "stride"), _pair(padding, "padding"), _pair(dilation, "dilation")
    groups = _groups(groups)
    if not isinstance(relu, bool):
        raise TypeError(f"relu should be a bool, got {type(relu).__name__}")
    shape = check_conv_bias_act_args(x, weight, bias, residual, stride, padding, dilation, groups)
    if out is not None:
        check_out(out, x, weight, bias, residual, shape)
    impl, skipped = backends.select(
        backends.resolve(backend, x.device), x, weight, residual, stride, padding, dilation, groups, running=False
    )
    if backends.check_name(backend) == "auto":  # and those 'auto' did not try (the extension not built, say)
        skipped = backends.passed_over_by_auto(x.device) + skipped
    text = f"runs on {impl.name!r}"
    how = impl.describe(x, weight, residual, stride, padding, dilation, groups)
    if how:
        text += f" ({how})"
    if out is not None:
        into_residual = residual is not None and out.data_ptr() == residual.data_ptr()
        in_place = impl.writes_out_in_place(x, weight, residual if into_residual else None, stride, padding,
                                            dilation, groups)
        how_out = "in place" if in_place else "computed, then copied"
        target = "the residual's buffer" if into_residual else "out"
        text += f", written into {target} ({how_out})"
    if skipped:
        text += "; " + "; ".join(f"skipped {name!r}: {reason}" for name, reason in skipped)
    return text
