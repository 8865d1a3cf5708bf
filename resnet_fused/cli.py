"""The ``resnet-fused`` command line: ``validate``, ``bench`` and ``explain``."""
from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import sys
from typing import Optional, Sequence

import torch

from . import __version__, backends
from ._extension import extension_info
from .models import ARCHS
from .testing import parse_dtype


def _dtype_arg(text: str) -> torch.dtype:
    try:
        return parse_dtype(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _int_at_least(low: int, what: str, high: Optional[int] = None):
    """An argparse type: an integer >= ``low`` (and <= ``high``), else an error saying
    ``what`` was expected."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {what} integer, got {text!r}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"expected a {what} integer, got {value}")
        return value
    return parse


_positive_int = _int_at_least(1, "positive")
_non_negative_int = _int_at_least(0, "non-negative")
_seed_int = _int_at_least(0, f"seed (0 to {2**32 - 1})", 2**32 - 1)


def _writable_path(text: str) -> str:
    """An argparse type for an output file: its folder must exist and take writes, so a
    long run does not end in an error when it comes to write its results."""
    if not text:
        raise argparse.ArgumentTypeError("expected a file path, got an empty one")
    folder = os.path.dirname(os.path.abspath(text))
    if os.path.isdir(text) or text.endswith(("/", os.sep)):
        raise argparse.ArgumentTypeError(f"{text!r} is a directory; expected a file path")
    if not os.path.isdir(folder):
        raise argparse.ArgumentTypeError(f"cannot write {text!r}: the folder {folder!r} does not exist")
    if not os.access(folder, os.W_OK) or (os.path.exists(text) and not os.access(text, os.W_OK)):
        raise argparse.ArgumentTypeError(f"cannot write {text!r}: no write permission")
    return text


def _no_repeats(parser, option: str, values) -> None:
    """A value given twice to a many-valued option is an error, not a row timed twice."""
    seen = set()
    for value in values or ():
        if value in seen:
            parser.error(f"{option} names {str(value).removeprefix('torch.')} twice")
        seen.add(value)


def _cuda_refusal(devices: Sequence[str]) -> Optional[str]:
    """Why one of ``devices`` cannot be used on this machine, or None."""
    for text in devices:
        device = torch.device(text)
        if device.type != "cuda":
            continue
        if not torch.cuda.is_available():
            return f"--device {text} was asked for, but torch.cuda.is_available() is False on this machine"
        if device.index is not None and device.index >= torch.cuda.device_count():
            return f"--device {text}: this machine has {torch.cuda.device_count()} CUDA device(s) (cuda:0..)"
    return None


def _one_device(text: Optional[str], parser) -> torch.device:
    """``--device`` of a one-device command: as given, else cuda where present, else cpu;
    a parser error where this machine cannot use it."""
    device = torch.device(text or ("cuda" if torch.cuda.is_available() else "cpu"))
    refusal = _cuda_refusal([str(device)])
    if refusal:
        parser.error(refusal)
    return device


def _device_arg(text: str) -> str:
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"unknown device {text!r}; expected cpu or cuda[:N]") from None
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"unsupported device {text!r}; expected cpu or cuda[:N]")
    return str(device)


def environment() -> dict:
    """Versions and devices, recorded beside every result file."""
    env = {
        "resnet_fused": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cuda_available": torch.cuda.is_available(),
        "backends": backends.available_backends(),
        "extension": extension_info(),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
        env["cudnn"] = torch.backends.cudnn.version()
    return env


def _console():
    from rich.console import Console

    console = Console()
    if not console.is_terminal:  # a log file or a pipe: don't squeeze tables into 80 columns
        console = Console(width=max(console.width, 150))
    return console


def _progress(console, disabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=console, transient=True, disable=disabled)


def _add_validate(sub) -> None:
    p = sub.add_parser(
        "validate",
        help="compare fused models with a float64 torchvision reference",
        description="Build each arch with seeded weights and randomized BatchNorm, fuse it, and compare its "
        "outputs with torchvision's in float64 for every backend x device x dtype available.",
    )
    p.add_argument("--arch", nargs="+", choices=ARCHS, default=list(ARCHS), metavar="ARCH",
                   help=f"architectures (default: all ten: {', '.join(ARCHS)})")
    p.add_argument("--backend", nargs="+", choices=backends.BACKEND_NAMES, metavar="NAME",
                   help="backends (default: every one that runs natively on each device; Triton's CPU "
                        "interpreter only when named)")
    p.add_argument("--device", nargs="+", type=_device_arg, metavar="DEV",
                   help="devices (default: cpu, and cuda where present)")
    p.add_argument("--dtype", nargs="+", type=_dtype_arg, metavar="DTYPE",
                   help="dtypes (default: float32 on cpu; float32 float16 bfloat16 on cuda)")
    p.add_argument("--batch-size", type=_positive_int, default=2, help="images per forward (default 2)")
    p.add_argument("--image-size", type=_positive_int, default=64, help="image height and width (default 64)")
    p.add_argument("--seed", type=_seed_int, default=0, help="seed for weights, statistics and images (default 0)")
    p.add_argument("--json", metavar="PATH", type=_writable_path, help="also write the results as JSON to PATH")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_validate, subparser=p)


def _fmt(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.2e}"


def _cmd_validate(args, parser) -> int:
    from rich.table import Table

    from .validate import default_devices, plan, run_validation, winograd_hint

    for option in ("arch", "backend", "device", "dtype"):
        _no_repeats(parser, f"--{option}", getattr(args, option))
    devices = args.device
    refusal = _cuda_refusal(devices or [])
    if refusal:
        parser.error(refusal)
    if args.image_size < 32:
        parser.error(f"--image-size should be at least 32 (ResNets downsample by 32), got {args.image_size}")
    console = _console()
    total = len(plan(args.arch, args.backend, devices or default_devices(), args.dtype))
    with _progress(console, args.no_progress) as progress:
        task = progress.add_task("validating", total=total)

        def advance(result):
            progress.update(task, advance=1, description=f"{result.arch} {result.backend} {result.device} {result.dtype}")

        results = run_validation(
            archs=args.arch, backend_names=args.backend, devices=devices, dtypes=args.dtype,
            batch_size=args.batch_size, image_size=args.image_size, seed=args.seed, on_result=advance,
        )
    table = Table(title=f"resnet_fused validate (batch {args.batch_size}, {args.image_size}x{args.image_size}, "
                        "reference: torchvision in float64 on cpu)",
                  caption="bound: the per-op tolerance (resnet_fused.testing.TOLERANCES); for float16/bfloat16 models, or 2x torchvision's own error "
                          "if larger")
    for col in ("arch", "backend", "device", "dtype", "max abs err", "rel err", "torch rel err", "bound", "result"):
        table.add_column(col, justify="right" if "err" in col or col == "bound" else "left")
    for r in results:
        colour = {"PASS": "green", "FAIL": "bold red", "SKIP": "yellow"}[r.status]
        status = f"[{colour}]{r.status}[/]" + (f" ({r.note})" if r.note else "")
        table.add_row(r.arch, r.backend, r.device, r.dtype, _fmt(r.max_abs_err), _fmt(r.rel_err),
                      _fmt(r.torch_rel_err), _fmt(r.tolerance), status)
    console.print(table)
    failed = [r for r in results if r.status == "FAIL"]
    passed = sum(r.status == "PASS" for r in results)
    console.print(f"{passed} passed, {len(failed)} failed, {len(results) - passed - len(failed)} skipped")
    hint = winograd_hint(results)
    if hint:
        console.print(f"[yellow]{hint}[/]")
    if not passed and not failed:
        console.print("[bold red]nothing was validated[/]: every row was skipped (the reasons are in the table)")
    if args.json is not None:
        payload = {
            "command": "validate",
            "args": {"arch": args.arch, "backend": args.backend, "device": devices,
                     "dtype": [str(d) for d in args.dtype] if args.dtype else None,
                     "batch_size": args.batch_size, "image_size": args.image_size, "seed": args.seed},
            "environment": environment(),
            "results": [r.as_dict() for r in results],
        }
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=2)
    return 1 if failed or not passed else 0


def _add_bench(sub) -> None:
    from .bench import MODEL_PROVIDERS

    p = sub.add_parser(
        "bench",
        help="images/s of a fused model against torchvision eager, torch.compile and more, in one run",
        description="Throughput of the fused model beside its baselines, measured in the same process: "
        "eval mode, inference_mode, the same dtype, inputs on the device, warm-up first, median of many runs.",
    )
    p.add_argument("--arch", choices=ARCHS, default="resnet50", help="architecture (default resnet50)")
    p.add_argument("--batch-size", nargs="+", type=_positive_int, metavar="N",
                   help="batch sizes (default: 1 and 256 on cuda, 8 on cpu)")
    p.add_argument("--dtype", type=_dtype_arg, help="dtype (default float16 on cuda, float32 on cpu)")
    p.add_argument("--device", type=_device_arg, help="device (default cuda where present, else cpu)")
    p.add_argument("--providers", nargs="+", metavar="NAME",
                   help="what to time (default: all that run here): " + ", ".join(MODEL_PROVIDERS)
                   + "; fused_<backend>+graphs replays a CUDA graph")
    p.add_argument("--image-size", type=_positive_int, default=224, help="image height and width (default 224)")
    p.add_argument("--cuda-graphs", action="store_true", help="also time each fused provider as a CUDA graph")
    p.add_argument("--runs", type=_positive_int, default=30, help="timed runs per provider (default 30)")
    p.add_argument("--warmup", type=_non_negative_int, default=5, help="untimed runs first (default 5)")
    p.add_argument("--rounds", type=_positive_int, default=1,
                   help="split the runs into this many rounds taken in turn across providers, so a machine whose "
                        "speed drifts (a shared CPU) slows them alike (default 1)")
    p.add_argument("--json", metavar="PATH", type=_writable_path, help="write the results as JSON to PATH")
    p.add_argument("--plot", metavar="PATH", type=_writable_path, help="draw images/s per provider into a PNG at PATH")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_bench, subparser=p)


def _cmd_bench(args, parser) -> int:
    from rich.table import Table

    from .bench import check_provider, default_providers, run_model_bench

    device = _one_device(args.device, parser)
    if args.rounds > args.runs:
        parser.error(f"--rounds ({args.rounds}) should be at most --runs ({args.runs}): each round times "
                     "at least one run of every provider")
    if args.image_size < 32:
        parser.error(f"--image-size should be at least 32 (ResNets downsample by 32), got {args.image_size}")
    _no_repeats(parser, "--batch-size", args.batch_size)
    dtype = args.dtype or (torch.float16 if device.type == "cuda" else torch.float32)
    batch_sizes = args.batch_size or ([1, 256] if device.type == "cuda" else [8])
    providers = args.providers or default_providers(device, args.cuda_graphs)
    if args.cuda_graphs and device.type != "cuda":
        parser.error("--cuda-graphs needs --device cuda")
    for name in providers:
        try:
            check_provider(name, device)
        except ValueError as exc:
            parser.error(str(exc))
    if args.cuda_graphs and args.providers:
        graphs = [f"{p}+graphs" for p in args.providers if p.startswith("fused_") and "+graphs" not in p]
        if not any(p.startswith("fused_") for p in args.providers):
            parser.error(f"--cuda-graphs times the fused providers as CUDA graphs, and --providers names none "
                         f"({' '.join(args.providers)}); add a fused_<backend> provider or drop --cuda-graphs")
        providers += graphs
    # torch.compile's max-autotune takes minutes: run it last so a time limit costs only it
    providers = sorted(dict.fromkeys(providers), key=lambda p: p == "compile")
    if args.plot is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            parser.error("--plot needs matplotlib: pip install matplotlib")
    console = _console()
    with _progress(console, args.no_progress) as progress:
        task = progress.add_task("benchmarking", total=len(batch_sizes) * len(providers))

        done_rows: list = []

        def advance(row):
            progress.update(task, advance=1, description=f"batch {row['batch_size']} {row['provider']}")
            done_rows.append(row)
            if args.json is not None:  # after every row, so a run cut short still leaves its results
                _write_bench_json(args, batch_sizes, dtype, device, providers, done_rows)

        rows = run_model_bench(args.arch, batch_sizes, providers, device, dtype, args.image_size,
                               runs=args.runs, warmup=args.warmup, on_row=advance, rounds=args.rounds)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"  # (a GPU machine's cpu run: cpu)
    table = Table(title=f"resnet_fused bench: {args.arch}, {args.image_size}x{args.image_size}, "
                        f"{str(dtype).removeprefix('torch.')}, {where}")
    for col in ("batch", "provider", "images/s", "median ms", "p10 ms", "p90 ms", "setup s", "x eager", "x compile"):
        table.add_column(col, justify="left" if col == "provider" else "right")
    for r in rows:
        if r["error"]:
            table.add_row(str(r["batch_size"]), r["provider"], f"[red]error: {r['error'][:60]}[/]", *[""] * 6)
            continue
        table.add_row(
            str(r["batch_size"]), r["provider"], f"{r['images_per_s']:,.0f}", f"{r['median_ms']:.3f}",
            f"{r['p10_ms']:.3f}", f"{r['p90_ms']:.3f}", f"{r['setup_s']:.1f}",
            "-" if r["vs_eager"] is None else f"{r['vs_eager']:.2f}",
            "-" if r["vs_compile"] is None else f"{r['vs_compile']:.2f}",
        )
    console.print(table)
    if args.json is not None:
        _write_bench_json(args, batch_sizes, dtype, device, providers, rows)
    if args.plot is not None:
        from .bench import plot_model_bench

        plot_model_bench(rows, args.plot, title=f"{args.arch} {str(dtype).removeprefix('torch.')} {where}")
    return 1 if any(r["error"] for r in rows) else 0


def _write_bench_json(args, batch_sizes, dtype, device, providers, rows) -> None:
    payload = {
        "command": "bench",
        "args": {"arch": args.arch, "batch_size": batch_sizes, "dtype": str(dtype), "device": str(device),
                 "providers": providers, "image_size": args.image_size, "runs": args.runs, "warmup": args.warmup,
                 "rounds": args.rounds},
        "environment": environment(),
        "results": rows,
    }
    with open(args.json, "w") as f:
        json.dump(payload, f, indent=2)


def _add_explain(sub) -> None:
    p = sub.add_parser(
        "explain",
        help="say how each conv of a fused model runs: backend, kernel, and why any was passed over",
        description="Build a fused model, run one forward on random images, and list each conv in call order with "
        "its shapes, epilogue and the path it took (resnet_fused.explain_model).",
    )
    p.add_argument("--arch", choices=ARCHS, default="resnet50", help="architecture (default resnet50)")
    p.add_argument("--backend", choices=backends.BACKEND_NAMES, default="auto", help="backend (default auto)")
    p.add_argument("--device", type=_device_arg, help="device (default cuda where present, else cpu)")
    p.add_argument("--dtype", type=_dtype_arg, help="dtype (default float16 on cuda, float32 on cpu)")
    p.add_argument("--batch-size", type=_positive_int, default=1, help="images per forward (default 1)")
    p.add_argument("--image-size", type=_positive_int, default=224, help="image height and width (default 224)")
    p.add_argument("--json", metavar="PATH", type=_writable_path, help="also write the rows as JSON to PATH")
    p.set_defaults(func=_cmd_explain, subparser=p)


def _cmd_explain(args, parser) -> int:
    from rich.table import Table

    from .models import get_model
    from .modules import explain_model

    device = _one_device(args.device, parser)
    if args.image_size < 32:
        parser.error(f"--image-size should be at least 32 (ResNets downsample by 32), got {args.image_size}")
    dtype = args.dtype or (torch.float16 if device.type == "cuda" else torch.float32)
    torch.manual_seed(0)
    model = get_model(args.arch, backend=args.backend).eval().to(device, dtype)
    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device, dtype=dtype)
    rows = explain_model(model, images)
    table = Table(title=f"resnet_fused explain: {args.arch}, backend {args.backend!r}, {device}, "
                        f"{str(dtype).removeprefix('torch.')}, batch {args.batch_size}, "
                        f"{args.image_size}x{args.image_size}")
    for col in ("#", "conv", "input", "weight", "stride", "epilogue", "path"):
        table.add_column(col, overflow="fold")
    for i, row in enumerate(rows):
        shape = "x".join(map(str, row["input"])) if row["input"] else "-"
        epilogue = "-" if row["residual"] is None else \
            "bias" + (" + residual" if row["residual"] else "") + (" + relu" if row["relu"] else "")
        stride = "x".join(map(str, row["stride"])) + (f" g{row['groups']}" if row["groups"] > 1 else "")
        table.add_row(str(i), row["module"], shape, "x".join(map(str, row["weight"])), stride, epilogue, row["path"])
    console = _console()
    console.print(table)
    ran = collections.Counter(row["path"].split("'")[1] if row["fused"] and row["path"].startswith("runs on '")
                              else "unfused" for row in rows)
    console.print(f"{len(rows)} convs: " + ", ".join(f"{n} on {name!r}" if name != "unfused" else f"{n} unfused"
                                                     for name, n in sorted(ran.items())))
    if args.json is not None:
        payload = {"command": "explain",
                   "args": {"arch": args.arch, "backend": args.backend, "device": str(device),
                            "dtype": str(dtype), "batch_size": args.batch_size, "image_size": args.image_size},
                   "environment": environment(), "convs": rows}
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=2)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="resnet-fused", description=__doc__)
    parser.add_argument("--version", action="version", version=f"resnet_fused {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_validate(sub)
    _add_bench(sub)
    _add_explain(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.func(args, args.subparser)  # errors print the subcommand's usage


if __name__ == "__main__":
    sys.exit(main())
