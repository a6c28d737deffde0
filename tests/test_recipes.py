"""The shipped recipes run as written: the GPU recipe (examples/gsm8k-gpu.sh) at toy size on CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import ROOT

from data.tasks import arithmetic_questions


def test_gsm8k_gpu_recipe_runs_at_toy_size(tiny_model_dir, tmp_path):
    questions = tmp_path / "gsm8k.jsonl"  # GSM8K's shape: a worked answer ending in "#### N"
    questions.write_text("".join(json.dumps({"question": q.question, "answer": f"{q.solution}\n#### {q.reference}"})
                                 + "\n" for q in arithmetic_questions(5, seed=2)))
    env = {**os.environ, "ICM": f"{sys.executable} -m cli", "QUESTIONS": str(questions), "LABELLER": tiny_model_dir,
           "POLICY": tiny_model_dir, "LIMIT": "5", "EVAL_SIZE": "2", "ARMS": "icm,random", "NUM_CANDIDATES": "2",
           "MAX_NEW_TOKENS": "8", "ICM_ITERATIONS": "4", "MAX_STEPS": "1", "BATCH_SIZE": "2", "MAX_LENGTH": "384",
           "DTYPE": "fp32", "OMP_NUM_THREADS": "1"}
    out = tmp_path / "run"
    result = subprocess.run(["bash", str(ROOT / "examples" / "gsm8k-gpu.sh"), str(out)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    report = json.loads((out / "transfer.json").read_text())
    assert report["held_out"] == 2 and set(report["arms"]) == {"icm", "random"}
    assert report["questions"]["source"] == str(questions)
    assert json.loads((out / "icm" / "run.json").read_text())["claims_mode"] == "candidates"
