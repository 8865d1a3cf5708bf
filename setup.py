"""Builds the compiled extension ``resnet_fused._C`` (the "native" backend).

The pure-Python package (torch and Triton backends) works without it. What is built:

* always (unless skipped): the op schema and the CPU kernels (csrc/ops/*.cpp,
  csrc/ops/cpu/);
* where nvcc is found: the CUDA kernels (csrc/ops/cuda/, csrc/cutlass/), compiled even
  on a machine without a GPU: CUTLASS 2.x sm80 kernels for each architecture below and,
  where 90 is listed, CUTLASS 3.x Hopper kernels for sm_90a (compiled apart, since
  torch's build gives every .cu file the same -gencode flags). CUTLASS's headers come
  from the nvidia-cutlass wheel (``pip install nvidia-cutlass``), never vendored.

Environment knobs:

    RESNET_FUSED_BUILD_EXTENSION=0   pure-Python install, no extension
    RESNET_FUSED_BUILD_CUDA=auto|1|0 auto: CUDA part where nvcc and CUTLASS are found;
                                     1: fail if they are not; 0: CPU part only
    RESNET_FUSED_CUDA_ARCHS="80;90"  SM architectures to emit sm80-kernel machine code for
                                     (the highest also gets PTX, for newer GPUs); with 90
                                     listed, the sm90a Hopper kernels are built too
    MAX_JOBS=N                       parallel compile jobs (torch's knob; default: cores)

Install with ``pip install --no-build-isolation -e .`` so the extension is built
against the torch already installed (a build-isolated pip would bring another one).
"""
from __future__ import annotations

import concurrent.futures
import glob
import os
import shutil
import subprocess
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join("csrc")


def _say(msg: str) -> None:
    print(f"[resnet_fused build] {msg}", file=sys.stderr, flush=True)


