"""The "triton" backend: its kernels against the float64 reference.

Without a GPU these run the real Triton kernels on CPU tensors through the
interpreter (conftest sets TRITON_INTERPRET=1): small shapes, every conv kind.
With a GPU (marker ``gpu``) every unique ResNet-50/ResNeXt-50 conv at batch 1, 32
and 256, and whole models.
"""
import copy

import pytest
import torch

import resnet_fused
from resnet_fused import backends, ops
from resnet_fused.bench import ConvLayer, conv_layers
from resnet_fused.testing import TOLERANCES, reference_conv_bias_act, relative_error, seeded_torchvision_model

from test_conv_bias_act import CONV_KINDS, make_case

triton = pytest.importorskip("triton")
from resnet_fused.backends.triton_backend import CONFIGS, CONV_TMA_CONFIGS, GEMM_CONFIGS  # noqa: E402

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
#: gemm_tma runs here: Hopper+ on a GPU, the interpreter on the CPU
TMA_HERE = not ON_GPU or torch.cuda.get_device_capability() >= (9, 0)
needs_tma = pytest.mark.skipif(not TMA_HERE, reason="the TMA algorithms need compute capability 9.0+")


def on_device(*tensors):
    return tuple(None if t is None else t.to(DEVICE) for t in tensors)


