"""fuse()/unfuse() on torchvision models, detection/segmentation backbones and plain containers."""
import copy
import re

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models import resnet as tv_resnet
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.ops.misc import FrozenBatchNorm2d

import resnet_fused
from resnet_fused import FusedBasicBlock, FusedBottleneck, FusedConvBNAct
from resnet_fused.testing import TOLERANCES, randomize_batchnorm_, relative_error, seeded_torchvision_model

FP32 = TOLERANCES[torch.float32]
FUSED_TYPES = (resnet_fused.ResNet, FusedBasicBlock, FusedBottleneck, FusedConvBNAct)


def count(model, types):
    return sum(isinstance(m, types) for m in model.modules())


def assert_same_tensors(a: nn.Module, b: nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("arch", ["resnet18", "resnext50_32x4d"])
def test_fuse_then_unfuse_is_bit_exact(arch, gen):
    tv_model = seeded_torchvision_model(arch, seed=2, calibration_size=32)
    fused = resnet_fused.fuse(tv_model)
    assert isinstance(fused, resnet_fused.ResNet) and type(tv_model) is tv_resnet.ResNet  # not in place
    assert_same_tensors(fused, tv_model)
    x = torch.randn(2, 3, 32, 32, generator=gen)
    with torch.no_grad():
        assert relative_error(fused(x), copy.deepcopy(tv_model).double()(x.double())) <= FP32
    back = resnet_fused.unfuse(fused)
    assert count(back, FUSED_TYPES) == 0
    assert type(back) is tv_resnet.ResNet
    assert str(back) == str(tv_model)
    assert_same_tensors(back, tv_model)
    with torch.no_grad():
        assert torch.equal(back(x), tv_model(x))


def test_fuse_inplace_keeps_the_tensors_and_the_object(gen):
    tv_model = seeded_torchvision_model("resnet18", seed=3, calibration_size=32)
    ref_model = copy.deepcopy(tv_model)
    weight = tv_model.layer1[0].conv1.weight
    fused = resnet_fused.fuse(tv_model, inplace=True)
    assert fused is tv_model and type(tv_model) is resnet_fused.ResNet  # no half-fused original left behind
    assert fused.layer1[0].conv1.weight is weight
    x = torch.randn(2, 3, 32, 32, generator=gen)
    with torch.no_grad():
        assert relative_error(tv_model(x), ref_model.double()(x.double())) <= FP32
    back = resnet_fused.unfuse(fused, inplace=True)
    assert back is tv_model and type(back) is tv_resnet.ResNet
    assert back.layer1[0].conv1.weight is weight
    block = copy.deepcopy(ref_model.layer2[0]).float()
    assert resnet_fused.fuse(block, inplace=True) is block and type(block) is FusedBasicBlock


def test_fuse_rejects_unknown_backend_and_non_modules():
    with pytest.raises(ValueError, match=r"unknown backend 'tensorrt'; valid backends are 'auto', 'torch'"):
        resnet_fused.fuse(torchvision.models.resnet18(), backend="tensorrt")
    with pytest.raises(TypeError, match="expects an nn.Module, got dict"):
        resnet_fused.fuse({})


def fasterrcnn_resnet50_fpn_frozen(**kwargs):
    """torchvision's fasterrcnn_resnet50_fpn as built for pretrained weights (FrozenBatchNorm2d
    backbone), without downloading them: the same calls its builder makes."""
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    from torchvision.models.detection.faster_rcnn import FasterRCNN

    backbone = torchvision.models.resnet50(norm_layer=FrozenBatchNorm2d)
    return FasterRCNN(_resnet_fpn_extractor(backbone, 3), **kwargs)


@pytest.mark.slow
@pytest.mark.parametrize(
    "builder, kwargs",
    [
        (torchvision.models.segmentation.fcn_resnet50, {"weights_backbone": None}),
        (torchvision.models.segmentation.deeplabv3_resnet50, {"weights_backbone": None}),
        (fasterrcnn_resnet50_fpn_frozen, {"min_size": 96, "max_size": 128}),
    ],
    ids=["fcn_resnet50", "deeplabv3_resnet50 (dilated)", "fasterrcnn_resnet50_fpn (FrozenBatchNorm2d)"],
)
def test_fuse_torchvision_detection_and_segmentation(builder, kwargs, gen):
    torch.manual_seed(0)
    model = builder(num_classes=5, **kwargs)
    is_detector = "min_size" in kwargs
    randomize_batchnorm_(model.backbone if is_detector else model, seed=4, calibration_size=64)
    model.eval()
    if is_detector:
        assert count(model, (FrozenBatchNorm2d,)) == 53 and count(model, (nn.BatchNorm2d,)) == 0
    fused = resnet_fused.fuse(model)
    assert count(fused, (FusedBottleneck,)) == 16, "every backbone Bottleneck is fused"
    assert count(fused, (FusedConvBNAct,)) >= 1, "the stem conv->bn->relu is fused"
    assert_same_tensors(fused, model)  # the state_dict keys are the unfused model's: its checkpoints load
    fused.load_state_dict(model.state_dict(), strict=True)
    assert_same_tensors(resnet_fused.unfuse(fused), model)
    x = torch.randn(1, 3, 64, 64, generator=gen)
    with torch.no_grad():
        if is_detector:
            ref_model = copy.deepcopy(model).double()
            ref = ref_model.backbone(ref_model.transform([x.double()[0]])[0].tensors)
            out = fused.backbone(fused.transform([x[0]])[0].tensors)
            for key in ref:
                assert relative_error(out[key], ref[key]) <= FP32, key
            # and the whole detector runs end to end on the fused backbone
            fused([x[0]])
        else:
            ref = copy.deepcopy(model).double()(x.double())
            out = fused(x)
            for key in ref:
                assert relative_error(out[key], ref[key]) <= FP32, key


def test_sequential_conv_bn_relu_runs_are_fused(gen):
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=True), nn.BatchNorm2d(8), nn.ReLU(),  # conv+bn+relu
        nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=2, bias=False), nn.BatchNorm2d(8),  # conv+bn, no relu
        nn.Conv2d(8, 4, 1), FrozenBatchNorm2d(4), nn.ReLU(inplace=True),  # frozen BN
        nn.Conv2d(4, 4, 3, padding=1), nn.GroupNorm(2, 4),  # not a BatchNorm: left alone
    )
    randomize_batchnorm_(model, seed=5, calibration_size=16)
    fused = resnet_fused.fuse(model)
    kinds = [type(m).__name__ for m in fused]
    assert kinds == ["FusedConvBNAct", "FoldedAway", "FoldedAway", "FusedConvBNAct", "FoldedAway",
                     "FusedConvBNAct", "FoldedAway", "FoldedAway", "Conv2d", "GroupNorm"]
    assert fused[0].act is not None and fused[3].act is None
    # state_dict keys (and the BatchNorms' versions) are the unfused ones, both ways
    assert_same_tensors(fused, model)
    assert fused.state_dict()._metadata["1"] == model.state_dict()._metadata["1"] == {"version": 2}
    assert "0.conv.weight" in dict(fused.named_parameters())  # (the modules themselves are regrouped)
    other = copy.deepcopy(model)
    randomize_batchnorm_(other, seed=6, calibration_size=16)
    for m in other.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight)
    fused.load_state_dict(other.state_dict(), strict=True)
    assert_same_tensors(fused, other)
    model.load_state_dict(copy.deepcopy(fused).state_dict(), strict=True)
    fused.load_state_dict({k.replace("0.", "0.conv.", 1) if k.startswith("0.") else k: v
                           for k, v in other.state_dict().items()}, strict=True)  # the regrouped keys load too
    with pytest.raises(RuntimeError, match=r'Unexpected key\(s\) in state_dict: "1.extra"'):
        fused.load_state_dict({**other.state_dict(), "1.extra": torch.zeros(1)}, strict=True)
    partial = {k: v for k, v in other.state_dict().items() if k != "1.running_var"}
    with pytest.raises(RuntimeError, match=r'Missing key\(s\) in state_dict: "1.running_var"'):
        fused.load_state_dict(partial, strict=True)
    assert fused.state_dict()._metadata.keys() == model.state_dict()._metadata.keys()
    x = torch.randn(2, 3, 16, 16, generator=gen)
    with torch.no_grad():
        assert relative_error(fused(x), copy.deepcopy(model).double()(x.double())) <= FP32
    back = resnet_fused.unfuse(fused)
    assert [type(m) for m in back] == [type(m) for m in model]
    assert_same_tensors(back, model)


