"""The torchvision ResNet family, fused.

Each builder takes torchvision's arguments (``weights``, ``progress``, ``num_classes``,
``zero_init_residual``, ``groups``, ``width_per_group``, ``replace_stride_with_dilation``)
plus ``backend``; it builds torchvision's own model, so initialisation, the weights API
(download cache, ``num_classes`` from the weights' categories) and argument errors are
torchvision's, and then fuses it in place. Parameter names and ``state_dict()`` keys are
torchvision's: checkpoints load unchanged, in both directions.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor, nn
from torchvision import models as tv_models
from torchvision.models import WeightsEnum
from torchvision.models import resnet as tv_resnet
from torchvision.models._utils import kwonly_to_pos_or_kw

from . import backends
from .fold import FoldCache
from .modules import FusedBasicBlock, FusedBottleneck, _conv_bn_act, runs_unfused, watched

__all__ = [
    "ResNet",
    "ARCHS",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "resnext50_32x4d",
    "resnext101_32x8d",
    "resnext101_64x4d",
    "wide_resnet50_2",
    "wide_resnet101_2",
    "get_model",
]


class ResNet(tv_resnet.ResNet):
    """torchvision's ResNet with a fused stem and fused blocks.

    A subclass of torchvision's ``ResNet``: ``ResNet(block, layers, ...)`` takes its
    arguments (``block`` torchvision's BasicBlock/Bottleneck or our fused twins) plus
    ``backend``, and builds torchvision's model, then fuses it. Also made from a
    torchvision ``ResNet`` by :meth:`from_torchvision` (which the builders and
    :func:`resnet_fused.fuse` call); it has the same attributes
    (``conv1``, ``bn1``, ``relu``, ``maxpool``, ``layer1``..``layer4``, ``avgpool``,
    ``fc``). In eval mode the activations run channels_last from the stem to the
    pooling: the GPU kernels and oneDNN on the CPU are fastest in NHWC.
    """

    def __init__(self, block: type, layers: list[int], *args: Any, backend: str = "auto", **kwargs: Any):
        from .fuse import _fuse

        backend = backends.check_name(backend)
        tv_block = {FusedBasicBlock: tv_resnet.BasicBlock, FusedBottleneck: tv_resnet.Bottleneck}.get(block, block)
        super().__init__(tv_block, layers, *args, **kwargs)
        self.backend = backend
        self._stem_fold = FoldCache()
        for name in ("layer1", "layer2", "layer3", "layer4"):
            self._modules[name] = _fuse(self._modules[name], backend)

    @classmethod
    def from_torchvision(cls, model: tv_resnet.ResNet, backend: str = "auto") -> "ResNet":
        if type(model) is not tv_resnet.ResNet:
            raise TypeError(f"expected torchvision.models.ResNet, got {type(model).__name__}")
        fused = cls.__new__(cls)
        fused.__dict__.update(model.__dict__)
        fused.__dict__["_modules"] = dict(model._modules)
        fused.backend = backends.check_name(backend)
        fused._stem_fold = FoldCache()
        return fused

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        if self.__dict__.get("_stem_fold") is None:  # (a model pickled when an unfoldable stem had none)
            self._stem_fold = FoldCache()

    def to_torchvision(self) -> tv_resnet.ResNet:
        model = tv_resnet.ResNet.__new__(tv_resnet.ResNet)
        state = dict(self.__dict__)
        state.pop("backend", None)
        state.pop("_stem_fold", None)
        model.__dict__.update(state)
        model.__dict__["_modules"] = dict(self._modules)
        return model

    def forward(self, x: Tensor) -> Tensor:
        return self._forward_impl(x)

    def _forward_impl(self, x: Tensor) -> Tensor:
        # (torchvision's forward calls _forward_impl too: a subclass overriding it is obeyed)
        if runs_unfused(x):  # torch.fx's symbolic tracing, torch.func's transforms
            return tv_resnet.ResNet._forward_impl(self, x)
        if x.dim() == 4 and not self.training:
            # (train mode keeps the caller's layout: it is torchvision's forward, and a
            # layout change would change cuDNN's or oneDNN's algorithm and its rounding)
            x = x.contiguous(memory_format=torch.channels_last)
        if type(self.relu) is nn.ReLU and not watched(self.conv1, self.bn1, self.relu):
            x = _conv_bn_act(self.conv1, self.bn1, self._stem_fold, x, relu=True, backend=self.backend)
        else:
            x = self.relu(self.bn1(self.conv1(x)))
        x = self.maxpool(x)
        if self._may_overwrite_intermediates(x):
            # a tensor made in this forward: max-pool's output, then each fused block's
            fresh = type(self.maxpool) is nn.MaxPool2d
            for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
                x, fresh = self._run_layer(layer, x, fresh)
        else:
            x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)

    def _may_overwrite_intermediates(self, x: Tensor) -> bool:
        """Whether the blocks may write their output into their input, which is this
        forward's own intermediate tensor (see FusedBottleneck._last_pair): in eval mode
        without autograd or a trace, and with no hook anywhere in the model that could
        keep a reference to an intermediate. Only where the backend can write in place
        at all (the native CPU kernels: a CUDA output comes from the caching allocator,
        free), so the walk over the modules (~0.1 ms) is paid only next to a CPU forward
        of tens of ms."""
        return (
            x.device.type in backends.get(backends.resolve(self.backend, x.device)).out_in_place_devices
            and not self.training
            and not torch.is_grad_enabled()
            and not torch.compiler.is_compiling()
            and not torch.jit.is_tracing()
            and not watched(self)
        )

    @staticmethod
    def _run_layer(layer: nn.Module, x: Tensor, fresh: bool) -> tuple[Tensor, bool]:
        """``layer(x)``, each fused block told whether its input was made in this forward
        (so nothing reads it after the block); also whether the layer's output was."""
        if type(layer) is not nn.Sequential:
            return layer(x), False
        for block in layer:
            if isinstance(block, (FusedBasicBlock, FusedBottleneck)):
                x, fresh = block(x, _input_is_dead=fresh), True
            else:
                x, fresh = block(x), False
        return x, fresh

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}"


