"""Issue 27: the siblings of the fuzz table of test_reliability.py, for every command and each of its file inputs,
outputs and option values: FIFOs, devices, directories, symbolic link loops and broken links, an output that is an
input or a state file by another spelling (``./x``, ``../dir/x``, a hard link, a symbolic link), damaged state
files, numbers beyond what a reader converts, NaN, infinities, negative and zero values, empty strings.

Each case must exit 2 with one line and no traceback, before any model loads (the model does not exist), and leave
every file that was there byte-identical. A case that would hang (a FIFO read) fails after a minute instead."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pytest

from icm.data.io import read_records
from tests.test_reliability import (
    CLAIM,
    LABELLED,
    NO_MODEL,
    PAIR,
    Files,
    assert_one_line_error,
    invoke,
    jsonl,
    make_files,
    parquet,
    snapshot,
)

QUESTION = {"question": "What is 2 + 3?", "answer": "5"}
HUGE = "1" * 5000  # beyond Python's 4,300-digit conversion limit


def fifo(path: Path) -> None:
    os.mkfifo(path)


def loop(path: Path) -> None:
    path.symlink_to(path.name)


def broken(path: Path) -> None:
    path.symlink_to(path.name + ".nowhere")


def directory(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)


def link_to(target: str) -> Callable[[Path], None]:
    """A symbolic link to ``target`` (absolute, or a name in the same directory)."""
    return lambda path: path.symlink_to(target)


def hard_link_to(name: str) -> Callable[[Path], None]:
    return lambda path: os.link(path.parent / name, path)


def labels_parquet() -> bytes:
    rows = [LABELLED, LABELLED | {"choice": "The answer is 6.", "answer": "6", "icm_label": False, "icm_score": -1.0}]
    return parquet(pa.Table.from_pylist(rows))


def adapter_dir(config: str) -> dict[str, str | Callable[[Path], None]]:
    return {"policy": directory, "policy/adapter_config.json": config,
            "policy/adapter_model.safetensors": "not read before the config"}


def transfer_run(**files: str | Callable[[Path], None]) -> dict[str, str | Callable[[Path], None]]:
    """A transfer run directory ``run/`` holding ``files`` (by name), next to a good questions file."""
    return {"q.jsonl": jsonl(*[QUESTION | {"question": f"What is {k} + 3?", "answer": str(k + 3)} for k in range(8)]),
            "run": directory, **{f"run/{name}": content for name, content in files.items()}}


TRANSFER = "transfer {d}/q.jsonl -o {d}/run --labeller {m} --policy {m} --eval-size 2"
LABEL, GENERATE, PAIRS = "label {d}/c.jsonl -o {d}/out.parquet", "generate {d}/q.jsonl -o {d}/out.parquet", \
    "pairs {d}/l.jsonl -o {d}/p.parquet"
DPO, EVAL = "dpo {d}/p.jsonl -o {d}/policy", "eval {d}/q.jsonl"
LABEL_RUN = {"label_balance": {"true": 1, "false": 1}}

def usage(option: str) -> list[str]:
    """A bad option value: click's one-line usage error naming the option."""
    return [f"Invalid value for '{option}'"]