def test_a_conv_whose_output_feeds_anything_else_is_not_fused(gen):
    tv_model = seeded_torchvision_model("resnet18", seed=6, calibration_size=32)
    # IntermediateLayerGetter returns conv1's own output as well: it must stay unfused.
    getter = IntermediateLayerGetter(tv_model, return_layers={"conv1": "stem_conv", "layer1": "c2"})
    fused = resnet_fused.fuse(getter)
    assert type(fused.conv1) is nn.Conv2d and type(fused.bn1) is nn.BatchNorm2d
    x = torch.randn(2, 3, 32, 32, generator=gen)
    with torch.no_grad():
        out, ref = fused(x), copy.deepcopy(getter).double()(x.double())
    for key in ref:
        assert relative_error(out[key], ref[key]) <= FP32, key
    # returning the BatchNorm's output allows conv+bn but not the ReLU after it
    getter = IntermediateLayerGetter(tv_model, return_layers={"bn1": "stem_bn", "layer1": "c2"})
    fused = resnet_fused.fuse(getter)
    assert isinstance(fused.conv1, FusedConvBNAct) and fused.conv1.act is None and type(fused.relu) is nn.ReLU
    with torch.no_grad():
        out, ref = fused(x), copy.deepcopy(getter).double()(x.double())
    for key in ref:
        assert relative_error(out[key], ref[key]) <= FP32, key
    # a hook on the conv sees its output: not fused
    seq = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    seq[0].register_forward_hook(lambda m, i, o: None)
    assert type(resnet_fused.fuse(seq)[0]) is nn.Conv2d
    # a container with its own forward may use the conv output anywhere: not touched
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y

    assert type(resnet_fused.fuse(Branchy()).conv) is nn.Conv2d


