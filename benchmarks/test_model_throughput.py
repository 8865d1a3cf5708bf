"""Model suite: images/s per architecture and provider, baselines in the same session.

Each benchmark times one provider's forward (see resnet_fused.bench.MODEL_PROVIDERS)
over inputs already on the device, after warm-up and setup (compile/autotune time
is recorded apart in extra_info as setup_s). GPU time from CUDA events.
"""
import pytest
import torch

import resnet_fused
from resnet_fused.bench import model_runner, seeded_model, time_fn

import bench_config

ARCHS = ["resnet18"] if bench_config.quick() else ["resnet50", "resnet18", "resnext50_32x4d"]


def providers():
    names = ["eager_nchw", "eager_channels_last"]
    if not bench_config.quick():
        names.append("compile")  # minutes of max-autotune: full runs only
    if not torch.cuda.is_available():
        names.append("jit_optimized")
    names += [f"fused_{b}" for b in resnet_fused.backends.default_backends(
        "cuda" if torch.cuda.is_available() else "cpu")]
    if torch.cuda.is_available():
        names += [f"fused_{b}+graphs" for b in resnet_fused.backends.default_backends("cuda")]
    return names


_MODELS = {}


@pytest.mark.parametrize("batch", bench_config.batch_sizes())
@pytest.mark.parametrize("provider", providers())
@pytest.mark.parametrize("arch", ARCHS)
def test_model(benchmark, arch, provider, batch, device, dtype):
    size = bench_config.image_size()
    if arch not in _MODELS:
        _MODELS[arch] = seeded_model(arch, size)
    gen = torch.Generator().manual_seed(batch)
    inputs = [torch.randn(batch, 3, size, size, generator=gen).to(device, dtype) for _ in range(3)]
    run, setup_s = model_runner(provider, arch, _MODELS[arch], inputs[0])
    benchmark.group = f"{arch} b{batch}"  # (before pedantic(), which copies it into the stats)
    with torch.inference_mode():
        timing = time_fn(lambda i: run(inputs[i % 3]), device, warmup=1 if bench_config.quick() else 5,
                         runs=bench_config.runs())
        counter = iter(range(10**9))

        def synced():
            run(inputs[next(counter) % 3])
            if device.type == "cuda":
                torch.cuda.synchronize()

        benchmark.pedantic(synced, rounds=bench_config.runs(), iterations=1, warmup_rounds=1)
    benchmark.extra_info.update(
        arch=arch, provider=provider, batch=batch, dtype=str(dtype), device=str(device), image_size=size,
        setup_s=setup_s, event_median_ms=timing.median_ms, images_per_s=batch / (timing.median_ms / 1e3),
    )
