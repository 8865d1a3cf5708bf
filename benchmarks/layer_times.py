"""GPU time per unique ResNet-50 conv layer, per provider, from CUDA-graph replays.

A lighter twin of test_conv_kernels.py for short GPU leases: no pytest-benchmark, rows
printed as they finish. `python benchmarks/layer_times.py [BATCH] [OUT.json]`.
"""
import json
import sys

import torch
import torch.nn.functional as F

from resnet_fused import backends, ops
from resnet_fused.bench import conv_layers, eager_conv_bn_add_relu, time_fn


def main(batch: int = 256, out_path: str | None = None, device: str = "cuda", arch: str = "resnet50") -> None:
    device, dtype = torch.device(device), torch.float16 if device == "cuda" else torch.float32
    fused = [b for b in ("triton", "native") if b in backends.default_backends(device)]
    names = [f"fused_{b}" for b in fused] + ["cudnn_conv", "eager_conv_bn_add_relu"]
    rows = []
    print("layer | count | " + " | ".join(f"{n} ms" for n in names) + " | "
          + " | ".join(f"{n}/cudnn {n}/eager" for n in names[:len(fused)]), flush=True)
    for layer, count in conv_layers(arch, batch, 224):
        gen = torch.Generator(device=device).manual_seed(0)  # drawn where they run (batch 256: ~200M values)
        sets = [layer.tensors(dtype, device, gen) for _ in range(2)]
        bn = [t.to(device, dtype) for t in (torch.randn(layer.k), torch.rand(layer.k) + 0.5,
                                            torch.rand(layer.k) + 0.5, torch.randn(layer.k))]

        def fused_call(backend, layer=layer, sets=sets):
            return lambda i: ops.conv_bias_act(*sets[i % 2], layer.stride, layer.padding, layer.dilation,
                                               layer.groups, layer.relu, backend=backend)

        calls = {f"fused_{b}": fused_call(b) for b in fused}
        calls["cudnn_conv"] = lambda i, layer=layer, sets=sets: F.conv2d(
            sets[i % 2][0], sets[i % 2][1], None, layer.stride, layer.padding, layer.dilation, layer.groups)
        calls["eager_conv_bn_add_relu"] = lambda i, layer=layer, sets=sets, bn=bn: eager_conv_bn_add_relu(
            layer, sets[i % 2][0], sets[i % 2][1], sets[i % 2][3], bn)
        row = {"layer": layer.name, "count": count, "batch": batch, "flops": layer.flops}
        if "native" in fused:
            x, w, _, r = sets[0]
            row["native_path"] = ops.explain(x, w, None, r, layer.stride, layer.padding, layer.dilation, layer.groups,
                                             backend="native")
        with torch.inference_mode():
            for name, call in calls.items():
                row[name] = time_fn(call, device, warmup=3, runs=20, cuda_graph=True).median_ms
        if "triton" in fused:  # which Triton algorithm the timing above ran (chosen on its first call)
            x, w, _, r = sets[0]
            row["triton_path"] = ops.explain(x, w, None, r, layer.stride, layer.padding, layer.dilation, layer.groups,
                                             backend="triton")
        rows.append(row)
        c, e = row["cudnn_conv"], row["eager_conv_bn_add_relu"]
        print(f"{layer.name} | {count} | " + " | ".join(f"{row[n]:.3f}" for n in names) + " | "
              + " | ".join(f"{row[n] / c:.2f} {row[n] / e:.2f}" for n in names[:len(fused)]), flush=True)
        if out_path:
            with open(out_path, "w") as f:
                json.dump(rows, f, indent=1)
    for name in names:
        print(f"count-weighted total {name}: {sum(r[name] * r['count'] for r in rows):.3f} ms", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 256, sys.argv[2] if len(sys.argv) > 2 else None)
