"""``resnet-fused validate``: fused outputs against a float64 torchvision reference.

For each arch: torchvision's model with seeded weights and randomized BatchNorm
statistics and affine parameters; its float64 copy on the CPU is the reference. The
fused model is built by the resnet_fused builder and loads torchvision's
``state_dict`` with ``strict=True``; then, for each backend x device x dtype, one
forward on fresh random images is compared with the reference on the same
(rounded) images. torchvision's own error at that device and dtype is shown beside
it, so a low-precision result can be read against what PyTorch itself achieves.

The bound: float32 (and float64) outputs must be within the per-op tolerance of
the reference (``resnet_fused.testing.TOLERANCES``). Through a whole network a float16/bfloat16 model's error is dominated
by rounding its weights and activations, which torchvision suffers as much as we do
(bfloat16 ResNet-50: ~2e-2, over the per-op 1.6e-2), so there the bound is the
per-op tolerance or twice torchvision's own error at that dtype, whichever is larger.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import os
import time
from typing import Callable, Iterable, Optional

import torch

from . import backends
from .models import ARCHS, get_model
from .testing import max_abs_error, relative_error, seeded_torchvision_model, tolerance

__all__ = ["Result", "run_validation", "default_devices", "default_dtypes"]


@dataclasses.dataclass
class Result:
    arch: str
    backend: str
    device: str
    dtype: str
    max_abs_err: Optional[float]
    rel_err: Optional[float]
    torch_rel_err: Optional[float]
    tolerance: float
    status: str  # PASS, FAIL or SKIP
    note: str = ""
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def winograd_hint(results: Iterable[Result]) -> Optional[str]:
    """What to try where a native CPU float32 row failed while its stride-1 3x3 convs ran
    as Winograd F(4x4,3x3) (the default), else None."""
    if os.environ.get("RESNET_FUSED_CPU_WINOGRAD") == "0" or os.environ.get("RESNET_FUSED_CPU_WINOGRAD_TILE") == "2":
        return None
    if not any(r.status == "FAIL" and (r.backend, r.device, r.dtype) == ("native", "cpu", "float32") for r in results):
        return None
    return ("native on cpu runs float32 stride-1 3x3 convs as Winograd F(4x4,3x3), about twice the direct conv's "
            "float32 error a conv, which an ill-conditioned model can carry past the bound: "
            "RESNET_FUSED_CPU_WINOGRAD_TILE=2 runs F(2x2,3x3), more precise than the direct conv (a ResNet-50 "
            "forward ~6% slower), RESNET_FUSED_CPU_WINOGRAD=0 the direct conv")


def default_devices() -> list[str]:
    return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]


def default_dtypes(device: str) -> list[torch.dtype]:
    if torch.device(device).type == "cuda":
        return [torch.float32, torch.float16, torch.bfloat16]
    return [torch.float32]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def plan(
    archs: Iterable[str],
    backend_names: Optional[Iterable[str]],
    devices: Iterable[str],
    dtypes: Optional[Iterable[torch.dtype]],
) -> list[tuple[str, str, str, torch.dtype]]:
    """Every (arch, backend, device, dtype) the run will visit, in order."""
    configs = []
    for arch in archs:
        for device in devices:
            names = list(backend_names) if backend_names else backends.default_backends(device)
            for name in names:
                for dtype in dtypes or default_dtypes(device):
                    configs.append((arch, name, device, dtype))
    return configs


def _skip_reason(backend: str, device: str) -> Optional[str]:
    reason = backends.unavailable_reason(backend)
    if reason is None and backend not in backends.available_backends(device):
        reason = f"does not run on {device}"
    return reason


@torch.no_grad()
def run_validation(
    archs: Iterable[str] = ARCHS,
    backend_names: Optional[Iterable[str]] = None,
    devices: Optional[Iterable[str]] = None,
    dtypes: Optional[Iterable[torch.dtype]] = None,
    batch_size: int = 2,
    image_size: int = 64,
    seed: int = 0,
    on_result: Optional[Callable[[Result], None]] = None,
) -> list[Result]:
    """Validate every configuration; ``on_result`` is called after each one."""
    devices = list(devices or default_devices())
    configs = plan(archs, backend_names, devices, dtypes)
    results: list[Result] = []
    # TF32 off (the DESIGN.md tolerances are float32's), through the fp32_precision API:
    # the legacy allow_tf32 getter raises where a user set conv and RNN apart with it
    tf32 = (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision)
    torch.backends.cuda.matmul.fp32_precision = torch.backends.cudnn.conv.fp32_precision = "ieee"
    try:
        by_arch: dict[str, list] = {}
        for cfg in configs:
            by_arch.setdefault(cfg[0], []).append(cfg)
        for arch, arch_configs in by_arch.items():
            results += _validate_arch(arch, arch_configs, batch_size, image_size, arch_seed(arch, seed), on_result)
    finally:
        torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = tf32
    return results


def arch_seed(arch: str, seed: int) -> int:
    """The seed of one arch's weights, statistics and images: fixed by the arch and
    ``seed`` alone, so a row of a whole run is the row ``--arch <that arch>`` gives."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {', '.join(ARCHS)}")
    return seed + 1000 * ARCHS.index(arch)


