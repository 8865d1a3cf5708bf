"""The Triton kernels compiled for GPUs this machine does not have (tests/offline_compile.py).

Triton builds a cubin without a GPU once it is told the target; only loading and
launching need one. These tests run the backend's GPU host code on CPU tensors with
Triton's driver swapped for one that compiles for sm_90 (H100) or sm_80 (A100) and
launches nothing, so a kernel that does not compile with the installed Triton, a tile
that needs more shared memory or registers than the GPU has, or host code that only
runs on a GPU and is broken, fails here instead of in a scarce GPU session.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

from resnet_fused.backends.triton_backend import TRITON_BEFORE_3_7  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU runs the kernels themselves (gpu tests)")


def run_offline(tmp_path, *args: str, code: str | None = None) -> subprocess.CompletedProcess:
    """tests/offline_compile.py (or ``code`` importing it) in a fresh process: Triton must be
    imported without the interpreter, which this process has switched on."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton")
    env["PYTHONPATH"] = HERE + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-c", code] if code else [sys.executable, os.path.join(HERE, "offline_compile.py"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)


@pytest.mark.slow
@pytest.mark.parametrize("arch, models, dtypes", [
    (90, ["resnet50", "resnext50_32x4d"], ["float16"]),  # every algorithm, grouped convs too
    (90, ["resnet50"], ["float32", "float32-ieee"]),  # 4-byte tiles: the shared memory they need
    (80, ["resnet50"], ["float16"]),  # mma.sync, no TMA
], ids=["sm90_fp16", "sm90_fp32", "sm80_fp16"])
def test_every_resnet50_conv_compiles_with_its_heuristic_tile(tmp_path, arch, models, dtypes):
    """What a GPU session with RESNET_FUSED_TRITON_AUTOTUNE=0 launches: each algorithm
    the backend would offer each conv at batch 256 fits the GPU. (CI's share; the full
    sweeps, bf16 and batch 1 among them, are in benchmarks/NOTES.md.)"""
    out = tmp_path / "records.json"
    done = run_offline(tmp_path, "--arch", str(arch), "--batch", "256", "--no-autotune", "--dtypes", *dtypes,
                       "--models", *models, "--json", str(out))
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    records = json.loads(out.read_text())
    algorithms = {call["algorithm"] for call in records["calls"]}
    # the TMA algorithms: on Hopper, for 16-bit types (cudnn_epilogue: its Triton pass alone)
    tma = arch == 90 and "float16" in dtypes
    assert algorithms == {"implicit_gemm", "cudnn_epilogue"} | ({"gemm_tma", "conv_tma"} if tma else set())
    launches = [rec for call in records["calls"] for rec in call["launched"]]
    convs = [rec for rec in launches if rec["kernel"] != "_bias_residual_relu_kernel"]
    # every conv kernel on tensor cores (float32 as TF32, torch's default for convs), but IEEE float32
    for call in records["calls"]:
        for rec in call["launched"]:
            if rec["kernel"] != "_bias_residual_relu_kernel":
                want = ("fma",) if call["dtype"] == "float32-ieee" else ("wgmma", "mma.sync")
                assert rec["mma"] in want and rec["shared"] > 0, (call, rec)
    assert convs
    # Hopper: every wgmma kernel overlaps its wgmmas (one runs while the next is issued).
    # Three ways this was lost: a weight address Triton could not prove aligned (the 1x1
    # convs' tap index) sent the weight through registers; a patch reshaped as wgmma's A
    # operand went through registers (conv_tma); ResNeXt's grouped convs with 4 and 8
    # channels a group loaded through registers (now merged into 32-channel groups).
    # Each time every wgmma was waited for.
    for call in records["calls"]:
        for rec in call["launched"]:
            if rec["mma"] == "wgmma":
                assert rec["wgmma_overlap"] == "pipelined", (call["layer"], call["algorithm"], rec)
                assert rec["loads"] in ("cp.async", "TMA"), (call["layer"], call["algorithm"], rec)
    # the stem's packed filter rows load as aligned cp.async vectors (its 3-channel pixels
    # were loaded one 2-byte element at a time, through registers, before)
    stems = [(call, rec) for call in records["calls"] for rec in call["launched"]
             if call["algorithm"] == "implicit_gemm" and "7x7/2" in call["layer"] and call["dtype"] != "float32-ieee"]
    assert stems
    for call, rec in stems:
        assert rec["loads"] == "cp.async" and min(rec["cp_async_bytes"]) >= 8, (call, rec)


