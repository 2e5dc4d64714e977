#!/usr/bin/env bash
# A short GPU check after runtime changes (one device call, ~3 minutes):
#   (1) bench/attention.py at N=1: our local attention against bare SDPA at 32K and 128K,
#   (2) bench/gpu_smoke.py on 4 GPUs (every algorithm, bf16, against SDPA's error),
#   (3) `seqshard demo` on 4 GPUs (both models against the single-device model).
# CHECK_STEPS (default "local smoke demo") picks steps. Needs .whl carried (ortools for the demo's planner). Writes $OUT/{attention-*,gpu_smoke.md,demo.log}.
set -uo pipefail
cd "$(dirname "$0")/.."
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
OUT=${OUT:-bench/results/check-$(date +%Y%m%d-%H%M%S)}; mkdir -p "$OUT"
python3 -m pip install -q --upgrade --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
run() { echo "== $1"; shift; timeout -k 10 200 "$@"; echo "== rc=$?"; }
steps=${CHECK_STEPS:-local smoke demo}
[[ $steps == *local* ]] && run "local attention, N=1" python3 -m torch.distributed.run --nproc-per-node 1 bench/attention.py \
  --out "$OUT" --ns 1 --seqs 32K,128K --headline-seq 32K --systems sdpa,ours-local --budget-s 90 \
  > "$OUT/local.log" 2>&1
[[ $steps == *local* ]] && grep -E "^\| (sdpa|ours-local) \| 1 \|" "$OUT"/attention-*.md | cut -d'|' -f2-13 | sort -u
[[ $steps == *smoke* ]] && run "smoke, 4 GPUs" python3 -m torch.distributed.run --nproc-per-node 4 bench/gpu_smoke.py \
  > "$OUT/smoke.log" 2>&1
[[ $steps == *smoke* ]] && cp "$(ls -t bench/results/gpu_smoke-*.md | head -1)" "$OUT/gpu_smoke.md" \
  && grep -c "| yes |" "$OUT/gpu_smoke.md" && grep "| no |" "$OUT/gpu_smoke.md"
# the demo starts its own 4 ranks (seqshard.testing.WorkerPool): no torchrun
[[ $steps == *demo* ]] && run "demo, 4 GPUs" python3 -m seqshard demo > "$OUT/demo.log" 2>&1
[[ $steps == *demo* ]] && grep -E "^ran the plan|^demo done|Error" "$OUT/demo.log" | tail -8
