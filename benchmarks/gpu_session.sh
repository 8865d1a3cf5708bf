#!/usr/bin/env bash
# One-shot GPU session: environment, extension build, GPU tests, model and per-layer
# benchmarks, a compute-sanitizer memcheck of a fused forward. Everything lands in one
# folder: environment.json, session.log, build.log, precompile.log, tune.log, triton_tests.log,
# triton_tune_tests.log, triton_paths_tests.log, paths_native_b<batch>.{log,json},
# triton_tma_tests.log, native_tests.log, native_sm90a_tests.log, native_layer_tests.log, models.json,
# models.png, layers.json, sanitizer.log, kernels.json, gpu_tests.log, compile.json,
# triton_tuned.json (the Triton tuning measured: benchmarks/ship_tuned.py merges it into
# the package's table).
#
# The whole session ends inside BUDGET seconds (default 540: one 10-minute device call
# with room for the machine's start and the transfers; a step may overrun its limit by
# the 15 s its stop is given). Steps run in order of what they are worth; each gets its
# own time limit cut to what is left of the budget (less what is kept for the model
# benchmark and the native tests), and a step that would get less than it needs is
# skipped and named at the end ("not run: ..."), ready to be passed as STEPS to a second
# call. A step cut short keeps what it had written (the benchmarks write JSON row by
# row; steps are stopped with SIGINT, so pytest prints its summary and the Triton tuning
# record is written at exit).
#
# The build compiles resnet_fused._C in place for this machine's torch (a library built
# elsewhere against another torch will not load), for this GPU's architecture only, in
# the background: meanwhile the host compiles the Triton kernels of the model
# benchmark's convs in parallel (precompile), then the GPU tunes them (tune: algorithm
# per conv and tiles, cached on disk for the later steps) and runs the Triton tests. It needs nvcc
# and the nvidia-cutlass wheel: where pip has no network, put the wheel in .whl/ first
# (../shared/tools/device-wheels.sh does) and this script installs it from there.
#
# Usage (from anywhere, on any machine with an NVIDIA GPU and this repo's deps):
#   benchmarks/gpu_session.sh [OUTDIR]   default OUTDIR: benchmarks/results/<gpu name>; with no
#                                        OUTDIR and $OUT set (the device tool's folder, which brings
#                                        back 8 files at most), the folder is packed after every step
#                                        into $OUT/session.tgz, beside a copy of session.log
#   STEPS="build precompile tune triton triton_tma models native native_layers layers sanitizer kernels tests compile"
#                                        # the default, in the order they run
#   BUDGET=1800 benchmarks/gpu_session.sh    # a machine of your own: every step gets its full limit
#   PYTHON=python3.12 ...                # the interpreter (default: python, else python3)
# A second call on the same (still warm) machine can pick up what the first skipped:
# STEPS="<the not-run list>" BUDGET=300 (the build is kept in the tree).
set -uo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-$(command -v python || command -v python3)}
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | tr ' ' '_')
gpu_arch=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d ' .')
pack_to=""
if [[ -n ${1:-} ]]; then
  out=$1
elif [[ -n ${OUT:-} ]]; then
  out=$(mktemp -d /tmp/gpu_session.XXXXXX) pack_to=$OUT
else
  out=benchmarks/results/${gpu:-unknown_gpu}
fi
mkdir -p "$out"
out=$(cd "$out" && pwd)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$PWD/.triton-cache}
# every step's Triton tuning (algorithm per conv shape, autotuned tile configs) is kept in
# $out/triton_tuned.json; benchmarks/ship_tuned.py merges it into the package's table
export RESNET_FUSED_TRITON_RECORD=${RESNET_FUSED_TRITON_RECORD:-$out/triton_tuned.json}
steps=${STEPS-"build precompile tune triton triton_tma models native native_layers layers sanitizer kernels tests compile"}
budget=${BUDGET:-540}
log="$out/session.log"
start=$(date +%s)
deadline=$(( start + budget ))
skipped=""
pack() {
  [[ -n $pack_to && -f $log ]] || return 0
  tar -czf "$pack_to/session.tgz.part" -C "$out" . && mv "$pack_to/session.tgz.part" "$pack_to/session.tgz"
  cp "$log" "$pack_to/session.log"
}
step() { pack; current=$1; echo "== $2 (t=$(( $(date +%s) - start ))s)" | tee -a "$log"; }
has() { [[ " $steps " == *" $1 "* ]]; }

