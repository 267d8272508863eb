#!/usr/bin/env bash
# The real run: train DiffMAS (coupled), DiffMAS (frozen trace) and the LoRA single agent on 256 letter-balanced
# ARC-Easy train items, then evaluate them and the untrained LatentMAS / single agent on the first 300 ARC-Easy test
# items (letter scoring). Adapters go to $RUNS (not committed); their diffmas_adapter.json, train logs and the scores
# are copied here. Idempotent and resumable: finished parts are skipped, an interrupted training resumes.
#
#   bash results/training/run.sh                      # everything
#   bash results/training/run.sh train:diffmas eval:diffmas   # only these parts (run two shells on two cores)
set -euo pipefail
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
export DIFFMAS_DATA_DIR=${DIFFMAS_DATA_DIR:-$(cd "$(dirname "$0")/../../.." && pwd)/shared/data}
RUNS=${RUNS:-$(cd "$(dirname "$0")/../.." && pwd)/runs/training}
HERE=$(cd "$(dirname "$0")" && pwd)
CONFIGS=$HERE/../../configs/train
LIMIT=300
mkdir -p "$RUNS" "$HERE/scores" "$HERE/adapters"

train() {  # name config: the first piece stops at step 16, the second resumes (the run is split on purpose)
  local name=$1 config=$2
  if [ ! -f "$RUNS/$name/diffmas_adapter.json" ]; then
    python -m diffmas_eval.training --config "$config" --output_dir "$RUNS/$name" --resume --stop_after_steps 16
    python -m diffmas_eval.training --config "$config" --output_dir "$RUNS/$name" --resume
  fi
  mkdir -p "$HERE/adapters/$name"
  cp "$RUNS/$name/diffmas_adapter.json" "$RUNS/$name/train_log.jsonl" "$HERE/adapters/$name/"
}

evaluate() {  # condition [adapter]
  local condition=$1; shift
  [ -f "$HERE/scores/$condition.json" ] || \
    python "$HERE/eval_heldout.py" --condition "$condition" --limit $LIMIT --out "$HERE/scores/$condition.json" "$@"
}

run_part() {
  case $1 in
    train:diffmas) train diffmas "$CONFIGS/arc_easy_diffmas.yaml" ;;
    train:diffmas-frozen) train diffmas-frozen "$CONFIGS/arc_easy_frozen.yaml" ;;
    train:single-agent-lora) train single-agent-lora "$CONFIGS/arc_easy_single.yaml" ;;
    eval:single-agent) evaluate single-agent ;;
    eval:latent-mas) evaluate latent-mas ;;
    eval:single-agent-lora) train single-agent-lora "$CONFIGS/arc_easy_single.yaml"
      evaluate single-agent-lora --adapter "$RUNS/single-agent-lora" ;;
    eval:diffmas) train diffmas "$CONFIGS/arc_easy_diffmas.yaml"; evaluate diffmas --adapter "$RUNS/diffmas" ;;
    eval:diffmas-frozen) train diffmas-frozen "$CONFIGS/arc_easy_frozen.yaml"
      evaluate diffmas-frozen --adapter "$RUNS/diffmas-frozen" ;;
    *) echo "unknown part $1 (train:NAME or eval:CONDITION)" >&2; exit 2 ;;
  esac
}

PARTS=("$@")
[ ${#PARTS[@]} -gt 0 ] || PARTS=(train:diffmas train:diffmas-frozen train:single-agent-lora eval:single-agent
  eval:single-agent-lora eval:latent-mas eval:diffmas eval:diffmas-frozen)
for part in "${PARTS[@]}"; do run_part "$part"; done
