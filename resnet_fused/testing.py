"""Helpers for checking fused outputs: the numerics contract, seeded models, errors.

Shared by ``resnet-fused validate``, the test suite and the benchmarks, so that all
three measure against the same float64 reference and the same tolerances.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn
from torchvision import models as tv_models
from torchvision.ops.misc import FrozenBatchNorm2d

from ._env import conv_allows_tf32

__all__ = [
    "TOLERANCES",
    "tolerance",
    "relative_error",
    "randomize_batchnorm_",
    "seeded_torchvision_model",
    "DTYPES",
    "parse_dtype",
]

#: Relative error ||out - ref|| / ||ref|| allowed against a float64 reference.
TOLERANCES = {
    torch.float64: 1e-12,
    torch.float32: 1e-5,
    torch.float16: 2e-3,
    torch.bfloat16: 1.6e-2,
}
#: float32 with TF32 matrix units allowed (GPU only).
TF32_TOLERANCE = 5e-4

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float64": torch.float64, "fp64": torch.float64, "double": torch.float64,
}


def parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name.lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; expected one of {', '.join(sorted(DTYPES))}") from None


def tf32_enabled() -> bool:
    return torch.backends.cuda.matmul.allow_tf32 or conv_allows_tf32()


def tolerance(dtype: torch.dtype, device: torch.device | str = "cpu") -> float:
    """The relative-error bound for outputs of ``dtype`` computed on ``device``."""
    if dtype == torch.float32 and torch.device(device).type == "cuda" and tf32_enabled():
        return TF32_TOLERANCE
    return TOLERANCES[dtype]


def relative_error(out: Tensor, ref: Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 (on their GPU when both are on the same one, else
    on the CPU); inf if ``out`` has NaN or inf."""
    where = out.device if out.device == ref.device else torch.device("cpu")
    out64 = out.detach().to(where, torch.float64)
    ref64 = ref.detach().to(where, torch.float64)
    if out64.shape != ref64.shape:
        raise ValueError(f"shapes differ: out {tuple(out64.shape)}, ref {tuple(ref64.shape)}")
    if not torch.isfinite(out64).all():
        return math.inf
    denom = ref64.norm().item()
    num = (out64 - ref64).norm().item()
    return num / denom if denom > 0 else num


def max_abs_error(out: Tensor, ref: Tensor) -> float:
    diff = (out.detach().to("cpu", torch.float64) - ref.detach().to("cpu", torch.float64)).abs()
    return math.inf if not torch.isfinite(diff).all() else diff.max().item()


@torch.no_grad()
def randomize_batchnorm_(model: nn.Module, seed: int, calibration_size: int = 64) -> nn.Module:
    """Give every BatchNorm of ``model`` random, realistic statistics and affine params.

    Running statistics are first calibrated by one train-mode pass over random
    images (so activations keep a sane scale through deep models, which fp16 needs),
    then perturbed; gamma, beta and FrozenBatchNorm2d's buffers are drawn at random.
    Folding is then exercised by every field. The model is left in eval mode.
    """
    gen = torch.Generator().manual_seed(seed)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d) and m.track_running_stats]
    if bns:
        saved = [(m, m.momentum) for m in bns]
        for m in bns:
            m.momentum = 1.0
        was_training = model.training
        model.train()
        x = torch.randn(8, 3, calibration_size, calibration_size, generator=gen)
        first = next(model.parameters(), None)
        if first is not None:
            x = x.to(first.device, first.dtype)
        model(x)
        for m, momentum in saved:
            m.momentum = momentum
        model.train(was_training)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d)) and m.running_var is not None:
            c = m.running_var.shape[0]

            def draw(fn, *args):
                return fn(*args, c, generator=gen).to(m.running_var)

            if isinstance(m, FrozenBatchNorm2d):
                m.running_var.copy_(draw(torch.rand) * 1.5 + 0.5)
                m.running_mean.copy_(draw(torch.randn) * 0.2)
            else:
                m.running_var.mul_(draw(torch.rand) * 1.5 + 0.5)
                m.running_mean.add_(draw(torch.randn) * 0.3 * m.running_var.sqrt())
            if m.weight is not None:
                m.weight.copy_(draw(torch.rand) + 0.5)
                m.bias.copy_(draw(torch.randn) * 0.2)
    return model.eval()


def seeded_torchvision_model(arch: str, seed: int = 0, calibration_size: int = 64, **kwargs: Any) -> nn.Module:
    """torchvision's ``arch`` with seeded random weights and randomized BatchNorm, in eval mode."""
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG stream alone
        torch.manual_seed(seed)
        model = getattr(tv_models, arch)(weights=None, **kwargs)
    return randomize_batchnorm_(model, seed + 1, calibration_size)


def reference_conv_bias_act(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    residual: Tensor | None = None,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    relu: bool = True,
    device: torch.device | str = "cpu",
) -> Tensor:
    """The fused op in float64 (on the CPU unless ``device`` says otherwise; cuDNN computes
    float64 convolutions too): what every backend is measured against."""
    import torch.nn.functional as F

    def up(t):
        return None if t is None else t.detach().to(device, torch.float64)

    y = F.conv2d(up(x), up(weight), up(bias), stride, padding, dilation, groups)
    if residual is not None:
        y = y + up(residual)
    return torch.relu(y) if relu else y
