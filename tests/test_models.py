"""The fused ResNet family against torchvision: names, weights, eval and train parity."""
import copy
import os

import pytest
import torch
import torchvision
from torchvision.models import resnet as tv_resnet

import resnet_fused
from resnet_fused import FusedBasicBlock, FusedBottleneck
from resnet_fused.testing import TOLERANCES, randomize_batchnorm_, relative_error, seeded_torchvision_model

ARCHS = resnet_fused.ARCHS
FP32 = TOLERANCES[torch.float32]


def fused_twin(tv_model, **kwargs):
    arch_kwargs = kwargs.pop("arch_kwargs", {})
    fused = resnet_fused.get_model(kwargs.pop("arch"), **arch_kwargs, **kwargs)
    fused.load_state_dict(tv_model.state_dict(), strict=True)
    return fused.eval()


@pytest.mark.parametrize("arch", ARCHS)
def test_eval_parity_with_torchvision(arch, gen):
    tv_model = seeded_torchvision_model(arch, seed=len(arch), calibration_size=32)
    fused = fused_twin(tv_model, arch=arch)
    assert list(fused.state_dict()) == list(tv_model.state_dict())
    x = torch.randn(2, 3, 32, 32, generator=gen)
    with torch.no_grad():
        out = fused(x)
        ref = copy.deepcopy(tv_model).double()(x.double())
    assert relative_error(out, ref) <= FP32
    blocks = [m for m in fused.modules() if isinstance(m, (FusedBasicBlock, FusedBottleneck))]
    assert len(blocks) == sum(isinstance(m, (tv_resnet.BasicBlock, tv_resnet.Bottleneck)) for m in tv_model.modules())


@pytest.mark.parametrize(
    "arch, kwargs",
    [
        ("resnet50", {"replace_stride_with_dilation": [False, True, True]}),
        ("resnet18", {"num_classes": 7, "zero_init_residual": True}),
        ("resnet50", {"groups": 2, "width_per_group": 32}),
    ],
    ids=["dilated", "num_classes+zero_init", "groups+width"],
)
def test_torchvision_kwargs(arch, kwargs, gen):
    tv_model = seeded_torchvision_model(arch, seed=3, calibration_size=32, **kwargs)
    fused = fused_twin(tv_model, arch=arch, arch_kwargs=kwargs)
    x = torch.randn(2, 3, 32, 32, generator=gen)
    with torch.no_grad():
        assert relative_error(fused(x), copy.deepcopy(tv_model).double()(x.double())) <= FP32
    if "zero_init_residual" in kwargs:
        fresh = resnet_fused.resnet18(**kwargs)
        assert all((b.bn2.weight == 0).all() for b in fresh.modules() if isinstance(b, FusedBasicBlock))


def test_torchvisions_deprecated_interface_is_taken_as_torchvision_takes_it():
    """weights positionally and pretrained=, deprecated since torchvision 0.13 but taken
    (with its warning): the builders are keyword for keyword torchvision's."""
    import warnings

    for args, kwargs in (((None,), {"num_classes": 10}), ((), {"pretrained": False, "num_classes": 10})):
        with warnings.catch_warnings(record=True) as ours:
            warnings.simplefilter("always")
            fused = resnet_fused.resnet18(*args, **kwargs)
        with warnings.catch_warnings(record=True) as theirs:
            warnings.simplefilter("always")
            tv_model = torchvision.models.resnet18(*args, **kwargs)
        assert fused.fc.out_features == tv_model.fc.out_features == 10
        assert list(fused.state_dict()) == list(tv_model.state_dict())
        assert [str(w.message) for w in ours] == [str(w.message) for w in theirs] != []


def test_torchvision_argument_errors_are_torchvisions():
    with pytest.raises(ValueError, match="replace_stride_with_dilation should be None or a 3-element tuple"):
        resnet_fused.resnet50(replace_stride_with_dilation=[True])
    with pytest.raises(ValueError, match="BasicBlock only supports groups=1"):
        resnet_fused.resnet18(groups=2)
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        resnet_fused.resnet18(backend="fast")


def test_state_dict_loads_strictly_both_ways():
    tv_model = seeded_torchvision_model("resnext50_32x4d", seed=1, calibration_size=32)
    fused = resnet_fused.resnext50_32x4d()
    fused.load_state_dict(tv_model.state_dict(), strict=True)
    back = torchvision.models.resnext50_32x4d()
    back.load_state_dict(fused.state_dict(), strict=True)
    for (k1, v1), (k2, v2) in zip(tv_model.state_dict().items(), back.state_dict().items(), strict=True):
        assert k1 == k2 and torch.equal(v1, v2)


