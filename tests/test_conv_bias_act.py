"""The fused op ``conv_bias_act`` and its "torch" implementation, as a specification.

Every case is compared with the float64 reference at the tolerances of resnet_fused.testing.TOLERANCES.
"""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import resnet_fused
from resnet_fused import backends, ops
from resnet_fused.testing import TOLERANCES, reference_conv_bias_act, relative_error

# (why it is here, N, C, H, W, K, R, stride, padding, dilation, groups)
CONV_KINDS = [
    ("stem 7x7/2, 3 input channels", 2, 3, 16, 16, 8, 7, 2, 3, 1, 1),
    ("3x3 stride 1", 2, 16, 9, 9, 16, 3, 1, 1, 1, 1),
    ("3x3 stride 2 on odd size", 2, 16, 9, 11, 24, 3, 2, 1, 1, 1),
    ("1x1 stride 1 (plain GEMM)", 2, 32, 8, 8, 16, 1, 1, 0, 1, 1),
    ("1x1 stride 2 (downsample)", 2, 16, 9, 9, 32, 1, 2, 0, 1, 1),
    ("grouped 3x3 (ResNeXt)", 2, 32, 8, 8, 32, 3, 1, 1, 1, 8),
    ("grouped 3x3 stride 2", 1, 16, 7, 7, 32, 3, 2, 1, 1, 4),
    ("dilation 2", 2, 16, 10, 10, 16, 3, 1, 2, 2, 1),
    ("dilation 4", 1, 8, 12, 12, 8, 3, 1, 4, 4, 1),
    ("odd channels", 3, 5, 7, 6, 7, 3, 1, 1, 1, 1),
]
DTYPES = [torch.float32, torch.bfloat16, torch.float64]


