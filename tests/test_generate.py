"""Question loading, the arithmetic task, candidate generation, claims output and `icm generate`."""

from __future__ import annotations

import json
import re

import pytest
from conftest import SHARED
from typer.testing import CliRunner

from icm.backends import InProcessBackend
from icm.cli import app
from icm.config import GenerationConfig
from icm.data.answers import extract_answer
from icm.data.candidates import Completion, GenerationStats, candidate_rows, diversity_report, report_path
from icm.data.io import InputError, read_parquet_metadata, read_records
from icm.data.tasks import Question, arithmetic_questions, load_questions, reference_answer
from icm.generate import checkpoint_path, generate_candidates, generate_file
from icm.sampling import build_prompt, generate_texts, truncate_at_stop, user_message

CLAIM_COLUMNS = {"question", "choice", "answer", "consistency_id", "label", "prompt", "reference",
                 "candidate_index", "generator", "num_tokens"}


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from icm.models import load_model

    return load_model(tiny_model_dir, dtype="fp32")


# ---- questions ------------------------------------------------------------------------------------------


def _solve(question: str) -> int:
    """Independent solver for the arithmetic templates (reads the numbers from the question text)."""
    n = [int(x) for x in re.findall(r"\d+", question)]
    if "in each bag" in question:
        return n[0] * n[1]
    if "gives away" in question:
        return n[0] - n[1]
    if "twice as many" in question:
        return 2 * n[0]
    if "together" in question or "more" in question:
        return n[0] + n[1]
    raise AssertionError(f"unknown template: {question}")


def test_arithmetic_gold_is_correct():
    questions = arithmetic_questions(60, seed=3)
    assert len({q.question for q in questions}) > 50
    for q in questions:
        assert q.reference == str(_solve(q.question)), q.question
        assert int(q.reference) >= 0
        assert extract_answer(q.solution) == q.reference
        for lhs, rhs in re.findall(r"(\d+(?: [-+x] \d+)+) = (\d+)", q.solution):  # the worked steps add up too
            assert eval(lhs.replace("x", "*")) == int(rhs)


def test_arithmetic_is_seeded():
    assert arithmetic_questions(10, seed=1) == arithmetic_questions(10, seed=1)
    assert arithmetic_questions(10, seed=1) != arithmetic_questions(10, seed=2)
    assert load_questions(task="arithmetic", limit=7, seed=1) == arithmetic_questions(7, seed=1)


@pytest.mark.skipif(not (SHARED / "gsm8k" / "train.jsonl").exists(), reason="shared GSM8K file absent")
def test_gsm8k_file_loads_as_is():
    questions = load_questions(str(SHARED / "gsm8k" / "train.jsonl"), limit=5)
    assert len(questions) == 5
    assert questions[0].question.startswith("Natalia sold clips")
    assert questions[0].reference == "72" and questions[0].solution.endswith("#### 72")
    assert all(q.reference and q.reference.lstrip("-").replace(".", "").isdigit() for q in questions)
    shuffled = load_questions(str(SHARED / "gsm8k" / "train.jsonl"), limit=5, shuffle=True, seed=1)
    assert shuffled == load_questions(str(SHARED / "gsm8k" / "train.jsonl"), limit=5, shuffle=True, seed=1)
    assert [q.id for q in shuffled] != [q.id for q in questions]


def test_load_questions_field_mapping(tmp_path):
    path = tmp_path / "q.csv"
    path.write_text("key,problem,gold\nq1,What is 2+2?,4\nq2,Capital of France?,Paris\nq3,No gold here,\n")
    questions = load_questions(str(path), question_field="problem", answer_field="gold", id_field="key")
    assert [(q.id, q.reference) for q in questions] == [("q1", "4"), ("q2", "paris"), ("q3", None)]


