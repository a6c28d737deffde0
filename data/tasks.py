"""Questions to generate candidates for: from a table file, a Hub dataset, or a built-in offline task."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from icm.config import DEFAULT_INSTRUCTION
from icm.data.answers import extract_answer, normalize_answer
from icm.data.io import InputError, read_records, require_fields, text_value

DEFAULT_TASK_SIZE = 100


@dataclass
class Question:
    """One question; ``reference`` is its normalised gold answer (or None), ``solution`` a worked reference
    solution (the raw answer text), when the source has one."""

    id: str
    question: str
    reference: str | None
    solution: str | None = None


def reference_answer(raw: Any) -> str | None:
    """Normalised answer key of a reference answer field: a marked answer (``#### N``, ``\\boxed{}``,
    "the answer is"), else the whole value when it is short, else the last number."""
    if raw is None or (isinstance(raw, float) and raw != raw):
        return None
    text = str(raw).strip()
    if not text:
        return None
    for method in ("gsm8k", "boxed", "answer_is"):
        if answer := extract_answer(text, method):
            return answer
    if "\n" not in text and len(text) <= 80:
        return normalize_answer(text)
    return extract_answer(text, "last_number") or None


def _load_hub(dataset: str, config: str | None, split: str) -> list[dict[str, Any]]:
    import datasets

    try:
        ds = datasets.load_dataset(dataset, config, split=split)
    except Exception as error:  # network, unknown name or split: all user errors here
        message = f"cannot load Hub dataset ({type(error).__name__}: {error})".splitlines()[0]
        raise InputError(dataset, message) from None
    return ds.to_list()


def load_questions(
    path: str | None = None,
    *,
    task: str | None = None,
    dataset: str | None = None,
    config: str | None = None,
    split: str = "train",
    question_field: str = "question",
    answer_field: str = "answer",
    id_field: str | None = None,
    limit: int | None = None,
    seed: int = 0,
    shuffle: bool = False,
) -> list[Question]:
    """Load questions from exactly one of ``path`` (JSONL/JSON/CSV/Parquet), ``task`` (built-in, offline) or
    ``dataset`` (Hub, via ``datasets.load_dataset``). ``answer_field`` is optional: when the rows have it, it
    gives the reference answer and solution. ``shuffle`` draws the ``limit`` questions at random with ``seed``
    instead of taking the first ones."""
    sources = [s for s in (path, task, dataset) if s]
    if len(sources) != 1:
        raise ValueError("give exactly one of an input file, --task or --dataset")
    if task:
        return get_task(task).questions(limit or DEFAULT_TASK_SIZE, seed)
    source = str(path or dataset)
    records = read_records(path) if path else _load_hub(dataset, config, split)  # type: ignore[arg-type]
    if not records:
        raise InputError(source, "no rows")
    require_fields(source, records, [question_field] + ([id_field] if id_field else []))
    order = list(range(len(records)))
    if shuffle:
        random.Random(seed).shuffle(order)
    if limit is not None:
        order = order[:limit]
    questions, seen = [], set()
    for i in order:
        record = records[i]
        qid = text_value(source, i + 1, id_field, record[id_field]) if id_field else str(i)
        if qid in seen:
            raise InputError(source, f"duplicate id '{qid}'", row=i + 1, field=id_field)
        seen.add(qid)
        solution = text_value(source, i + 1, answer_field, record.get(answer_field), required=False)
        question = text_value(source, i + 1, question_field, record[question_field]).strip()
        questions.append(Question(qid, question, reference_answer(solution), solution))
    return questions


# ---- built-in offline task: arithmetic word problems with known answers -----------------

NAMES = ["Tom", "Anna", "Ben", "Lily", "Sam", "Mia", "Max", "Emma", "Leo", "Zoe", "Jack", "Nora"]
ITEMS = ["apples", "pencils", "marbles", "cookies", "stickers", "books", "balloons", "shells", "cards", "coins"]


def _together(r: random.Random, name: str, item: str) -> tuple[str, int, str]:
    a, b, other = r.randint(2, 6), r.randint(2, 6), r.choice([n for n in NAMES if n != name])
    return (f"{name} has {a} {item} and {other} has {b} {item}. How many {item} do they have together?",
            a + b, f"Together they have {a} + {b} = {a + b} {item}.")


def _more(r: random.Random, name: str, item: str) -> tuple[str, int, str]:
    a, b = r.randint(2, 9), r.randint(2, 5)
    return (f"{name} has {a} {item}. {name} gets {b} more {item}. How many {item} does {name} have now?",
            a + b, f"{name} has {a} + {b} = {a + b} {item}.")


def _mul(r: random.Random, name: str, item: str) -> tuple[str, int, str]:
    a, b = r.randint(2, 4), r.randint(2, 5)
    return (f"{name} has {a} bags with {b} {item} in each bag. How many {item} does {name} have in total?",
            a * b, f"{name} has {a} x {b} = {a * b} {item}.")


def _sub(r: random.Random, name: str, item: str) -> tuple[str, int, str]:
    b = r.randint(2, 4)
    a = b + r.randint(2, 5)
    return (f"{name} has {a} {item}. {name} gives away {b} {item}. How many {item} does {name} have left?",
            a - b, f"{name} has {a} - {b} = {a - b} {item} left.")


def _twice(r: random.Random, name: str, item: str) -> tuple[str, int, str]:
    a, other = r.randint(2, 6), r.choice([n for n in NAMES if n != name])
    return (f"{name} has {a} {item}. {other} has twice as many {item} as {name}. How many {item} does {other} "
            "have?", 2 * a, f"{other} has 2 x {a} = {2 * a} {item}.")


# One operation on single digits, so that a small model gets some right and some wrong: the questions then have
# both correct and incorrect candidates (two-step problems are nearly always wrong for a 135M model).
TEMPLATES: list[Callable[[random.Random, str, str], tuple[str, int, str]]] = [_together, _more, _mul, _sub, _twice]


def arithmetic_questions(n: int, seed: int = 0) -> list[Question]:
    """``n`` word problems with one operation on small numbers, cycling through the templates; the
    same ``seed`` gives the same problems. Each comes with its answer and a worked solution."""
    r = random.Random(seed)
    questions = []
    for i in range(n):
        text, answer, work = TEMPLATES[i % len(TEMPLATES)](r, r.choice(NAMES), r.choice(ITEMS))
        questions.append(Question(f"arithmetic-{seed}-{i}", text, str(answer), f"{work} The answer is {answer}."))
    return questions


# ---- built-in offline task: sentiment of real product review sentences ---------------------------------

SENTIMENT_FILE = Path(__file__).parent / "builtin" / "amazon_cells_labelled.txt"  # CC BY 4.0, see its README
SENTIMENT_QUESTION = 'Is the sentiment of this product review positive or negative?\nReview: "{sentence}"'
SENTIMENT_ATTRIBUTION = (
    "The review sentences are the Amazon part of the UCI *Sentiment Labelled Sentences* data set (D. Kotzias, "
    "M. Denil, N. de Freitas, P. Smyth, \"From Group to Individual Labels using Deep Features\", KDD 2015; "
    "sentences from J. McAuley and J. Leskovec, \"Hidden factors and hidden topics: understanding rating "
    "dimensions with review text\", RecSys 2013), distributed by the UCI Machine Learning Repository "
    "(https://archive.ics.uci.edu/dataset/331/sentiment+labelled+sentences) under the Creative Commons "
    "Attribution 4.0 International licence (https://creativecommons.org/licenses/by/4.0/). The sentences are "
    "unchanged; the questions around them, the generated responses and the labels were added by `icm`.")


def sentiment_questions(n: int, seed: int = 0) -> list[Question]:
    """``n`` of the 1,000 Amazon review sentences (UCI Sentiment Labelled Sentences, 500 positive and 500
    negative), drawn at random with ``seed``; the reference answer is ``positive`` or ``negative``. A
    sentence's id is its line number, so ids do not depend on the draw."""
    rows = [line.rsplit("\t", 1) for line in SENTIMENT_FILE.read_text(encoding="utf-8").splitlines() if line.strip()]
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    questions = []
    for i in order[:n]:
        sentence, label = rows[i]
        answer = "positive" if label.strip() == "1" else "negative"
        questions.append(Question(f"sentiment-{i + 1}", SENTIMENT_QUESTION.format(sentence=sentence.strip()),
                                  answer, answer))
    return questions


