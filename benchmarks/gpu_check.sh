#!/usr/bin/env bash
# The one script for a lent GPU (H100/H200, torch 2.11, no network). From the repository root:
#   bash benchmarks/gpu_check.sh            (OUT=folder for logs and JSON; the device tool sets it)
# Stages, each under its own time limit so one hang cannot eat the lease (about 8 minutes in all):
#   the streamed-weight probe (benchmarks/probes/stream_probe.cu, 60 s) -> build the CUDA extension in place
#   -> a small run of the grid-barrier kernels (a hang there disables the extension for the later stages)
#   -> the same for the streamed latent loop (csrc/stream_loop.cu; a failure retries it with its input read
#   from L2, then also with its per-CTA attention, and a third failure drops only its tests and benchmark
#   rows) and for the streamed thought
#   loop (csrc/stream_thought.cu, likewise) -> the streamed kernels' gpu tests -> the benchmark harness
#   (acceptance rows first; every record appended to bench/results.jsonl in logs.tar.gz as measured) -> the other
#   gpu-marked tests (Triton kernels in bf16 at full shapes, graph replay, the barrier kernels against the
#   torch backend) -> compute-sanitizer memcheck and
#   racecheck on the small run. A follow-up run can narrow the stages (defaults: everything):
#     GPU_TESTS='tests/test_cuda_ext.py -k ring'  GPU_BENCH=linear_configs,decode_tuned  GPU_SANITIZE=racecheck
#     GPU_CHECK_BUDGET=seconds (470)   GPU_EXTRA=samplers,serve,train,fuzz (opt-in stages, below)
#     GPU_TESTS=none / GPU_BENCH=none / GPU_SANITIZE=none skip those stages; GPU_PROBE=0 the probe,
#     GPU_BUILD=0 the build (default auto: none where a carried extension matches csrc/, below). Set
#     GPU_CHECK_BUDGET about 30 s under the call's timeout: the later stages size themselves by it
#     (2026-12-04, run 2: the default 470 under a 340 s call cut racecheck off)
#   tests/test_gpu_script.py runs it on the CPU (stand-ins for nvidia-smi, python3, compute-sanitizer)
#   through its fallbacks.
#   Carry .triton_cache (made on the CPU machine with the GPU machine's Python and Triton: RESULTS.md's plan,
#   `TRITON_CACHE_DIR=.triton_cache python -m tools.compile_check --full --launchers`, then `--slim-cache
#   .triton_cache`) to skip the Triton compiles of the launches it recorded; it is relocated here first.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
# every log but main.log is written outside $OUT and packed into $OUT/logs.tar.gz every 20 s and at each
# stage: the device tool brings back at most 8 files (2026-12-04: run 1's results.jsonl and smoke logs stayed
# behind), and a run cut by the tool's time limit still brings back what its stages had written
LOGS=$(mktemp -d)
mkdir -p "$LOGS/bench"
# (a temporary name per process: the packer and a stage's stamp may pack at the same moment)
pack() { tar czf "$OUT/.logs.$BASHPID.tar.gz" -C "$LOGS" . 2>/dev/null && mv -f "$OUT/.logs.$BASHPID.tar.gz" "$OUT/logs.tar.gz"; }
# (its sleep is killed with it: an orphaned sleep would hold the caller's output open up to 20 s after the end)
(
  trap 'kill "$nap" 2>/dev/null; exit 0' TERM
  while :; do
    sleep 20 &
    nap=$!
    wait "$nap"
    pack
  done
) >/dev/null 2>&1 &
PACKER=$!
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
[ -z "${TRITON_CACHE_DIR:-}" ] && [ -d .triton_cache ] && export TRITON_CACHE_DIR=$PWD/.triton_cache
if [ -d "${TRITON_CACHE_DIR:-/nonexistent}" ]; then  # a carried cache: its entries name their files' paths
  python3 -m tools.compile_check --relocate-cache "$TRITON_CACHE_DIR" >/dev/null
