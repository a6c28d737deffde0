"""``icm eval``: a model's accuracy on held-out questions (greedy answers) or on labelled claims (few-shot).

Questions are answered greedily with the same prompt, stop strings and answer extractors as
``icm generate``; claims are scored like ICM does (log-odds of " True" vs " False" after ``num_shots``
demonstrations with gold labels, taken from other questions).
"""

from __future__ import annotations

import random
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from icm.config import EvalConfig, GenerationConfig
from icm.data.answers import answers_match, extract_answer
from icm.data.claims import claims_from_records, gold_labels
from icm.data.io import InputError, check_outputs, read_records, scrub_text, write_json
from icm.data.tasks import Question, load_questions
from icm.sampling import generate_texts, user_message


def evaluate_questions(questions: list[Question], model, tokenizer, config: EvalConfig | None = None,
                       progress: bool = True) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Greedy answers to ``questions`` (all with a reference answer); returns ``(summary, per-item results)``."""
    config = config or EvalConfig()
    prompts = [user_message(q.question, config.instruction) for q in questions]
    start = time.perf_counter()
    texts = generate_texts(model, tokenizer, prompts, temperature=0.0, max_new_tokens=config.max_new_tokens,
                           stop=GenerationConfig().stop, batch_size=config.batch_size,
                           use_chat_template=config.use_chat_template, progress=progress, description="evaluating")
    items = []
    for q, group in zip(questions, texts, strict=True):
        answer = extract_answer(group[0], config.extractor)
        items.append({"id": q.id, "question": q.question, "reference": q.reference, "completion": group[0],
                      "answer": answer, "correct": bool(answer) and answers_match(answer, q.reference)})
    return _summary("questions", items, time.perf_counter() - start), items


def evaluate_claims(records: list[dict[str, Any]], model, tokenizer, config: EvalConfig | None = None,
                    source: str | Path = "<claims>") -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Label accuracy on claims with gold ``label``s, each scored after ``num_shots`` gold demonstrations.

    Claims are split into folds by question (``consistency_id``); a fold's claims share one seeded draw of
    demonstrations from the other folds, so they share one prefix cache (``icm.scoring.ClaimScorer``).
    """
    from icm.scoring import ClaimScorer

    config = config or EvalConfig()
    claims = claims_from_records(records, source)
    gold = gold_labels(records, source)
    if gold is None:
        raise InputError(source, "claims need a gold 'label' column to be evaluated", field="label")
    for row, label in enumerate(gold, start=1):
        if label is None:
            raise InputError(source, "missing gold label", row=row, field="label")
    groups: dict[str, list[int]] = {}
    for i, claim in enumerate(claims):
        groups.setdefault(claim.group if claim.group is not None else f"\0{i}", []).append(i)
    group_keys = sorted(groups)
    rng = random.Random(config.seed)
    rng.shuffle(group_keys)
    n_folds = min(len(group_keys), 8)
    folds = [[i for k in group_keys[f::n_folds] for i in groups[k]] for f in range(n_folds)]
    scorer = ClaimScorer(model, tokenizer, claims, batch_size=config.batch_size)
    start = time.perf_counter()
    scores: dict[int, float] = {}
    for f, targets in enumerate(folds):
        others = [i for g, fold in enumerate(folds) if g != f for i in fold]
        demos = [(i, bool(gold[i])) for i in rng.sample(others, min(config.num_shots, len(others)))]
        scores.update(zip(targets, scorer.score(targets, demos).tolist()))
    items = []
    for i, claim in enumerate(claims):
        record = records[i]
        predicted = scores[i] > 0
        items.append({"id": str(record.get("question_id", record.get("consistency_id", i))) + f"#{i}",
                      "question": claim.question, "choice": claim.choice, "label": bool(gold[i]),
                      "predicted": predicted, "log_odds": scores[i], "correct": predicted == gold[i]})
    summary = _summary("claims", items, time.perf_counter() - start)
    summary["predicted_true_share"] = float(np.mean([it["predicted"] for it in items]))
    summary["gold_true_share"] = float(np.mean([it["label"] for it in items]))
    return summary, items


