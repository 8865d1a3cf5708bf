"""Turn benchmark JSON into markdown tables: `python benchmarks/summarize.py kernels FILE`
(pytest-benchmark JSON of test_conv_kernels.py) or `... models FILE` (resnet-fused bench --json)."""
import json
import sys


def kernels(path: str) -> str:
    """One row per layer: the fused kernel (Triton's where it ran, else the native
    backend's), the conv alone (cuDNN on a GPU, oneDNN on a CPU) and eager."""
    data = json.load(open(path))
    rows: dict[str, dict] = {}
    for bench in data["benchmarks"]:
        info = bench["extra_info"]
        key = f"{info['layer']} b{info['batch']}"
        rows.setdefault(key, {"flops": info["flops"]})[info["provider"]] = info["event_median_ms"]
    providers = {p for r in rows.values() for p in r}
    fused = next((p for p in ("fused_triton", "fused_native") if p in providers), "fused_triton")
    name = fused.removeprefix("fused_")
    conv_name = "cuDNN" if "cuda" in {b["extra_info"].get("device", "")[:4] for b in data["benchmarks"]} else "oneDNN"
    lines = [
        f"| layer | fused {name} ms | TFLOP/s | {conv_name} conv ms | eager conv+BN+add+ReLU ms | fused torch ms "
        f"| {name} / {conv_name} conv | {name} / eager |",
        "|---|---|---|---|---|---|---|---|",
    ]
    total = {fused: 0.0, "cudnn_conv": 0.0, "eager_conv_bn_add_relu": 0.0}
    summed = 0  # layers all three columns timed: a sum over different layers compares nothing
    for key, r in rows.items():
        ours, conv, eager = r.get(fused), r.get("cudnn_conv"), r.get("eager_conv_bn_add_relu")
        if all(r.get(column) is not None for column in total):
            summed += 1
            for column in total:
                total[column] += r[column]

        def f(v, fmt="{:.3f}"):
            return "-" if v is None else fmt.format(v)

        tflops = None if ours is None else r["flops"] / (ours * 1e-3) / 1e12
        lines.append(
            f"| {key} | {f(ours)} | {f(tflops, '{:.3g}')} | {f(conv)} | {f(eager)} | {f(r.get('fused_torch'))} "
            f"| {f(ours / conv if ours and conv else None, '{:.2f}')} "
            f"| {f(ours / eager if ours and eager else None, '{:.2f}')} |"
        )
    label = "sum of unique layers" if summed == len(rows) else \
        f"sum of the {summed} of {len(rows)} layers all three timed"
    lines.append(f"| **{label}** | {total[fused]:.3f} | | {total['cudnn_conv']:.3f} "
                 f"| {total['eager_conv_bn_add_relu']:.3f} | | | |")
    return "\n".join(lines)


def _ratios(results: list) -> None:
    """Fill vs_eager / vs_compile from rows of the same run (a run cut short never got them)."""
    base = {(r["batch_size"], r["provider"]): r for r in results if not r["error"]}
    for r in results:
        if r["error"]:
            continue
        for name, field in (("eager_nchw", "vs_eager"), ("compile", "vs_compile")):
            ref = base.get((r["batch_size"], name))
            if r.get(field) is None and ref is not None:
                r[field] = r["images_per_s"] / ref["images_per_s"]


def models(path: str) -> str:
    data = json.load(open(path))
    env = data["environment"]
    _ratios(data["results"])
    where = env.get("gpu", "cpu") if str(data["args"].get("device", "cuda")).startswith("cuda") else "cpu"
    lines = [f"{data['args']['arch']}, {data['args']['image_size']}px, {data['args']['dtype']}, "
             f"{where}, torch {env['torch']}, triton {env.get('triton')}", "",
             "| batch | provider | images/s | median ms | p10 ms | p90 ms | × eager NCHW | × torch.compile |",
             "|---|---|---|---|---|---|---|---|"]
    for r in data["results"]:
        if r["error"]:
            lines.append(f"| {r['batch_size']} | {r['provider']} | error: {r['error'][:80]} | | | | | |")
            continue
        ve = "-" if r["vs_eager"] is None else f"{r['vs_eager']:.2f}"
        vc = "-" if r["vs_compile"] is None else f"{r['vs_compile']:.2f}"
        lines.append(f"| {r['batch_size']} | {r['provider']} | {r['images_per_s']:,.0f} | {r['median_ms']:.3f} "
                     f"| {r['p10_ms']:.3f} | {r['p90_ms']:.3f} | {ve} | {vc} |")
    done = {(r["batch_size"], r["provider"]) for r in data["results"]}
    missing = [f"{p} (batch {b})" for b in data["args"]["batch_size"] for p in data["args"]["providers"]
               if (b, p) not in done]
    if missing:
        lines += ["", "Not measured (the run was cut short by its time limit): " + ", ".join(missing) + "."]
    return "\n".join(lines)


if __name__ == "__main__":
    kinds = {"kernels": kernels, "models": models}
    if len(sys.argv) != 3 or sys.argv[1] not in kinds:
        sys.exit(f"usage: python benchmarks/summarize.py {{{'|'.join(kinds)}}} FILE  (got: {' '.join(sys.argv[1:])!r})")
    print(kinds[sys.argv[1]](sys.argv[2]))
