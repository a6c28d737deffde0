"""Claims: the rows ICM labels, in the ICM paper's format.

A claim says "``choice`` answers ``question`` correctly" (or, with ``choice_2``, "Response 1 is better
than Response 2"). ``consistency_id`` groups claims about one question, ``consistency_key`` (or
``answer``) is the final answer a claim asserts, and ``label`` is gold, kept only for evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from icm.config import check_claim_mode
from icm.data.answers import answers_match
from icm.data.io import InputError, read_records, text_value


@dataclass
class ClaimFields:
    """Column names in the input file (map your own with the CLI's ``--*-field`` flags)."""

    question: str = "question"
    choice: str = "choice"
    choice_2: str = "choice_2"
    consistency_id: str = "consistency_id"
    consistency_key: str = "consistency_key"
    """Falls back to ``answer`` when this column is absent."""
    label: str = "label"
    exactly_one: str = "exactly_one"
    """Optional boolean column: the group's claims enumerate a closed answer set, exactly one of them True."""


@dataclass(frozen=True)
class Claim:
    question: str
    choice: str
    choice_2: str | None = None
    group: str | None = None
    """Consistency group (``consistency_id``); None for a claim that stands alone."""
    key: str | None = None
    """The answer the claim asserts; None when unknown (no consistency rule applies)."""
    exactly_one: bool = False
    """The group enumerates every allowed answer, so exactly one of its claims is True."""


def parse_label(value: Any) -> bool | None:
    """Gold label as bool: accepts bools, 0/1 and the strings true/false/yes/no."""
    if value is None or (isinstance(value, float) and value != value):
        return None
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "t", "y"):
        return True
    if text in ("0", "false", "no", "f", "n"):
        return False
    raise ValueError(f"not a boolean label: {value!r}")


def claims_from_records(records: list[dict[str, Any]], path: str | Path = "<input>",
                        fields: ClaimFields | None = None) -> list[Claim]:
    """Validate rows and turn them into claims; errors name the file, row and field."""
    f = fields or ClaimFields()
    key_field = f.consistency_key if any(f.consistency_key in r for r in records) else "answer"
    claims = []
    required = (f.question, f.choice)
    for row, record in enumerate(records, start=1):
        text = {name: text_value(path, row, name, record.get(name), name in required)
                for name in (f.question, f.choice, f.choice_2, f.consistency_id, key_field)}
        claims.append(Claim(question=text[f.question], choice=text[f.choice], choice_2=text[f.choice_2],
                            group=text[f.consistency_id], key=text[key_field],
                            exactly_one=bool(record.get(f.exactly_one) or False)))
    return claims


def gold_labels(records: list[dict[str, Any]], path: str | Path = "<input>",
                field: str = "label") -> list[bool | None] | None:
    """Gold labels for evaluation, or None when the column is absent. The search never sees them."""
    if not any(field in r for r in records):
        return None
    labels = []
    for row, record in enumerate(records, start=1):
        try:
            labels.append(parse_label(record.get(field)))
        except ValueError as error:
            raise InputError(path, str(error), row=row, field=field) from None
    return labels


def load_claims(path: str | Path, fields: ClaimFields | None = None) -> tuple[list[dict[str, Any]], list[Claim]]:
    """Read a claims file; returns the raw rows (kept for the output) and the parsed claims."""
    records = read_records(path)
    return records, claims_from_records(records, path, fields)


# ---- claims about answers, built from candidate solutions --------------------------------------------------

ANSWER_CLAIM = "The answer is {answer}."


@dataclass
class AnswerClaims:
    """Claims about final answers built from candidate rows, and how their labels map back to the candidates.

    ``rows`` are claim rows in the paper's format (``question``, ``choice``, ``answer``, ``consistency_id``,
    ``exactly_one``, gold ``label`` when known). ``source[k]`` says which claim decides candidate ``k``:
    ``(claim index, True)`` when the claim asserts the candidate's answer, ``(claim index, False)`` when the
    claim asserts the other answer of a two-way question, None when the candidate states no allowed answer
    (it is labelled False)."""

    rows: list[dict[str, Any]]
    source: list[tuple[int, bool] | None]


def answer_claims(records: list[dict[str, Any]], mode: str, options: tuple[str, ...] | None = None) -> AnswerClaims:
    """Turn candidate rows (``icm generate``'s output) into claims about their final answers.

    - ``answers``: one claim "The answer is X." per distinct answer of a question; with a closed answer set
      (``options``) every allowed answer gets a claim and the group is marked ``exactly_one``.
    - ``pivot``: a closed two-way question gets one claim, about ``options[0]``; its label decides both answers.
      Every claim then has the same wording, so no word in the claim predicts its label (with one claim per
      allowed answer, "the claim that says positive is True" is a consistent, perfectly predictable labelling).
    Candidates with the same answer share a label either way (the paper's "same answer, same label" rule)."""
    if mode not in ("answers", "pivot"):
        raise ValueError(f"answer claims are built in mode 'answers' or 'pivot', not {mode!r}")
    check_claim_mode(mode, options)
    groups: dict[Any, list[int]] = {}
    for k, record in enumerate(records):
        groups.setdefault(record["consistency_id"], []).append(k)
    rows: list[dict[str, Any]] = []
    source: list[tuple[int, bool] | None] = [None] * len(records)
    for cid, members in groups.items():
        first = records[members[0]]
        sampled = [a for a in dict.fromkeys(str(records[k].get("answer") or "") for k in members) if a]
        if mode == "pivot":
            asserted = [options[0]]  # type: ignore[index]
        elif options:
            asserted = list(options)
        else:
            asserted = sampled
        index = {}
        for answer in asserted:
            index[answer] = len(rows)
            rows.append({"question": first["question"], "choice": ANSWER_CLAIM.format(answer=answer),
                         "answer": answer, "consistency_id": cid, "exactly_one": bool(options) and mode == "answers",
                         "label": _answer_gold(records, members, answer)})
        for k in members:
            answer = str(records[k].get("answer") or "")
            if answer in index:
                source[k] = (index[answer], True)
            elif mode == "pivot" and answer == options[1]:  # type: ignore[index]
                source[k] = (index[options[0]], False)  # type: ignore[index]
    if all(row["label"] is None for row in rows):
        for row in rows:
            del row["label"]
    return AnswerClaims(rows, source)


def _answer_gold(records: list[dict[str, Any]], members: list[int], answer: str) -> bool | None:
    """Gold label of "the answer is ``answer``": a candidate's gold label with that answer, else the reference."""
    for k in members:
        if str(records[k].get("answer") or "") == answer and records[k].get("label") is not None:
            return bool(records[k]["label"])
    reference = records[members[0]].get("reference")
    return None if reference is None else answers_match(answer, str(reference))
