#!/usr/bin/env bash
# One-shot GPU session: environment, extension build, GPU tests, kernel and model
# benchmarks, a compute-sanitizer memcheck of a fused forward. Everything lands in one
# folder (the model benchmark runs before the kernel suite: it autotunes every
# ResNet-50 layer once, and the kernel suite reuses those winners): environment.json,
# session.log, build.log, native_tests.log, triton_tests.log, gpu_tests.log, kernels.json, models.json, models.png,
# sanitizer.log, triton_tuned.json (the Triton tuning measured: benchmarks/ship_tuned.py).
#
# The build step compiles resnet_fused._C in place for this machine's torch (a library
# built elsewhere against another torch will not load). It needs nvcc and the
# nvidia-cutlass wheel: where pip has no network, put the wheel in .whl/ first
# (../shared/tools/device-wheels.sh does) and this script installs it from there.
#
# Usage (from anywhere, on any machine with an NVIDIA GPU and this repo's deps):
#   benchmarks/gpu_session.sh [OUTDIR]        default OUTDIR: $OUT if set (the device tool's
#                                             folder that comes back), else benchmarks/results/<gpu name>
#   STEPS="build native triton models kernels tests sanitizer compile" benchmarks/gpu_session.sh   # choose steps
# Each step has its own time limit. All steps together take longer than one 10-minute
# device call: split them over calls (benchmarks/NOTES.md, "For the next GPU session"),
# e.g. STEPS="build native triton", then STEPS="models kernels", then STEPS="tests sanitizer".
set -uo pipefail
cd "$(dirname "$0")/.."
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | tr ' ' '_')
out=${1:-${OUT:-benchmarks/results/${gpu:-unknown_gpu}}}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$PWD/.triton-cache}
# every step's Triton tuning (algorithm per conv shape, autotuned tile configs) is kept in
# $out/triton_tuned.json; benchmarks/ship_tuned.py merges it into the package's table
export RESNET_FUSED_TRITON_RECORD=${RESNET_FUSED_TRITON_RECORD:-$(cd "$out" && pwd)/triton_tuned.json}
steps=${STEPS:-"build native triton models kernels tests sanitizer compile"}
log="$out/session.log"
start=$(date +%s)
step() { echo "== $1 (t=$(( $(date +%s) - start ))s)" | tee -a "$log"; }
has() { [[ " $steps " == *" $1 "* ]]; }

step environment
{ nvidia-smi; python -c "import torch, triton; print(torch.__version__, triton.__version__, torch.backends.cudnn.version())"; } >>"$log" 2>&1
write_environment() {
  python -c "import json; from resnet_fused.cli import environment; print(json.dumps(environment(), indent=2))" >"$out/environment.json" 2>>"$log"
}
write_environment