@pytest.mark.parametrize("when", ["before_fusing", "after_fusing"])
def test_hooks_on_modules_inside_fused_ones_still_fire(gen, when):
    """A fused forward skips calling conv, bn and relu; while any of them (or a global
    hook) is watched, the fused modules run them so every hook sees what it would unfused."""
    tv_model = seeded_torchvision_model("resnet50", seed=7, calibration_size=32).eval()
    names = ["conv1", "bn1", "relu", "layer1.0.conv1", "layer1.0.bn2", "layer1.0.relu",
             "layer2.0.downsample.0", "layer3.1.conv3"]

    def watch(model, seen):
        for name in names:
            model.get_submodule(name).register_forward_hook(
                lambda m, i, o, name=name: seen.append((name, tuple(o.shape), o.detach().double().sum().item())))

    seen_tv, seen_fused = [], []
    watch(tv_model, seen_tv)
    fused = resnet_fused.fuse(tv_model) if when == "before_fusing" else None
    if fused is None:
        plain = copy.deepcopy(tv_model)
        plain._forward_hooks.clear()
        for m in plain.modules():
            m._forward_hooks.clear()
        fused = resnet_fused.fuse(plain)
        watch(fused, seen_fused)
    else:
        for m in fused.modules():  # the deep copy carried the hooks (appending to seen_tv)
            m._forward_hooks.clear()
        watch(fused, seen_fused)
    x = torch.randn(2, 3, 32, 32, generator=gen)
    with torch.no_grad():
        out, ref = fused(x), tv_model(x)
    assert relative_error(out, ref.double()) <= FP32
    assert [s[:2] for s in seen_fused] == [s[:2] for s in seen_tv] and len(seen_tv) == 10  # a block runs its relu 3 times
    for (name, _, a), (_, _, b) in zip(seen_fused, seen_tv):
        assert abs(a - b) <= 1e-4 * max(1.0, abs(b)), name
    seen_global = []
    handle = torch.nn.modules.module.register_module_forward_hook(
        lambda m, i, o: seen_global.append(type(m).__name__) if isinstance(m, nn.Conv2d) else None)
    try:
        with torch.no_grad():
            assert relative_error(fused(x), ref.double()) <= FP32
    finally:
        handle.remove()
    assert seen_global.count("Conv2d") == sum(isinstance(m, nn.Conv2d) for m in tv_model.modules())


