"""Regenerate README.md's Performance section from the newest committed GPU results.

`python benchmarks/update_readme.py` rewrites what stands between the markers
<!-- performance:start --> and <!-- performance:end -->: the device, date, versions and
table come from benchmarks/results/<gpu>/session<N>/models.json (the newest session
that has one; its compile.json too, where the session timed torch.compile in a run of its
own), never from numbers typed by hand. With no GPU results it says so.
"""
import json
import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from summarize import models as models_table  # noqa: E402

START, END = "<!-- performance:start -->", "<!-- performance:end -->"

#: Published anchors and the roofline from DESIGN.md, for scale (not our measurements).
ANCHORS = """Roofline for scale: ResNet-50 is 4.09 GMAC per image (~97k img/s at 790 TFLOP/s fp16);
fully fused fp16 activations move ≥ ~55 MB per image (~61k img/s at 3.35 TB/s).
Published anchors: TensorRT INT8 (MLPerf) 88.7k img/s on one H100 SXM; AITemplate fp16
15.4k img/s on an A100 (eager: 5.0k)."""


def newest_results() -> pathlib.Path | None:
    found = []
    for path in (ROOT / "benchmarks" / "results").glob("*/session*/models.json"):
        match = re.search(r"session(\d+)$", path.parent.name)
        if match and any(not r["error"] and r["provider"].startswith("fused")
                         for r in json.loads(path.read_text())["results"]):
            found.append((int(match.group(1)), path))
    return max(found)[1] if found else None


CPU_DIR = ROOT / "benchmarks" / "results" / "cpu_2core"


def cpu_results() -> list[pathlib.Path]:
    """The committed CPU model runs: models.json (ResNet-50) first, then models_<arch>.json."""
    first = CPU_DIR / "models.json"
    return ([first] if first.exists() else []) + sorted(CPU_DIR.glob("models_*.json"))


def cpu_table(path: pathlib.Path) -> list[str]:
    data = json.loads(path.read_text())
    rows = [r for r in data["results"] if not r["error"]]
    args = data["args"]
    lines = [
        f"CPU, the project's 2-core machine, {args['arch']} {args['image_size']}px float32, providers interleaved in "
        f"{args.get('rounds', 1)} rounds (`resnet-fused bench --device cpu ... --rounds {args.get('rounds', 1)}`; "
        f"source: `{path.relative_to(ROOT)}`), ratios of medians:",
        "",
        "| batch | provider | × eager NCHW | × optimize_for_inference | × torch.compile |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        ofi = next((b for b in rows if b["provider"] == "jit_optimized" and b["batch_size"] == r["batch_size"]), None)
        vs_ofi = f"{r['images_per_s'] / ofi['images_per_s']:.2f}" if ofi else "-"
        vs_eager = f"{r['vs_eager']:.2f}" if r.get("vs_eager") else "-"
        vs_compile = f"{r['vs_compile']:.2f}" if r.get("vs_compile") else "-"
        lines.append(f"| {r['batch_size']} | {r['provider']} | {vs_eager} | {vs_ofi} | {vs_compile} |")
    return lines


def cpu_section() -> str:
    """Ratios only: absolute times from a shared 2-core CPU are not worth quoting."""
    tables = [cpu_table(path) for path in cpu_results()]
    return "\n\n".join("\n".join(t) for t in tables) + "\n" if tables else ""


def section() -> str:
    path = newest_results()
    if path is None:
        return "Not yet measured on a GPU.\n\n" + cpu_section() + "\n" + ANCHORS
    data = json.loads(path.read_text())
    env = data["environment"]
    rel = path.relative_to(ROOT)
    lines = [
        f"Measured by `benchmarks/gpu_session.sh` on {env.get('gpu')} (driver via nvidia-smi in the session log), "
        f"torch {env['torch']}, triton {env.get('triton')}, cuDNN {env.get('cudnn')}; "
        f"source: `{rel}` (`git log` dates it). Ratios are against baselines timed in the same run.",
        "",
        models_table(str(path)),
        "",
    ]
    compiled = path.parent / "compile.json"  # gpu_session.sh's compile step: its own run and baselines
    if compiled.exists():
        lines += [f"torch.compile(mode=\"max-autotune\") with freezing, timed in its own run (source: "
                  f"`{compiled.relative_to(ROOT)}`):", "", models_table(str(compiled)), ""]
    plot = path.parent / "models.png"
    if plot.exists():
        lines += [f"![images/s per provider]({plot.relative_to(ROOT)})", ""]
    cpu = cpu_section()
    if cpu:
        lines += [cpu]
    lines.append(ANCHORS)
    return "\n".join(lines)


def main() -> None:
    readme = ROOT / "README.md"
    text = readme.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"README.md lacks the markers {START} ... {END}")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(head + START + "\n" + section() + "\n" + END + tail)


if __name__ == "__main__":
    main()