# ---- built-in offline task: capitals of countries, answered in free text ---------------------------------

CAPITALS_FILE = Path(__file__).parent / "builtin" / "capitals.txt"  # facts, written for this project
CAPITAL_QUESTION = "What is the capital of {country}?"


def capitals(which: str = "all") -> dict[str, str]:
    """Country -> capital of the built-in table: ``common`` (widely known), ``more`` (less famous) or ``all``."""
    rows = [line.split("\t") for line in CAPITALS_FILE.read_text(encoding="utf-8").splitlines()
            if line.strip() and not line.startswith("#")]
    return {country: capital for country, capital, kind in rows if which in ("all", kind)}


def capital_questions(n: int, seed: int = 0) -> list[Question]:
    """``n`` of the 141 countries (drawn at random with ``seed``), each asking for its capital. Answers are free
    text; the task's extractor reads the first capital of the table that a completion names, so a sampled
    answer naming another country's capital is a wrong candidate, and one naming none has no final answer."""
    table = sorted(capitals().items())
    random.Random(seed).shuffle(table)
    return [Question(f"capital-{country.lower().replace(' ', '-')}", CAPITAL_QUESTION.format(country=country),
                     normalize_answer(capital), capital) for country, capital in table[:n]]


@dataclass(frozen=True)
class Task:
    """A built-in offline task: where its questions come from and how answers are asked for and read.

    Args:
        questions: ``(n, seed) -> n questions`` with reference answers.
        instruction: text before each question in the generation and evaluation prompts.
        extractor: how a final answer is read from a completion (``data.answers.extract_answer``).
        max_new_tokens: enough tokens for a complete answer.
        license: Hub licence id of the questions' source data (None: generated here, no third-party data).
        attribution: Markdown crediting the source data, for dataset cards.
        prefix: how each of its questions begins, so a dataset card can tell which task a file came from.
    """

    questions: Callable[[int, int], list[Question]]
    instruction: str
    extractor: str
    max_new_tokens: int
    license: str | None = None
    attribution: str | None = None
    prefix: str | None = None