def test_the_hook_walk_ends_on_a_module_graph_with_a_cycle():
    """watched() (is a hook anywhere under these modules?) walks children itself, for
    speed: a module that holds itself among its children must not make it loop."""
    from resnet_fused.modules import watched

    looped = nn.Sequential(nn.ReLU(), nn.Sequential(nn.Identity()))
    looped[1].add_module("back", looped)
    assert watched(looped) is False
    looped[1][0].register_forward_hook(lambda *args: None)
    assert watched(looped) is True


def test_backward_hooks_inside_fused_modules_still_fire(gen):
    tv_model = seeded_torchvision_model("resnet18", seed=8, calibration_size=32).eval()
    fused = resnet_fused.fuse(tv_model)
    seen = {"tv": 0, "fused": 0}
    for key, model in (("tv", tv_model), ("fused", fused)):
        model.layer2[1].conv1.register_full_backward_hook(lambda m, gi, go, key=key: seen.__setitem__(key, seen[key] + 1))
    x = torch.randn(2, 3, 32, 32, generator=gen)
    tv_model(x).sum().backward()
    fused(x).sum().backward()
    assert seen == {"tv": 1, "fused": 1}


def test_blocks_with_non_relu_activation_are_left_alone():
    model = torchvision.models.resnet18()
    model.layer1[0].relu = nn.SiLU()
    fused = resnet_fused.fuse(model)
    assert type(fused.layer1[0]) is tv_resnet.BasicBlock
    assert type(fused.layer1[1]) is FusedBasicBlock


class _ScaledBatchNorm(nn.BatchNorm2d):
    """A norm layer computing something else than BatchNorm: folding it would be wrong."""

    def forward(self, x):
        return super().forward(x) * 2


class _ShiftedFrozenBatchNorm(FrozenBatchNorm2d):
    def forward(self, x):
        return super().forward(x) + 1


class _QuietBatchNorm(nn.BatchNorm2d):
    """A norm layer with other construction defaults only: it is a BatchNorm, it folds."""

    def __init__(self, num_features):
        super().__init__(num_features, eps=1e-3, momentum=0.01)


@pytest.mark.parametrize("norm_layer, fused_blocks", [(_ScaledBatchNorm, 0), (_ShiftedFrozenBatchNorm, 0),
                                                       (_QuietBatchNorm, 8)])
def test_a_norm_layer_overriding_forward_is_not_folded(norm_layer, fused_blocks, gen):
    tv_model = seeded_torchvision_model("resnet18", seed=4, calibration_size=32, norm_layer=norm_layer)
    fused = resnet_fused.fuse(tv_model)
    assert count(fused, (FusedBasicBlock, FusedConvBNAct)) == fused_blocks
    reason = resnet_fused.fold.foldable_batchnorm(tv_model.conv1, tv_model.bn1)
    assert (reason is None) == (fused_blocks > 0), reason
    x = torch.randn(2, 3, 32, 32, generator=gen)
    with torch.no_grad():
        assert relative_error(fused(x), copy.deepcopy(tv_model).double()(x.double())) <= FP32


@pytest.mark.slow
def test_torch_compile_fullgraph_over_fused_resnet18(gen):
    tv_model = seeded_torchvision_model("resnet18", seed=8, calibration_size=32)
    fused = resnet_fused.resnet18(backend="torch")
    fused.load_state_dict(tv_model.state_dict())
    fused.eval()
    compiled = torch.compile(fused, fullgraph=True)
    x = torch.randn(2, 3, 32, 32, generator=gen)
    with torch.no_grad():
        out = compiled(x)
        ref = copy.deepcopy(tv_model).double()(x.double())
    assert relative_error(out, ref) <= FP32


