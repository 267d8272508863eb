#!/usr/bin/env bash
# The real run: train DiffMAS (coupled), DiffMAS (frozen trace) and the LoRA single agent on 64 ARC-Easy train items,
# then evaluate them and the untrained LatentMAS / single agent on the first 120 ARC-Easy test items (letter scoring).
# Adapters go to $RUNS (not committed); their diffmas_adapter.json, train logs and the scores are copied here.
set -euo pipefail
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
export DIFFMAS_DATA_DIR=${DIFFMAS_DATA_DIR:-/work/shared/data}
RUNS=${RUNS:-$(cd "$(dirname "$0")/../.." && pwd)/runs/training}
HERE=$(cd "$(dirname "$0")" && pwd)
CONFIGS=$HERE/../../configs/train
mkdir -p "$RUNS" "$HERE/scores" "$HERE/adapters"

train() {  # name config [extra args]: first piece stops at step 8, the second resumes (the run is split on purpose)
  local name=$1 config=$2
  if [ ! -f "$RUNS/$name/diffmas_adapter.json" ]; then
    python -m diffmas_eval.training --config "$config" --output_dir "$RUNS/$name" --resume --stop_after_steps 8
    python -m diffmas_eval.training --config "$config" --output_dir "$RUNS/$name" --resume
  fi
  mkdir -p "$HERE/adapters/$name"
  cp "$RUNS/$name/diffmas_adapter.json" "$RUNS/$name/train_log.jsonl" "$HERE/adapters/$name/"
}

evaluate() {  # condition [adapter]
  local condition=$1; shift
  [ -f "$HERE/scores/$condition.json" ] || \
    python "$HERE/eval_heldout.py" --condition "$condition" --limit 120 --out "$HERE/scores/$condition.json" "$@"
}

train diffmas "$CONFIGS/arc_easy_diffmas.yaml"
train diffmas-frozen "$CONFIGS/arc_easy_frozen.yaml"
train single-agent-lora "$CONFIGS/arc_easy_single.yaml"
evaluate single-agent
evaluate single-agent-lora --adapter "$RUNS/single-agent-lora"
evaluate latent-mas
evaluate diffmas --adapter "$RUNS/diffmas"
evaluate diffmas-frozen --adapter "$RUNS/diffmas-frozen"
