#!/usr/bin/env bash
# NeuroMAS evidence on CPU: GRPO on the generated arithmetic task (`mas_arithmetic`), embedded SmolLM2-135M, bf16.
# Trains the 2x2 graph, the single-agent control (graph 0, about the same rollout-token budget), and optionally the
# 2x3 grown from the trained 2x2 against the 2x3 from scratch; then evaluates every condition on the first $LIMIT
# held-out problems through lm-eval (`diffmas-eval`), with the untrained graph, the single agent and TextMAS.
# Adapters go to $RUNS (not committed); their manifests and train/rollout logs are copied to runs/ here, lm-eval
# results to evals/. Idempotent and resumable: training runs in pieces of $PIECE steps (each its own process, well
# under 15 minutes on one core) resumed from the last checkpoint; finished evaluations are skipped.
#
#   bash results/neuromas/run.sh                             # the core parts (below)
#   bash results/neuromas/run.sh train:2x3-grown eval:2x3-grown train:2x3-scratch eval:2x3-scratch   # growth
#   python results/neuromas/summarize.py                     # figure, table, paired statistics
set -euo pipefail
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
RUNS=${RUNS:-$ROOT/runs/neuromas}
CONFIGS=$ROOT/configs/train
PYTHON=${PYTHON:-python}
LIMIT=${LIMIT:-100}
PIECE=${PIECE:-6}
# batch_invariant=false: the first evaluations ran before the mode existed (issue 18); every row keeps the same
# kernels and the same batch composition (the first $LIMIT problems at batch 16), so rows stay comparable.
MODEL="pretrained=smollm2-135m-instruct,dtype=bfloat16,batch_invariant=false"
mkdir -p "$RUNS" "$HERE/runs" "$HERE/evals"

last_step() {  # the newest complete checkpoint's step of run $1 (0 without one)
  local last
  last=$(ls -d "$RUNS/$1"/checkpoints/step-* 2>/dev/null | sort | tail -1)
  [ -n "$last" ] && echo $((10#${last##*step-})) || echo 0
}

train() {  # name config [extra diffmas-train args]: pieces of $PIECE steps until the artefact exists
  local name=$1 config=$2; shift 2
  while [ ! -f "$RUNS/$name/manifest.json" ]; do
    local stop=$(( $(last_step "$name") + PIECE ))
    "$PYTHON" -m diffmas_eval.training --config "$config" --output_dir "$RUNS/$name" --resume \
      --stop_after_steps "$stop" --progress false "$@"
  done
  mkdir -p "$HERE/runs/$name"
  cp "$RUNS/$name/manifest.json" "$RUNS/$name/train_log.jsonl" "$RUNS/$name/rollout_log.jsonl" "$HERE/runs/$name/"
}

evaluate() {  # condition model model_args
  local condition=$1 model=$2 args=$3
  if ! ls "$HERE/evals/$condition"/*/results_*.json >/dev/null 2>&1; then
    "$PYTHON" -m diffmas_eval --model "$model" --model_args "$MODEL,$args" --tasks mas_arithmetic --limit "$LIMIT" \
      --batch_size 16 --output_path "$HERE/evals/$condition" --log_samples
  fi
}

run_part() {
  case $1 in
    train:2x2) train 2x2 "$CONFIGS/neuromas_arith_2x2.yaml" ;;
    train:single) train single "$CONFIGS/neuromas_arith_single.yaml" ;;
    # grown: 2x2's 24 steps plus 12 as 2x3; from scratch: 2x3 for about as many rollout tokens (32 steps)
    train:2x3-grown) train 2x2 "$CONFIGS/neuromas_arith_2x2.yaml"
      train 2x3-grown "$CONFIGS/neuromas_arith_2x3.yaml" --grow_from "$RUNS/2x2" --max_steps 12 ;;
    train:2x3-scratch) train 2x3-scratch "$CONFIGS/neuromas_arith_2x3.yaml" --max_steps 32 ;;
    eval:single-agent) evaluate single-agent single-agent "" ;;
    eval:text-mas) evaluate text-mas text-mas "max_new_tokens=24" ;;
    eval:untrained-2x2) evaluate untrained-2x2 neuromas "graph=2x2,max_new_tokens=24" ;;
    eval:2x2) evaluate 2x2 neuromas "adapters=$RUNS/2x2,max_new_tokens=24" ;;
    eval:single) evaluate single neuromas "adapters=$RUNS/single" ;;
    eval:2x3-grown) evaluate 2x3-grown neuromas "adapters=$RUNS/2x3-grown,max_new_tokens=24" ;;
    eval:2x3-scratch) evaluate 2x3-scratch neuromas "adapters=$RUNS/2x3-scratch,max_new_tokens=24" ;;
    *) echo "unknown part $1 (train:NAME or eval:CONDITION)" >&2; exit 2 ;;
  esac
}

PARTS=("$@")
[ ${#PARTS[@]} -gt 0 ] || PARTS=(eval:untrained-2x2 eval:single-agent eval:text-mas train:2x2 eval:2x2 train:single
  eval:single)
for part in "${PARTS[@]}"; do run_part "$part"; done