@pytest.mark.parametrize("nested", [False, True])
def test_a_missing_batch_count_is_reported_as_the_unfused_model_reports_it(nested):
    """BatchNorm's checkpoint version decides whether a missing num_batches_tracked is a
    missing key (version 2) or silently kept (older or no metadata). After fuse() that
    metadata is saved under the BatchNorm's old name, which no longer loads it: the fused
    container must still report the key exactly where the unfused one does, also nested
    (where its load hook does not see the checkpoint's metadata)."""
    def build():
        torch.manual_seed(0)
        run = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                            nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4, track_running_stats=False))
        return nn.Sequential(run) if nested else run

    model = build().eval()
    randomize_batchnorm_(model, seed=3, calibration_size=8)
    fused = resnet_fused.fuse(build().eval())
    outer = "0." if nested else ""
    key, fused_key = f"{outer}1.num_batches_tracked", f"{outer}0.bn.num_batches_tracked"
    full = model.state_dict()
    without = copy.copy(full)  # (keeps the metadata: versions 2)
    del without[key]
    old = copy.copy(without)
    old._metadata = copy.deepcopy(full._metadata)
    old._metadata[key.rsplit(".", 1)[0]]["version"] = 1
    for m, buffer in ((model, key), (fused, fused_key)):
        m.load_state_dict(full, strict=True)
        assert m.load_state_dict(without, strict=False).missing_keys == [key]
        with pytest.raises(RuntimeError, match=rf'Missing key\(s\) in state_dict: "{re.escape(key)}"'):
            m.load_state_dict(without, strict=True)
        assert str(m.load_state_dict(dict(without), strict=True)) == "<All keys matched successfully>"  # no metadata
        assert str(m.load_state_dict(old, strict=True)) == "<All keys matched successfully>"
        assert torch.equal(m.get_buffer(buffer), full[key])  # the count it had is kept
        assert str(m.load_state_dict(full, strict=True)) == "<All keys matched successfully>"  # nothing left over
    assert_same_tensors(fused, model)


def test_frozen_batchnorm_runs_load_what_they_load_unfused(gen):
    """A checkpoint with BatchNorm2d keys loads into a FrozenBatchNorm2d container, fused or
    not: FrozenBatchNorm2d drops num_batches_tracked itself (as detection backbones do)."""
    trained = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
    randomize_batchnorm_(trained, seed=7, calibration_size=16)
    frozen = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), FrozenBatchNorm2d(8), nn.ReLU())
    fused = resnet_fused.fuse(frozen)
    assert isinstance(fused[0], FusedConvBNAct)
    assert str(frozen.load_state_dict(trained.state_dict(), strict=True)) == "<All keys matched successfully>"
    assert str(fused.load_state_dict(trained.state_dict(), strict=True)) == "<All keys matched successfully>"
    x = torch.randn(2, 3, 9, 9, generator=gen)
    with torch.no_grad():
        assert relative_error(fused(x), trained.eval().double()(x.double())) <= FP32


def test_unfuse_turns_a_hand_built_fused_module_into_plain_ones(gen):
    """A FusedConvBNAct built by hand has no places of its own in its container: it
    becomes an nn.Sequential of its conv, bn (and act) under the same names, keys and
    outputs unchanged, and the container's other modules stay where they are."""
    conv, bn = nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4)
    with torch.no_grad():
        bn.running_mean.normal_(generator=gen)
        bn.running_var.uniform_(0.5, 2.0, generator=gen)
    for act in (None, nn.ReLU()):
        model = nn.Sequential(resnet_fused.FusedConvBNAct(conv, bn, act), nn.Conv2d(4, 8, 1)).eval()
        plain = resnet_fused.unfuse(model)
        assert [type(m) for m in plain] == [nn.Sequential, nn.Conv2d]
        assert [type(m) for m in plain[0]] == [nn.Conv2d, nn.BatchNorm2d] + ([nn.ReLU] if act else [])
        assert list(plain.state_dict()) == list(model.state_dict())
        x = torch.randn(2, 3, 9, 9, generator=gen)
        with torch.no_grad():
            torch.testing.assert_close(plain(x), model(x), rtol=1e-5, atol=1e-5)
    assert type(resnet_fused.unfuse(resnet_fused.FusedConvBNAct(conv, bn))) is nn.Sequential


def test_fusing_a_fused_model_again_takes_the_new_backend():
    model = resnet_fused.resnet18(backend="native")
    again = resnet_fused.fuse(model, backend="torch")
    fused = [m for m in again.modules() if hasattr(m, "backend")]
    assert len(fused) == 1 + 8 and {m.backend for m in fused} == {"torch"}
    seq = resnet_fused.fuse(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), backend="native")
    assert resnet_fused.fuse(seq, backend="torch")[0].backend == "torch"


