#!/usr/bin/env bash
# The GPU machine's whole job for issue 6, in one command (the device tool's command line stays short).
#
#   bash bench/run_gpu.sh probe   # (a) GPUs and versions, (b) GPU unit tests, (c) smoke on 2 and 4
#                                 # GPUs, (d) bench/attention.py --quick (headline + accuracy),
#                                 # (e) bench/predict_vs_measure.py in the time left
#   bash bench/run_gpu.sh full    # bench/attention.py, everything its budget allows
#   bash bench/run_gpu.sh all     # probe's (a)-(c), then the full benchmark in what time is left
#   bash bench/run_gpu.sh diagnose  # (f) a profile of one step, (g) seqshard calibrate, (h)
#                                   # predict_vs_measure with the calibrated cluster
#   bash bench/run_gpu.sh dev     # (a) versions, (c) smoke on 4 GPUs, (f) a profile of one step
#                                 # (DEV_SMOKE=0 skips (c); DEV_PROFILE_ARGS; DEV_NCCL_CTAS="8 16"
#                                 # profiles again under NCCL_MAX_CTAS; DEV_OVERLAP=1 first runs
#                                 # (o) bench/overlap.py, then its exchange part again under each
#                                 # NAME=VALUE of DEV_OVERLAP_ENVS; DEV_ATTENTION_ARGS="--quick ..."
#                                 # ends with (d) bench/attention.py with those arguments)
#
# Needs .whl (ortools, DeepSpeed's pure-Python needs) and .ds (DeepSpeed built with DS_BUILD_OPS=0)
# carried; bench/README.md says how they are made. Everything it prints goes to $OUT/run_gpu.log;
# results land in $OUT (at most 6 files: the device tool brings back 8). Each step has a timeout and the whole run stays under
# RUN_GPU_LIMIT_S (default 570 s = 9.5 minutes). If the benchmark dies (a hang trips its watchdog),
# it is started again with --resume while time is left, skipping what is already recorded.
# Environment: OUT (default bench/results/run-<time>), NPROC (4), RUN_GPU_LIMIT_S (570),
# ATTENTION_BUDGET_S (420: the benchmark's own budget, capped by the time left), ATTENTION_ARGS
# (extra arguments for bench/attention.py).
set -uo pipefail
MODE=${1:-probe}
case "$MODE" in probe|full|all|diagnose|dev) ;; *) echo "usage: $0 probe|full|all|diagnose|dev" >&2; exit 2 ;; esac
cd "$(dirname "$0")/.."
START=$(date +%s)
LIMIT=${RUN_GPU_LIMIT_S:-570}
OUT=${OUT:-bench/results/run-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
LOG="$OUT/run_gpu.log"
NPROC=${NPROC:-4}

# NVLink multicast stays off on the lent machines (KINDS.md); keep it off in every child too.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}

left() { echo $(( LIMIT - ($(date +%s) - START) )); }

# step NAME MAX_SECONDS CMD...: run CMD under a timeout of at most MAX_SECONDS and of what is left
step() {
  local name=$1 max=$2; shift 2
  local t; t=$(( $(left) - 10 )); (( t > max )) && t=$max
  if (( t < 20 )); then echo "== $name: SKIPPED (no time left)"; return 124; fi
  echo "== $name [timeout ${t}s, t+$(( $(date +%s) - START ))s]: $*"
  timeout -k 10 "$t" "$@"; local rc=$?
  echo "== $name: rc=$rc [t+$(( $(date +%s) - START ))s]"
  return $rc
}

versions() {
  step "a. GPUs" 30 nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  step "a. topology" 30 nvidia-smi topo -m
  step "a. versions" 120 python3 - <<'EOF'
import torch, sys
print("python", sys.version.split()[0], "| torch", torch.__version__, "| cuda", torch.version.cuda, "| cuDNN", torch.backends.cudnn.version(), "| NCCL", torch.cuda.nccl.version())
print("GPUs", torch.cuda.device_count(), torch.cuda.get_device_name(0), "| sm", torch.cuda.get_device_capability(0), "| flash SDPA", torch.backends.cuda.is_flash_attention_available())
from seqshard.runtime import backend_report, select_backend
print("seqshard local backend:", select_backend("cuda", torch.bfloat16, 128), backend_report("cuda", torch.bfloat16, 128))
import ortools; print("ortools", ortools.__version__)
import deepspeed; from deepspeed.sequence.layer import DistributedAttention; print("deepspeed", deepspeed.__version__, "accelerator", deepspeed.get_accelerator()._name)
EOF
}

probe() {
  versions
  step "b. GPU unit tests" 180 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_runtime_backends.py
  local marker; marker=$(mktemp)
  step "c. smoke, 2 GPUs" 150 python3 -m torch.distributed.run --nproc-per-node 2 bench/gpu_smoke.py
  if (( NPROC >= 4 )); then
    step "c. smoke, 4 GPUs" 150 python3 -m torch.distributed.run --nproc-per-node 4 bench/gpu_smoke.py
  fi
  # one file for all smoke reports ($OUT keeps at most 8 files)
  local smoke; smoke=$(find bench/results -maxdepth 1 -name 'gpu_smoke-*.md' -newer "$marker" | sort)
  [[ -n "$smoke" ]] && cat $smoke > "$OUT/gpu_smoke.md"
  python3 - "$OUT/gpu_smoke.json" $(find bench/results -maxdepth 1 -name 'gpu_smoke-*.json' -newer "$marker" | sort) <<'EOF'
import json, sys
out, files = sys.argv[1], sys.argv[2:]
if files:
    json.dump([json.load(open(f)) for f in files], open(out, "w"), indent=1)
EOF
  rm -f "$marker"
}

# attention EXTRA_ARGS...: the benchmark, started again with --resume while it fails and time is left
attention() {
  local tries=0 rc=1 resume=()
  while (( tries < 3 )); do
    local budget=$(( $(left) - 75 ))
    if (( budget < 60 )); then echo "== d. attention: no time left for another start"; break; fi
    (( budget > ${ATTENTION_BUDGET_S:-420} )) && budget=${ATTENTION_BUDGET_S:-420}
    step "d. attention (try $(( tries + 1 )))" $(( budget + 70 )) \
      python3 -m torch.distributed.run --nproc-per-node "$NPROC" --master-port $(( 29611 + tries )) \
      bench/attention.py \
      --out "$OUT" --budget-s "$budget" "${resume[@]}" "$@" ${ATTENTION_ARGS:-}
    rc=$?
    (( rc == 0 )) && break
    resume=(--resume); tries=$(( tries + 1 ))
  done
  return $rc
}

# predict: bench/predict_vs_measure.py (issue 5) in what is left, at most PREDICT_BUDGET_S
predict() {
  local budget=$(( $(left) - 70 )); (( budget > ${PREDICT_BUDGET_S:-150} )) && budget=${PREDICT_BUDGET_S:-150}
  if (( budget < 40 )); then echo "== e. predict vs measure: SKIPPED (no time left)"; return 124; fi
  step "e. predict vs measure" $(( budget + 60 )) \
    python3 -m torch.distributed.run --nproc-per-node "$NPROC" --master-port 29700 \
    bench/predict_vs_measure.py --out "$OUT" --budget-s "$budget"
}

# diagnose: a profile of one step (bench/profile_step.py), a calibration of this machine
# (seqshard calibrate), and predict_vs_measure with the calibrated cluster
diagnose() {
  step "f. profile one step" 200 python3 -m torch.distributed.run --nproc-per-node "$NPROC" \
    --master-port 29710 bench/profile_step.py --out "$OUT"
  step "g. calibrate" 200 python3 -m torch.distributed.run --nproc-per-node "$NPROC" \
    --master-port 29720 -m seqshard calibrate --out "$OUT/calibrated-h200x$NPROC.json"
  if [[ -f "$OUT/calibrated-h200x$NPROC.json" ]]; then
    local budget=$(( $(left) - 70 )); (( budget > ${PREDICT_BUDGET_S:-150} )) && budget=${PREDICT_BUDGET_S:-150}
    step "h. predict vs measure (calibrated)" $(( budget + 60 )) \
      python3 -m torch.distributed.run --nproc-per-node "$NPROC" --master-port 29730 \
      bench/predict_vs_measure.py --out "$OUT" --budget-s "$budget" \
      --cluster "$OUT/calibrated-h200x$NPROC.json"
  fi
}

main() {
  echo "== run_gpu.sh $MODE, limit ${LIMIT}s, out $OUT, $(date -u +%FT%TZ)"
  if compgen -G ".whl/*.whl" > /dev/null; then
    step "wheels" 120 python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
      --upgrade --target /tmp/site .whl/*.whl
  fi
  export PYTHONPATH="$PWD:/tmp/site:$PWD/.ds${PYTHONPATH:+:$PYTHONPATH}"
  case "$MODE" in
    probe) probe; attention --quick; predict ;;
    full)  export TORCH_NCCL_HIGH_PRIORITY=${TORCH_NCCL_HIGH_PRIORITY:-1}; attention ;;
    all)   probe; attention ;;
    diagnose) diagnose ;;
    dev)   versions
           if [[ ${DEV_OVERLAP:-0} == 1 ]]; then
             step "o. overlap" 200 python3 -m torch.distributed.run --nproc-per-node 4 \
               --master-port 29705 bench/overlap.py --out "$OUT"
             for env in ${DEV_OVERLAP_ENVS:-}; do  # NAME=VALUE: the exchange alone under NCCL settings
               step "o. exchange, $env" 90 env "$env" python3 -m torch.distributed.run \
                 --nproc-per-node 4 --master-port 29706 bench/overlap.py --out "$OUT" \
                 --exchange-only --tag="-${env%%=*}"
             done
           fi
           if [[ ${DEV_SMOKE:-1} == 1 ]]; then
             step "c. smoke, 4 GPUs" 150 python3 -m torch.distributed.run --nproc-per-node 4 \
               bench/gpu_smoke.py
             cp $(ls -t bench/results/gpu_smoke-*.md | head -1) "$OUT/gpu_smoke.md"
             step "b. GPU unit tests" 120 python3 -m pytest -q -m gpu -p no:cacheprovider \
               tests/test_runtime_merge.py
           fi
           step "f. profile one step" 240 python3 -m torch.distributed.run --nproc-per-node 4 \
             --master-port 29710 bench/profile_step.py --out "$OUT" ${DEV_PROFILE_ARGS:-}
           for ctas in ${DEV_NCCL_CTAS:-}; do
             step "f. profile, NCCL_MAX_CTAS=$ctas" 120 \
               env NCCL_MAX_CTAS=$ctas NCCL_MAX_P2P_NCHANNELS=$ctas python3 -m \
               torch.distributed.run --nproc-per-node 4 --master-port 29711 bench/profile_step.py \
               --out "$OUT" --systems=ring,ulysses_nccl --tag="-ctas$ctas"
           done
           if [[ -n ${DEV_ATTENTION_ARGS:-} ]]; then
             export TORCH_NCCL_HIGH_PRIORITY=${TORCH_NCCL_HIGH_PRIORITY:-1}
             attention $DEV_ATTENTION_ARGS
           fi ;;
  esac
  local rc=$?
  echo "== done: rc=$rc after $(( $(date +%s) - START ))s; files in $OUT:"; ls -la "$OUT"
  # the headline, accuracy and 512K tables, for the device tool's output tail
  local md; md=$(ls -t "$OUT"/attention-*.md 2>/dev/null | head -1)
  [[ -n "$md" ]] && sed -n '/^## Headline/,/^## All configs/p' "$md" | cut -c1-300
  return $rc
}

main 2>&1 | tee -a "$LOG"
