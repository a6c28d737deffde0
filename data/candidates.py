"""Candidate solutions as claims for ``icm label``: the claims schema, how candidates were sampled
(:class:`GenerationConfig`), the rows written for sampled completions (duplicates removed, closed answer sets
enumerated) and the diversity report. Sampling itself is the model's: ``icm.generate``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from icm.config import GenerationConfig
from icm.data.answers import answers_match, closed_answers, extract_answer, extract_closed, whole_word
from icm.data.tasks import Question

CLAIMS_SCHEMA = pa.schema([
    ("question", pa.string()),
    ("choice", pa.string()),
    ("answer", pa.string()),
    ("consistency_id", pa.int64()),
    ("label", pa.bool_()),
    ("prompt", pa.string()),
    ("reference", pa.string()),
    ("candidate_index", pa.int64()),
    ("generator", pa.string()),
    ("num_tokens", pa.int64()),
    ("question_id", pa.string()),
])


@dataclass
class Completion:
    """One sampled completion: its text (cut at the stop strings), the tokens generated, and which prompt and
    sample it is."""

    text: str
    num_tokens: int
    prompt_index: int = 0
    sample_index: int = 0


@dataclass
class GenerationStats:
    """Running totals for throughput: tokens generated, sequences sampled, seconds spent generating."""

    tokens: int = 0
    sequences: int = 0
    seconds: float = 0.0


def candidate_rows(questions: list[Question], prompts: list[str], completions: list[list[Completion]],
                   config: GenerationConfig, generator_name: str = "") -> list[dict]:
    """Claims rows for sampled completions (plus the reference solutions when asked), duplicates and empty
    completions (nothing to label or to train on) removed."""
    rows = []
    for cid, (q, prompt, group) in enumerate(zip(questions, prompts, completions, strict=True)):
        candidates = [(c.text, c.sample_index, c.num_tokens, generator_name) for c in group]
        if config.include_reference and q.solution:
            candidates.append((q.solution.strip(), -1, 0, "reference"))
        if config.enumerate_answers and (options := closed_answers(config.extractor)):
            candidates += [(text, -2, 0, "enumerated") for text in enumerated_answers(
                [c.text for c in group], options)]
        seen: set[str] = set()
        for text, index, num_tokens, generator in candidates:
            if not text or text in seen:
                continue
            seen.add(text)
            answer = extract_answer(text, config.extractor)
            if index == -1 and not answer:
                answer = q.reference or ""
            rows.append({
                "question": q.question, "choice": text, "answer": answer, "consistency_id": cid,
                "label": None if q.reference is None else answers_match(answer, q.reference),
                "prompt": prompt, "reference": q.reference, "candidate_index": index, "generator": generator,
                "num_tokens": num_tokens, "question_id": q.id,
            })
    return rows


def swap_answer(text: str, old: str, new: str) -> str:
    """``text`` with its first whole-word ``old`` replaced by ``new``, keeping the case of the first letter."""
    match = whole_word(old).search(text)
    if match is None:
        return new
    word = new[:1].upper() + new[1:] if match.group(0)[:1].isupper() else new
    return text[:match.start()] + word + text[match.end():]


def enumerated_answers(texts: list[str], options: tuple[str, ...]) -> list[str]:
    """Extra candidates that give the allowed answers none of ``texts`` gives: each text that states an allowed
    answer, with that answer swapped for the missing one (the bare answer when no text states any)."""
    stated = [(text, extract_closed(text, options)) for text in texts]
    given = {answer for _, answer in stated if answer}
    extra: list[str] = []
    for missing in (o for o in options if o not in given):
        swapped = [swap_answer(text, answer, missing) for text, answer in stated if answer] or [missing]
        extra += [t for t in dict.fromkeys(swapped) if t not in extra]
    return extra


def diversity_report(rows: list[dict], stats: GenerationStats, config: GenerationConfig,
                     sampled: int | None = None) -> dict[str, Any]:
    """How useful the candidates are for ICM: distinct answers per question, and how many questions have
    both a correct and an incorrect candidate (only those can yield gold-checkable preference pairs).
    ``sampled`` is the number of candidates sampled in all (default: ``stats.sequences``, this run's)."""
    sampled = stats.sequences if sampled is None else sampled
    groups: dict[int, list[dict]] = {}
    for row in rows:
        groups.setdefault(row["consistency_id"], []).append(row)
    generated = [r for r in rows if r["candidate_index"] >= 0]
    distinct = [len({r["answer"] for r in g if r["answer"]}) for g in groups.values()]
    with_gold = [g for g in groups.values() if g[0]["reference"] is not None]
    n_gold = len(with_gold)
    mixed = sum(any(r["label"] for r in g) and not all(r["label"] for r in g) for g in with_gold)
    graded = [r for r in generated if r["label"] is not None]
    report = {
        "questions": len(groups),
        "candidates_sampled": sampled,
        "claims": len(rows),
        "duplicates_removed": sampled - len(generated),
        "no_answer": sum(not r["answer"] for r in generated),
        "distinct_answers_mean": sum(distinct) / len(distinct) if distinct else 0.0,
        "distinct_answers_histogram": {str(k): distinct.count(k) for k in sorted(set(distinct))},
        "questions_with_reference": n_gold,
        "candidate_accuracy": sum(bool(r["label"]) for r in graded) / len(graded) if graded else None,
        "questions_any_correct": sum(any(r["label"] for r in g) for g in with_gold),
        "questions_mixed": mixed,
        "mixed_share": mixed / n_gold if n_gold else None,
        "tokens_generated": stats.tokens,
        "seconds": round(stats.seconds, 3),
        "tokens_per_second": stats.tokens / stats.seconds if stats.seconds else None,
        "config": asdict(config),
    }
    return report


def claims_table(rows: list[dict]) -> pa.Table:
    """Rows from :func:`generate_candidates` as an Arrow table with the claims schema (without the gold
    ``label`` column when no question has a reference answer)."""
    schema = CLAIMS_SCHEMA
    if all(row["label"] is None for row in rows):
        schema = schema.remove(schema.get_field_index("label"))
    return pa.Table.from_pylist(rows, schema=schema)


def report_path(output: str | Path) -> Path:
    return Path(output).with_suffix(".report.json")


def report_table(report: dict[str, Any]):
    """The diversity report as a rich table (for the terminal)."""
    from rich.table import Table

    def fmt(value: Any, spec: str = "") -> str:
        return "-" if value is None else format(value, spec)

    table = Table(title="icm generate", show_header=False)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in [
        ("questions", fmt(report["questions"])),
        ("candidates sampled", fmt(report["candidates_sampled"])),
        ("claims written (duplicates removed)", f"{report['claims']} ({report['duplicates_removed']})"),
        ("candidates without an answer", fmt(report["no_answer"])),
        ("distinct answers per question", fmt(report["distinct_answers_mean"], ".2f")),
        ("candidate accuracy (gold)", fmt(report["candidate_accuracy"], ".1%")),
        ("questions with a correct candidate", fmt(report["questions_any_correct"])),
        ("questions with correct and incorrect", f"{report['questions_mixed']} ({fmt(report['mixed_share'], '.0%')})"),
        ("tokens generated", fmt(report["tokens_generated"])),
        ("tokens / second", fmt(report["tokens_per_second"], ".1f")),
    ]:
        table.add_row(name, value)
    return table