def _find_cuda_home() -> str | None:
    """The CUDA toolkit root (bin/nvcc and include/cuda_runtime_api.h), or None."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for home in candidates:
        if home and os.access(os.path.join(home, "bin", "nvcc"), os.X_OK) and \
                os.path.isfile(os.path.join(home, "include", "cuda_runtime_api.h")):
            return home
    return None


def _cutlass_include() -> str | None:
    try:
        import cutlass_library
    except ImportError:
        return None
    include = os.path.join(os.path.dirname(cutlass_library.__file__), "source", "include")
    return include if os.path.isfile(os.path.join(include, "cutlass", "cutlass.h")) else None


def _nvidia_wheel_includes() -> list[str]:
    # The toolkit here lacks cuBLAS/cuSPARSE headers that torch's CUDA headers may pull
    # in; the nvidia-* wheels torch depends on carry them.
    try:
        import nvidia
    except ImportError:
        return []
    found = []
    for base in nvidia.__path__:
        found += sorted(glob.glob(os.path.join(base, "cu*", "include")))
        found += sorted(glob.glob(os.path.join(base, "*", "include")))
    return [d for d in dict.fromkeys(found) if os.path.isdir(d)]


def _archs() -> list[int]:
    text = os.environ.get("RESNET_FUSED_CUDA_ARCHS", "80;90")
    try:
        archs = sorted({int(a.strip().replace(".", "")) for a in text.replace(",", ";").split(";") if a.strip()})
    except ValueError:
        raise SystemExit(f"RESNET_FUSED_CUDA_ARCHS should be like '80;90', got {text!r}") from None
    if not archs or min(archs) < 80:
        raise SystemExit(f"RESNET_FUSED_CUDA_ARCHS: the CUTLASS kernels need sm_80 or newer, got {text!r}")
    return archs


def _compile_sm90a_units(units: list[str], nvcc: str, includes: list[str], jobs: int) -> list[str]:
    """nvcc the CUTLASS 3.x Hopper units for sm_90a alone (torch's build gives every .cu
    file the same -gencode flags); returns the objects, rebuilt only when out of date."""
    out_dir = os.path.join(ROOT, "build", "sm90a")
    os.makedirs(out_dir, exist_ok=True)
    headers = [h for ext in ("h", "cuh") for h in glob.glob(os.path.join(ROOT, CSRC, "cutlass", f"*.{ext}"))]
    newest_header = max(os.path.getmtime(h) for h in headers)
    flags = ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-DNDEBUG", "-Xcompiler", "-fPIC",
             "-gencode=arch=compute_90a,code=sm_90a"] + [f"-I{d}" for d in includes]

    def build(unit: str) -> str:
        obj = os.path.join(out_dir, os.path.basename(unit).replace(".cu", ".o"))
        if os.path.exists(obj) and os.path.getmtime(obj) > max(newest_header, os.path.getmtime(unit)):
            return obj
        _say(f"nvcc (sm_90a) {os.path.relpath(unit, ROOT)}")
        done = subprocess.run([nvcc, *flags, "-c", unit, "-o", obj], capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"compiling {unit} for sm_90a failed:\n{done.stdout}{done.stderr}")
        return obj

    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        return list(pool.map(build, [os.path.join(ROOT, u) for u in units]))


def _write_build_config(path: str, defines: dict[str, str]) -> None:
    lines = ["// Generated by setup.py; what this build of resnet_fused._C holds.", "#pragma once"]
    lines += [f'#define {name} "{value}"' for name, value in defines.items()]
    text = "\n".join(lines) + "\n"
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if not os.path.exists(path) or open(path).read() != text:
        with open(path, "w") as f:
            f.write(text)


def _openmp_link_args(torch):
    """at::parallel_for is inline (ATen/ParallelOpenMP.h): compiled without -fopenmp it
    runs on one thread. Link the OpenMP runtime torch itself loaded, by its file, so the
    extension names the same soname (a wheel may bundle a hash-named libgomp) and both
    share one thread pool and torch.set_num_threads."""
    if "ATen parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return []
    lib = os.path.join(os.path.dirname(torch.__file__), "lib")
    bundled = sorted(glob.glob(os.path.join(lib, "libgomp*.so*")))
    _say(f"OpenMP: {bundled[0] if bundled else 'the compiler runtime (torch bundles none)'}")
    return [bundled[0]] if bundled else ["-fopenmp"]


def _extension():
    build = os.environ.get("RESNET_FUSED_BUILD_EXTENSION", "") or "1"
    if build not in ("1", "0"):
        raise SystemExit(f"RESNET_FUSED_BUILD_EXTENSION should be 1 or 0, got {build!r}")
    if build == "0":
        _say("RESNET_FUSED_BUILD_EXTENSION=0: pure-Python install, no resnet_fused._C")
        return [], {}
    want_cuda = os.environ.get("RESNET_FUSED_BUILD_CUDA", "auto").lower()
    if want_cuda not in ("auto", "1", "0"):
        raise SystemExit(f"RESNET_FUSED_BUILD_CUDA should be auto, 1 or 0, got {want_cuda!r}")

    cuda_home = _find_cuda_home() if want_cuda != "0" else None
    cutlass = _cutlass_include() if want_cuda != "0" else None
    if cuda_home:
        # torch.utils.cpp_extension reads CUDA_HOME when imported; a wrapper script
        # on PATH (/usr/local/bin/nvcc here) would make it guess /usr/local.
        os.environ["CUDA_HOME"] = cuda_home
    nvcc = os.path.join(cuda_home, "bin", "nvcc") if cuda_home else None

    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    with_cuda = bool(nvcc and cutlass)
    if not with_cuda:
        why = "RESNET_FUSED_BUILD_CUDA=0" if want_cuda == "0" else (
            "no CUDA toolkit found (set CUDA_HOME to the directory holding bin/nvcc)" if not nvcc
            else "nvidia-cutlass is not installed (pip install nvidia-cutlass)")
        if want_cuda == "1":
            raise SystemExit(f"RESNET_FUSED_BUILD_CUDA=1 but the CUDA part cannot be built: {why}")
        _say(f"CPU kernels only: {why}")

    generated = os.path.join("build", "generated")
    defines = {"RESNET_FUSED_TORCH_VERSION": torch.__version__}
    sources = sorted(glob.glob(os.path.join(CSRC, "ops", "*.cpp")))
    sources += sorted(glob.glob(os.path.join(CSRC, "ops", "cpu", "*.cpp")))
    cxx = ["-O3", "-g0", "-include", os.path.join(ROOT, generated, "build_config.h")]
    link = _openmp_link_args(torch)
    if link:
        cxx.append("-fopenmp")
    include_dirs = [os.path.join(ROOT, CSRC)]
    jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))

    if with_cuda:
        archs = _archs()
        cutlass_version = "unknown"
        try:
            from importlib.metadata import version
            cutlass_version = version("nvidia-cutlass")
        except Exception:
            pass
        defines.update(
            RESNET_FUSED_CUDA_ARCHS=";".join(str(a) for a in archs),
            RESNET_FUSED_CUDA_VERSION=str(torch.version.cuda),
            RESNET_FUSED_CUTLASS_VERSION=cutlass_version,
        )
        sources += sorted(glob.glob(os.path.join(CSRC, "ops", "cuda", "*.cpp")))
        sources += sorted(glob.glob(os.path.join(CSRC, "cutlass", "*.cpp")))
        sm80_units = sorted(glob.glob(os.path.join(CSRC, "cutlass", "*_sm80_*.cu")))
        sm90a_units = sorted(glob.glob(os.path.join(CSRC, "cutlass", "*_sm90_*.cu"))) if 90 in archs else []
        sources += sm80_units
        gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
        gencode.append(f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}")
        nvcc_flags = [
            "-O3", "--expt-relaxed-constexpr", "-DNDEBUG",
            # torch's extension flags turn off half/bfloat16 operators; CUTLASS needs them.
            "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
            "-U__CUDA_NO_BFLOAT16_CONVERSIONS__", "-U__CUDA_NO_HALF2_OPERATORS__",
            "-I" + cutlass,
        ] + gencode
        cxx.append("-DRESNET_FUSED_WITH_CUDA")
        if sm90a_units:
            cxx.append("-DRESNET_FUSED_WITH_SM90A")
        include_dirs += _nvidia_wheel_includes()
        _say(
            f"building resnet_fused._C: CPU kernels + CUDA kernels ({len(sm80_units)} CUTLASS sm80 units for "
            f"sm_{', sm_'.join(map(str, archs))} (+PTX compute_{archs[-1]}), {len(sm90a_units)} sm90a units), "
            f"nvcc {nvcc}, CUTLASS {cutlass_version} from {cutlass}, torch {torch.__version__}, {jobs} jobs"
        )
        ext = CUDAExtension(
            "resnet_fused._C", sources, include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx, "nvcc": nvcc_flags}, extra_link_args=link,
        )
        cutlass_util = os.path.join(os.path.dirname(cutlass), "tools", "util", "include")
        ext.sm90a_build = (sm90a_units, nvcc, [cutlass, cutlass_util, os.path.join(ROOT, CSRC)], int(jobs))
    else:
        _say(f"building resnet_fused._C: CPU kernels, torch {torch.__version__}, {jobs} jobs")
        ext = CppExtension("resnet_fused._C", sources, include_dirs=include_dirs, extra_compile_args={"cxx": cxx},
                           extra_link_args=link)
    _write_build_config(os.path.join(ROOT, generated, "build_config.h"), defines)

    class BuildExt(BuildExtension):
        def build_extensions(self):
            for e in self.extensions:
                units, nvcc_path, includes, n_jobs = getattr(e, "sm90a_build", ([], None, [], 1))
                if units:
                    e.extra_objects = list(e.extra_objects or []) + _compile_sm90a_units(units, nvcc_path, includes,
                                                                                         n_jobs)
            super().build_extensions()

    return [ext], {"build_ext": BuildExt}


ext_modules, cmdclass = _extension()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