# (id, files (created in order), command ({d}: the directory, {m}: the model that does not exist; a list is not
#  split), the pieces of the one-line error)
CASES: list[tuple[str, Files, str | list[str], list[str]]] = [
    # ---- icm label: the input
    ("label-input-fifo", {"c.jsonl": fifo}, LABEL, ["c.jsonl: is a FIFO (named pipe), not a regular file"]),
    ("label-input-device", {"c.jsonl": link_to("/dev/zero")}, LABEL, ["c.jsonl: is a character device"]),
    ("label-input-loop", {"c.jsonl": loop}, LABEL, ["c.jsonl: is a symbolic link loop"]),
    ("label-input-broken-link", {"c.jsonl": broken}, LABEL, ["c.jsonl: is a broken symbolic link"]),
    ("label-input-empty-path", {}, ["label", "", "-o", "{d}/out.parquet"], ["is a directory, not a file"]),
    ("label-input-5000-digits", {"c.jsonl": jsonl(CLAIM) + f'{{"question": "q", "choice": "a", "n": {HUGE}}}\n'},
     LABEL, ["c.jsonl, row 2: an integer of 5,000 digits"]),
    ("label-json-5000-digits", {"c.json": f'[{{"question": "q", "choice": "a", "consistency_id": {HUGE}}}]'},
     "label {d}/c.json -o {d}/out.parquet", ["c.json: an integer of 5,000 digits"]),
    ("label-id-beyond-64-bit", {"c.jsonl": jsonl(CLAIM | {"consistency_id": 2**70})}, LABEL,
     ["c.jsonl, field 'consistency_id': values that one Parquet column cannot store"]),
    ("label-id-mixed-types", {"c.jsonl": jsonl(CLAIM, CLAIM | {"consistency_id": [1, 2]})}, LABEL,
     ["c.jsonl, row 2, field 'consistency_id': expected text, got a list"]),
    ("label-column-mixed-types", {"c.jsonl": jsonl(CLAIM | {"extra": 1}, CLAIM | {"extra": "one"})}, LABEL,
     ["c.jsonl, field 'extra': values that one Parquet column cannot store"]),
    ("label-parquet-timestamp-out-of-range",
     {"c.parquet": parquet(pa.table({"question": ["q"], "choice": ["a"],
                                     "when": pa.array([2**62], pa.timestamp("us"))}))},
     "label {d}/c.parquet -o {d}/out.parquet", ["c.parquet, field 'when': a timestamp[us] value Python cannot"]),
    ("label-csv-field-over-limit", {"c.csv": "question,choice\nq," + "x" * 1_000_001 + "\n"},
     "label {d}/c.csv -o {d}/out.parquet", ["c.csv, row 1, field 'choice': 1,000,001 characters, over the limit"]),
    ("label-name-with-brackets", {}, ["label", "{d}/claims [v2].jsonl", "-o", "{d}/out.parquet"],
     ["claims [v2].jsonl: file not found"]),
    ("label-name-with-markup", {}, ["label", "{d}/[bold]c[/].jsonl", "-o", "{d}/out.parquet"],
     ["[bold]c[/].jsonl: file not found"]),
    # ---- icm label: the output and the run directory
    ("label-output-symlink-to-input", {"c.jsonl": jsonl(CLAIM), "out.parquet": link_to("c.jsonl")}, LABEL,
     ["the output is the input file"]),
    ("label-output-hard-link-to-input", {"c.jsonl": jsonl(CLAIM), "out.parquet": hard_link_to("c.jsonl")}, LABEL,
     ["the output is the input file"]),
    ("label-output-dot-spelling", {"c.jsonl": jsonl(CLAIM)}, "label {d}/c.jsonl -o {d}/./c.jsonl",
     ["the output is the input file"]),
    ("label-output-dotdot-spelling", {"c.jsonl": jsonl(CLAIM), "sub": directory},
     "label {d}/c.jsonl -o {d}/sub/../c.jsonl", ["the output is the input file"]),
    ("label-output-loop", {"c.jsonl": jsonl(CLAIM), "out.parquet": loop}, LABEL,
     ["out.parquet: is a symbolic link loop"]),
    ("label-output-parent-loop", {"c.jsonl": jsonl(CLAIM), "sub": loop}, "label {d}/c.jsonl -o {d}/sub/out.parquet",
     ["sub is a symbolic link loop"]),
    ("label-output-broken-parent", {"c.jsonl": jsonl(CLAIM), "sub": broken},
     "label {d}/c.jsonl -o {d}/sub/out.parquet", ["sub is a broken symbolic link"]),
    ("label-output-fifo", {"c.jsonl": jsonl(CLAIM), "out.parquet": fifo}, LABEL,
     ["out.parquet: exists and is a FIFO (named pipe)"]),
    ("label-output-device", {"c.jsonl": jsonl(CLAIM), "out.parquet": link_to("/dev/null")}, LABEL,
     ["out.parquet: exists and is a character device"]),
    ("label-output-empty-path", {"c.jsonl": jsonl(CLAIM)}, ["label", "{d}/c.jsonl", "-o", ""],
     ["is a directory; give a file path"]),
    ("label-default-run-dir-is-a-file", {"c.jsonl": jsonl(CLAIM), "out.run": "a file"}, LABEL,
     ["out.run: is a file where the run directory of -o", "move it away or pass --run-dir DIR"]),
    ("label-run-dir-is-the-input", {"c.jsonl": jsonl(CLAIM)}, LABEL + " --run-dir {d}/c.jsonl",
     ["c.jsonl: the output is the input file"]),
    ("label-run-dir-loop", {"c.jsonl": jsonl(CLAIM), "r": loop}, LABEL + " --run-dir {d}/r",
     ["r: is a symbolic link loop"]),
    ("label-input-is-the-run-json", {"out.run": directory, "out.run/run.json": json.dumps([CLAIM])},
     "label {d}/out.run/run.json -o {d}/out.parquet", ["the run's run.json is the input file"]),
    ("label-input-is-the-claims-json", {"r": directory, "r/claims.json": json.dumps([CLAIM])},
     "label {d}/r/claims.json -o {d}/out.parquet --run-dir {d}/r", ["the run's claims.json is the input file"]),
    ("label-output-is-a-run-file", {"c.jsonl": jsonl(CLAIM)}, "label {d}/c.jsonl -o {d}/r/run.json --run-dir {d}/r",
     ["the run's run.json and the output are the same file"]),
    ("label-run-dir-is-the-output", {"c.jsonl": jsonl(CLAIM)}, LABEL + " --run-dir {d}/out.parquet",
     ["the output and its run directory are the same path"]),
    ("label-output-is-a-model-file", {"c.jsonl": jsonl(CLAIM), "model": directory, "model/config.json": "{}"},
     "label {d}/c.jsonl -o {d}/model/config.json --model {d}/model", ["the output is the input file"]),
    ("label-checkpoint-fifo", {"c.jsonl": jsonl(CLAIM), "out.run": directory, "out.run/checkpoint.json": fifo},
     LABEL + " --resume", ["checkpoint.json: exists and is a FIFO (named pipe)"]),
    # ---- icm label: --config and option values
    ("label-config-fifo", {"c.jsonl": jsonl(CLAIM), "r.yaml": fifo}, LABEL + " --config {d}/r.yaml",
     ["r.yaml: is a FIFO (named pipe), not a regular file"]),
    ("label-config-device", {"c.jsonl": jsonl(CLAIM), "r.yaml": link_to("/dev/zero")}, LABEL + " --config {d}/r.yaml",
     ["r.yaml: is a character device"]),
    ("label-config-directory", {"c.jsonl": jsonl(CLAIM), "r.yaml": directory}, LABEL + " --config {d}/r.yaml",
     ["--config", "is a directory"]),
    ("label-config-loop", {"c.jsonl": jsonl(CLAIM), "r.yaml": loop}, LABEL + " --config {d}/r.yaml",
     ["r.yaml: is a symbolic link loop"]),
    ("label-config-5000-digits", {"c.jsonl": jsonl(CLAIM), "r.yaml": f"iterations: {HUGE}\n"},
     LABEL + " --config {d}/r.yaml", ["r.yaml: not a readable recipe (ValueError"]),
    ("label-config-nan-alpha", {"c.jsonl": jsonl(CLAIM), "r.yaml": "alpha: .nan\n"}, LABEL + " --config {d}/r.yaml",
     ["r.yaml: alpha:", "greater than or equal to 0"]),
    ("label-config-zero-batch", {"c.jsonl": jsonl(CLAIM), "r.yaml": "batch_size: 0\n"},
     LABEL + " --config {d}/r.yaml", ["r.yaml: batch_size:", "greater than or equal to 1"]),
    ("label-iterations-negative", {"c.jsonl": jsonl(CLAIM)}, LABEL + " --iterations -1", usage("--iterations")),
    ("label-alpha-nan", {"c.jsonl": jsonl(CLAIM)}, LABEL + " --alpha nan", usage("--alpha")),
    ("label-alpha-inf", {"c.jsonl": jsonl(CLAIM)}, LABEL + " --alpha inf", ["alpha must be >= 0, got inf"]),
    ("label-seed-negative", {"c.jsonl": jsonl(CLAIM)}, LABEL + " --seed -1", usage("--seed")),
    ("label-seed-5000-digits", {"c.jsonl": jsonl(CLAIM)}, LABEL + f" --seed {HUGE}", usage("--seed")),
    ("label-batch-size-zero", {"c.jsonl": jsonl(CLAIM)}, LABEL + " --batch-size 0", usage("--batch-size")),
    ("label-max-context-inf", {"c.jsonl": jsonl(CLAIM)}, LABEL + " --max-context-tokens inf",
     usage("--max-context-tokens")),
    ("label-temperature-nan", {"q.jsonl": jsonl(QUESTION)}, "label {d}/q.jsonl -o {d}/out.parquet --temperature nan",
     usage("--temperature")),
    ("label-finetune-lr-zero", {"c.jsonl": jsonl(CLAIM)}, LABEL + " --iterative --finetune-lr 0",
     ["learning_rate must be > 0, got 0"]),
    ("label-answer-claims-without-ids", {"c.jsonl": jsonl({"question": "q", "choice": "The answer is 5."})},
     LABEL + " --claims answers --answers 5|6", ["c.jsonl, row 1, field 'consistency_id': missing or empty"]),
    ("label-dtype-unknown", {"c.jsonl": jsonl(CLAIM)}, LABEL + " --dtype fp64", usage("--dtype")),
    ("label-concurrency-zero", {"c.jsonl": jsonl(CLAIM)}, LABEL + " --base-url http://127.0.0.1:9/v1 --concurrency 0",
     usage("--concurrency")),
    # ---- icm generate
    ("generate-input-fifo", {"q.jsonl": fifo}, GENERATE, ["q.jsonl: is a FIFO (named pipe), not a regular file"]),
    ("generate-input-device", {"q.jsonl": link_to("/dev/urandom")}, GENERATE, ["q.jsonl: is a character device"]),
    ("generate-input-loop", {"q.jsonl": loop}, GENERATE, ["q.jsonl: is a symbolic link loop"]),
    ("generate-input-is-the-report-sibling", {"out.report.json": json.dumps([QUESTION])},
     "generate {d}/out.report.json -o {d}/out.parquet", ["out.report.json: its report is the input file"]),
    ("generate-input-is-the-checkpoint-sibling", {"out.partial.jsonl": jsonl(QUESTION)},
     "generate {d}/out.partial.jsonl -o {d}/out.parquet --resume",
     ["out.partial.jsonl: its checkpoint is the input file"]),
    ("generate-output-hard-link-to-input", {"q.parquet": parquet(pa.table({"question": ["q"]})),
                                            "out.parquet": hard_link_to("q.parquet")},
     "generate {d}/q.parquet -o {d}/out.parquet", ["the output is the input file"]),
    ("generate-output-loop", {"q.jsonl": jsonl(QUESTION), "out.parquet": loop}, GENERATE,
     ["out.parquet: is a symbolic link loop"]),
    ("generate-checkpoint-fifo", {"q.jsonl": jsonl(QUESTION), "out.partial.jsonl": fifo}, GENERATE + " --resume",
     ["out.partial.jsonl: exists and is a FIFO (named pipe)"]),
    ("generate-question-5000-digits", {"q.jsonl": f'{{"question": {HUGE}}}\n'}, GENERATE,
     ["q.jsonl, row 1: an integer of 5,000 digits"]),
    ("generate-temperature-nan", {"q.jsonl": jsonl(QUESTION)}, GENERATE + " --temperature nan",
     usage("--temperature")),
    ("generate-temperature-inf", {"q.jsonl": jsonl(QUESTION)}, GENERATE + " --temperature inf",
     ["temperature must be >= 0, got inf"]),
    ("generate-top-p-nan", {"q.jsonl": jsonl(QUESTION)}, GENERATE + " --top-p nan", usage("--top-p")),
    ("generate-top-p-above-one", {"q.jsonl": jsonl(QUESTION)}, GENERATE + " --top-p 2", usage("--top-p")),
    ("generate-num-candidates-zero", {"q.jsonl": jsonl(QUESTION)}, GENERATE + " --num-candidates 0",
     usage("--num-candidates")),
    ("generate-seed-negative", {"q.jsonl": jsonl(QUESTION)}, GENERATE + " --seed -5", usage("--seed")),
    ("generate-seed-beyond-32-bit", {"q.jsonl": jsonl(QUESTION)}, GENERATE + f" --seed {2**32}", usage("--seed")),
    ("generate-limit-zero", {"q.jsonl": jsonl(QUESTION)}, GENERATE + " --limit 0", usage("--limit")),
    ("generate-max-new-tokens-5000-digits", {"q.jsonl": jsonl(QUESTION)}, GENERATE + f" --max-new-tokens {HUGE}",
     usage("--max-new-tokens")),
    ("generate-gpu-memory-nan", {"q.jsonl": jsonl(QUESTION)}, GENERATE + " --vllm --gpu-memory-utilization nan",
     ["--gpu-memory-utilization"]),
    ("generate-device-unknown", {"q.jsonl": jsonl(QUESTION)}, GENERATE + " --device gpu0", ["--device:"]),
    ("generate-output-is-a-model-file", {"q.jsonl": jsonl(QUESTION), "m.gguf": "weights"},
     "generate {d}/q.jsonl -o {d}/m.gguf --model {d}/m.gguf", ["the output is the input file"]),
    ("generate-output-empty-path", {"q.jsonl": jsonl(QUESTION)}, ["generate", "{d}/q.jsonl", "-o", ""],
     ["is a directory; give a file path"]),
    ("generate-output-not-parquet", {"q.jsonl": jsonl(QUESTION)}, "generate {d}/q.jsonl -o {d}/out.csv",
     ["out.csv: the output must be a .parquet file"]),
    # ---- icm pairs
    ("pairs-input-fifo", {"l.jsonl": fifo}, PAIRS, ["l.jsonl: is a FIFO (named pipe), not a regular file"]),
    ("pairs-input-directory", {"l.parquet": directory}, "pairs {d}/l.parquet -o {d}/p.parquet",
     ["l.parquet: is a directory, not a file"]),
    ("pairs-output-symlink-to-input", {"l.jsonl": jsonl(LABELLED), "p.parquet": link_to("l.jsonl")}, PAIRS,
     ["the output is the input file"]),
    ("pairs-input-is-the-test-split", {"p.test.parquet": labels_parquet()},
     "pairs {d}/p.test.parquet -o {d}/p.parquet --eval-size 0.5", ["its test split is the input file"]),
    ("pairs-input-is-the-report", {"p.report.json": json.dumps([LABELLED])},
     "pairs {d}/p.report.json -o {d}/p.parquet", ["its report is the input file"]),
    ("pairs-min-margin-above-every-pair", {"l.jsonl": jsonl(LABELLED, LABELLED | {
        "choice": "6", "icm_label": False, "icm_score": 0.0})}, PAIRS + " --min-margin 2015829",
     ["l.jsonl: no pairs: below min margin: 1"]),
    ("pairs-output-empty-path", {"l.jsonl": jsonl(LABELLED)}, ["pairs", "{d}/l.jsonl", "-o", ""],
     ["is a directory; give a file path"]),
    ("eval-items-empty-path", {"q.jsonl": jsonl(QUESTION)}, ["eval", "{d}/q.jsonl", "--items", ""],
     ["is a directory; give a file path"]),
    ("pairs-score-5000-digits", {"l.jsonl": jsonl(LABELLED).replace("1.5", HUGE)}, PAIRS,
     ["l.jsonl, row 1: an integer of 5,000 digits"]),
    ("pairs-score-infinite", {"l.jsonl": jsonl(LABELLED).replace("1.5", "1e999")}, PAIRS,
     ["l.jsonl, row 1, field 'icm_score': expected a finite number"]),
    ("pairs-min-margin-nan", {"l.jsonl": jsonl(LABELLED)}, PAIRS + " --min-margin nan",
     ["min_margin must be a finite number, got nan"]),
    ("pairs-eval-size-inf", {"l.jsonl": jsonl(LABELLED)}, PAIRS + " --eval-size inf", ["test_size must be a fraction"]),
    ("pairs-eval-size-negative", {"l.jsonl": jsonl(LABELLED)}, PAIRS + " --eval-size -0.5", usage("--eval-size")),
    ("pairs-max-per-question-zero", {"l.jsonl": jsonl(LABELLED)}, PAIRS + " --max-per-question 0",
     usage("--max-per-question")),
    ("pairs-seed-negative", {"l.jsonl": jsonl(LABELLED)}, PAIRS + " --seed -1", usage("--seed")),
    ("pairs-bad-hub-id", {"l.jsonl": jsonl(LABELLED)}, PAIRS + " --push-to-hub not/a/repo",
     ["repository id must look like OWNER/NAME"]),
    # ---- icm push
    ("push-input-fifo", {"p.parquet": fifo}, "push {d}/p.parquet me/pairs",
     ["p.parquet: is a FIFO (named pipe), not a regular file"]),
    ("push-input-not-parquet", {"p.parquet": "not parquet"}, "push {d}/p.parquet me/pairs",
     ["p.parquet: not a readable Parquet file"]),
    ("push-input-loop", {"p.parquet": loop}, "push {d}/p.parquet me/pairs", ["p.parquet: is a symbolic link loop"]),
    # ---- icm dpo
    ("dpo-input-fifo", {"p.jsonl": fifo}, DPO, ["p.jsonl: is a FIFO (named pipe), not a regular file"]),
    ("dpo-eval-pairs-fifo", {"p.jsonl": jsonl(PAIR), "e.jsonl": fifo}, DPO + " --eval-pairs {d}/e.jsonl",
     ["e.jsonl: is a FIFO (named pipe), not a regular file"]),
    ("dpo-input-device", {"p.jsonl": link_to("/dev/zero")}, DPO, ["p.jsonl: is a character device"]),
    ("dpo-output-dir-loop", {"p.jsonl": jsonl(PAIR), "policy": loop}, DPO, ["policy: is a symbolic link loop"]),
    ("dpo-output-dir-broken-link", {"p.jsonl": jsonl(PAIR), "policy": broken}, DPO,
     ["policy: is a broken symbolic link"]),
    ("dpo-output-dir-is-the-input", {"p.jsonl": jsonl(PAIR)}, "dpo {d}/p.jsonl -o {d}/./p.jsonl",
     ["the output is the input file"]),
    ("dpo-input-is-a-file-it-writes", {"policy": directory, "policy/config.json": json.dumps([PAIR])},
     "dpo {d}/policy/config.json -o {d}/policy", ["config.json in --output-dir is the input file"]),
    ("dpo-input-in-a-checkpoint", {"policy": directory, "policy/checkpoint-1": directory,
                                   "policy/checkpoint-1/p.jsonl": jsonl(PAIR)},
     "dpo {d}/policy/checkpoint-1/p.jsonl -o {d}/policy", ["lies in a checkpoint of"]),
    ("dpo-output-dir-is-the-model", {"p.jsonl": jsonl(PAIR), "model": directory, "model/config.json": "{}"},
     "dpo {d}/p.jsonl -o {d}/model --model {d}/./model", ["config.json in --output-dir is the input file"]),
    ("dpo-lora-r-zero", {"p.jsonl": jsonl(PAIR)}, DPO + " --lora-r 0", usage("--lora-r")),
    ("dpo-learning-rate-negative", {"p.jsonl": jsonl(PAIR)}, DPO + " --learning-rate -1", usage("--learning-rate")),
    ("dpo-learning-rate-zero", {"p.jsonl": jsonl(PAIR)}, DPO + " --learning-rate 0",
     ["learning_rate must be > 0, got 0"]),
    ("dpo-learning-rate-nan", {"p.jsonl": jsonl(PAIR)}, DPO + " --learning-rate nan",
     usage("--learning-rate")),
    ("dpo-beta-zero", {"p.jsonl": jsonl(PAIR)}, DPO + " --beta 0", ["beta must be > 0, got 0"]),
    ("dpo-beta-inf", {"p.jsonl": jsonl(PAIR)}, DPO + " --beta inf", ["beta must be > 0, got inf"]),
    ("dpo-epochs-zero", {"p.jsonl": jsonl(PAIR)}, DPO + " --epochs 0", ["num_train_epochs must be > 0, got 0"]),
    ("dpo-max-steps-zero", {"p.jsonl": jsonl(PAIR)}, DPO + " --max-steps 0", ["max_steps", "must be >= 1, got 0"]),
    ("dpo-max-steps-below-minus-one", {"p.jsonl": jsonl(PAIR)}, DPO + " --max-steps -2", usage("--max-steps")),
    ("dpo-label-smoothing-half", {"p.jsonl": jsonl(PAIR)}, DPO + " --label-smoothing 0.5",
     ["label_smoothing must be in [0, 0.5), got 0.5"]),
    ("dpo-loss-weight-nan", {"p.jsonl": jsonl(PAIR)}, DPO + " --loss-weights nan",
     ["loss_weights must be a finite number, got nan"]),
    ("dpo-lora-target-modules-empty", {"p.jsonl": jsonl(PAIR)}, DPO + " --lora-target-modules ,",
     ["lora_target_modules must name at least one module"]),
    ("dpo-save-steps-negative", {"p.jsonl": jsonl(PAIR)}, DPO + " --save-steps -1", usage("--save-steps")),
    ("dpo-seed-negative", {"p.jsonl": jsonl(PAIR)}, DPO + " --seed -1", usage("--seed")),
    ("dpo-dtype-unknown", {"p.jsonl": jsonl(PAIR)}, DPO + " --dtype fp8", usage("--dtype")),
    ("dpo-pairs-5000-digits", {"p.jsonl": jsonl(PAIR) + f'{{"prompt": {HUGE}, "chosen": "a", "rejected": "b"}}\n'},
     DPO, ["p.jsonl, row 2: an integer of 5,000 digits"]),
    # ---- icm eval
    ("eval-input-fifo", {"q.jsonl": fifo}, EVAL, ["q.jsonl: is a FIFO (named pipe), not a regular file"]),
    ("eval-input-loop", {"q.jsonl": loop}, EVAL, ["q.jsonl: is a symbolic link loop"]),
    ("eval-items-is-the-input", {"q.jsonl": jsonl(QUESTION)}, EVAL + " --items {d}/q.jsonl",
     ["q.jsonl: the per-item file is the input file"]),
    ("eval-output-is-the-input", {"q.jsonl": jsonl(QUESTION)}, EVAL + " --output {d}/q.jsonl",
     ["q.jsonl: the output is the input file"]),
    ("eval-output-hard-link-to-input", {"q.jsonl": jsonl(QUESTION), "e.json": hard_link_to("q.jsonl")},
     EVAL + " -o {d}/e.json", ["e.json: the output is the input file"]),
    ("eval-output-and-items-the-same", {"q.jsonl": jsonl(QUESTION)}, EVAL + " -o {d}/e.json --items {d}/./e.json",
     ["the per-item file and the output are the same file"]),
    ("eval-output-fifo", {"q.jsonl": jsonl(QUESTION), "e.json": fifo}, EVAL + " -o {d}/e.json",
     ["e.json: exists and is a FIFO (named pipe)"]),
    ("eval-corrupt-adapter-config", {"q.jsonl": jsonl(QUESTION), **adapter_dir('{"base_model_name_or_path": ')},
     "eval {d}/q.jsonl --model {d}/policy", ["adapter_config.json: damaged"]),
    ("eval-adapter-config-a-list", {"q.jsonl": jsonl(QUESTION), **adapter_dir("[]")},
     "eval {d}/q.jsonl --model {d}/policy", ["adapter_config.json: damaged (a JSON object expected, got a list)"]),
    ("eval-adapter-config-fifo", {"q.jsonl": jsonl(QUESTION), "policy": directory,
                                  "policy/config.json": "{}", "policy/adapter_config.json": fifo},
     "eval {d}/q.jsonl --model {d}/policy", ["adapter_config.json: not a regular file or folder"]),
    ("eval-output-is-a-model-file", {"q.jsonl": jsonl(QUESTION), **adapter_dir("{}")},
     "eval {d}/q.jsonl --model {d}/policy -o {d}/policy/adapter_config.json", ["the output is the input file"]),
    ("eval-task-empty", {}, ["eval", "--task", ""], ["give exactly one of INPUT or --task"]),
    ("eval-dtype-unknown", {"q.jsonl": jsonl(QUESTION)}, EVAL + " --dtype float64", usage("--dtype")),
    ("eval-limit-zero", {"q.jsonl": jsonl(QUESTION)}, EVAL + " --limit 0", usage("--limit")),
    ("eval-num-shots-negative", {"q.jsonl": jsonl(QUESTION)}, EVAL + " --num-shots -1", usage("--num-shots")),
    ("eval-seed-5000-digits", {"q.jsonl": jsonl(QUESTION)}, EVAL + f" --seed {HUGE}", usage("--seed")),
    ("eval-reference-5000-digits", {"q.jsonl": f'{{"question": "q", "answer": {HUGE}}}\n'}, EVAL,
     ["q.jsonl, row 1: an integer of 5,000 digits"]),
    # ---- icm transfer
    ("transfer-input-fifo", {"q.jsonl": fifo}, TRANSFER, ["q.jsonl: is a FIFO (named pipe), not a regular file"]),
    ("transfer-damaged-split", transfer_run(**{"split.json": '{"train": ["1", "2"'}), TRANSFER,
     ["split.json: damaged (", "delete it to run its stage again"]),
    ("transfer-split-a-list", transfer_run(**{"split.json": "[]"}), TRANSFER,
     ["split.json: damaged (a JSON object expected, got a list)"]),
    ("transfer-split-fifo", transfer_run(**{"split.json": fifo}), TRANSFER,
     ["split.json: exists and is a FIFO (named pipe)"]),
    ("transfer-damaged-stages", transfer_run(**{"stages.json": "{"}), TRANSFER, ["stages.json: damaged ("]),
    ("transfer-damaged-eval-before", transfer_run(**{"eval_before.json": '{"accuracy": 0.5}'}), TRANSFER,
     ["eval_before.json: damaged or of another icm version (no 'n', 'results')"]),
    ("transfer-damaged-pairs-report", transfer_run(**{"pairs.report.json": '{"pairs": 3'}), TRANSFER,
     ["pairs.report.json: damaged ("]),
    ("transfer-damaged-round-pairs-report", transfer_run(**{"round-2": directory, "round-2/pairs.report.json":
                                                            '{"pairs": 3'}), TRANSFER + " --rounds 2",
     ["round-2/pairs.report.json: damaged ("]),
    ("transfer-damaged-round-candidates", transfer_run(**{"round-2": directory, "round-2/candidates.parquet":
                                                          "PAR1 cut short"}), TRANSFER + " --rounds 2",
     ["round-2/candidates.parquet: not a readable Parquet file", "delete it to run its stage again"]),
    ("transfer-input-in-a-round-start-dir", transfer_run(**{"round-2": directory, "round-2/start": directory,
                                                            "round-2/start/q.jsonl": jsonl(
        *[QUESTION | {"question": f"q{k}"} for k in range(4)])}),
     TRANSFER.replace("{d}/q.jsonl", "{d}/run/round-2/start/q.jsonl") + " --rounds 2",
     ["lies in", "which this run writes"]),
    ("transfer-rounds-without-icm", transfer_run(), TRANSFER + " --rounds 2 --arms gold", ["add icm to arms"]),
    ("transfer-damaged-candidates", transfer_run(**{"candidates.parquet": "PAR1 cut short"}), TRANSFER,
     ["candidates.parquet: not a readable Parquet file", "delete it to run its stage again"]),
    ("transfer-damaged-policy-summary", transfer_run(**{"policy": directory, "policy/icm_dpo.json": "[1, 2]"}),
     TRANSFER, ["icm_dpo.json: damaged (a JSON object expected, got a list)"]),
    ("transfer-input-is-a-run-file", transfer_run(**{"eval_before.items.jsonl": jsonl(QUESTION, QUESTION | {
        "question": "q2"}, QUESTION | {"question": "q3"})}),
     TRANSFER.replace("{d}/q.jsonl", "{d}/run/eval_before.items.jsonl"),
     ["the run's eval_before.items.jsonl is the input file"]),
    ("transfer-input-in-the-policy-dir", transfer_run(**{"policy": directory, "policy/q.jsonl": jsonl(
        *[QUESTION | {"question": f"q{k}"} for k in range(4)])}),
     TRANSFER.replace("{d}/q.jsonl", "{d}/run/policy/q.jsonl"), ["lies in", "which this run writes"]),
    ("transfer-output-dir-loop", {"q.jsonl": jsonl(QUESTION, QUESTION), "run": loop}, TRANSFER,
     ["run: is a symbolic link loop"]),
    ("transfer-output-dir-is-a-file", {"q.jsonl": jsonl(QUESTION, QUESTION), "run": "a file"}, TRANSFER,
     ["run: exists and is not a directory"]),
    ("transfer-eval-size-nan", transfer_run(), TRANSFER + " --eval-size nan", usage("--eval-size")),
    ("transfer-bootstrap-samples-small", transfer_run(), TRANSFER + " --bootstrap-samples 1",
     usage("--bootstrap-samples")),
    ("transfer-icm-alpha-nan", transfer_run(), TRANSFER + " --alpha nan", usage("--alpha")),
    ("transfer-learning-rate-nan", transfer_run(), TRANSFER + " --learning-rate nan",
     usage("--learning-rate")),
    ("transfer-dpo-seed-negative", transfer_run(), TRANSFER + " --dpo-seed -1", usage("--dpo-seed")),
    ("transfer-arms-empty", transfer_run(), TRANSFER + " --arms ,", ["arms must be distinct names"]),
    # ---- icm report
    ("report-output-is-the-run-json", {"r": directory, "r/run.json": json.dumps(LABEL_RUN)},
     "report {d}/r --output {d}/r/run.json", ["run.json: the report is an HTML page"]),
    ("report-output-hard-link-to-run-json", {"r": directory, "r/run.json": json.dumps(LABEL_RUN),
                                             "r/page.html": hard_link_to("run.json")},
     "report {d}/r --output {d}/r/page.html", ["page.html: the output is the input file"]),
    ("report-output-loop", {"r": directory, "r/run.json": json.dumps(LABEL_RUN), "page.html": loop},
     "report {d}/r --output {d}/page.html", ["page.html: is a symbolic link loop"]),
    ("report-output-directory", {"r": directory, "r/run.json": json.dumps(LABEL_RUN), "page.html": directory},
     "report {d}/r --output {d}/page.html", ["page.html: is a directory; give a file path"]),
    ("report-truncated-run-json", {"r": directory, "r/run.json": '{"model": "m", "claims": 4, "trajec'},
     "report {d}/r", ["run.json: damaged (", "rerun the command that wrote it"]),
    ("report-run-json-a-list", {"r": directory, "r/run.json": "[1]"}, "report {d}/r",
     ["run.json: damaged (a JSON object expected, got a list)"]),
    ("report-run-json-wrong-shapes", {"r": directory, "r/run.json": '{"trajectories": 5, "outcomes": 7}'},
     "report {d}/r", ["damaged or of another icm version (TypeError"]),
    ("report-pairs-report-missing-keys", {"p.report.json": '{"pairs_per_question": {"mean": 1}}'},
     "report {d}/p.report.json", ["p.report.json: damaged or of another icm version (no 'rows'"]),
    ("report-pairs-report-wrong-shapes", {"p.report.json": json.dumps({k: None for k in (
        "rows", "questions", "label_balance", "candidate_pairs", "pairs", "questions_with_pairs", "pairs_per_question",
        "questions_skipped", "dropped")})}, "report {d}/p.report.json", ["damaged or of another icm version"]),
    ("report-damaged-transfer-json", {"t": directory, "t/transfer.json": '{"mode": '}, "report {d}/t",
     ["transfer.json: damaged ("]),
    ("report-input-fifo", {"p.report.json": fifo}, "report {d}/p.report.json", ["p.report.json: not a label run"]),
    ("report-pairs-sibling-fifo", {"p.parquet": labels_parquet(), "p.report.json": fifo}, "report {d}/p.parquet",
     ["p.parquet: not a label run"]),
    ("report-input-loop", {"r": loop}, "report {d}/r", ["r: no such file or directory"]),
]


