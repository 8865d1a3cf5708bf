"""GPU time per unique ResNet-50 conv layer, per provider, from CUDA-graph replays.

A lighter twin of test_conv_kernels.py for short GPU leases: no pytest-benchmark, rows
printed as they finish. `python benchmarks/layer_times.py [BATCH] [OUT.json]`;
``--algorithms`` adds a column per Triton algorithm that takes the layer (each forced,
beside the backend's own timed choice), ``--help`` for the rest.
"""
import argparse
import json

import torch
import torch.nn.functional as F

from resnet_fused import backends, ops
from resnet_fused.bench import conv_layers, eager_conv_bn_add_relu, time_fn


def main(batch: int = 256, out_path: str | None = None, device: str = "cuda", arch: str = "resnet50",
         image_size: int = 224, algorithms: bool = False, warmup: int = 3, runs: int = 20,
         max_layers: int | None = None) -> list[dict]:
    device = torch.device(device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    fused = [b for b in ("triton", "native") if b in backends.default_backends(device)
             or (b == "triton" and algorithms and backends.get("triton").runs_on(device.type))]
    names = [f"fused_{b}" for b in fused] + ["cudnn_conv", "eager_conv_bn_add_relu"]
    rows = []
    print("layer | count | " + " | ".join(f"{n} ms" for n in names) + " | "
          + " | ".join(f"{n}/cudnn {n}/eager" for n in names[:len(fused)]), flush=True)
    for layer, count in conv_layers(arch, batch, image_size)[:max_layers]:
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
        if algorithms and "triton" in fused:  # each Triton algorithm that takes this layer, forced
            calls.update(_triton_algorithms(layer, sets))
        row = {"layer": layer.name, "count": count, "batch": batch, "flops": layer.flops}
        if "native" in fused:
            x, w, _, r = sets[0]
            row["native_path"] = ops.explain(x, w, None, r, layer.stride, layer.padding, layer.dilation, layer.groups,
                                             backend="native")
        with torch.inference_mode():
            for name, call in calls.items():
                row[name] = time_fn(call, device, warmup=warmup, runs=runs, cuda_graph=True).median_ms
        if "triton" in fused:  # which Triton algorithm the timing above ran (chosen on its first call)
            x, w, _, r = sets[0]
            row["triton_path"] = ops.explain(x, w, None, r, layer.stride, layer.padding, layer.dilation, layer.groups,
                                             backend="triton")
        rows.append(row)
        c, e = row["cudnn_conv"], row["eager_conv_bn_add_relu"]
        forced = [n for n in calls if n.startswith("triton:")]
        print(f"{layer.name} | {count} | " + " | ".join(f"{row[n]:.3f}" for n in names) + " | "
              + " | ".join(f"{row[n] / c:.2f} {row[n] / e:.2f}" for n in names[:len(fused)])
              + "".join(f" | {n} {row[n]:.3f} ({row[n] / c:.2f})" for n in forced), flush=True)
        if out_path:
            with open(out_path, "w") as f:
                json.dump(rows, f, indent=1)
    for name in names:
        print(f"count-weighted total {name}: {sum(r[name] * r['count'] for r in rows):.3f} ms", flush=True)
    return rows


def _triton_algorithms(layer, sets) -> dict:
    """A timed call per Triton algorithm that takes ``layer`` (``triton:<name>``): the
    algorithm's own function, with its tile as the backend would pick it."""
    from resnet_fused.backends import triton_backend as tb

    def call(run):
        return lambda i: run(*sets[i % 2], [layer.stride] * 2, [layer.padding] * 2, [layer.dilation] * 2,
                             layer.groups, layer.relu)

    x, w, bias, r = sets[0]
    problem = (x, w, bias, r, [layer.stride] * 2, [layer.padding] * 2, [layer.dilation] * 2, layer.groups, layer.relu)
    return {f"triton:{name}": call(run) for name, run in tb.ALGORITHMS.items()
            if tb.algorithm_refusal(name, problem) is None}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("batch", nargs="?", type=int, default=256)
    parser.add_argument("out", nargs="?", help="write the rows here as JSON")
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--algorithms", action="store_true",
                        help="also time each Triton algorithm that takes a layer, forced (columns triton:<name>)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--max-layers", type=int, help="only the first N unique convs (in forward order)")
    args = parser.parse_args()
    main(args.batch, args.out, args.device, args.arch, args.image_size, args.algorithms, args.warmup, args.runs,
         args.max_layers)