fi
cache_entries() { find "${TRITON_CACHE_DIR:-/nonexistent}" -mindepth 1 -maxdepth 1 2>/dev/null | wc -l; }
CARRIED_CACHE=$(cache_entries)  # (each compiled kernel, launcher or driver module is an entry)
start=$(date +%s)
LOG="$OUT/main.log"
stamp() {
  echo "[gpu_check +$(($(date +%s) - start))s] $*" | tee -a "$LOG"
  pack
}
left() { echo $((${GPU_CHECK_BUDGET:-470} - ($(date +%s) - start))); }
# within S: a stage's limit, S seconds or what the budget has left less 10 (for the logs' packing), so a
# stage that starts late ends inside the call instead of being killed with it; under 20 s left, 1 (the stage
# is cut at once: exit 124; never 0, which `timeout` reads as no limit)
within() {
  local l=$(($(left) - 10))
  [ "$l" -lt 20 ] && l=1
  [ "$l" -lt "$1" ] && echo "$l" || echo "$1"
}

{
  nvidia-smi -L
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,power.draw,temperature.gpu --format=csv
  git rev-parse --short HEAD 2>/dev/null || echo "commit: unknown"
  python3 -c "import sys, torch, triton; print(sys.version.split()[0], torch.__version__, triton.__version__)"
  nvcc --version | tail -2
} 2>&1 | tee -a "$LOG"

# first, the probe that decides issue #11's kernel design (GPU_PROBE=0 skips it): can a streamed weight
# ring reach >= 85% of the copy bandwidth at batch 1-32 with a dependency wait per matrix?
if [ "${GPU_PROBE:-1}" = 1 ]; then
  stamp "probe: streamed weight ring (benchmarks/probes/stream_probe.cu)"
  nvcc -std=c++17 -O3 -Icsrc -gencode=arch=compute_90a,code=sm_90a benchmarks/probes/stream_probe.cu \
    -o /tmp/stream_probe >"$LOGS/probe_build.log" 2>&1 && timeout 60 /tmp/stream_probe 8 >"$LOGS/probe.log" 2>&1
  echo "probe exit $?" | tee -a "$LOG"
  grep "^probe" "$LOGS/probe.log" | tee -a "$LOG"
  # the Triton path's side of #11 (68% of the floor at batch 1): its 17 weight products a core iteration in a
  # graph, against one launch of the same bytes, cuBLAS, and programmatic dependent launches (~40 s: compiles)
  stamp "probe: the Triton GEMV chain, launch gaps and PDL (benchmarks/probes/gemv_chain.py)"
  timeout "$(within 90)" python3 -m benchmarks.probes.gemv_chain >"$LOGS/gemv_chain.log" 2>&1
  echo "gemv chain exit $?" | tee -a "$LOG"
  grep -v '^{' "$LOGS/gemv_chain.log" | tail -14 | tee -a "$LOG"
  timeout "$(within 40)" python3 -m benchmarks.probes.gemv_chain --shape gpt2 --batch 1 --iters 8 \
    >"$LOGS/gemv_chain_gpt2.log" 2>&1
  echo "gemv chain gpt2 exit $?" | tee -a "$LOG"
  grep -v '^{' "$LOGS/gemv_chain_gpt2.log" | tail -8 | tee -a "$LOG"
fi

# GPU_BUILD=auto (default): build unless the extension here (carried, built for Python 3.12 on the CPU machine:
# RESULTS.md's plan) imports and carries this tree's csrc/ digest (latentrt.cuda_ext.built); 1: always build;
# 0: use whatever is built (tests' dry run)
BUILD=${GPU_BUILD:-auto}
if [ "$BUILD" = auto ]; then
  if python3 -c "from latentrt import cuda_ext; ok, why = cuda_ext.built(); print(why); raise SystemExit(not ok)" \
    >"$LOGS/built.log" 2>&1; then
    stamp "build skipped: the extension here was built from this tree's csrc/"
    BUILD=0
  else
    echo "carried extension not used: $(tail -1 "$LOGS/built.log")" | tee -a "$LOG"
    BUILD=1
  fi
fi
if [ "$BUILD" = 1 ]; then
  stamp "build the CUDA extension"
  LATENTRT_FORCE_CUDA=1 timeout 150 python3 setup.py -q build_ext --inplace --build-temp /tmp/lrt-build \
    >"$LOGS/build.log" 2>&1
  echo "build exit $?" | tee -a "$LOG"