# fit OWN LEAST [RESERVE]: sets $lim, the current step's time limit: its own (OWN
# seconds) cut to what is left of the budget less RESERVE seconds kept for later steps;
# fails, and the step is skipped and named, where that is under LEAST seconds
fit() {
  local left=$(( deadline - $(date +%s) - ${3:-0} ))
  lim=$(( $1 < left ? $1 : left ))
  if (( lim < $2 )); then
    echo "   skipped: it needs ${2}s, the budget leaves it $(( left > 0 ? left : 0 ))s" | tee -a "$log"
    [[ " $skipped " == *" $current "* ]] || skipped="$skipped $current"  # (once for a step of several parts)
    return 1
  fi
}
# fit_quietly OWN LEAST [RESERVE]: fit for an optional part: not named as not run
fit_quietly() {
  local left=$(( deadline - $(date +%s) - ${3:-0} ))
  lim=$(( $1 < left ? $1 : left ))
  (( lim >= $2 ))
}
# limited CMD...: CMD under the current step's limit; SIGINT first (pytest prints its
# summary, atexit hooks run), SIGKILL 15 s later if it is still there
limited() { timeout -s INT -k 15 "$lim" "$@"; }
# logged FILE CMD...: CMD (its output into $out/FILE, then "exit <status>"), the file's
# last lines into the session log; returns CMD's status
logged() {
  local file=$out/$1 rc
  shift
  "$@" >"$file" 2>&1
  rc=$?
  echo "exit $rc" >>"$file"
  tail -n 3 "$file" | tee -a "$log"
  return $rc
}

# what the steps before the model benchmark keep for it and for the native tests' first part
models_reserve=0
has models && models_reserve=$(( models_reserve + 200 ))
has native && models_reserve=$(( models_reserve + 60 ))

step environment environment
{ nvidia-smi; "$py" -c "import torch, triton; print(torch.__version__, triton.__version__, torch.backends.cudnn.version())"; } >>"$log" 2>&1
write_environment() {
  "$py" -c "import json; from resnet_fused.cli import environment; print(json.dumps(environment(), indent=2))" >"$out/environment.json" 2>>"$log"
}
write_environment