def _fake_weights(monkeypatch, arch, weights_enum):
    """Serve a seeded model's state_dict where torchvision would download."""
    state = seeded_torchvision_model(arch, seed=5, calibration_size=32).state_dict()
    calls = []

    def get_state_dict(self, *args, **kwargs):
        calls.append((self, kwargs))
        return state

    monkeypatch.setattr(type(weights_enum), "get_state_dict", get_state_dict)
    return state, calls


@pytest.mark.parametrize(
    "weights",
    [
        tv_resnet.ResNet18_Weights.IMAGENET1K_V1,
        "IMAGENET1K_V1",
        "ResNet18_Weights.IMAGENET1K_V1",
        "DEFAULT",
    ],
    ids=["enum", "name", "qualified name", "DEFAULT"],
)
def test_weights_go_through_torchvisions_weights_api(monkeypatch, weights):
    state, calls = _fake_weights(monkeypatch, "resnet18", tv_resnet.ResNet18_Weights.IMAGENET1K_V1)
    model = resnet_fused.resnet18(weights=weights, progress=False)
    assert calls and calls[0][1].get("progress") is False
    assert model.fc.out_features == len(tv_resnet.ResNet18_Weights.IMAGENET1K_V1.meta["categories"])
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_weights_with_conflicting_num_classes_is_torchvisions_error(monkeypatch):
    _fake_weights(monkeypatch, "resnet18", tv_resnet.ResNet18_Weights.IMAGENET1K_V1)
    with pytest.raises(ValueError, match="num_classes"):
        resnet_fused.resnet18(weights="IMAGENET1K_V1", num_classes=10)


def test_wrong_weights_enum_is_rejected():
    with pytest.raises(TypeError):
        resnet_fused.resnet18(weights=tv_resnet.ResNet50_Weights.IMAGENET1K_V1)


@pytest.mark.parametrize("arch", ["resnet18", "resnext50_32x4d"])
def test_train_mode_is_torchvisions(arch, gen):
    """Outputs, input and weight gradients, running stats and parameters after two SGD steps."""
    tv_model = seeded_torchvision_model(arch, seed=11, calibration_size=32).train()
    fused = resnet_fused.get_model(arch)
    fused.load_state_dict(tv_model.state_dict(), strict=True)
    fused.train()
    opt_tv = torch.optim.SGD(tv_model.parameters(), lr=0.05, momentum=0.9)
    opt_fused = torch.optim.SGD(fused.parameters(), lr=0.05, momentum=0.9)
    for _ in range(2):
        x = torch.randn(4, 3, 32, 32, generator=gen)
        target = torch.randint(0, 1000, (4,), generator=gen)
        x_tv, x_fused = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        out_tv, out_fused = tv_model(x_tv), fused(x_fused)
        torch.testing.assert_close(out_fused, out_tv, rtol=1e-6, atol=1e-6)
        torch.nn.functional.cross_entropy(out_tv, target).backward()
        torch.nn.functional.cross_entropy(out_fused, target).backward()
        torch.testing.assert_close(x_fused.grad, x_tv.grad, rtol=1e-6, atol=1e-7)
        for (name, p_tv), p_fused in zip(tv_model.named_parameters(), fused.parameters(), strict=True):
            torch.testing.assert_close(p_fused.grad, p_tv.grad, rtol=1e-5, atol=1e-7, msg=name)
        opt_tv.step(), opt_fused.step()
        opt_tv.zero_grad(), opt_fused.zero_grad()
    for (name, b_tv), b_fused in zip(tv_model.named_buffers(), fused.buffers(), strict=True):
        torch.testing.assert_close(b_fused, b_tv, rtol=1e-6, atol=1e-7, msg=name)
    for (name, p_tv), p_fused in zip(tv_model.named_parameters(), fused.parameters(), strict=True):
        torch.testing.assert_close(p_fused, p_tv, rtol=1e-6, atol=1e-7, msg=name)
    # and after training, eval mode folds the updated statistics
    tv_model.eval(), fused.eval()
    x = torch.randn(2, 3, 32, 32, generator=gen)
    with torch.no_grad():
        assert relative_error(fused(x), copy.deepcopy(tv_model).double()(x.double())) <= FP32


def _check(fused, tv_model, gen):
    x = torch.randn(2, 3, 32, 32, generator=gen)
    with torch.no_grad():
        return relative_error(fused(x), copy.deepcopy(tv_model).double()(x.double()))