fi
CUDA_BUILT=0
python3 -c "import latentrt._cuda" 2>>"$LOG" && CUDA_BUILT=1

# smoke KERNELS SECONDS [NAME]: one small run of those kernels (benchmarks/cuda_smoke.py); its exit status
smoke() {
  local name=${3:-$1}
  stamp "cuda smoke: $name"
  timeout "$2" python3 -m benchmarks.cuda_smoke --only "$1" >"$LOGS/smoke_$name.log" 2>&1
  local rc=$?
  echo "smoke $name exit $rc" | tee -a "$LOG"
  tail -5 "$LOGS/smoke_$name.log" | tee -a "$LOG"
  return $rc
}
STREAM_OK=1
SANITIZE="barrier stream stream-thoughts"  # the smoke families the sanitizer runs: those whose smoke passed
if [ "$CUDA_BUILT" = 1 ]; then
  smoke barrier 60  # the grid-barrier latent loop (both barriers) and the thought loop
  rc=$?
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
    stamp "smoke hung: the CUDA extension is removed for the later stages"
    rm -f latentrt/_cuda*.so
    CUDA_BUILT=0
  fi
fi
# the streamed-weight loop (#11, csrc/stream_loop.cu) on its own: a failure or hang there (its likeliest bug:
# a dependency wait that never completes) drops only its tests and benchmark rows. Its newest parts are tried
# away one at a time: where the default fails, the kernel is tried again with each stage's input read from L2
# (not staged in shared memory), then also with its attention one (row, head) per CTA; the first that passes
# is how the later stages run
if [ "$CUDA_BUILT" = 1 ] && ! smoke stream 50; then
  if LATENTRT_STREAM_INPUT=l2 smoke stream 50 stream_l2; then
    stamp "the streamed kernels' staged input failed its smoke: later stages use LATENTRT_STREAM_INPUT=l2"
    export LATENTRT_STREAM_INPUT=l2
  elif LATENTRT_STREAM_INPUT=l2 LATENTRT_STREAM_ATTENTION=cta smoke stream 50 stream_cta; then
    stamp "the streamed loop's split attention failed its smoke: later stages use LATENTRT_STREAM_ATTENTION=cta"
    stamp "and LATENTRT_STREAM_INPUT=l2"
    export LATENTRT_STREAM_INPUT=l2 LATENTRT_STREAM_ATTENTION=cta LATENTRT_BENCH_SKIP=cuda-stream
  else
    STREAM_OK=0
    export LATENTRT_BENCH_SKIP=cuda-stream,cuda-stream-cta
    SANITIZE=${SANITIZE/ stream / }
  fi
fi
# the streamed thought loop (csrc/stream_thought.cu) likewise on its own: a failure drops its tests and its
# decode_coconut rows only
STREAM_TESTS="stream"
if [ "$CUDA_BUILT" = 1 ] && ! smoke stream-thoughts 40; then
  STREAM_TESTS="stream and not thoughts"
  export LATENTRT_BENCH_SKIP="${LATENTRT_BENCH_SKIP:+$LATENTRT_BENCH_SKIP,}decode_coconut:cuda-stream"
  SANITIZE=${SANITIZE/ stream-thoughts/}
fi

# the streamed loop with its weights copied as tensor-map boxes (stream_copy="tensor", the 2026-12-04 probe's
# fast stream; correct on its first runs, 2026-12-04) and with its GEMVs on tensor cores at batch 1-4 too
# (stream_gemv="tensor-cores", added 2026-12-05, not yet run by a GPU): a failure drops only that variant's
# tests and benchmark row; a pass puts it under the sanitizer too
if [ "$CUDA_BUILT" = 1 ] && [ "$STREAM_OK" = 1 ]; then
  if smoke stream-tensor 50; then
    SANITIZE="$SANITIZE stream-tensor"
  else
    STREAM_TESTS="$STREAM_TESTS and not tensor"
    export LATENTRT_BENCH_SKIP="${LATENTRT_BENCH_SKIP:+$LATENTRT_BENCH_SKIP,}cuda-stream-tensor"
  fi
  if smoke stream-mma 40; then
    SANITIZE="$SANITIZE stream-mma"
  else
    STREAM_TESTS="$STREAM_TESTS and not mma"
    export LATENTRT_BENCH_SKIP="${LATENTRT_BENCH_SKIP:+$LATENTRT_BENCH_SKIP,}cuda-stream-mma"
  fi