def _summary(kind: str, items: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
    correct = sum(it["correct"] for it in items)
    return {"kind": kind, "accuracy": correct / len(items) if items else 0.0, "n": len(items), "correct": correct,
            "seconds": round(seconds, 3)}


def is_claims_file(records: list[dict[str, Any]]) -> bool:
    return "choice" in records[0] and "label" in records[0]


def evaluate(
    model: str,
    input: str | Path | None = None,
    *,
    task: str | None = None,
    config: EvalConfig | None = None,
    output: str | Path | None = None,
    items_output: str | Path | None = None,
    question_field: str = "question",
    answer_field: str = "answer",
    id_field: str | None = None,
    dtype: str = "auto",
    loaded: tuple[Any, Any] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate ``model`` on a questions file, a built-in ``task`` or a claims file (auto-detected: rows with
    ``choice`` and ``label``). Writes the JSON report to ``output`` (atomically) and the per-item results to
    ``items_output`` (JSONL) when given; returns the report, whose ``results`` list each item's correctness.
    ``loaded`` is an already loaded ``(model, tokenizer)`` to use instead of loading ``model``.
    """
    from icm.dpo.training import load_trained_model

    config = config or EvalConfig()
    source = str(input) if input is not None else f"task:{task}"
    records = read_records(input) if input is not None else None
    check_outputs({"the output": output, "the per-item file": items_output}, [input])
    claims = records is not None and is_claims_file(records)
    if claims:  # every input error is found before the model loads
        claims_from_records(records, source)
        gold_labels(records, source)
    else:
        questions = load_questions(str(input) if input is not None else None, task=task,
                                   question_field=question_field, answer_field=answer_field, id_field=id_field,
                                   limit=config.limit, seed=config.seed)
        for row, q in enumerate(questions, start=1):
            if q.reference is None:
                raise InputError(source, "no reference answer to compare with", row=row, field=answer_field)
    model_obj, tokenizer = loaded or load_trained_model(model, dtype=dtype)
    if claims:
        summary, items = evaluate_claims(records[:config.limit], model_obj, tokenizer, config, source=source)
    else:
        summary, items = evaluate_questions(questions, model_obj, tokenizer, config, progress=progress)
    return _write_report(summary, items, model, source, config, output, items_output)


def evaluate_question_list(questions: list[Question], model: str, config: EvalConfig | None = None, *,
                           source: str = "<questions>", output: str | Path | None = None,
                           items_output: str | Path | None = None, dtype: str = "auto",
                           progress: bool = True) -> dict[str, Any]:
    """:func:`evaluate` for questions already loaded (``icm transfer``'s held-out split)."""
    from icm.dpo.training import load_trained_model

    config = config or EvalConfig()
    model_obj, tokenizer = load_trained_model(model, dtype=dtype)
    summary, items = evaluate_questions(questions, model_obj, tokenizer, config, progress=progress)
    return _write_report(summary, items, model, source, config, output, items_output)


def _write_report(summary: dict[str, Any], items: list[dict[str, Any]], model: str, source: str,
                  config: EvalConfig, output: str | Path | None, items_output: str | Path | None) -> dict[str, Any]:
    report = {**summary, "model": model, "input": source, "config": asdict(config),
              "results": [{"id": it["id"], "correct": it["correct"]} for it in items]}
    if items_output is not None:
        write_jsonl(items_output, items)
        report["items_file"] = str(items_output)
    if output is not None:
        write_json(output, report)
    return report


def write_jsonl(path: str | Path, rows: list[dict[str, Any]]) -> None:
    import json

    from icm.data.io import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(scrub_text("".join(json.dumps(r, default=str) + "\n" for r in rows)), encoding="utf-8")


def paired_bootstrap(before: list[bool], after: list[bool], samples: int = 2000, level: float = 0.95,
                     seed: int = 0) -> dict[str, float]:
    """Accuracy change ``after - before`` on the same items, with a percentile CI from resampling items."""
    if len(before) != len(after) or not before:
        raise ValueError("paired bootstrap needs two equally long, non-empty result lists")
    diff = np.asarray(after, dtype=float) - np.asarray(before, dtype=float)
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), size=(samples, len(diff)))].mean(axis=1)
    tail = (1 - level) / 2
    return {"delta": float(diff.mean()), "ci_low": float(np.quantile(means, tail)),
            "ci_high": float(np.quantile(means, 1 - tail)), "level": level, "samples": samples, "n": len(diff)}