@pytest.mark.slow
def test_every_config_the_autotuner_may_try_compiles(tmp_path):
    """Autotuning: every config the pruners admit for ResNet-18's first convs (the stem,
    3x3 with and without residual, a strided 3x3 and 1x1) compiles and fits an H100 (the
    autotuner would skip one that does not, silently)."""
    out = tmp_path / "records.json"
    done = run_offline(tmp_path, "--arch", "90", "--batch", "32", "--models", "resnet18", "--dtypes", "float16",
                       "--max-layers", "5", "--json", str(out))
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "0 problems" in done.stdout
    # and in every one of them the wgmmas overlap (see the heuristic-tile test)
    launched = [rec for call in json.loads(out.read_text())["calls"] for rec in call["launched"]]
    assert len(launched) > 20
    waited = {(rec["kernel"], tuple(rec["tile"].items()), rec["warps"], rec["stages"], rec["wgmma_overlap"])
              for rec in launched if rec["mma"] == "wgmma" and rec["wgmma_overlap"] != "pipelined"}
    if TRITON_BEFORE_3_7:  # ptxas serializes Triton 3.6's two-warpgroup code (see TRITON_BEFORE_3_7); timed anyway
        waited = {rec for rec in waited if not (rec[2] == 8 and rec[4] == "serialized")}
    assert not waited, waited


def test_wgmma_overlap_is_read_from_the_sass():
    """The classifier behind those checks, on SASS shaped like the three cases
    (addresses and operands as cuobjdump prints them)."""
    sys.path.insert(0, HERE)
    from offline_compile import wgmma_overlap

    def sass(*ops):
        return "\n".join(f"        /*{16 * i:04x}*/                   {op} ;" for i, op in enumerate(ops))

    loop = ["SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [UR11+0x1c020], R7", "WARPGROUP.ARRIVE",
            "HGMMA.64x128x16.F32 R88, gdesc[UR8], R88", "HGMMA.64x128x16.F32 R88, gdesc[UR12], R88, gsb0"]
    pipelined = sass("NOP", *loop, "WARPGROUP.DEPBAR.LE gsb0, 0x1", "@P0 BRA 0x0010", "WARPGROUP.DEPBAR.LE gsb0, 0x0",
                     "EXIT", "BRA 0x0010")  # the cold path's unpredicated way back is no loop
    waited = sass("NOP", *loop, "WARPGROUP.DEPBAR.LE gsb0, 0x0", "@P0 BRA 0x0010", "EXIT")
    serialized = sass("NOP", "WARPGROUP.ARRIVE", "HGMMA.64x128x16.F32 R88, R152, gdesc[UR8], R88, gsb0",
                      "WARPGROUP.DEPBAR.LE gsb0, 0x0", "WARPGROUP.ARRIVE",
                      "HGMMA.64x128x16.F32 R88, R160, gdesc[UR16], R88, gsb0", "WARPGROUP.DEPBAR.LE gsb0, 0x0",
                      "@P0 BRA 0x0010", "EXIT")
    assert [wgmma_overlap(s) for s in (pipelined, waited, serialized, sass("HMMA.16816.F32 R4, R8, R12, R4"))] == \
        ["pipelined", "waited", "serialized", "none"]


def test_a_tile_too_large_for_the_gpu_is_reported(tmp_path):
    """The check can fail: a heuristic tile needing 256 KiB of shared memory is caught."""
    code = """
import offline_compile
from resnet_fused.backends import triton_backend as tb
big = tb._config(128, 128, 64, 4, 8)  # 8 stages of 32 KiB
tb.heuristic_config = lambda *args, **kwargs: big
res = offline_compile.check(90, 2, ["float16"], ["resnet18"], autotune=False, log=lambda *a: None, max_layers=2)
whys = [f["why"] for f in res["failures"] if f.get("algorithm") == "implicit_gemm"]
print(len(whys), whys[0] if whys else "")
"""
    done = run_offline(tmp_path, code=code)
    assert done.returncode == 0, done.stderr[-4000:]
    count, why = done.stdout.strip().split(" ", 1)
    assert int(count) > 0 and "OutOfResources" in why and "shared memory" in why, done.stdout