fi

TO=""
python3 -c "import pytest_timeout" 2>/dev/null && TO="--timeout=45"
PYTEST="python3 -m pytest -m gpu -rfEs --tb=short -p no:cacheprovider --durations=12 $TO"
# the streamed kernels' tests first, in their own stage: they are what no GPU has run yet; then the benchmark
# rows, then the other gpu tests (most passed on an earlier lent GPU) with what time is left
if [ "${GPU_TESTS:-}" = none ]; then
  stamp "gpu tests: skipped (GPU_TESTS=none)"
elif [ "$STREAM_OK" = 1 ] && [ -z "${GPU_TESTS:-}" ]; then
  stamp "gpu tests: the streamed-weight loop"
  # -v: a line per test as it ends, so a stage cut by its timeout still says which tests passed
  timeout 180 $PYTEST -v -k "$STREAM_TESTS" tests/test_cuda_ext.py >"$LOGS/gpu_tests_stream.log" 2>&1
  echo "stream tests exit $?" | tee -a "$LOG"
  grep -E "passed|failed|error" "$LOGS/gpu_tests_stream.log" | tail -3 | tee -a "$LOG"
fi

if [ "${GPU_BENCH:-}" != none ]; then
  stamp "benchmarks"
  # at most 200 s, leaving 150 for the other gpu tests and the sanitizer when GPU_TESTS runs them
  bench_s=$(($(left) - 60))
  [ "${GPU_TESTS:-}" != none ] && bench_s=$(($(left) - 150))
  [ "$bench_s" -gt 200 ] && bench_s=200
  [ "$bench_s" -lt 30 ] && bench_s=30  # (timeout 0 would mean no limit)
  timeout "$bench_s" python3 -m benchmarks.run --quick \
    --only "${GPU_BENCH:-decode_recurrent,decode_coconut,host_syncs,linear_configs,decode_tuned,micro}" --out "$LOGS/bench" \
    >"$LOGS/bench.log" 2>&1
  echo "benchmarks exit $?" | tee -a "$LOG"
  rm -f "$LOGS/bench/results.json"  # results.jsonl holds the same records (and survives a timeout)
fi

# the other gpu tests (Triton kernels in bf16 at full shapes, the pool kernels of serving, the barrier
# kernels against the torch backend) after the acceptance rows: most passed on an earlier lent GPU
if [ "${GPU_TESTS:-}" != none ]; then
  stamp "gpu tests"
  eval "set -- ${GPU_TESTS:-tests/test_kernels.py tests/test_triton_backend.py tests/test_gpu_reference.py tests/test_cuda_ext.py}"
  SEL="not stream"
  [ -n "${GPU_TESTS:-}" ] && [ "$STREAM_OK" = 1 ] && SEL=""  # an explicit selection runs as given
  tests_s=$(($(left) - 40))  # at most 130 s; the sanitizer gets what is left
  [ "$tests_s" -gt 130 ] && tests_s=130
  [ "$tests_s" -lt 30 ] && tests_s=30
  timeout "$tests_s" $PYTEST -q ${SEL:+-k "$SEL"} "$@" >"$LOGS/gpu_tests.log" 2>&1
  echo "gpu tests exit $?" | tee -a "$LOG"
  grep -E "passed|failed|error" "$LOGS/gpu_tests.log" | tail -3 | tee -a "$LOG"
fi

