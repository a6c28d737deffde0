#!/usr/bin/env bash
# GSM8K on a GPU, weak-from-strong: the recipe examples/gsm8k-gpu.yaml (Qwen2.5-7B-Instruct labels the candidates
# of Qwen2.5-1.5B-Instruct with ICM; the 1.5B model is trained with LoRA-DPO on them and on gold, zero-shot and
# random labels; accuracy on 500 held-out problems before and after, with 95% paired-bootstrap CIs).
#
#   bash examples/gsm8k-gpu.sh [OUT_DIR]
#
# Needs network for the Hub (models and `gsm8k`/`main`); a rerun skips finished stages. Rough cost on one H100:
# generation 2000 x 8 candidates and 5 evaluations of 500 problems are minutes; ICM labelling of ~12k claims with
# a 7B labeller dominates (plan it with `python bench/label_speed.py --cost-model`); each DPO arm is ~10 minutes.
# Several GPUs: run with --stop-after pairs, train each arm with `accelerate launch -m icm dpo` (docs/multi-gpu.md),
# then rerun this script to evaluate.
#
# Every setting can be overridden from the environment (QUESTIONS: a local questions file instead of the Hub
# dataset; LABELLER, POLICY, LIMIT, EVAL_SIZE, ARMS, NUM_CANDIDATES, MAX_NEW_TOKENS, ICM_ITERATIONS, MAX_STEPS,
# BATCH_SIZE, MAX_LENGTH, DTYPE); tests/test_recipes.py runs this file at toy size on CPU.
set -euo pipefail
out=${1:-runs/gsm8k-gpu}
ICM=${ICM:-icm}
args=(--config "$(dirname "$0")/gsm8k-gpu.yaml" --output-dir "$out")
if [ -n "${QUESTIONS:-}" ]; then args+=("$QUESTIONS" --dataset ''); fi  # a local file replaces the Hub dataset
for pair in LABELLER:--labeller POLICY:--policy LIMIT:--limit EVAL_SIZE:--eval-size ARMS:--arms \
            NUM_CANDIDATES:--num-candidates MAX_NEW_TOKENS:--max-new-tokens ICM_ITERATIONS:--icm-iterations \
            MAX_STEPS:--max-steps BATCH_SIZE:--batch-size MAX_LENGTH:--max-length DTYPE:--dtype; do
  var=${pair%%:*}
  if [ -n "${!var:-}" ]; then args+=("${pair#*:}" "${!var}"); fi
done
$ICM transfer "${args[@]}"
