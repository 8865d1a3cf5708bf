"""Kernel suite: every unique fused conv of ResNet-50 and ResNet-18, per provider.

Providers, all on the same NHWC tensors: the fused op per backend (conv + bias +
residual + ReLU in one call); cuDNN's conv alone (the bar the fused kernel must
clear); eager conv + BatchNorm + add + ReLU (what torchvision runs). GPU time comes
from CUDA events around CUDA-graph replays of the one call (median of many runs,
after warm-up and autotuning; the graph keeps host dispatch out, which is as long
as a small kernel) and is stored in each benchmark's extra_info; pytest-benchmark's own statistics time the same
call with a synchronize, so `pytest-benchmark compare` works run to run.
"""
import pytest
import torch
import torch.nn.functional as F

import resnet_fused
from resnet_fused import ops
from resnet_fused.bench import conv_layers, eager_conv_bn_add_relu, time_fn

import bench_config


def pytest_generate_tests(metafunc):
    if "layer" not in metafunc.fixturenames:
        return
    image = bench_config.image_size()
    params, ids = [], []
    for arch in ("resnet50", "resnet18"):
        for batch in bench_config.batch_sizes():
            for layer, _ in conv_layers(arch, batch, image):
                key = (layer,)
                if key in params:
                    continue
                params.append(key)
                ids.append(f"{arch}-b{batch}-{layer.name.replace(' ', '_')}")
    metafunc.parametrize("layer", [p[0] for p in params], ids=ids)


# the fused op on every backend that really runs here, then the two baselines
PROVIDERS = [f"fused_{b}" for b in resnet_fused.backends.default_backends("cuda" if torch.cuda.is_available() else "cpu")]
PROVIDERS += ["cudnn_conv", "eager_conv_bn_add_relu"]


@pytest.mark.parametrize("provider", PROVIDERS)
def test_conv_layer(benchmark, layer, provider, device, dtype):
    gen = torch.Generator(device=device).manual_seed(0)  # drawn where they run (batch 256: ~200M values)
    sets = [layer.tensors(dtype, device, gen) for _ in range(2)]  # rotate two input sets
    bn = [torch.randn(layer.k, generator=gen, device=device).to(dtype),
          torch.rand(layer.k, generator=gen, device=device).to(dtype) + 0.5,
          torch.rand(layer.k, generator=gen, device=device).to(dtype) + 0.5,
          torch.randn(layer.k, generator=gen, device=device).to(dtype)]
    bn_args = (bn[0], bn[1], bn[2], bn[3])  # running_mean, running_var, weight, bias
    if provider.startswith("fused_"):
        backend = provider.removeprefix("fused_")

        def call(i):
            x, w, b, r = sets[i % 2]
            return ops.conv_bias_act(x, w, b, r, layer.stride, layer.padding, layer.dilation, layer.groups,
                                     layer.relu, backend=backend)
    elif provider == "cudnn_conv":
        def call(i):
            x, w, b, r = sets[i % 2]
            return F.conv2d(x, w, None, layer.stride, layer.padding, layer.dilation, layer.groups)
    else:
        def call(i):
            x, w, b, r = sets[i % 2]
            return eager_conv_bn_add_relu(layer, x, w, r, bn_args)

    runs = bench_config.runs()
    benchmark.group = f"{layer.name} b{layer.n}"  # (before pedantic(), which copies it into the stats)
    with torch.inference_mode():
        timing = time_fn(call, device, warmup=1 if bench_config.quick() else 10, runs=runs, cuda_graph=True)
        counter = iter(range(10**9))

        def synced():
            call(next(counter))
            if device.type == "cuda":
                torch.cuda.synchronize()

        benchmark.pedantic(synced, rounds=runs, iterations=1, warmup_rounds=1)
    elem = torch.finfo(dtype).bits // 8
    benchmark.extra_info.update(
        layer=layer.name, batch=layer.n, provider=provider, dtype=str(dtype), device=str(device),
        event_median_ms=timing.median_ms, event_p10_ms=timing.p10_ms, event_p90_ms=timing.p90_ms,
        flops=layer.flops, min_bytes=layer.min_bytes(elem),
        tflops=layer.flops / (timing.median_ms * 1e-3) / 1e12,
    )