TASKS: dict[str, Task] = {
    "arithmetic": Task(arithmetic_questions, DEFAULT_INSTRUCTION, "auto", 256),
    "sentiment": Task(sentiment_questions, "Answer with one word: positive or negative.", "positive|negative", 16,
                      license="cc-by-4.0", attribution=SENTIMENT_ATTRIBUTION,
                      prefix=SENTIMENT_QUESTION.split("{sentence}")[0]),
    # several sampled answers per question with different final answers: the paper's GSM8K shape, on a concept
    # Gemma3-270M has (country-capital claims: 89% with gold demonstrations, 50% zero-shot)
    "capitals": Task(capital_questions, "Answer with the name of the city only.", "|".join(capitals().values()), 16,
                     prefix=CAPITAL_QUESTION.split("{country}")[0]),
}


def task_of(texts: list[str]) -> str | None:
    """The built-in task whose questions all of ``texts`` are (each contains the task's question prefix), if any:
    how a card finds the licence of data made from a task, whatever stages it went through."""
    texts = [t for t in texts if isinstance(t, str)]
    for name, spec in TASKS.items():
        if spec.prefix and texts and all(spec.prefix in t for t in texts):
            return name
    return None


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise InputError(name, f"unknown task (available: {', '.join(TASKS)})")
    return TASKS[name]
