"""Compile the Triton backend's GPU kernels for a GPU that is not here.

Triton compiles to a cubin on a machine without a GPU once it is given a target; only
loading and launching need one. This script swaps Triton's active driver for
:class:`OfflineDriver`, which names a target (sm_90: an H100; sm_80: an A100), answers
the device queries with that GPU's limits, reads each cubin's register and local-memory
use with the cuobjdump Triton ships, and turns launches into records. Then it runs the
backend's *GPU host code*, not a copy of it (the algorithms, the heuristic tiles, the
autotuner with every config the pruners admit, the TMA descriptors, the epilogue kernel),
on CPU tensors shaped like ResNet-50's convs. What this finds before a GPU session:
kernels that do not compile with the installed Triton (the device image has 3.6, CI has
3.8); tiles that need more shared memory, registers or threads than the GPU has, which
the autotuner silently skips but a heuristic or shipped tile would launch and fail;
grids past CUDA's limits; host code that only runs on a GPU and is broken.
What it cannot find: wrong results and speed (nothing runs).

    python tests/offline_compile.py --arch 90 --batch 256 --dtypes float16 bfloat16 float32 float32-ieee

prints one line per kernel compiled and a summary, and exits 1 on any problem.
``--json PATH`` writes the records. Run it without TRITON_INTERPRET (it refuses).

``--precompile`` is for a machine that has the GPU: it compiles the same kernels into
that machine's Triton cache (TRITON_CACHE_DIR) so a later run there loads them instead of
compiling them one after another while it autotunes (benchmarks/gpu_session.sh runs it in
parallel processes, ``--shard K/N``, while the extension builds). The kernels are those
the real driver would compile: same target, same arguments and so the same
specializations, hence the same cache keys. Nothing else is written: no autotune timings
(the fake timer's are not timings), no algorithm choices, no tuning record.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from types import SimpleNamespace

#: per target: (name, SMs, shared memory per block with opt-in, registers per SM)
GPUS = {
    90: ("NVIDIA H100 80GB HBM3 (offline)", 132, 232448, 65536),
    80: ("NVIDIA A100-SXM4-80GB (offline)", 108, 166912, 65536),
}
#: CUDA's grid limits (x, y, z)
GRID_LIMITS = (2**31 - 1, 65535, 65535)


class OfflineDriver:
    """Enough of Triton's CUDA driver to compile and 'launch' without a GPU."""

    def __init__(self, arch: int, analyse: bool = True, gpu: tuple | None = None, build_launchers: bool = False):
        from triton.backends.compiler import GPUTarget

        self.arch, self.analyse, self.build_launchers = arch, analyse, build_launchers
        self.name, self.sms, self.smem, self.regs = gpu or GPUS[arch]
        self.launcher_errors: list[str] = []
        self.target = GPUTarget("cuda", arch, 32)
        self.launches: list[dict] = []
        self.failures: list[dict] = []
        self._usage: dict[bytes, dict] = {}
        self.utils = SimpleNamespace(
            get_device_properties=self._properties, load_binary=self._load_binary, unload_module=lambda module: None,
        )
        self.launcher_cls = self._launcher

    # the queries Triton's JIT, compiler and autotuner make
    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def is_active(self):
        return True

    def get_benchmarker(self):
        return self._bench

    def _properties(self, device):
        return {"max_shared_mem": self.smem, "multiprocessor_count": self.sms, "max_num_regs": self.regs,
                "warpSize": 32, "sm_clock_rate": 0, "mem_clock_rate": 0, "mem_bus_width": 0}

    def _load_binary(self, name, cubin, shared, device):
        usage = self._resources(cubin)
        per_warp = -(-usage["regs"] * 32 // 256) * 256  # registers are allocated per warp, 256 at a time
        max_threads = min(1024, (self.regs // per_warp) * 32) if per_warp else 1024
        # the "function" handle Triton passes to every launch of this kernel: its usage
        return None, usage, usage["regs"], usage["spills"], max_threads

    def _resources(self, cubin: bytes) -> dict:
        """Registers, spilled words, and which instructions the SASS uses: the MMA kind
        (HGMMA: Hopper's wgmma; HMMA: mma.sync) and how operands reach shared memory
        (UTMALDG: TMA; LDGSTS: cp.async; neither: loads through registers)."""
        if not self.analyse:  # --precompile: the cubin is what is wanted, not its reading
            return self._usage.setdefault(cubin, {"regs": 0, "spills": 0, "mma": "?", "loads": "?",
                                                  "cp_async_bytes": [], "wgmma_overlap": "?"})
        if cubin not in self._usage:
            import triton

            tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
            with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
                f.write(cubin)
                f.flush()
                usage = subprocess.run([os.path.join(tools, "cuobjdump"), "-res-usage", f.name], capture_output=True,
                                       text=True, check=True).stdout
                sass = subprocess.run([os.path.join(tools, "cuobjdump"), "-sass", f.name], capture_output=True,
                                      text=True, check=True).stdout
            regs = re.search(r"REG:(\d+)", usage)
            local = re.search(r"LOCAL:(\d+)", usage)
            mma = "wgmma" if "HGMMA" in sass else "mma.sync" if "HMMA" in sass else "fma" if "FFMA" in sass else "none"
            loads = "TMA" if "UTMALDG" in sass else "cp.async" if "LDGSTS" in sass else "registers"
            # bytes per cp.async: a .64 or .128 part of the LDGSTS opcode, none for 4 bytes
            widths = {16 if "128" in op.split(".") else 8 if "64" in op.split(".") else 4
                      for op in re.findall(r"LDGSTS[.\w]*", sass)}
            self._usage[cubin] = {"regs": int(regs.group(1)) if regs else 0,
                                  "spills": int(local.group(1)) // 4 if local else 0, "mma": mma, "loads": loads,
                                  "cp_async_bytes": sorted(widths), "wgmma_overlap": wgmma_overlap(sass)}
        return self._usage[cubin]

    def _launcher(self, src, metadata):
        name = getattr(src, "name", None) or getattr(getattr(src, "fn", None), "__name__", "?")
        if self.build_launchers:  # --precompile on the GPU's machine: its C launcher too (gcc, cached by Triton)
            try:
                from triton.backends.nvidia.driver import CudaLauncher

                CudaLauncher(src, metadata)
            except Exception as e:  # noqa: BLE001 - the real run builds it then; said in the summary
                self.launcher_errors.append(f"{name}: {type(e).__name__}: {e}")

        def launch(grid_x, grid_y, grid_z, stream, usage, packed, launch_metadata, enter, exit_, *args):
            grid = (grid_x, grid_y, grid_z)
            record = {"kernel": name, "grid": grid, "shared": metadata.shared, "warps": metadata.num_warps,
                      "stages": getattr(metadata, "num_stages", None), **usage, "constants": _constants(src)}
            self.launches.append(record)
            for axis, (size, limit) in enumerate(zip(grid, GRID_LIMITS)):
                if not 0 < size <= limit:
                    self.failures.append({**record, "why": f"grid axis {axis} is {size} (CUDA allows 1..{limit})"})
            scratch = max(getattr(metadata, "global_scratch_size", 0) or 0,
                          getattr(metadata, "profile_scratch_size", 0) or 0)
            if scratch:  # the launcher would ask triton.set_allocator's allocator, which the backend never sets
                self.failures.append({**record, "why": f"needs {scratch} B of global scratch memory"})

        return launch

    def _bench(self, kernel_call, quantiles=None, **kwargs):
        """The autotuner's timer: compile and 'launch' each config; a config that cannot
        run raises as on a GPU (the autotuner then skips it) and is recorded."""
        try:
            kernel_call()
        except Exception as e:  # noqa: BLE001 - recorded, then re-raised for the autotuner
            self.failures.append({"kernel": "autotune config", "why": f"{type(e).__name__}: {e}", "tuning": True})
            raise
        return [1.0, 1.0, 1.0] if quantiles else 1.0


def wgmma_overlap(sass: str) -> str:
    """Whether a kernel's wgmmas overlap, from its SASS: "pipelined" (a wgmma runs while
    the next is issued: the main loop waits with ``WARPGROUP.DEPBAR.LE gsb0, 0x1``);
    "waited" (a loop holding wgmmas waits for all of them, ``gsb0, 0x0``, every step:
    Triton's ``warp_group_dot_wait {pendings = 0}``, as for an operand in registers);
    "serialized" (ptxas waits after every wgmma: its C7515 "wgmma.mma_async instructions
    are serialized"); "none" without wgmma. Checked against ptxas's C7515 report and
    Triton's pendings on the kernels in benchmarks/NOTES.md."""
    ins = [(int(addr, 16), op.strip()) for addr, op in re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
    syncs = [op for _, op in ins if op.startswith(("HGMMA", "WARPGROUP.DEPBAR"))]
    issued = [i for i, op in enumerate(syncs) if op.startswith("HGMMA")]
    if not issued:
        return "none"
    if len(issued) > 1 and all(any(op.endswith("gsb0, 0x0") for op in syncs[a + 1:b])
                               for a, b in zip(issued, issued[1:])):
        return "serialized"
    for addr, op in ins:  # loops: predicated backward branches (a cold path's way back is unpredicated)
        back = re.match(r"@!?U?P\d\s+BRA\s+0x([0-9a-f]+)", op)
        if back and int(back.group(1), 16) < addr:
            body = [o for a, o in ins if int(back.group(1), 16) <= a <= addr]
            if any(o.startswith("HGMMA") for o in body) and \
                    any(o.startswith("WARPGROUP.DEPBAR") and o.endswith("gsb0, 0x0") for o in body):
                return "waited"
    return "pipelined"


def _constants(src) -> dict:
    constants = getattr(src, "constants", None) or {}
    out = {}
    for key, value in constants.items():
        name = key if isinstance(key, str) else src.fn.arg_names[key[0]] if hasattr(src, "fn") else str(key)
        if isinstance(value, (bool, int, float, str)):
            out[name] = value
    return out


_used = False


@contextlib.contextmanager
def offline_gpu(arch: int, analyse: bool = True, gpu: tuple | None = None, build_launchers: bool = False):
    """Inside: Triton compiles for ``arch`` and launches nothing; the Triton backend's host
    code believes in a GPU of that kind (its limits, its capability) on CPU tensors."""
    import torch
    from triton.runtime import driver

    from resnet_fused.backends import triton_backend as tb

    global _used
    if _used:  # Triton's JIT keeps compiled kernels (and their launchers) per device, not per target
        raise RuntimeError("offline_gpu() runs once per process: start a new one for another check")
    _used = True
    fake = OfflineDriver(arch, analyse, gpu, build_launchers)
    saved = {name: getattr(tb, name) for name in ("_device_limits", "_capability", "_device_name", "_on_gpu")}
    saved_cuda = (torch.cuda.device, torch.cuda.current_device)
    saved_driver = getattr(driver, "_active", None)  # reset_active() would look for a GPU
    driver.set_active(fake)
    tb._device_limits = lambda index: (fake.sms, fake.smem)
    tb._capability = lambda index: (arch // 10, arch % 10)
    tb._device_name = lambda index: fake.name
    tb._on_gpu = lambda t: True
    torch.cuda.device = lambda device: contextlib.nullcontext()
    torch.cuda.current_device = lambda: 0
    try:
        yield fake
    finally:
        driver._active = saved_driver
        for name, value in saved.items():
            setattr(tb, name, value)
        torch.cuda.device, torch.cuda.current_device = saved_cuda


def _layers(archs: list[str], batch: int, limit: int | None = None):
    """The unique convs of ``archs`` in forward order (the first ``limit`` of them)."""
    from resnet_fused.bench import conv_layers

    seen = []
    for arch in archs:
        for layer, _ in conv_layers(arch, batch):
            if layer not in seen:
                seen.append(layer)
    return seen[:limit]


def _tensors(layer, dtype):
    """Uninitialised CPU tensors of the layer's shapes (nothing reads them)."""
    import torch

    cl = torch.channels_last
    p, q = layer.out_hw
    x = torch.empty(layer.n, layer.c, layer.h, layer.w, dtype=dtype).contiguous(memory_format=cl)
    w = torch.empty(layer.k, layer.c // layer.groups, layer.r, layer.s, dtype=dtype).contiguous(memory_format=cl)
    bias = torch.empty(layer.k, dtype=dtype)
    residual = torch.empty(layer.n, layer.k, p, q, dtype=dtype).contiguous(memory_format=cl) if layer.residual else None
    return x, w, bias, residual


def check(arch: int, batch: int | list[int], dtypes: list[str], archs: list[str], autotune: bool, log=print,
          max_layers: int | None = None, shard: tuple[int, int] = (0, 1), precompile: bool = False,
          gpu: tuple | None = None) -> dict:
    """Run every algorithm the backend has on every layer it takes; return the records.
    ``batch``: one batch size or several; ``shard`` (k, n): every n-th (dtype, layer) from
    the k-th; ``precompile``: no SASS reading, no autotune timings cached, and where a GPU
    is, the kernels' C launchers built too; ``gpu``: (name, SMs, shared memory per block,
    registers per SM) rather than GPUS[arch]'s."""
    import torch

    from resnet_fused.backends import triton_backend as tb

    batches = [batch] if isinstance(batch, int) else list(batch)
    results = {"arch": arch, "batch": batch, "triton": __import__("triton").__version__, "calls": [],
               "failures": []}
    tf32 = torch.backends.cudnn.allow_tf32
    work = [(dtype_name, layer) for dtype_name in dtypes for b in batches for layer in _layers(archs, b, max_layers)]
    with offline_gpu(arch, analyse=not precompile, gpu=gpu,
                     build_launchers=precompile and torch.cuda.is_available()) as fake, \
            contextlib.ExitStack() as undo:
        undo.callback(setattr, torch.backends.cudnn, "allow_tf32", tf32)
        undo.callback(setattr, tb, "AUTOTUNE", tb.AUTOTUNE)
        undo.callback(setattr, tb._tuned, "cache_results", tb._tuned.cache_results)
        tb.AUTOTUNE = autotune
        if precompile:  # every config 'times' 1.0 here: no such result may reach a cache a GPU reads
            tb._tuned.cache_results = False
        for dtype_name, layer in work[shard[0]::shard[1]]:
            dtype = getattr(torch, dtype_name.split("-")[0])
            # float32 convs run as TF32 on tensor cores when torch allows it (its default),
            # else as IEEE float32 on the FMA units ("float32-ieee")
            torch.backends.cudnn.allow_tf32 = dtype_name != "float32-ieee"
            x, w, bias, residual = _tensors(layer, dtype)
            problem = (x, w, bias, residual, (layer.stride,) * 2, (layer.padding,) * 2, (layer.dilation,) * 2,
                       layer.groups, layer.relu)
            for algorithm, run in tb.ALGORITHMS.items():
                if tb.algorithm_refusal(algorithm, problem) is not None:
                    continue
                if algorithm == "cudnn_epilogue":  # cuDNN's conv cannot run here: its epilogue pass alone
                    y = torch.empty(layer.n, layer.k, *layer.out_hw, dtype=dtype).contiguous(
                        memory_format=torch.channels_last)
                    run = functools.partial(_epilogue, tb, y)
                before, failed = len(fake.launches), len(fake.failures)
                start = time.perf_counter()
                try:
                    run(*problem)
                except Exception as e:  # noqa: BLE001 - a failure to report, with its call
                    fake.failures.append({"kernel": algorithm, "why": f"{type(e).__name__}: {e}"})
                new = fake.launches[before:]
                for failure in fake.failures[failed:]:
                    failure.update(layer=layer.name, dtype=dtype_name, algorithm=algorithm)
                call = {"layer": layer.name, "dtype": dtype_name, "algorithm": algorithm,
                        "seconds": round(time.perf_counter() - start, 2),
                        "launched": [{k: v for k, v in rec.items() if k != "constants"} | _tile(rec)
                                     for rec in new]}
                results["calls"].append(call)
                kinds = sorted({f"{r['mma']}+{r['loads']}" + (f"({'/'.join(map(str, r['cp_async_bytes']))} B)"
                                                                   if r["cp_async_bytes"] else "")
                                + (f" {r['wgmma_overlap']}" if r["mma"] == "wgmma" else "") for r in new})
                log(f"sm_{arch} {dtype_name:12s} {layer.name:34s} {algorithm:14s} "
                    f"{len(new):2d} launch(es), shared <= {max((r['shared'] for r in new), default=0):6d} B, "
                    f"regs <= {max((r['regs'] for r in new), default=0):3d}, "
                    f"spills {sum(r['spills'] for r in new)}, {' '.join(kinds)}, "
                    f"{call['seconds']:5.1f} s" + ("  FAILED" if len(fake.failures) > failed else ""))
        results["failures"] = fake.failures
        results["kernels_compiled"] = len(fake._usage)
        results["launcher_errors"] = fake.launcher_errors
    return results


def this_gpu(arch: int) -> tuple:
    """GPUS[arch]'s record with the limits of the GPU here (an H100 PCIe has 114 SMs, not
    132: the pruners admit tiles by SM count), read as the backend reads them; an error
    unless the GPU here is ``arch``."""
    import torch

    from resnet_fused.backends import triton_backend as tb

    capability = tb._capability(0)
    if capability[0] * 10 + capability[1] != arch:
        raise SystemExit(f"--arch {arch}, but the GPU here is sm_{capability[0]}{capability[1]}")
    sms, smem = tb._device_limits(0)
    return torch.cuda.get_device_name(0), sms, smem, GPUS[arch][3]


def _epilogue(tb, y, x, weight, bias, residual, stride, padding, dilation, groups, relu):
    """The second half of the cudnn_epilogue algorithm: bias + residual + ReLU over y."""
    return tb.bias_residual_relu_(y, bias, residual, relu)


def _tile(record: dict) -> dict:
    c = record["constants"]
    keys = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_H", "BLOCK_W", "GROUP_M")
    return {"tile": {k: c[k] for k in keys if k in c}}


def _shard(text: str) -> tuple[int, int]:
    k, _, n = text.partition("/")
    try:
        k, n = int(k), int(n)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a shard is K/N (e.g. 0/4), got {text!r}") from None
    if not 0 <= k < n:
        raise argparse.ArgumentTypeError(f"a shard K/N needs 0 <= K < N, got {text!r}")
    return k, n


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, choices=sorted(GPUS), default=90)
    parser.add_argument("--batch", type=int, nargs="+", default=[256], help="batch sizes (default 256)")
    parser.add_argument("--dtypes", nargs="+", default=["float16"], choices=["float16", "bfloat16", "float32", "float32-ieee"],
                        help="float32: TF32 tensor cores (torch's default for convs); float32-ieee: FMA")
    parser.add_argument("--models", nargs="+", default=["resnet50"])
    parser.add_argument("--no-autotune", action="store_true",
                        help="compile only the heuristic tiles (RESNET_FUSED_TRITON_AUTOTUNE=0), not every config")
    parser.add_argument("--max-layers", type=int, help="only the first N unique convs (in forward order)")
    parser.add_argument("--shard", type=_shard, default=(0, 1), metavar="K/N",
                        help="only every N-th (dtype, conv) from the K-th, for N processes side by side")
    parser.add_argument("--precompile", action="store_true",
                        help="on the machine with the GPU: compile into its Triton cache (TRITON_CACHE_DIR) "
                             "for a later run to load; nothing else is written")
    parser.add_argument("--json", help="write the records here")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        parser.error("unset TRITON_INTERPRET: this compiles for a GPU, the interpreter compiles nothing")
    import torch

    if torch.cuda.is_available() and not args.precompile:
        parser.error("a GPU is here: its own tests run the kernels (pytest -m gpu); --precompile fills its cache")
    with tempfile.TemporaryDirectory() as cache:
        if not args.precompile:
            # private caches: every kernel really compiles, and no tile timed by the fake
            # benchmarker (every config 1.0) reaches a cache a GPU would read
            os.environ["TRITON_CACHE_DIR"] = os.path.join(cache, "triton")
        # our algorithm choices and TMA tiles, 'timed' by the fake benchmarker, stay private,
        # and no tuning record is written at exit
        os.environ["RESNET_FUSED_CACHE_DIR"] = os.path.join(cache, "resnet_fused")
        os.environ.pop("RESNET_FUSED_TRITON_RECORD", None)
        log = (lambda *a: None) if args.precompile else print
        start = time.perf_counter()
        gpu = this_gpu(args.arch) if args.precompile and torch.cuda.is_available() else None
        results = check(args.arch, args.batch, args.dtypes, args.models, not args.no_autotune, log=log,
                        max_layers=args.max_layers, shard=args.shard, precompile=args.precompile, gpu=gpu)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=str)
    print(f"triton {results['triton']}, sm_{args.arch}: {len(results['calls'])} calls, "
          f"{results['kernels_compiled']} kernels compiled, {len(results['failures'])} problems, "
          f"{time.perf_counter() - start:.0f} s")
    if results["launcher_errors"]:
        print(f"{len(results['launcher_errors'])} launchers not built (the real run builds them): "
              f"{results['launcher_errors'][0]}")
    for failure in results["failures"]:
        print("PROBLEM:", {k: v for k, v in failure.items() if k != "constants"})
    return 1 if results["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