def test_fold_cache_refreshes_after_load_state_dict(gen):
    tv_a = seeded_torchvision_model("resnet18", seed=20, calibration_size=32)
    tv_b = seeded_torchvision_model("resnet18", seed=21, calibration_size=32)
    fused = fused_twin(tv_a, arch="resnet18")
    assert _check(fused, tv_a, gen) <= FP32  # fills the caches
    fused.load_state_dict(tv_b.state_dict())
    assert _check(fused, tv_b, gen) <= FP32


def test_fold_cache_is_read_whole_by_concurrent_forwards(monkeypatch, gen):
    """Threads serving one model share its caches: a forward reading the cache while
    another thread replaces or clears it gets the old fold or the new, never a new key
    beside an old (or no) value. A key comparison that sleeps opens the window."""
    import threading
    import time

    from resnet_fused import fold

    class SlowKey(tuple):
        def __eq__(self, other):
            time.sleep(0.05)  # the other thread runs here
            return tuple.__eq__(self, other)

        __hash__ = tuple.__hash__

    real = fold._state_key
    monkeypatch.setattr(fold, "_state_key", lambda *args: SlowKey(real(*args)))
    conv, bn = torch.nn.Conv2d(4, 8, 3), torch.nn.BatchNorm2d(8).eval()
    with torch.no_grad():
        for t in (bn.weight, bn.bias, bn.running_mean):
            t.copy_(torch.randn(8, generator=gen))
        bn.running_var.copy_(torch.rand(8, generator=gen) + 0.5)
    cache = fold.FoldCache()
    want = cache.get(conv, bn, False)
    got = []
    reader = threading.Thread(target=lambda: got.append(cache.get(conv, bn, False)))
    reader.start()
    time.sleep(0.01)
    cache.clear()  # (refold() while the reader compares keys)
    reader.join()
    assert len(got) == 1 and got[0] is not None
    assert all(torch.equal(a, b) for a, b in zip(got[0], want))


@pytest.mark.parametrize("backend", ["torch", "native"])
def test_concurrent_forwards_match_sequential_ones(gen, backend):
    """One fused model served from four threads at once, its caches cold (the folds, the
    native backend's packed weights: the first calls race to fill them), NCHW and NHWC
    inputs mixed: every output matches the one a lone thread computes (float32 tolerance;
    bitwise equal when measured)."""
    import threading

    if backend not in resnet_fused.available_backends("cpu"):
        pytest.skip(f"{backend} does not run on this machine's CPU")
    tv_model = seeded_torchvision_model("resnet18", seed=3, calibration_size=8)
    xs = [torch.randn(2, 3, 48, 48, generator=gen) for _ in range(8)]
    xs = [x.contiguous(memory_format=torch.channels_last) if i % 2 else x for i, x in enumerate(xs)]
    with torch.inference_mode():
        alone = resnet_fused.fuse(tv_model, backend=backend).eval()
        want = [alone(x) for x in xs]
    shared = resnet_fused.fuse(tv_model, backend=backend).eval()
    got, errors = {}, []

    def serve(thread):
        try:
            with torch.inference_mode():
                for rep in range(2):
                    for i in range(thread % 2, len(xs), 2):
                        got[thread, rep, i] = shared(xs[i])
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=serve, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(got) == 4 * 2 * 4
    for (_, _, i), out in got.items():
        assert relative_error(out, want[i]) <= FP32 and relative_error(want[i], tv_model(xs[i])) <= FP32


def test_fold_cache_refreshes_after_in_place_edits(gen):
    tv_model = seeded_torchvision_model("resnet50", seed=22, calibration_size=32)
    fused = fused_twin(tv_model, arch="resnet50")
    assert _check(fused, tv_model, gen) <= FP32
    with torch.no_grad():
        for model in (tv_model, fused):
            model.layer2[0].conv2.weight.mul_(1.5)
            model.layer3[1].bn2.running_var.mul_(3.0)
            model.layer1[0].downsample[1].bias.add_(0.5)
            model.bn1.running_mean.sub_(0.1)
    assert _check(fused, tv_model, gen) <= FP32