def test_refuses_to_run_under_the_interpreter(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, os.path.join(HERE, "offline_compile.py")], capture_output=True, text=True,
                          env=env)
    assert done.returncode == 2 and "unset TRITON_INTERPRET" in done.stderr


@pytest.mark.slow
def test_precompile_fills_the_cache_a_later_run_loads(tmp_path):
    """--precompile (for the machine with the GPU, in parallel shards): the shards together
    compile every kernel a whole run compiles, so a whole run afterwards finds them all in
    the Triton cache and compiles none; no autotune timing and no tuning record is
    written (the fake timer's 1.0 for every config must not reach a GPU's caches)."""
    record = tmp_path / "record.json"

    def precompile(*args):
        argv = ["--precompile", "--models", "resnet18", "--max-layers", "2", "--batch", "4", "2", *args]
        code = (f"import os, sys, offline_compile; os.environ['RESNET_FUSED_TRITON_RECORD'] = {str(record)!r}; "
                f"sys.exit(offline_compile.main({argv!r}))")
        done = run_offline(tmp_path, code=code)
        assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
        return done.stdout

    def cubins():
        return sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / "triton").rglob("*.cubin"))

    assert "0 problems" in precompile("--shard", "0/2")
    half = cubins()
    precompile("--shard", "1/2")
    sharded = cubins()
    assert half and len(sharded) > len(half)  # each shard compiled kernels of its own
    precompile()  # the whole run: every kernel is in the cache already
    assert cubins() == sharded
    assert not list((tmp_path / "triton").rglob("*autotune*")) and not record.exists()


def test_one_layout_compiles_once_whatever_its_size_one_strides(tmp_path):
    """A 1x1 weight made channels_last by ``.to(memory_format=)`` (what a model's ``.to()``
    does) has strides (C, 1, C, C) where ``.contiguous(memory_format=)`` (the fold's, the
    precompile's) leaves (C, 1, 1, 1); a batch-1 input's batch stride likewise varies.
    Both address the same elements: the same compiled kernel and the same choice key."""
    code = """
import torch, offline_compile
from resnet_fused.backends import triton_backend as tb
cl = torch.channels_last
tb.AUTOTUNE = False
with offline_compile.offline_gpu(90, analyse=False) as fake:
    keys = set()
    for n in (2, 1):
        x = torch.empty(n, 64, 8, 8, dtype=torch.float16).contiguous(memory_format=cl)
        x_wide = torch.empty_strided(x.shape, (x.stride(0) + 16 * (n == 1), *x.stride()[1:]), dtype=x.dtype)
        w = torch.empty(128, 64, 1, 1, dtype=torch.float16)
        for xi, wi in ((x, w.contiguous(memory_format=cl)), (x_wide, w.to(memory_format=cl))):
            args = (xi, wi, None, None, (1, 1), (0, 0), (1, 1), 1, True)
            keys.add(tb._shape_key(xi, wi, *args[3:]))
            tb.implicit_gemm(*args)
    print(len(keys), len(fake._usage))
"""
    done = run_offline(tmp_path, code=code)
    assert done.returncode == 0, done.stderr[-4000:]
    keys, kernels = map(int, done.stdout.split())
    assert (keys, kernels) == (2, 2), done.stdout  # one per batch size, not one per layout


