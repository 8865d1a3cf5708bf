"""Environment switches, read one way everywhere (as csrc/ops/cpu/switches.h reads the C++ ones)."""
from __future__ import annotations

import os

import torch


def flag(name: str, default: bool) -> bool:
    """A 0/1 switch: unset or empty means ``default``; anything but 0 or 1 is an error
    naming the variable (``false`` or ``off`` silently meaning "on" would be worse)."""
    value = os.environ.get(name, "").strip()
    if value == "":
        return default
    if value not in ("0", "1"):
        raise ValueError(f"{name} should be 0 (off) or 1 (on), got {value!r}")
    return value == "1"


def conv_allows_tf32() -> bool:
    """Whether torch lets float32 convolutions run in TF32 (as cuDNN's would). Read
    through ``torch.backends.cudnn.allow_tf32``, which raises where the conv and RNN flags
    were set apart through the newer ``fp32_precision`` API: the conv's own flag then."""
    try:
        return torch.backends.cudnn.allow_tf32
    except RuntimeError:
        return torch.backends.cudnn.conv.fp32_precision == "tf32"
