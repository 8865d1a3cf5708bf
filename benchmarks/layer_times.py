"""GPU time per unique ResNet-50 conv layer, per provider, from CUDA-graph replays.

A lighter twin of test_conv_kernels.py for short GPU leases: no pytest-benchmark, rows
printed as they finish. `python benchmarks/layer_times.py [BATCH] [OUT.json]`.
"""
import json
import sys

import torch

from resnet_fused import ops
from resnet_fused.bench import conv_layers, eager_conv_bn_add_relu, time_fn

import torch.nn.functional as F


def main(batch: int = 256, out_path: str | None = None) -> None:
    device, dtype = torch.device("cuda"), torch.float16
    rows = []
    print("layer | count | triton ms | cudnn conv ms | eager conv+bn+add+relu ms | triton/cudnn | triton/eager", flush=True)
    for layer, count in conv_layers("resnet50", batch, 224):
        gen = torch.Generator().manual_seed(0)
        sets = [layer.tensors(dtype, device, gen) for _ in range(2)]
        bn = [t.to(device, dtype) for t in (torch.randn(layer.k), torch.rand(layer.k) + 0.5,
                                            torch.rand(layer.k) + 0.5, torch.randn(layer.k))]
        calls = {
            "fused_triton": lambda i: ops.conv_bias_act(*sets[i % 2], layer.stride, layer.padding, layer.dilation,
                                                        layer.groups, layer.relu, backend="triton"),
            "cudnn_conv": lambda i: F.conv2d(sets[i % 2][0], sets[i % 2][1], None, layer.stride, layer.padding,
                                             layer.dilation, layer.groups),
            "eager_conv_bn_add_relu": lambda i: eager_conv_bn_add_relu(layer, sets[i % 2][0], sets[i % 2][1],
                                                                       sets[i % 2][3], bn),
        }
        row = {"layer": layer.name, "count": count, "batch": batch, "flops": layer.flops}
        with torch.inference_mode():
            for name, call in calls.items():
                row[name] = time_fn(call, device, warmup=3, runs=20, cuda_graph=True).median_ms
        rows.append(row)
        t, c, e = row["fused_triton"], row["cudnn_conv"], row["eager_conv_bn_add_relu"]
        print(f"{layer.name} | {count} | {t:.3f} | {c:.3f} | {e:.3f} | {t / c:.2f} | {t / e:.2f}", flush=True)
        if out_path:
            json.dump(rows, open(out_path, "w"), indent=1)
    for name in ("fused_triton", "cudnn_conv", "eager_conv_bn_add_relu"):
        print(f"count-weighted total {name}: {sum(r[name] * r['count'] for r in rows):.3f} ms", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 256, sys.argv[2] if len(sys.argv) > 2 else None)