@pytest.mark.parametrize("optimizer", ["SGD", "Adam", "AdamW", "Adagrad"])
@pytest.mark.parametrize("backend", ["torch", "native"])
def test_fold_cache_refreshes_after_a_fused_optimizer_step(gen, optimizer, backend):
    """A fused optimizer (fused=True) writes the parameters without bumping their version
    counters; every optimizer step is counted into the fold key and drops the backends'
    packed weights, so the next eval forward folds the stepped parameters."""
    if backend not in resnet_fused.available_backends("cpu"):
        pytest.skip(f"{backend} does not run on the CPU here")
    tv_model = seeded_torchvision_model("resnet18", seed=26, calibration_size=32)
    fused = fused_twin(tv_model, arch="resnet18", backend=backend)
    assert _check(fused, tv_model, gen) <= FP32  # fills the fold and packed-weight caches
    before = fused.conv1.weight.detach().clone()
    opt = getattr(torch.optim, optimizer)(fused.parameters(), lr=0.05, fused=True)
    fused(torch.randn(2, 3, 32, 32, generator=gen)).square().mean().backward()  # (eval mode: running stats stay)
    opt.step()
    assert (fused.conv1.weight - before).abs().max() > 1e-3  # a step far larger than the tolerance
    tv_model.load_state_dict(fused.state_dict())  # the reference takes the stepped parameters
    assert _check(fused, tv_model, gen) <= FP32


def test_op_on_own_weights_sees_a_fused_optimizer_step(gen):
    """conv_bias_act on a caller's weight (the native CPU kernels keep a packed copy per
    weight): a fused optimizer's unversioned write is seen too."""
    from resnet_fused.ops import conv_bias_act

    weight = torch.nn.Parameter(torch.randn(16, 8, 3, 3, generator=gen))
    x = torch.randn(2, 8, 9, 9, generator=gen).contiguous(memory_format=torch.channels_last)
    for _ in range(2):  # packed on the first call, kept on the second
        with torch.no_grad():
            conv_bias_act(x, weight, None, None, 1, 1, relu=False)
    opt = torch.optim.SGD([weight], lr=1.0, fused=True)
    weight.grad = torch.randn(weight.shape, generator=gen)
    version = weight._version
    opt.step()
    assert weight._version == version  # the unversioned write this test is about
    with torch.no_grad():
        out = conv_bias_act(x, weight, None, None, 1, 1, relu=False)
    ref = torch.nn.functional.conv2d(x.double(), weight.detach().double(), padding=1)
    assert relative_error(out, ref) <= FP32


def test_fold_cache_refreshes_after_a_train_mode_forward(gen):
    """A train-mode forward updates BatchNorm's running statistics in place without
    bumping their versions (only num_batches_tracked's), so eval -> train forward ->
    eval must serve the new statistics."""
    tv_model = seeded_torchvision_model("resnet18", seed=27, calibration_size=32)
    fused = fused_twin(tv_model, arch="resnet18")
    assert _check(fused, tv_model, gen) <= FP32
    x = torch.randn(4, 3, 32, 32, generator=gen) + 3.0
    with torch.no_grad():
        for model in (tv_model, fused):
            model.train()(x)
            model.eval()
    assert _check(fused, tv_model, gen) <= FP32


def test_a_conv_edited_to_reflect_padding_after_fusing_is_not_folded(gen):
    """Whether a conv folds is asked again when what decides it changes on the same
    module (padding_mode), not only when the module is replaced."""
    seq = torch.nn.Sequential(torch.nn.Conv2d(8, 8, 3, padding=1, bias=False), torch.nn.BatchNorm2d(8),
                              torch.nn.ReLU()).eval()
    with torch.no_grad():
        seq[1].running_mean.normal_(generator=gen)
        seq[1].running_var.uniform_(0.5, 2.0, generator=gen)
    fused = resnet_fused.fuse(seq)
    x = torch.randn(2, 8, 7, 7, generator=gen)
    with torch.no_grad():
        fused(x)
        seq[0].padding_mode = fused[0].conv.padding_mode = "reflect"
        assert relative_error(fused(x), seq.double()(x.double())) <= FP32


@pytest.mark.parametrize("backend", ["torch", "native"])
def test_refold_after_edits_through_data(gen, backend):
    """``.data`` is a detached alias with a version counter of its own: no cache can see
    a write through it, so refold() is the documented step after one."""
    if backend not in resnet_fused.available_backends("cpu"):
        pytest.skip(f"{backend} does not run on the CPU here")
    tv_model = seeded_torchvision_model("resnet18", seed=25, calibration_size=32)
    fused = fused_twin(tv_model, arch="resnet18", backend=backend)
    if backend == "native":
        fused = fused.to(memory_format=torch.channels_last)
    assert _check(fused, tv_model, gen) <= FP32  # fills the fold and packed-weight caches
    for model in (tv_model, fused):
        model.layer1[0].conv1.weight.data.mul_(-2.0)
        model.layer2[1].bn2.running_var.data.fill_(5.0)
        model.conv1.weight.data.mul_(0.5)
    assert resnet_fused.refold(fused) >= 3
    assert _check(fused, tv_model, gen) <= FP32
    with pytest.raises(TypeError, match="model should be an nn.Module or None, got str"):
        resnet_fused.refold("resnet18")