build_pid=""
if has build; then
  archs=${RESNET_FUSED_CUDA_ARCHS:-${gpu_arch:-80;90}}
  step build "build resnet_fused._C for sm ${archs}, in the background"
  if ls .whl/*.whl >/dev/null 2>&1 && ! "$py" -c "import cutlass_library" 2>/dev/null; then
    "$py" -m pip install -q --no-index --no-deps --target /tmp/resnet_fused_wheels .whl/*.whl >>"$log" 2>&1
    export PYTHONPATH="/tmp/resnet_fused_wheels:$PYTHONPATH"
  fi
  # its limit keeps 150 s after it for the model benchmark; two cores are left to the
  # GPU steps that run meanwhile (Triton compiles on the host)
  if fit "${BUILD_TIMEOUT:-420}" 120 150; then
    jobs=$(( $(nproc) > 4 ? $(nproc) - 2 : $(nproc) ))
    ( RESNET_FUSED_BUILD_CUDA=1 RESNET_FUSED_CUDA_ARCHS="$archs" MAX_JOBS=${MAX_JOBS:-$jobs} \
        limited "$py" setup.py build_ext --inplace >"$out/build.log" 2>&1
      echo "exit $?" >>"$out/build.log" ) &
    build_pid=$!
  fi
fi
# the steps that run while the build does must not load a library being written
during_build() { if [[ -n $build_pid ]]; then RESNET_FUSED_DISABLE_EXTENSION=1 "$@"; else "$@"; fi; }
await_build() {
  [[ -z $build_pid ]] && return
  step build "waiting for the build"
  wait "$build_pid"
  build_pid=""
  tail -n 1 "$out/build.log" | tee -a "$log"
  "$py" -c "import json, resnet_fused; print(json.dumps(resnet_fused.extension_info()))" 2>&1 | tee -a "$log"
  write_environment  # now with the extension this build made
}

model_batches=${MODEL_BATCHES:-256 1}
kernels_cached() { find "$TRITON_CACHE_DIR" -name '*.cubin' 2>/dev/null | wc -l; }
if has precompile; then
  # Autotuning in a fresh process compiled every tile config of every conv one after
  # another (10-20 s a layer: sessions 1-3). Compile them first, in parallel processes, into
  # the Triton cache: tests/offline_compile.py runs the backend's host code for this GPU
  # with a driver that compiles and launches nothing (same target and arguments, so the
  # same cache keys as the real run), for the tune step's convs (ResNet-50, fp16)
  step precompile "compile the tune step's Triton kernels into the cache, ${PRECOMPILE_JOBS:-6} processes"
  if [[ $gpu_arch != 90 && $gpu_arch != 80 ]]; then
    echo "   skipped: offline_compile.py knows sm_90 and sm_80, this GPU is sm_${gpu_arch:-?}" | tee -a "$log"
  elif fit "${PRECOMPILE_TIMEOUT:-120}" 20 "$models_reserve"; then
    pids=()
    for (( k = 0; k < ${PRECOMPILE_JOBS:-6}; k++ )); do
      TRITON_INTERPRET= during_build limited "$py" tests/offline_compile.py --precompile --arch "$gpu_arch" --dtypes float16 \
        --batch $model_batches --shard "$k/${PRECOMPILE_JOBS:-6}" >"$out/precompile.$k.log" 2>&1 &
      pids+=($!)
    done
    for k in "${!pids[@]}"; do
      wait "${pids[$k]}"
      echo "exit $?" >>"$out/precompile.$k.log"
      cat "$out/precompile.$k.log" >>"$out/precompile.log"
      rm -f "$out/precompile.$k.log"
    done
    grep -h "^triton\|^exit\|PROBLEM\|launchers not built" "$out/precompile.log" | tee -a "$log"
    echo "   $(kernels_cached) kernels in the Triton cache" | tee -a "$log"
  fi
fi
if has tune; then
  # the GPU is idle while the build compiles: tune the Triton backend for the model
  # benchmark's shapes now (algorithm per conv, tile configs; cached on disk, so the
  # model and layer steps find them); 45 s more are kept for the Triton tests
  step tune "tune the Triton kernels on ResNet-50, fp16, batch ${model_batches// /, }"
  if fit "${TUNE_TIMEOUT:-200}" 30 $(( models_reserve + $(has triton && echo 45 || echo 0) )); then
    cached=$(kernels_cached)
    logged tune.log during_build limited "$py" -m resnet_fused.cli bench --providers fused_triton \
      --batch-size $model_batches --warmup 1 --runs 1 --no-progress
    # near 0 where the precompile step's cache keys were the real run's
    echo "   the tune step compiled $(( $(kernels_cached) - cached )) kernels itself" | tee -a "$log"
  fi
fi

# Triton tests: exit 1 is a failure (a run cut short exits 124, one killed 137)
if has triton; then
  # what changed without a GPU since the last session: Inductor through the triton_op,
  # export, graph capture without warm-up, the packed stem, merged groups (tests without
  # the gpu marker run on the GPU too where there is one)
  # In three parts, the most telling first: each new shape would otherwise be timed and
  # autotuned, compiling config after config (the precompile covers only the model
  # benchmark's shapes), and the ~60 small packed and merged cases come first in the file.
  # Traced by torch.compile and export (the heuristic tile: what is traced is what counts):
  step triton "triton backend gpu tests: the new paths"
  if fit "${TRITON_TIMEOUT:-60}" 30 "$models_reserve"; then
    RESNET_FUSED_TRITON_AUTOTUNE=0 logged triton_tests.log during_build limited "$py" -m pytest \
      tests/test_triton_backend.py -q -p no:cacheprovider -k "compile_and_export or compile_keeps"
  fi
  # tuning on: Inductor given the autotuner's tile (ResNet-18, 64 px), no timing inside a
  # graph capture, a tuned tile remembered, threads tuning at once
  if fit "${TRITON_TUNE_TIMEOUT:-70}" 20 "$models_reserve"; then
    logged triton_tune_tests.log during_build limited "$py" -m pytest tests/test_triton_backend.py -q \
      -p no:cacheprovider -k "inductor or graph_capture or tuned_once or threads_tuning"
  fi
  # the packed stem loop and merged groups on the hardware, every tile config of theirs
  if fit "${TRITON_PATHS_TIMEOUT:-60}" 30 "$models_reserve"; then
    RESNET_FUSED_TRITON_AUTOTUNE=0 logged triton_paths_tests.log during_build limited "$py" -m pytest \
      tests/test_triton_backend.py -q -p no:cacheprovider -k "(packed or merged or grouped_odd) and not compile"
  fi
fi
if has triton_tma; then
  # the TMA algorithms with every config on every ResNet-50 layer they take, odd shapes
  step triton_tma "triton backend gpu tests: gemm_tma and conv_tma, every config"
  if fit "${TRITON_TMA_TIMEOUT:-180}" 45 "$models_reserve"; then
    # (and the strided 1x1 cases, odd sizes: a TMA view whose row stride passes the batch's)
    logged triton_tma_tests.log during_build limited "$py" -m pytest tests/test_triton_backend.py -q \
      -p no:cacheprovider -k "(gemm_tma or conv_tma) and (test_gpu_ or strided_1x1)"
    if [[ $? == 1 ]]; then  # a broken TMA kernel must not take the model numbers down with it
      export RESNET_FUSED_TRITON_SKIP=${RESNET_FUSED_TRITON_SKIP:-"gemm_tma conv_tma"}
      echo "TMA tests failed: later steps run with RESNET_FUSED_TRITON_SKIP=$RESNET_FUSED_TRITON_SKIP" | tee -a "$log"
    fi
  fi
fi

await_build

if has models; then
  step models "model benchmark (ResNet-50, fp16, batch ${model_batches// /, })"
  providers=${MODEL_PROVIDERS:-"eager_nchw eager_channels_last fused_torch fused_triton fused_native"}
  # bench refuses a fused provider whose backend cannot run here (e.g. the native build
  # failed): leave such ones out, said in the log, so the others are still measured
  runnable=$("$py" -c "from resnet_fused import available_backends as a; print(' '.join(a('cuda')))" 2>>"$log")
  kept=""
  for p in $providers; do
    b=${p#fused_}
    if [[ $p == fused_* && " $runnable " != *" $b "* ]]; then
      echo "model benchmark: leaving out $p (backends that run on cuda here: $runnable)" | tee -a "$log"
    else
      kept="$kept $p"
    fi
  done
  if fit "${MODELS_TIMEOUT:-240}" 60 "$(has native && echo 60)"; then
    limited "$py" -m resnet_fused.cli bench --batch-size $model_batches --cuda-graphs \
      --providers $kept --json "$out/models.json" --plot "$out/models.png" --no-progress 2>&1 | tee -a "$log"
  fi
fi

if has native; then
  # the native CUDA kernels had never run on a GPU: the tests that say most (every
  # CUTLASS kernel forced in turn, the fallbacks, NaN on every path, ten whole models)
  step native "native backend gpu tests"
  # first, which kernel each ResNet-50 conv takes at the model benchmark's batches, and why
  # any falls back (resnet-fused explain: one forward each)
  # (optional: each batch only while 30 s stay kept for the tests, and never named as not run)
  for b in $model_batches; do
    if fit_quietly "${NATIVE_PATHS_TIMEOUT:-20}" 10 30; then
      logged "paths_native_b$b.log" limited "$py" -m resnet_fused.cli explain --arch resnet50 --backend native \
        --device cuda --batch-size "$b" --json "$out/paths_native_b$b.json"
    fi
  done
  # (CUDA_LAUNCH_BLOCKING: a kernel's fault is reported at its own launch, by name, not at
  # the next synchronizing call; these cases are small)
  if fit "${NATIVE_TIMEOUT:-120}" 30; then
    CUDA_LAUNCH_BLOCKING=1 logged native_tests.log limited "$py" -m pytest tests/test_native_backend.py -m gpu -q \
      -p no:cacheprovider \
      --maxfail=10 -k "not test_gpu_resnet_layers and not sm90a"
  fi
  # the opt-in Hopper kernel (TMA + wgmma) on its own, under a short limit: a bad TMA
  # descriptor shows as a hang, which must not take the sm80 kernels' tests with it
  if fit "${NATIVE_SM90A_TIMEOUT:-45}" 20; then
    CUDA_LAUNCH_BLOCKING=1 logged native_sm90a_tests.log limited "$py" -m pytest tests/test_native_backend.py -m gpu -q \
      -p no:cacheprovider --maxfail=5 -k "sm90a and not test_gpu_resnet_layers"
  fi
fi
if has native_layers; then
  step native_layers "native backend gpu tests: the ~500 per-layer cases"
  if fit "${NATIVE_LAYERS_TIMEOUT:-150}" 30; then
    logged native_layer_tests.log limited "$py" -m pytest tests/test_native_backend.py -m gpu -q \
      -p no:cacheprovider --maxfail=10 -k "test_gpu_resnet_layers"
  fi
fi

if has layers; then
  # per unique ResNet-50 conv at batch 256: each fused backend, cuDNN's conv alone, eager
  # conv + BN + add + ReLU, and each Triton algorithm forced (rows written as they finish)
  step layers "per-layer times (ResNet-50, fp16, batch ${KERNEL_BATCH:-256}, CUDA-graph replays)"
  if fit "${LAYERS_TIMEOUT:-180}" 45; then
    limited "$py" benchmarks/layer_times.py "${KERNEL_BATCH:-256}" "$out/layers.json" --algorithms 2>&1 | tee -a "$log"
  fi
fi

if has sanitizer; then
  step sanitizer "compute-sanitizer memcheck, one fused resnet50 forward per backend (triton, native)"
  if fit "${SANITIZER_TIMEOUT:-120}" 45; then
    RESNET_FUSED_TRITON_AUTOTUNE=0 logged sanitizer.log limited compute-sanitizer --tool memcheck --error-exitcode 3 \
      "$py" -c "
import os, torch, resnet_fused
for backend, algo in (('triton', 'implicit_gemm'), ('triton', 'gemm_tma'), ('triton', 'conv_tma'), ('native', 'auto'),
                      ('native', 'sm90a_128x128')):
    os.environ['RESNET_FUSED_TRITON_ALGO'] = algo if backend == 'triton' else 'auto'
    os.environ['RESNET_FUSED_CUTLASS_KERNEL'] = algo if backend == 'native' else 'auto'
    if backend not in resnet_fused.available_backends('cuda'):
        print(backend, 'not available here:', resnet_fused.extension_info().get('error')); continue
    if algo == 'sm90a_128x128' and 'sm90a' not in resnet_fused.extension_info().get('cutlass_kernels', ''):
        continue
    m = resnet_fused.resnet50(backend=backend).eval().cuda().half()
    with torch.inference_mode():
        y = m(torch.randn(2, 3, 64, 64, device='cuda', dtype=torch.half).contiguous(memory_format=torch.channels_last))
    torch.cuda.synchronize(); print(backend, algo, 'forward ok', tuple(y.shape))
"
  fi
fi

if has kernels; then
  step kernels "kernel benchmarks (pytest-benchmark, ResNet-50, batch ${KERNEL_BATCH:-256})"
  if fit "${KERNELS_TIMEOUT:-200}" 60; then
    RESNET_FUSED_BENCH_BATCH_SIZES=${KERNEL_BATCH:-256} limited "$py" -m pytest benchmarks/test_conv_kernels.py -q \
      -p no:cacheprovider -k "resnet50" --benchmark-json "$out/kernels.json" --benchmark-columns=median >>"$log" 2>&1
    echo "exit $?" | tee -a "$log"
    "$py" benchmarks/summarize.py kernels "$out/kernels.json" 2>>"$log" | tee -a "$log"
  fi
fi

if has tests; then
  step tests "the other gpu tests"
  # one heuristic tile config per shape: hundreds of shapes, no time to autotune each
  tk=${TESTS_K:-}
  if [[ -z $tk ]]; then  # what the steps above ran
    ran=()
    has triton && ran+=("inductor or compile_and_export or compile_keeps or graph_capture or tuned_once or threads_tuning or packed or merged or grouped_odd")
    has triton_tma && ran+=("gemm_tma or conv_tma")
    for r in "${ran[@]}"; do tk="${tk:+$tk or }$r"; done
    [[ -n $tk ]] && tk="not ($tk)"
  fi
  if fit "${TESTS_TIMEOUT:-240}" 60; then
    RESNET_FUSED_TRITON_AUTOTUNE=0 logged gpu_tests.log limited "$py" -m pytest tests -m gpu -q -p no:cacheprovider \
      $( (has native || has native_layers) && echo --ignore=tests/test_native_backend.py) ${tk:+-k "$tk"}
  fi
fi

if has compile; then
  # torch.compile max-autotune with freezing tunes every conv of the net: minutes at batch 256
  step compile "torch.compile(mode=max-autotune, freezing) baseline beside eager channels_last and fused triton"
  if fit "${COMPILE_TIMEOUT:-420}" 240; then
    limited "$py" -m resnet_fused.cli bench --batch-size ${COMPILE_BATCHES:-256} \
      --providers eager_channels_last fused_triton compile --json "$out/compile.json" --no-progress 2>&1 | tee -a "$log"
  fi
fi

await_build  # a build still running (no step after it needed it) is waited for, not left behind
step done "done"
[[ -n $skipped ]] && echo "not run (out of the ${budget}s budget):$skipped" | tee -a "$log"
pack
exit 0