# opt-in stages (GPU_EXTRA=samplers,serve,train): the W-position pass cost at Huginn-0125's shape (#17), the
# serving schedulers on a random-weight Huginn-0125 with the built-in model's exit depths replayed (#16), and
# the trainers in bf16 (below)
case ",${GPU_EXTRA:-}," in *,samplers,*)
  stamp "samplers: W-position pass cost"
  timeout 90 python3 -m benchmarks.samplers --pass-cost --shape huginn --out "$LOGS/pass_cost.json" \
    >"$LOGS/samplers.log" 2>&1
  echo "samplers exit $?" | tee -a "$LOG"
  tail -12 "$LOGS/samplers.log" | tee -a "$LOG"
  stamp "samplers: the built-in model's passes replayed at Huginn-0125's shape"
  timeout 150 python3 -m benchmarks.sampler_replay --shape huginn --problems 20 --out "$LOGS/sampler_replay.json" \
    >"$LOGS/sampler_replay.log" 2>&1
  echo "sampler replay exit $?" | tee -a "$LOG"
  tail -8 "$LOGS/sampler_replay.log" | tee -a "$LOG" ;;
esac
case ",${GPU_EXTRA:-}," in *,serve,*)
  # (each run within what the budget has left, most important first; a run cut short prints nothing)
  stamp "serving: schedulers with and without asynchronous scheduling, Huginn-0125 shape, replayed depths"
  # (--profile-steps: per step launches, graph replays, syncs, aten ops and GPU time, from a second untimed run;
  # +async: the engine's asynchronous scheduling, each step launched before the last one's exits are read, so the host's
  # work of a step runs while the device computes: compare step_ms and tokens/s with the same scheduler)
  timeout "$(within 200)" python3 -m benchmarks.serve --shape huginn --requests 48 --max-batch 8 --profile-steps 20 \
    --schedulers static,token,depth,token+async,depth+async --out "$LOGS/serve.json" >"$LOGS/serve.log" 2>&1
  echo "serve exit $?" | tee -a "$LOG"
  tail -15 "$LOGS/serve.log" | tee -a "$LOG"
  # the same shape with a long-tailed synthetic depth distribution over 4-32 iterations (on the CPU's tiny
  # shape depth batching measured 1.5-1.8x token batching with it; benchmarks/RESULTS.md)
  stamp "serving: token vs depth, Huginn-0125 shape, synthetic long-tailed depths"
  timeout "$(within 200)" python3 -m benchmarks.serve --shape huginn --requests 48 --max-batch 8 \
    --schedulers token,depth,token+async,depth+async \
    --depths 4,4,4,4,4,4,4,4,6,6,6,6,6,6,8,8,8,8,8,12,12,12,12,16,16,16,24,24,32,32 \
    --out "$LOGS/serve_long_tail.json" >"$LOGS/serve_long_tail.log" 2>&1
  echo "serve (long tail) exit $?" | tee -a "$LOG"
  tail -8 "$LOGS/serve_long_tail.log" | tee -a "$LOG"
  # the capture policy of the prompt groups' passes, one graph per key of slot shapes: every key at its first
  # call against the default above (at its third; on the CPU's count, 17 against 9 captures a run for ~9
  # fewer eager ops a step under depth): compare step_ms and captures
  stamp "serving: prompt-group slot shapes captured at their first call"
  timeout "$(within 100)" python3 -m benchmarks.serve --shape huginn --requests 48 --max-batch 8 \
    --schedulers token,depth --group-capture-at 1 --out "$LOGS/serve_capture_first.json" \
    >"$LOGS/serve_capture_first.log" 2>&1
  echo "serve (capture at first) exit $?" | tee -a "$LOG"
  tail -6 "$LOGS/serve_capture_first.log" | tee -a "$LOG"
  # a Coconut server at GPT-2 124M's shape (random weights, each request 0-6 thoughts): one pass a step, each
  # a captured pass (StepPassRunner; admitted prompts' chunks in a slot of bucketed shape) and the ended rows'
  # head pass captured (HeadsRunner); never run on a GPU before
  stamp "serving: a Coconut model, GPT-2 124M shape"
  timeout "$(within 100)" python3 -m benchmarks.serve --model builtin:coconut --shape gpt2 --requests 48 \
    --max-batch 8 --schedulers static,token,depth,depth+async --out "$LOGS/serve_coconut.json" \
    >"$LOGS/serve_coconut.log" 2>&1
  echo "serve (coconut) exit $?" | tee -a "$LOG"
  tail -8 "$LOGS/serve_coconut.log" | tee -a "$LOG" ;;
esac

