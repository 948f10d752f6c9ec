#!/usr/bin/env bash
# The one script for a lent GPU (H100/H200, torch 2.11, no network). From the repository root:
#   bash benchmarks/gpu_check.sh            (OUT=folder for logs and JSON; the device tool sets it)
# Installs the project (building the CUDA extension when csrc/ has sources), runs the gpu-marked tests
# (kernels vs references in bf16 at full shapes, backends vs torch), compute-sanitizer on a small run of the
# CUDA path when it is built (the persistent latent loop included), then the benchmark harness (torch,
# triton with its CUDA-graph decode, cuda with both grid barriers). Designed to finish in under 9 minutes.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
start=$(date +%s)
stamp() { echo "[gpu_check +$(( $(date +%s) - start ))s] $*"; }

nvidia-smi -L | tee "$OUT/card.txt"
git rev-parse --short HEAD 2>/dev/null | tee "$OUT/commit.txt"

stamp "install (CUDA extension is built when nvcc and a GPU are present)"
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >"$OUT/install.log" 2>&1 \
  || { tail -30 "$OUT/install.log"; stamp "install FAILED"; }
python3 -c "import latentrt, importlib.util as u; print('cuda extension:', u.find_spec('latentrt._cuda') is not None)" \
  | tee -a "$OUT/install.log"

stamp "gpu tests"
timeout 200 python3 -m pytest -m gpu -q -rs -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log" | tail -25

if python3 -c "import latentrt._cuda" 2>/dev/null && command -v compute-sanitizer >/dev/null; then
  for tool in memcheck racecheck; do
    stamp "compute-sanitizer $tool"
    timeout 50 compute-sanitizer --tool "$tool" --error-exitcode 9 python3 -m benchmarks.cuda_smoke \
      >"$OUT/sanitizer_$tool.log" 2>&1; echo "$tool exit $?" | tee -a "$OUT/sanitizer_$tool.log"
  done
fi

stamp "benchmarks"
# the acceptance numbers first; every record is also appended to $OUT/results.jsonl as it is measured
timeout 200 python3 -m benchmarks.run --quick --only decode_recurrent,decode_coconut,host_syncs,micro --out "$OUT" 2>&1 | tee "$OUT/bench.log" | tail -60
stamp "done"