@pytest.mark.parametrize("content, row, field", [
    ('{"question": "a"}\n{"q": "b"}\n', 2, "question"),
    ('{"question": "a"}\n{"question": "  "}\n', 2, "question"),
    ('{"question": "a"}\nnot json\n', 2, None),
])
def test_load_questions_bad_rows(tmp_path, content, row, field):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(InputError) as error:
        load_questions(str(path))
    assert (error.value.row, error.value.field, error.value.path) == (row, field, str(path))


@pytest.mark.parametrize("raw, expected", [
    ("Step one.\n#### 1,234", "1234"),
    ("42", "42"),
    ("$18.00", "18"),
    ("B", "B"),
    ("", None),
    (None, None),
])
def test_reference_answer(raw, expected):
    assert reference_answer(raw) == expected


# ---- prompts, rows, report --------------------------------------------------------------------------------


def test_build_prompt(tiny):
    _, tokenizer = tiny
    message = user_message("What is 2 + 3?", "Be brief.")
    assert message == "Be brief.\n\nQuestion: What is 2 + 3?"
    chat = build_prompt(tokenizer, message, use_chat_template=True)
    assert chat.startswith("<|im_start|>user\nBe brief.") and chat.endswith("<|im_start|>assistant\n")
    assert build_prompt(tokenizer, message, use_chat_template=False) == message + "\nAnswer:"


@pytest.mark.parametrize("text, expected", [
    ("The answer is 5.\nQuestion: next", "The answer is 5."),
    ("no stop here", "no stop here"),
    ("STOP first\nQuestion: later", ""),
])
def test_truncate_at_stop(text, expected):
    assert truncate_at_stop(text, ["\nQuestion:", "STOP"]) == expected


def test_rows_dedup_labels_and_report():
    questions = [Question("a", "2 + 3?", "5", "2 + 3 = 5. The answer is 5."), Question("b", "Name it", None)]
    texts = [["The answer is 5.", "The answer is 5.", "The answer is 6.", "I don't know"], ["x", "y", "x", "z"]]
    completions = [[Completion(t, 3, i, j) for j, t in enumerate(group)] for i, group in enumerate(texts)]
    config = GenerationConfig(num_candidates=4, include_reference=True)
    prompts = [user_message(q.question, config.instruction) for q in questions]
    rows = candidate_rows(questions, prompts, completions, config, "m")
    first = [r for r in rows if r["consistency_id"] == 0]
    assert [(r["choice"], r["answer"], r["label"], r["candidate_index"]) for r in first] == [
        ("The answer is 5.", "5", True, 0), ("The answer is 6.", "6", False, 2), ("I don't know", "", False, 3),
        ("2 + 3 = 5. The answer is 5.", "5", True, -1)]
    assert first[-1]["generator"] == "reference" and first[0]["generator"] == "m"
    second = [r for r in rows if r["consistency_id"] == 1]
    assert [r["choice"] for r in second] == ["x", "y", "z"] and all(r["label"] is None for r in second)
    report = diversity_report(rows, GenerationStats(tokens=24, sequences=8, seconds=2.0), config)
    assert report["duplicates_removed"] == 2 and report["no_answer"] == 4
    assert report["questions_with_reference"] == 1 and report["questions_mixed"] == 1
    assert report["mixed_share"] == 1.0 and report["candidate_accuracy"] == pytest.approx(1 / 3)
    assert report["tokens_per_second"] == 12.0


# ---- generation on the tiny model ---------------------------------------------------------------------------


def test_generate_reproducible_with_seed(tiny):
    backend = InProcessBackend(*tiny)
    questions = arithmetic_questions(3)
    config = GenerationConfig(num_candidates=3, temperature=1.0, max_new_tokens=12, batch_size=4, seed=5)
    rows, report = generate_candidates(questions, backend, config, "tiny", progress=False)
    again, _ = generate_candidates(questions, backend, config, "tiny", progress=False)
    other, _ = generate_candidates(questions, backend, GenerationConfig(**{**config.__dict__, "seed": 6}), "tiny",
                                   progress=False)
    assert rows == again
    assert [r["choice"] for r in rows] != [r["choice"] for r in other]
    assert {r["consistency_id"] for r in rows} == {0, 1, 2}
    assert all(CLAIM_COLUMNS <= set(r) and 0 < r["num_tokens"] <= 12 for r in rows)
    assert report["tokens_generated"] >= sum(r["num_tokens"] for r in rows) > 0
    assert report["candidates_sampled"] == 9 and report["questions"] == 3