case ",${GPU_EXTRA:-}," in *,fuzz,*)
  # bad input through the GPU's backend (auto: the fast path where it runs): every answer a result or a clear
  # error, never a CUDA failure or a 5xx (tools.fuzz; CPU runs found nothing since its fixes, 2026-12-07)
  stamp "bad input on the GPU: tools.fuzz, auto backend"
  timeout "$(within 90)" python3 -m tools.fuzz --seconds 60 --checks api,http --case-seconds 30 >"$LOGS/fuzz.log" 2>&1
  echo "fuzz exit $?" | tee -a "$LOG"
  grep -E "^FINDING|cases in" -A1 "$LOGS/fuzz.log" | head -12 | tee -a "$LOG" ;;
esac

case ",${GPU_EXTRA:-}," in *,train,*)
  # the trainers on the GPU (never run on one yet): bf16 weights under bf16 autocast anchored on fp32, the
  # published Coconut recipe's fp32 (no autocast) against the CPU's, then the CLI fine-tuning the built-in model
  # with the published recipe (bf16 weights, no autocast) and its micro-batches and loading the result
  stamp "training: bf16 on the GPU against fp32, and latentrt train"
  timeout 90 $PYTEST -q tests/test_train.py -k training_on_the_gpu >"$LOGS/train.log" 2>&1
  echo "train test exit $?" | tee -a "$LOG"
  grep -E "^E |^FAILED|Error" "$LOGS/train.log" | head -12 | tee -a "$LOG"
  python3 -c "from latentrt.train.data import generate_dataset, save_records; save_records(generate_dataset(64, (1, 2, 3)), '/tmp/lrt_train.json')"
  timeout 90 python3 -m latentrt.cli train builtin:recurrent /tmp/lrt_train.json --out /tmp/lrt_tuned --overwrite \
    --max-steps 4 --checkpoint-activations --log "$LOGS/train_log.jsonl" >>"$LOGS/train.log" 2>&1 &&
    timeout 60 python3 -m latentrt.cli generate /tmp/lrt_tuned "Alex is a wumpus. Is Alex a wumpus or rompus?" \
      --max-new-tokens 8 >>"$LOGS/train.log" 2>&1
  echo "latentrt train + generate exit $?" | tee -a "$LOG"
  tail -6 "$LOGS/train.log" | tee -a "$LOG" ;;
esac

if [ "$CUDA_BUILT" = 1 ] && command -v compute-sanitizer >/dev/null; then
  tools=${GPU_SANITIZE-memcheck racecheck}
  [ "$tools" = none ] && tools=""
  for tool in $tools; do
    budget=$(($(left) / 2))
    [ "$tool" = "${tools##* }" ] && budget=$(left)
    [ "$budget" -lt 20 ] && { stamp "no time left for $tool"; continue; }
    stamp "compute-sanitizer $tool (${budget}s)"
    LATENTRT_STREAM_WATCHDOG=0 timeout "$budget" compute-sanitizer --tool "$tool" --error-exitcode 9 python3 -m benchmarks.cuda_smoke --only "${SANITIZE// /,}" \
      >>"$LOGS/sanitizer.log" 2>&1
    echo "$tool exit $?" | tee -a "$LOGS/sanitizer.log" "$LOG"
    grep -E "ERROR SUMMARY|RACECHECK SUMMARY" "$LOGS/sanitizer.log" | tail -1 | tee -a "$LOG"
  done
fi
[ -n "${TRITON_CACHE_DIR:-}" ] &&
  echo "triton cache: $CARRIED_CACHE entries carried, $(($(cache_entries) - CARRIED_CACHE)) added on this machine" | tee -a "$LOG"
stamp "done"
echo "---- streamed loop tests"; grep -E "FAILED|ERROR" "$LOGS/gpu_tests_stream.log" 2>/dev/null | head -20
tail -15 "$LOGS/gpu_tests_stream.log" 2>/dev/null
echo "---- tests"; tail -25 "$LOGS/gpu_tests.log" 2>/dev/null
echo "---- benchmarks"; grep -E "^\| (ceilings|decode_|host_syncs)|best" "$LOGS/bench.log" 2>/dev/null | head -60
kill "$PACKER" 2>/dev/null
wait "$PACKER" 2>/dev/null
pack
rm -rf "$LOGS"
true
