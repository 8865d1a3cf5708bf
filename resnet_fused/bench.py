"""Benchmark machinery: the conv layers of a ResNet, providers, honest timing.

Shared by ``resnet-fused bench`` and the pytest-benchmark suites in ``benchmarks/``.
Rules kept here: baselines run in the same process as the fused model; ``eval()``,
``inference_mode``, the same dtype for everyone; warm-up first (autotuning, compiling
and CUDA-graph capture stay out of the timed loop; compile time is reported apart);
inputs already on the device and rotated among several buffers so no run is served
from a warm cache; GPU time from CUDA events, CPU time after the work is done; the
median of many runs with p10/p90.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import statistics
import time
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import backends
from .models import get_model
from .testing import seeded_torchvision_model

__all__ = ["ConvLayer", "conv_layers", "Timing", "time_fn", "MODEL_PROVIDERS", "model_runner"]


# ---------------------------------------------------------------------------------
# the conv layers of a fused model

@dataclasses.dataclass(frozen=True)
class ConvLayer:
    """One fused conv call: input (N, C, H, W), weight (K, C/groups, R, S), its epilogue."""

    n: int
    c: int
    h: int
    w: int
    k: int
    r: int
    s: int
    stride: int
    padding: int
    dilation: int
    groups: int
    residual: bool
    relu: bool

    @property
    def out_hw(self) -> tuple[int, int]:
        p = (self.h + 2 * self.padding - self.dilation * (self.r - 1) - 1) // self.stride + 1
        q = (self.w + 2 * self.padding - self.dilation * (self.s - 1) - 1) // self.stride + 1
        return p, q

    @property
    def flops(self) -> int:
        """2 x multiply-adds of the convolution (the epilogue's few ops per output are not counted)."""
        p, q = self.out_hw
        return 2 * self.n * p * q * self.k * (self.c // self.groups) * self.r * self.s

    def min_bytes(self, elem: int) -> int:
        """Each input read once, the output written once (the residual read once)."""
        p, q = self.out_hw
        out = self.n * self.k * p * q
        return elem * (self.n * self.c * self.h * self.w + self.k * (self.c // self.groups) * self.r * self.s
                       + self.k + out * (2 if self.residual else 1))

    @property
    def name(self) -> str:
        text = f"{self.c}x{self.h}x{self.w}->{self.k} {self.r}x{self.s}/{self.stride}"
        if self.dilation > 1:
            text += f" d{self.dilation}"
        if self.groups > 1:
            text += f" g{self.groups}"
        return text + (" +res" if self.residual else "") + ("" if self.relu else " norelu")

    def tensors(self, dtype: torch.dtype, device, gen: Optional[torch.Generator] = None):
        """Fresh random (x, weight, bias, residual) for this layer, NHWC activations."""
        p, q = self.out_hw
        cl = torch.channels_last

        def rand(*shape):  # drawn where the generator lives (a CUDA one: no host-side draw and copy)
            where = gen.device if gen is not None else "cpu"
            return torch.randn(*shape, generator=gen, device=where).to(device=device, dtype=dtype)

        x = rand(self.n, self.c, self.h, self.w).contiguous(memory_format=cl)
        fan_in = self.c // self.groups * self.r * self.s
        weight = (rand(self.k, self.c // self.groups, self.r, self.s) / fan_in**0.5).contiguous(memory_format=cl)
        bias = rand(self.k)
        residual = rand(self.n, self.k, p, q).contiguous(memory_format=cl) if self.residual else None
        return x, weight, bias, residual


def conv_layers(arch: str, batch_size: int, image_size: int = 224, **kwargs) -> list[tuple[ConvLayer, int]]:
    """The fused conv calls of one forward of ``arch``: unique layers with their counts, in order."""
    from . import modules

    model = get_model(arch, backend="torch", **kwargs).eval().to("meta")
    seen: dict[ConvLayer, int] = {}
    original = modules.conv_bias_act

    def record(x, weight, bias, residual, stride, padding, dilation, groups, relu, backend, *, out=None):
        layer = ConvLayer(
            x.shape[0], x.shape[1], x.shape[2], x.shape[3], weight.shape[0], weight.shape[2], weight.shape[3],
            stride[0], padding[0], dilation[0], groups, residual is not None, relu,
        )
        seen[layer] = seen.get(layer, 0) + 1
        return original(x, weight, bias, residual, stride, padding, dilation, groups, relu, backend, out=out)

    modules.conv_bias_act = record
    try:
        with torch.no_grad():
            model(torch.empty(batch_size, 3, image_size, image_size, device="meta"))
    finally:
        modules.conv_bias_act = original
    return list(seen.items())


# ---------------------------------------------------------------------------------
# timing

@dataclasses.dataclass
class Timing:
    median_ms: float
    p10_ms: float
    p90_ms: float
    runs: int

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def _quantile(values: Sequence[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q * (len(values) - 1))))]


def time_fn(
    fn: Callable[[int], object],
    device: torch.device | str,
    warmup: int = 5,
    runs: int = 30,
    min_time_s: float = 0.0,
    cuda_graph: bool = False,
    buffers: int = 2,
    out_times: Optional[list] = None,
) -> Timing:
    """Time ``fn(i)`` (``i`` picks the input buffer) after ``warmup`` calls.

    GPU: CUDA events around each call on the current stream. CPU: wall clock.
    Runs ``runs`` times, and more while under ``min_time_s`` seconds (up to 1000 runs).
    ``cuda_graph``: capture ``fn(i)`` for each of ``buffers`` inputs after the warm-up
    and time graph replays, so the host's dispatch cost (tens of microseconds, as
    long as a small kernel) stays out of a kernel's time. ``out_times``: a list the
    raw per-run milliseconds are appended to.
    """
    device = torch.device(device)
    with _on(device):
        return _time_fn(fn, device, warmup, runs, min_time_s, cuda_graph, buffers, out_times)


def _on(device: torch.device):
    """The device guard of a GPU (cuda:1 too: its events, streams, graphs and compiles,
    not the current device's); nothing for the CPU."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _time_fn(fn, device, warmup, runs, min_time_s, cuda_graph, buffers, out_times) -> Timing:
    for i in range(warmup):
        fn(i)
    if cuda_graph and device.type == "cuda":
        graphs = []
        torch.cuda.synchronize(device)
        for b in range(buffers):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                fn(b)
            graphs.append(graph)
        return time_fn(lambda i: graphs[i % buffers].replay(), device, warmup=2, runs=runs, min_time_s=min_time_s,
                       out_times=out_times)
    times: list[float] = []
    start_wall = time.perf_counter()
    i = 0
    after = warmup  # (the timed calls go on rotating from where the warm-up stopped)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        events = []
        while i < runs or time.perf_counter() - start_wall < min_time_s:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(after + i)
            end.record()
            events.append((start, end))
            i += 1
            if i >= runs and len(events) >= 1000:  # (min_time_s extends a run to 1000 at most)
                break
        torch.cuda.synchronize(device)
        times = [s.elapsed_time(e) for s, e in events]
    else:
        while i < runs or time.perf_counter() - start_wall < min_time_s:
            t0 = time.perf_counter()
            fn(after + i)
            times.append((time.perf_counter() - t0) * 1e3)
            i += 1
            if i >= runs and len(times) >= 1000:  # (min_time_s extends a run to 1000 at most)
                break
    if out_times is not None:
        out_times.extend(times)
    return timing_of(times)


def timing_of(times: Sequence[float]) -> Timing:
    """Median, p10 and p90 of per-run milliseconds."""
    return Timing(statistics.median(times), _quantile(times, 0.1), _quantile(times, 0.9), len(times))


# ---------------------------------------------------------------------------------
# model providers

#: name -> what it is; the fused_* ones exist per backend.
MODEL_PROVIDERS = {
    "eager_nchw": "torchvision eager, NCHW",
    "eager_channels_last": "torchvision eager, channels_last",
    "compile": 'torch.compile(mode="max-autotune"), inductor freezing on, channels_last',
    "jit_optimized": "torch.jit.optimize_for_inference(torch.jit.script(model)) (CPU)",
    "fused_torch": "resnet_fused, torch backend",
    "fused_triton": "resnet_fused, triton backend",
    "fused_native": "resnet_fused, native backend",
}


def default_providers(device: torch.device, cuda_graphs: bool) -> list[str]:
    names = ["eager_nchw", "eager_channels_last", "compile"]
    if device.type == "cpu":
        names.append("jit_optimized")
    for backend in backends.default_backends(device):
        names.append(f"fused_{backend}")
        if cuda_graphs and device.type == "cuda":
            names.append(f"fused_{backend}+graphs")
    return names


def check_provider(name: str, device: Optional[torch.device] = None) -> None:
    """ValueError unless ``name`` is a provider that can run on ``device`` (when given).

    A fused provider whose backend cannot run on the device is refused, not timed: its
    calls would all fall back to the torch backend and be reported under its name."""
    base = name.removesuffix("+graphs")
    if base not in MODEL_PROVIDERS:
        valid = ", ".join(list(MODEL_PROVIDERS) + [f"{p}+graphs" for p in MODEL_PROVIDERS if p.startswith("fused_")])
        raise ValueError(f"unknown provider {name!r}; expected one of {valid}")
    if name.endswith("+graphs") and not base.startswith("fused_"):
        raise ValueError(f"+graphs applies to the fused providers only, got {name!r}")
    if device is None:
        return
    if name.endswith("+graphs") and device.type != "cuda":
        raise ValueError(f"{name} replays a CUDA graph: it needs a cuda device, got {device}")
    if base.startswith("fused_"):
        backend = base.removeprefix("fused_")
        if backend not in backends.available_backends(device):
            why = backends.unavailable_reason(backend) or f"the {backend} backend has no {device.type} kernels here"
            here = ", ".join(f"fused_{b}" for b in backends.available_backends(device))
            raise ValueError(f"{name} cannot run on {device}: {why} (fused providers that can: {here})")


@contextlib.contextmanager
def _inductor_freezing():
    import torch._inductor.config as inductor_config

    old = inductor_config.freezing
    inductor_config.freezing = True
    try:
        yield
    finally:
        inductor_config.freezing = old


def model_runner(
    provider: str, arch: str, tv_model: nn.Module, example: Tensor
) -> tuple[Callable[[Tensor], Tensor], float]:
    """A callable running ``provider``'s version of ``tv_model`` on a batch, and its setup seconds.

    Setup (compiling, autotuning, scripting, CUDA-graph capture) happens here, on
    ``example``, and is what the returned seconds measure; the callable is warm.
    """
    check_provider(provider, example.device)
    device, dtype = example.device, example.dtype
    start = time.perf_counter()
    graphs = provider.endswith("+graphs")
    base = provider.removesuffix("+graphs")
    if base == "eager_nchw":
        model = copy.deepcopy(tv_model).to(device, dtype)
        run = model
    elif base == "eager_channels_last":
        model = copy.deepcopy(tv_model).to(device, dtype).to(memory_format=torch.channels_last)

        def run(x):
            return model(x.contiguous(memory_format=torch.channels_last))
    elif base == "compile":
        model = copy.deepcopy(tv_model).to(device, dtype).to(memory_format=torch.channels_last)
        with _inductor_freezing():
            compiled = torch.compile(model, mode="max-autotune")
            with torch.inference_mode():
                compiled(example.contiguous(memory_format=torch.channels_last))

        def run(x):
            with _inductor_freezing():
                return compiled(x.contiguous(memory_format=torch.channels_last))
    elif base == "jit_optimized":
        model = copy.deepcopy(tv_model).to(device, dtype)
        with torch.no_grad():
            run = torch.jit.optimize_for_inference(torch.jit.script(model))
            run(example)
    else:
        backend = base.removeprefix("fused_")
        fused = get_model(arch, backend=backend)
        fused.load_state_dict(tv_model.state_dict(), strict=True)
        run = fused.eval().to(device, dtype)
    with torch.inference_mode():
        run(example)
        if graphs:
            run = _graphed(run, example)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return run, time.perf_counter() - start


def _graphed(fn: Callable[[Tensor], Tensor], example: Tensor) -> Callable[[Tensor], Tensor]:
    static_in = example.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn(static_in)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = fn(static_in)

    def replay(x: Tensor) -> Tensor:
        static_in.copy_(x)
        graph.replay()
        return static_out

    return replay


def seeded_model(arch: str, image_size: int) -> nn.Module:
    """The benchmark's torchvision model: seeded weights, calibrated random BatchNorm."""
    return seeded_torchvision_model(arch, seed=0, calibration_size=min(image_size, 64))


def eager_conv_bn_add_relu(layer: ConvLayer, x, weight, residual, bn):
    """The unfused baseline for one layer: cuDNN conv, BatchNorm, add, ReLU as four ops."""
    y = F.conv2d(x, weight, None, layer.stride, layer.padding, layer.dilation, layer.groups)
    y = F.batch_norm(y, *bn, training=False, eps=1e-5)
    if residual is not None:
        y = y + residual
    return torch.relu(y) if layer.relu else y


__all__ += ["default_providers", "check_provider", "seeded_model", "eager_conv_bn_add_relu"]


def run_model_bench(
    arch: str,
    batch_sizes: Sequence[int],
    providers: Sequence[str],
    device: torch.device,
    dtype: torch.dtype,
    image_size: int = 224,
    runs: int = 30,
    warmup: int = 5,
    buffers: int = 3,
    on_row: Optional[Callable[[dict], None]] = None,
    rounds: int = 1,
) -> list[dict]:
    """Time every provider at every batch size; one row (a dict) per pair.

    ``rounds`` > 1 splits each provider's ``runs`` into that many rounds taken in turn
    (A, B, C, A, B, C, ...), so a machine whose speed drifts (a shared CPU) slows every
    provider alike; the row pools all its runs.

    A provider that fails (say, torch.compile on a machine without a compiler) gets a
    row with its error instead of ending the run. Ratios to ``eager_nchw`` and to
    ``compile`` are filled in where those ran at the same batch size.
    """
    with _on(device):
        return _run_model_bench(arch, batch_sizes, providers, device, dtype, image_size, runs, warmup, buffers,
                                on_row, rounds)


def _run_model_bench(arch, batch_sizes, providers, device, dtype, image_size, runs, warmup, buffers, on_row,
                     rounds) -> list[dict]:
    tv_model = seeded_model(arch, image_size)
    gen = torch.Generator().manual_seed(1)
    rows = []
    rounds = max(1, min(rounds, runs))
    for batch in batch_sizes:
        inputs = [torch.randn(batch, 3, image_size, image_size, generator=gen).to(device, dtype)
                  for _ in range(buffers)]
        batch_rows = {}
        runners: dict[str, Callable[[Tensor], Tensor]] = {}
        times: dict[str, list] = {p: [] for p in providers}
        for round_ in range(rounds):
            for provider in providers:
                row = batch_rows.setdefault(provider, {
                    "arch": arch, "provider": provider, "batch_size": batch,
                    "dtype": str(dtype).removeprefix("torch."), "device": str(device), "image_size": image_size,
                    "error": None, "median_ms": None, "p10_ms": None, "p90_ms": None, "runs": 0,
                    "images_per_s": None, "setup_s": None, "vs_eager": None, "vs_compile": None})
                if row["error"]:
                    continue
                run = None
                try:
                    if provider in runners:
                        run = runners[provider]
                    else:
                        run, row["setup_s"] = model_runner(provider, arch, tv_model, inputs[0])
                    share = runs // rounds + (1 if round_ < runs % rounds else 0)
                    with torch.inference_mode():
                        time_fn(lambda i: run(inputs[i % buffers]), device, warmup=warmup if round_ == 0 else 1,
                                runs=share, out_times=times[provider])
                    if rounds > 1:
                        runners[provider] = run  # kept for the next round
                except Exception as exc:  # reported in the row and the exit code, never swallowed
                    row["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0]
                finally:
                    run = None
                    if device.type == "cuda" and rounds == 1:
                        torch.cuda.empty_cache()
                if round_ == rounds - 1 or row["error"]:
                    if not row["error"]:
                        timing = timing_of(times[provider])
                        row.update(timing.as_dict(), images_per_s=batch / (timing.median_ms / 1e3))
                    if on_row is not None:
                        on_row(row)
        runners.clear()
        batch_rows = list(batch_rows.values())
        by_name = {r["provider"]: r for r in batch_rows if not r["error"]}
        for r in batch_rows:
            if r["error"]:
                continue
            for base, field in (("eager_nchw", "vs_eager"), ("compile", "vs_compile")):
                if base in by_name:
                    r[field] = r["images_per_s"] / by_name[base]["images_per_s"]
        rows += batch_rows
    return rows


def plot_model_bench(rows: list[dict], path: str, title: str = "") -> None:
    """Grouped bars: images/s per provider, one group per batch size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if not r["error"]]
    batches = sorted({r["batch_size"] for r in ok})
    providers = list(dict.fromkeys(r["provider"] for r in ok))
    fig, axes = plt.subplots(1, max(1, len(batches)), figsize=(5 * max(1, len(batches)), 4), squeeze=False)
    for ax, batch in zip(axes[0], batches, strict=False):
        values = {r["provider"]: r["images_per_s"] for r in ok if r["batch_size"] == batch}
        names = [p for p in providers if p in values]
        ax.barh(names, [values[n] for n in names], color=["tab:orange" if n.startswith("fused") else "tab:blue"
                                                          for n in names])
        ax.set_title(f"batch {batch}")
        ax.set_xlabel("images/s")
        ax.invert_yaxis()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
