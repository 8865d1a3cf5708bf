"""Sizes for the pytest-benchmark suites. On a GPU: full sizes. Without one, or with
RESNET_FUSED_BENCH_QUICK=1: tiny sizes and few rounds, so CI runs them once and they
cannot rot; RESNET_FUSED_BENCH_QUICK=0 asks for full sizes on a CPU too.
RESNET_FUSED_BENCH_BATCH_SIZES=1,32,256 picks batch sizes."""
import os

import torch


def quick() -> bool:
    setting = os.environ.get("RESNET_FUSED_BENCH_QUICK", "")
    if setting not in ("", "0", "1"):
        raise ValueError(f"RESNET_FUSED_BENCH_QUICK should be 0 or 1, got {setting!r}")
    return setting == "1" if setting else not torch.cuda.is_available()


def batch_sizes() -> list[int]:
    text = os.environ.get("RESNET_FUSED_BENCH_BATCH_SIZES")
    if text:
        return [int(b) for b in text.split(",")]
    return [2] if quick() else [1, 32, 256]


def image_size() -> int:
    return 32 if quick() else 224


def runs() -> int:
    return 3 if quick() else 50