def make_case(gen, n, c, h, w, k, r, stride, padding, dilation, groups, dtype, residual, channels_last=False):
    x = torch.randn(n, c, h, w, generator=gen).to(dtype)
    weight = (torch.randn(k, c // groups, r, r, generator=gen) / (c // groups * r * r) ** 0.5).to(dtype)
    bias = torch.randn(k, generator=gen).to(dtype)
    p = (h + 2 * padding - dilation * (r - 1) - 1) // stride + 1
    q = (w + 2 * padding - dilation * (r - 1) - 1) // stride + 1
    res = torch.randn(n, k, p, q, generator=gen).to(dtype) if residual else None
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        res = None if res is None else res.contiguous(memory_format=torch.channels_last)
    return x, weight, bias, res


@pytest.mark.parametrize("kind", CONV_KINDS, ids=[k[0] for k in CONV_KINDS])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("residual", [False, True], ids=["no_residual", "residual"])
@pytest.mark.parametrize("relu", [False, True], ids=["no_relu", "relu"])
def test_matches_float64_reference(gen, kind, dtype, residual, relu):
    _, n, c, h, w, k, r, s, p, d, g = kind
    x, weight, bias, res = make_case(gen, n, c, h, w, k, r, s, p, d, g, dtype, residual)
    out = ops.conv_bias_act(x, weight, bias, res, stride=s, padding=p, dilation=d, groups=g, relu=relu, backend="torch")
    ref = reference_conv_bias_act(x, weight, bias, res, s, p, d, g, relu)
    assert out.dtype == dtype and out.shape == ref.shape
    assert relative_error(out, ref) <= TOLERANCES[dtype]
    if relu:
        assert (out >= 0).all()


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_output_layout_follows_input(gen, channels_last):
    x, weight, bias, res = make_case(gen, 2, 8, 6, 6, 8, 3, 1, 1, 1, 1, torch.float32, True, channels_last)
    out = ops.conv_bias_act(x, weight, bias, res, padding=1)
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    assert relative_error(out, reference_conv_bias_act(x, weight, bias, res, 1, 1)) <= TOLERANCES[torch.float32]


def test_pair_arguments_and_no_bias(gen):
    x = torch.randn(1, 4, 9, 7, generator=gen)
    weight = torch.randn(6, 4, 3, 1, generator=gen)
    out = ops.conv_bias_act(x, weight, stride=(2, 1), padding=(1, 0), dilation=(1, 2), relu=False)
    ref = reference_conv_bias_act(x, weight, None, None, (2, 1), (1, 0), (1, 2), 1, False)
    assert relative_error(out, ref) <= TOLERANCES[torch.float32]


def test_registered_as_one_torch_library_op(gen):
    x, weight, bias, res = make_case(gen, 1, 4, 5, 5, 4, 3, 1, 1, 1, 1, torch.float32, True)
    out = torch.ops.resnet_fused.conv_bias_act(x, weight, bias, res, [1, 1], [1, 1], [1, 1], 1, True, "torch")
    assert relative_error(out, reference_conv_bias_act(x, weight, bias, res, 1, 1)) <= TOLERANCES[torch.float32]


@pytest.mark.parametrize("residual", [False, True], ids=["no_residual", "residual"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_opcheck(gen, residual, channels_last):
    x, weight, bias, res = make_case(gen, 2, 8, 7, 7, 8, 3, 2, 1, 1, 2, torch.float32, residual, channels_last)
    x.requires_grad_(True)
    weight.requires_grad_(True)
    torch.library.opcheck(
        torch.ops.resnet_fused.conv_bias_act.default,
        (x, weight, bias, res, [2, 2], [1, 1], [1, 1], 2, True, "torch"),
    )


def test_gradients_match_autograd_of_the_reference(gen):
    x, weight, bias, res = make_case(gen, 2, 4, 6, 6, 6, 3, 1, 1, 1, 2, torch.float64, True)
    for t in (x, weight, bias, res):
        t.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda *a: ops.conv_bias_act(*a, stride=1, padding=1, groups=2, relu=True), (x, weight, bias, res)
    )


# (why, C, K, R, stride, padding, dtype): each lands on a different path of the native
# CPU kernel (Winograd, the 1x1 GEMM, oneDNN, oneDNN in float32 for bfloat16)
VIEW_CASES = [
    ("3x3 stride 1", 16, 16, 3, 1, 1, torch.float32),
    ("1x1 stride 1", 16, 24, 1, 1, 0, torch.float32),
    ("3x3 stride 2", 8, 16, 3, 2, 1, torch.float32),
    ("3x3 bfloat16", 8, 16, 3, 1, 1, torch.bfloat16),
]


def strided_views(gen, n, c, h, w, k, r, stride, padding, dtype):
    """x, weight, bias and residual as views that are dense in no memory format: x and
    the residual every other channel of a wider NHWC tensor, the bias every other
    element of a longer vector, the weight a transposed copy read back through .t()."""
    x = torch.randn(n, h, w, 2 * c, generator=gen).to(dtype).permute(0, 3, 1, 2)[:, ::2]
    weight = (torch.randn(c, k, r, r, generator=gen) / (c * r * r) ** 0.5).to(dtype).transpose(0, 1)
    bias = torch.randn(2 * k, generator=gen).to(dtype)[::2]
    p = (h + 2 * padding - r) // stride + 1
    q = (w + 2 * padding - r) // stride + 1
    res = torch.randn(n, p, q, 2 * k, generator=gen).to(dtype).permute(0, 3, 1, 2)[:, 1::2]
    return x, weight, bias, res


@pytest.mark.parametrize("backend", ["torch", "native", "triton"])
@pytest.mark.parametrize("case", VIEW_CASES, ids=[c[0] for c in VIEW_CASES])
def test_strided_and_expanded_views_on_every_backend(gen, backend, case):
    """A bias, residual, x or weight that is a strided view is read through its strides
    (a native kernel and every Triton kernel once read the bias as if dense: wrong answers)."""
    if backend not in resnet_fused.available_backends("cpu"):
        pytest.skip(f"{backend} does not run on this machine's CPU: {backends.unavailable_reason(backend)}")
    _, c, k, r, s, p, dtype = case
    x, weight, bias, res = strided_views(gen, 2, c, 9, 7, k, r, s, p, dtype)
    assert not bias.is_contiguous() and not res.is_contiguous(memory_format=torch.channels_last)
    expanded = torch.randn(1, generator=gen).to(dtype).expand(k)
    for b in (bias, expanded):
        out = ops.conv_bias_act(x, weight, b, res, stride=s, padding=p, relu=True, backend=backend)
        ref = reference_conv_bias_act(x, weight, b, res, s, p)
        assert relative_error(out, ref) <= TOLERANCES[dtype], ops.explain(x, weight, None, res, s, p, backend=backend)


def odd_size_one_stride(values, stride):
    """``values`` (4-D) copied into a channels_last view whose size-1 dimensions have the
    stride ``stride()`` (a function, called per such dimension): the same elements in the
    same places."""
    strides = list(values.contiguous(memory_format=torch.channels_last).stride())
    strides = [stride() if size == 1 else st for size, st in zip(values.shape, strides)]
    out = values.new_empty(sum((size - 1) * st for size, st in zip(values.shape, strides)) + 1)
    return out.as_strided(values.shape, strides).copy_(values)


@pytest.mark.parametrize("backend", ["torch", "native", "triton"])
@pytest.mark.parametrize("kernel, groups, stride", [((1, 3), 4, 1), ((3, 1), 2, 2), ((1, 5), 8, 1)])
@pytest.mark.parametrize("odd", [1, 1000], ids=["size1_stride_1", "size1_stride_1000"])
def test_grouped_1xn_weight_with_an_odd_size_one_stride(gen, backend, kernel, groups, stride, odd):
    """A size-1 dimension's stride addresses nothing, so any value is legal, but aten's CPU
    convolution (oneDNN, torch 2.11 and 2.14) computed a grouped conv on an NHWC input
    wrongly (relative error ~1) when the channels_last weight's size-1 kernel dimension had
    another stride than its layout's: the backends that hand the weight to aten gave that
    answer. Twice: the native backend's first call and its packed weight's."""
    if backend not in resnet_fused.available_backends("cpu"):
        pytest.skip(f"{backend} does not run on this machine's CPU: {backends.unavailable_reason(backend)}")
    c, k = 4 * groups, 2 * groups
    x, weight, bias, res = make_case(gen, 2, c, 9, 11, k, 1, stride, 0, 1, groups, torch.float32, True,
                                     channels_last=True)
    weight = (torch.randn(k, c // groups, *kernel, generator=gen) / (c // groups * 3) ** 0.5)
    weight = odd_size_one_stride(weight, lambda: odd)
    padding = (kernel[0] // 2, kernel[1] // 2)
    ref = reference_conv_bias_act(x, weight, bias, res, stride, padding, 1, groups)
    for _ in range(2):
        out = ops.conv_bias_act(x, weight, bias, res, stride, padding, 1, groups, backend=backend)
        assert relative_error(out, ref) <= TOLERANCES[torch.float32], ops.explain(x, weight, bias, res, stride,
                                                                                 padding, 1, groups, backend=backend)
        with torch.no_grad():
            into = ops.conv_bias_act(x, weight, bias, res, stride, padding, 1, groups, backend=backend,
                                     out=torch.empty_like(ref, dtype=x.dtype, memory_format=torch.channels_last))
        assert relative_error(into, ref) <= TOLERANCES[torch.float32]
    if backend == "triton":  # its cuDNN-conv algorithm (aten's conv here) too
        from resnet_fused.backends import triton_backend as tb
        y = tb.cudnn_with_epilogue(x, weight, bias, res, [stride] * 2, list(padding), [1, 1], groups, True)
        assert relative_error(y, ref) <= TOLERANCES[torch.float32]


#: convs whose every output pixel reads only padding, in width or height: (x shape,
#: weight shape, stride, padding, dilation, groups). The first two made aten's CPU conv
#: (oneDNN's brgemm kernels, torch 2.11 and 2.14) read address 0 on an NHWC input with a
#: bias (a fuzz found the first; one call in a few segfaulted the process).
PADDING_ONLY = [
    ((3, 48, 7, 1), (32, 12, 3, 1), (2, 2), (2, 1), (2, 2), 4),
    ((2, 4, 6, 1), (8, 2, 3, 1), (2, 2), (1, 1), (1, 2), 2),
    ((3, 48, 1, 7), (32, 12, 1, 3), (2, 2), (1, 2), (2, 2), 4),  # every output row
    ((2, 8, 1, 1), (16, 8, 1, 1), (2, 2), (1, 1), (1, 1), 1),  # a 1x1 conv: positions -1 and 1
    ((1, 8, 7, 1), (8, 4, 1, 2), (3, 2), (2, 3), (2, 2), 2),
]


@pytest.mark.parametrize("backend", ["torch", "native", "triton"])
@pytest.mark.parametrize("case", PADDING_ONLY, ids=[f"x{c[0][2]}x{c[0][3]}_k{c[1][2]}x{c[1][3]}" for c in PADDING_ONLY])
@pytest.mark.parametrize("channels_last", [True, False], ids=["nhwc", "nchw"])
def test_a_conv_that_reads_only_padding(gen, backend, case, channels_last):
    """Every output pixel's taps lie in the zero padding: the conv is zero, the output is
    relu?(bias + residual?). The torch and native backends compute it without a conv
    (``explain`` says so), which keeps such calls from aten's CPU conv and its segfault."""
    if backend not in resnet_fused.available_backends("cpu"):
        pytest.skip(f"{backend} does not run on this machine's CPU: {backends.unavailable_reason(backend)}")
    from resnet_fused.backends.reference import reads_only_padding

    x_shape, w_shape, stride, padding, dilation, groups = case
    assert reads_only_padding(x_shape[2:], w_shape[2:], stride, padding, dilation)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(x_shape, generator=gen).contiguous(memory_format=fmt)
    weight = torch.randn(w_shape, generator=gen)
    out_shape = reference_conv_bias_act(x, weight, None, None, stride, padding, dilation, groups).shape
    for bias, residual, relu in ((True, False, False), (True, True, True), (False, True, False), (True, False, True)):
        b = torch.randn(w_shape[0], generator=gen) if bias else None
        r = torch.randn(out_shape, generator=gen).contiguous(memory_format=fmt) if residual else None
        ref = reference_conv_bias_act(x, weight, b, r, stride, padding, dilation, groups, relu)
        for _ in range(5):  # (the fault struck one call in a few)
            out = ops.conv_bias_act(x, weight, b, r, stride, padding, dilation, groups, relu, backend=backend)
            assert relative_error(out, ref) <= TOLERANCES[torch.float32]
        assert out.is_contiguous(memory_format=ops.output_memory_format(x))
        with torch.no_grad():
            out_fmt = ops.output_memory_format(x)  # (NCHW for a 1x1 map: both layouts)
            target = r.clone(memory_format=out_fmt) if r is not None else x.new_empty(ref.shape).contiguous(
                memory_format=out_fmt)
            into = ops.conv_bias_act(x, weight, b, target if r is not None else None, stride, padding, dilation,
                                     groups, relu, backend=backend, out=target)
        assert into is target and relative_error(into, ref) <= TOLERANCES[torch.float32]
    zero = ops.conv_bias_act(x, weight, None, None, stride, padding, dilation, groups, backend=backend)
    assert torch.equal(zero, torch.zeros(out_shape))
    if backend != "triton":  # (Triton's kernels mask the padding themselves)
        assert "no conv" in ops.explain(x, weight, None, None, stride, padding, dilation, groups, backend=backend)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("case", PADDING_ONLY, ids=[f"x{c[0][2]}x{c[0][3]}_k{c[1][2]}x{c[1][3]}" for c in PADDING_ONLY])
def test_gpu_a_conv_that_reads_only_padding(gen, case, dtype):
    """The same convs on the GPU, every backend there (the native one's CUTLASS kernels
    or cuDNN, Triton's masked loads): relu(bias + residual) against float64."""
    x_shape, w_shape, stride, padding, dilation, groups = case
    x = torch.randn(x_shape, generator=gen).to(dtype).cuda().contiguous(memory_format=torch.channels_last)
    weight = torch.randn(w_shape, generator=gen).to(dtype).cuda().contiguous(memory_format=torch.channels_last)
    bias = torch.randn(w_shape[0], generator=gen).to(dtype).cuda()
    shape = reference_conv_bias_act(x, weight, None, None, stride, padding, dilation, groups).shape
    res = torch.randn(shape, generator=gen).to(dtype).cuda().contiguous(memory_format=ops.output_memory_format(x))
    # (the reference on the CPU: float64 there is aten's own loop, neither oneDNN nor cuDNN)
    ref = reference_conv_bias_act(x, weight, bias, res, stride, padding, dilation, groups, True)
    for backend in resnet_fused.available_backends("cuda"):
        out = ops.conv_bias_act(x, weight, bias, res, stride, padding, dilation, groups, True, backend=backend)
        assert relative_error(out.cpu(), ref) <= TOLERANCES[dtype], (backend, ops.explain(
            x, weight, bias, res, stride, padding, dilation, groups, backend=backend))


def test_reads_only_padding_agrees_with_counting_the_taps():
    """The closed form (one test per tap) against every output position and tap, in
    Python and C++ (the native backend's ``explain``)."""
    import random

    from resnet_fused.backends.reference import reads_only_padding

    def brute(n, taps, st, pad, dil):
        out = (n + 2 * pad - dil * (taps - 1) - 1) // st + 1
        return all(not 0 <= o * st - pad + t * dil < n for o in range(out) for t in range(taps))

    rng = random.Random(0)
    native = "native" in resnet_fused.available_backends("cpu")
    seen = {True: 0, False: 0}
    for _ in range(3000):
        dims = [(rng.randint(1, 9), rng.randint(1, 4), rng.randint(1, 3), rng.randint(0, 7), rng.randint(1, 3))
                for _ in range(2)]
        if any((n + 2 * pad - dil * (taps - 1) - 1) // st + 1 < 1 for n, taps, st, pad, dil in dims):
            continue
        (h, r, sh, ph, dh), (w, s, sw, pw, dw) = dims
        want = brute(*dims[0]) or brute(*dims[1])
        seen[want] += 1
        assert reads_only_padding((h, w), (r, s), (sh, sw), (ph, pw), (dh, dw)) == want, dims
        if native and seen[want] <= 200:
            why = ops.explain(torch.empty(1, 2, h, w), torch.empty(2, 2, r, s), None, None, (sh, sw), (ph, pw),
                              (dh, dw), backend="native")
            assert ("no conv" in why) == want, (dims, why)
    assert min(seen.values()) >= 50  # both answers drawn often


#: how an operand of the view fuzz below is laid out in memory
LAYOUTS = ["contiguous", "channels_last", "permuted", "sliced", "odd_size_one", "offset"]


def laid_out(values, layout, draw):
    """``values`` (4-D) copied into a tensor laid out as ``layout``: contiguous,
    channels_last, a permute of a (H, N, W, C) storage, every other channel and column of
    a wider tensor, channels_last with random strides on size-1 dimensions, or NHWC off
    its storage's start by one element. ``draw(n)``: a random int below n."""
    n, c, h, w = values.shape
    if layout == "contiguous":
        return values.contiguous()
    if layout == "channels_last":
        return values.contiguous(memory_format=torch.channels_last)
    if layout == "permuted":
        out = values.new_empty(h, n, w, c).permute(1, 3, 0, 2)
    elif layout == "sliced":
        out = values.new_empty(n, 2 * c, h, 2 * w + 1)[:, ::2, :, 1::2]
    elif layout == "odd_size_one":
        return odd_size_one_stride(values, lambda: 1 + draw(2000))
    else:
        out = values.new_empty(values.numel() + 1)[1:].view(n, h, w, c).permute(0, 3, 1, 2)
    return out.copy_(values)


@settings(max_examples=120, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@example(n=2, c_per_group=4, k_per_group=4, groups=2, h=5, w=7, kernel=(1, 3), stride=1, dtype=torch.float32,
         layouts=("channels_last", "odd_size_one", "sliced"), residual=True, seed=1)  # the fault that it found
@given(
    n=st.integers(1, 2), c_per_group=st.sampled_from([1, 3, 4, 8]), k_per_group=st.sampled_from([1, 4, 8]),
    groups=st.sampled_from([1, 2, 4]), h=st.integers(1, 9), w=st.integers(1, 9),
    kernel=st.sampled_from([(1, 1), (1, 3), (3, 1), (3, 3), (1, 5), (7, 7)]), stride=st.integers(1, 2),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    layouts=st.tuples(*[st.sampled_from(LAYOUTS)] * 3), residual=st.booleans(), seed=st.integers(0, 2**31 - 1),
)
def test_any_memory_layout_of_x_weight_and_residual_on_every_backend(n, c_per_group, k_per_group, groups, h, w,
                                                                     kernel, stride, dtype, layouts, residual, seed):
    """x, the weight and the residual each in any of LAYOUTS, through every backend on
    this CPU, against float64: what found torch's grouped 1xN conv fault
    (test_grouped_1xn_weight_with_an_odd_size_one_stride)."""
    padding = (kernel[0] // 2, kernel[1] // 2)
    p, q = (h + 2 * padding[0] - kernel[0]) // stride + 1, (w + 2 * padding[1] - kernel[1]) // stride + 1
    if p < 1 or q < 1:
        return
    gen = torch.Generator().manual_seed(seed)
    draw = lambda bound: int(torch.randint(bound, (1,), generator=gen))  # noqa: E731
    c, k = c_per_group * groups, k_per_group * groups
    x = laid_out(torch.randn(n, c, h, w, generator=gen).to(dtype), layouts[0], draw)
    weight = laid_out((torch.randn(k, c_per_group, *kernel, generator=gen) / (c_per_group * kernel[0] * kernel[1])
                       ** 0.5).to(dtype), layouts[1], draw)
    bias = torch.randn(k, generator=gen).to(dtype)
    res = laid_out(torch.randn(n, k, p, q, generator=gen).to(dtype), layouts[2], draw) if residual else None
    ref = reference_conv_bias_act(x, weight, bias, res, stride, padding, 1, groups, True)
    for backend in resnet_fused.available_backends("cpu"):
        out = ops.conv_bias_act(x, weight, bias, res, stride, padding, 1, groups, True, backend=backend)
        assert relative_error(out, ref) <= TOLERANCES[dtype], (backend, x.stride(), weight.stride())


@settings(max_examples=80, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@example(n=3, c_per_group=12, k_per_group=8, groups=4, h=7, w=1, kernel=(3, 1), stride=(2, 2), padding=(2, 1),
         dilation=(2, 2), channels_last=True, residual=False, relu=False, seed=0)  # the segfault it guards
@given(
    n=st.integers(1, 3), c_per_group=st.sampled_from([1, 3, 4, 8, 12]), k_per_group=st.sampled_from([1, 4, 8]),
    groups=st.sampled_from([1, 2, 4]), h=st.integers(1, 10), w=st.integers(1, 10),
    kernel=st.tuples(st.integers(1, 5), st.integers(1, 5)), stride=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    padding=st.tuples(st.integers(0, 4), st.integers(0, 4)), dilation=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    channels_last=st.booleans(), residual=st.booleans(), relu=st.booleans(), seed=st.integers(0, 2**31 - 1),
)
def test_any_geometry_on_every_backend(n, c_per_group, k_per_group, groups, h, w, kernel, stride, padding, dilation,
                                       channels_last, residual, relu, seed):
    """Random kernel, stride, padding and dilation per side, small maps (where padding can
    cover whole rows or columns of the output), through every backend on this CPU with a
    bias, against float64: the geometry twin of the layout test above."""
    p, q = ((size + 2 * pad - dil * (taps - 1) - 1) // step + 1
            for size, taps, step, pad, dil in zip((h, w), kernel, stride, padding, dilation))
    if p < 1 or q < 1:
        return
    gen = torch.Generator().manual_seed(seed)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    c, k = c_per_group * groups, k_per_group * groups
    x = torch.randn(n, c, h, w, generator=gen).contiguous(memory_format=fmt)
    weight = torch.randn(k, c_per_group, *kernel, generator=gen) / (c_per_group * kernel[0] * kernel[1]) ** 0.5
    bias = torch.randn(k, generator=gen)
    res = torch.randn(n, k, p, q, generator=gen).contiguous(memory_format=fmt) if residual else None
    ref = reference_conv_bias_act(x, weight, bias, res, stride, padding, dilation, groups, relu)
    for backend in resnet_fused.available_backends("cpu"):
        out = ops.conv_bias_act(x, weight, bias, res, stride, padding, dilation, groups, relu, backend=backend)
        assert relative_error(out, ref) <= TOLERANCES[torch.float32], backend


def test_gradient_of_a_grouped_1xn_weight_with_an_odd_size_one_stride(gen):
    """The op's backward hands the weight to aten's convolution_backward, whose grad_x
    had the same fault (float32 on the CPU: oneDNN; float64 does not go there)."""
    x, _, bias, res = make_case(gen, 2, 8, 9, 11, 4, 1, 1, 0, 1, 2, torch.float32, True, channels_last=True)
    weight = odd_size_one_stride(torch.randn(4, 4, 1, 3, generator=gen) / 12 ** 0.5, lambda: 1000)
    grad = torch.randn(2, 4, 9, 11, generator=gen).contiguous(memory_format=torch.channels_last)
    leaves = [t.detach().requires_grad_(True) for t in (x, weight, bias, res)]
    ops.conv_bias_act(*leaves, padding=(0, 1), groups=2, relu=True, backend="torch").backward(grad)
    exact = [t.detach().double().contiguous().requires_grad_(True) for t in (x, weight, bias, res)]
    torch.relu(F.conv2d(*exact[:3], padding=(0, 1), groups=2) + exact[3]).backward(grad.double())
    for name, ours, ref in zip(("x", "weight", "bias", "residual"), leaves, exact):
        assert relative_error(ours.grad, ref.grad) <= TOLERANCES[torch.float32], name


def test_with_canonical_strides_only_rewrites_size_one_strides(gen):
    from resnet_fused._layout import strides_read_as_channels_last, with_canonical_strides

    w = torch.randn(8, 4, 1, 3, generator=gen).contiguous(memory_format=torch.channels_last)
    assert with_canonical_strides(w) is w  # canonical already
    storage = torch.empty(w.numel() + 1000 + 5)
    odd = storage[5:].as_strided(w.shape, (12, 1, 1000, 4)).copy_(w)  # off the storage's start
    fixed = with_canonical_strides(odd)
    assert fixed.stride() == w.stride() and fixed.storage_offset() == 5 and torch.equal(fixed, w)
    nchw = torch.randn(8, 4, 3, 3, generator=gen)
    assert with_canonical_strides(nchw) is nchw  # no size-1 dimension
    sliced = torch.randn(8, 8, 1, 3, generator=gen)[:, ::2]
    assert with_canonical_strides(sliced) is sliced  # dense in neither layout
    # dense in both layouts (1x1): the layout aten reads it in is kept
    for strides in ((4, 1, 4, 4), (4, 1, 1, 1), (4, 1, 1000, 7), (4, 1, 3, 3)):
        both = torch.randn(8, 4, 1, 1, generator=gen).as_strided((8, 4, 1, 1), strides)
        fixed = with_canonical_strides(both)
        assert fixed.stride() in ((4, 1, 4, 4), (4, 1, 1, 1)) and torch.equal(fixed, both)
        assert strides_read_as_channels_last(fixed) == strides_read_as_channels_last(both), strides


@pytest.mark.parametrize("backend", ["torch", "native", "triton"])
@pytest.mark.parametrize("case", VIEW_CASES + [("3x3 float64", 8, 16, 3, 1, 1, torch.float64)],
                         ids=[c[0] for c in VIEW_CASES] + ["3x3 float64"])
@pytest.mark.parametrize("into", ["residual", "new"])
def test_out_takes_the_output_even_when_it_is_the_residual(gen, backend, case, into):
    if backend not in resnet_fused.available_backends("cpu"):
        pytest.skip(f"{backend} does not run on this machine's CPU: {backends.unavailable_reason(backend)}")
    _, c, k, r, s, p, dtype = case
    x, weight, bias, res = make_case(gen, 2, c, 9, 7, k, r, s, p, 1, 1, dtype, True, channels_last=True)
    ref = reference_conv_bias_act(x, weight, bias, res, s, p)
    out = res if into == "residual" else torch.empty_like(res)
    text = ops.explain(x, weight, bias, res, s, p, backend=backend, out=out)
    assert ("written into the residual's buffer" if into == "residual" else "written into out") in text
    with torch.no_grad():
        y = ops.conv_bias_act(x, weight, bias, res, s, p, backend=backend, out=out)
    assert y is out
    assert relative_error(out, ref) <= TOLERANCES[dtype], text


def test_out_for_the_1x1_gemm_and_onednn_is_written_in_place(gen):
    """What the fused blocks rely on: the native CPU kernels store into the residual's
    buffer (no new output), except Winograd, which computes and copies (explained)."""
    if "native" not in resnet_fused.available_backends("cpu"):
        pytest.skip("the native backend is not built here")
    for r, s, p, dtype, in_place in ((1, 1, 0, torch.float32, True), (3, 2, 1, torch.float32, True),
                                     (3, 1, 1, torch.float32, False), (3, 2, 1, torch.float64, False)):
        x, weight, bias, res = make_case(gen, 2, 16, 9, 9, 32, r, s, p, 1, 1, dtype, True, True)
        text = ops.explain(x, weight, bias, res, s, p, backend="native", out=res)
        assert text.endswith("(in place)" if in_place else "(computed, then copied)"), text
        fresh = torch.empty_like(res)  # out another tensor: only the 1x1 GEMM stores there directly
        text = ops.explain(x, weight, bias, res, s, p, backend="native", out=fresh)
        assert text.endswith("written into out (in place)" if r == 1 else "written into out (computed, then copied)")


OUT_ERRORS = [
    ("shape", lambda x, res: torch.empty(2, 6, 6, 5), ValueError, r"out should have the output's shape \(2, 6, 6, 6\)"),
    ("dtype", lambda x, res: torch.empty(2, 6, 6, 6, dtype=torch.float64), ValueError, r"out should be torch.float32"),
    ("layout", lambda x, res: torch.empty(2, 6, 6, 6).to(memory_format=torch.channels_last), ValueError,
     r"out should be dense in the output's memory format \(contiguous, that of x\)"),
    ("not a tensor", lambda x, res: [0.0], TypeError, r"out should be a Tensor or None, got list"),
    ("overlaps x", lambda x, res: x.view(-1)[: 2 * 6 * 6 * 6].view(2, 6, 6, 6), ValueError,
     r"out should not share memory with x, weight or bias"),
    ("partly the residual", lambda x, res: torch.cat([res.view(-1), res.view(-1)])[1:432 + 1].view(2, 6, 6, 6),
     None, None),
]


@pytest.mark.parametrize("case", OUT_ERRORS, ids=[c[0] for c in OUT_ERRORS])
def test_bad_out_is_named_in_the_error(gen, case):
    _, make, exc, pattern = case
    x = torch.randn(2, 4, 8, 8, generator=gen)
    w = torch.randn(6, 4, 3, 3, generator=gen)
    res = torch.randn(2, 6, 6, 6, generator=gen)
    if exc is None:  # a buffer holding the residual shifted by one element
        buf = torch.randn(2 * 432, generator=gen)
        res, out = buf[:432].view(2, 6, 6, 6), buf[1:433].view(2, 6, 6, 6)
        exc, pattern = ValueError, r"out may be the residual itself but should not partly overlap it"
    else:
        out = make(x, res)
    for fn in (ops.conv_bias_act, ops.explain):
        with pytest.raises(exc, match=pattern):
            fn(x, w, None, res, out=out)


@pytest.mark.parametrize("backend", ["torch", "native"])
@pytest.mark.parametrize("r", [1, 3], ids=["1x1", "3x3"])
def test_out_in_disjoint_slices_of_one_buffer(gen, backend, r):
    """x, the residual and out as three slices of one buffer: no memory in common, so no
    error, and x and the residual come out as they went in."""
    if backend not in resnet_fused.available_backends("cpu"):
        pytest.skip(f"{backend} does not run on the CPU here")
    n_x, n_out = 2 * 8 * 6 * 6, 2 * 16 * 6 * 6
    buf = torch.randn(n_x + 2 * n_out, generator=gen)
    x = buf[:n_x].view(2, 8, 6, 6)
    res = buf[n_x:n_x + n_out].view(2, 16, 6, 6)
    out = buf[n_x + n_out:].view(2, 16, 6, 6)
    weight = torch.randn(16, 8, r, r, generator=gen) / (8 * r * r) ** 0.5
    bias = torch.randn(16, generator=gen)
    x_before, res_before = x.clone(), res.clone()
    expected = reference_conv_bias_act(x, weight, bias, res, 1, r // 2)
    ret = ops.conv_bias_act(x, weight, bias, res, padding=r // 2, backend=backend, out=out)
    assert ret is out and relative_error(out, expected) <= TOLERANCES[torch.float32]
    assert torch.equal(x, x_before) and torch.equal(res, res_before)


def test_out_overlap_is_found_across_storages(gen):
    """Two storages can hold the same memory (two from_numpy views of one array, or two
    from_dlpack ones): an out= that overlaps x or a residual that way is refused too, and
    out in the same array's memory but apart from both is taken."""
    np = pytest.importorskip("numpy")
    n_x, n_out = 2 * 4 * 6 * 6, 2 * 8 * 6 * 6
    array = torch.randn(n_x + 3 * n_out, generator=gen).numpy()
    x = torch.from_numpy(array[:n_x]).view(2, 4, 6, 6)
    res = torch.from_numpy(array[n_x:n_x + n_out]).view(2, 8, 6, 6)
    weight = torch.randn(8, 4, 3, 3, generator=gen) / 6
    for start, pattern in ((n_x - 8, "out should not share memory with x"),
                           (n_x + 4, "out may be the residual itself but should not partly overlap it")):
        out = torch.from_numpy(array[start:start + n_out]).view(2, 8, 6, 6)
        assert out.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()
        for fn in (ops.conv_bias_act, ops.explain):
            with pytest.raises(ValueError, match=pattern):
                fn(x, weight, None, res, padding=1, out=out)
    out = torch.from_numpy(array[n_x + 2 * n_out:]).view(2, 8, 6, 6)
    expected = reference_conv_bias_act(x, weight, None, res, 1, 1)
    ops.conv_bias_act(x, weight, None, res, padding=1, backend="torch", out=out)
    assert relative_error(out, expected) <= TOLERANCES[torch.float32]
    assert np.shares_memory(out.numpy(), array)


def test_out_refuses_autograd(gen):
    x, weight, bias, res = make_case(gen, 1, 4, 5, 5, 4, 3, 1, 1, 1, 1, torch.float32, True)
    weight.requires_grad_(True)
    with pytest.raises(RuntimeError, match=r"out=\.\.\.\) does not support autograd"):
        ops.conv_bias_act(x, weight, bias, res, padding=1, out=res)
    expected = reference_conv_bias_act(x, weight, bias, res, 1, 1)
    with torch.no_grad():  # the op behind out=, through the dispatcher: writes into the residual
        ret = torch.ops.resnet_fused.conv_bias_act_out(x, weight, bias, res, [1, 1], [1, 1], [1, 1], 1, True,
                                                       "torch", res)
    assert ret is None and relative_error(res, expected) <= TOLERANCES[torch.float32]


@pytest.mark.parametrize("backend", ["torch", "native"])
def test_opcheck_out(gen, backend):
    if backend not in resnet_fused.available_backends("cpu"):
        pytest.skip(f"{backend} does not run on the CPU here")
    x, weight, bias, res = make_case(gen, 2, 8, 7, 7, 8, 1, 1, 0, 1, 1, torch.float32, True, True)
    torch.library.opcheck(
        torch.ops.resnet_fused.conv_bias_act_out.default,
        (x, weight, bias, res, [1, 1], [0, 0], [1, 1], 1, True, backend, torch.empty_like(res)),
    )


def test_backend_auto_and_available_backends():
    names = resnet_fused.available_backends()
    assert "torch" in names
    assert set(names) <= {"torch", "triton", "native"}
    assert "torch" in resnet_fused.available_backends("cpu")


def test_unknown_backend_lists_valid_ones(gen):
    x, weight, bias, _ = make_case(gen, 1, 4, 5, 5, 4, 3, 1, 1, 1, 1, torch.float32, False)
    with pytest.raises(ValueError, match=r"unknown backend 'cudnn'.*'auto', 'torch', 'triton', 'native'"):
        ops.conv_bias_act(x, weight, bias, backend="cudnn")


def test_explain_names_the_backend_that_runs(gen):
    x, weight, _, _ = make_case(gen, 1, 4, 5, 5, 4, 3, 1, 1, 1, 1, torch.float32, False)
    assert ops.explain(x, weight, padding=1, backend="torch") == "runs on 'torch'"
    text = resnet_fused.explain(x, weight, padding=1)
    assert text.startswith("runs on '")


def _bad(gen):
    x = torch.randn(2, 4, 8, 8, generator=gen)
    w = torch.randn(6, 4, 3, 3, generator=gen)
    return x, w


BAD_INPUTS = [
    ("non-4D input", lambda x, w: (x[0], w, {}), ValueError, r"x should be 4-D .* got 3-D"),
    ("non-4D weight", lambda x, w: (x, w[0], {}), ValueError, r"weight should be 4-D .* got 3-D"),
    ("integer input", lambda x, w: (x.to(torch.int32), w, {}), ValueError, r"floating-point .* got torch.int32"),
    ("dtype mismatch", lambda x, w: (x, w.double(), {}), ValueError, r"weight dtype should match x \(torch.float32\), got torch.float64"),
    ("wrong channel count", lambda x, w: (x[:, :3], w, {}), ValueError, r"x should have 4 channels .* got 3 channels"),
    ("groups do not divide", lambda x, w: (x, w, {"groups": 4}), ValueError, r"divisible by groups"),
    ("no output channels", lambda x, w: (x, w[:0], {}), ValueError,
     r"weight should have at least one output and one input channel, got shape \(0, 4, 3, 3\)"),
    ("no input channels", lambda x, w: (x[:, :0], w[:, :0], {}), ValueError,
     r"weight should have at least one output and one input channel, got shape \(6, 0, 3, 3\)"),
    ("float8 input", lambda x, w: (x.to(torch.float8_e4m3fn), w.to(torch.float8_e4m3fn), {}), ValueError,
     r"floating-point tensor \(float32, float16, bfloat16, float64\), got torch.float8_e4m3fn"),
    ("device mismatch", lambda x, w: (x, w.to("meta"), {}), ValueError, r"weight should be on x's device \(cpu\), got meta"),
    ("bias shape", lambda x, w: (x, w, {"bias": torch.zeros(5)}), ValueError, r"bias should have shape \(6,\), got \(5,\)"),
    ("bias dtype", lambda x, w: (x, w, {"bias": torch.zeros(6, dtype=torch.float64)}), ValueError, r"bias should be torch.float32"),
    ("residual shape", lambda x, w: (x, w, {"residual": torch.zeros(2, 6, 8, 8)}), ValueError,
     r"residual should have the output's shape \(2, 6, 6, 6\), got \(2, 6, 8, 8\)"),
    ("residual dtype", lambda x, w: (x, w, {"residual": torch.zeros(2, 6, 6, 6, dtype=torch.float16)}), ValueError,
     r"residual should be torch.float32"),
    ("negative padding", lambda x, w: (x, w, {"padding": -1}), ValueError, r"padding should be two ints >= 0, got \[-1, -1\]"),
    ("zero stride", lambda x, w: (x, w, {"stride": 0}), ValueError, r"stride should be two ints >= 1"),
    ("string padding", lambda x, w: (x, w, {"padding": "same"}), TypeError, r"padding should be an int or a pair"),
    ("three strides", lambda x, w: (x, w, {"stride": (1, 1, 1)}), TypeError, r"stride should be an int or a pair"),
    ("empty output", lambda x, w: (x[:, :, :2, :2], w, {}), ValueError, r"output would be empty"),
    ("not a tensor", lambda x, w: (x.tolist(), w, {}), TypeError, r"x should be a Tensor, got list"),
    ("relu not bool", lambda x, w: (x, w, {"relu": 1}), TypeError, r"relu should be a bool"),
    ("sparse x", lambda x, w: (x.to_sparse(), w, {}), ValueError,
     r"x should be a dense \(strided\) tensor, got layout torch.sparse_coo"),
    ("sparse residual", lambda x, w: (x, w, {"residual": torch.zeros(2, 6, 6, 6).to_sparse()}), ValueError,
     r"residual should be a dense \(strided\) tensor, got layout torch.sparse_coo"),
    ("tensor as stride", lambda x, w: (x, w, {"stride": torch.zeros(2, 6, 6, 6)}), TypeError,
     r"stride should be an int or a pair of ints, got a Tensor of shape \(2, 6, 6, 6\) \(torch.float32\)$"),
    ("float stride", lambda x, w: (x, w, {"stride": (1, 2.0)}), TypeError, r"stride should be an int or a pair"),
    ("bool dilation", lambda x, w: (x, w, {"dilation": True}), TypeError, r"dilation should be an int or a pair"),
    ("empty kernel", lambda x, w: (x, w[:, :, :0], {}), ValueError,
     r"weight's kernel should be at least 1x1, got shape \(6, 4, 0, 3\)"),
]


def test_numpy_integers_are_taken_as_conv2d_takes_them(gen):
    np = pytest.importorskip("numpy")
    x, w = _bad(gen)
    got = ops.conv_bias_act(x, w, stride=np.int64(2), padding=(np.int32(1), 0), backend="torch")
    assert relative_error(got, reference_conv_bias_act(x, w, None, None, 2, (1, 0))) <= TOLERANCES[torch.float32]
    w2 = w[:, :2].contiguous()
    got = ops.conv_bias_act(x, w2, groups=np.int64(2), backend="torch")
    assert relative_error(got, reference_conv_bias_act(x, w2, None, None, groups=2)) <= TOLERANCES[torch.float32]
    assert ops.explain(x, w2, groups=np.int64(2), backend="torch") == "runs on 'torch'"


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
@pytest.mark.parametrize("fn", ["conv_bias_act", "explain"])
def test_bad_input_is_named_in_the_error(gen, case, fn):
    _, make, exc, pattern = case
    x, w = _bad(gen)
    x, w, kwargs = make(x, w)
    with pytest.raises(exc, match=pattern):
        getattr(ops, fn)(x, w, **kwargs)


@pytest.mark.parametrize("backend", [b for b in ("torch", "native", "triton") if backends.unavailable_reason(b) is None])
@pytest.mark.parametrize("out", [False, True], ids=["op", "out_op"])
def test_the_registered_ops_check_their_arguments_too(gen, backend, out):
    """torch.ops.resnet_fused.conv_bias_act(_out), called directly: the same checks as the
    front (the 'torch' backend alone would broadcast a wrong-shaped residual)."""
    if backend == "triton" and out:
        pytest.skip("the Triton backend's op has no out= variant")
    x, weight, bias, _ = make_case(gen, 2, 8, 6, 6, 8, 3, 1, 1, 1, 1, torch.float32, False)
    wrong = torch.randn(1, 8, 1, 1, generator=gen)  # broadcastable to the output, not its shape
    args = (x, weight, bias, wrong, [1, 1], [1, 1], [1, 1], 1, True, backend)
    with pytest.raises(ValueError, match=r"residual should have the output's shape \(2, 8, 6, 6\), got \(1, 8, 1, 1\)"):
        if backend == "triton":
            torch.ops.resnet_fused.triton_conv_bias_act(*args[:-1])
        elif out:
            torch.ops.resnet_fused.conv_bias_act_out(*args, torch.empty(2, 8, 6, 6))
        else:
            torch.ops.resnet_fused.conv_bias_act(*args)
    if out:
        with pytest.raises(ValueError, match=r"out should have the output's shape \(2, 8, 6, 6\), got \(2, 8, 5, 5\)"):
            torch.ops.resnet_fused.conv_bias_act_out(*args[:3], None, *args[4:], torch.empty(2, 8, 5, 5))


def test_gradient_through_a_nan_output_is_torch_relus(gen):
    """The ReLU's backward is torch.relu's: zero where the output is <= 0, the gradient
    itself where it is NaN (as threshold_backward does)."""
    x, weight, bias, _ = make_case(gen, 1, 4, 5, 5, 4, 3, 1, 1, 1, 1, torch.float64, False)
    x[0, 0, 2, 2] = float("nan")
    grads = []
    for fn in (lambda x: ops.conv_bias_act(x, weight, bias, padding=1, backend="torch"),
               lambda x: torch.relu(torch.nn.functional.conv2d(x, weight, bias, padding=1))):
        leaf = x.clone().requires_grad_(True)
        out = fn(leaf)
        out.backward(torch.ones_like(out))
        grads.append(leaf.grad)
    torch.testing.assert_close(grads[0], grads[1], equal_nan=True)  # (a mask of out > 0 zeroed it at the NaNs)


def test_a_bad_switch_is_an_error_on_every_call_not_once(monkeypatch):
    """A misspelt knob read while the backends load is raised on every call until fixed,
    not once, leaving a backend silently missing afterwards."""
    import subprocess
    import sys

    code = (
        "import torch, resnet_fused\n"
        "for _ in range(2):\n"
        "    try:\n"
        "        resnet_fused.available_backends('cpu')\n"
        "    except ValueError as e:\n"
        "        print('raised:', e)\n"
    )
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    env["RESNET_FUSED_TRITON_AUTOTUNE"] = "yes"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("raised: RESNET_FUSED_TRITON_AUTOTUNE should be 0 (off) or 1 (on), got 'yes'") == 2, \
        done.stdout


@pytest.mark.parametrize("backend", [b for b in ("torch", "native") if backends.unavailable_reason(b) is None])
def test_autocast_casts_the_inputs_as_conv2d_does(gen, backend):
    """Under torch.autocast the op computes in the autocast dtype, as conv2d does there."""
    x, weight, bias, res = make_case(gen, 2, 8, 9, 9, 16, 3, 1, 1, 1, 1, torch.float32, True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ops.conv_bias_act(x, weight, bias, res, padding=1, backend=backend)
        assert out.dtype == torch.nn.functional.conv2d(x, weight, padding=1).dtype == torch.bfloat16
    ref = reference_conv_bias_act(*(t.to(torch.bfloat16) for t in (x, weight, bias, res)), 1, 1)
    assert relative_error(out, ref) <= TOLERANCES[torch.bfloat16]
    with torch.autocast("cpu", dtype=torch.bfloat16):  # float64 is left alone, as conv2d leaves it
        assert ops.conv_bias_act(x.double(), weight.double(), backend=backend).dtype == torch.float64
        out = torch.empty_like(res)  # and a call with out= is not autocast, as torch's are not
        assert ops.conv_bias_act(x, weight, bias, res, padding=1, backend=backend, out=out) is out
    assert relative_error(out, reference_conv_bias_act(x, weight, bias, res, 1, 1)) <= TOLERANCES[torch.float32]


def test_explain_takes_the_ops_own_arguments(gen):
    """explain(*args, **kwargs) describes conv_bias_act(*args, **kwargs), positionally too."""
    x, weight, bias, res = make_case(gen, 2, 8, 7, 7, 8, 3, 2, 1, 1, 2, torch.float32, True)
    args = (x, weight, bias, res, 2, 1, 1, 2, True, "torch")
    assert ops.explain(*args) == "runs on 'torch'"
    assert relative_error(ops.conv_bias_act(*args), reference_conv_bias_act(x, weight, bias, res, 2, 1, 1, 2)) <= 1e-5


@pytest.mark.slow
def test_first_use_inside_torch_compile_and_export():
    """The backends (and the compiled extension) load on first use. When that first use is a
    torch.compile(fullgraph=True) trace, loading must not break the graph; when it is a
    torch.export trace, loading must leave nothing of itself in the exported graph."""
    import subprocess
    import sys

    code = (
        "import torch\n"
        "from resnet_fused import ops\n"
        "x, w = torch.randn(1, 3, 8, 8), torch.randn(4, 3, 3, 3)\n"
        "f = lambda x: ops.conv_bias_act(x, w)\n"
        "with torch.no_grad():\n"
        "    y = torch.compile(f, fullgraph=True)(x)\n"
        "print('compiled', tuple(y.shape))\n"
    )
    export_code = (
        "import torch\n"
        "from resnet_fused import ops\n"
        "class M(torch.nn.Module):\n"
        "    def forward(self, x):\n"
        "        return ops.conv_bias_act(x, torch.ones(4, 3, 3, 3))\n"
        "ep = torch.export.export(M(), (torch.randn(1, 3, 8, 8),))\n"
        "print(sorted({str(n.target) for n in ep.graph.nodes if str(n.target).startswith('resnet_fused')}))\n"
    )
    for source, expected in ((code, "compiled (1, 4, 6, 6)"), (export_code, "['resnet_fused.")):
        done = subprocess.run([sys.executable, "-c", source], capture_output=True, text=True, check=False)
        assert done.returncode == 0, done.stderr[-3000:]
        assert expected in done.stdout
    assert "native_build_info" not in done.stdout and "conv_bias_act" in done.stdout


@pytest.mark.parametrize("value, expect", [(None, True), ("", True), ("0", False), ("1", True), (" 1 ", True),
                                           ("false", ValueError), ("off", ValueError), ("yes", ValueError)])
def test_switches_take_0_or_1_and_name_the_variable_otherwise(monkeypatch, value, expect):
    from resnet_fused import _env

    if value is None:
        monkeypatch.delenv("RESNET_FUSED_SOME_SWITCH", raising=False)
    else:
        monkeypatch.setenv("RESNET_FUSED_SOME_SWITCH", value)
    if expect is ValueError:
        with pytest.raises(ValueError, match=rf"RESNET_FUSED_SOME_SWITCH should be 0 \(off\) or 1 \(on\), got '{value}'"):
            _env.flag("RESNET_FUSED_SOME_SWITCH", True)
    else:
        assert _env.flag("RESNET_FUSED_SOME_SWITCH", True) is expect
