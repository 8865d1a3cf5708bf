"""The scripts that turn committed benchmark results into tables (benchmarks/summarize.py,
benchmarks/update_readme.py): README's Performance section must be exactly what the
script makes of the committed JSON (no number typed by hand), and the kernel table must
carry every layer and provider of a run."""
import importlib.util
import json
import pathlib
import sys

import pytest

import resnet_fused

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
    # a layer one column lacks (a run cut short) is left out of every sum, and said
    rows.append(("512x7x7->512 3x3/1", f"fused_{fused}", 1.0))
    table = summarize.kernels(_kernel_run(tmp_path, device, rows)).splitlines()
    assert "| **sum of the 2 of 3 layers all three timed** | 6.000 | | 12.000 | 18.000 |" in table[-1]


def test_layer_times_times_every_provider_and_each_triton_algorithm(tmp_path):
    """benchmarks/layer_times.py (the short-lease per-layer timer) on this machine's CPU:
    ResNet-18's first five unique convs, each provider, and with --algorithms a column per
    Triton algorithm that takes the layer (the interpreter runs them here), written as JSON."""
    from resnet_fused.backends import triton_backend as tb

    if not tb.INTERPRET:
        pytest.skip("the Triton columns need the interpreter on a CPU (TRITON_INTERPRET=1, as conftest sets)")
    if tb.interpreter_problem() is not None:
        pytest.skip(tb.interpreter_problem())
    layer_times = _load("layer_times")
    out = tmp_path / "layers.json"
    rows = layer_times.main(1, str(out), "cpu", "resnet18", image_size=16, algorithms=True, warmup=0, runs=1,
                            max_layers=5)
    assert rows == json.loads(out.read_text())
    # the stem, layer1's two 3x3s (without and with the residual, twice each), layer2's
    # downsample and strided 3x3 (which the block runs first: its output is the residual)
    assert sorted(row["layer"] for row in rows) == sorted([
        "3x16x16->64 7x7/2", "64x4x4->64 3x3/1", "64x4x4->64 3x3/1 +res", "64x4x4->128 1x1/2 norelu",
        "64x4x4->128 3x3/2"])
    assert [row["count"] for row in rows if "3x3/1" in row["layer"]] == [2, 2]
    native = ("fused_native",) if "native" in resnet_fused.available_backends("cpu") else ()
    for row in rows:
        for name in ("fused_triton", *native, "cudnn_conv", "eager_conv_bn_add_relu",
                     "triton:implicit_gemm", "triton:cudnn_epilogue"):
            assert row[name] > 0, (row["layer"], name)
        assert not any(name in row for name in ("triton:gemm_tma", "triton:conv_tma"))  # float32: no TMA
        assert row["triton_path"].startswith("runs on 'triton'")



@pytest.mark.slow
def test_session_script_keeps_to_its_budget(tmp_path):
    """benchmarks/gpu_session.sh (the one-call GPU session) on this machine: a step that
    cannot get the least time it needs out of BUDGET is skipped and named at the end, one
    that can runs under its cut limit and leaves its log (here the native GPU tests, the
    sm90a ones apart, which skip without a GPU), and the whole script ends inside the budget."""
    import os
    import subprocess
    import time

    import torch

    if torch.cuda.is_available():
        pytest.skip("on a GPU the native step would run the real GPU tests")
    out = tmp_path / "session"
    env = dict(os.environ, BUDGET="119", STEPS="build precompile tune models native compile", PYTHON=sys.executable)
    env.pop("OUT", None)
    began = time.monotonic()
    done = subprocess.run(["bash", str(BENCH / "gpu_session.sh"), str(out)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert time.monotonic() - began < 119 + 15, done.stdout
    assert done.returncode == 0, done.stderr
    log = (out / "session.log").read_text()
    assert json.loads((out / "environment.json").read_text())["torch"]
    # the build needs 120 s (and leaves 150), tune 30 and leaves 260 (200 for the model
    # benchmark, 60 for the native tests), models 60 and leaves 60: of 119 s only the
    # native tests fit
    assert "not run (out of the 119s budget): build tune models compile" in log, log
    assert "skipped: offline_compile.py knows sm_90 and sm_80, this GPU is sm_?" in log  # no GPU here
    assert (out / "native_tests.log").read_text().splitlines()[-1] == "exit 0"
    assert (out / "native_sm90a_tests.log").read_text().splitlines()[-1] == "exit 0"  # (the Hopper kernel apart)
    assert not (out / "build.log").exists() and not (out / "models.json").exists()
