"""icm eval: question accuracy with icm generate's prompt and extractors, claims accuracy, the paired bootstrap."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import icm.dpo.evaluation as evaluation
from icm.cli import app
from icm.config import DEFAULT_INSTRUCTION, EvalConfig
from icm.dpo.evaluation import evaluate, paired_bootstrap
from icm.models import load_model

QUESTIONS = [
    {"question": "Tom has 2 apples and gets 3 more. How many?", "answer": "2 + 3 = 5\n#### 5"},
    {"question": "Anna has 4 bags of 3 pens. How many pens?", "answer": "#### 12"},
    {"question": "Ben has 9 cards and gives 2 away. How many left?", "answer": "#### 7"},
    {"question": "Mia has 1,000 coins and finds 200. How many?", "answer": "#### 1200"},
]
# What a fake model answers: three right in different formats (incl. "1,200"), one wrong.
COMPLETIONS = {
    QUESTIONS[0]["question"]: "2 + 3 = 5. The answer is 5.",
    QUESTIONS[1]["question"]: "4 x 3 = \\boxed{12}",
    QUESTIONS[2]["question"]: "9 - 2 = 6. The answer is 6.",
    QUESTIONS[3]["question"]: "She has 1,200 coins. The answer is 1,200",
}



def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_question_accuracy_uses_generate_prompt_and_extractors(tiny_model_dir, tmp_path, monkeypatch):
    seen = {}

    def fake_generate_texts(model, tokenizer, prompts, **kwargs):
        seen.update(kwargs, prompts=prompts)
        return [[COMPLETIONS[p.split("Question: ", 1)[1]]] for p in prompts]

    monkeypatch.setattr(evaluation, "generate_texts", fake_generate_texts)
    path = write_jsonl(tmp_path / "q.jsonl", QUESTIONS)
    report = evaluate(tiny_model_dir, path, output=tmp_path / "report.json", items_output=tmp_path / "items.jsonl",
                      progress=False)
    assert report["accuracy"] == 0.75 and report["n"] == 4 and report["correct"] == 3
    assert [r["correct"] for r in report["results"]] == [True, True, False, True]
    assert seen["temperature"] == 0.0 and seen["use_chat_template"] is True
    assert seen["prompts"][0] == f"{DEFAULT_INSTRUCTION}\n\nQuestion: {QUESTIONS[0]['question']}"
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk["accuracy"] == 0.75 and on_disk["kind"] == "questions" and on_disk["config"]["num_shots"] == 4
    items = [json.loads(line) for line in (tmp_path / "items.jsonl").read_text().splitlines()]
    assert items[2]["answer"] == "6" and items[2]["reference"] == "7" and items[3]["answer"] == "1200"


def test_cli_eval_runs_the_tiny_model_and_writes_the_report(tiny_model_dir, tmp_path):
    out = tmp_path / "r" / "report.json"
    result = CliRunner().invoke(app, ["eval", "--model", tiny_model_dir, "--task", "arithmetic", "--limit", "3",
                                      "--max-new-tokens", "8", "--output", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["n"] == 3 and 0.0 <= report["accuracy"] <= 1.0 and len(report["results"]) == 3
    assert report["results"][0]["id"] == "arithmetic-0-0"
    assert json.loads(result.stdout)["accuracy"] == report["accuracy"]


def test_cli_eval_rejects_questions_without_reference(tiny_model_dir, tmp_path):
    path = write_jsonl(tmp_path / "q.jsonl", [QUESTIONS[0], {"question": "What is 1 + 1?"}])
    result = CliRunner().invoke(app, ["eval", str(path), "--model", tiny_model_dir, "--output",
                                      str(tmp_path / "report.json")])
    assert result.exit_code == 2
    assert "row 2, field 'answer'" in result.output
    assert not (tmp_path / "report.json").exists()


def test_claims_accuracy_matches_direct_true_false_scoring(tiny_model_dir, tmp_path):
    model, tokenizer = load_model(tiny_model_dir, dtype="fp32")
    claims = [{"question": q["question"], "choice": c, "consistency_id": i}
              for i, q in enumerate(QUESTIONS) for c in (COMPLETIONS[q["question"]], "I do not know.")]
    true_id = tokenizer.encode(" True", add_special_tokens=False)[0]
    false_id = tokenizer.encode(" False", add_special_tokens=False)[0]

    def zero_shot_log_odds(claim) -> float:
        text = f"Question: {claim['question']}\nClaim: {claim['choice']}\nI think this claim is"
        with torch.no_grad():
            logits = model(torch.tensor([tokenizer.encode(text, add_special_tokens=False)])).logits[0, -1]
        return (logits[true_id] - logits[false_id]).item()

    # Gold labels agree with the model's own zero-shot prediction on the first 5 claims and disagree on the
    # last 3, so a correct scorer must report exactly 5/8, with the same log-odds as a plain forward pass.
    log_odds = [zero_shot_log_odds(c) for c in claims]
    for i, claim in enumerate(claims):
        claim["label"] = (log_odds[i] > 0) == (i < 5)
    path = write_jsonl(tmp_path / "claims.jsonl", claims)
    report = evaluate(tiny_model_dir, path, config=EvalConfig(num_shots=0, batch_size=3),
                      loaded=(model, tokenizer), items_output=tmp_path / "items.jsonl")
    assert report["kind"] == "claims" and report["n"] == 8
    assert report["accuracy"] == pytest.approx(5 / 8)
    items = [json.loads(line) for line in (tmp_path / "items.jsonl").read_text().splitlines()]
    assert [it["log_odds"] for it in items] == pytest.approx(log_odds, abs=1e-4)

    few_shot = evaluate(tiny_model_dir, path, config=EvalConfig(num_shots=2), loaded=(model, tokenizer),
                        items_output=tmp_path / "items2.jsonl")
    items2 = [json.loads(line) for line in (tmp_path / "items2.jsonl").read_text().splitlines()]
    assert few_shot["n"] == 8 and [it["log_odds"] for it in items2] != pytest.approx(log_odds, abs=1e-4)


def test_paired_bootstrap():
    assert paired_bootstrap([False] * 5, [True] * 5) | {} == {"delta": 1.0, "ci_low": 1.0, "ci_high": 1.0,
                                                               "level": 0.95, "samples": 2000, "n": 5}
    same = paired_bootstrap([True, False, True], [True, False, True])
    assert same["delta"] == same["ci_low"] == same["ci_high"] == 0.0
    before = [True, False, False, False] * 10
    after = [True, True, False, False] * 10
    ci = paired_bootstrap(before, after, seed=1)
    assert ci["delta"] == pytest.approx(0.25) and 0.0 < ci["ci_low"] < 0.25 < ci["ci_high"] < 0.5
    with pytest.raises(ValueError):
        paired_bootstrap([True], [True, False])
