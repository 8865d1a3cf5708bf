"""Host suite: what one fused call costs the host, against torchvision's modules.

At batch 1 on a GPU, without CUDA graphs, a ResNet's forward is bound by the host: each
kernel is as short as its launch, so the time is Python and dispatch. Here a conv +
BatchNorm + ReLU, and a Bottleneck, run on tiny tensors (their kernels a few
microseconds), fused per backend and as torchvision's eager modules in the same
session; the ratio of the two is what the fused modules' own Python adds or saves.
Timed per call with a synchronize on the GPU, over many calls (median); NOTES.md
(host overhead) has the numbers.
"""
import pytest
import torch
from torch import nn
from torchvision.models.resnet import Bottleneck

import resnet_fused

import bench_config

BACKENDS = resnet_fused.backends.default_backends("cuda" if torch.cuda.is_available() else "cpu")


def _modules(kind: str, backend, device, dtype):
    torch.manual_seed(0)
    if kind == "conv_bn_relu":
        eager = nn.Sequential(nn.Conv2d(64, 64, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU())
        shape = (1, 64, 4, 4)
    else:
        eager = Bottleneck(256, 64)
        shape = (1, 256, 4, 4)
    with torch.no_grad():  # (statistics of a trained net's scale: values do not change the host's work)
        for m in eager.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
    eager = eager.eval().to(device, dtype)
    model = eager if backend is None else resnet_fused.fuse(eager, backend=backend).eval()
    x = torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
    return model, x


@pytest.mark.parametrize("provider", ["eager"] + [f"fused_{b}" for b in BACKENDS])
@pytest.mark.parametrize("kind", ["conv_bn_relu", "bottleneck"])
def test_host_time(benchmark, kind, provider, device, dtype):
    backend = None if provider == "eager" else provider.removeprefix("fused_")
    model, x = _modules(kind, backend, device, dtype)

    def call():
        model(x)
        if device.type == "cuda":
            torch.cuda.synchronize()

    benchmark.group = f"host {kind}"  # (before pedantic(), which copies it into the stats)
    with torch.inference_mode():
        for _ in range(3):
            call()
        rounds = 20 if bench_config.quick() else 200
        benchmark.pedantic(call, rounds=rounds, iterations=50, warmup_rounds=2)
    benchmark.extra_info.update(kind=kind, provider=provider, device=str(device), dtype=str(dtype))