def test_generate_file_round_trip_and_resume(tiny_model_dir, tmp_path, monkeypatch):
    out = tmp_path / "claims.parquet"
    questions = arithmetic_questions(4)
    config = GenerationConfig(num_candidates=2, max_new_tokens=8, batch_size=2, include_reference=True)
    report = generate_file(questions, out, tiny_model_dir, config, dtype="fp32", progress=False, command="test")
    records = read_records(out)
    assert CLAIM_COLUMNS | {"question_id"} <= set(records[0])
    assert {r["consistency_id"] for r in records} == set(range(4))
    assert sum(r["candidate_index"] == -1 for r in records) == 4
    assert all(r["label"] == (r["answer"] == r["reference"]) for r in records)
    meta = read_parquet_metadata(out)
    assert meta["model"] == tiny_model_dir and meta["config"]["num_candidates"] == 2 and meta["command"] == "test"
    assert json.loads(report_path(out).read_text())["claims"] == len(records) == report["claims"]
    assert not checkpoint_path(out).exists()

    # An interrupted run leaves its finished samples in the checkpoint; --resume reuses them.
    import icm.generate

    out2 = tmp_path / "resumed.parquet"
    monkeypatch.setattr(icm.generate, "claims_table", lambda rows: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        generate_file(questions, out2, tiny_model_dir, config, dtype="fp32", progress=False)
    assert not out2.exists() and len(checkpoint_path(out2).read_text().splitlines()) == 8
    monkeypatch.undo()
    with pytest.raises(InputError, match="pass --resume"):  # never silently thrown away
        generate_file(questions, out2, tiny_model_dir, config, dtype="fp32", progress=False)
    lines = checkpoint_path(out2).read_text().splitlines(keepends=True)
    checkpoint_path(out2).write_text("".join(lines[:5]) + lines[5][:10])  # 2 questions done, one cut mid-line
    resumed = generate_file(questions, out2, tiny_model_dir, config, dtype="fp32", progress=False, resume=True)
    assert resumed["resumed_questions"] == 2 and resumed["candidates_sampled"] == 8
    assert 0 < resumed["tokens_generated"] <= 4 * 8  # only the two unfinished questions were sampled again
    again = read_records(out2)
    assert {r["consistency_id"] for r in again} == set(range(4)) and not checkpoint_path(out2).exists()
    assert [r for r in again if r["consistency_id"] < 2] == [r for r in records if r["consistency_id"] < 2]


# ---- CLI ------------------------------------------------------------------------------------------------------


def test_cli_generate_task(tiny_model_dir, tmp_path):
    out = tmp_path / "out.parquet"
    result = CliRunner().invoke(app, ["generate", "--task", "arithmetic", "--limit", "3", "--model", tiny_model_dir,
                                      "--output", str(out), "--num-candidates", "2", "--max-new-tokens", "6",
                                      "--seed", "1", "--dtype", "fp32", "--temperature", "1.0"])
    assert result.exit_code == 0, result.output
    records = read_records(out)
    assert CLAIM_COLUMNS <= set(records[0]) and {r["consistency_id"] for r in records} == {0, 1, 2}
    assert all(r["generator"] == tiny_model_dir for r in records)
    assert json.loads(report_path(out).read_text())["questions"] == 3


def test_cli_generate_file_input(tiny_model_dir, tmp_path):
    src = tmp_path / "q.jsonl"
    src.write_text('{"problem": "What is 1 + 1?", "sol": "#### 2"}\n{"problem": "What is 2 + 2?", "sol": "#### 4"}\n')
    out = tmp_path / "out.parquet"
    result = CliRunner().invoke(app, ["generate", str(src), "-o", str(out), "--model", tiny_model_dir,
                                      "--question-field", "problem", "--answer-field", "sol", "--raw-prompt",
                                      "--num-candidates", "2", "--max-new-tokens", "4", "--dtype", "fp32"])
    assert result.exit_code == 0, result.output
    records = read_records(out)
    assert {r["reference"] for r in records} == {"2", "4"}
    assert records[0]["prompt"].endswith("Question: What is 1 + 1?")


@pytest.mark.parametrize("content, expected", [
    ('{"question": "ok"}\n{"text": "no question"}\n', "row 2, field 'question'"),
    ('{"question": "ok"}\n{broken\n', "row 2"),
])
def test_cli_bad_input_exit_2_output_untouched(tiny_model_dir, tmp_path, content, expected):
    src = tmp_path / "bad.jsonl"
    src.write_text(content)
    out = tmp_path / "out.parquet"
    out.write_bytes(b"previous results")
    result = CliRunner().invoke(app, ["generate", str(src), "--output", str(out), "--model", tiny_model_dir])
    assert result.exit_code == 2
    assert str(src) in result.output and expected in result.output
    assert out.read_bytes() == b"previous results" and not report_path(out).exists()


def test_cli_needs_one_source(tmp_path):
    result = CliRunner().invoke(app, ["generate", "--output", str(tmp_path / "o.parquet")])
    assert result.exit_code == 2 and "exactly one" in result.output


# ---- real model -----------------------------------------------------------------------------------------------


@pytest.mark.real_model
def test_real_smollm2_generates_answers():
    from icm.models import load_model

    backend = InProcessBackend(*load_model("smollm2-135m"))
    config = GenerationConfig(num_candidates=4, max_new_tokens=96, batch_size=12, seed=0)
    rows, report = generate_candidates(arithmetic_questions(3), backend, config, "smollm2-135m", progress=False)
    assert report["candidates_sampled"] == 12 and 3 <= len(rows) <= 12
    assert sum(bool(r["answer"]) for r in rows) >= len(rows) // 2  # the instruction is mostly followed
    assert all(r["choice"] and "<|im_end|>" not in r["choice"] and 0 < r["num_tokens"] <= 96 for r in rows)
    assert report["tokens_generated"] > 0 and report["tokens_per_second"] > 0


@pytest.mark.real_model
def test_real_smollm2_batched_greedy_matches_one_at_a_time():
    from icm.models import load_model

    model, tokenizer = load_model("smollm2-135m", dtype="fp32")
    prompts = ["What is 2 + 3?", "Name the capital of France and say one thing about it."]  # different lengths
    batched = generate_texts(model, tokenizer, prompts, max_new_tokens=12, batch_size=2, progress=False)
    single = generate_texts(model, tokenizer, prompts, max_new_tokens=12, batch_size=1, progress=False)
    assert batched == single and all(len(group) == 1 and group[0] for group in batched)


def test_load_questions_from_hub_dataset(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(name, config=None, split=None):
        calls.append((name, config, split))
        if name != "gsm8k":
            raise FileNotFoundError(f"Dataset '{name}' doesn't exist on the Hub")
        return datasets.Dataset.from_list([{"question": "What is 6 * 7?", "answer": "6 * 7 = 42\n#### 42"}] * 3)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    questions = load_questions(dataset="gsm8k", config="main", split="test", limit=2)
    assert calls == [("gsm8k", "main", "test")]
    assert [(q.id, q.question, q.reference) for q in questions] == [("0", "What is 6 * 7?", "42"),
        ("1", "What is 6 * 7?", "42")]
    with pytest.raises(InputError, match="nope/missing: cannot load Hub dataset"):
        load_questions(dataset="nope/missing")
