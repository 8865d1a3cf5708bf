"""Regenerate README.md's Performance section from the newest committed GPU results.

`python benchmarks/update_readme.py` rewrites what stands between the markers
<!-- performance:start --> and <!-- performance:end -->: the device, date, versions and
table come from benchmarks/results/<gpu>/session<N>/models.json (the newest session
that has one), never from numbers typed by hand. With no GPU results it says so.
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


def section() -> str:
    path = newest_results()
    if path is None:
        return "Not yet measured on a GPU.\n\n" + ANCHORS
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
    plot = path.parent / "models.png"
    if plot.exists():
        lines += [f"![images/s per provider]({plot.relative_to(ROOT)})", ""]
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
