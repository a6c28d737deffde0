"""Claims: the rows ICM labels, in the ICM paper's format.

A claim says "``choice`` answers ``question`` correctly" (or, with ``choice_2``, "Response 1 is better
than Response 2"). ``consistency_id`` groups claims about one question, ``consistency_key`` (or
``answer``) is the final answer a claim asserts, and ``label`` is gold, kept only for evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data.io import InputError, read_records


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


@dataclass(frozen=True)
class Claim:
    question: str
    choice: str
    choice_2: str | None = None
    group: str | None = None
    """Consistency group (``consistency_id``); None for a claim that stands alone."""
    key: str | None = None
    """The answer the claim asserts; None when unknown (no consistency rule applies)."""


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, float) and value != value:  # NaN from CSV/pandas
        return None
    text = str(value)
    return text if text.strip() else None


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
    for row, record in enumerate(records, start=1):
        question, choice = _text(record.get(f.question)), _text(record.get(f.choice))
        if question is None:
            raise InputError(path, "missing or empty", row=row, field=f.question)
        if choice is None:
            raise InputError(path, "missing or empty", row=row, field=f.choice)
        group = _text(record.get(f.consistency_id))
        claims.append(Claim(question=question, choice=choice, choice_2=_text(record.get(f.choice_2)),
                            group=group, key=_text(record.get(key_field))))
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
