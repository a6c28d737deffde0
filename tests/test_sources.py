"""The label-free alternatives to ICM (icm/sources.py): majority vote, the model as a judge, confidence."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from icm.backends import Backend, InProcessBackend
from icm.cli import app
from icm.config import GenerationConfig, SourceConfig
from icm.data.candidates import Completion
from icm.data.claims import claims_from_records
from icm.data.io import read_records
from icm.models import load_model
from icm.sources import judge_labels, judge_template, majority_labels, mean_logprobs

runner = CliRunner()


class Voter(Backend):
    """Answers each prompt with a fixed list of sampled texts (the votes), and scores from a fixed table."""

    def __init__(self, votes: dict[str, list[str]], scores: dict[str, float] | None = None, tokenizer=None):
        self.votes, self.scores, self.tokenizer, self.asked = votes, scores or {}, tokenizer, []

    def sample_completions(self, prompts, *, num_samples=1, **kwargs):
        self.asked.append((list(prompts), num_samples, kwargs))
        return [[Completion(t, 3, i, j) for j, t in enumerate(self.votes[p][:num_samples])]
                for i, p in enumerate(prompts)]

    def scorer(self, claims, template, max_context_tokens, batch_size, prefix_versions=2, lane=None):
        table = self.scores

        class Fixed:
            forward_tokens = 0

            def score(self, targets, demos=(), slot=None):
                return np.array([table[claims[t].choice] for t in targets])

        return Fixed()


def rows(questions: dict[str, list[tuple[str, str, bool]]]) -> list[dict]:
    out = []
    for cid, (prompt, candidates) in enumerate(questions.items()):
        out += [{"question": prompt, "prompt": prompt, "choice": text, "answer": answer, "consistency_id": cid,
                 "label": gold} for text, answer, gold in candidates]
    return out


def test_majority_marks_the_most_voted_answer_and_abstains_on_ties_and_silence():
    records = rows({
        "q0": [("it is 4", "4", True), ("four: 4", "4", True), ("5", "5", False)],  # 4 wins 3 to 1
        "q1": [("7", "7", False), ("8", "8", True)],                           # 7 and 8 tie: no True
        "q2": [("1", "1", True), ("2", "2", False)],                           # no vote states an answer
        "q3": [("9", "9", False), ("10", "10", True)],                         # the winner, 11, is no candidate
        "q4": [("6", "6", True)],                                              # a single answer, voted for
    })
    votes = {"q0": ["The answer is 4", "4.", "The answer is 5", "4"], "q1": ["7", "8", "7", "8"],
             "q2": ["no idea", "hmm", "", "?"], "q3": ["11", "11", "9", "11"], "q4": ["6", "6", "x", "y"]}
    backend = Voter(votes)
    results, summary = majority_labels(records, backend, GenerationConfig(extractor="last_number", temperature=0.0),
                                       SourceConfig(vote_samples=4, vote_temperature=0.7),
                                       gold=[r["label"] for r in records], progress=False)
    labels = [r["icm_label"] for r in results]
    assert labels == [True, True, False, False, False, False, False, False, False, True]
    assert [r["icm_score"] for r in results][:3] == [0.75, 0.75, 0.25] and results[3]["icm_score"] == 0.5
    assert not any(r["icm_searched"] for r in results)
    assert summary["ties"] == 1 and summary["no_votes"] == 1 and summary["winner_not_a_candidate"] == 1
    assert summary["single_answer"] == 1 and summary["questions"] == 5 and summary["method"] == "majority"
    assert summary["gold_accuracy"] == pytest.approx(np.mean([y == r["label"] for y, r in zip(labels, records)]))
    prompts, k, kwargs = backend.asked[0]
    assert prompts == ["q0", "q1", "q2", "q3", "q4"] and k == 4 and kwargs["temperature"] == 0.7


def test_majority_votes_at_the_generation_temperature_by_default():
    backend = Voter({"q": ["1", "1"]})
    majority_labels(rows({"q": [("1", "1", True), ("2", "2", False)]}), backend,
                    GenerationConfig(extractor="last_number", temperature=0.9), SourceConfig(vote_samples=2),
                    progress=False)
    assert backend.asked[0][2]["temperature"] == 0.9


def test_judge_keeps_at_most_one_true_answer_per_question_and_centers_scores(tiny):
    records = rows({"q0": [("a 4", "4", True), ("b 4", "4", True), ("c 5", "5", False)],
                    "q1": [("d 7", "7", False), ("e 8", "8", True)]})
    scores = {"a 4": 3.0, "b 4": 1.0, "c 5": 2.5, "d 7": -4.0, "e 8": -3.0}
    backend = Voter({}, scores, tokenizer=tiny[1])
    results, summary = judge_labels(records, backend, "last_number", balance="none")
    # q0: answer 4 averages 2.0 < 2.5 of answer 5, so 5 is the one True answer; q1: the best (-3) is below 0
    assert [r["icm_label"] for r in results] == [False, False, True, False, False]
    centered, _ = judge_labels(records, backend, "last_number", balance="center")
    mean = np.mean(list(scores.values()))
    assert [r["icm_score"] for r in centered] == pytest.approx([v - mean for v in scores.values()])
    assert [r["icm_label"] for r in centered] == [False, False, True, False, False]  # q1's best, -2.9, stays < 0
    assert summary["method"] == "judge"


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_model(tiny_model_dir, dtype="fp32")


def test_judge_template_asks_through_the_chat_template_and_keeps_braces_literal(tiny):
    _, tokenizer = tiny
    template = judge_template(tokenizer, question="Q {question} | A {choice} | set {{x}}? {true_word}/{false_word}")
    claim = claims_from_records([{"question": "2+2", "choice": "4"}])[0]
    prompt = template.render(claim)
    words = f"{template.true_word}/{template.false_word}"
    assert f"Q 2+2 | A 4 | set {{x}}? {words}" in prompt and words in ("Yes/No", "True/False")
    if tokenizer.chat_template:
        assert prompt.endswith(tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False,
                                                             add_generation_prompt=True).split("x")[-1])
        assert template.space == "prompt"
    plain = type(tokenizer).from_pretrained(tokenizer.name_or_path)
    plain.chat_template = None
    assert judge_template(plain).render(claim).endswith("\nAnswer:")


def test_mean_logprobs_match_one_at_a_time_and_a_direct_computation(tiny):
    import torch

    model, tokenizer = tiny
    backend = InProcessBackend(model, tokenizer)
    prompts, completions = ["What is 2 + 3?", "Name a colour."], ["The answer is 5.", "Blue"]
    batched = mean_logprobs(backend, prompts, completions, use_chat_template=False, batch_size=2)
    single = [mean_logprobs(backend, [p], [c], use_chat_template=False)[0] for p, c in zip(prompts, completions)]
    assert batched == pytest.approx(single, abs=1e-5)
    head = tokenizer(prompts[1] + "\nAnswer:").input_ids
    tail = tokenizer("Blue", add_special_tokens=False).input_ids
    with torch.inference_mode():
        logp = torch.log_softmax(model(torch.tensor([head + tail])).logits[0].float(), -1)
    direct = np.mean([float(logp[len(head) + k - 1, t]) for k, t in enumerate(tail)])
    assert single[1] == pytest.approx(direct, abs=1e-5)


@pytest.mark.parametrize("method", ["majority", "judge", "confidence"])
def test_label_cli_method_writes_labels_like_icm(tiny_model_dir, tmp_path, method):
    from icm.data.tasks import arithmetic_questions
    from icm.generate import generate_file

    candidates = tmp_path / "candidates.parquet"
    generate_file(arithmetic_questions(3), candidates, tiny_model_dir,
                  GenerationConfig(num_candidates=3, temperature=1.0, max_new_tokens=6, batch_size=9,
                                   include_reference=True), dtype="fp32", progress=False)
    out = tmp_path / "labels.parquet"
    result = runner.invoke(app, ["label", str(candidates), "-o", str(out), "-m", tiny_model_dir, "--dtype", "fp32",
                                 "--method", method, "--vote-samples", "3", "--vote-temperature", "1.0", "-q"])
    assert result.exit_code == 0, result.output
    labelled = read_records(out)
    assert {"icm_label", "icm_score", "icm_searched"} <= set(labelled[0]) and len(labelled) == len(
        read_records(candidates))
    run = json.loads((tmp_path / "labels.run" / "run.json").read_text())
    assert run["method"] == method
    by_question: dict = {}
    for r in labelled:
        by_question.setdefault(r["consistency_id"], set()).add(r["answer"] if r["icm_label"] else None)
    assert all(len(answers - {None}) <= 1 for answers in by_question.values())  # at most one True answer


def test_bad_method_is_refused_before_anything_loads(tmp_path):
    src = tmp_path / "c.jsonl"
    src.write_text('{"question": "q", "choice": "c"}\n')
    result = runner.invoke(app, ["label", str(src), "-o", str(tmp_path / "o.parquet"), "--method", "vote"])
    assert result.exit_code == 2 and "'--method'" in result.output and not (tmp_path / "o.parquet").exists()