def test_a_tuned_call_launches_its_tile_past_the_autotuner_and_its_lock(tmp_path):
    """implicit_gemm's autotuner runs once per launch shape; later calls launch the tile it
    chose directly, without Triton's Autotuner.run and without ``_tuner_lock``, so one
    thread's first-call tuning (seconds of compiles on a GPU) does not stall another
    thread's tuned calls. A traced call (torch.compile) gets the same tile, tuned on real
    tensors of its shapes."""
    code = """
import json, threading, torch, offline_compile
from torch._subclasses.fake_tensor import FakeTensorMode
from resnet_fused.backends import triton_backend as tb
cl = torch.channels_last
tb.AUTOTUNE = True
def case(c, residual=False):
    x = torch.randn(2, c, 8, 8, dtype=torch.float16).contiguous(memory_format=cl)
    w = torch.randn(64, c, 3, 3, dtype=torch.float16).contiguous(memory_format=cl)
    r = torch.randn(2, 64, 8, 8, dtype=torch.float16).contiguous(memory_format=cl) if residual else None
    return (x, w, None, r, (1, 1), (1, 1), (1, 1), 1, True)
def tile(record):
    c = record["constants"]
    return [c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_K"], record["warps"], record["stages"]]
with offline_compile.offline_gpu(90, analyse=False) as fake:
    runs = []
    run = tb._tuned.run
    tb._tuned.run = lambda *a, **kw: (runs.append(a[5]), run(*a, **kw))[1]  # (a[5]: N)
    a, b = case(32), case(48, residual=True)
    tb.implicit_gemm(*a)
    tuned_launch, first_runs = tile(fake.launches[-1]), len(runs)
    tb.implicit_gemm(*a)
    direct = tile(fake.launches[-1])
    held, release = threading.Event(), threading.Event()
    def hold():
        with tb._tuner_lock:  # as a thread tuning another shape does
            held.set()
            release.wait(60)
    holder = threading.Thread(target=hold)
    holder.start()
    held.wait()
    done = []
    def call(args):
        tb.implicit_gemm(*args)
        done.append(args[0].shape[1])
    tuned = threading.Thread(target=call, args=(a,))
    tuned.start()
    tuned.join(20)
    went_on = not tuned.is_alive()
    new = threading.Thread(target=call, args=(b,))
    new.start()
    new.join(1)
    waited = new.is_alive()
    release.set()
    holder.join()
    new.join(120)
    after_new = len(runs)
    seen = []
    launchable = tb._launchable
    class Recorder:  # each launch's arguments, then the launch itself (traced: through wrap_triton)
        def __init__(self, kernel, x): self.kernel, self.x = kernel, x
        def __getitem__(self, grid):
            def launch(*args, **kw):
                seen.append((tb._traced(self.x), kw))
                return launchable(self.kernel, self.x)[grid](*args, **kw)
            return launch
    tb._launchable = Recorder
    c = case(24)
    with FakeTensorMode() as mode:
        fake_args = tuple(mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for t in c)
        tb.implicit_gemm(*fake_args)
    traced = [[kw[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages")] for t, kw in seen if t]
    best = tb._tuned.best_config
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext
    runs_before = len(runs)
    dynamic, static = DimDynamic.DYNAMIC, DimDynamic.STATIC
    x, w, *rest = case(40)
    with FakeTensorMode(shape_env=ShapeEnv()) as mode:  # dynamic shapes: nothing to tune, the heuristic tile
        x = mode.from_tensor(x, symbolic_context=StatelessSymbolicContext([dynamic, static, dynamic, dynamic]))
        fake_args = (x, mode.from_tensor(w), *rest)
        assert not isinstance(x.shape[2], int)
        tb.implicit_gemm(*fake_args)
    symbolic = dict(runs=len(runs) - runs_before, launches=len(seen) - len(traced))
    print(json.dumps(dict(first_runs=first_runs, tuned_launch=tuned_launch, direct=direct, went_on=went_on,
                          waited=waited, done=done, after_new=after_new, runs_total=len(runs), traced=traced, symbolic=symbolic,
                          best=[best.kwargs["BLOCK_M"], best.kwargs["BLOCK_N"], best.kwargs["BLOCK_K"],
                                best.num_warps, best.num_stages])))
"""
    done = run_offline(tmp_path, code=code)
    assert done.returncode == 0, done.stderr[-4000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["first_runs"] == 1 and out["direct"] == out["tuned_launch"]  # the autotuner's tile, launched as is
    assert out["went_on"], "a tuned call waited for the tuner lock another thread held"
    assert out["waited"], "an untuned call must wait its turn at the autotuner"
    assert out["done"] == [32, 48] and out["after_new"] == 2  # the new shape tuned once the lock was free
    # the traced call: its shapes tuned once on real tensors, that tile handed to the trace
    assert out["runs_total"] == 3 and out["traced"] == [out["best"]]
    assert out["symbolic"] == {"runs": 0, "launches": 1}  # symbolic sizes: launched untuned, nothing timed
