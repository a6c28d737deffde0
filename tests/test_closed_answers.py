"""Closed-answer tasks: the built-in sentiment task, closed extractors, enumerated answers, answer claims
(answers / pivot), the exactly-one rule, and labels copied back to candidates."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from icm.cli import app
from icm.config import GenerationConfig
from icm.consistency import build_constraints
from icm.data.answers import check_extractor, closed_answers, extract_answer
from icm.data.candidates import candidate_rows, enumerated_answers, swap_answer
from icm.data.claims import answer_claims, claims_from_records
from icm.data.io import read_records
from icm.data.tasks import SENTIMENT_FILE, get_task, load_questions
from icm.label import candidate_labels

OPTIONS = ("positive", "negative")


def test_sentiment_task_loads_offline_with_its_references():
    lines = [line.rsplit("\t", 1) for line in SENTIMENT_FILE.read_text(encoding="utf-8").splitlines()]
    assert len(lines) == 1000 and sum(label.strip() == "1" for _, label in lines) == 500
    questions = load_questions(task="sentiment", limit=50, seed=3)
    assert len({q.id for q in questions}) == 50
    for q in questions:
        sentence, label = lines[int(q.id.split("-")[1]) - 1]
        assert f'"{sentence.strip()}"' in q.question
        assert q.reference == ("positive" if label.strip() == "1" else "negative")
    assert [q.id for q in load_questions(task="sentiment", limit=50, seed=3)] == [q.id for q in questions]
    assert [q.id for q in load_questions(task="sentiment", limit=50, seed=4)] != [q.id for q in questions]
    assert get_task("sentiment").extractor == "positive|negative"


def test_capitals_task_reads_the_capital_a_free_text_answer_names():
    task = get_task("capitals")
    questions = load_questions(task="capitals", limit=200, seed=1)
    assert len(questions) == 141 and len({q.id for q in questions}) == 141
    france = next(q for q in questions if q.question == "What is the capital of France?")
    assert france.reference == "paris"
    assert extract_answer("Answer:\nThe capital of France is Paris, a city on the Seine.", task.extractor) == "paris"
    assert extract_answer("It is Lyon, I think.", task.extractor) == ""  # no capital of the table: no final answer
    assert extract_answer("Not Berlin but Paris", task.extractor) == "berlin"  # the first one named
    for q in questions:  # every reference is what the extractor reads from the bare capital
        assert extract_answer(f"{q.solution}.", task.extractor) == q.reference
    assert [q.id for q in load_questions(task="capitals", limit=5, seed=1)] == [q.id for q in questions[:5]]


def test_closed_extractor_reads_the_first_allowed_answer_as_a_whole_word():
    assert closed_answers("Positive|negative") == OPTIONS and closed_answers("auto") is None
    assert extract_answer("Positive.", "positive|negative") == "positive"
    assert extract_answer("The sentiment is NEGATIVE, not positive", "positive|negative") == "negative"
    assert extract_answer("positively neutral", "positive|negative") == ""
    with pytest.raises(ValueError, match="distinct"):
        check_extractor("a|a")
    with pytest.raises(ValueError, match="unknown extractor"):
        check_extractor("nope")


def test_enumerated_answers_swap_the_answer_word_and_keep_its_case():
    assert swap_answer("The review is Positive.", "positive", "negative") == "The review is Negative."
    texts = ["Positive.", "It is positive.", "Positive."]
    assert enumerated_answers(texts, OPTIONS) == ["Negative.", "It is negative."]
    assert enumerated_answers(["Positive.", "negative"], OPTIONS) == []
    assert enumerated_answers(["no idea"], OPTIONS) == ["positive", "negative"]


def _candidates(enumerate_answers: bool) -> list[dict]:
    from icm.data.candidates import Completion
    from icm.data.tasks import Question

    questions = [Question("a", "Great phone?", "positive"), Question("b", "Broke in a day?", "negative")]
    completions = [[Completion("Positive.", 2, 0, 0), Completion("Positive.", 2, 0, 1)],
                   [Completion("Positive!", 2, 1, 0), Completion("hmm", 2, 1, 1)]]
    config = GenerationConfig(extractor="positive|negative", enumerate_answers=enumerate_answers)
    return candidate_rows(questions, ["pa", "pb"], completions, config, "m")


def test_candidate_rows_enumerate_missing_answers_with_gold():
    plain = _candidates(False)
    assert [(r["choice"], r["answer"], r["label"]) for r in plain] == [
        ("Positive.", "positive", True), ("Positive!", "positive", False), ("hmm", "", False)]
    rows = _candidates(True)
    extra = [r for r in rows if r["candidate_index"] == -2]
    assert [(r["question_id"], r["choice"], r["answer"], r["label"], r["generator"]) for r in extra] == [
        ("a", "Negative.", "negative", False, "enumerated"), ("b", "Negative!", "negative", True, "enumerated")]


def test_answer_claims_modes_and_the_map_back_to_candidates():
    rows = _candidates(True)
    answers = answer_claims(rows, "answers", OPTIONS)
    assert [(r["consistency_id"], r["choice"], r["label"], r["exactly_one"]) for r in answers.rows] == [
        (0, "The answer is positive.", True, True), (0, "The answer is negative.", False, True),
        (1, "The answer is positive.", False, True), (1, "The answer is negative.", True, True)]
    claims = claims_from_records(answers.rows)
    assert {c.kind for c in build_constraints(claims)} == {"exactly_one"}
    pivot = answer_claims(rows, "pivot", OPTIONS)
    assert [(r["choice"], r["label"]) for r in pivot.rows] == [("The answer is positive.", True),
                                                               ("The answer is positive.", False)]
    assert build_constraints(claims_from_records(pivot.rows)) == []
    # One pivot claim per question decides all its candidates; "hmm" states no answer and is False.
    labelled = [{**r, "icm_label": y, "icm_score": s, "icm_searched": True}
                for r, y, s in zip(pivot.rows, [True, False], [2.0, -1.5])]
    out = [{**row, **result} for row, result in zip(rows, candidate_labels(pivot, labelled))]
    assert [(r["choice"], r["icm_label"], r["icm_score"]) for r in out] == [
        ("Positive.", True, 2.0), ("Negative.", False, -2.0), ("Positive!", False, -1.5), ("hmm", False, -2.5),
        ("Negative!", True, 1.5)]
    assert [r["icm_label"] for r in out] == [r["label"] for r in rows]  # right labels in, right labels out
    with pytest.raises(ValueError, match="two-way"):
        answer_claims(rows, "pivot", ("a", "b", "c"))


def test_open_answers_get_one_claim_per_distinct_answer_with_exclusive_rules():
    rows = [{"question": "q", "choice": c, "answer": a, "consistency_id": 0, "label": a == "4"}
            for c, a in [("2+2=4", "4"), ("it is 4", "4"), ("5", "5")]]
    answers = answer_claims(rows, "answers")
    assert [(r["answer"], r["label"], r["exactly_one"]) for r in answers.rows] == [("4", True, False),
                                                                                   ("5", False, False)]
    assert answers.source == [(0, True), (0, True), (1, True)]
    assert {c.kind for c in build_constraints(claims_from_records(answers.rows))} == {"exclusive"}


def test_label_cli_pivot_claims_label_candidates_consistently(tiny_model_dir, tmp_path):
    source = tmp_path / "cand.jsonl"
    rows = [{"question": f"Review {i}?", "choice": text, "answer": answer, "consistency_id": i,
             "label": answer == ("positive" if i % 2 else "negative")}
            for i in range(6) for text, answer in [("Positive.", "positive"), ("Negative.", "negative")]]
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "labels.parquet"
    result = CliRunner().invoke(app, ["label", str(source), "-o", str(out), "--model", tiny_model_dir,
                                      "--claims", "pivot", "--answers", "positive|negative", "--iterations", "8",
                                      "--dtype", "fp32"])
    assert result.exit_code == 0, result.output
    labelled = read_records(out)
    assert len(labelled) == 12
    for i in range(6):
        pos, neg = labelled[2 * i], labelled[2 * i + 1]
        assert pos["icm_label"] != neg["icm_label"] and pos["icm_score"] == -neg["icm_score"]
        assert pos["icm_claim"] == neg["icm_claim"] == "The answer is positive."
    run = json.loads((tmp_path / "labels.run" / "run.json").read_text())
    assert run["claims_mode"] == "pivot" and run["answer_claims"] == 6
    assert run["gold_accuracy"] == pytest.approx(
        sum(r["icm_label"] == r["label"] for r in labelled) / len(labelled))
    assert len(json.loads((tmp_path / "labels.run" / "claims.json").read_text())) == 6


def test_pivot_claims_without_a_two_way_answer_set_fail_before_any_model_runs(tmp_path):
    source = tmp_path / "cand.jsonl"
    source.write_text(json.dumps({"question": "q", "choice": "Positive.", "answer": "positive",
                                  "consistency_id": 0}) + "\n")
    out = tmp_path / "labels.parquet"
    result = CliRunner().invoke(app, ["label", str(source), "-o", str(out), "--model", "no-such-model",
                                      "--claims", "pivot"])
    assert result.exit_code == 2 and "two-way answer set" in result.output and str(source) in result.output
    assert not out.exists()
    result = CliRunner().invoke(app, ["transfer", "--task", "arithmetic", "--labeller", "no-such-model",
                                      "--policy", "no-such-model", "--output-dir", str(tmp_path / "run"),
                                      "--claims", "pivot"])
    assert result.exit_code == 2 and "two-way answer set" in result.output
    assert not (tmp_path / "run").exists()
