#!/usr/bin/env bash
# GSM8K on a GPU, weak-from-strong: Qwen2.5-7B-Instruct labels the candidates of Qwen2.5-1.5B-Instruct with ICM,
# and the 1.5B model is trained with LoRA-DPO on those labels, beside the same training on gold, zero-shot and
# random labels; accuracy on 500 held-out problems before and after, with 95% paired-bootstrap CIs.
#
#   bash examples/gsm8k-gpu.sh [OUT_DIR]
#
# Needs network for the Hub (models and `gsm8k`/`main`); a rerun skips finished stages. Rough cost on one H100:
# generation 2000 x 8 candidates and 5 evaluations of 500 problems are minutes; ICM labelling of ~12k claims with
# a 7B labeller dominates (plan it with `python bench/label_speed.py --cost-model`); each DPO arm is ~10 minutes.
# Several GPUs: run with --stop-after pairs, train each arm with `accelerate launch -m cli dpo` (docs/multi-gpu.md),
# then rerun this script to evaluate.
#
# Every setting can be overridden from the environment; tests/test_recipes.py runs this file at toy size on CPU.
set -euo pipefail
out=${1:-runs/gsm8k-gpu}
ICM=${ICM:-icm}
source_args=(--dataset gsm8k --dataset-config main --split train)
if [ -n "${QUESTIONS:-}" ]; then source_args=("$QUESTIONS"); fi
$ICM transfer "${source_args[@]}" \
  --labeller "${LABELLER:-Qwen/Qwen2.5-7B-Instruct}" --policy "${POLICY:-Qwen/Qwen2.5-1.5B-Instruct}" \
  --output-dir "$out" --limit "${LIMIT:-2000}" --eval-size "${EVAL_SIZE:-500}" \
  --arms "${ARMS:-icm,gold,zero_shot,random}" --claims candidates \
  --num-candidates "${NUM_CANDIDATES:-8}" --temperature 0.8 --max-new-tokens "${MAX_NEW_TOKENS:-512}" \
  --icm-batch-size 256 --icm-iterations "${ICM_ITERATIONS:-512}" \
  --pairs-strategy best-margin --max-per-question 2 \
  --max-steps "${MAX_STEPS:-300}" --batch-size "${BATCH_SIZE:-8}" --max-length "${MAX_LENGTH:-1024}" \
  --dtype "${DTYPE:-auto}"