@pytest.fixture
def fresh_choices(monkeypatch, tmp_path):
    """The Triton backend module with no algorithm choices yet and a private cache dir."""
    from resnet_fused.backends import triton_backend as tb

    monkeypatch.setenv("RESNET_FUSED_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tb, "_choices", {})
    monkeypatch.setattr(tb, "_choices_loaded", False)
    return tb
pytestmark = pytest.mark.skipif(
    backends.unavailable_reason("triton") is not None, reason=str(backends.unavailable_reason("triton"))
)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def tol(dtype):
    return TOLERANCES[dtype]


def run_and_check(x, weight, bias, res, s, p, d, g, relu, ref_device="cpu"):
    dev = torch.device(DEVICE)
    args = [t if t is None else t.to(dev) for t in (x, weight, bias, res)]
    assert ops.explain(args[0], args[1], None, args[3], s, p, d, g, backend="triton").startswith("runs on 'triton'")
    out = ops.conv_bias_act(*args, stride=s, padding=p, dilation=d, groups=g, relu=relu, backend="triton")
    ref = reference_conv_bias_act(x, weight, bias, res, s, p, d, g, relu, device=ref_device)
    err = relative_error(out, ref)
    assert err <= tol(x.dtype), f"relative error {err:.3g}"
    return out


@pytest.mark.parametrize("kind", CONV_KINDS, ids=[k[0] for k in CONV_KINDS])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("residual", [False, True], ids=["no_residual", "residual"])
@pytest.mark.parametrize("relu", [False, True], ids=["no_relu", "relu"])
def test_conv_kinds_match_reference(gen, kind, dtype, residual, relu):
    _, n, c, h, w, k, r, s, p, d, g = kind
    x, weight, bias, res = make_case(gen, n, c, h, w, k, r, s, p, d, g, dtype, residual, channels_last=True)
    run_and_check(x, weight.contiguous(memory_format=torch.channels_last), bias, res, s, p, d, g, relu)


@pytest.mark.parametrize("c, r, stride, padding, dilation, channels_last", [
    (1, 7, 2, 3, 1, False), (2, 5, 1, 2, 1, True), (3, 7, 2, 3, 1, False), (3, 3, 2, 0, 1, True),
    (4, 3, 1, 0, 1, True), (6, 3, 1, 2, 2, False), (12, 3, 2, 1, 3, True),
], ids=["c1_nchw", "c2_5x5", "stem_nchw", "c3_no_padding", "c4_nhwc_dense", "c6_dilation2", "c12_dilation3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_few_channels_take_the_packed_loop(monkeypatch, gen, c, r, stride, padding, dilation, channels_last, dtype):
    """One-group convs with fewer than 16 channels (the stem) reduce over packed filter
    rows: x dense NHWC with its zero padding written around it and the weight (R, S, C, K),
    both zero-padded to a multiple of 4 channels, so each row is one aligned run."""
    from resnet_fused.backends import triton_backend as tb

    packed = []
    pack = tb._pack_few_channels
    monkeypatch.setattr(tb, "_pack_few_channels", lambda *args: packed.append(pack(*args)) or packed[-1])
    monkeypatch.setenv("RESNET_FUSED_TRITON_ALGO", "implicit_gemm")
    x, weight, bias, res = make_case(gen, 2, c, 11, 10, 12, r, stride, padding, dilation, 1, dtype, True,
                                     channels_last)
    run_and_check(x, weight, bias, res, stride, padding, dilation, 1, True)
    (xp, wp), = packed
    cp, p = -(-c // 4) * 4, padding
    assert xp.shape == (2, cp, 11 + 2 * p, 10 + 2 * p)
    sn, sc, sh, sw = xp.stride()
    assert (sc, sw) == (1, cp) and sh % 16 == 0 and sn % 16 == 0 and sh >= cp * xp.shape[3]
    assert wp.shape == (12, cp, r, r)
    if dtype == torch.float32:  # K-major, for TF32's wgmma
        assert wp.stride()[1:] == (1, r * cp, cp) and wp.stride(0) % 16 == 0 and wp.stride(0) >= r * r * cp
    else:
        assert wp.stride() == (1, 12, r * cp * 12, cp * 12)
    inside = xp[:, :c, p:p + 11, p:p + 10].cpu()
    assert torch.equal(inside, x) and xp.count_nonzero() == inside.count_nonzero() and not wp[:, c:].any()
    if cp == c and channels_last and not padding:  # 4 channels of 10-pixel rows: 40-element rows
        assert pack(x, weight, (0, 0))[0] is not x
        aligned = x.new_zeros(2, 11, 12, 4)[:, :, :10].permute(0, 3, 1, 2)  # 48-element rows
        assert pack(aligned, weight, (0, 0))[0] is aligned


def test_the_packed_weight_is_packed_once_and_follows_edits(monkeypatch, gen):
    """The stem's weight is repacked only when it changes: an in-place write (its version
    counter) repacks it, and so does new data (``weight.data = other``: its address); a
    write through .data, which the counter misses, needs refold(), as the native
    backend's packed weights do."""
    from resnet_fused.backends import triton_backend as tb

    monkeypatch.setattr(tb, "_packed_weights", tb.WeakIdKeyDictionary())
    monkeypatch.setenv("RESNET_FUSED_TRITON_ALGO", "implicit_gemm")
    x, weight, bias, _ = on_device(*make_case(gen, 2, 3, 12, 12, 8, 7, 2, 3, 1, 1, torch.float32, False))

    def check():
        out = ops.conv_bias_act(x, weight, bias, None, 2, 3, backend="triton")
        assert relative_error(out, reference_conv_bias_act(x, weight, bias, None, 2, 3, device=DEVICE)) <= tol(x.dtype)

    check()
    (packed,) = [entry[2] for entry in tb._packed_weights.values()]
    check()
    assert len(tb._packed_weights) == 1 and tb._packed_weights[weight][2] is packed  # not packed again
    weight.mul_(-1)  # in place: the version counter moves
    check()
    assert tb._packed_weights[weight][2] is not packed
    weight.data.mul_(2)  # the one write it cannot see
    out = ops.conv_bias_act(x, weight, bias, None, 2, 3, backend="triton")
    assert relative_error(out, reference_conv_bias_act(x, weight, bias, None, 2, 3, device=DEVICE)) > 0.1
    assert resnet_fused.refold() >= 1 and len(tb._packed_weights) == 0
    check()
    # new data for the same tensor (its version stays): a new address, so packed anew,
    # also when the new data has more output channels than the old copy
    for k in (8, 16):
        weight.data = torch.randn(k, 3, 7, 7, generator=gen).to(weight)
        if k == 16:
            bias = torch.randn(16, generator=gen).to(bias)
        check()


def test_group_merge_counts():
    """How many groups of few channels run as one: the most dividing the group count
    that keeps 32 channels or fewer (ResNeXt 32x4d's layers: 4, 8, 16, 32 channels)."""
    from resnet_fused.backends.triton_backend import _group_merge

    assert [_group_merge(32, c) for c in (4, 8, 16, 32, 64)] == [8, 4, 2, 1, 1]
    assert _group_merge(1, 3) == 1  # one group: nothing to merge (the stem packs instead)
    assert _group_merge(7, 4) == 7 and _group_merge(6, 5) == 6 and _group_merge(64, 1) == 32
    assert _group_merge(5, 8) == 1  # 5 groups of 8: no divisor of 5 fits 32 channels but 1


@pytest.mark.parametrize("shape", [
    # n, groups, channels and outputs a group, h, w, r, stride, padding, dilation
    (2, 32, 4, 4, 9, 7, 3, 1, 1, 1),  # ResNeXt 32x4d's layer1, small: 8 groups merged
    (2, 32, 8, 8, 8, 8, 3, 2, 1, 1),  # layer2's strided conv: 4 merged
    (1, 16, 16, 16, 5, 6, 3, 1, 2, 2),  # 16 channels, dilation 2: 2 merged
    (2, 6, 2, 3, 7, 7, 3, 1, 1, 1),  # K != C a group; 6 merged into one group of 12: packed
    (1, 7, 4, 2, 6, 5, 1, 2, 0, 1),  # a strided 1x1: 7 merged
], ids=["32x4", "32x8-s2", "16x16-d2", "6x2to3", "1x1-s2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("residual", [False, True], ids=["nores", "res"])
def test_grouped_convs_with_few_channels_run_merged(monkeypatch, gen, shape, dtype, residual):
    """A grouped conv with few channels a group runs as fewer, wider groups with a
    block-diagonal weight, made once per weight; outputs match the float64 reference."""
    from resnet_fused.backends import triton_backend as tb

    monkeypatch.setattr(tb, "_packed_weights", tb.WeakIdKeyDictionary())
    monkeypatch.setenv("RESNET_FUSED_TRITON_ALGO", "implicit_gemm")
    n, g, c, k, h, w, r, stride, pad, dil = shape
    x, weight, bias, res = make_case(gen, n, g * c, h, w, g * k, r, stride, pad, dil, g, dtype, residual,
                                     channels_last=True)
    run_and_check(x, weight, bias, res, stride, pad, dil, g, True)
    merge = tb._group_merge(g, c)
    assert merge > 1
    entry = tb._packed_weights[weight.to(DEVICE)] if DEVICE == "cpu" else None
    if entry is not None:  # the merged weight is kept: block-diagonal, the weight's own taps in place
        assert entry[1] == ("merged", g, merge)
        merged = entry[2].view(g // merge, merge, k, merge, c, r, r)
        for t in range(merge):
            assert torch.equal(merged[:, t, :, t], weight.view(g // merge, merge, k, c, r, r)[:, t])
            others = [u for u in range(merge) if u != t]
            assert not merged[:, t][:, :, others].any()


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_any_layout_is_correct_and_output_follows_input(gen, channels_last):
    x, weight, bias, res = make_case(gen, 2, 8, 7, 9, 12, 3, 2, 1, 1, 1, torch.float32, True, channels_last)
    out = run_and_check(x, weight, bias, res, 2, 1, 1, 1, True)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert out.is_contiguous(memory_format=fmt)


def test_no_bias_and_strided_views(gen):
    x = torch.randn(2, 16, 10, 10, generator=gen)[:, ::2]  # a channel-strided view
    weight = torch.randn(8, 8, 3, 3, generator=gen) / 9
    run_and_check(x, weight, None, None, 1, 1, 1, 1, False)


@pytest.mark.parametrize("residual", [False, True], ids=["no_residual", "residual"])
def test_relu_keeps_nan_as_torch_relu_does(gen, residual):
    x, weight, bias, res = make_case(gen, 1, 8, 6, 6, 8, 3, 1, 1, 1, 1, torch.float32, residual, channels_last=True)
    x[0, :, 3, 3] = float("nan")
    dev = torch.device(DEVICE)
    out = ops.conv_bias_act(*[t if t is None else t.to(dev) for t in (x, weight, bias, res)], padding=1,
                            backend="triton")
    ref = reference_conv_bias_act(x, weight, bias, res, 1, 1)
    assert ref.isnan().any() and torch.equal(out.isnan().cpu(), ref.isnan())


def test_float64_falls_back_and_says_why(gen):
    x, weight, bias, _ = make_case(gen, 1, 4, 5, 5, 4, 3, 1, 1, 1, 1, torch.float64, False)
    x, weight, bias = x.to(DEVICE), weight.to(DEVICE), bias.to(DEVICE)
    text = ops.explain(x, weight, padding=1, backend="triton")
    assert text == "runs on 'torch'; skipped 'triton': dtype torch.float64 (takes float16, bfloat16, float32)"
    out = ops.conv_bias_act(x, weight, bias, padding=1, backend="triton")
    assert relative_error(out, reference_conv_bias_act(x, weight, bias, None, 1, 1)) <= TOLERANCES[torch.float64]


EPILOGUE_KINDS = [k for k in CONV_KINDS if k[0] in ("stem 7x7/2, 3 input channels", "3x3 stride 2 on odd size",
                                                    "grouped 3x3 (ResNeXt)", "odd channels")]


@pytest.mark.parametrize("kind", EPILOGUE_KINDS, ids=[k[0] for k in EPILOGUE_KINDS])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("residual, relu", [(False, False), (False, True), (True, True)],
                         ids=["bias", "bias+relu", "bias+residual+relu"])
def test_cudnn_conv_with_triton_epilogue(monkeypatch, gen, kind, dtype, channels_last, residual, relu):
    """The other algorithm: the vendor conv, then bias + residual + ReLU as one Triton pass."""
    monkeypatch.setenv("RESNET_FUSED_TRITON_ALGO", "cudnn_epilogue")
    _, n, c, h, w, k, r, s, p, d, g = kind
    x, weight, bias, res = make_case(gen, n, c, h, w, k, r, s, p, d, g, dtype, residual, channels_last)
    assert "cudnn_epilogue, as RESNET_FUSED_TRITON_ALGO says" in ops.explain(
        x.to(DEVICE), weight.to(DEVICE), None, None if res is None else res.to(DEVICE), s, p, d, g, backend="triton")
    out = run_and_check(x, weight, bias, res, s, p, d, g, relu)
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


GEMM_SHAPES = [  # (n, c, h, w, k): odd rows and a K that is not a tile multiple; a 1x1 map; wide C
    (3, 24, 5, 7, 40),
    (2, 16, 1, 1, 24),
    (1, 72, 3, 3, 8),
]


@needs_tma
@pytest.mark.parametrize("shape", GEMM_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("residual, relu", [(False, False), (False, True), (True, True)],
                         ids=["bias", "bias+relu", "bias+residual+relu"])
def test_gemm_tma_matches_reference(monkeypatch, gen, shape, dtype, residual, relu):
    """1x1 stride-1 convs as a plain GEMM through TMA descriptors (the interpreter on CPU)."""
    monkeypatch.setenv("RESNET_FUSED_TRITON_ALGO", "gemm_tma")
    n, c, h, w, k = shape
    x, weight, bias, res = make_case(gen, n, c, h, w, k, 1, 1, 0, 1, 1, dtype, residual, channels_last=True)
    dev = torch.device(DEVICE)
    assert "(gemm_tma, as RESNET_FUSED_TRITON_ALGO says)" in ops.explain(
        x.to(dev), weight.to(dev), None, None if res is None else res.to(dev), backend="triton")
    out = run_and_check(x, weight, bias, res, 1, 0, 1, 1, relu)
    assert out.is_contiguous(memory_format=torch.channels_last)


MSG = "takes stride-1 convs larger than 1x1 and strided 1x1 convs without padding, one group"
CONV_TMA_SHAPES = [  # (n, c, h, w, k, r, padding, dilation): odd maps, C across a K chunk, no
    (2, 24, 7, 9, 40, 3, 1, 1),  # padding, dilation 2, a 5x5
    (1, 16, 6, 5, 8, 3, 2, 2),
    (2, 8, 5, 5, 16, 3, 0, 1),
    (1, 16, 9, 7, 24, 5, 2, 1),
]


@needs_tma
@pytest.mark.parametrize("shape", CONV_TMA_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("residual, relu", [(False, False), (True, True)], ids=["bias", "bias+residual+relu"])
def test_conv_tma_matches_reference(monkeypatch, gen, shape, dtype, residual, relu):
    """Stride-1 convs with TMA boxes of pixels, the padding as TMA's zero fill (the
    interpreter on CPU)."""
    monkeypatch.setenv("RESNET_FUSED_TRITON_ALGO", "conv_tma")
    n, c, h, w, k, r, p, d = shape
    x, weight, bias, res = make_case(gen, n, c, h, w, k, r, 1, p, d, 1, dtype, residual, channels_last=True)
    assert "(conv_tma, as RESNET_FUSED_TRITON_ALGO says)" in ops.explain(
        *on_device(x, weight, None, res), 1, p, d, backend="triton")
    out = run_and_check(x, weight, bias, res, 1, p, d, 1, relu)
    assert out.is_contiguous(memory_format=torch.channels_last)


@needs_tma
@pytest.mark.parametrize("algorithm, r", [("gemm_tma", 1), ("conv_tma", 3)])
def test_tma_takes_odd_strides_on_size_one_dimensions(monkeypatch, gen, algorithm, r):
    """A 1x1 map is channels_last-dense whatever the strides of its size-1 dimensions, but
    TMA encodes every stride (16-byte multiples): the descriptors get canonical ones."""
    from resnet_fused.backends import triton_backend as tb

    monkeypatch.setenv("RESNET_FUSED_TRITON_ALGO", algorithm)
    x = torch.randn(2, 16, generator=gen).to(torch.float16).to(DEVICE).as_strided((2, 16, 1, 1), (16, 1, 3, 5))
    assert x.is_contiguous(memory_format=torch.channels_last)
    weight = (torch.randn(8, 16, r, r, generator=gen) / 4).to(torch.float16).to(DEVICE)
    bias = torch.randn(8, generator=gen).to(torch.float16).to(DEVICE)
    args = (x, weight, None, None, [1, 1], [r // 2] * 2, [1, 1], 1, True)
    assert tb.algorithm_refusal(algorithm, args) is None
    run_and_check(x, weight, bias, None, 1, r // 2, 1, 1, True)


@pytest.mark.parametrize("algorithm, r", [
    ("implicit_gemm", 3), ("cudnn_epilogue", 3),
    pytest.param("gemm_tma", 1, marks=needs_tma), pytest.param("conv_tma", 3, marks=needs_tma),
])
def test_every_algorithm_reads_strided_bias_and_residual(monkeypatch, gen, algorithm, r):
    """Each kernel reads the bias at bias_ptr + k: a strided or expanded bias view (and,
    where the algorithm takes one, a residual dense in no format) must still give the
    right answer (it once did not)."""
    monkeypatch.setenv("RESNET_FUSED_TRITON_ALGO", algorithm)
    n, c, h, w, k = 2, 16, 7, 5, 24
    x = torch.randn(n, c, h, w, generator=gen).to(torch.float16).contiguous(memory_format=torch.channels_last)
    weight = (torch.randn(k, c, r, r, generator=gen) / (c * r * r) ** 0.5).to(torch.float16)
    res = torch.randn(n, h, w, 2 * k, generator=gen).to(torch.float16).permute(0, 3, 1, 2)[:, ::2]
    if algorithm.endswith("_tma"):  # they refuse a residual that is not dense NHWC (explained)
        res = res.contiguous(memory_format=torch.channels_last)
    for bias in (torch.randn(2 * k, generator=gen).to(torch.float16)[1::2],
                 torch.randn(1, generator=gen).to(torch.float16).expand(k)):
        assert f"({algorithm}, as RESNET_FUSED_TRITON_ALGO says)" in ops.explain(
            *on_device(x, weight, None, res), 1, r // 2, backend="triton")
        run_and_check(x, weight, bias, res, 1, r // 2, 1, 1, True)


@pytest.mark.parametrize("kind, reason", [
    ("3x3_stride2", MSG),
    ("1x1", MSG),
    ("1x1_stride2_padded", MSG),
    ("grouped", MSG),
    ("float32", "dtype torch.float32 (takes float16, bfloat16)"),
])
def test_conv_tma_refuses_what_it_cannot_take(gen, kind, reason):
    from resnet_fused.backends import triton_backend as tb

    r, s, p, g, dtype = {"3x3_stride2": (3, 2, 1, 1, torch.float16), "1x1": (1, 1, 0, 1, torch.float16),
                         "1x1_stride2_padded": (1, 2, 1, 1, torch.float16), "grouped": (3, 1, 1, 2, torch.float16),
                         "float32": (3, 1, 1, 1, torch.float32)}[kind]
    x, weight, _, _ = on_device(*make_case(gen, 1, 16, 6, 6, 16, r, s, p, 1, g, dtype, False, channels_last=True))
    args = (x, weight, None, None, [s, s], [p, p], [1, 1], g, True)
    assert reason in tb.algorithm_refusal("conv_tma", args)


@needs_tma
@pytest.mark.parametrize("shape", [(2, 16, 9, 7, 24, 2), (1, 32, 8, 8, 16, 2), (2, 16, 10, 11, 8, 3)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("residual", [False, True], ids=["bias+relu", "bias+residual+relu"])
def test_conv_tma_strided_1x1_matches_reference(monkeypatch, gen, shape, residual):
    """A strided 1x1 conv (ResNet's downsample) is a stride-1 one over a strided view of
    the input, which TMA reads directly (odd sizes: the last pixel of each row counts)."""
    monkeypatch.setenv("RESNET_FUSED_TRITON_ALGO", "conv_tma")
    n, c, h, w, k, stride = shape
    x, weight, bias, res = make_case(gen, n, c, h, w, k, 1, stride, 0, 1, 1, torch.float16, residual,
                                     channels_last=True)
    assert "(conv_tma, as RESNET_FUSED_TRITON_ALGO says)" in ops.explain(*on_device(x, weight, None, res), stride,
                                                                        backend="triton")
    run_and_check(x, weight, bias, res, stride, 0, 1, 1, True)


@pytest.mark.parametrize("change, reason", [
    (dict(r=3, padding=1), "only 1x1 convs with stride 1"),
    (dict(stride=2), "only 1x1 convs with stride 1"),
    (dict(dtype=torch.float32), "dtype torch.float32 (takes float16, bfloat16)"),
    (dict(x_layout="nchw"), "x is not dense channels_last"),
    (dict(res_layout="nchw"), "residual is not dense channels_last"),
    (dict(c=12), "C=12 and K=16 should be multiples of 8"),
    (dict(x_offset=1), "x is not 16-byte aligned"),
], ids=["3x3", "stride2", "float32", "x_nchw", "residual_nchw", "channels", "misaligned"])
@needs_tma
def test_gemm_tma_refuses_what_it_cannot_take(monkeypatch, gen, change, reason):
    """What gemm_tma does not take runs implicit_gemm instead, correctly, and explain says why."""
    from resnet_fused.backends import triton_backend as tb

    monkeypatch.setenv("RESNET_FUSED_TRITON_ALGO", "gemm_tma")
    opt = dict(r=1, padding=0, stride=1, dtype=torch.float16, c=16, x_layout="nhwc", res_layout="nhwc", x_offset=0)
    opt.update(change)
    x, weight, bias, res = make_case(gen, 2, opt["c"], 6, 6, 16, opt["r"], opt["stride"], opt["padding"], 1, 1,
                                     opt["dtype"], True, channels_last=True)
    if opt["x_layout"] == "nchw":
        x = x.contiguous()
    if opt["res_layout"] == "nchw":
        res = res.contiguous()
    x, weight, bias, res = on_device(x, weight, bias, res)
    if opt["x_offset"]:
        flat = torch.empty(x.numel() + opt["x_offset"], dtype=x.dtype, device=DEVICE)
        shifted = flat[opt["x_offset"]:].view(2, 6, 6, opt["c"]).permute(0, 3, 1, 2)
        shifted.copy_(x)
        x = shifted
    args = (x, weight, None, res, [opt["stride"]] * 2, [opt["padding"]] * 2, [1, 1], 1, True)
    assert reason in tb.algorithm_refusal("gemm_tma", args)
    assert reason in ops.explain(args[0], args[1], None, args[3], args[4], args[5], backend="triton")
    run_and_check(x, weight, bias, res, opt["stride"], opt["padding"], 1, 1, True)


def test_autotune_pruning_by_shared_memory_warps_and_sm_fill(monkeypatch):
    """What the autotuners may try: configs that fit in shared memory, never 8 warps for
    the multi-tap loop (triton#1254), and only grids that cover half the SMs if any do."""
    from resnet_fused.backends import triton_backend as tb

    monkeypatch.setattr(tb, "_device_limits", lambda index: (132, 232448))  # an H100
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    x = torch.empty(0, dtype=torch.float16)

    def conv(n, pq, k, r, flat=False, c=64):
        return tb._prune(tb.CONFIGS, dict(x_ptr=x, N=n, P=pq, Q=pq, C=c, K=k, R=r, S=r, GROUPS=1, FLAT_SC=flat))

    big3x3 = conv(256, 56, 64, 3)
    assert big3x3 and all(cfg.num_warps == 4 for cfg in big3x3)
    assert all(cfg.kwargs["BLOCK_N"] <= 128 for cfg in big3x3)  # K = 64: no 256-wide column tiles
    assert any(cfg.num_warps == 8 for cfg in conv(256, 56, 256, 1))  # 1x1 may use 8 warps
    stem = conv(256, 112, 64, 7, flat=True, c=4)  # a filter row: 7 taps x 4 channels = 28 deep
    assert stem and all(cfg.kwargs["BLOCK_K"] == 32 and cfg.num_warps == 4 for cfg in stem)
    assert all(cfg.kwargs["BLOCK_K"] == 32 for cfg in conv(256, 28, 64, 3, flat=True, c=8))  # 24 deep
    assert any(cfg.kwargs["BLOCK_K"] == 64 for cfg in conv(256, 28, 64, 3, flat=True, c=12))  # 36 deep
    tiny = conv(1, 7, 512, 3)  # 49 rows: no config fills half of 132 SMs -> the most tiles
    tiles = {id(cfg): -(-49 // cfg.kwargs["BLOCK_M"]) * -(-512 // cfg.kwargs["BLOCK_N"]) for cfg in tb.CONFIGS}
    four_warp = [cfg for cfg in tb.CONFIGS if cfg.num_warps == 4]  # all of them fit an H100's shared memory
    assert {tiles[id(cfg)] for cfg in tiny} == {max(tiles[id(cfg)] for cfg in four_warp)}
    assert all(tiles[id(cfg)] < 66 for cfg in tiny)
    monkeypatch.setattr(tb, "_device_limits", lambda index: (132, 40000))  # little shared memory
    assert all(cfg.num_stages * (cfg.kwargs["BLOCK_M"] + cfg.kwargs["BLOCK_N"]) * cfg.kwargs["BLOCK_K"] * 2 <= 40000
               for cfg in conv(256, 56, 256, 1))

    monkeypatch.setattr(tb, "_device_limits", lambda index: (132, 232448))
    gemm = tb._prune_gemm(tb.GEMM_CONFIGS, dict(M=256 * 56 * 56, K=256, C=64))
    assert gemm and all(cfg.kwargs["BLOCK_K"] <= 128 for cfg in gemm)
    assert all(-(-256 * 3136 // cfg.kwargs["BLOCK_M"]) * -(-256 // cfg.kwargs["BLOCK_N"]) >= 66 for cfg in gemm)
    small = tb._prune_gemm(tb.GEMM_CONFIGS, dict(M=49, K=64, C=2048))
    assert small and all(cfg.kwargs["BLOCK_N"] <= 128 for cfg in small)


def test_gemm_tma_heuristic_tile_is_one_warpgroup_on_triton_before_3_7(monkeypatch):
    """Triton 3.6's code for gemm_tma's two-warpgroup tiles has ptxas serialize its wgmmas
    (seen offline, benchmarks/NOTES.md version 7), so there the heuristic takes 4 warps;
    on Triton 3.7+ the larger 8-warp tiles stay available to it."""
    from resnet_fused.backends import triton_backend as tb

    version = tuple(int(v) for v in triton.__version__.split(".")[:2])
    assert tb._TMA_HEURISTIC_WARPS == ((4,) if version < (3, 7) else (4, 8))
    monkeypatch.setattr(tb, "_device_limits", lambda index: (132, 232448))  # an H100
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    layer1 = dict(m=256 * 56 * 56, k=256, c=64)  # ResNet-50's first 1x1 at batch 256
    monkeypatch.setattr(tb, "_TMA_HEURISTIC_WARPS", (4,))
    assert tb.heuristic_gemm_config(**layer1).num_warps == 4
    monkeypatch.setattr(tb, "_TMA_HEURISTIC_WARPS", (4, 8))
    assert tb.heuristic_gemm_config(**layer1).num_warps == 8  # the rule changes the choice


def test_unknown_algorithm_is_an_error(monkeypatch, gen):
    monkeypatch.setenv("RESNET_FUSED_TRITON_ALGO", "winograd")
    x, weight, bias, _ = make_case(gen, 1, 4, 5, 5, 4, 3, 1, 1, 1, 1, torch.float32, False)
    with pytest.raises(ValueError, match="RESNET_FUSED_TRITON_ALGO='winograd'; expected auto or one of "
                                         "implicit_gemm, cudnn_epilogue"):
        ops.conv_bias_act(x.to(DEVICE), weight.to(DEVICE), bias.to(DEVICE), padding=1, backend="triton")


def test_algorithm_choice_is_timed_once_and_kept_on_disk(monkeypatch, tmp_path, gen, fresh_choices):
    """On a GPU each new shape times both algorithms once; the winner is cached in memory and
    on disk so a second process does not time again. Timing is faked here to pick a winner."""
    tb = fresh_choices
    calls = []

    def fake_time(fn):
        calls.append(fn)
        fn()  # each candidate really runs
        return 1.0 if len(calls) % 2 == 0 else 2.0  # the second candidate (cudnn_epilogue) wins

    monkeypatch.setattr(tb, "_time_ms", fake_time)
    x, weight, bias, res = on_device(*make_case(gen, 1, 8, 6, 6, 8, 3, 1, 1, 1, 1, torch.float32, True))
    args = (x, weight, bias, res, [1, 1], [1, 1], [1, 1], 1, True)
    assert tb.choose_algorithm(args, timing=True) == "cudnn_epilogue"
    assert tb.choose_algorithm(args, timing=True) == "cudnn_epilogue" and len(calls) == 2
    saved = __import__("json").loads((tmp_path / "triton_algorithms.json").read_text())
    assert list(saved.values()) == ["cudnn_epilogue"]
    monkeypatch.setattr(tb, "_choices", {})  # a new process reads the file instead of timing
    monkeypatch.setattr(tb, "_choices_loaded", False)
    assert tb.choose_algorithm(args, timing=True) == "cudnn_epilogue" and len(calls) == 2
    # without timing (AUTOTUNE off, a CUDA graph being captured) a known shape keeps its choice
    assert tb.choose_algorithm(args, timing=False) == "cudnn_epilogue"
    other = (x[:, :, :5], weight, bias, res[:, :, :5], [1, 1], [1, 1], [1, 1], 1, True)
    assert tb.choose_algorithm(other, timing=False) == "implicit_gemm" and len(calls) == 2  # unseen: not timed


@needs_tma
def test_choice_is_per_call_signature_alignment_included(monkeypatch, gen, fresh_choices):
    """The choice is remembered per call signature; the same shape at an address TMA cannot
    take is another signature, timed among the algorithms that do take it."""
    tb = fresh_choices
    timed = []

    def fake_time(fn):
        timed.append(fn)
        return 1.0 if len(timed) == 3 else 2.0  # the third candidate of the first call: gemm_tma

    monkeypatch.setattr(tb, "_time_ms", fake_time)
    x, weight, bias, _ = on_device(*make_case(gen, 2, 16, 5, 5, 32, 1, 1, 0, 1, 1, torch.float16, False,
                                             channels_last=True))
    args = (x, weight, bias, None, [1, 1], [0, 0], [1, 1], 1, True)
    assert tb.choose_algorithm(args, timing=True) == "gemm_tma" and len(timed) == 3
    assert tb.choose_algorithm(args, timing=True) == "gemm_tma" and len(timed) == 3
    flat = torch.empty(x.numel() + 1, dtype=x.dtype, device=DEVICE)
    shifted = flat[1:].view(2, 5, 5, 16).permute(0, 3, 1, 2)  # same shape and strides, 2 bytes off
    shifted.copy_(x)
    moved = (shifted, *args[1:])
    assert tb.choose_algorithm(moved, timing=True) != "gemm_tma" and len(timed) == 5


def test_float32_choice_is_per_tf32_mode(monkeypatch, gen, fresh_choices):
    """A float32 conv runs TF32 or IEEE as torch.backends.cudnn.allow_tf32 says, so the
    algorithm timed fastest in one mode is not taken for the other: each is timed."""
    tb = fresh_choices
    timed = []

    def fake_time(fn):
        timed.append(fn)
        return float(len(timed))  # the first candidate each time: implicit_gemm

    monkeypatch.setattr(tb, "_time_ms", fake_time)
    x, weight, bias, _ = on_device(*make_case(gen, 2, 8, 5, 5, 8, 3, 2, 1, 1, 1, torch.float32, False))
    args = (x, weight, bias, None, [2, 2], [1, 1], [1, 1], 1, True)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    assert tb.choose_algorithm(args, timing=True) == "implicit_gemm" and len(timed) == 2
    assert tb.choose_algorithm(args, timing=True) == "implicit_gemm" and len(timed) == 2
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    assert tb.choose_algorithm(args, timing=True) == "implicit_gemm" and len(timed) == 4
    assert sorted(key.split("|")[-2] for key in tb._choices) == ["tf32=False", "tf32=True"]


def test_tf32_flags_set_apart_through_fp32_precision(monkeypatch, gen, fresh_choices):
    """With conv's and RNN's TF32 flags set apart through torch's fp32_precision API,
    torch.backends.cudnn.allow_tf32 raises when read; float32 calls read the conv's flag."""
    from resnet_fused._env import conv_allows_tf32

    x, weight, bias, _ = on_device(*make_case(gen, 2, 8, 5, 5, 8, 3, 1, 1, 1, 1, torch.float32, False))
    cudnn = torch.backends.cudnn
    saved = (cudnn.conv.fp32_precision, cudnn.rnn.fp32_precision)  # (monkeypatch cannot undo these on torch 2.11)
    try:
        for precision, tf32 in (("ieee", False), ("tf32", True)):
            cudnn.conv.fp32_precision = precision
            cudnn.rnn.fp32_precision = "tf32" if precision == "ieee" else "ieee"
            assert conv_allows_tf32() is tf32
            assert fresh_choices._shape_key(x, weight, None, [1, 1], [1, 1], [1, 1], 1, True).endswith(f"|tf32={tf32}")
            out = ops.conv_bias_act(x, weight, bias, padding=1, backend="triton")
            ref = reference_conv_bias_act(x.cpu(), weight.cpu(), bias.cpu(), None, 1, 1)
            assert relative_error(out, ref) <= (5e-4 if tf32 and ON_GPU else tol(torch.float32))
    finally:
        cudnn.conv.fp32_precision, cudnn.rnn.fp32_precision = saved


@needs_tma
@pytest.mark.parametrize("kind, candidates", [
    ((16, 1, 1, 0, 1), {"implicit_gemm", "cudnn_epilogue", "gemm_tma"}),
    ((16, 3, 1, 1, 1), {"implicit_gemm", "cudnn_epilogue", "conv_tma"}),
    ((16, 3, 2, 1, 1), {"implicit_gemm", "cudnn_epilogue"}),
    ((16, 1, 2, 0, 1), {"implicit_gemm", "cudnn_epilogue", "conv_tma"}),
    ((3, 7, 2, 3, 1), {"implicit_gemm", "cudnn_epilogue"}),  # the stem: 3 channels
    ((16, 3, 1, 1, 4), {"implicit_gemm", "cudnn_epilogue"}),  # grouped
], ids=["1x1", "3x3", "3x3_stride2", "1x1_stride2", "stem", "grouped"])
def test_which_algorithms_each_conv_kind_is_timed_among(gen, kind, candidates):
    from resnet_fused.backends import triton_backend as tb

    c, r, stride, pad, groups = kind
    x, weight, _, _ = on_device(*make_case(gen, 2, c, 9, 9, 16, r, stride, pad, 1, groups, torch.float16, False,
                                           channels_last=True))
    args = (x, weight, None, None, [stride] * 2, [pad] * 2, [1, 1], groups, True)
    assert {name for name in tb.ALGORITHMS if tb.algorithm_refusal(name, args) is None} == candidates


def test_a_misspelt_skip_is_an_error(monkeypatch, gen):
    from resnet_fused.backends import triton_backend as tb

    x, weight, bias, res = make_case(gen, 1, 8, 5, 5, 8, 1, 1, 0, 1, 1, torch.float16, False, channels_last=True)
    monkeypatch.setenv("RESNET_FUSED_TRITON_SKIP", "gemm_tma, conv_tmaa")
    with pytest.raises(ValueError, match=r"names no algorithm 'conv_tmaa'; the algorithms are implicit_gemm"):
        tb.algorithm_refusal("gemm_tma", (x, weight, None, None, [1, 1], [0, 0], [1, 1], 1, True))


def test_skipped_algorithms_are_not_candidates(monkeypatch, gen):
    from resnet_fused.backends import triton_backend as tb

    x, weight, _, _ = on_device(*make_case(gen, 2, 16, 9, 9, 16, 3, 1, 1, 1, 1, torch.float16, False,
                                           channels_last=True))
    args = (x, weight, None, None, [1, 1], [1, 1], [1, 1], 1, True)
    monkeypatch.setenv("RESNET_FUSED_TRITON_SKIP", "conv_tma, gemm_tma")
    assert tb.algorithm_refusal("conv_tma", args) == "skipped by RESNET_FUSED_TRITON_SKIP"
    assert tb.algorithm_refusal("cudnn_epilogue", args) is None
    assert {n for n in tb.ALGORITHMS if tb.algorithm_refusal(n, args) is None} == {"implicit_gemm", "cudnn_epilogue"}
    monkeypatch.setenv("RESNET_FUSED_TRITON_ALGO", "conv_tma")  # forcing a skipped one: implicit_gemm, said why
    assert "asks for conv_tma, which does not take this call (skipped by RESNET_FUSED_TRITON_SKIP)" in \
        ops.explain(x, weight, None, None, 1, 1, backend="triton")
    monkeypatch.setenv("RESNET_FUSED_TRITON_SKIP", "implicit_gemm")
    with pytest.raises(ValueError, match="implicit_gemm is the algorithm calls fall back to"):
        tb.algorithm_refusal("implicit_gemm", args)


def _wide_view(dtype, device, c=8, h=3, w=2, row_stride=2**30):
    """A (1, c, h, w) view whose rows lie ``row_stride`` elements apart, filled with fresh
    random values (returned too): an image spanning 2^31 elements, in a storage only
    a few of whose pages are touched."""
    base = torch.empty((h - 1) * row_stride + c * w, dtype=dtype, device=device)
    view = base.as_strided((1, c, h, w), (c * h * w, w, row_stride, 1))
    values = torch.randn(1, c, h, w).to(dtype)
    view.copy_(values)
    return view, values


def test_skipping_cudnn_epilogue_leaves_it_to_the_calls_only_it_takes(monkeypatch, fresh_choices):
    """RESNET_FUSED_TRITON_SKIP keeps algorithms out of the timed choice; where
    implicit_gemm refuses a call too, cudnn_epilogue is all that is left and runs."""
    tb = fresh_choices
    monkeypatch.setenv("RESNET_FUSED_TRITON_SKIP", "cudnn_epilogue gemm_tma conv_tma")
    monkeypatch.setattr(tb, "_time_ms", lambda fn: pytest.fail("nothing to time"))
    x, x_values = _wide_view(torch.float16, DEVICE)
    weight = torch.randn(8, 8, 1, 1).half().to(DEVICE) / 8 ** 0.5
    args = (x, weight, None, None, [1, 1], [0, 0], [1, 1], 1, True)
    assert tb.choose_algorithm(args, timing=True) == "cudnn_epilogue"
    out = ops.conv_bias_act(x, weight, padding=0, backend="triton")
    assert relative_error(out, reference_conv_bias_act(x_values, weight.cpu(), None, None, 1, 0)) <= tol(torch.float16)


@pytest.mark.parametrize("r, operand", [(1, "x"), (3, "x"), (1, "residual")])
def test_an_image_spanning_2_to_the_31_takes_cudnn_epilogue(gen, fresh_choices, r, operand):
    """implicit_gemm's offsets within an image are 32-bit: a view spanning more (rows 2^30
    elements apart here) went past them (a segfault under the interpreter); such a call
    takes cuDNN's conv and the fused epilogue, and says why."""
    tb = fresh_choices
    x, x_values = _wide_view(torch.float16, DEVICE)
    weight = (torch.randn(8, 8, r, r, generator=gen) / (8 * r * r) ** 0.5).half().to(DEVICE)
    bias = torch.randn(8, generator=gen).half().to(DEVICE)
    res = res_values = None
    if operand == "residual":
        x = x_values.to(DEVICE)
        res, res_values = _wide_view(torch.float16, DEVICE)
    pad = r // 2
    args = (x, weight, bias, res, [1, 1], [pad, pad], [1, 1], 1, True)
    assert f"{operand} spanning 2^31 elements or more" in tb.algorithm_refusal("implicit_gemm", args)
    assert tb.choose_algorithm(args, timing=False) == "cudnn_epilogue"
    text = ops.explain(x, weight, None, res, 1, pad, backend="triton")
    assert "cudnn_epilogue (implicit_gemm refuses:" in text or "the fastest of cudnn_epilogue for" in text, text
    out = ops.conv_bias_act(x, weight, bias, res, padding=pad, backend="triton")
    ref = reference_conv_bias_act(x_values, weight.cpu(), bias.cpu(), res_values, 1, pad, relu=True)
    assert relative_error(out, ref) <= tol(torch.float16)


def test_32_bit_limits_of_implicit_gemm_and_gemm_tma():
    """The limits themselves, on meta tensors (no memory): 2^31 output pixels, an output
    image of 2^31 elements, and the packed copy of a few-channel input."""
    from resnet_fused.backends import triton_backend as tb

    def refusal(name, x_shape, k, r, pad=0, x_strides=None):
        x = torch.empty(x_shape, device="meta", dtype=torch.float16)
        if x_strides is not None:
            x = x.as_strided(x_shape, x_strides)
        weight = torch.empty(k, x_shape[1], r, r, device="meta", dtype=torch.float16)
        return tb.algorithm_refusal(name, (x, weight, None, None, [1, 1], [pad, pad], [1, 1], 1, True))

    assert refusal("implicit_gemm", (2**15, 8, 256, 256), 8, 1) == \
        "2147483648 output pixels (its 32-bit pixel index takes fewer than 2^31)"
    assert refusal("gemm_tma", (2**15, 8, 256, 256), 8, 1) == "2147483648 rows (TMA coordinates are 32-bit: fewer than 2^31)"
    assert refusal("implicit_gemm", (2**14, 8, 256, 256), 8, 1) is None  # 2^30 pixels
    assert refusal("implicit_gemm", (1, 8, 2**13, 2**13), 2**4, 1) is None
    # an output image of 2^31 elements (32 channels of 2^13 x 2^13)
    assert refusal("implicit_gemm", (1, 8, 2**13, 2**13), 2**5, 1) == \
        "output spanning 2^31 elements or more within one image: its offsets within an image are 32-bit"
    # the stem's packed copy: 4 channels, padded rows, where x's 3 channels would fit
    assert "x spanning 2^31" in refusal("implicit_gemm", (1, 3, 2**15, 18000), 2, 7, pad=3)
    assert refusal("implicit_gemm", (1, 3, 2**14, 18000), 2, 7, pad=3) is None
    # 8 channels: x itself fits (just), its packed copy with 8 channels and padded rows does not
    assert "x spanning 2^31" in refusal("implicit_gemm", (1, 8, 16380, 16380), 8, 7, pad=3)
    assert refusal("implicit_gemm", (1, 16, 16380, 16380 // 2), 8, 7, pad=3) is None  # 16 channels: no copy
    # the padding's addresses: columns 2^30 apart, 2 of them, and 3 columns of padding each side
    assert "x spanning 2^31" in refusal("implicit_gemm", (1, 8, 1, 2), 8, 7, pad=3, x_strides=(16, 2, 16, 2**30))
    assert refusal("implicit_gemm", (1, 8, 1, 2), 8, 1, x_strides=(16, 2, 16, 2**30)) is None


@needs_tma
def test_1x1_convs_time_all_three_algorithms(monkeypatch, gen, fresh_choices):
    tb = fresh_choices
    ran = []

    def fake_time(fn):
        ran.append(fn())
        return {1: 3.0, 2: 2.0, 3: 1.0}[len(ran)]

    monkeypatch.setattr(tb, "_time_ms", fake_time)
    x, weight, bias, res = on_device(*make_case(gen, 2, 16, 5, 5, 32, 1, 1, 0, 1, 1, torch.float16, True,
                                                channels_last=True))
    args = (x, weight, bias, res, [1, 1], [0, 0], [1, 1], 1, True)
    assert tb.choose_algorithm(args, timing=True) == "gemm_tma"
    assert "(gemm_tma: measured fastest of implicit_gemm, cudnn_epilogue, gemm_tma for this shape)" in \
        ops.explain(x, weight, None, res, backend="triton")
    ref = reference_conv_bias_act(x, weight, bias, res, 1, 0, device=DEVICE)
    assert len(ran) == 3 and all(relative_error(out, ref) <= tol(torch.float16) for out in ran)


def test_a_failing_candidate_is_skipped_not_fatal(monkeypatch, gen, caplog, fresh_choices):
    """A candidate that fails while being timed (a tile its compiler refuses, say) is left
    out of the choice with a warning; the call still runs on the fastest of the others."""
    tb = fresh_choices

    def broken(*args, **kwargs):
        raise RuntimeError("PassManager::run failed")

    monkeypatch.setitem(tb.ALGORITHMS, "cudnn_epilogue", broken)
    monkeypatch.setattr(tb, "_time_ms", lambda fn: (fn(), 1.0)[1])
    x, weight, bias, res = on_device(*make_case(gen, 1, 8, 6, 6, 8, 3, 1, 1, 1, 1, torch.float32, True))
    args = (x, weight, bias, res, [1, 1], [1, 1], [1, 1], 1, True)
    with caplog.at_level("WARNING", logger="resnet_fused"):
        assert tb.choose_algorithm(args, timing=True) == "implicit_gemm"
    assert "cudnn_epilogue failed on this conv and is skipped for it: RuntimeError: PassManager::run failed" \
        in caplog.text
    monkeypatch.setitem(tb.ALGORITHMS, "implicit_gemm", broken)
    monkeypatch.setattr(tb, "_choices", {})
    with pytest.raises(RuntimeError, match="PassManager"):
        tb.choose_algorithm(args, timing=True)


def test_choice_while_tracing_times_real_tensors_of_the_traced_shapes(monkeypatch, gen, fresh_choices):
    """Under torch.compile the op's body is traced with fake tensors; the algorithm is
    chosen then, by timing both on real tensors of the same shapes and strides."""
    from torch._subclasses.fake_tensor import FakeTensorMode, is_fake

    tb = fresh_choices
    seen = []

    def fake_time(fn):
        out = fn()  # the candidate really runs, on real tensors
        seen.append((is_fake(out), tuple(out.shape), out.stride()))
        return 2.0 if len(seen) == 1 else 1.0  # cudnn_epilogue wins

    monkeypatch.setattr(tb, "_time_ms", fake_time)
    x, weight, bias, res = on_device(*make_case(gen, 2, 8, 6, 6, 16, 3, 2, 1, 1, 1, torch.float32, True,
                                                channels_last=True))
    with FakeTensorMode() as mode:
        args = tuple(None if t is None else mode.from_tensor(t) for t in (x, weight, bias, res))
        args += ([2, 2], [1, 1], [1, 1], 1, True)
        assert tb.choose_algorithm(args, timing=True) == "cudnn_epilogue"
    expected_stride = torch.empty(2, 16, 3, 3).contiguous(memory_format=torch.channels_last).stride()
    assert seen == [(False, (2, 16, 3, 3), expected_stride)] * 2
    real = (x, weight, bias, res, [2, 2], [1, 1], [1, 1], 1, True)
    assert tb.choose_algorithm(real, timing=True) == "cudnn_epilogue" and len(seen) == 2  # same key


def test_triton_op_eager_autograd_and_opcheck(gen):
    """``resnet_fused::triton_conv_bias_act`` (a torch.library.triton_op): the Triton backend
    as an op torch.compile can trace into; eagerly it runs the same kernels."""
    x, weight, bias, res = make_case(gen, 2, 8, 7, 7, 16, 3, 2, 1, 1, 2, torch.float32, True, channels_last=True)
    x, weight, bias, res = (t.to(DEVICE) for t in (x, weight, bias, res))
    op = torch.ops.resnet_fused.triton_conv_bias_act
    out = op(x, weight, bias, res, [2, 2], [1, 1], [1, 1], 2, True)
    ref = reference_conv_bias_act(x, weight, bias, res, 2, 1, 1, 2, True)
    assert relative_error(out, ref) <= tol(torch.float32)
    assert out.is_contiguous(memory_format=torch.channels_last)
    for t in (x, weight, bias, res):
        t.requires_grad_(True)
    y = ops.conv_bias_act(x, weight, bias, res, stride=2, padding=1, groups=2, backend="triton")
    assert "triton_conv_bias_act" in type(y.grad_fn).__name__
    y.square().sum().backward()
    x64, w64, b64, r64 = (t.detach().double().requires_grad_(True) for t in (x, weight, bias, res))
    torch.relu(torch.nn.functional.conv2d(x64, w64, b64, 2, 1, 1, 2) + r64).square().sum().backward()
    for t, t64 in ((x, x64), (weight, w64), (bias, b64), (res, r64)):
        assert relative_error(t.grad, t64.grad) <= 1e-4
    torch.library.opcheck(
        op.default, (x, weight, bias, res, [2, 2], [1, 1], [1, 1], 2, True),
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
    )


@pytest.mark.slow
def test_export_keeps_the_triton_op_and_compile_has_no_graph_break(gen):
    """torch.export of a fused model on the Triton backend: one triton_conv_bias_act node per
    conv and nothing else of ours; torch.compile(fullgraph=True) traces through the op.
    (On the CPU interpreter the compiled op runs the torch fallback, see explain; the GPU
    test checks that Inductor calls our kernels.)"""
    import collections

    tv_model = seeded_torchvision_model("resnet18", seed=5, calibration_size=32)
    fused = resnet_fused.resnet18(backend="triton")
    fused.load_state_dict(tv_model.state_dict())
    fused = fused.eval().to(DEVICE)
    x = torch.randn(1, 3, 32, 32, generator=gen)
    with torch.no_grad():
        ref = copy.deepcopy(tv_model).double()(x.double())
        exported = torch.export.export(fused, (x.to(DEVICE),))
        ours = collections.Counter(
            str(n.target) for n in exported.graph.nodes
            if n.op == "call_function" and str(n.target).startswith("resnet_fused.")
        )
        assert ours == {"resnet_fused.triton_conv_bias_act.default": 20}
        assert relative_error(exported.module()(x.to(DEVICE)), ref) <= 5e-4
        compiled = torch.compile(fused, fullgraph=True)
        assert relative_error(compiled(x.to(DEVICE)), ref) <= 5e-4


@pytest.fixture
def fresh_tuning_state(fresh_choices, monkeypatch):
    """Empty algorithm and autotune caches, a private cache dir, and a GPU model named
    "Fake GPU" for the tuning table (so the table logic runs without a GPU)."""
    tb = fresh_choices
    monkeypatch.setattr(tb._tuned, "cache", {})
    monkeypatch.setattr(tb, "_implicit_gemm_tiles", {})  # (the tiles it chose, as launched)
    monkeypatch.setattr(tb, "_tma_tiles", {})
    monkeypatch.setattr(tb, "_table_device", lambda: "Fake GPU")
    return tb


def _record_some_tuning(tb):
    tb._choices["Fake GPU|shape a"] = "cudnn_epilogue"
    tb._choices["Other GPU|shape b"] = "implicit_gemm"  # another model's: not this device's table
    tb._tuned.cache[(3136, 64, True, "torch.float16")] = tb.CONFIGS[4]
    tb._tma_tiles["Fake GPU|3.6.0|gemm_tma|802816|256|64|1|torch.float16"] = tb.GEMM_CONFIGS[1]
    tb._tma_tiles["Other GPU|3.6.0|gemm_tma|802816|256|64|1|torch.float16"] = tb.GEMM_CONFIGS[2]


def test_tuning_table_round_trip(fresh_tuning_state, tmp_path):
    """What a GPU session measured, written as a table and read back by a fresh process,
    fills the same caches: the same algorithm and the same tile configs, no tuning."""
    tb = fresh_tuning_state
    _record_some_tuning(tb)
    table = tb.measured_table()
    assert list(table["devices"]) == ["Fake GPU"]
    assert table["devices"]["Fake GPU"]["algorithms"] == {"Fake GPU|shape a": "cudnn_epilogue"}
    path = tmp_path / "table.json"
    tb.write_table(str(path), table)

    expected_tuned = dict(tb._tuned.cache)
    expected_gemm = {k: v for k, v in tb._tma_tiles.items() if k.startswith("Fake GPU|")}
    tb._choices.clear()
    tb._tuned.cache.clear()
    tb._tma_tiles.clear()
    assert tb._apply_shipped_table(str(path)) == 3
    assert tb._choices == {"Fake GPU|shape a": "cudnn_epilogue"}
    for cache, expected in ((tb._tuned.cache, expected_tuned), (tb._tma_tiles, expected_gemm)):
        assert cache.keys() == expected.keys()
        for key, cfg in cache.items():
            assert (cfg.kwargs, cfg.num_warps, cfg.num_stages, cfg.pre_hook) == \
                (expected[key].kwargs, expected[key].num_warps, expected[key].num_stages, expected[key].pre_hook)
    assert tb._tma_tiles["Fake GPU|3.6.0|gemm_tma|802816|256|64|1|torch.float16"].pre_hook is tb._set_gemm_blocks


def test_tuning_table_serves_only_its_gpu_model_and_triton_version(fresh_tuning_state, tmp_path, monkeypatch):
    tb = fresh_tuning_state
    _record_some_tuning(tb)
    table = tb.measured_table()
    path = tmp_path / "table.json"
    tb.write_table(str(path), table)
    tb._choices.clear()
    tb._tuned.cache.clear()
    monkeypatch.setattr(tb, "_table_device", lambda: "Another GPU")
    assert tb._apply_shipped_table(str(path)) == 0
    monkeypatch.setattr(tb, "_table_device", lambda: "Fake GPU")
    table["devices"]["Fake GPU"]["triton"] = "0.0.1"  # another Triton: the autotuner's keys may differ
    tb.write_table(str(path), table)
    assert tb._apply_shipped_table(str(path)) == 0 and not tb._tuned.cache
    path.write_text('{"format": 99, "devices": {}}')
    with pytest.raises(ValueError, match="tuning table format 99, expected 1"):
        tb.read_table(str(path))
    assert tb._apply_shipped_table(str(path)) == 0  # a bad table is ignored with a warning, never fatal


def test_tma_tiles_are_kept_on_disk(fresh_tuning_state, monkeypatch):
    """Triton's autotuner does not cache configs with a pre-hook on disk, so gemm_tma's
    tiles are kept by us: a second process reads them instead of autotuning again."""
    tb = fresh_tuning_state
    tb._tma_tiles["Fake GPU|3.6.0|gemm_tma|3136|256|64|1|torch.float16"] = tb.GEMM_CONFIGS[3]
    tb._tma_tiles["Fake GPU|3.6.0|conv_tma|8|56|56|64|64|3|3|1|1|1|1|0|torch.float16"] = tb.CONV_TMA_CONFIGS[1]
    tb._save_tma_tiles()
    monkeypatch.setattr(tb, "_tma_tiles", {})
    monkeypatch.setattr(tb, "_choices_loaded", False)
    tb._load_choices()
    cfg = tb._tma_tiles["Fake GPU|3.6.0|gemm_tma|3136|256|64|1|torch.float16"]
    assert (cfg.kwargs, cfg.num_warps, cfg.num_stages, cfg.pre_hook) == (
        tb.GEMM_CONFIGS[3].kwargs, tb.GEMM_CONFIGS[3].num_warps, tb.GEMM_CONFIGS[3].num_stages, tb._set_gemm_blocks)
    assert tb._tma_tiles["Fake GPU|3.6.0|conv_tma|8|56|56|64|64|3|3|1|1|1|1|0|torch.float16"].pre_hook \
        is tb._set_conv_blocks


def test_recording_at_exit_merges_and_ship_script_updates_the_package_table(
        fresh_tuning_state, tmp_path, monkeypatch, capsys):
    import importlib.util
    import pathlib

    tb = fresh_tuning_state
    recorded = tmp_path / "recorded.json"
    monkeypatch.setenv("RESNET_FUSED_TRITON_RECORD", str(recorded))
    tb._choices["Fake GPU|shape a"] = "gemm_tma"
    tb._record_at_exit()
    tb._choices["Fake GPU|shape b"] = "implicit_gemm"  # a second process adds to the file
    tb._choices.pop("Fake GPU|shape a")
    tb._record_at_exit()
    algorithms = tb.read_table(str(recorded))["devices"]["Fake GPU"]["algorithms"]
    assert algorithms == {"Fake GPU|shape a": "gemm_tma", "Fake GPU|shape b": "implicit_gemm"}

    script = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "ship_tuned.py"
    spec = importlib.util.spec_from_file_location("ship_tuned", script)
    ship = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ship)
    package_table = tmp_path / "shipped.json"
    assert ship.main([str(recorded), "--into", str(package_table)]) == 0
    assert "Fake GPU (triton " in capsys.readouterr().out
    assert tb.read_table(str(package_table))["devices"]["Fake GPU"]["algorithms"] == algorithms


@pytest.mark.skipif(ON_GPU, reason="the interpreter path is for machines without a GPU")
def test_auto_never_picks_the_interpreter(gen):
    x, weight, _, _ = make_case(gen, 1, 4, 5, 5, 4, 3, 1, 1, 1, 1, torch.float32, False)
    assert "triton" in resnet_fused.available_backends("cpu")
    assert not ops.explain(x, weight, padding=1).startswith("runs on 'triton'")


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_whole_model_parity(arch, gen):
    tv_model = seeded_torchvision_model(arch, seed=31, calibration_size=32)
    fused = resnet_fused.get_model(arch, backend="triton")
    fused.load_state_dict(tv_model.state_dict())
    fused = fused.eval().to(DEVICE)
    x = torch.randn(2, 3, 32, 32, generator=gen)
    with torch.no_grad():
        out = fused(x.to(DEVICE).contiguous(memory_format=torch.channels_last))
        ref = copy.deepcopy(tv_model).double()(x.double())
    tol_fp32 = 5e-4 if ON_GPU and torch.backends.cudnn.allow_tf32 else TOLERANCES[torch.float32]
    assert relative_error(out, ref) <= tol_fp32


def _gpu_layers(arch, batch):
    return [layer for layer, _ in conv_layers(arch, batch, 224)]


GPU_CASES = [  # small batches of both nets first, so a session short of time has seen every layer
    (arch, batch, layer)
    for batch in (1, 32, 256)
    for arch in ("resnet50", "resnext50_32x4d")
    for layer in _gpu_layers(arch, batch)
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", GPU_CASES, ids=[f"{a}-b{b}-{layer.name.replace(' ', '_')}" for a, b, layer in GPU_CASES])
def test_gpu_resnet_layers(case, dtype):
    arch, batch, layer = case
    gen = torch.Generator(device="cuda").manual_seed(batch)  # batch 256: drawn on the GPU, not the host
    x, weight, bias, res = layer.tensors(dtype, "cuda", gen)
    prev = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        run_and_check(x, weight, bias, res, layer.stride, layer.padding, layer.dilation, layer.groups, layer.relu,
                      ref_device="cuda")
    finally:
        torch.backends.cudnn.allow_tf32 = prev


@pytest.mark.gpu
@pytest.mark.parametrize("config", range(len(CONFIGS)), ids=lambda i: str(CONFIGS[i]).replace(" ", ""))
@pytest.mark.parametrize("layer", [
    ConvLayer(8, 64, 28, 28, 64, 3, 3, 1, 1, 1, 1, True, True),
    ConvLayer(8, 256, 14, 14, 512, 1, 1, 2, 0, 1, 1, False, False),
    ConvLayer(4, 128, 15, 15, 128, 3, 3, 2, 1, 1, 32, True, True),
    ConvLayer(8, 3, 57, 57, 64, 7, 7, 2, 3, 1, 1, True, False),
], ids=["3x3", "1x1_stride2", "grouped_odd", "stem_packed"])
def test_gpu_every_tile_config_is_correct(layer, config, dtype=torch.float16):
    """Autotuning may pick any config: each one must be right, not just the heuristic's."""
    from resnet_fused.backends import triton_backend as tb

    cfg = CONFIGS[config]
    if layer.r > 1 and cfg.num_warps > 4:  # the autotuner never launches these (triton#1254)
        cfg = triton.Config(cfg.kwargs, num_warps=4, num_stages=cfg.num_stages)
    x, w, b, r = layer.tensors(dtype, "cuda", torch.Generator(device="cuda").manual_seed(config))
    y = tb.implicit_gemm(x, w, b, r, [layer.stride] * 2, [layer.padding] * 2, [1, 1], layer.groups, layer.relu,
                         config=cfg)
    ref = reference_conv_bias_act(x, w, b, r, layer.stride, layer.padding, 1, layer.groups, layer.relu, device="cuda")
    assert relative_error(y, ref) <= TOLERANCES[dtype]


GEMM_LAYERS = [layer for layer, _ in conv_layers("resnet50", 32, 224) if layer.r == 1 and layer.stride == 1]


@pytest.mark.gpu
@pytest.mark.parametrize("config", range(len(GEMM_CONFIGS)), ids=lambda i: str(GEMM_CONFIGS[i]).replace(" ", ""))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layer", GEMM_LAYERS, ids=lambda layer: layer.name.replace(" ", "_"))
@needs_tma
def test_gpu_gemm_tma_every_config_on_resnet50_1x1_layers(layer, dtype, config):
    from resnet_fused.backends import triton_backend as tb

    x, w, b, r = layer.tensors(dtype, "cuda", torch.Generator(device="cuda").manual_seed(config))
    args = (x, w, b, r, [1, 1], [0, 0], [1, 1], 1, layer.relu)
    assert tb.algorithm_refusal("gemm_tma", args) is None
    y = tb.gemm_tma(*args, config=tb.GEMM_CONFIGS[config])
    ref = reference_conv_bias_act(x, w, b, r, 1, 0, 1, 1, layer.relu, device="cuda")
    assert relative_error(y, ref) <= TOLERANCES[dtype]


CONV_TMA_LAYERS = [layer for layer, _ in conv_layers("resnet50", 32, 224)
                   if (layer.r == 3 and layer.stride == 1 or layer.r == 1 and layer.stride == 2) and layer.groups == 1]


@pytest.mark.gpu
@pytest.mark.parametrize("config", range(len(CONV_TMA_CONFIGS)),
                         ids=lambda i: str(CONV_TMA_CONFIGS[i]).replace(" ", ""))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layer", CONV_TMA_LAYERS, ids=lambda layer: layer.name.replace(" ", "_"))
@needs_tma
def test_gpu_conv_tma_every_config_on_resnet50_layers(layer, dtype, config):
    from resnet_fused.backends import triton_backend as tb

    x, w, b, r = layer.tensors(dtype, "cuda", torch.Generator(device="cuda").manual_seed(config))
    w = w.contiguous(memory_format=torch.channels_last)
    args = (x, w, b, r, [layer.stride] * 2, [layer.padding] * 2, [1, 1], 1, layer.relu)
    assert tb.algorithm_refusal("conv_tma", args) is None
    y = tb.conv_tma(*args, config=tb.CONV_TMA_CONFIGS[config])
    ref = reference_conv_bias_act(x, w, b, r, layer.stride, layer.padding, 1, 1, layer.relu, device="cuda")
    assert relative_error(y, ref) <= TOLERANCES[dtype]


@pytest.mark.gpu
@pytest.mark.parametrize("config", range(len(CONV_TMA_CONFIGS)),
                         ids=lambda i: str(CONV_TMA_CONFIGS[i]).replace(" ", ""))
@pytest.mark.parametrize("shape", CONV_TMA_SHAPES, ids=lambda s: "x".join(map(str, s)))
@needs_tma
def test_gpu_conv_tma_odd_shapes_every_config(shape, config, dtype=torch.bfloat16):
    """What ResNet's layers do not exercise on the hardware: C across a channel chunk,
    no padding, dilation 2, a 5x5, maps smaller than the box, the residual box."""
    from resnet_fused.backends import triton_backend as tb

    n, c, h, w, k, r, p, d = shape
    x, weight, bias, res = on_device(*make_case(torch.Generator().manual_seed(config), n, c, h, w, k, r, 1, p, d,
                                                1, dtype, True, channels_last=True))
    y = tb.conv_tma(x, weight, bias, res, [1, 1], [p, p], [d, d], 1, True, config=tb.CONV_TMA_CONFIGS[config])
    ref = reference_conv_bias_act(x, weight, bias, res, 1, p, d, 1, True, device="cuda")
    assert relative_error(y, ref) <= TOLERANCES[dtype]


@pytest.mark.gpu
@pytest.mark.parametrize("config", range(len(GEMM_CONFIGS)), ids=lambda i: str(GEMM_CONFIGS[i]).replace(" ", ""))
@pytest.mark.parametrize("shape", GEMM_SHAPES, ids=lambda s: "x".join(map(str, s)))
@needs_tma
def test_gpu_gemm_tma_odd_shapes_every_config(shape, config, dtype=torch.float16):
    from resnet_fused.backends import triton_backend as tb

    n, c, h, w, k = shape
    x, weight, bias, res = on_device(*make_case(torch.Generator().manual_seed(config), n, c, h, w, k, 1, 1, 0, 1, 1,
                                                dtype, True, channels_last=True))
    y = tb.gemm_tma(x, weight, bias, res, [1, 1], [0, 0], [1, 1], 1, True, config=tb.GEMM_CONFIGS[config])
    ref = reference_conv_bias_act(x, weight, bias, res, 1, 0, 1, 1, True, device="cuda")
    assert relative_error(y, ref) <= TOLERANCES[dtype]


@pytest.mark.gpu
def test_gpu_torch_compile_and_export_of_fused_resnet50():
    model = resnet_fused.resnet50(backend="triton").eval().cuda().half()
    x = torch.randn(2, 3, 64, 64, device="cuda", dtype=torch.half)
    with torch.no_grad():
        eager = model(x)
        compiled = torch.compile(model, fullgraph=True)(x)
        exported = torch.export.export(model, (x,))
        from_export = exported.module()(x)
    assert relative_error(compiled, eager) <= 2e-3
    assert relative_error(from_export, eager) <= 2e-3
    assert "resnet_fused.triton_conv_bias_act" in str(exported.graph)


@pytest.mark.gpu
def test_gpu_torch_compile_keeps_the_packed_stems_strides():
    """The stem's packed input is a buffer made inside the traced op: Inductor must hand
    the kernel that buffer with the strides traced (an odd size: rows of 81 pixels,
    spaced 84), or the stem reads the wrong pixels."""
    model = resnet_fused.resnet18(backend="triton").eval().cuda().half()
    x = torch.randn(2, 3, 75, 75, device="cuda", dtype=torch.half)
    with torch.no_grad():
        eager = model(x)
        compiled = torch.compile(model, fullgraph=True)(x)
    assert relative_error(compiled, eager) <= 2e-3


@pytest.mark.gpu
def test_gpu_inductor_calls_our_triton_kernels():
    """The triton_op is decomposed under torch.compile: Inductor's code launches our Triton
    kernels itself instead of calling back into a Python op."""
    from torch._inductor.utils import run_and_get_code

    model = resnet_fused.resnet18(backend="triton").eval().cuda().half()
    x = torch.randn(2, 3, 64, 64, device="cuda", dtype=torch.half)
    with torch.no_grad(), pytest.MonkeyPatch.context() as mp:
        mp.setenv("RESNET_FUSED_TRITON_ALGO", "implicit_gemm")  # so our kernel must be in the code
        eager = model(x)
        compiled, code = run_and_get_code(torch.compile(model, fullgraph=True), x)
    code = "\n".join(code)
    assert relative_error(compiled, eager) <= 2e-3
    assert "resnet_fused.triton_conv_bias_act.default(" not in code  # no call back into the op
    assert "def _conv_bias_act_kernel(" in code  # Inductor carries and launches our kernel


@pytest.mark.gpu
def test_gpu_graph_capture_of_an_unseen_shape_does_not_benchmark(monkeypatch):
    """Capturing a CUDA graph around a conv shape never run before must not autotune or
    time (both synchronize, which capture forbids): it takes the heuristic tile. (Relaxed
    capture: the kernel's first launch loads its module, which a global-mode capture
    forbids; the op then says to warm up first.)"""
    from resnet_fused.backends import triton_backend as tb

    monkeypatch.setattr(tb, "_warm", set())
    layer = ConvLayer(3, 64, 13, 13, 256, 1, 1, 1, 0, 1, 1, True, True)  # a 1x1 shape no other test uses
    x, w, b, r = layer.tensors(torch.float16, "cuda", torch.Generator(device="cuda").manual_seed(3))
    ref = reference_conv_bias_act(x, w, b, r, 1, 0, device="cuda")
    graph = torch.cuda.CUDAGraph()
    with torch.inference_mode():
        with torch.cuda.graph(graph, capture_error_mode="relaxed"):
            y = ops.conv_bias_act(x, w, b, r, backend="triton")
        graph.replay()
    torch.cuda.synchronize()
    assert relative_error(y, ref) <= TOLERANCES[torch.float16]


@pytest.mark.gpu
@needs_tma
def test_gpu_gemm_tma_tile_is_tuned_once_and_remembered(monkeypatch, tmp_path):
    from resnet_fused.backends import triton_backend as tb

    monkeypatch.setenv("RESNET_FUSED_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tb, "_tma_tiles", {})
    layer = ConvLayer(4, 128, 12, 12, 256, 1, 1, 1, 0, 1, 1, True, True)
    x, w, b, r = layer.tensors(torch.bfloat16, "cuda", torch.Generator(device="cuda").manual_seed(4))
    args = (x, w, b, r, [1, 1], [0, 0], [1, 1], 1, True)
    first = tb.gemm_tma(*args)
    assert len(tb._tma_tiles) == 1 and (tmp_path / "triton_tma_tiles.json").exists()
    second = tb.gemm_tma(*args)
    ref = reference_conv_bias_act(x, w, b, r, 1, 0, device="cuda")
    assert relative_error(first, ref) <= TOLERANCES[torch.bfloat16]
    assert relative_error(second, ref) <= TOLERANCES[torch.bfloat16]


@pytest.mark.gpu
def test_gpu_threads_tuning_the_same_new_shape_at_once_are_right(monkeypatch):
    """One model served from several threads: their first calls of a shape tune at the
    same time, through one autotuner object that keeps each call's arguments on itself
    while it times (the backend holds a lock around it)."""
    from concurrent.futures import ThreadPoolExecutor

    from resnet_fused.backends import triton_backend as tb

    monkeypatch.setattr(tb, "AUTOTUNE", True)
    layers = [ConvLayer(2, 32, 11, 11, 96, 3, 3, 1, 1, 1, 1, residual, True) for residual in (False, True)]
    cases = []
    for i, layer in enumerate(layers * 4):
        x, w, b, r = layer.tensors(torch.float16, "cuda", torch.Generator(device="cuda").manual_seed(i))
        cases.append((x, w, b, r, reference_conv_bias_act(x, w, b, r, 1, 1, device="cuda")))
    with ThreadPoolExecutor(len(cases)) as pool:
        outs = list(pool.map(lambda case: tb.implicit_gemm(case[0], case[1], case[2], case[3], [1, 1], [1, 1],
                                                            [1, 1], 1, True), cases))
    torch.cuda.synchronize()
    for out, case in zip(outs, cases):
        assert relative_error(out, case[4]) <= TOLERANCES[torch.float16]


@pytest.mark.parametrize("elem, smem", [(2, 232448), (4, 232448), (4, 166912), (4, 101376), (2, 101376)],
                         ids=["fp16_h100", "fp32_h100", "fp32_a100", "fp32_sm86", "fp16_sm86"])
def test_heuristic_tiles_fit_the_gpus_shared_memory(elem, smem):
    """The tile launched without autotuning must fit: float32's 128x128x64 tile in 4
    stages needs 256 KiB, more than any GPU has (tests/offline_compile.py found it)."""
    from resnet_fused.backends.triton_backend import _operand_bytes, heuristic_config

    for layer, _ in conv_layers("resnet50", 256) + conv_layers("resnext50_32x4d", 1):
        p, q = layer.out_hw
        m, k, c = layer.n * p * q, layer.k // layer.groups, layer.c // layer.groups
        cfg = heuristic_config(m, k, c, layer.r, layer.s, layer.groups, elem, smem)
        b = cfg.kwargs
        assert _operand_bytes(b["BLOCK_M"], b["BLOCK_N"], b["BLOCK_K"], cfg.num_stages, elem) <= smem, (layer, cfg)
        assert cfg.num_stages >= 2 and b["BLOCK_K"] >= 16
        if c < 16 and layer.r > 1:  # the stem and ResNeXt's groups: K tiles no deeper than a filter row's run
            assert b["BLOCK_K"] <= max(32, triton.next_power_of_2(layer.s * -(-c // 4) * 4)), (layer, cfg)
        # where it fits anyway, the tile is the one chosen before sizes were checked
        big = heuristic_config(m, k, c, layer.r, layer.s, layer.groups, elem)
        if _operand_bytes(big.kwargs["BLOCK_M"], big.kwargs["BLOCK_N"], big.kwargs["BLOCK_K"], big.num_stages,
                          elem) <= smem:
            assert (cfg.kwargs, cfg.num_stages, cfg.num_warps) == (big.kwargs, big.num_stages, big.num_warps)


@pytest.fixture
def triton_before_3_7(monkeypatch):
    """The backend module as it behaves on Triton 3.6 (the device image's), whatever Triton is here."""
    from resnet_fused.backends import triton_backend as tb

    monkeypatch.setattr(tb, "TRITON_BEFORE_3_7", True)
    tb.interpreter_problem.cache_clear()
    yield tb
    tb.interpreter_problem.cache_clear()


def test_triton_before_3_7_keeps_float32s_large_1x1_tile_to_one_warpgroup(triton_before_3_7):
    """Triton 3.6's two-warpgroup float32 1x1 kernel has every wgmma serialized by ptxas
    (benchmarks/NOTES.md): its heuristic tile is 4 warps there; 16-bit keeps 8."""
    tb = triton_before_3_7
    m, k, c = 256 * 56 * 56, 256, 64  # layer1's expanding 1x1 at batch 256
    assert tb.heuristic_config(m, k, c, 1, 1, 1, elem=4, smem=232448).num_warps == 4
    assert tb.heuristic_config(m, k, c, 1, 1, 1, elem=2, smem=232448).num_warps == 8
    tb.TRITON_BEFORE_3_7 = False
    assert tb.heuristic_config(m, k, c, 1, 1, 1, elem=4, smem=232448).num_warps == 8


@pytest.mark.skipif(ON_GPU, reason="the interpreter runs CPU tensors")
def test_triton_before_3_7_with_numpy_that_refuses_it_falls_back_and_says_why(triton_before_3_7, gen):
    """Triton < 3.7's interpreter fails inside Triton under NumPy 2.4 (triton#9171): the
    backend says so, and a call asking for it runs a correct fallback instead."""
    import numpy as np

    tb = triton_before_3_7
    try:
        int(np.zeros(1, dtype=np.int32))
        numpy_refuses = False
    except TypeError:
        numpy_refuses = True
    x, weight, bias, res = make_case(gen, 2, 8, 7, 7, 16, 3, 1, 1, 1, 1, torch.float32, True, True)
    if not numpy_refuses:  # NumPy < 2.4: Triton 3.6's interpreter runs here
        assert tb.interpreter_problem() is None
        assert ops.explain(x, weight, None, res, 1, 1, backend="triton").startswith("runs on 'triton'")
        return
    problem = tb.interpreter_problem()
    assert "triton-lang/triton#9171" in problem and np.__version__ in problem
    assert backends.unavailable_reason("triton") == (None if torch.cuda.is_available() else problem)
    text = ops.explain(x, weight, None, res, 1, 1, backend="triton")
    assert not text.startswith("runs on 'triton'") and problem in text
    out = ops.conv_bias_act(x, weight, bias, res, stride=1, padding=1, relu=True, backend="triton")
    ref = reference_conv_bias_act(x, weight, bias, res, 1, 1, 1, 1, True)
    assert relative_error(out, ref) <= tol(torch.float32)
