"""Recipes and the console: the shipped recipes run as written (the GPU recipe at toy size on CPU), a run's
recipe.yaml reruns it exactly, recipe errors are one line, third-party output stays out of the console."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import warnings
from importlib.metadata import version

import datasets  # imported here, before any command: the switches below are flipped, not read at import
import pyarrow.parquet as pq
import pytest
import typer
import yaml
from conftest import ROOT
from huggingface_hub.utils import are_progress_bars_disabled
from transformers.utils import logging as hf_logging
from typer.testing import CliRunner

from icm.cli import app
from icm.data.console import quiet_libraries
from icm.data.recipes import read_recipe
from icm.data.tasks import arithmetic_questions

runner = CliRunner()


def command(name: str):
    return typer.main.get_command(app).get_command(None, name)


def labels_of(path) -> list[tuple]:
    table = pq.read_table(path)
    return list(zip(*(table.column(c).to_pylist() for c in ("choice", "icm_label", "icm_score"))))


@pytest.fixture
def claims(tmp_path):
    rows = [{"question": f"What is {i} + 1?", "choice": f"The answer is {i + 1 + j}.", "consistency_id": i,
             "consistency_key": str(i + 1 + j), "label": j == 0} for i in range(5) for j in range(2)]
    path = tmp_path / "claims.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_label_recipe_reruns_the_run_exactly(tiny_model_dir, tmp_path, claims):
    first = tmp_path / "a" / "labels.parquet"
    result = runner.invoke(app, ["label", str(claims), "-o", str(first), "-m", tiny_model_dir, "--iterations", "6",
                                 "--seed", "3", "--dtype", "fp32", "--hide-group"])
    assert result.exit_code == 0, result.output
    recipe_path = tmp_path / "a" / "labels.run" / "recipe.yaml"
    recipe = yaml.safe_load(recipe_path.read_text())
    assert recipe["input"] == str(claims) and recipe["model"] == tiny_model_dir
    assert recipe["iterations"] == 6 and recipe["seed"] == 3 and recipe["see_group"] is False
    assert "resume" not in recipe and "config" not in recipe and "quiet" not in recipe

    second = tmp_path / "b" / "labels.parquet"  # the recipe alone, with the output moved by a flag
    again = runner.invoke(app, ["label", "--config", str(recipe_path), "-o", str(second)])
    assert again.exit_code == 0, again.output
    assert labels_of(second) == labels_of(first)
    rerun = yaml.safe_load((tmp_path / "b" / "labels.run" / "recipe.yaml").read_text())
    assert rerun == recipe | {"output": str(second)}

    third = tmp_path / "c" / "labels.parquet"  # a flag overrides the file
    override = runner.invoke(app, ["label", "--config", str(recipe_path), "-o", str(third), "--iterations", "2",
                                   "--see-group", "-q"])
    assert override.exit_code == 0, override.output
    assert yaml.safe_load((tmp_path / "c" / "labels.run" / "recipe.yaml").read_text()) == recipe | {
        "output": str(third), "iterations": 2, "see_group": True}
    assert json.loads((tmp_path / "c" / "labels.run" / "run.json").read_text())["config"]["iterations"] == 2
    assert override.output.strip().splitlines()[-1].startswith("labelled 10 claims")  # -q: the result line only
    assert len(override.output.strip().splitlines()) == 1


@pytest.mark.parametrize("text, message", [
    ("iterations: 6\nfoo: 1\n", "unknown key 'foo' (icm label has no option --foo)"),
    ("iterations: many\n", "iterations: "),
    ("iterations: -1\n", "iterations: "),
    ("see-group: true\nhide_group: true\n", "hide_group: given twice (also as see-group)"),
    ("- iterations\n", "a recipe is a mapping"),
    ("iterations: [6\n", "not valid YAML at line 2"),
])
def test_recipe_errors_are_one_line_naming_the_file_and_key(tmp_path, claims, text, message):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(text)
    output = tmp_path / "labels.parquet"
    result = runner.invoke(app, ["label", str(claims), "-o", str(output), "--config", str(recipe)])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith(f"error: {recipe}: {message}"), lines
    assert not output.exists() and not output.with_suffix(".run").exists()


def test_transfer_recipe_sections(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("task: sentiment\nlabel:\n  iterations: 7\n  icm-batch-size: 64\ndpo: {max_steps: 3, "
                      "learning_rate: 5e-4, loss_type: 'sigmoid,sft', loss_weights: '1,0.5', seed: 3}\n"
                      "generate: {batch_size: 5}\npairs: {strategy: best-margin}\nno-lora: true\n")
    values = read_recipe(recipe, typer.Context(command("transfer")))
    assert values == {"task": "sentiment", "icm_iterations": 7, "icm_batch_size": 64, "max_steps": 3,
                      "learning_rate": "5e-4", "loss_type": "sigmoid,sft", "loss_weights": "1,0.5", "dpo_seed": 3,
                      "generation_batch_size": 5, "pairs_strategy": "best-margin", "lora": False}
    recipe.write_text("dpo: {temperature: 1.0}\n")  # an option of another stage
    result = runner.invoke(app, ["transfer", "--config", str(recipe)])
    assert result.exit_code == 2 and result.output.startswith(f"error: {recipe}: unknown key 'dpo.temperature'")


def test_gsm8k_gpu_recipe_runs_at_toy_size_and_its_recipe_reruns_it(tiny_model_dir, tmp_path):
    questions = tmp_path / "gsm8k.jsonl"  # GSM8K's shape: a worked answer ending in "#### N"
    questions.write_text("".join(json.dumps({"question": q.question, "answer": f"{q.solution}\n#### {q.reference}"})
                                 + "\n" for q in arithmetic_questions(5, seed=2)))
    env = {**os.environ, "ICM": f"{sys.executable} -m icm", "QUESTIONS": str(questions), "LABELLER": tiny_model_dir,
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
    recipe = yaml.safe_load((out / "recipe.yaml").read_text())  # the file's values, the environment's overrides
    assert recipe["questions"] == str(questions) and recipe["dataset"] == "" and recipe["dataset_config"] == "main"
    assert recipe["label"]["icm_iterations"] == 4 and recipe["pairs"]["pairs_strategy"] == "best-margin"
    assert recipe["dpo"]["max_steps"] == 1 and recipe["dpo"]["lora"] is True and recipe["arms"] == "icm,random"

    again = tmp_path / "again"  # the recipe reruns it: same split, evaluation and candidates
    rerun = runner.invoke(app, ["transfer", "--config", str(out / "recipe.yaml"), "-o", str(again),
                                "--stop-after", "generate"])
    assert rerun.exit_code == 0, rerun.output
    assert json.loads((again / "split.json").read_text()) == json.loads((out / "split.json").read_text())
    before, before_again = (json.loads((d / "eval_before.json").read_text()) for d in (out, again))
    assert before_again["results"] == before["results"] and before_again["accuracy"] == before["accuracy"]
    assert pq.read_table(again / "candidates.parquet").equals(pq.read_table(out / "candidates.parquet"))
    assert yaml.safe_load((again / "recipe.yaml").read_text()) == recipe | {"output_dir": str(again)}


def test_version_and_help_texts():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"icm {version('icm-dpo')}"
    for name in ("", "generate", "label", "pairs", "push", "dpo", "eval", "transfer"):
        text = runner.invoke(app, [name, "--help"] if name else ["--help"], env={"COLUMNS": "100"}).output
        assert "`" not in text and ":class:" not in text, name
        assert re.search(r"--version" if not name else r"--config\s+FILE\.yaml", text), name
    text = " ".join(runner.invoke(app, ["transfer", "--help"], env={"COLUMNS": "200"}).output.replace("│", " ").split())
    assert "[default: the task's, else 256]" in text  # help text in brackets is not eaten as markup


THIRD_PARTY = re.compile(r"Loading weights|it/s\]|examples/s\]|Warning|warnings\.warn|Tokenizing|de-quantizing")


def test_third_party_bars_and_warnings_stay_out_of_the_console(tiny_model_dir, tmp_path):
    from tqdm import tqdm

    switches = (datasets.is_progress_bar_enabled, hf_logging.is_progress_bar_enabled,
                lambda: not are_progress_bars_disabled(), lambda: not tqdm(range(3), file=io.StringIO()).disable)
    assert all(on() for on in switches)
    with quiet_libraries():  # the mechanism, in process: the libraries' bars are off, a warning is dropped ...
        with warnings.catch_warnings(record=True) as caught:
            warnings.warn("deprecated", FutureWarning, stacklevel=1)
        assert not caught and not any(on() for on in switches)
    assert all(on() for on in switches)  # ... and only inside the block

    pairs = tmp_path / "pairs.jsonl"  # ... and a real command, which triggers transformers' FutureWarnings,
    pairs.write_text("".join(json.dumps({"prompt": f"What is {i} + 2?", "chosen": f"{i + 2}", "rejected": f"{i}"})
                             + "\n" for i in range(2)))  # its "Loading weights" bar and datasets' map bars
    result = subprocess.run([sys.executable, "-m", "icm", "dpo", str(pairs), "-m", tiny_model_dir, "-o",
                             str(tmp_path / "policy"), "--max-steps", "1", "--batch-size", "2", "--max-length", "64",
                             "--precision", "fp32", "--save-steps", "0", "--gradient-checkpointing"], cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    console = result.stdout + result.stderr
    assert "trained 1 steps on 2 pairs" in console and "recipe:" in console
    assert not THIRD_PARTY.findall(console), console


def test_sentiment_demo_recipe_gives_one_answer_swapped_pair_per_training_question(tiny_model_dir, tmp_path):
    """The README's recipe on a questions file in the task's shape (the demo's second argument), at toy size:
    the policy's greedy answer and the same text with the other label word, so each training question gives
    exactly one pair, and the pair differs only in the answer."""
    from icm.data.tasks import sentiment_questions

    questions = tmp_path / "reviews.jsonl"
    questions.write_text("".join(json.dumps({"question": q.question, "answer": q.reference}) + "\n"
                                 for q in sentiment_questions(9, seed=3)))
    out = tmp_path / "run"
    result = runner.invoke(app, ["transfer", "--config", str(ROOT / "examples" / "sentiment-demo.yaml"),
                                 str(questions), "--task", "", "--extractor", "positive|negative",
                                 "--labeller", tiny_model_dir, "--policy", tiny_model_dir, "-o", str(out),
                                 "--limit", "9", "--eval-size", "3", "--train-size", "4", "--max-new-tokens", "6",
                                 "--arms", "gold", "--dtype", "fp32", "--stop-after", "pairs"])
    assert result.exit_code == 0, result.output
    split = json.loads((out / "split.json").read_text())
    assert len(split["train"]) == 4 and len(split["heldout"]) == 3
    pairs = pq.read_table(out / "arms" / "gold" / "pairs.parquet").to_pylist()
    answerable = {r["consistency_id"] for r in pq.read_table(out / "candidates.parquet").to_pylist()
                  if r["answer"]}  # a greedy answer with no label word has nothing to swap
    assert sorted(p["question_id"] for p in pairs) == sorted(str(cid) for cid in answerable)
    for pair in pairs:
        assert {pair["chosen_answer"], pair["rejected_answer"]} == {"positive", "negative"}
        assert pair["chosen_is_correct"] and not pair["rejected_is_correct"]
        swapped = re.sub("(?i)positive|negative", "X", pair["chosen"])
        assert swapped == re.sub("(?i)positive|negative", "X", pair["rejected"])
