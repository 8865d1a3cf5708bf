"""resnet_fused: conv + BatchNorm + residual + ReLU as one kernel, for torchvision ResNets.

Quick use::

    import resnet_fused
    model = resnet_fused.resnet50(weights="IMAGENET1K_V2").eval().cuda().half()
    fused = resnet_fused.fuse(my_torchvision_model)       # or fuse a model you have
    y = resnet_fused.ops.conv_bias_act(x, w, b, residual)  # or call the op itself
"""
from . import ops
from ._extension import extension_info
from .backends import available_backends
from .fold import FoldCache, fold_batchnorm, refold
from .fuse import fuse, unfuse
from .models import (
    ARCHS,
    ResNet,
    get_model,
    resnet18,
    resnet34,
    resnet50,
    resnet101,
    resnet152,
    resnext50_32x4d,
    resnext101_32x8d,
    resnext101_64x4d,
    wide_resnet50_2,
    wide_resnet101_2,
)
from .modules import FusedBasicBlock, FusedBottleneck, FusedConvBNAct, explain_model
from .ops import explain

__version__ = "0.1.0"

__all__ = [
    "ops",
    "models",
    "available_backends",
    "explain",
    "explain_model",
    "extension_info",
    "fuse",
    "unfuse",
    "fold_batchnorm",
    "FoldCache",
    "refold",
    "FusedConvBNAct",
    "FusedBasicBlock",
    "FusedBottleneck",
    "ResNet",
    "ARCHS",
    "get_model",
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
]