def test_torchvision_feature_extraction_traces_a_fused_model(gen):
    """torch.fx's symbolic tracing (create_feature_extractor) traces torchvision's own
    forward: the graph and its node names are torchvision's, and the model is left as it
    was (in eval mode). With the fused blocks as leaf modules the blocks stay fused."""
    from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

    tv_model = seeded_torchvision_model("resnet18", seed=6, calibration_size=32)
    fused = resnet_fused.fuse(copy.deepcopy(tv_model))
    assert get_graph_node_names(fused) == get_graph_node_names(tv_model)
    nodes = ["layer1.0.relu", "layer3", "layer4"]
    x = torch.randn(2, 3, 32, 32, generator=gen)
    reference = create_feature_extractor(copy.deepcopy(tv_model).double(), nodes)(x.double())
    for leaves in ([], [FusedBasicBlock]):  # (a node inside a leaf block is no node)
        wanted = nodes[1:] if leaves else nodes
        extractor = create_feature_extractor(fused, wanted, tracer_kwargs={"leaf_modules": leaves})
        assert not fused.training
        with torch.no_grad():
            features = extractor(x)
        assert list(features) == wanted
        for name, value in features.items():
            assert relative_error(value, reference[name]) <= FP32, name
    assert isinstance(extractor.get_submodule("layer2.0"), FusedBasicBlock)


def test_torch_func_transforms_run_torchvisions_forward(gen):
    """vmap over stacked parameters (model ensembling), vmap over inputs, and grad through
    functional_call: the fold cache and the fused op cannot see through them, so the fused
    modules run torchvision's forward there, and give its results."""
    from torch.func import functional_call, grad, stack_module_state, vmap

    models = [seeded_torchvision_model("resnet18", seed=s, calibration_size=32) for s in (7, 8)]
    fused = resnet_fused.fuse(copy.deepcopy(models[0]))
    x = torch.randn(2, 3, 32, 32, generator=gen)
    params, buffers = stack_module_state(models)
    with torch.no_grad():
        ensemble = vmap(lambda p, b: functional_call(fused, (p, b), (x,)))(params, buffers)
        for out, model in zip(ensemble, models):
            assert relative_error(out, copy.deepcopy(model).double()(x.double())) <= FP32
        per_image = vmap(fused)(x[:, None])
        assert relative_error(per_image[:, 0], copy.deepcopy(models[0]).double()(x.double())) <= FP32
    p = {k: v.detach() for k, v in models[0].named_parameters()}
    b = dict(models[0].named_buffers())
    got = grad(lambda p: functional_call(fused, (p, b), (x,)).square().sum())(p)
    want = grad(lambda p: functional_call(models[0], (p, b), (x,)).square().sum())(p)
    for k in want:
        assert relative_error(got[k], want[k].double()) <= FP32, k


@pytest.mark.parametrize("backend", ["torch", "native"])
def test_a_module_fed_both_layouts_folds_once_per_layout(gen, monkeypatch, backend):
    """The CPU fold takes the layout aten reads from x (so aten copies no weight per call);
    a module fed NCHW and NHWC in turn keeps one fold per layout, where it refolded (and the
    native backend repacked) at every switch. An edit still refolds, both layouts."""
    if backend not in resnet_fused.available_backends("cpu"):
        pytest.skip(f"{backend} does not run on the CPU here")
    conv, bn = nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
    with torch.no_grad():
        for t in (bn.weight, bn.bias, bn.running_mean):
            t.copy_(torch.randn(16, generator=gen))
        bn.running_var.copy_(torch.rand(16, generator=gen) + 0.5)
    ref_model = nn.Sequential(copy.deepcopy(conv), copy.deepcopy(bn), nn.ReLU()).eval().double()
    fused = resnet_fused.FusedConvBNAct(conv, bn, nn.ReLU(), backend=backend).eval()
    folds = []
    real = resnet_fused.fold.fold_modules
    monkeypatch.setattr(resnet_fused.fold, "fold_modules", lambda *a: folds.append(1) or real(*a))
    x = torch.randn(2, 8, 9, 9, generator=gen)
    inputs = [x, x.contiguous(memory_format=torch.channels_last)] * 3
    with torch.no_grad():
        for xi in inputs:
            assert relative_error(fused(xi), ref_model(x.double())) <= FP32
        assert len(folds) == 2
        bn.running_var.mul_(2.0)
        ref_model[1].running_var.mul_(2.0)
        for xi in inputs:
            assert relative_error(fused(xi), ref_model(x.double())) <= FP32
        assert len(folds) == 4
    assert resnet_fused.refold(fused) >= 2  # both layouts' folds dropped
