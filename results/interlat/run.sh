#!/usr/bin/env bash
# Interlat evidence (issue 14): stage 1 (adapter + receiver LoRA), two stage-2 students (K = 4 and 16), then six
# held-out rows on ARC-Easy through `diffmas-eval reproduce`. Every step is resumable and no single command runs much
# more than 10 minutes: trainings are split with --stop_after_steps and resumed; evaluation pieces resume from their
# side-cars. Artefacts go to runs/interlat/ (not committed); train logs, manifests and results are copied here.
#
#   bash results/interlat/run.sh                    # everything, in order
#   bash results/interlat/run.sh train:stage1 eval:interlat   # selected parts
set -euo pipefail
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
export DIFFMAS_DATA_DIR=${DIFFMAS_DATA_DIR:-$(cd "$(dirname "$0")/../../.." && pwd)/shared/data}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
HERE=$ROOT/results/interlat
RUNS=runs/interlat  # relative to the repository (the configs name runs/interlat/stage1 so)
cd "$ROOT"

train() {  # name config: pieces of 8 steps, each resuming the last checkpoint
  local name=$1 config=$2 reached
  for stop in 8 16 24; do
    [ -f "$RUNS/$name/manifest.json" ] && break
    reached=$( (ls "$RUNS/$name/checkpoints" 2>/dev/null || true) | sed -n 's/^step-0*//p' | sort -n | tail -1)
    [ "${reached:-0}" -ge $stop ] && continue
    python -m diffmas_eval.training --config "$config" --output_dir "$RUNS/$name" --resume --stop_after_steps $stop
  done
  mkdir -p "$HERE/train/$name"
  cp "$RUNS/$name/manifest.json" "$RUNS/$name/train_log.jsonl" "$RUNS/$name/interlat_terms.jsonl" "$HERE/train/$name/"
}

evaluate() {  # run name in arc-easy.yaml
  python -m diffmas_eval reproduce "$HERE/arc-easy.yaml" --out "$HERE/eval" --only "$1" --no-report
}

run_part() {
  case $1 in
    train:stage1) train stage1 configs/train/interlat_arc_easy_stage1.yaml ;;
    train:stage2-k4) train stage2-k4 configs/train/interlat_arc_easy_stage2_k4.yaml ;;
    train:stage2-k16) train stage2-k16 configs/train/interlat_arc_easy_stage2_k16.yaml ;;
    eval:*) evaluate "${1#eval:}" ;;
    report) python -m diffmas_eval.reporting "$HERE/eval" --out "$HERE/eval/report" ;;
    *) echo "unknown part $1 (train:stage1, train:stage2-k4, train:stage2-k16, eval:RUN, report)" >&2; exit 2 ;;
  esac
}

PARTS=("$@")
[ ${#PARTS[@]} -gt 0 ] || PARTS=(train:stage1 train:stage2-k4 train:stage2-k16 eval:receiver-alone eval:text-plan
  eval:interlat eval:interlat-other-doc eval:interlat-k4 eval:interlat-k16 report)
for part in "${PARTS[@]}"; do run_part "$part"; done
