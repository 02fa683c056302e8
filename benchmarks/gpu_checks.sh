#!/usr/bin/env bash
# The checks a lent GPU machine runs in one call (the device tool of ../.library/device):
# tests/gpu (every analyzer, diagnose(), train() with each method, Trainer recording, and a model
# split between GPU and CPU, each compared with the CPU), then the benchmarks with --device cuda.
# Each step gets its own time limit inside an overall deadline (one slow step cannot starve the
# rest); all output goes to $OUT/steps.log, with a status line per step and its key figures here.
#
# Here, first:   bash ../shared/tools/gpu-wheels.sh        (fills the git-ignored .whl/)
# On the device: run(command="bash benchmarks/gpu_checks.sh", carry=[".whl"], timeout_s=480)
# Dry run of the script itself on a CPU machine: GPU_CHECKS_DEVICE=cpu bash benchmarks/gpu_checks.sh
# Some steps only: GPU_CHECKS_ONLY="env tests patching"; another overall budget: GPU_CHECKS_SECONDS=300
set -u
OUT=${OUT:-/tmp/capwrap-gpu}
DEVICE=${GPU_CHECKS_DEVICE:-cuda}
DEADLINE=$(( $(date +%s) + ${GPU_CHECKS_SECONDS:-420} ))
mkdir -p "$OUT"
if [[ $DEVICE == cuda ]]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed"; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 CAPWRAP_TEST_DEVICE=$DEVICE
DEMO=/tmp/capwrap-gpu-demo
LOG=$OUT/steps.log
FIGURES='"(steps_per_second|record_seconds|speedup|speedup_vs_autograd_loop|overhead_percent|probe_forwards_percent|eap_over_train_step|max_abs_difference|seconds_[a-z_]+)"|passed|failed|rror|verdict'

step() {  # step NAME SECONDS COMMAND...: run it with the smaller of SECONDS and the time left
  local name=$1 limit=$2 left start rc
  shift 2
  if [[ -n ${GPU_CHECKS_ONLY:-} && " $GPU_CHECKS_ONLY " != *" $name "* ]]; then return; fi
  left=$(( DEADLINE - $(date +%s) ))
  (( left < limit )) && limit=$left
  if (( limit < 10 )); then echo "=== $name skipped: deadline" | tee -a "$LOG"; return; fi
  start=$(date +%s)
  timeout "$limit" "$@" >"/tmp/capwrap-gpu-$name.log" 2>&1
  rc=$?
  { echo "=== $name rc=$rc $(( $(date +%s) - start ))s (limit ${limit}s): $*"; cat "/tmp/capwrap-gpu-$name.log"; } >>"$LOG"
  echo "=== $name rc=$rc $(( $(date +%s) - start ))s (limit ${limit}s)"
  grep -E "$FIGURES" "/tmp/capwrap-gpu-$name.log" | grep -v Warning | tail -n 25
}

step env 60 bash -c 'nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; python3 -c "
import torch, transformers, capwrap
print(torch.__version__, transformers.__version__, capwrap.models.tl_version(), torch.cuda.is_available())"'
step tests 150 python3 -m pytest tests/gpu -q -p no:cacheprovider -o addopts="" -rA --junitxml="$OUT/tests.xml"
step demo 60 python3 -m capwrap demo --out "$DEMO" --device "$DEVICE" --no-diagnose --eval-size 512 --quiet
step patching 80 python3 benchmarks/patching.py --device "$DEVICE" --tuned "$DEMO/tuned"
step probing 150 python3 benchmarks/probing_batched.py --run "$DEMO/run" --device "$DEVICE"
step diagnose 100 python3 -m capwrap diagnose capwrap/assets/demo_base "$DEMO/tuned" --capability pcfg=count,operand=a \
  --downstream pcfg=count,operand=b,correlation=1 --quick --device "$DEVICE" --quiet --out "$OUT/diagnose"
step recording 70 python3 benchmarks/recording_overhead.py --device "$DEVICE" --steps 200 --repeats 3
step trainer 70 python3 benchmarks/trainer_recording_overhead.py --device "$DEVICE" --steps 200 --repeats 3
step trainer_background 70 python3 benchmarks/trainer_recording_overhead.py --device "$DEVICE" --steps 200 --repeats 3 \
  --background
step circuits 45 python3 benchmarks/circuits.py --device "$DEVICE" --only reference speed --repeats 15
step patching64 60 python3 benchmarks/patching.py --device "$DEVICE" --batch 64
step patching_big 60 python3 benchmarks/patching.py --device "$DEVICE" --memory-mb 4096
step store 30 python3 benchmarks/store_throughput.py
echo "=== done, $(( DEADLINE - $(date +%s) ))s before the deadline"