def _validate_arch(arch, configs, batch_size, image_size, seed, on_result) -> list[Result]:
    tv_model = seeded_torchvision_model(arch, seed=seed, calibration_size=min(image_size, 128))
    reference = copy.deepcopy(tv_model).double()
    state = tv_model.state_dict()
    gen = torch.Generator().manual_seed(seed + 7)
    images = torch.randn(batch_size, 3, image_size, image_size, generator=gen)
    refs: dict[torch.dtype, torch.Tensor] = {}
    torch_errs: dict[tuple[str, torch.dtype], float] = {}
    fused_by_backend: dict[str, torch.nn.Module] = {}
    results = []
    for _, name, device, dtype in configs:
        start = time.perf_counter()
        tol = tolerance(dtype, device)
        row = dict(arch=arch, backend=name, device=device, dtype=_dtype_name(dtype), tolerance=tol)
        reason = _skip_reason(name, device)
        if reason is not None:
            result = Result(**row, max_abs_err=None, rel_err=None, torch_rel_err=None, status="SKIP", note=reason)
        else:
            x = images.to(dtype)
            if dtype not in refs:
                refs[dtype] = reference(x.double())
            if (device, dtype) not in torch_errs:
                tv_out = copy.deepcopy(tv_model).to(device, dtype)(x.to(device))
                torch_errs[device, dtype] = relative_error(tv_out, refs[dtype])
            if name not in fused_by_backend:
                fused = get_model(arch, backend=name)
                fused.load_state_dict(state, strict=True)
                fused_by_backend[name] = fused.eval()
            model = copy.deepcopy(fused_by_backend[name]).to(device, dtype)
            with backends.tally_runs() as ran:
                out = model(x.to(device))
            err = relative_error(out, refs[dtype])
            others = {n: c for n, c in ran.items() if n != name}
            if others:  # the backend handed these convs down the fallback chain (explain says why)
                row["note"] = f"{sum(others.values())} of {sum(ran.values())} convs ran on " + \
                    ", ".join(f"{n!r} ({c})" for n, c in sorted(others.items()))
            if dtype in (torch.float16, torch.bfloat16):
                row["tolerance"] = tol = max(tol, 2 * torch_errs[device, dtype])
            result = Result(
                **row,
                max_abs_err=max_abs_error(out, refs[dtype]),
                rel_err=err,
                torch_rel_err=torch_errs[device, dtype],
                status="PASS" if math.isfinite(err) and err <= tol else "FAIL",  # (an inf bound passes no inf)
            )
            del model, out
        result.seconds = time.perf_counter() - start
        results.append(result)
        if on_result is not None:
            on_result(result)
    return results