if has build; then
  step "build resnet_fused._C (sm ${RESNET_FUSED_CUDA_ARCHS:-80;90})"
  if ls .whl/*.whl >/dev/null 2>&1 && ! python -c "import cutlass_library" 2>/dev/null; then
    python -m pip install -q --no-index --no-deps --target /tmp/resnet_fused_wheels .whl/*.whl >>"$log" 2>&1
    export PYTHONPATH="/tmp/resnet_fused_wheels:$PYTHONPATH"
  fi
  # the sm90a units compile before ninja starts the rest: give the build room
  RESNET_FUSED_BUILD_CUDA=1 MAX_JOBS=${MAX_JOBS:-$(nproc)} timeout ${BUILD_TIMEOUT:-420} \
    python setup.py build_ext --inplace >"$out/build.log" 2>&1
  echo "exit $?" | tee -a "$log"
  python -c "import json, resnet_fused; print(json.dumps(resnet_fused.extension_info()))" 2>&1 | tee -a "$log"
  write_environment  # now with the extension this build made
fi

if has native; then
  # the native CUDA kernels' correctness first: they had never run on a GPU before
  # the few tests that say most first (every CUTLASS kernel forced in turn, the fallbacks,
  # NaN on every path, ten whole models), then the ~500 per-layer cases
  step "native backend gpu tests"
  timeout ${NATIVE_TIMEOUT:-120} python -m pytest tests/test_native_backend.py -m gpu -q -p no:cacheprovider \
    --maxfail=10 -k "not test_gpu_resnet_layers" >"$out/native_tests.log" 2>&1
  echo "exit $?" >>"$out/native_tests.log"; tail -n 3 "$out/native_tests.log" | tee -a "$log"
  timeout ${NATIVE_LAYERS_TIMEOUT:-150} python -m pytest tests/test_native_backend.py -m gpu -q -p no:cacheprovider \
    --maxfail=10 -k "test_gpu_resnet_layers" >"$out/native_layer_tests.log" 2>&1
  echo "exit $?" >>"$out/native_layer_tests.log"; tail -n 3 "$out/native_layer_tests.log" | tee -a "$log"
fi

if has triton; then
  # what changed without a GPU since the last session, first: the TMA algorithms on every
  # ResNet-50 1x1 / 3x3 stride-1 layer and config, torch.compile/export through the
  # triton_op, graph capture without warm-up, the packed stem (every tile config, and
  # its buffer's strides under Inductor)
  step "triton backend: new paths"
  # the few whole-path tests before the ~200 per-config ones (each a cold Triton compile)
  timeout ${TRITON_TIMEOUT:-180} python -m pytest tests/test_triton_backend.py -m gpu -q -x -p no:cacheprovider \
    -k "inductor or compile_and_export or graph_capture or tuned_once or packed" >"$out/triton_tests.log" 2>&1
  rc=$?
  if [[ $rc == 0 ]]; then
    timeout ${TRITON_CONFIGS_TIMEOUT:-180} python -m pytest tests/test_triton_backend.py -m gpu -q -x \
      -p no:cacheprovider -k "gemm_tma or conv_tma" >>"$out/triton_tests.log" 2>&1
    rc=$?
  fi
  echo "exit $rc" >>"$out/triton_tests.log"; tail -n 3 "$out/triton_tests.log" | tee -a "$log"
  if [[ $rc != 0 ]]; then  # a broken new kernel must not take the model numbers down with it
    export RESNET_FUSED_TRITON_SKIP=${RESNET_FUSED_TRITON_SKIP:-"gemm_tma conv_tma"}
    echo "triton step failed: later steps run with RESNET_FUSED_TRITON_SKIP=$RESNET_FUSED_TRITON_SKIP" | tee -a "$log"
  fi
fi

if has models; then
  step "model benchmark (ResNet-50, fp16, batch 256 and 1)"
  providers=${MODEL_PROVIDERS:-"eager_nchw eager_channels_last fused_torch fused_triton fused_native"}
  has compile && providers="$providers compile"  # last: max-autotune takes minutes
  # bench refuses a fused provider whose backend cannot run here (e.g. the native build
  # failed): leave such ones out, said in the log, so the others are still measured
  runnable=$(python -c "from resnet_fused import available_backends as a; print(' '.join(a('cuda')))" 2>>"$log")
  kept=""
  for p in $providers; do
    b=${p#fused_}
    if [[ $p == fused_* && " $runnable " != *" $b "* ]]; then
      echo "model benchmark: leaving out $p (backends that run on cuda here: $runnable)" | tee -a "$log"
    else
      kept="$kept $p"
    fi
  done
  providers=$kept
  timeout ${MODELS_TIMEOUT:-300} python -m resnet_fused.cli bench --batch-size ${MODEL_BATCHES:-256 1} --cuda-graphs \
    --providers $providers --json "$out/models.json" --plot "$out/models.png" --no-progress 2>&1 | tee -a "$log"
fi

if has kernels; then
  step "kernel benchmarks (ResNet-50, batch ${KERNEL_BATCH:-256}, autotuned)"
  RESNET_FUSED_BENCH_BATCH_SIZES=${KERNEL_BATCH:-256} timeout ${KERNELS_TIMEOUT:-200} python -m pytest benchmarks/test_conv_kernels.py -q -p no:cacheprovider \
    -k "resnet50" --benchmark-json "$out/kernels.json" \
    --benchmark-columns=median >>"$log" 2>&1
  echo "exit $?" | tee -a "$log"
  python benchmarks/summarize.py kernels "$out/kernels.json" 2>>"$log" | tee -a "$log"
fi

if has tests; then
  step "gpu tests"
  # one heuristic tile config per shape: hundreds of shapes, no time to autotune each
  tk=${TESTS_K:-}
  if has triton && [[ -z $tk ]]; then
    tk="not (gemm_tma or conv_tma or inductor or compile_and_export or graph_capture)"  # ran above
  fi
  RESNET_FUSED_TRITON_AUTOTUNE=0 timeout ${TESTS_TIMEOUT:-240} python -m pytest tests -m gpu -q -p no:cacheprovider \
    $(has native && echo --ignore=tests/test_native_backend.py) \
    ${tk:+-k "$tk"} >"$out/gpu_tests.log" 2>&1
  echo "exit $?" >>"$out/gpu_tests.log"; tail -n 3 "$out/gpu_tests.log" | tee -a "$log"
fi

if has sanitizer; then
  step "compute-sanitizer memcheck, one fused resnet50 forward per backend (triton, native)"
  RESNET_FUSED_TRITON_AUTOTUNE=0 timeout ${SANITIZER_TIMEOUT:-120} compute-sanitizer --tool memcheck --error-exitcode 3 \
    python -c "
import os, torch, resnet_fused
for backend, algo in (('triton', 'implicit_gemm'), ('triton', 'gemm_tma'), ('triton', 'conv_tma'), ('native', 'auto'),
                      ('native', 'sm90a_128x128')):
    os.environ['RESNET_FUSED_TRITON_ALGO'] = algo if backend == 'triton' else 'auto'
    os.environ['RESNET_FUSED_CUTLASS_KERNEL'] = algo if backend == 'native' else 'auto'
    if algo == 'sm90a_128x128' and 'sm90a' not in resnet_fused.extension_info().get('cutlass_kernels', ''):
        continue
    m = resnet_fused.resnet50(backend=backend).eval().cuda().half()
    with torch.inference_mode():
        y = m(torch.randn(2, 3, 64, 64, device='cuda', dtype=torch.half).contiguous(memory_format=torch.channels_last))
    torch.cuda.synchronize(); print(backend, algo, 'forward ok', tuple(y.shape))
" >"$out/sanitizer.log" 2>&1
  echo "exit $?" >>"$out/sanitizer.log"; tail -n 4 "$out/sanitizer.log" | tee -a "$log"
fi
step done
