"""The "native" backend: the compiled extension resnet_fused._C.

On the CPU (CI) its C++ kernels run for real: Winograd F(4x4, 3x3) for stride-1 3x3
float32 NHWC convs (and its hand-off of non-finite calls to oneDNN); oneDNN's conv with
the bias post-op, then add_ and relu_, for the other float32 convs (and bfloat16 where
this CPU has oneDNN kernels for it, else computed in float32); conv + our epilogue pass
for float64; every conv kind, random shapes (hypothesis), opcheck, whole models. The CUDA
kernels are compile-checked here (the library holds sm_80 and sm_90 machine code) and
run under the ``gpu`` marker.
"""
import copy
import os
import re
import shutil
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import resnet_fused
from resnet_fused import backends, ops
from resnet_fused.backends.reference import reads_only_padding
from resnet_fused.bench import conv_layers
from resnet_fused.testing import TOLERANCES, reference_conv_bias_act, relative_error, seeded_torchvision_model

from test_conv_bias_act import CONV_KINDS, make_case

INFO = resnet_fused.extension_info()
#: CI sets this ("cpu" or "cuda") so that an extension that silently did not build fails.
REQUIRED = os.environ.get("RESNET_FUSED_REQUIRE_EXTENSION", "")
ON_GPU = torch.cuda.is_available()

needs_extension = pytest.mark.skipif(INFO["error"] is not None, reason=f"native backend unavailable: {INFO['error']}")
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]

WINOGRAD = "Winograd F(4x4,3x3)"
#: The Winograd kernels are x86-64 AVX2+FMA code; elsewhere those convs take oneDNN.
WINOGRAD_CPU = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
needs_avx2 = pytest.mark.skipif(not WINOGRAD_CPU, reason="the Winograd kernels need an x86-64 CPU with AVX2+FMA")
CONV1X1 = "1x1 conv as one GEMM over the pixels"


@pytest.mark.skipif(not REQUIRED, reason="RESNET_FUSED_REQUIRE_EXTENSION is not set (CI sets it)")
def test_extension_was_built_and_loads():
    assert INFO["built"] and INFO["loaded"] and INFO["error"] is None, INFO
    assert INFO["torch_version"] == torch.__version__
    assert "native" in resnet_fused.available_backends("cpu")
    assert_cpu_kernels_parallel()
    if REQUIRED == "cuda":
        assert INFO["cuda"] is True and INFO["cuda_archs"].split(";") == ["80", "90"], INFO
        assert INFO["cutlass_kernels"].split(";") == ["sm80_128x128", "sm80_64x64", "sm90a_128x128"], INFO


def assert_cpu_kernels_parallel():
    # at::parallel_for is inline: without -fopenmp the Winograd transforms and GEMMs ran on
    # one of the two cores (found by timing 1 vs 2 threads: the same).
    if "ATen parallel backend: OpenMP" in torch.__config__.parallel_info():
        assert INFO["cpu_parallel"] == "OpenMP", INFO


@needs_extension
def test_cpu_kernels_are_built_with_torchs_thread_pool():
    assert_cpu_kernels_parallel()


def _cuobjdump():
    from_triton = os.path.join(os.path.dirname(__import__("triton").__file__), "backends", "nvidia", "bin", "cuobjdump")
    for candidate in (shutil.which("cuobjdump"), os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin",
                                                                   "cuobjdump"), from_triton):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


@needs_extension
@pytest.mark.skipif(not INFO.get("cuda"), reason="this build has no CUDA kernels")
def test_library_holds_machine_code_for_each_arch():
    tool = _cuobjdump()
    if tool is None:
        assert REQUIRED != "cuda", "CI must read the machine code: no cuobjdump found (triton ships one)"
        pytest.skip("no cuobjdump on this machine")
    listing = subprocess.run([tool, "--list-elf", INFO["path"]], capture_output=True, text=True, check=True).stdout
    for arch in INFO["cuda_archs"].split(";"):
        assert f".sm_{arch}." in listing, f"no sm_{arch} cubin in {INFO['path']}:\n{listing}"
    if "sm90a" in INFO["cutlass_kernels"]:
        # the Hopper kernels, 2 dtypes x 2 activations, read from each cubin's ELF header: a
        # cuobjdump older than CUDA 12.9 (Triton 3.6 ships 12.8's) names sm_90a cubins sm_90
        elf = subprocess.run([tool, "--dump-elf", INFO["path"]], capture_output=True, text=True, check=True).stdout
        assert len(re.findall(r"^\s*arch = sm_90a\s*$", elf, re.M)) == 4, listing
    ptx = subprocess.run([tool, "--list-ptx", INFO["path"]], capture_output=True, text=True, check=True).stdout
    assert f"sm_{INFO['cuda_archs'].split(';')[-1]}" in ptx, ptx


@needs_extension
@pytest.mark.skipif(not INFO.get("cuda"), reason="this build has no CUDA kernels")
def test_cutlass_kernels_do_not_spill():
    """Each CUTLASS kernel fits the register file: no local memory (spills) and at most
    255 registers a thread, read from the built library's machine code."""
    tool = _cuobjdump()
    if tool is None:
        assert REQUIRED != "cuda", "CI must read the machine code: no cuobjdump found (triton ships one)"
        pytest.skip("no cuobjdump on this machine")
    usage = subprocess.run([tool, "-res-usage", INFO["path"]], capture_output=True, text=True, check=True).stdout
    kernels = re.findall(r"Function (\S*cutlass\S*):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", usage)
    assert len(kernels) >= 8, usage[:2000]
    for name, regs, stack, local in kernels:
        assert int(local) == 0 and int(stack) == 0 and int(regs) <= 255, (name[:120], regs, stack, local)


def run_native(x, weight, bias, res, s, p, d, g, relu):
    assert ops.explain(x, weight, None, res, s, p, d, g, backend="native").startswith("runs on 'native'")
    return ops.conv_bias_act(x, weight, bias, res, stride=s, padding=p, dilation=d, groups=g, relu=relu,
                             backend="native")