def _ddp_rank(rank: int, world: int, rendezvous: str, out_dir: str) -> None:
    """One rank of test_refold_before_a_ddp_forward_sees_the_broadcast_statistics."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = resnet_fused.resnet18(num_classes=10)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        ddp.train()  # a step on each rank's own data: the running statistics part ways
        ddp(torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(100 + rank))).sum().backward()
        ddp.eval()
        x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(7))
        with torch.no_grad():
            model(x)  # the module itself: folds this rank's own statistics
            version = model.bn1.running_mean._version
            stale = ddp(x)  # DDP first broadcasts rank 0's statistics (unversioned in some torch releases)
            bumped = model.bn1.running_mean._version != version
            dropped = resnet_fused.refold(model)
            out = ddp(x)
            twin = resnet_fused.resnet18(num_classes=10)
            twin.load_state_dict(model.state_dict())  # rank 0's statistics, folded afresh
            ref = twin.eval()(x)
        torch.save({"stale": stale, "out": out, "ref": ref, "dropped": dropped, "bumped": bumped},
                   os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")
def test_refold_before_a_ddp_forward_sees_the_broadcast_statistics(tmp_path):
    """DistributedDataParallel(broadcast_buffers=True) copies rank 0's running statistics
    into the other ranks' before each forward without a version bump, so a rank that
    folded its own (an eval forward of the module itself) would keep them: refold(model)
    before the DDP forward is the documented step (README, FoldCache). Two gloo ranks on the CPU."""
    torch.multiprocessing.spawn(_ddp_rank, args=(2, str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"{rank}.pt") for rank in range(2)]
    for rank in ranks:
        assert rank["dropped"] > 0
        assert relative_error(rank["out"], rank["ref"]) <= FP32
    assert relative_error(ranks[1]["out"], ranks[0]["out"]) <= FP32
    # what refold is for: where the broadcast leaves the version counters alone (torch 2.14),
    # rank 1 answered from its own statistics without it; where it bumps them (torch 2.11),
    # the fold cache saw the new statistics by itself
    if ranks[1]["bumped"]:
        assert relative_error(ranks[1]["stale"], ranks[0]["out"]) <= FP32
    else:
        assert relative_error(ranks[1]["stale"], ranks[0]["out"]) > 100 * FP32


def test_fold_cache_refreshes_after_dtype_round_trip(gen):
    tv_model = seeded_torchvision_model("resnet18", seed=23, calibration_size=32)
    fused = fused_twin(tv_model, arch="resnet18")
    assert _check(fused, tv_model, gen) <= FP32
    fused.double()
    x = torch.randn(2, 3, 32, 32, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        assert relative_error(fused(x), copy.deepcopy(tv_model).double()(x)) <= TOLERANCES[torch.float64]
    fused.float()
    assert _check(fused, tv_model, gen) <= FP32


def test_eval_mode_gradients_reach_the_parameters(gen):
    tv_model = seeded_torchvision_model("resnet18", seed=24, calibration_size=32).double()
    fused = fused_twin(tv_model, arch="resnet18").double()
    x = torch.randn(2, 3, 32, 32, generator=gen, dtype=torch.float64)
    tv_model(x).sum().backward()
    fused(x).sum().backward()
    for (name, p_tv), p_fused in zip(tv_model.named_parameters(), fused.parameters(), strict=True):
        torch.testing.assert_close(p_fused.grad, p_tv.grad, rtol=1e-9, atol=1e-12, msg=name)


BAD_MODEL_INPUTS = [
    ("wrong channel count", lambda g: torch.randn(1, 4, 32, 32, generator=g), r"x should have 3 channels .* got 4"),
    ("non-4D input", lambda g: torch.randn(3, 32, 32, generator=g), r"x should be 4-D .* got 3-D"),
    ("integer input", lambda g: torch.randint(0, 255, (1, 3, 32, 32), generator=g), r"floating-point .* got torch.int64"),
    ("dtype mismatch", lambda g: torch.randn(1, 3, 32, 32, generator=g).half(), r"weight dtype should match x"),
]


@pytest.mark.parametrize("case", BAD_MODEL_INPUTS, ids=[c[0] for c in BAD_MODEL_INPUTS])
def test_bad_model_input_is_named_in_the_error(case, gen):
    _, make, pattern = case
    model = resnet_fused.resnet18().eval()
    with pytest.raises(ValueError, match=pattern), torch.no_grad():
        model(make(gen))


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_gpu_parity_with_torchvision(arch, dtype):
    from resnet_fused.validate import run_validation

    results = run_validation(archs=[arch], devices=["cuda"], dtypes=[dtype], image_size=64)
    assert results, "nothing ran"
    for r in results:
        assert r.status in ("PASS", "SKIP"), r


@pytest.mark.gpu
def test_gpu_activations_run_channels_last():
    model = resnet_fused.resnet50().eval().cuda().half()
    seen = []
    model.layer2.register_forward_hook(lambda m, i, o: seen.append(o.is_contiguous(memory_format=torch.channels_last)))
    with torch.no_grad():
        model(torch.randn(2, 3, 64, 64, device="cuda", dtype=torch.half))
    assert seen == [True]


@pytest.mark.parametrize("backend", ["torch", "native"])
def test_a_cpu_forward_copies_no_weight(gen, backend):
    """The fused ResNet runs NHWC on the CPU too, where aten's conv brings the weight into
    the layout it reads from x's strides, copying it on every call when they differ (a 2.4
    MB copy for layer4's 3x3 conv, more time than its conv at small images). The folded
    weights take that layout, also at 1x1 outputs, which are both layouts by shape but
    NHWC by their strides. The profiler would show any such copy."""
    if backend not in resnet_fused.available_backends("cpu"):
        pytest.skip(f"{backend} does not run on the CPU here")
    tv_model = seeded_torchvision_model("resnet18", seed=4, calibration_size=8)
    fused = fused_twin(tv_model, arch="resnet18", backend=backend)
    weight_shapes = {tuple(p.shape) for p in fused.parameters() if p.dim() == 4}
    x = torch.randn(2, 3, 32, 32, generator=gen)  # (layer3 at 2x2, layer4 at 1x1)
    with torch.inference_mode():
        fused(x)  # folds, and packs what the backend packs (native's oneDNN convs: on the second call)
        out = fused(x)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
            again = fused(x)
    copies = [e.input_shapes for e in prof.events() if e.name == "aten::copy_"
              and e.input_shapes and tuple(e.input_shapes[0]) in weight_shapes]
    assert copies == []
    assert torch.equal(out, again)
    assert relative_error(out, copy.deepcopy(tv_model).double()(x.double())) <= FP32


def test_a_fused_model_pickles_and_folds_again(tmp_path, gen):
    tv_model = seeded_torchvision_model("resnet18", seed=25, calibration_size=32)
    fused = fused_twin(tv_model, arch="resnet18")
    assert _check(fused, tv_model, gen) <= FP32  # fills the caches
    torch.save(fused, tmp_path / "m.pt")
    loaded = torch.load(tmp_path / "m.pt", weights_only=False)
    assert _check(loaded, tv_model, gen) <= FP32


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")  # the argument checks read traced shapes
@pytest.mark.filterwarnings("ignore:`torch.jit.trace.*` is deprecated:FutureWarning")
@pytest.mark.parametrize("backend", ["torch", "native"])
@pytest.mark.parametrize("warm", [False, True], ids=["cold", "warm"])
def test_a_traced_fused_model_folds_its_parameters(gen, backend, warm):
    """torch.jit.trace records the fold from the parameters, whether or not a forward
    filled the cache first (a cached fold was a constant: the trace's own check failed on
    a cold cache, and on a warm one load_state_dict into the traced module changed nothing),
    and the op as one node."""
    if backend not in resnet_fused.available_backends("cpu"):
        pytest.skip(f"{backend} does not run on the CPU here")
    tv_model = seeded_torchvision_model("resnet18", seed=26, calibration_size=32)
    fused = fused_twin(tv_model, arch="resnet18", backend=backend)
    x = torch.randn(2, 3, 32, 32, generator=gen)
    with torch.no_grad():
        if warm:
            fused(x)
        traced = torch.jit.trace(fused, x)  # (check_trace: traced twice, the graphs compared)
        assert "resnet_fused::conv_bias_act" in {n.kind() for n in traced.inlined_graph.nodes()}
        assert relative_error(traced(x), copy.deepcopy(tv_model).double()(x.double())) <= FP32
        other = seeded_torchvision_model("resnet18", seed=27, calibration_size=32)
        traced.load_state_dict(other.state_dict())
        assert relative_error(traced(x), other.double()(x.double())) <= FP32


@pytest.mark.parametrize("block, fused_block, layers", [
    (tv_resnet.BasicBlock, FusedBasicBlock, [1, 2, 1, 1]),
    (FusedBottleneck, FusedBottleneck, [1, 1, 2, 1]),
])
def test_resnet_is_built_like_torchvisions_and_is_one(gen, block, fused_block, layers):
    """ResNet(block, layers, ...) takes torchvision's arguments; the fused classes are
    subclasses of torchvision's, so isinstance checks in user code keep working."""
    width = 64 if block is tv_resnet.BasicBlock else 32  # (torchvision's BasicBlock takes 64 only)
    fused = resnet_fused.ResNet(block, layers, num_classes=7, width_per_group=width, backend="torch").eval()
    tv_block = {FusedBottleneck: tv_resnet.Bottleneck}.get(block, block)
    tv_model = tv_resnet.ResNet(tv_block, layers, num_classes=7, width_per_group=width).eval()
    assert isinstance(fused, torchvision.models.ResNet) and fused.backend == "torch"
    assert all(isinstance(m, tv_block) and type(m) is fused_block for m in fused.layer3)
    assert list(fused.state_dict()) == list(tv_model.state_dict())
    randomize_batchnorm_(fused.train(), seed=5).eval()  # realistic statistics, not the init's
    tv_model.load_state_dict(fused.state_dict())
    x = torch.randn(2, 3, 32, 32, generator=gen)
    with torch.no_grad():
        assert relative_error(fused(x), copy.deepcopy(tv_model).double()(x.double())) <= FP32
    with pytest.raises(ValueError, match="cannot build a fused FusedBasicBlock: conv1/bn1: GroupNorm"):
        FusedBasicBlock(8, 8, norm_layer=lambda c: torch.nn.GroupNorm(2, c))