def _build(tv_builder: Callable[..., nn.Module], weights, progress: bool, backend: str, kwargs) -> ResNet:
    from .fuse import fuse

    backend = backends.check_name(backend)
    if "pretrained" in kwargs and weights is None:  # torchvision's deprecated interface, which it maps to weights=
        model = tv_builder(progress=progress, **kwargs)
    else:
        model = tv_builder(weights=weights, progress=progress, **kwargs)
    return fuse(model, backend=backend, inplace=True)


_WeightsArg = Optional[Union[WeightsEnum, str]]


@kwonly_to_pos_or_kw  # torchvision's: ``weights`` positionally too, with its warning
def resnet18(*, weights: _WeightsArg = None, progress: bool = True, backend: str = "auto", **kwargs: Any) -> ResNet:
    """ResNet-18 (torchvision ``resnet18``), fused. ``weights``: a ``ResNet18_Weights`` member or its name."""
    return _build(tv_models.resnet18, weights, progress, backend, kwargs)


@kwonly_to_pos_or_kw
def resnet34(*, weights: _WeightsArg = None, progress: bool = True, backend: str = "auto", **kwargs: Any) -> ResNet:
    """ResNet-34 (torchvision ``resnet34``), fused. ``weights``: a ``ResNet34_Weights`` member or its name."""
    return _build(tv_models.resnet34, weights, progress, backend, kwargs)


@kwonly_to_pos_or_kw
def resnet50(*, weights: _WeightsArg = None, progress: bool = True, backend: str = "auto", **kwargs: Any) -> ResNet:
    """ResNet-50 (torchvision ``resnet50``), fused. ``weights``: a ``ResNet50_Weights`` member or its name."""
    return _build(tv_models.resnet50, weights, progress, backend, kwargs)


@kwonly_to_pos_or_kw
def resnet101(*, weights: _WeightsArg = None, progress: bool = True, backend: str = "auto", **kwargs: Any) -> ResNet:
    """ResNet-101 (torchvision ``resnet101``), fused. ``weights``: a ``ResNet101_Weights`` member or its name."""
    return _build(tv_models.resnet101, weights, progress, backend, kwargs)


@kwonly_to_pos_or_kw
def resnet152(*, weights: _WeightsArg = None, progress: bool = True, backend: str = "auto", **kwargs: Any) -> ResNet:
    """ResNet-152 (torchvision ``resnet152``), fused. ``weights``: a ``ResNet152_Weights`` member or its name."""
    return _build(tv_models.resnet152, weights, progress, backend, kwargs)


@kwonly_to_pos_or_kw
def resnext50_32x4d(
    *, weights: _WeightsArg = None, progress: bool = True, backend: str = "auto", **kwargs: Any
) -> ResNet:
    """ResNeXt-50 32x4d (torchvision ``resnext50_32x4d``), fused."""
    return _build(tv_models.resnext50_32x4d, weights, progress, backend, kwargs)


@kwonly_to_pos_or_kw
def resnext101_32x8d(
    *, weights: _WeightsArg = None, progress: bool = True, backend: str = "auto", **kwargs: Any
) -> ResNet:
    """ResNeXt-101 32x8d (torchvision ``resnext101_32x8d``), fused."""
    return _build(tv_models.resnext101_32x8d, weights, progress, backend, kwargs)


@kwonly_to_pos_or_kw
def resnext101_64x4d(
    *, weights: _WeightsArg = None, progress: bool = True, backend: str = "auto", **kwargs: Any
) -> ResNet:
    """ResNeXt-101 64x4d (torchvision ``resnext101_64x4d``), fused."""
    return _build(tv_models.resnext101_64x4d, weights, progress, backend, kwargs)


@kwonly_to_pos_or_kw
def wide_resnet50_2(
    *, weights: _WeightsArg = None, progress: bool = True, backend: str = "auto", **kwargs: Any
) -> ResNet:
    """Wide ResNet-50-2 (torchvision ``wide_resnet50_2``), fused."""
    return _build(tv_models.wide_resnet50_2, weights, progress, backend, kwargs)


@kwonly_to_pos_or_kw
def wide_resnet101_2(
    *, weights: _WeightsArg = None, progress: bool = True, backend: str = "auto", **kwargs: Any
) -> ResNet:
    """Wide ResNet-101-2 (torchvision ``wide_resnet101_2``), fused."""
    return _build(tv_models.wide_resnet101_2, weights, progress, backend, kwargs)


#: The ten torchvision ResNet architectures, smallest first.
ARCHS = (
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "resnext50_32x4d",
    "resnext101_32x8d",
    "resnext101_64x4d",
    "wide_resnet50_2",
    "wide_resnet101_2",
)


def get_model(arch: str, **kwargs: Any) -> ResNet:
    """The fused builder named ``arch`` called with ``kwargs``; ValueError for an unknown name."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {', '.join(ARCHS)}")
    return globals()[arch](**kwargs)