@needs_extension
@pytest.mark.parametrize("kind", CONV_KINDS, ids=[k[0] for k in CONV_KINDS])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("residual", [False, True], ids=["no_residual", "residual"])
@pytest.mark.parametrize("relu", [False, True], ids=["no_relu", "relu"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_cpu_conv_kinds_match_reference(gen, kind, dtype, residual, relu, channels_last):
    _, n, c, h, w, k, r, s, p, d, g = kind
    x, weight, bias, res = make_case(gen, n, c, h, w, k, r, s, p, d, g, dtype, residual, channels_last)
    out = run_native(x, weight, bias, res, s, p, d, g, relu)
    ref = reference_conv_bias_act(x, weight, bias, res, s, p, d, g, relu)
    assert out.dtype == dtype and out.shape == ref.shape
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    assert relative_error(out, ref) <= TOLERANCES[dtype]


@needs_extension
@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(1, 3), c_per_group=st.integers(1, 12), k_per_group=st.integers(1, 12),
    groups=st.sampled_from([1, 2, 3]),
    h=st.integers(1, 13), w=st.integers(1, 13), r=st.integers(1, 5), s=st.integers(1, 5),
    stride=st.tuples(st.integers(1, 3), st.integers(1, 3)), padding=st.tuples(st.integers(0, 3), st.integers(0, 3)),
    dilation=st.tuples(st.integers(1, 3), st.integers(1, 3)), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    residual=st.booleans(), relu=st.booleans(), channels_last=st.booleans(), seed=st.integers(0, 2**31 - 1),
)
def test_cpu_random_shapes_match_reference(n, c_per_group, k_per_group, groups, h, w, r, s, stride, padding, dilation,
                                           dtype, residual, relu, channels_last, seed):
    p = (h + 2 * padding[0] - dilation[0] * (r - 1) - 1) // stride[0] + 1
    q = (w + 2 * padding[1] - dilation[1] * (s - 1) - 1) // stride[1] + 1
    if p < 1 or q < 1:
        return  # an empty output is rejected by the argument checks (tested below)
    gen = torch.Generator().manual_seed(seed)
    c, k = c_per_group * groups, k_per_group * groups
    x = torch.randn(n, c, h, w, generator=gen).to(dtype)
    weight = (torch.randn(k, c_per_group, r, s, generator=gen) / (c_per_group * r * s) ** 0.5).to(dtype)
    bias = torch.randn(k, generator=gen).to(dtype)
    res = torch.randn(n, k, p, q, generator=gen).to(dtype) if residual else None
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    out = run_native(x, weight, bias, res, list(stride), list(padding), list(dilation), groups, relu)
    ref = reference_conv_bias_act(x, weight, bias, res, stride, padding, dilation, groups, relu)
    assert relative_error(out, ref) <= TOLERANCES[dtype]


@needs_extension
def test_cpu_paths_are_explained(gen):
    x, weight, _, res = make_case(gen, 2, 8, 6, 6, 8, 3, 1, 1, 1, 1, torch.float32, True)
    assert "oneDNN conv with the bias as a post-op (weight pre-packed from its second call), then the residual " \
        "add and ReLU (where asked) in place" in ops.explain(x, weight, None, res, padding=1)
    text = ops.explain(x, weight, None, None, padding=1)
    assert "(weight pre-packed from its second call), then ReLU (where asked) in place" in text and "residual" not in text
    if WINOGRAD_CPU:  # our kernels name the residual only where the call has one
        xl, w1 = x.contiguous(memory_format=torch.channels_last), weight[:, :, :1, :1].contiguous()
        for w in (weight, w1):
            with_res = ops.explain(xl, w, None, res, padding=w.shape[-1] // 2, backend="native")
            without = ops.explain(xl, w, None, None, padding=w.shape[-1] // 2, backend="native")
            assert "with bias, residual and ReLU (where asked)" in with_res, with_res
            assert "with bias and ReLU (where asked)" in without and "residual" not in without, without
    x64, w64 = x.double(), weight.double()
    assert "conv then one epilogue pass: oneDNN has no Double convolution" in ops.explain(x64, w64, padding=1)
    text = ops.explain(x.bfloat16(), weight.bfloat16(), padding=1, backend="native")
    assert "oneDNN" in text and text.startswith("runs on 'native'")


#: The packings the cache keeps: oneDNN's (3x3 NCHW), Winograd's (3x3 NHWC), the 1x1 GEMM's.
PACKINGS = pytest.mark.parametrize("channels_last, r, packing", [(False, 3, "oneDNN"), (True, 3, WINOGRAD),
                                                                 (True, 1, CONV1X1)],
                                   ids=["nchw_onednn", "nhwc_winograd", "nhwc_conv1x1"])


@needs_extension
@PACKINGS
def test_cpu_packed_weight_follows_in_place_edits_and_new_tensors(gen, channels_last, r, packing):
    p = r // 2
    x, weight, bias, res = make_case(gen, 2, 8, 7, 7, 16, r, 1, p, 1, 1, torch.float32, True, channels_last)
    if WINOGRAD_CPU:
        assert packing in ops.explain(x, weight, None, res, padding=p, backend="native")
    for _ in range(2):  # the second call is served from the packed-weight cache
        out = ops.conv_bias_act(x, weight, bias, res, padding=p, backend="native")
        assert relative_error(out, reference_conv_bias_act(x, weight, bias, res, 1, p)) <= 1e-5
    with torch.no_grad():
        weight.mul_(-2.0)  # bumps the version counter: the packed copy is stale
    out = ops.conv_bias_act(x, weight, bias, res, padding=p, backend="native")
    assert relative_error(out, reference_conv_bias_act(x, weight, bias, res, 1, p)) <= 1e-5
    for _ in range(3):  # fresh weights, possibly at a recycled address, version 0 again
        weight = torch.randn(16, 8, r, r, generator=gen)
        out = ops.conv_bias_act(x, weight, bias, res, padding=p, backend="native")
        assert relative_error(out, reference_conv_bias_act(x, weight, bias, res, 1, p)) <= 1e-5
    weight.data = torch.randn(16, 8, r, r, generator=gen)  # same tensor and version, new storage
    out = ops.conv_bias_act(x, weight, bias, res, padding=p, backend="native")
    assert relative_error(out, reference_conv_bias_act(x, weight, bias, res, 1, p)) <= 1e-5


@needs_extension
@PACKINGS
def test_cpu_packed_weight_refold_after_an_edit_through_data(gen, channels_last, r, packing):
    """An edit through ``.data`` bumps no version counter the cache could see; refold()
    empties the cache (documented), after which the op packs the weight again."""
    p = r // 2
    x, weight, bias, res = make_case(gen, 2, 8, 7, 7, 16, r, 1, p, 1, 1, torch.float32, True, channels_last)
    ops.conv_bias_act(x, weight, bias, res, padding=p, backend="native")  # packed and cached
    weight.data.mul_(-2.0)
    assert resnet_fused.refold() >= 1
    out = ops.conv_bias_act(x, weight, bias, res, padding=p, backend="native")
    assert relative_error(out, reference_conv_bias_act(x, weight, bias, res, 1, p)) <= 1e-5
    assert resnet_fused.refold() >= 1 and resnet_fused.refold() == 0


@needs_extension
@PACKINGS
def test_cpu_inference_mode_weights_are_correct(gen, channels_last, r, packing):
    """Inference tensors keep no version counter; the op packs such a weight per call."""
    p = r // 2
    x, weight, bias, res = make_case(gen, 2, 8, 7, 7, 16, r, 1, p, 1, 1, torch.float32, True, channels_last)
    with torch.inference_mode():
        w = weight.clone()
        first = ops.conv_bias_act(x, w, bias, res, padding=p, backend="native")
        w.mul_(-1.0)  # in place, no version bump
        second = ops.conv_bias_act(x, w, bias, res, padding=p, backend="native")
    assert relative_error(first, reference_conv_bias_act(x, weight, bias, res, 1, p)) <= 1e-5
    assert relative_error(second, reference_conv_bias_act(x, -weight, bias, res, 1, p)) <= 1e-5


def _onednn_packs(fn) -> int:
    """How many times ``fn()`` packed a weight into oneDNN's blocked layout."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.name == "aten::mkldnn_reorder_conv2d_weight" for e in prof.events())


@needs_extension
def test_cpu_onednn_packs_a_weight_from_its_second_call(gen):
    """oneDNN's blocked copy of a weight pays off only when the weight comes back: a
    weight's first call runs on the plain weight, its second packs it, later ones reuse
    it; a weight new on every call (a fold under torch.compile without freezing) or an
    inference tensor is never packed. Every call against float64."""
    x, weight, bias, res = make_case(gen, 2, 8, 9, 9, 16, 3, 2, 1, 1, 1, torch.float32, True, True)
    assert "oneDNN" in ops.explain(x, weight, bias, res, stride=2, padding=1, backend="native")
    ref = reference_conv_bias_act(x, weight, bias, res, 2, 1)

    def call(w):
        out = ops.conv_bias_act(x, w, bias, res, stride=2, padding=1, backend="native")
        assert relative_error(out, ref) <= 1e-5
        return out

    assert [_onednn_packs(lambda: call(weight)) for _ in range(4)] == [0, 1, 0, 0]
    with torch.no_grad():
        weight.mul_(1.0)  # a new version: first call again
    assert [_onednn_packs(lambda: call(weight)) for _ in range(3)] == [0, 1, 0]
    assert [_onednn_packs(lambda: call(weight.clone())) for _ in range(3)] == [0, 0, 0]
    with torch.inference_mode():
        frozen = weight.clone()
        assert [_onednn_packs(lambda: call(frozen)) for _ in range(3)] == [0, 0, 0]


@needs_extension
@pytest.mark.slow
@pytest.mark.parametrize("freezing", [False, True], ids=["no_freezing", "freezing"])
def test_cpu_torch_compile_of_a_fused_model_runs_the_native_kernels(freezing, gen):
    """torch.compile(fullgraph=True) of a fused ResNet keeps our op in its graph, and its
    answers. Without Inductor's freezing the graph folds the BatchNorms on every call into
    buffers it reuses from conv to conv, rewritten with no version bump: a packed copy is
    checked against the weight's values (a stale one gave relative error 0.95). With
    freezing the folds are constants, packed once: later calls copy and pack no weight."""
    tv_model = seeded_torchvision_model("resnet18", seed=11, calibration_size=8)
    fused = resnet_fused.resnet18(backend="native")
    fused.load_state_dict(tv_model.state_dict())
    fused.eval()
    weight_shapes = {tuple(p.shape) for p in fused.parameters() if p.dim() == 4}
    x = torch.randn(2, 3, 32, 32, generator=gen)
    ref = copy.deepcopy(tv_model).double()(x.double())
    torch._dynamo.reset()
    with torch._inductor.config.patch(freezing=freezing), torch.no_grad():
        compiled = torch.compile(fused, fullgraph=True)
        outs = [compiled(x) for _ in range(3)]  # (the frozen constants: noted, then packed)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
            outs.append(compiled(x))
    for out in outs:
        assert relative_error(out, ref) <= TOLERANCES[torch.float32]
    events = prof.events()
    assert sum(e.name == "resnet_fused::native_conv_bias_act" for e in events) == 20  # every conv, ours
    packs = sum(e.name == "aten::mkldnn_reorder_conv2d_weight" for e in events)
    weight_copies = [e.name for e in events if e.name in ("aten::copy_", "aten::clone")
                     and e.input_shapes and tuple(e.input_shapes[0]) in weight_shapes]
    if freezing:
        assert packs == 0 and weight_copies == [], (packs, weight_copies)
    else:
        assert weight_copies, "the graph folds on every call: its new weights are copied and packed again"


@needs_extension
@PACKINGS
def test_cpu_check_packed_serves_no_stale_copy(gen, channels_last, r, packing):
    """The op's ``check_packed`` (True for calls from a compiled graph): a weight whose
    values changed with no version bump (as Inductor rewrites a reused buffer; here
    through ``.data``) is packed again, not served from its old copy."""
    p = r // 2
    x, weight, bias, res = make_case(gen, 2, 8, 7, 7, 16, r, 1, p, 1, 1, torch.float32, True, channels_last)
    args = (bias, res, [1, 1], [p, p], [1, 1], 1, True, "native")
    for _ in range(3):  # packed (oneDNN's on the second call), then served
        out = torch.ops.resnet_fused.conv_bias_act(x, weight, *args, True)
        assert relative_error(out, reference_conv_bias_act(x, weight, bias, res, 1, p)) <= 1e-5
    version = weight._version
    weight.data.copy_(torch.randn(weight.shape, generator=gen))
    assert weight._version == version
    for _ in range(2):
        out = torch.ops.resnet_fused.conv_bias_act(x, weight, *args, True)
        assert relative_error(out, reference_conv_bias_act(x, weight, bias, res, 1, p)) <= 1e-5
    # an entry made under the check is checked for an eager (unchecked) call too: a graph's
    # buffer can reach eager code; and the out= op checks as the functional one does
    weight.data.copy_(torch.randn(weight.shape, generator=gen))
    out = ops.conv_bias_act(x, weight, bias, res, padding=p, backend="native")
    assert relative_error(out, reference_conv_bias_act(x, weight, bias, res, 1, p)) <= 1e-5
    for _ in range(3):
        torch.ops.resnet_fused.conv_bias_act(x, weight, *args, True)
    weight.data.copy_(torch.randn(weight.shape, generator=gen))
    out = torch.empty_like(out)
    torch.ops.resnet_fused.conv_bias_act_out(x, weight, *args, out, True)
    assert relative_error(out, reference_conv_bias_act(x, weight, bias, res, 1, p)) <= 1e-5


@needs_extension
def test_packed_weights_checked_restores_the_setting():
    """The check is on inside ``packed_weights_checked`` only, also when the call raises."""
    native = backends.get("native")
    assert native.check_packed_weights(False) is False  # off outside
    with backends.packed_weights_checked(native):
        assert native.check_packed_weights(True) is True
    assert native.check_packed_weights(False) is False
    with pytest.raises(ZeroDivisionError):
        with backends.packed_weights_checked(native):
            1 / 0
    assert native.check_packed_weights(False) is False
    x, weight = torch.randn(1, 4, 5, 5), torch.randn(4, 4, 3, 3)
    with pytest.raises(ValueError):  # a refused call through the op leaves it off too
        torch.ops.resnet_fused.conv_bias_act(x, weight, torch.randn(3), None, [1, 1], [1, 1], [1, 1], 1, True,
                                             "native")
    assert native.check_packed_weights(False) is False


@needs_extension
def test_cpu_fused_model_under_inference_mode_follows_weight_edits(gen):
    tv_model = seeded_torchvision_model("resnet18", seed=2, calibration_size=8)
    fused = resnet_fused.fuse(tv_model, backend="native")
    x = torch.randn(2, 3, 32, 32, generator=gen)
    with torch.inference_mode():
        before = fused(x)
    with torch.no_grad():
        fused.layer1[0].conv1.weight.mul_(0.5)
        tv_model.layer1[0].conv1.weight.mul_(0.5)
    with torch.inference_mode():
        after = fused(x)
        ref = copy.deepcopy(tv_model).double()(x.double())
    assert relative_error(after, ref) <= 1e-5 and relative_error(before, ref) > 1e-3


@needs_extension
def test_cpu_nan_reaches_the_output(gen):
    """NaN propagates through conv + bias + residual? + ReLU as through torch.relu (oneDNN's
    ReLU post-op would map it to 0), and through a whole fused ResNet."""
    x, weight, bias, res = make_case(gen, 1, 8, 5, 5, 8, 3, 1, 1, 1, 1, torch.float32, True)
    x[0, :, 2, 2] = float("nan")
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        for r in (res, None):
            out = ops.conv_bias_act(x.to(dtype), weight.to(dtype), bias.to(dtype), None if r is None else r.to(dtype),
                                    padding=1, backend="native")
            ref = reference_conv_bias_act(x, weight, bias, r, 1, 1)
            assert ref.isnan().any() and torch.equal(out.isnan(), ref.isnan()), dtype
    tv_model = seeded_torchvision_model("resnet18", seed=3, calibration_size=8)
    fused = resnet_fused.fuse(tv_model, backend="native")
    images = torch.randn(3, 3, 32, 32, generator=gen)
    images[1, :, 5, 7] = float("nan")
    with torch.no_grad():
        assert torch.equal(fused(images).isnan().any(1), tv_model(images).isnan().any(1))


# ---- Winograd F(4x4, 3x3) and F(2x2, 3x3): stride-1 3x3 convs in float32 NHWC --------------------------



@pytest.fixture(params=[4, 2], ids=["f4x4", "f2x2"])
def winograd_tile(request, monkeypatch):
    """Both Winograd tiles (RESNET_FUSED_CPU_WINOGRAD_TILE); the fixture's value is the
    tile's side."""
    monkeypatch.setenv("RESNET_FUSED_CPU_WINOGRAD_TILE", str(request.param))
    return request.param


def _winograd_name(tile):
    return f"Winograd F({tile}x{tile},3x3)"


def _winograd_case(gen, n, c, k, h, w, padding, residual=True, bias=True):
    x, weight, b, res = make_case(gen, n, c, h, w, k, 3, 1, padding, 1, 1, torch.float32, residual,
                                  channels_last=True)
    return x, weight, b if bias else None, res


@needs_extension
@needs_avx2
@pytest.mark.parametrize("n, c, k, h, w, padding", [
    (2, 8, 16, 9, 9, 1),
    (1, 24, 8, 5, 7, 1),
    (3, 16, 16, 4, 4, 1),
    (2, 8, 8, 11, 6, 0),
    (1, 8, 8, 6, 6, 2),
    (1, 16, 8, 2, 3, 1),
    (1, 8, 24, 7, 9, 1),
    (2, 64, 64, 20, 20, 1),
    (1, 40, 24, 9, 9, 1),
    (1, 192, 168, 6, 10, 1),
    (1, 200, 168, 6, 6, 1),
], ids=["partial_edge_tiles", "odd_hw_three_channel_lanes", "one_tile_per_image", "no_padding", "padding_2",
        "tiny_image", "k_16_plus_8", "several_blocks_per_thread", "channel_blocks_32_plus_8",
        "u_over_4mib_shared_blocks", "shared_blocks_channels_64x3_plus_8"])
@pytest.mark.parametrize("residual", [False, True], ids=["no_residual", "residual"])
@pytest.mark.parametrize("relu", [False, True], ids=["no_relu", "relu"])
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
def test_cpu_winograd_matches_reference(gen, winograd_tile, n, c, k, h, w, padding, residual, relu, bias):
    x, weight, b, res = _winograd_case(gen, n, c, k, h, w, padding, residual, bias)
    assert _winograd_name(winograd_tile) in ops.explain(x, weight, None, res, padding=padding, backend="native")
    out = run_native(x, weight, b, res, 1, padding, 1, 1, relu)
    ref = reference_conv_bias_act(x, weight, b, res, 1, padding, 1, 1, relu)
    assert out.shape == ref.shape and out.is_contiguous(memory_format=torch.channels_last)
    assert relative_error(out, ref) <= TOLERANCES[torch.float32]


@needs_extension
@needs_avx2
@pytest.mark.parametrize("n, c, h", [(2, 64, 56), (2, 128, 28), (2, 256, 14), (8, 512, 7)],
                         ids=["layer1", "layer2", "layer3", "layer4"])
def test_cpu_winograd_error_stays_near_the_direct_convs(gen, winograd_tile, n, c, h):
    """On ResNet-50's 3x3 shapes Winograd's float32 error against float64 stays within
    2.2x that of torch's own (oneDNN, direct) conv on the same input for F(4x4), and below
    it for F(2x2) (measured 0.24-0.47x). Summing the channels in one long float32 run per
    GEMM gave F(4x4) 2.5x at layer1 and layer2 (1.7x at layer3), and doubled the whole
    network's error: see kChannelBlock in winograd.cpp."""
    x, weight, _, _ = _winograd_case(gen, n, c, c, h, h, 1, residual=False, bias=False)
    assert _winograd_name(winograd_tile) in ops.explain(x, weight, None, None, padding=1, backend="native")
    ref = reference_conv_bias_act(x, weight, None, None, 1, 1, 1, 1, False)
    ours = relative_error(run_native(x, weight, None, None, 1, 1, 1, 1, False), ref)
    direct = relative_error(F.conv2d(x, weight, padding=1), ref)
    assert ours <= (2.2 if winograd_tile == 4 else 0.7) * direct, (ours, direct)


@needs_extension
@needs_avx2
@pytest.mark.slow
def test_cpu_winograd_spans_several_workspace_blocks(gen):
    """441 tiles of 512 -> 64 channels need two blocks of the 32 MiB workspace (U is
    4.7 MB: the shared blocks)."""
    x, weight, b, res = _winograd_case(gen, 1, 512, 64, 84, 84, 1)
    out = run_native(x, weight, b, res, 1, 1, 1, 1, True)
    assert relative_error(out, reference_conv_bias_act(x, weight, b, res, 1, 1, 1, 1, True)) <= 1e-5


@needs_extension
@needs_avx2
@pytest.mark.parametrize("change, why", [
    (dict(channels_last=False), "input not channels_last"),
    (dict(c=12), "12 input and 16 output channels (needs multiples of 8)"),
    (dict(k=20), "16 input and 20 output channels (needs multiples of 8)"),
    (dict(stride=2), "stride 2x2, dilation 1x1, groups 1"),
    (dict(dilation=2, padding=2), "stride 1x1, dilation 2x2, groups 1"),
    (dict(groups=2), "stride 1x1, dilation 1x1, groups 2"),
    (dict(knob="0"), "RESNET_FUSED_CPU_WINOGRAD=0"),
    (dict(c=512, k=512, h=8), "8 tiles of 4x4 outputs for 36864 KiB of transformed weight (needs at most 2048 KiB a "
                         "tile: with fewer tiles the direct conv is faster)"),
    (dict(c=512, k=512, h=4, tile="2"), "8 tiles of 2x2 outputs for 16384 KiB of transformed weight (needs at most "
                                        "512 KiB a tile: with fewer tiles the direct conv is faster)"),
], ids=["nchw", "odd_c", "odd_k", "stride_2", "dilation_2", "groups_2", "knob_off", "few_tiles_for_a_big_weight",
        "few_2x2_tiles_for_a_big_weight"])
def test_cpu_winograd_refusals_are_explained_and_still_correct(gen, monkeypatch, change, why):
    a = dict(c=16, k=16, h=9, stride=1, padding=1, dilation=1, groups=1, channels_last=True, knob=None,
             tile=None) | change
    if a["knob"] is not None:
        monkeypatch.setenv("RESNET_FUSED_CPU_WINOGRAD", a["knob"])
    if a["tile"] is not None:
        monkeypatch.setenv("RESNET_FUSED_CPU_WINOGRAD_TILE", a["tile"])
    x, weight, b, res = make_case(gen, 2, a["c"], a["h"], a["h"], a["k"], 3, a["stride"], a["padding"], a["dilation"],
                                  a["groups"], torch.float32, True, a["channels_last"])
    text = ops.explain(x, weight, None, res, a["stride"], a["padding"], a["dilation"], a["groups"], backend="native")
    assert "oneDNN conv" in text and f"(not Winograd: {why}" in text, text
    out = run_native(x, weight, b, res, a["stride"], a["padding"], a["dilation"], a["groups"], True)
    ref = reference_conv_bias_act(x, weight, b, res, a["stride"], a["padding"], a["dilation"], a["groups"], True)
    assert relative_error(out, ref) <= 1e-5


@needs_extension
@needs_avx2
def test_cpu_winograd_tiles_keep_their_own_packed_weights(gen, monkeypatch):
    """One weight, the tile switched between calls: each tile transforms the weight its
    own way (36 or 16 points), so neither may be served the other's."""
    x, weight, b, res = _winograd_case(gen, 2, 16, 24, 10, 10, 1)
    ref = reference_conv_bias_act(x, weight, b, res, 1, 1)
    for tile in ("4", "2", "4", "2"):
        monkeypatch.setenv("RESNET_FUSED_CPU_WINOGRAD_TILE", tile)
        assert _winograd_name(tile) in ops.explain(x, weight, None, res, padding=1, backend="native")
        out = ops.conv_bias_act(x, weight, b, res, padding=1, backend="native")
        assert relative_error(out, ref) <= TOLERANCES[torch.float32]


@needs_extension
@needs_avx2
def test_cpu_winograd_knob_rejects_unknown_values(gen, monkeypatch):
    x, weight, b, res = _winograd_case(gen, 1, 8, 8, 6, 6, 1)
    monkeypatch.setenv("RESNET_FUSED_CPU_WINOGRAD", "yes")
    with pytest.raises(RuntimeError, match=r"RESNET_FUSED_CPU_WINOGRAD should be 0 \(off\) or 1 .* got 'yes'"):
        ops.conv_bias_act(x, weight, b, res, padding=1, backend="native")
    monkeypatch.setenv("RESNET_FUSED_CPU_WINOGRAD", "1")
    assert WINOGRAD in ops.explain(x, weight, None, res, padding=1, backend="native")
    monkeypatch.setenv("RESNET_FUSED_CPU_WINOGRAD_TILE", "3")
    for switch in ("1", "0"):  # a bad tile is an error whether or not Winograd is on
        monkeypatch.setenv("RESNET_FUSED_CPU_WINOGRAD", switch)
        with pytest.raises(RuntimeError, match=r"RESNET_FUSED_CPU_WINOGRAD_TILE should be 4 .* or 2 .* got '3'"):
            ops.conv_bias_act(x, weight, b, res, padding=1, backend="native")


@needs_extension
@needs_avx2
@pytest.mark.parametrize("poison", ["nan_input", "inf_input", "huge_input", "nan_weight", "inf_weight"])
@pytest.mark.parametrize("c, k", [(8, 8), (192, 168)], ids=["own_blocks", "shared_blocks"])
def test_cpu_winograd_hands_non_finite_calls_to_a_direct_conv(gen, monkeypatch, winograd_tile, poison, c, k):
    """Winograd would spread one NaN/Inf over whole tiles, and a value near float32's
    limit overflows inside F(4x4)'s transforms where a direct conv stays finite: such
    calls are recomputed by oneDNN, so the result is the direct conv's, bit for bit. (Both
    ways of blocking the tiles: per thread for U up to 4 MiB, shared above.) F(2x2)'s
    transforms (sums of two or three values, halves) keep that value finite: its own
    answer then stands."""
    x, weight, b, res = _winograd_case(gen, 2, c, k, 9, 9, 1)
    where, what = poison.split("_")
    target = x if what == "input" else weight
    target[(0, 3, 4, 4) if what == "input" else (3, 2, 1, 1)] = {"nan": float("nan"), "inf": float("inf"),
                                                             "huge": 1e38}[where]
    assert _winograd_name(winograd_tile) in ops.explain(x, weight, None, res, padding=1, backend="native")
    out = ops.conv_bias_act(x, weight, b, res, padding=1, backend="native")
    if where == "huge" and winograd_tile == 2:
        ref = reference_conv_bias_act(x, weight, b, res, 1, 1)
        assert out.isfinite().all() and relative_error(out, ref) <= TOLERANCES[torch.float32]
        return
    monkeypatch.setenv("RESNET_FUSED_CPU_WINOGRAD", "0")
    direct = ops.conv_bias_act(x, weight, b, res, padding=1, backend="native")
    assert torch.equal(out.isnan(), direct.isnan()) and torch.equal(out.isinf(), direct.isinf())
    assert torch.equal(out.nan_to_num(), direct.nan_to_num())
    ref = reference_conv_bias_act(x, weight, b, res, 1, 1)
    assert torch.equal(out.isnan(), ref.isnan())
    if where != "huge":  # some outputs, not all, are NaN or Inf
        assert (~out.isfinite()).any() and out.isfinite().any()


@needs_extension
@needs_avx2
@pytest.mark.parametrize("poison", ["residual", "bias"])
def test_cpu_winograd_keeps_nan_from_the_epilogue_inputs_in_place(gen, winograd_tile, poison):
    """A NaN in the residual or bias is added after the transforms: it stays on its pixel
    (or channel) and survives the ReLU, as in torch."""
    x, weight, b, res = _winograd_case(gen, 2, 8, 16, 9, 9, 1)
    if poison == "residual":
        res[1, 5, 2, 7] = float("nan")
    else:
        b[11] = float("nan")
    out = run_native(x, weight, b, res, 1, 1, 1, 1, True)
    ref = reference_conv_bias_act(x, weight, b, res, 1, 1, 1, 1, True)
    assert ref.isnan().any() and torch.equal(out.isnan(), ref.isnan())
    assert relative_error(out.nan_to_num(), ref.nan_to_num()) <= 1e-5


@needs_extension
@needs_avx2
def test_cpu_winograd_opcheck(gen, winograd_tile):
    x, weight, b, res = _winograd_case(gen, 2, 8, 16, 7, 7, 1)
    assert _winograd_name(winograd_tile) in ops.explain(x, weight, None, res, padding=1, backend="native")
    torch.library.opcheck(torch.ops.resnet_fused.native_conv_bias_act.default,
                          (x, weight, b, res, [1, 1], [1, 1], [1, 1], 1, True))


# ---- 1x1 stride-1 convs as one GEMM over the pixels, float32 NHWC --------------------


def _conv1x1_case(gen, n, c, k, h, w, residual=True, bias=True):
    x, weight, b, res = make_case(gen, n, c, h, w, k, 1, 1, 0, 1, 1, torch.float32, residual, channels_last=True)
    return x, weight, b if bias else None, res


@needs_extension
@needs_avx2
@pytest.mark.parametrize("n, c, k, h, w", [
    (2, 64, 256, 7, 7),
    (1, 3, 8, 2, 2),
    (3, 24, 24, 5, 4),
    (1, 64, 64, 1, 2),
    (2, 16, 8, 6, 6),
], ids=["blocks_and_a_short_row_group", "fewer_pixels_than_a_row_group", "k_16_plus_8", "two_pixels", "k_8"])
@pytest.mark.parametrize("residual", [False, True], ids=["no_residual", "residual"])
@pytest.mark.parametrize("relu", [False, True], ids=["no_relu", "relu"])
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
def test_cpu_conv1x1_matches_reference(gen, n, c, k, h, w, residual, relu, bias):
    x, weight, b, res = _conv1x1_case(gen, n, c, k, h, w, residual, bias)
    assert CONV1X1 in ops.explain(x, weight, None, res, backend="native")
    out = run_native(x, weight, b, res, 1, 0, 1, 1, relu)
    ref = reference_conv_bias_act(x, weight, b, res, 1, 0, 1, 1, relu)
    assert out.shape == ref.shape and out.is_contiguous(memory_format=torch.channels_last)
    assert relative_error(out, ref) <= TOLERANCES[torch.float32]


@needs_extension
@needs_avx2
@pytest.mark.parametrize("change, why", [
    (dict(channels_last=False), "input not channels_last"),
    (dict(k=12), "12 output channels (needs a multiple of 8)"),
    (dict(c=256, k=128), "256 -> 128 channels (128 KiB of weight; the GEMM without cache blocking is for at "
                         "most 64 KiB, oneDNN is faster above)"),
    (dict(stride=2), "not a 1x1 stride-1 unpadded ungrouped conv"),
    (dict(padding=1), "not a 1x1 stride-1 unpadded ungrouped conv"),
    (dict(groups=2), "not a 1x1 stride-1 unpadded ungrouped conv"),
    (dict(knob="0"), "RESNET_FUSED_CPU_CONV1X1=0"),
], ids=["nchw", "odd_k", "large_weight", "stride_2", "padding_1", "groups_2", "knob_off"])
def test_cpu_conv1x1_refusals_are_explained_and_still_correct(gen, monkeypatch, change, why):
    a = dict(c=16, k=16, stride=1, padding=0, groups=1, channels_last=True, knob=None) | change
    if a["knob"] is not None:
        monkeypatch.setenv("RESNET_FUSED_CPU_CONV1X1", a["knob"])
    x, weight, b, res = make_case(gen, 2, a["c"], 9, 9, a["k"], 1, a["stride"], a["padding"], 1, a["groups"],
                                  torch.float32, True, a["channels_last"])
    text = ops.explain(x, weight, None, res, a["stride"], a["padding"], 1, a["groups"], backend="native")
    assert "oneDNN conv" in text and f"(not the 1x1 GEMM: {why}" in text, text
    out = run_native(x, weight, b, res, a["stride"], a["padding"], 1, a["groups"], True)
    ref = reference_conv_bias_act(x, weight, b, res, a["stride"], a["padding"], 1, a["groups"], True)
    assert relative_error(out, ref) <= 1e-5


@needs_extension
@needs_avx2
def test_cpu_conv1x1_knob_rejects_unknown_values(gen, monkeypatch):
    x, weight, b, res = _conv1x1_case(gen, 1, 8, 8, 6, 6)
    monkeypatch.setenv("RESNET_FUSED_CPU_CONV1X1", "on")
    with pytest.raises(RuntimeError, match=r"RESNET_FUSED_CPU_CONV1X1 should be 0 \(off\) or 1 .* got 'on'"):
        ops.conv_bias_act(x, weight, b, res, backend="native")


@needs_extension
@needs_avx2
@pytest.mark.parametrize("poison", ["nan_input", "inf_input", "nan_weight", "inf_weight", "nan_residual",
                                    "nan_bias"])
def test_cpu_conv1x1_keeps_non_finite_values_where_a_direct_conv_puts_them(gen, monkeypatch, poison):
    x, weight, b, res = _conv1x1_case(gen, 2, 16, 24, 5, 5)
    what, where = poison.split("_")
    target = {"input": x, "weight": weight, "residual": res, "bias": b}[where]
    index = {"input": (1, 3, 2, 4), "weight": (5, 7, 0, 0), "residual": (0, 9, 1, 1), "bias": (11,)}[where]
    target[index] = float(what)
    assert CONV1X1 in ops.explain(x, weight, None, res, backend="native")
    out = ops.conv_bias_act(x, weight, b, res, backend="native")
    ref = reference_conv_bias_act(x, weight, b, res, 1, 0)
    assert torch.equal(out.isnan(), ref.isnan()) and torch.equal(out.isinf(), ref.isinf())
    assert (~out.isfinite()).any() and out.isfinite().any()
    monkeypatch.setenv("RESNET_FUSED_CPU_CONV1X1", "0")
    direct = ops.conv_bias_act(x, weight, b, res, backend="native")
    assert torch.equal(out.isnan(), direct.isnan()) and torch.equal(out.isinf(), direct.isinf())
    assert relative_error(out.nan_to_num(0.0, 0.0, 0.0), direct.nan_to_num(0.0, 0.0, 0.0)) <= 1e-5


# ---- grouped convs with 4 channels per group, float32 NHWC (ResNeXt's first stage) -----

GROUPED = "grouped conv with 4 channels per group as a direct AVX2 conv"


def _grouped_case(gen, n, groups, h, w, r, stride, padding, dilation, residual=True, bias=True):
    x, weight, b, res = make_case(gen, n, 4 * groups, h, w, 4 * groups, r, stride, padding, dilation, groups,
                                  torch.float32, residual, channels_last=True)
    return x, weight, b if bias else None, res


@needs_extension
@needs_avx2
@pytest.mark.parametrize("n, groups, h, w, r, stride, padding, dilation", [
    (2, 32, 9, 9, 3, 1, 1, 1),
    (2, 4, 11, 9, 3, 2, 1, 1),
    (1, 6, 10, 13, 3, 1, 2, 2),
    (1, 2, 8, 9, 3, 1, 0, 1),
    (1, 2, 3, 40, 3, 1, 1, 1),
    (1, 4, 9, 9, 5, 1, 2, 1),
    (2, 2, 2, 2, 3, 1, 1, 1),
    (1, 2, 7, 12, 1, 3, 0, 1),
], ids=["resnext_128_channels", "stride_2_odd", "dilation_2", "no_padding", "tiles_of_7_4_and_1",
        "5x5", "map_smaller_than_taps", "1x1_stride_3"])
@pytest.mark.parametrize("residual", [False, True], ids=["no_residual", "residual"])
@pytest.mark.parametrize("relu", [False, True], ids=["no_relu", "relu"])
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
def test_cpu_grouped_matches_reference(gen, n, groups, h, w, r, stride, padding, dilation, residual, relu, bias):
    x, weight, b, res = _grouped_case(gen, n, groups, h, w, r, stride, padding, dilation, residual, bias)
    assert GROUPED in ops.explain(x, weight, None, res, stride, padding, dilation, groups, backend="native")
    out = run_native(x, weight, b, res, stride, padding, dilation, groups, relu)
    ref = reference_conv_bias_act(x, weight, b, res, stride, padding, dilation, groups, relu)
    assert out.shape == ref.shape and out.is_contiguous(memory_format=torch.channels_last)
    assert relative_error(out, ref) <= TOLERANCES[torch.float32]


@needs_extension
@needs_avx2
@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(1, 3), groups=st.sampled_from([2, 4, 6]), h=st.integers(1, 16), w=st.integers(1, 24),
    r=st.integers(1, 5), s=st.integers(1, 5), stride=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    padding=st.tuples(st.integers(0, 3), st.integers(0, 3)), dilation=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    residual=st.booleans(), relu=st.booleans(), seed=st.integers(0, 2**31 - 1),
)
def test_cpu_grouped_random_shapes_match_reference(n, groups, h, w, r, s, stride, padding, dilation, residual, relu,
                                                   seed):
    p = (h + 2 * padding[0] - dilation[0] * (r - 1) - 1) // stride[0] + 1
    q = (w + 2 * padding[1] - dilation[1] * (s - 1) - 1) // stride[1] + 1
    if p < 1 or q < 1 or h * w == 1:
        return  # an empty output is rejected by the argument checks; a 1x1 map is NCHW too
    gen = torch.Generator().manual_seed(seed)
    c = 4 * groups
    x = torch.randn(n, c, h, w, generator=gen).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(c, 4, r, s, generator=gen) / (4 * r * s) ** 0.5
    bias = torch.randn(c, generator=gen)
    res = torch.randn(n, c, p, q, generator=gen) if residual else None
    text = ops.explain(x, weight, None, res, list(stride), list(padding), list(dilation), groups, backend="native")
    # (a conv that reads only padding needs no conv at all: test_a_conv_that_reads_only_padding)
    padding_only = reads_only_padding((h, w), (r, s), stride, padding, dilation)
    assert ("no conv: every output pixel's taps lie in the zero padding" if padding_only else GROUPED) in text, text
    out = run_native(x, weight, bias, res, list(stride), list(padding), list(dilation), groups, relu)
    ref = reference_conv_bias_act(x, weight, bias, res, stride, padding, dilation, groups, relu)
    assert relative_error(out, ref) <= TOLERANCES[torch.float32]


@needs_extension
@needs_avx2
@pytest.mark.parametrize("change, why", [
    (dict(channels_last=False), "input not channels_last"),
    (dict(k=32), "4 input and 8 output channels per group, 32 in all"),
    (dict(c=12, k=12, groups=3), "4 input and 4 output channels per group, 12 in all (the grouped kernel takes 4 "
                                 "and 4, an even number of groups)"),
    (dict(knob="0"), "RESNET_FUSED_CPU_GROUPED=0"),
], ids=["nchw", "8_outputs_per_group", "odd_groups", "knob_off"])
def test_cpu_grouped_refusals_are_explained_and_still_correct(gen, monkeypatch, change, why):
    a = dict(c=16, k=16, groups=4, channels_last=True, knob=None) | change
    if a["knob"] is not None:
        monkeypatch.setenv("RESNET_FUSED_CPU_GROUPED", a["knob"])
    x, weight, b, res = make_case(gen, 2, a["c"], 9, 9, a["k"], 3, 1, 1, 1, a["groups"], torch.float32, True,
                                  a["channels_last"])
    text = ops.explain(x, weight, None, res, 1, 1, 1, a["groups"], backend="native")
    assert "oneDNN conv" in text and f"(not the grouped kernel: {why}" in text, text
    out = run_native(x, weight, b, res, 1, 1, 1, a["groups"], True)
    assert relative_error(out, reference_conv_bias_act(x, weight, b, res, 1, 1, 1, a["groups"], True)) <= 1e-5


@needs_extension
@needs_avx2
def test_cpu_grouped_knob_rejects_unknown_values(gen, monkeypatch):
    x, weight, b, res = _grouped_case(gen, 1, 2, 6, 6, 3, 1, 1, 1)
    monkeypatch.setenv("RESNET_FUSED_CPU_GROUPED", "yes")
    with pytest.raises(RuntimeError, match=r"RESNET_FUSED_CPU_GROUPED should be 0 \(off\) or 1 .* got 'yes'"):
        ops.conv_bias_act(x, weight, b, res, padding=1, groups=2, backend="native")


@needs_extension
@needs_avx2
@pytest.mark.parametrize("poison", ["nan_input", "inf_input", "nan_residual", "nan_bias", "nan_input_at_the_edge"])
def test_cpu_grouped_keeps_non_finite_values_where_a_direct_conv_puts_them(gen, monkeypatch, poison):
    x, weight, b, res = _grouped_case(gen, 2, 4, 9, 10, 3, 1, 1, 1)
    what, where = poison.split("_")[:2]
    target = {"input": x, "residual": res, "bias": b}[where]
    index = {"input": (1, 3, 2, 4), "residual": (0, 9, 1, 1), "bias": (11,)}[where]
    if poison.endswith("edge"):
        index = (0, 13, 8, 9)
    target[index] = float(what)
    assert GROUPED in ops.explain(x, weight, None, res, padding=1, groups=4, backend="native")
    out = ops.conv_bias_act(x, weight, b, res, padding=1, groups=4, backend="native")
    ref = reference_conv_bias_act(x, weight, b, res, 1, 1, 1, 4)
    assert torch.equal(out.isnan(), ref.isnan()) and torch.equal(out.isinf(), ref.isinf())
    assert (~out.isfinite()).any() and out.isfinite().any()
    monkeypatch.setenv("RESNET_FUSED_CPU_GROUPED", "0")
    direct = ops.conv_bias_act(x, weight, b, res, padding=1, groups=4, backend="native")
    assert torch.equal(out.isnan(), direct.isnan()) and torch.equal(out.isinf(), direct.isinf())
    assert relative_error(out.nan_to_num(0.0, 0.0, 0.0), direct.nan_to_num(0.0, 0.0, 0.0)) <= 1e-5


@needs_extension
@needs_avx2
@pytest.mark.parametrize("value", ["nan", "inf"])
@pytest.mark.parametrize("tap", [(r, s) for r in range(3) for s in range(3)], ids=lambda t: f"tap{t[0]}{t[1]}")
def test_cpu_grouped_skips_the_padding_for_a_non_finite_weight_as_onednn_does(gen, monkeypatch, value, tap):
    """A NaN/Inf weight meets the padding at the map's edges: the taps there are skipped,
    on every side, as by oneDNN's conv (torch's float32 CPU conv), so those edge pixels
    stay finite, where the float64 reference multiplies the padding's zeros (NaN)."""
    x, weight, b, res = _grouped_case(gen, 2, 4, 9, 10, 3, 1, 1, 1)
    weight[5, 2, tap[0], tap[1]] = float(value)
    assert GROUPED in ops.explain(x, weight, None, res, padding=1, groups=4, backend="native")
    out = ops.conv_bias_act(x, weight, b, res, padding=1, groups=4, backend="native")
    monkeypatch.setenv("RESNET_FUSED_CPU_GROUPED", "0")
    direct = ops.conv_bias_act(x, weight, b, res, padding=1, groups=4, backend="native")
    assert torch.equal(out.isnan(), direct.isnan()) and torch.equal(out.isinf(), direct.isinf())
    assert (~out.isfinite()).any() and out.isfinite().any()
    assert relative_error(out.nan_to_num(0.0, 0.0, 0.0), direct.nan_to_num(0.0, 0.0, 0.0)) <= 1e-5
    # the interior agrees with the float64 reference too
    ref = reference_conv_bias_act(x, weight, b, res, 1, 1, 1, 4)[..., 1:-1, 1:-1]
    assert torch.equal(out[..., 1:-1, 1:-1].isnan(), ref.isnan())


@needs_extension
@needs_avx2
@pytest.mark.parametrize("into", ["residual", "new"])
def test_cpu_grouped_writes_out_in_place(gen, into):
    x, weight, b, res = _grouped_case(gen, 2, 8, 9, 9, 3, 2, 1, 1)
    ref = reference_conv_bias_act(x, weight, b, res, 2, 1, 1, 8)
    out = res if into == "residual" else torch.empty_like(res)
    text = ops.explain(x, weight, b, res, 2, 1, 1, 8, backend="native", out=out)
    assert GROUPED in text and text.endswith("(in place)"), text
    version = out._version
    with torch.no_grad():
        y = ops.conv_bias_act(x, weight, b, res, 2, 1, 1, 8, backend="native", out=out)
    assert y is out and relative_error(out, ref) <= TOLERANCES[torch.float32]
    assert out._version > version  # written through raw pointers: autograd is told


@needs_extension
@needs_avx2
def test_cpu_grouped_packed_weight_follows_in_place_edits(gen):
    x, weight, b, res = _grouped_case(gen, 2, 4, 7, 7, 3, 1, 1, 1)
    for step in range(3):  # the second call is served from the cache, the third after an edit
        if step == 2:
            with torch.no_grad():
                weight.mul_(-0.5)
        out = ops.conv_bias_act(x, weight, b, res, padding=1, groups=4, backend="native")
        assert relative_error(out, reference_conv_bias_act(x, weight, b, res, 1, 1, 1, 4)) <= 1e-5


@needs_extension
def test_cpu_blocks_write_into_dead_identities_only(gen, monkeypatch):
    """In a fused ResNet-50 forward without autograd, each block's last conv writes into
    its identity's buffer (16 blocks); never into a tensor the caller or a hook holds."""
    from resnet_fused.backends import native_backend

    writes = []
    run_out = native_backend.NativeBackend.run_out
    monkeypatch.setattr(native_backend.NativeBackend, "run_out",
                        lambda self, *a: writes.append(a[-1].data_ptr()) or run_out(self, *a))
    tv_model = seeded_torchvision_model("resnet50", seed=8, calibration_size=8)
    fused = resnet_fused.fuse(tv_model, backend="native")
    images = torch.randn(2, 3, 32, 32, generator=gen).contiguous(memory_format=torch.channels_last)
    kept = images.clone()
    with torch.inference_mode():
        ref = tv_model(images)
        assert relative_error(fused(images), ref) <= 1e-5 and torch.equal(images, kept)
        assert len(writes) == 16
        # a block called on its own: its input is the caller's, only the downsample's output is taken
        block_input = torch.randn(2, 256, 8, 8, generator=gen).contiguous(memory_format=torch.channels_last)
        kept_input = block_input.clone()
        for name, expect in (("layer1.1", 0), ("layer2.0", 1)):
            writes.clear()
            out = fused.get_submodule(name)(block_input)
            assert torch.equal(block_input, kept_input) and len(writes) == expect
            assert relative_error(out, tv_model.get_submodule(name)(block_input)) <= 1e-5
    # autograd on: new outputs only
    writes.clear()
    with torch.no_grad():
        fused(images)
    assert len(writes) == 16
    writes.clear()
    with torch.enable_grad():
        fused(images)
    assert writes == []
    # a hook that keeps a block's output: nothing it holds is overwritten later
    saved = []
    handle = fused.layer3[2].register_forward_hook(lambda m, i, o: saved.append((o, o.clone())))
    writes.clear()
    with torch.inference_mode():
        assert relative_error(fused(images), ref) <= 1e-5
    handle.remove()
    held, copy_then = saved[0]
    assert torch.equal(held, copy_then)  # (addresses repeat as the allocator reuses freed blocks)
    assert len(writes) == 4  # the four downsample blocks: their residual is made inside the block


@needs_extension
@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")  # the argument checks read traced shapes
@pytest.mark.filterwarnings("ignore:`torch.jit.trace.*` is deprecated:FutureWarning")
def test_cpu_in_place_writes_keep_torch_semantics(gen):
    """Found by review of the in-place writes: a BatchNorm put back in train mode inside an
    eval model, torch.jit.trace under no_grad, autograd's check of a saved tensor written
    in place, and an empty batch."""
    tv_model = seeded_torchvision_model("resnet50", seed=9, calibration_size=8).eval()
    fused = resnet_fused.fuse(tv_model, backend="native")
    x = torch.randn(2, 3, 32, 32, generator=gen)
    # test-time BN adaptation: one BN in train mode, the rest eval, under no_grad
    fused.layer2[0].bn3.train()
    tv_model.layer2[0].bn3.train()
    with torch.no_grad():
        assert relative_error(fused(x), tv_model(x).double()) <= 1e-5  # (both update that BN's statistics)
    fused.layer2[0].bn3.eval()
    tv_model.layer2[0].bn3.eval()
    with torch.no_grad():
        traced = torch.jit.trace(fused, x, check_trace=False)
        assert relative_error(traced(x), tv_model(x).double()) <= 1e-5
    # out written in place by the kernels bumps its version, so autograd sees the write
    a = torch.randn(2, 24, 9, 9, generator=gen, requires_grad=True)
    saved = a.contiguous(memory_format=torch.channels_last).sigmoid()  # sigmoid saves its output
    xw = torch.randn(2, 16, 9, 9, generator=gen).contiguous(memory_format=torch.channels_last)
    w = torch.randn(24, 16, 1, 1, generator=gen)
    assert ops.explain(xw, w, None, saved, backend="native", out=saved).endswith("(in place)")
    before = saved._version
    with torch.no_grad():
        ops.conv_bias_act(xw, w, None, saved, backend="native", out=saved)
    assert saved._version > before
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        saved.sum().backward()
    # an empty batch: out= is no error
    empty_x, empty_res = xw[:0], saved.detach()[:0]
    ops.conv_bias_act(empty_x, w, None, empty_res, backend="native", out=empty_res)


@needs_extension
@pytest.mark.parametrize("r, s", [(1, 1), (3, 2)], ids=["conv1x1", "onednn_sum"])
@pytest.mark.parametrize("poison", ["nan_input", "inf_weight", "nan_residual", "inf_residual", "nan_bias"])
def test_cpu_out_into_the_residual_keeps_non_finite_values(gen, r, s, poison):
    """Written into the residual's own buffer (the 1x1 GEMM's tiles, oneDNN's sum
    post-op), NaN and Inf land where the functional op puts them."""
    p = r // 2
    x, weight, bias, res = make_case(gen, 2, 16, 9, 9, 24, r, s, p, 1, 1, torch.float32, True, True)
    what, where = poison.split("_")
    target = {"input": x, "weight": weight, "residual": res, "bias": bias}[where]
    index = {"input": (1, 3, 2, 4), "weight": (5, 7, 0, 0), "residual": (0, 9, 1, 1), "bias": (11,)}[where]
    target[index] = float(what)
    functional = ops.conv_bias_act(x, weight, bias, res, s, p, backend="native")
    assert ops.explain(x, weight, bias, res, s, p, backend="native", out=res).endswith("(in place)")
    out = ops.conv_bias_act(x, weight, bias, res, s, p, backend="native", out=res)
    assert out is res and (~out.isfinite()).any() and out.isfinite().any()
    assert torch.equal(out.isnan(), functional.isnan()) and torch.equal(out.isinf(), functional.isinf())
    assert relative_error(out.nan_to_num(0.0, 0.0, 0.0), functional.nan_to_num(0.0, 0.0, 0.0)) <= 1e-6


@needs_extension
@pytest.mark.parametrize("where, error", [
    ("disjoint", None),
    ("x_overlaps", "out should not share memory with x, weight or bias"),
    ("residual_shifted", "out may be the residual itself but should not partly overlap it"),
])
def test_cpu_out_checks_memory_by_bytes_spanned(gen, where, error):
    """The extension's own check of out= (the op called directly, past the Python one):
    slices of one buffer that do not meet are fine; ones that do are refused."""
    n_x, n_out = 2 * 8 * 5 * 5, 2 * 8 * 5 * 5
    buf = torch.randn(n_x + 2 * n_out + 1, generator=gen)
    x = buf[:n_x].view(2, 8, 5, 5)
    res = buf[n_x:n_x + n_out].view(2, 8, 5, 5)
    start = {"disjoint": n_x + n_out, "x_overlaps": n_x - 1, "residual_shifted": n_x + 1}[where]
    out = buf[start:start + n_out].view(2, 8, 5, 5)
    weight = torch.randn(8, 8, 3, 3, generator=gen) / 72 ** 0.5
    bias = torch.randn(8, generator=gen)
    expected = reference_conv_bias_act(x, weight, bias, res, 1, 1)
    call = lambda: torch.ops.resnet_fused.native_conv_bias_act.out(  # noqa: E731
        x, weight, bias, res, [1, 1], [1, 1], [1, 1], 1, True, out=out)
    if error is None:
        call()
        assert relative_error(out, expected) <= TOLERANCES[torch.float32]
    else:
        with pytest.raises(RuntimeError, match=re.escape(error)):
            call()


@needs_extension
@pytest.mark.parametrize("r, s", [(1, 1), (3, 2), (3, 1)], ids=["conv1x1", "onednn_sum", "winograd"])
def test_cpu_out_opcheck(gen, r, s):
    x, weight, b, res = make_case(gen, 2, 8, 7, 7, 16, r, s, r // 2, 1, 1, torch.float32, True, True)
    torch.library.opcheck(torch.ops.resnet_fused.native_conv_bias_act.out,
                          (x, weight, b, res, [s, s], [r // 2] * 2, [1, 1], 1, True), {"out": torch.empty_like(res)})


@needs_extension
@needs_avx2
def test_cpu_conv1x1_opcheck(gen):
    x, weight, b, res = _conv1x1_case(gen, 2, 8, 24, 5, 3)
    assert CONV1X1 in ops.explain(x, weight, None, res, backend="native")
    torch.library.opcheck(torch.ops.resnet_fused.native_conv_bias_act.default,
                          (x, weight, b, res, [1, 1], [0, 0], [1, 1], 1, True))


@needs_extension
@needs_avx2
def test_cpu_grouped_opcheck(gen):
    x, weight, b, res = _grouped_case(gen, 2, 4, 7, 9, 3, 2, 1, 1)
    assert GROUPED in ops.explain(x, weight, None, res, 2, 1, 1, 4, backend="native")
    args = (x, weight, b, res, [2, 2], [1, 1], [1, 1], 4, True)
    torch.library.opcheck(torch.ops.resnet_fused.native_conv_bias_act.default, args)
    torch.library.opcheck(torch.ops.resnet_fused.native_conv_bias_act.out, args, {"out": torch.empty_like(res)})


@needs_extension
@pytest.mark.parametrize("case", [
    ((2, 8, 9, 9), (16, 8, 3, 3), True, True, [1, 1], [1, 1], [1, 1], 1, True),
    ((1, 6, 7, 8), (6, 2, 3, 3), True, False, [2, 1], [1, 0], [1, 2], 3, False),
    ((2, 4, 5, 5), (8, 4, 1, 1), False, True, [1, 1], [0, 0], [1, 1], 1, True),
], ids=["3x3_residual_relu", "grouped_dilated", "1x1_no_bias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_cpu_opcheck(gen, case, dtype):
    x_shape, w_shape, has_bias, has_res, s, p, d, g, relu = case
    x = torch.randn(x_shape, generator=gen, dtype=dtype)
    weight = torch.randn(w_shape, generator=gen, dtype=dtype)
    bias = torch.randn(w_shape[0], generator=gen, dtype=dtype) if has_bias else None
    out_shape = ops.check_conv_bias_act_args(x, weight, bias, None, s, p, d, g)
    res = torch.randn(out_shape, generator=gen, dtype=dtype) if has_res else None
    torch.library.opcheck(torch.ops.resnet_fused.native_conv_bias_act.default, (x, weight, bias, res, s, p, d, g, relu))


@needs_extension
@pytest.mark.parametrize("bad, message", [
    (dict(x=torch.randn(2, 8, 5)), r"x should be 4-D \(N, C, H, W\), got 3-D with shape \(2, 8, 5\)"),
    (dict(weight=torch.randn(16, 4, 3, 3)), r"x should have 4 channels .* got 8 channels in x of shape \(2, 8, 7, 7\)"),
    (dict(bias=torch.randn(15)), r"bias should have shape \(16,\), got \(15,\)"),
    (dict(residual=torch.randn(2, 16, 6, 6)),
     r"residual should have the output's shape \(2, 16, 7, 7\), got \(2, 16, 6, 6\)"),
    (dict(residual=torch.randn(2, 16, 7, 7, dtype=torch.float64)),
     r"residual should be Float on cpu, got Double on cpu"),
    (dict(weight=torch.randn(16, 8, 3, 3, dtype=torch.float64)), r"weight dtype should match x \(Float\), got Double"),
    (dict(padding=[-1, 1]), r"padding should be two ints >= 0, got \[-1, 1\]"),
    (dict(groups=3), r"weight's output channels \(16\) should be divisible by groups \(3\)"),
    (dict(weight=torch.randn(0, 8, 3, 3), bias=None),
     r"weight should have at least one output channel, got shape \(0, 8, 3, 3\)"),
    (dict(x=torch.randn(2, 8, 1, 1), padding=[0, 0]), r"the convolution output would be empty \(0x0\)"),
    # no window fits, though C++'s division of the negative reach by the stride rounds to 0
    (dict(x=torch.randn(2, 8, 2, 2), padding=[0, 0], stride=[2, 2]), r"the convolution output would be empty \(0x0\)"),
], ids=["x_3d", "channels", "bias_shape", "residual_shape", "residual_dtype", "weight_dtype", "padding", "groups",
        "no_output_channels", "empty_output", "empty_output_strided"])
def test_native_op_rejects_bad_input_clearly(bad, message):
    args = dict(x=torch.randn(2, 8, 7, 7), weight=torch.randn(16, 8, 3, 3), bias=torch.randn(16), residual=None,
                stride=[1, 1], padding=[1, 1], dilation=[1, 1], groups=1, relu=True)
    args.update(bad)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.resnet_fused.native_conv_bias_act(*args.values())


@needs_extension
def test_cpu_empty_batch_gives_an_empty_output(gen):
    x, weight, bias, _ = make_case(gen, 1, 8, 6, 6, 4, 3, 1, 1, 1, 1, torch.float32, False)
    out = ops.conv_bias_act(x[:0], weight, bias, padding=1, backend="native")
    assert out.shape == (0, 4, 6, 6)
    assert "empty input" in ops.explain(x[:0], weight, padding=1, backend="native")


@needs_extension
def test_native_path_query_checks_its_arguments_too():
    with pytest.raises(RuntimeError, match=r"x should be 4-D"):
        torch.ops.resnet_fused.native_conv_bias_act_path(torch.randn(8, 5, 5), torch.randn(4, 8, 3, 3), None,
                                                         [1, 1], [1, 1], [1, 1], 1)


@needs_extension
@pytest.mark.slow
@pytest.mark.parametrize("arch, dtype", [("resnet18", torch.float32), ("resnet50", torch.float32),
                                         ("resnext50_32x4d", torch.float32), ("wide_resnet50_2", torch.float32),
                                         ("resnet18", torch.bfloat16)])
def test_cpu_whole_model_matches_torchvision(arch, dtype, gen):
    tv_model = seeded_torchvision_model(arch, seed=17, calibration_size=32)
    fused = resnet_fused.get_model(arch, backend="native")
    fused.load_state_dict(tv_model.state_dict())
    fused = fused.eval().to(dtype)
    x = torch.randn(2, 3, 64, 64, generator=gen)
    with torch.no_grad():
        out = fused(x.to(dtype).contiguous(memory_format=torch.channels_last))
        ref = copy.deepcopy(tv_model).double()(x.double())
        own = copy.deepcopy(tv_model).to(dtype)(x.to(dtype))  # torchvision's own error at this dtype
    assert relative_error(out, ref) <= max(TOLERANCES[dtype], 2 * relative_error(own, ref))


def test_package_runs_without_the_extension():
    """With the library absent (here: switched off), 'native' says why and the rest runs."""
    code = (
        "import torch, resnet_fused as rf\n"
        "info = rf.extension_info()\n"
        "assert info['error'] == 'disabled by RESNET_FUSED_DISABLE_EXTENSION', info\n"
        "assert 'native' not in rf.available_backends()\n"
        "x, w = torch.randn(1, 4, 6, 6), torch.randn(4, 4, 3, 3)\n"
        "for backend in ('native', 'auto'):  # ('auto' passes it over: explain says why too)\n"
        "    text = rf.explain(x, w, padding=1, backend=backend)\n"
        "    assert text == \"runs on 'torch'; skipped 'native': disabled by RESNET_FUSED_DISABLE_EXTENSION\", text\n"
        "y = rf.ops.conv_bias_act(x, w, padding=1, backend='native')\n"
        "print('ok', tuple(y.shape))\n"
    )
    env = dict(os.environ, RESNET_FUSED_DISABLE_EXTENSION="1")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert "ok (1, 4, 6, 6)" in done.stdout


def test_broken_library_warns_once_with_how_to_rebuild(tmp_path):
    broken = tmp_path / "_C.so"
    broken.write_bytes(b"not an ELF file")
    code = (
        "import warnings, resnet_fused._extension as e\n"
        f"e._library_path = lambda: {str(broken)!r}\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    reason = e.load(); again = e.load()\n"
        "assert reason == again and reason.startswith('resnet_fused._C failed to load'), reason\n"
        "assert len(caught) == 1 and issubclass(caught[0].category, e.ExtensionWarning), caught\n"
        "assert 'pip install --no-build-isolation -e .' in str(caught[0].message)\n"
        "import resnet_fused as rf\n"
        "assert 'native' not in rf.available_backends() and rf.extension_info()['error'] == reason\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=dict(os.environ, RESNET_FUSED_DISABLE_EXTENSION="0"))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


# ---- GPU --------------------------------------------------------------------------------

GPU_NATIVE = ON_GPU and INFO.get("cuda") and INFO["error"] is None


def _gpu_cases():
    """Small batches of both nets first: a session that runs out of time has still seen
    every layer of each (batch 256 costs ~200M random values and an fp64 conv a case)."""
    cases = []
    for batch in (1, 32, 256):
        for arch in ("resnet50", "resnext50_32x4d"):
            cases += [(arch, batch, layer) for layer, _ in conv_layers(arch, batch, 224)]
    return cases


GPU_CASES = _gpu_cases()


@pytest.mark.gpu
@pytest.mark.skipif(ON_GPU and not GPU_NATIVE, reason=f"no CUDA kernels in this build: {INFO}")
@pytest.mark.parametrize("residual", [False, True], ids=["no_residual", "residual"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", GPU_CASES,
                         ids=[f"{a}-b{b}-{layer.name.replace(' ', '_')}" for a, b, layer in GPU_CASES])
def test_gpu_resnet_layers(case, dtype, residual):
    _, batch, layer = case
    gen = torch.Generator(device="cuda").manual_seed(batch)  # batch 256: ~200M values, drawn on the GPU
    x, weight, bias, res = layer.tensors(dtype, "cuda", gen)
    if residual and res is None:
        res = torch.randn(layer.n, layer.k, *layer.out_hw, generator=gen, device="cuda").to(dtype)
        res = res.contiguous(memory_format=torch.channels_last)
    elif not residual:
        res = None
    s, p, d, g = layer.stride, layer.padding, layer.dilation, layer.groups
    path = ops.explain(x, weight, None, res, s, p, d, g, backend="native")
    out = run_native(x, weight, bias, res, s, p, d, g, layer.relu)
    ref = reference_conv_bias_act(x, weight, bias, res, s, p, d, g, layer.relu, device="cuda")
    assert relative_error(out, ref) <= TOLERANCES[dtype], path
    if layer.groups == 1 and layer.c % 8 == 0:
        assert "CUTLASS" in path and "refused" not in path, path


def _hopper():
    return ON_GPU and torch.cuda.get_device_capability() == (9, 0)


@pytest.mark.gpu
@pytest.mark.skipif(ON_GPU and not GPU_NATIVE, reason=f"no CUDA kernels in this build: {INFO}")
@pytest.mark.parametrize("kernel", ["sm80_128x128", "sm80_64x64", "sm90a_128x128"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [
    (2, 64, 15, 17, 64, 3, 1, 1, 1, True),     # odd H/W, K = 64
    (3, 128, 14, 14, 256, 1, 2, 0, 1, False),  # 1x1 stride 2 (downsample), no ReLU
    (2, 256, 9, 9, 512, 3, 1, 2, 2, True),     # dilation 2
    (1, 512, 7, 7, 2048, 1, 1, 0, 1, True),    # batch 1, 49 rows
], ids=["odd_k64", "1x1_stride2", "dilation2", "batch1_7x7"])
def test_gpu_every_cutlass_kernel_is_correct(monkeypatch, gen, kernel, dtype, shape):
    """The heuristic may pick any kernel, and a user may force one: each must be right."""
    if kernel.startswith("sm90a") and not _hopper():
        pytest.skip("the sm90a kernels run on compute capability 9.0 only")
    n, c, h, w, k, r, s, p, d, relu = shape
    monkeypatch.setenv("RESNET_FUSED_CUTLASS_KERNEL", kernel)
    for residual in (False, True):
        x, weight, bias, res = make_case(gen, n, c, h, w, k, r, s, p, d, 1, dtype, residual, channels_last=True)
        x, weight, bias = x.cuda(), weight.cuda().contiguous(memory_format=torch.channels_last), bias.cuda()
        res = None if res is None else res.cuda()
        path = ops.explain(x, weight, None, res, s, p, d, 1, backend="native")
        assert f"CUTLASS implicit GEMM {kernel}," in path, path
        out = run_native(x, weight, bias, res, s, p, d, 1, relu)
        ref = reference_conv_bias_act(x, weight, bias, res, s, p, d, 1, relu, device="cuda")
        assert relative_error(out, ref) <= TOLERANCES[dtype], (kernel, residual)


@pytest.mark.gpu
@pytest.mark.skipif(ON_GPU and not GPU_NATIVE, reason=f"no CUDA kernels in this build: {INFO}")
def test_gpu_a_refused_sm90a_kernel_leaves_the_call_to_sm80(monkeypatch, gen):
    """Forced where it cannot run (stride 9, past TMA im2col's 8; or not a Hopper GPU),
    the sm90a kernel leaves the call to the sm80 one, not to cuDNN, and explain says why."""
    monkeypatch.setenv("RESNET_FUSED_CUTLASS_KERNEL", "sm90a_128x128")
    x, weight, bias, res = make_case(gen, 2, 64, 19, 19, 128, 1, 9, 0, 1, 1, torch.float16, True,
                                     channels_last=True)
    x, weight, bias = x.cuda(), weight.cuda().contiguous(memory_format=torch.channels_last), bias.cuda()
    res = res.cuda()
    path = ops.explain(x, weight, None, res, 9, 0, 1, 1, backend="native")
    assert "CUTLASS implicit GEMM sm80_" in path and "(sm90a_128x128 refused: " in path, path
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (a launch that failed and fell back to cuDNN warns)
        out = run_native(x, weight, bias, res, 9, 0, 1, 1, True)
    ref = reference_conv_bias_act(x, weight, bias, res, 9, 0, 1, 1, True, device="cuda")
    assert relative_error(out, ref) <= TOLERANCES[torch.float16]


def _misaligned(t: torch.Tensor) -> torch.Tensor:
    """``t``'s values in a channels_last tensor whose data starts 2 bytes past a 16-byte boundary."""
    flat = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)[1:]
    n, c, h, w = t.shape
    out = flat.view(n, h, w, c).permute(0, 3, 1, 2)
    out.copy_(t)
    assert out.data_ptr() % 16 and out.is_contiguous(memory_format=torch.channels_last)
    return out


@pytest.mark.gpu
@pytest.mark.skipif(ON_GPU and not GPU_NATIVE, reason=f"no CUDA kernels in this build: {INFO}")
@pytest.mark.parametrize("kernel", ["sm80_128x128", "sm80_64x64", "sm90a_128x128"])
@pytest.mark.parametrize("operands", ["no_bias", "nchw_residual", "strided_bias", "misaligned_x", "c24_k40"])
def test_gpu_cutlass_takes_any_operand_layout(monkeypatch, gen, kernel, operands):
    """The operands the fused modules never pass still run CUTLASS and come out right:
    no bias (a null bias pointer), a residual or bias that is not dense (copied first),
    an x off 16-byte alignment (copied), and channel counts that are multiples of 8 but
    not of the 64-deep K tile (the iterators' and TMA's channel masking)."""
    if kernel.startswith("sm90a") and not _hopper():
        pytest.skip("the sm90a kernels run on compute capability 9.0 only")
    monkeypatch.setenv("RESNET_FUSED_CUTLASS_KERNEL", kernel)
    c, k = (24, 40) if operands == "c24_k40" else (64, 128)
    x, weight, bias, res = make_case(gen, 2, c, 13, 11, k, 3, 1, 1, 1, 1, torch.float16, True, channels_last=True)
    x, weight, bias, res = x.cuda(), weight.cuda().contiguous(memory_format=torch.channels_last), bias.cuda(), res.cuda()
    if operands == "no_bias":
        bias = None
    elif operands == "nchw_residual":
        res = res.contiguous()
    elif operands == "strided_bias":
        bias = torch.stack([bias, torch.full_like(bias, 1e4)], dim=1)[:, 0]  # every other element: a trap
        assert bias.stride() == (2,)
    elif operands == "misaligned_x":
        x = _misaligned(x)
    path = ops.explain(x, weight, None, res, 1, 1, 1, 1, backend="native")
    assert f"CUTLASS implicit GEMM {kernel}," in path, path
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a CUTLASS launch failing over to cuDNN would only warn
        out = run_native(x, weight, bias, res, 1, 1, 1, 1, True)
    ref = reference_conv_bias_act(x, weight, bias, res, 1, 1, 1, 1, True, device="cuda")
    assert relative_error(out, ref) <= TOLERANCES[torch.float16], (kernel, operands)


@pytest.mark.gpu
@pytest.mark.skipif(ON_GPU and not GPU_NATIVE, reason=f"no CUDA kernels in this build: {INFO}")
def test_gpu_unknown_kernel_is_a_clear_error(monkeypatch, gen):
    monkeypatch.setenv("RESNET_FUSED_CUTLASS_KERNEL", "96x96")
    x, weight, bias, _ = make_case(gen, 1, 64, 8, 8, 64, 3, 1, 1, 1, 1, torch.float16, False, channels_last=True)
    with pytest.raises(RuntimeError, match="RESNET_FUSED_CUTLASS_KERNEL should be auto, sm80_128x128, sm80_64x64 or "
                                           "sm90a_128x128, got '96x96'"):
        run_native(x.cuda(), weight.cuda(), bias.cuda(), None, 1, 1, 1, 1, True)


@pytest.mark.gpu
@pytest.mark.skipif(ON_GPU and not GPU_NATIVE, reason=f"no CUDA kernels in this build: {INFO}")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_gpu_stem_and_float32_fall_back_to_cudnn(gen, dtype):
    x, weight, bias, _ = make_case(gen, 2, 3, 32, 32, 64, 7, 2, 3, 1, 1, dtype, False, channels_last=True)
    x, weight, bias = x.cuda(), weight.cuda(), bias.cuda()
    path = ops.explain(x, weight, None, None, 2, 3, 1, 1, backend="native")
    assert "cuDNN" in path and "refused" in path, path
    out = run_native(x, weight, bias, None, 2, 3, 1, 1, True)
    tol = 5e-4 if dtype == torch.float32 else TOLERANCES[dtype]
    assert relative_error(out, reference_conv_bias_act(x, weight, bias, None, 2, 3, device="cuda")) <= tol


@pytest.mark.gpu
@pytest.mark.skipif(ON_GPU and not GPU_NATIVE, reason=f"no CUDA kernels in this build: {INFO}")
@pytest.mark.parametrize("c, k, r, s, p, groups, dtype", [
    (64, 64, 3, 1, 1, 1, torch.float16),
    (3, 64, 7, 2, 3, 1, torch.float16),
    (64, 64, 3, 1, 1, 32, torch.float16),
    (64, 64, 1, 1, 0, 1, torch.float32),
], ids=["cutlass", "stem_fallback", "grouped_fallback", "float32_fallback"])
@pytest.mark.parametrize("residual", [False, True], ids=["no_residual", "residual"])
def test_gpu_nan_reaches_the_output_on_every_path(gen, c, k, r, s, p, groups, dtype, residual):
    """A NaN pixel must come out NaN wherever a direct conv + torch.relu puts it: no
    fused ReLU may turn it into 0 (cuDNN's and oneDNN's map NaN to 0)."""
    x, weight, bias, res = make_case(gen, 2, c, 12, 12, k, r, s, p, 1, groups, dtype, residual, channels_last=True)
    x[1, 0, 5, 6] = float("nan")
    x, weight, bias = x.cuda(), weight.cuda(), bias.cuda()
    res = None if res is None else res.cuda()
    path = ops.explain(x, weight, None, res, s, p, 1, groups, backend="native")
    cutlass = "CUTLASS implicit GEMM" in path  # a fallback's path names CUTLASS too ("CUTLASS refused: ...")
    assert cutlass == (dtype != torch.float32 and c % 8 == 0 and groups == 1), path
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a CUTLASS launch failing over to cuDNN would only warn
        out = run_native(x, weight, bias, res, s, p, 1, groups, True)
    # where a NaN must land: every output whose window holds the NaN pixel
    seen = F.max_pool2d(x.isnan().float(), r, s, p)  # (N, C, P, Q): windows holding a NaN, per input channel
    seen = seen.unflatten(1, (groups, c // groups)).amax(dim=2).bool()  # per group
    hit = seen.repeat_interleave(k // groups, dim=1)  # the group's output channels
    assert hit.any() and bool(out.isnan()[hit].all()), path
    if cutlass:  # a direct conv puts it nowhere else (cuDNN's Winograd or FFT algorithms may smear it)
        assert torch.equal(out.isnan(), hit), path


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["native", "triton", "torch"])
def test_gpu_out_into_the_residual(gen, backend):
    """out= on CUDA (computed, then copied into the residual's buffer), and a fused model
    on CUDA never writes into an identity (the in-place writes are the CPU's)."""
    if backend not in resnet_fused.available_backends("cuda"):
        pytest.skip(f"{backend} does not run on CUDA here")
    x, weight, bias, res = make_case(gen, 2, 64, 12, 12, 256, 1, 1, 0, 1, 1, torch.float16, True, channels_last=True)
    x, weight, bias, res = x.cuda(), weight.cuda(), bias.cuda(), res.cuda()
    ref = reference_conv_bias_act(x, weight, bias, res, 1, 0, device="cuda")
    assert ops.explain(x, weight, bias, res, backend=backend, out=res).endswith("(computed, then copied)")
    with torch.no_grad():
        assert ops.conv_bias_act(x, weight, bias, res, backend=backend, out=res) is res
    assert relative_error(res, ref) <= TOLERANCES[torch.float16]


@pytest.mark.gpu
@pytest.mark.skipif(ON_GPU and not GPU_NATIVE, reason=f"no CUDA kernels in this build: {INFO}")
@pytest.mark.parametrize("arch", resnet_fused.ARCHS)
def test_gpu_whole_model_parity(arch, gen):
    tv_model = seeded_torchvision_model(arch, seed=5, calibration_size=32)
    fused = resnet_fused.get_model(arch, backend="native")
    fused.load_state_dict(tv_model.state_dict())
    fused = fused.eval().cuda().half()
    x = torch.randn(4, 3, 96, 96, generator=gen)
    with torch.no_grad():
        out = fused(x.cuda().half().contiguous(memory_format=torch.channels_last))
        ref = copy.deepcopy(tv_model).double()(x.double())
        own = copy.deepcopy(tv_model).cuda().half()(x.cuda().half())
    assert relative_error(out, ref) <= max(TOLERANCES[torch.float16], 2 * relative_error(own, ref))


def test_native_is_the_cpu_default_when_built(gen):
    x, weight, _, _ = make_case(gen, 1, 4, 5, 5, 4, 3, 1, 1, 1, 1, torch.float32, False)
    text = ops.explain(x, weight, padding=1)
    if backends.unavailable_reason("native") is None:
        assert text.startswith("runs on 'native'"), text
    else:
        assert text.startswith("runs on 'torch'; skipped 'native'"), text