def test_a_subclass_overriding_forward_impl_is_obeyed(gen):
    """torchvision's ResNet.forward calls _forward_impl, which subclasses override (feature
    extractors); the fused ResNet keeps that contract."""

    class Features(resnet_fused.ResNet):
        def _forward_impl(self, x):
            return self.layer1(self.maxpool(self.relu(self.bn1(self.conv1(x)))))

    model = Features(tv_resnet.BasicBlock, [1, 1, 1, 1], backend="torch").eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32, generator=gen)).shape == (1, 64, 8, 8)


def test_sync_batchnorm_after_fusing_trains_and_folds_like_torchvision(gen):
    """nn.SyncBatchNorm.convert_sync_batchnorm on a fused model: train mode uses batch
    statistics and updates the running ones exactly as torchvision; eval mode folds them."""
    tv_model = seeded_torchvision_model("resnet18", seed=12, calibration_size=32)
    fused = fused_twin(tv_model, arch="resnet18")
    tv_model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(tv_model).train()
    fused = torch.nn.SyncBatchNorm.convert_sync_batchnorm(fused).train()
    assert isinstance(fused.bn1, torch.nn.SyncBatchNorm) and isinstance(fused.layer1[0].bn1, torch.nn.SyncBatchNorm)
    x = torch.randn(4, 3, 32, 32, generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), tv_model(x), rtol=1e-6, atol=1e-6)
    for (name, b_tv), b_fused in zip(tv_model.named_buffers(), fused.buffers(), strict=True):
        torch.testing.assert_close(b_fused, b_tv, rtol=1e-6, atol=1e-7, msg=name)
    tv_model.eval(), fused.eval()
    assert _check(fused, tv_model, gen) <= FP32


