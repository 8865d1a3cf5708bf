"""Environment switches, read one way everywhere (as csrc/ops/cpu/switches.h reads the C++ ones)."""
from __future__ import annotations

import os


def flag(name: str, default: bool) -> bool:
    """A 0/1 switch: unset or empty means ``default``; anything but 0 or 1 is an error
    naming the variable (``false`` or ``off`` silently meaning "on" would be worse)."""
    value = os.environ.get(name, "").strip()
    if value == "":
        return default
    if value not in ("0", "1"):
        raise ValueError(f"{name} should be 0 (off) or 1 (on), got {value!r}")
    return value == "1"
