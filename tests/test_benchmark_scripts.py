"""The scripts that turn committed benchmark results into tables (benchmarks/summarize.py,
benchmarks/update_readme.py): README's Performance section must be exactly what the
script makes of the committed JSON (no number typed by hand), and the kernel table must
carry every layer and provider of a run."""
import importlib.util
import json
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"


def _load(name):
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCH))


def test_readme_performance_section_is_the_scripts_output():
    update_readme = _load("update_readme")
    text = (ROOT / "README.md").read_text()
    assert update_readme.START in text and update_readme.END in text
    committed = text.split(update_readme.START, 1)[1].split(update_readme.END, 1)[0]
    assert committed == "\n" + update_readme.section() + "\n", \
        "README's Performance section is stale: run python benchmarks/update_readme.py"


def _kernel_run(tmp_path, device, rows):
    """A pytest-benchmark JSON with test_conv_kernels.py's extra_info for ``rows`` of
    (layer, provider, ms)."""
    benchmarks = [{"extra_info": {"layer": layer, "batch": 8, "provider": provider, "device": device,
                                  "flops": 2e9, "event_median_ms": ms}} for layer, provider, ms in rows]
    path = tmp_path / "kernels.json"
    path.write_text(json.dumps({"benchmarks": benchmarks}))
    return str(path)


@pytest.mark.parametrize("device, fused, conv", [("cpu", "native", "oneDNN"), ("cuda:0", "triton", "cuDNN")])
def test_kernel_table_names_what_ran_and_sums_each_column(tmp_path, device, fused, conv):
    summarize = _load("summarize")
    rows = []
    for layer, ms in (("64x56x56->64 3x3/1", 4.0), ("256x14x14->1024 1x1/1 +res", 2.0)):
        rows += [(layer, f"fused_{fused}", ms), (layer, "cudnn_conv", 2 * ms),
                 (layer, "eager_conv_bn_add_relu", 3 * ms), (layer, "fused_torch", 2.5 * ms)]
    if fused == "triton":
        rows.append(("64x56x56->64 3x3/1", "fused_native", 99.0))  # Triton's column wins where both ran
    table = summarize.kernels(_kernel_run(tmp_path, device, rows)).splitlines()
    assert table[0].startswith(f"| layer | fused {fused} ms | TFLOP/s | {conv} conv ms |")
    assert table[0].endswith(f"| {fused} / {conv} conv | {fused} / eager |")
    cells = {row[0]: row[1:] for row in ([c.strip() for c in line.strip().strip("|").split("|")] for line in table[2:])}
    assert cells["64x56x56->64 3x3/1 b8"][:3] == ["4.000", "0.5", "8.000"]  # 2 GFLOP in 4 ms
    assert cells["64x56x56->64 3x3/1 b8"][-2:] == ["0.50", "0.33"]
    assert cells["**sum of unique layers**"][:4] == ["6.000", "", "12.000", "18.000"]