@pytest.mark.parametrize("edit", ["stem_conv_sequential", "stem_bn_groupnorm", "block_bn_identity", "block_relu_gelu",
                                  "downsample_replaced", "bn_without_running_stats"])
def test_modules_swapped_in_after_fusing_run_as_they_are(edit, gen):
    """Editing a fused model (a new stem, a norm layer that cannot be folded, another
    activation) gives what the same edit gives torchvision's model, not an error."""
    tv_model = seeded_torchvision_model("resnet18", seed=13, calibration_size=32)
    fused = fused_twin(tv_model, arch="resnet18")
    for model in (tv_model, fused):
        torch.manual_seed(0)  # the same new modules in both
        if edit == "stem_conv_sequential":
            model.conv1 = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3, 2, 1, bias=False),
                                              torch.nn.Conv2d(32, 64, 3, 1, 1, bias=False))
        elif edit == "stem_bn_groupnorm":
            model.bn1 = torch.nn.GroupNorm(8, 64)
        elif edit == "block_bn_identity":
            model.layer1[0].bn1 = torch.nn.Identity()
        elif edit == "block_relu_gelu":
            model.layer2[1].relu = torch.nn.GELU()
        elif edit == "downsample_replaced":
            model.layer3[0].downsample = torch.nn.Conv2d(128, 256, 1, 2, bias=True)
        else:
            model.layer4[0].bn2 = torch.nn.BatchNorm2d(512, track_running_stats=False)
    # statistics calibrated for the edited net (else activations grow: logits ~100), shared
    randomize_batchnorm_(tv_model, seed=13, calibration_size=32)
    fused.load_state_dict(tv_model.state_dict(), strict=True)
    assert _check(fused.eval(), tv_model.eval(), gen) <= FP32


