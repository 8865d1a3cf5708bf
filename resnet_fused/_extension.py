"""Loading the compiled extension ``resnet_fused._C`` (the "native" backend).

The package works without it (the torch and Triton backends are pure Python): when
the library is absent or fails to load -- built against another torch, say -- one
warning says so and how to rebuild, and the "native" backend reports itself
unavailable. :func:`extension_info` says what was built, for which architectures,
against which torch.
"""
from __future__ import annotations

import functools
import glob
import importlib.machinery
import json
import os
import warnings
from typing import Any, Optional

import torch
from torch.utils._python_dispatch import _disable_current_modes

from . import _env

__all__ = ["extension_info", "has_cuda_kernels", "load", "ExtensionWarning"]

REBUILD = ("rebuild it with `pip install --no-build-isolation -e .` "
           "(needs a C++ compiler; nvcc and nvidia-cutlass for CUDA)")


class ExtensionWarning(UserWarning):
    """The compiled extension is missing or unusable; the pure-Python backends still run."""


def _library_path() -> Optional[str]:
    here = os.path.dirname(os.path.abspath(__file__))
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        matches = glob.glob(os.path.join(here, "_C" + suffix))
        if matches:
            return matches[0]
    return None


@functools.lru_cache(maxsize=None)  # outermost: Dynamo traces lru_cache's __wrapped__, which is then marked
@torch.compiler.assume_constant_result  # fixed per process: run, not traced, by torch.compile
def load() -> Optional[str]:
    """Load the library once; None on success, else why it is not usable (and warn once)."""
    if _env.flag("RESNET_FUSED_DISABLE_EXTENSION", False):
        return "disabled by RESNET_FUSED_DISABLE_EXTENSION"
    path = _library_path()
    if path is None:
        reason = "resnet_fused._C is not built"
        warnings.warn(f"{reason}: the 'native' backend is unavailable; {REBUILD}", ExtensionWarning, stacklevel=3)
        return reason
    try:
        torch.ops.load_library(path)
    except (OSError, RuntimeError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        reason = f"resnet_fused._C failed to load ({first_line})"
        warnings.warn(f"{reason}: the 'native' backend is unavailable; {REBUILD}", ExtensionWarning, stacklevel=3)
        return reason
    built = _build_info().get("torch_version", "unknown")
    if built.split("+")[0].split(".")[:2] != torch.__version__.split("+")[0].split(".")[:2]:
        reason = f"resnet_fused._C was built against torch {built}, this is torch {torch.__version__}"
        warnings.warn(f"{reason}: the 'native' backend is unavailable; {REBUILD}", ExtensionWarning, stacklevel=3)
        return reason
    return None


@functools.lru_cache(maxsize=None)
def _build_info() -> dict[str, Any]:
    # outside any tracing mode: a first load inside torch.export must not record the call
    with _disable_current_modes():
        return json.loads(torch.ops.resnet_fused.native_build_info())


def has_cuda_kernels() -> bool:
    """True when the library is usable and holds its CUDA kernels."""
    return load() is None and bool(_build_info().get("cuda"))


def extension_info() -> dict[str, Any]:
    """What the compiled extension holds.

    Keys: ``built`` (a library file exists), ``loaded``, ``error`` (why it is not
    usable, or None), ``path``; when loaded, also ``torch_version`` (built against),
    ``cpu``, ``cuda`` (CUDA kernels compiled in), ``cuda_archs`` ("80;90"),
    ``cuda_version``, ``cutlass_version``, ``cpu_parallel`` ("OpenMP" when the CPU
    kernels split their work over torch's intra-op threads, "none" when one thread).
    """
    error = load()
    path = _library_path()
    info: dict[str, Any] = {"built": path is not None, "loaded": False, "error": error, "path": path}
    if hasattr(torch.ops.resnet_fused, "native_build_info"):
        info["loaded"] = True
        info.update(_build_info())
    return info
