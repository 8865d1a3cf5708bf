"""``resnet-fused validate``: options, JSON, exit codes and errors."""
import json
import subprocess
import sys

import pytest

import resnet_fused
from resnet_fused import cli


def test_validate_writes_json_and_passes(tmp_path, capsys):
    path = tmp_path / "v.json"
    code = cli.main(["validate", "--arch", "resnet18", "resnext50_32x4d", "--image-size", "32",
                     "--batch-size", "1", "--json", str(path), "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    cpu_backends = resnet_fused.backends.default_backends("cpu")  # torch, and native where built
    total = 2 * len(cpu_backends)
    assert "resnet18" in printed and "PASS" in printed and f"{total} passed, 0 failed, 0 skipped" in printed
    data = json.loads(path.read_text())
    assert data["command"] == "validate"
    assert data["args"]["image_size"] == 32 and data["args"]["batch_size"] == 1
    assert {"torch", "resnet_fused", "backends"} <= set(data["environment"])
    rows = data["results"]
    assert sorted((r["arch"], r["backend"], r["device"], r["dtype"]) for r in rows) == sorted(
        (arch, backend, "cpu", "float32") for arch in ("resnet18", "resnext50_32x4d") for backend in cpu_backends)
    for r in rows:
        assert set(r) == {"arch", "backend", "device", "dtype", "max_abs_err", "rel_err", "torch_rel_err",
                          "tolerance", "status", "note", "seconds"}
        assert r["status"] == "PASS" and 0 < r["rel_err"] <= r["tolerance"] == 1e-5


def test_validate_exits_nonzero_on_failure(monkeypatch, capsys):
    import resnet_fused.validate as validate

    monkeypatch.setattr(validate, "tolerance", lambda dtype, device: 0.0)  # nothing can pass a zero bound
    code = cli.main(["validate", "--arch", "resnet18", "--image-size", "32", "--no-progress"])
    assert code == 1
    assert "FAIL" in capsys.readouterr().out


@pytest.mark.parametrize("tile", [None, "2"], ids=["f4x4", "f2x2"])
def test_validate_names_the_precise_winograd_tile_when_native_cpu_fails(monkeypatch, capsys, tile):
    import resnet_fused.validate as validate

    if "native" not in resnet_fused.available_backends("cpu"):
        pytest.skip("the native backend is not built here")
    if tile is not None:
        monkeypatch.setenv("RESNET_FUSED_CPU_WINOGRAD_TILE", tile)
    monkeypatch.setattr(validate, "tolerance", lambda dtype, device: 0.0)  # nothing can pass a zero bound
    code = cli.main(["validate", "--arch", "resnet18", "--backend", "native", "--image-size", "32", "--no-progress"])
    out = " ".join(capsys.readouterr().out.split())  # rich wraps long lines
    assert code == 1 and "FAIL" in out
    assert ("RESNET_FUSED_CPU_WINOGRAD_TILE=2 runs F(2x2,3x3)" in out) == (tile is None), out


def test_validate_bfloat16_on_cpu_reports_torchs_own_error(capsys):
    code = cli.main(["validate", "--arch", "resnet18", "--dtype", "bf16", "--image-size", "32", "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "bfloat16" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["validate", "--arch", "resnet9"], "invalid choice: 'resnet9'"),
        (["validate", "--backend", "cudnn"], "invalid choice: 'cudnn'"),
        (["validate", "--dtype", "int8"], "unknown dtype 'int8'"),
        (["validate", "--batch-size", "0"], "expected a positive integer, got 0"),
        (["validate", "--image-size", "16"], "--image-size should be at least 32"),
        (["validate", "--device", "tpu"], "expected cpu or cuda"),
        (["bench", "--providers", "tensorrt"], "unknown provider 'tensorrt'"),
        (["bench", "--providers", "eager_nchw+graphs"], "+graphs applies to the fused providers only"),
        (["bench", "--device", "cpu", "--cuda-graphs"], "--cuda-graphs needs --device cuda"),
        (["bench", "--arch", "vgg16"], "invalid choice: 'vgg16'"),
        (["bench", "--image-size", "8"], "--image-size should be at least 32"),
        (["bench", "--batch-size", "-1"], "expected a positive integer"),
        (["bench", "--device", "cpu", "--providers", "fused_torch+graphs"],
         "fused_torch+graphs replays a CUDA graph: it needs a cuda device, got cpu"),
        (["bench", "--device", "cpu", "--runs", "2", "--rounds", "3"], "--rounds (3) should be at most --runs (2)"),
        (["bench", "--warmup", "-1"], "expected a non-negative integer, got -1"),
        # outputs that cannot be written are refused before anything runs
        (["validate", "--json", "/nonexistent-dir/v.json"], "cannot write '/nonexistent-dir/v.json': the folder"),
        (["bench", "--json", "/nonexistent-dir/b.json"], "cannot write '/nonexistent-dir/b.json': the folder"),
        (["bench", "--plot", "/nonexistent-dir/b.png"], "cannot write '/nonexistent-dir/b.png': the folder"),
        (["bench", "--json", "/"], "'/' is a directory; expected a file path"),
        (["validate", "--json", "/nonexistent-dir/"], "'/nonexistent-dir/' is a directory; expected a file path"),
        (["validate", "--json", ""], "expected a file path, got an empty one"),
        (["bench", "--plot", ""], "expected a file path, got an empty one"),
        (["validate", "--seed", "18446744073709551615"], "expected a seed (0 to 4294967295) integer"),
        (["validate", "--seed", "-1"], "expected a seed (0 to 4294967295) integer, got -1"),
        # a value given twice would time or check the same row twice
        (["validate", "--arch", "resnet18", "resnet18"], "--arch names resnet18 twice"),
        (["validate", "--backend", "torch", "torch"], "--backend names torch twice"),
        (["validate", "--dtype", "fp32", "float32"], "--dtype names float32 twice"),
        (["bench", "--device", "cpu", "--batch-size", "2", "2"], "--batch-size names 2 twice"),
        (["explain", "--image-size", "16"], "--image-size should be at least 32 (ResNets downsample by 32), got 16"),
        (["explain", "--backend", "cudnn"], "argument --backend: invalid choice: 'cudnn'"),
        (["explain", "--batch-size", "0"], "expected a positive integer, got 0"),
    ],
)
def test_bad_options_get_clear_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err
    assert f"usage: resnet-fused {argv[0]}" in err  # the subcommand's usage, not the top level's


def test_bench_refuses_a_fused_provider_whose_backend_cannot_run_there(monkeypatch, capsys):
    """Its calls would all fall back to the torch backend and be timed under its name."""
    from resnet_fused import backends

    monkeypatch.setattr(backends, "available_backends", lambda device=None: ["torch"])
    with pytest.raises(SystemExit):
        cli.main(["bench", "--device", "cpu", "--providers", "fused_native"])
    err = capsys.readouterr().err
    assert "fused_native cannot run on cpu" in err and "(fused providers that can: fused_torch)" in err


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_is_an_error(capsys):
    with pytest.raises(SystemExit):
        cli.main(["validate", "--device", "cuda"])
    assert "torch.cuda.is_available() is False" in capsys.readouterr().err


def test_console_script_is_installed():
    out = subprocess.run([sys.executable, "-m", "resnet_fused.cli", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and "resnet_fused" in out.stdout
    help_text = subprocess.run([sys.executable, "-m", "resnet_fused.cli", "validate", "--help"],
                               capture_output=True, text=True).stdout
    for option in ("--arch", "--backend", "--device", "--dtype", "--batch-size", "--image-size", "--json"):
        assert option in help_text


def test_bench_writes_table_json_and_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    json_path, png_path = tmp_path / "b.json", tmp_path / "b.png"
    code = cli.main(["bench", "--arch", "resnet18", "--image-size", "32", "--batch-size", "2", "3", "--runs", "2",
                     "--warmup", "1", "--providers", "eager_nchw", "fused_torch", "--device", "cpu",
                     "--json", str(json_path), "--plot", str(png_path), "--no-progress"])
    assert code == 0
    out = capsys.readouterr().out
    assert "images/s" in out and "fused_torch" in out and "eager_nchw" in out
    data = json.loads(json_path.read_text())
    assert data["command"] == "bench" and data["args"]["batch_size"] == [2, 3]
    rows = data["results"]
    assert [(r["batch_size"], r["provider"]) for r in rows] == [
        (2, "eager_nchw"), (2, "fused_torch"), (3, "eager_nchw"), (3, "fused_torch")]
    for r in rows:
        assert r["error"] is None and r["runs"] >= 2 and r["images_per_s"] > 0
        assert r["p10_ms"] <= r["median_ms"] <= r["p90_ms"]
        assert r["vs_eager"] == pytest.approx(r["images_per_s"] / next(
            e["images_per_s"] for e in rows if e["provider"] == "eager_nchw" and e["batch_size"] == r["batch_size"]))
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_rounds_take_providers_in_turn_and_pool_runs(monkeypatch, tmp_path):
    import resnet_fused.bench as bench

    order, built = [], []
    real_runner, real_time = bench.model_runner, bench.time_fn

    def runner(provider, *args):
        built.append(provider)
        return real_runner(provider, *args)

    def timed(fn, device, warmup=5, runs=30, **kw):
        order.append(runs)
        return real_time(fn, device, warmup=warmup, runs=runs, **kw)

    monkeypatch.setattr(bench, "model_runner", runner)
    monkeypatch.setattr(bench, "time_fn", timed)
    json_path = tmp_path / "r.json"
    code = cli.main(["bench", "--arch", "resnet18", "--image-size", "32", "--batch-size", "1", "--runs", "7",
                     "--warmup", "1", "--rounds", "3", "--providers", "eager_nchw", "fused_torch", "--device", "cpu",
                     "--json", str(json_path), "--no-progress"])
    assert code == 0
    assert built == ["eager_nchw", "fused_torch"]  # each set up once, kept across rounds
    assert order == [3, 3, 2, 2, 2, 2]  # A B A B A B, 7 runs split 3 + 2 + 2
    data = json.loads(json_path.read_text())
    assert data["args"]["rounds"] == 3
    assert [r["runs"] for r in data["results"]] == [7, 7]


def test_bench_reports_a_failing_provider_and_exits_nonzero(monkeypatch, capsys):
    import resnet_fused.bench as bench

    real = bench.model_runner

    def flaky(provider, *args):
        if provider == "eager_channels_last":
            raise RuntimeError("no compiler here")
        return real(provider, *args)

    monkeypatch.setattr(bench, "model_runner", flaky)
    code = cli.main(["bench", "--arch", "resnet18", "--image-size", "32", "--batch-size", "1", "--runs", "1",
                     "--warmup", "1", "--providers", "eager_nchw", "eager_channels_last", "--no-progress"])
    assert code == 1
    assert "error: RuntimeError: no compiler here" in capsys.readouterr().out



@pytest.mark.skipif(__import__("resnet_fused").backends.unavailable_reason("triton") is not None,
                    reason="needs the Triton backend (its CPU interpreter here)")
def test_validate_says_how_many_convs_fell_back():
    """A PASS row of a backend that handed convs down the fallback chain says so (Triton
    takes no float64: every conv of that row runs on the torch backend)."""
    import torch

    from resnet_fused.validate import run_validation

    (row,) = run_validation(["resnet18"], ["triton"], ["cpu"], [torch.float64], image_size=32)
    assert row.status == "PASS" and row.note == "20 of 20 convs ran on 'torch' (20)"
    (row,) = run_validation(["resnet18"], ["torch"], ["cpu"], [torch.float32], image_size=32)
    assert row.status == "PASS" and row.note == ""


def test_time_fn_runs_as_often_as_asked():
    """--runs above the 1000 that min_time_s may extend a timing to is not cut to 1000."""
    from resnet_fused.bench import time_fn

    calls = []
    timing = time_fn(calls.append, "cpu", warmup=0, runs=1200)
    assert timing.runs == len(calls) == 1200
    assert time_fn(calls.append, "cpu", warmup=0, runs=3, min_time_s=60).runs == 1000  # the extension's cap


def test_time_fn_goes_on_rotating_the_inputs_after_the_warm_up():
    """No timed call reads the buffer the call before it read (the warm-up's last)."""
    from resnet_fused.bench import time_fn

    for warmup in (0, 1, 4):
        calls = []
        time_fn(calls.append, "cpu", warmup=warmup, runs=5)
        assert calls == list(range(warmup + 5))


def test_validate_rows_do_not_depend_on_the_other_archs_asked_for():
    """An arch's weights, statistics and images come from its name and --seed alone, so a
    row of a whole run is reproduced by asking for that arch alone."""
    from resnet_fused.validate import run_validation

    def resnet34_row(archs):
        (row,) = [r for r in run_validation(archs=archs, backend_names=["torch"], devices=["cpu"], image_size=32,
                                            batch_size=1) if r.arch == "resnet34"]
        return row.rel_err, row.max_abs_err

    assert resnet34_row(["resnet18", "resnet34"]) == resnet34_row(["resnet34"])


def test_validate_fails_an_infinite_error_even_against_an_infinite_bound(monkeypatch, capsys):
    """float16's bound is twice torchvision's own error: where that overflows too, the
    row still fails (inf <= inf must not pass)."""
    import resnet_fused.validate as validate

    monkeypatch.setattr(validate, "relative_error", lambda out, ref: float("inf"))
    code = cli.main(["validate", "--arch", "resnet18", "--backend", "torch", "--dtype", "bf16", "--image-size", "32",
                     "--no-progress"])
    out = capsys.readouterr().out
    assert code == 1 and "FAIL" in out


def test_ship_tuned_refuses_a_missing_or_malformed_record(tmp_path, capsys):
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "ship_tuned.py"
    spec = importlib.util.spec_from_file_location("ship_tuned", path)
    ship_tuned = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ship_tuned)
    into = tmp_path / "table.json"
    with pytest.raises(SystemExit) as exc:
        ship_tuned.main([str(tmp_path / "missing.json"), "--into", str(into)])
    assert exc.value.code == 2 and "no recorded table at" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    with pytest.raises(SystemExit):
        ship_tuned.main([str(bad), "--into", str(into)])
    assert "a tuning table is a JSON object, got list" in capsys.readouterr().err
    assert not into.exists()


def test_validate_that_validates_nothing_exits_nonzero(monkeypatch, capsys):
    """Every row skipped (a backend that cannot run here) is no pass: exit 1, said."""
    import resnet_fused.validate as validate

    monkeypatch.setattr(validate, "_skip_reason", lambda backend, device: "cannot run here (test)")
    code = cli.main(["validate", "--arch", "resnet18", "--backend", "torch", "--image-size", "32", "--no-progress"])
    out = capsys.readouterr().out
    assert code == 1 and "0 passed, 0 failed, 1 skipped" in out and "nothing was validated" in out


def test_explain_lists_each_conv_and_writes_json(tmp_path, capsys):
    """``resnet-fused explain``: one row per conv of the model, in call order, with its path."""
    path = tmp_path / "e.json"
    assert cli.main(["explain", "--arch", "resnet18", "--backend", "torch", "--device", "cpu", "--image-size", "32",
                     "--batch-size", "2", "--json", str(path)]) == 0
    printed = capsys.readouterr().out
    assert "layer4.1.conv2" in printed and "20 convs: 20 on 'torch'" in printed
    data = json.loads(path.read_text())
    assert data["command"] == "explain" and data["args"]["batch_size"] == 2 and data["args"]["dtype"] == "torch.float32"
    convs = data["convs"]
    assert [c["module"] for c in convs][:4] == ["conv1", "layer1.0.conv1", "layer1.0.conv2", "layer1.1.conv1"]
    assert len(convs) == 20 and convs[0]["input"] == [2, 3, 32, 32] and convs[0]["weight"] == [64, 3, 7, 7]
    for c in convs:
        assert set(c) == {"module", "fused", "input", "weight", "dtype", "stride", "groups", "residual", "relu", "path"}
        assert c["fused"] and c["path"] == "runs on 'torch'"
