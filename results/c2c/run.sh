#!/usr/bin/env bash
# C2C evidence (issue 13), in resumable pieces, each one short process:
#   bash results/c2c/run.sh train            # the fuser, in pieces of 64 steps (resumes; runs/c2c/fuser-384, not committed)
#   bash results/c2c/run.sh eval RUN TASK    # one evaluation piece of results/c2c-cpu.yaml (skipped when finished)
#   bash results/c2c/run.sh eval-all         # every piece, one after another
#   bash results/c2c/run.sh summary          # the report and results/c2c/summary.md
# Run from anywhere; it works in the repository root.
set -euo pipefail
cd "$(dirname "$0")/../.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
export DIFFMAS_DATA_DIR=${DIFFMAS_DATA_DIR:-../shared/data}
CONFIG=configs/train/c2c_qwen_coder_arc_obqa_384.yaml
FUSER=runs/c2c/fuser-384
RUNS=(receiver sharer t2t c2c c2c-other-doc)
TASKS=(mas_arc_challenge_mc mas_openbookqa_mc)

train() {
  local step
  for step in 64 128 192 256 320 384; do
    [ -f "$FUSER/manifest.json" ] && break
    python -m diffmas_eval.training --config "$CONFIG" --output_dir "$FUSER" --resume --stop_after_steps "$step"
  done
  mkdir -p results/c2c/fuser
  cp "$FUSER/manifest.json" "$FUSER/fuser_config.json" "$FUSER/train_log.jsonl" results/c2c/fuser/
}

case ${1:-} in
  train) train ;;
  eval) diffmas-eval reproduce results/c2c-cpu.yaml --only "$2" --tasks "$3" --no-report ;;
  eval-all) for task in "${TASKS[@]}"; do for run in "${RUNS[@]}"; do "$0" eval "$run" "$task"; done; done ;;
  summary)
    diffmas-report results/c2c-cpu --out results/c2c-cpu/report
    python results/c2c/summarize.py --results results/c2c-cpu --fuser "$FUSER" --out results/c2c/summary.md ;;
  *) echo "usage: $0 train | eval RUN TASK | eval-all | summary" >&2; exit 2 ;;
esac