@pytest.fixture
def no_hang():
    """Fail a case that blocks (reading a FIFO) after a minute instead of hanging the suite."""

    def stop(signum, frame):
        raise TimeoutError("the command blocked for 60 s")

    previous = signal.signal(signal.SIGALRM, stop)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("files, command, pieces", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_hostile_input_one_line_exit_2_nothing_changed(tmp_path, no_hang, files, command, pieces):
    make_files(tmp_path, files)
    before = snapshot(tmp_path)
    argv = [a.format(d=tmp_path, m=NO_MODEL) for a in (command if isinstance(command, list) else command.split())]
    if argv[0] in ("label", "generate", "dpo", "eval") and "--model" not in argv:
        argv += ["--model", NO_MODEL]
    result, text = invoke(argv)
    assert_one_line_error(result, text, [p.format(d=tmp_path) for p in pieces])
    assert snapshot(tmp_path) == before


def test_the_table_covers_every_command_and_kind_of_input():
    commands = {(c[2] if isinstance(c[2], list) else c[2].split())[0] for c in CASES}
    assert commands == {"label", "generate", "pairs", "push", "dpo", "eval", "transfer", "report"}
    assert len(CASES) >= 150


def test_a_csv_field_beyond_csv_modules_limit_is_read(tmp_path):
    """csv caps a field at 131,072 characters; text up to MAX_FIELD_CHARS (1,000,000) is promised."""
    (tmp_path / "c.csv").write_text("question,choice\nq," + "x" * 500_000 + "\n")
    assert read_records(tmp_path / "c.csv") == [{"question": "q", "choice": "x" * 500_000}]


def test_a_number_given_as_question_makes_pairs(tmp_path):
    """A labels file whose question is a number: its text is the prompt (a traceback before)."""
    rows = [LABELLED | {"question": 7}, LABELLED | {"question": 7, "choice": "6", "icm_label": False, "icm_score": 0}]
    (tmp_path / "l.jsonl").write_text(jsonl(*rows))
    result, text = invoke(["pairs", str(tmp_path / "l.jsonl"), "-o", str(tmp_path / "p.parquet")])
    assert result.exit_code == 0, text
    assert read_records(tmp_path / "p.parquet")[0]["prompt"] == "7\n"
