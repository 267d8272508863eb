#!/usr/bin/env bash
# The adapters of the Qwen leaderboard (issue 16, results/qwen-cpu.yaml): DiffMAS (coupled trace), DiffMAS (frozen
# trace) and the LoRA single-agent control, each trained on the same 268 items of the four domains' train splits with
# the same steps and optimizer (configs/train/qwen_{diffmas,frozen,single}.yaml), on Qwen2.5-Coder-0.5B-Instruct, bf16.
# Adapters go to $RUNS (runs/qwen/ by default, where the leaderboard config reads them; weights are not committed);
# their manifests and train logs are copied to adapters/ here. Resumable: each run trains in pieces of $PIECE steps,
# each piece its own process resumed from the last checkpoint (a piece stays well under an hour on one core);
# a finished run is skipped.
#
#   bash results/qwen-cpu-train/run.sh                         # the three m = 0 runs
#   bash results/qwen-cpu-train/run.sh diffmas-m10             # DiffMAS at m = 10 (configs/train/qwen_diffmas_m10.yaml)
#   bash results/qwen-cpu-train/run.sh diffmas                 # one (diffmas, diffmas-frozen, single-agent-lora)
#   PIECE=4 MAX_PIECES=1 bash results/qwen-cpu-train/run.sh diffmas   # one piece, then stop (resume later)
#   RUNS=runs/qwen-r2 ADAPTERS=results/qwen-cpu-train/adapters/r2 bash results/qwen-cpu-train/run.sh diffmas
#                                                              # a retraining round beside the first (rows *-r2)
# Then evaluate the rows through the leaderboard:
#   diffmas-eval reproduce results/qwen-cpu.yaml --only diffmas,diffmas-frozen,single-agent-lora --tasks ...
set -euo pipefail
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
export DIFFMAS_DATA_DIR=${DIFFMAS_DATA_DIR:-$(cd "$ROOT/.." && pwd)/shared/data}
RUNS=$(realpath -m "${RUNS:-$ROOT/runs/qwen}")
ADAPTERS=$(realpath -m "${ADAPTERS:-$HERE/adapters}")  # where the manifests and logs are copied (a retraining round: its own folder)
PYTHON=${PYTHON:-python}
PIECE=${PIECE:-8}
MAX_PIECES=${MAX_PIECES:-1000}

last_step() {  # the newest complete checkpoint's step of run $1 (0 without one)
  local last
  last=$(ls -d "$RUNS/$1"/checkpoints/step-* 2>/dev/null | sort | tail -1)
  [ -n "$last" ] && echo $((10#${last##*step-})) || echo 0
}

train() {  # name config
  local name=$1 config=$2 pieces=0
  while [ ! -f "$RUNS/$name/manifest.json" ] && [ "$pieces" -lt "$MAX_PIECES" ]; do
    local from started
    from=$(last_step "$name") started=$(date +%s)
    "$PYTHON" -m diffmas_eval.training --config "$config" --output_dir "$RUNS/$name" --resume \
      --stop_after_steps $((from + PIECE)) --progress false
    # Wall time per piece (model loading included): the training records its own cost (this session's README times
    # predate it and come from the session's clock).
    printf '{"from_step": %d, "to_step": %d, "seconds": %d, "omp_num_threads": "%s", "cpu": "%s"}\n' \
      "$from" "$(last_step "$name")" $(($(date +%s) - started)) "${OMP_NUM_THREADS:-}" \
      "$(grep -m1 'model name' /proc/cpuinfo 2>/dev/null | cut -d: -f2 | xargs)" >> "$RUNS/$name/pieces.jsonl"
    pieces=$((pieces + 1))
  done
  mkdir -p "$ADAPTERS/$name"
  cp "$RUNS/$name/train_log.jsonl" "$ADAPTERS/$name/"
  [ -f "$RUNS/$name/pieces.jsonl" ] && cp "$RUNS/$name/pieces.jsonl" "$ADAPTERS/$name/"
  [ -f "$RUNS/$name/manifest.json" ] && cp "$RUNS/$name/manifest.json" "$ADAPTERS/$name/"
  # The manifest records this machine's output path: keep it relative to the repo (tests refuse absolute paths).
  (cd "$ROOT" && "$PYTHON" -m diffmas_eval.portable "$ADAPTERS/$name" >/dev/null)
  return 0
}

PARTS=("$@")
[ ${#PARTS[@]} -gt 0 ] || PARTS=(diffmas single-agent-lora diffmas-frozen)
for part in "${PARTS[@]}"; do
  case $part in
    diffmas) train diffmas "$ROOT/configs/train/qwen_diffmas.yaml" ;;
    diffmas-frozen) train diffmas-frozen "$ROOT/configs/train/qwen_frozen.yaml" ;;
    diffmas-m10) train diffmas-m10 "$ROOT/configs/train/qwen_diffmas_m10.yaml" ;;
    single-agent-lora) train single-agent-lora "$ROOT/configs/train/qwen_single.yaml" ;;
    *) echo "unknown run $part (diffmas, diffmas-frozen, diffmas-m10 or single-agent-lora)" >&2; exit 2 ;;
  esac
done