def test_autocast_casts_the_fused_convs_as_it_casts_conv2d(gen):
    """Under torch.autocast the fused convs compute in the autocast dtype, as torchvision's do."""
    tv_model = seeded_torchvision_model("resnet18", seed=14, calibration_size=32)
    fused = fused_twin(tv_model, arch="resnet18")
    seen = {}
    for name, model in (("tv", tv_model), ("fused", fused)):
        model.avgpool.register_forward_pre_hook(lambda m, args, name=name: seen.__setitem__(name, args[0].dtype))
    x = torch.randn(2, 3, 32, 32, generator=gen)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out, out_tv = fused(x), tv_model(x)
    assert seen == {"tv": torch.bfloat16, "fused": torch.bfloat16} and out.dtype == out_tv.dtype
    ref = copy.deepcopy(tv_model).double()(x.double())
    assert relative_error(out, ref) <= max(TOLERANCES[torch.bfloat16], 2 * relative_error(out_tv, ref))


@pytest.mark.parametrize("backend", ["native", "torch"])
def test_explain_model_names_each_conv_and_its_path(gen, backend):
    """explain_model lists every conv of the model once: the fused ones in call order (the
    downsample before its block's conv1, the residual on each block's last conv, which is
    written into the identity's buffer on the native CPU backend), each with its backend's
    own explanation; it does not change what the forward computes."""
    if backend not in resnet_fused.available_backends("cpu"):
        pytest.skip(f"{backend} does not run on the CPU here")
    tv = seeded_torchvision_model("resnet50", seed=5)
    fused = fused_twin(tv, arch="resnet50", backend=backend)
    x = torch.randn(2, 3, 32, 32, generator=gen)
    rows = resnet_fused.explain_model(fused, x)
    convs = [name for name, m in fused.named_modules() if isinstance(m, torch.nn.Conv2d)]
    assert sorted(r["module"] for r in rows) == sorted(convs) and all(r["fused"] for r in rows)
    order = [r["module"] for r in rows]
    assert order[:5] == ["conv1", "layer1.0.downsample.0", "layer1.0.conv1", "layer1.0.conv2", "layer1.0.conv3"]
    assert [r["module"] for r in rows if r["residual"]] == [f"layer{i}.{j}.conv3" for i, n in
                                                           ((1, 3), (2, 4), (3, 6), (4, 3)) for j in range(n)]
    assert all(r["relu"] == (not r["module"].endswith("downsample.0")) for r in rows)
    assert rows[1]["input"] == [2, 64, 8, 8] and rows[1]["weight"] == [256, 64, 1, 1] and rows[1]["dtype"] == "float32"
    assert all(r["path"].startswith(f"runs on '{backend}'") for r in rows), rows
    if backend == "native":
        assert "Winograd" in rows[3]["path"]  # layer1's 3x3 at 8x8
        assert any("in place" in r["path"] for r in rows if r["residual"])
    with torch.no_grad():
        assert relative_error(fused(x), tv.double()(x.double())) <= TOLERANCES[torch.float32]


def test_explain_model_lists_the_convs_that_ran_unfused(gen):
    """A hook on a BatchNorm makes its block run torchvision's forward: its convs come
    after the fused ones, unfused; a conv outside any fused module too. Train mode and a
    non-module are refused."""
    model = torch.nn.Sequential(resnet_fused.resnet18(backend="torch"), torch.nn.Unflatten(1, (10, 10, 10)),
                                torch.nn.Conv2d(10, 4, 3)).eval()
    model[0].layer2[0].bn1.register_forward_hook(lambda *args: None)
    rows = resnet_fused.explain_model(model, torch.randn(1, 3, 32, 32, generator=gen))
    unfused = [r["module"] for r in rows if not r["fused"]]
    assert unfused == ["0.layer2.0.conv1", "0.layer2.0.conv2", "0.layer2.0.downsample.0", "2"]
    assert len(rows) == 21 and all(r["fused"] for r in rows[:-4])
    assert all(r["path"].startswith("unfused: ") and r["input"] is None for r in rows[-4:])
    with pytest.raises(ValueError, match=r"eval mode \(model.eval\(\)\)"):
        resnet_fused.explain_model(model.train(), torch.randn(1, 3, 32, 32))
    with pytest.raises(TypeError, match="model should be an nn.Module, got function"):
        resnet_fused.explain_model(lambda x: x, torch.randn(1))
